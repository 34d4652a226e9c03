"""The host as its Docker Engine reports it, in the scheduler's units.

cpu = NCPU * 1000 millicores, memory = MemTotal in MiB, ssd = the size of the filesystem
holding the engine's data root in GiB (read here, so only for an engine on this machine),
kvm=true only when /dev/kvm can create a VM, NUMA nodes from /sys for a local engine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from . import vm

log = logging.getLogger("hci_scheduler.agent")

# Storage drivers that take `--storage-opt size=` (overlay2 only on xfs with pquota).
SIZE_DRIVERS = ("btrfs", "zfs", "devicemapper", "windowsfilter")
STORAGE_LIMIT_LABEL = "storage-limit"


@dataclass
class EngineHost:
    """The engine's facts, ready for registration."""

    capacity: dict[str, int]
    labels: dict[str, str]
    kvm: bool
    kvm_reason: str
    storage_driver: str
    storage_limit: bool
    numa_cpus: dict[int, str] = field(default_factory=dict)
    numa_resources: list[dict[str, int]] = field(default_factory=list)


def is_local(docker_host: str) -> bool:
    return docker_host.startswith("unix://") or docker_host.startswith("/")


def _cpulist_len(text: str) -> int:
    n = 0
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part:
            n += 1
    return n


def numa_nodes(
    root: str = "/sys/devices/system/node",
) -> tuple[dict[int, str], list[dict[str, int]]]:
    """NUMA node -> cpulist, and each node's cpu millicores and memory MiB, from sysfs."""
    cpus: dict[int, str] = {}
    resources: list[dict[str, int]] = []
    if not os.path.isdir(root):
        return cpus, resources
    for name in sorted(os.listdir(root), key=lambda n: int(n[4:]) if n[4:].isdigit() else -1):
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        node = int(name[4:])
        with open(os.path.join(root, name, "cpulist")) as f:
            cpus[node] = f.read().strip()
        mem_kib = 0
        with open(os.path.join(root, name, "meminfo")) as f:
            for line in f:
                if "MemTotal:" in line:
                    mem_kib = int(line.split()[-2])
        resources.append({"cpu": 1000 * _cpulist_len(cpus[node]), "memory": mem_kib // 1024})
    return cpus, resources


def supports_storage_limit(info: dict) -> bool:
    driver = info.get("Driver", "")
    if driver in SIZE_DRIVERS:
        return True
    status = dict(tuple(x) for x in info.get("DriverStatus") or [] if len(x) == 2)
    return driver == "overlay2" and status.get("Backing Filesystem") == "xfs"


def engine_host(client, docker_host: str, labels: dict[str, str] | None = None) -> EngineHost:
    info = client.info()
    local = is_local(docker_host)
    capacity = {"cpu": int(info["NCPU"]) * 1000, "memory": int(info["MemTotal"]) // (1024 * 1024)}
    root = info.get("DockerRootDir", "")
    if local and root and os.path.isdir(root):
        st = os.statvfs(root)
        capacity["ssd"] = st.f_blocks * st.f_frsize // (1024**3)
    kvm, reason = vm.kvm_usable() if local else (False, "the engine is not on this machine")
    out_labels = dict(labels or {})
    out_labels["kvm"] = "true" if kvm else "false"
    storage_limit = supports_storage_limit(info)
    if not storage_limit:
        out_labels[STORAGE_LIMIT_LABEL] = "unsupported"
        log.warning(
            "storage driver %s takes no per-container size: SSD requests are not enforced as "
            "storage limits on this host",
            info.get("Driver"),
        )
    cpus, resources = numa_nodes() if local else ({}, [])
    return EngineHost(
        capacity, out_labels, kvm, reason, info.get("Driver", ""), storage_limit, cpus, resources
    )
