"""A KVM guest as a container: the launcher image's qemu-system-x86_64 is the process.

vCPUs and memory come from the workload's requests (cpu millicores rounded up to whole vCPUs,
memory MiB). `/dev/kvm` is passed in and accel=kvm only when the host's /dev/kvm really works
(opened and asked KVM_GET_API_VERSION and KVM_CREATE_VM); otherwise TCG, with a warning the
agent puts in the workload's status. QMP listens on a socket in a host directory mounted into
the container, which is how the agent reads the guest's state and asks qemu to quit.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

KVM_DEVICE = "/dev/kvm"
KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
KVM_API_VERSION = 12  # the only stable version since Linux 2.6.22
QMP_DIR_INSIDE = "/run/qmp"
QMP_SOCKET = "qmp.sock"
DISK_INSIDE = "/run/disk"
# qemu's memory beyond the guest's RAM, after KubeVirt's virt-launcher estimate: page tables
# (guest/512), about 8 MiB per vCPU (thread stacks, vCPU state), and a fixed part for qemu's own
# code, libraries and TCG translation buffer. A limit at guest RAM gets qemu OOM-killed
# (kubevirt/kubevirt #4560).
OVERHEAD_PER_VCPU_MIB = 8
OVERHEAD_FIXED_MIB = 160
TCG_WARNING = "no usable /dev/kvm on this host: the guest runs under TCG emulation (slow)"


def kvm_usable(device: str = KVM_DEVICE) -> tuple[bool, str]:
    """Whether a guest can really run with KVM here, and why not when it cannot.

    A /dev/kvm node can exist without working (no permission, a nested hypervisor without
    VMX/SVM passed through), so the check opens it and creates a VM, as qemu would.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return False, f"{device}: KVM API version {version}, expected {KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm_fd)
        return True, ""
    except OSError as exc:
        return False, f"{device}: {exc.strerror}"
    finally:
        os.close(fd)


def vcpus_of(cpu_millicores: int) -> int:
    """Whole vCPUs for a cpu request: rounded up, at least one."""
    return max(1, -(-int(cpu_millicores) // 1000))


def memory_limit_mib(guest_mib: int, vcpus: int) -> int:
    """The container's hard memory limit: the guest's RAM plus qemu's overhead."""
    return guest_mib + -(-guest_mib // 512) + OVERHEAD_PER_VCPU_MIB * vcpus + OVERHEAD_FIXED_MIB


@dataclass(frozen=True)
class VmCommand:
    """What the launcher container runs and needs."""

    argv: list[str]  # qemu's argument list (the entrypoint is qemu itself)
    devices: list[str]  # docker device mappings
    kvm: bool
    warning: str  # empty with KVM; TCG_WARNING without


def qemu_command(
    vcpus: int, memory_mib: int, kvm: bool, disk: str | None, incoming: str = ""
) -> VmCommand:
    """qemu's arguments: headless, no default devices or network (containers run without a
    bridge), QMP on the mounted socket, and the disk (mounted at DISK_INSIDE) when there is
    one; a diskless guest boots the firmware and waits, which is a running VM to QMP. With
    `incoming` (a live migration's target) qemu waits for the guest's state there instead of
    booting it; the rest of the command must be the source's."""
    argv = [
        "-machine",
        f"q35,accel={'kvm' if kvm else 'tcg'}",
        "-smp",
        str(vcpus),
        "-m",
        str(memory_mib),
        "-nographic",
        "-nodefaults",
        "-serial",
        "none",
        "-nic",
        "none",
        "-qmp",
        f"unix:{QMP_DIR_INSIDE}/{QMP_SOCKET},server=on,wait=off",
    ]
    if disk:
        fmt = "qcow2" if disk.endswith(".qcow2") else "raw"
        argv += ["-drive", f"file={DISK_INSIDE},if=virtio,format={fmt}"]
    if incoming:
        argv += ["-incoming", incoming]
    return VmCommand(
        argv, [f"{KVM_DEVICE}:{KVM_DEVICE}:rwm"] if kvm else [], kvm, "" if kvm else TCG_WARNING
    )


def disk_path(disk_image: str, volumes_dir: str) -> str | None:
    """The host path of a VM's disk: a path as given, or `volume:<id>` as the file disk.img in
    that volume's directory on the host's SSD; None for a diskless guest."""
    if not disk_image:
        return None
    if disk_image.startswith("volume:"):
        return os.path.join(volumes_dir, disk_image[len("volume:") :], "disk.img")
    return disk_image
