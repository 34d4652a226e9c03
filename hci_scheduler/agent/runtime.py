"""The container side of the agent: one workload = one container, through the docker SDK.

The engine keeps the truth about what runs (kubelet's rule): every container the agent makes
carries labels with the workload id, a versioned hash of the workload's spec, the host id and
its restart count, so a restarted agent rebuilds its view from a listing. Names are the
workload id made safe for Docker plus a short hash of the id, so two agents (or a retry)
cannot make two containers of one workload: a 409 on create means inspect and adopt or
replace (hashicorp/nomad #2084). Docker's own restart policy is off: the agent restarts by the
workload's policy so that the scheduler sees every exit.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field

from ..errors import ValidationError
from . import vm

log = logging.getLogger("hci_scheduler.agent")

LABEL_WORKLOAD = "io.hci-scheduler.workload-id"
LABEL_SPEC_HASH = "io.hci-scheduler.spec-hash"
LABEL_HOST = "io.hci-scheduler.host-id"
LABEL_RESTARTS = "io.hci-scheduler.restarts"
LABEL_KIND = "io.hci-scheduler.kind"
LABEL_QMP_DIR = "io.hci-scheduler.qmp-dir"
LABEL_NUMA_NODE = "io.hci-scheduler.numa-node"  # the engine host's node a VM is pinned to
LABEL_NUMA_RECORD = "io.hci-scheduler.numa-record"  # the node the scheduler charged (Placement.numa_node)
LABEL_INCOMING = "io.hci-scheduler.incoming"  # a VM started to receive a live migration
LABEL_SPEC = "io.hci-scheduler.spec"  # base64 of the spec bytes, for comparing across hash versions
MAX_SPEC_LABEL = 16384  # a larger spec is not kept in a label (its hash still is)
# The hash's version is part of its value: a new hash function gets a new prefix, and a
# container with another version is compared field by field, not replaced (kubernetes #53644).
HASH_VERSION = "v1"
MAX_NAME = 200
STOP_TIMEOUT_S = 10  # SIGTERM, then SIGKILL after this long


def spec_hash(spec_bytes: bytes) -> str:
    """The versioned hash of a workload's spec bytes (deterministic protobuf encoding)."""
    return f"{HASH_VERSION}-{hashlib.sha256(spec_bytes).hexdigest()[:32]}"


def matches(labels: dict, want_hash: str, want_spec) -> bool:
    """Whether a container made from `labels` runs the desired spec. Equal hashes match; a
    hash of another version (the hash function changed) is not a mismatch by itself: the
    spec kept in the label is compared field by field, so an upgrade restarts nothing."""
    have = labels.get(LABEL_SPEC_HASH, "")
    if have == want_hash:
        return True
    if have.split("-", 1)[0] == HASH_VERSION or LABEL_SPEC not in labels:
        return False
    import base64

    from ..v1 import scheduler_pb2 as pb

    try:
        return pb.Workload.FromString(base64.b64decode(labels[LABEL_SPEC])) == want_spec
    except Exception:  # a label that does not decode is another spec
        return False


def container_name(workload_id: str) -> str:
    """The workload id made safe for Docker ([a-zA-Z0-9][a-zA-Z0-9_.-]*) plus a short hash of
    the exact id, since two ids can map to one safe form."""
    safe = re.sub(r"[^a-zA-Z0-9_.-]", "-", workload_id)[:MAX_NAME]
    if not safe[:1].isalnum():
        safe = "w" + safe
    return f"{safe}-{hashlib.sha256(workload_id.encode()).hexdigest()[:8]}"


@dataclass
class HostFacts:
    """What the agent knows about its host that shapes a container."""

    host_id: str
    kvm: bool
    vm_image: str
    volumes_dir: str  # volume ids map to directories here (on the host's SSD)
    qmp_root: str  # per-VM directories holding QMP sockets (short: a unix path is <= 107 bytes)
    storage_limit: bool  # the storage driver takes a per-container size (vfs does not)
    numa_cpus: dict[int, str] = field(default_factory=dict)  # NUMA node -> its cpulist ("0-15")


@dataclass(frozen=True)
class NumaPin:
    """Where a NUMA-fit VM runs: the node the scheduler charged it to (of record) and the
    engine host's node it is pinned to, the same one unless the host lacks it."""

    record: int  # Placement.numa_node
    node: int  # the engine host's NUMA node (cpuset_mems); -1: not pinned
    cpus: str  # that node's cpulist (cpuset_cpus)
    note: str = ""  # why node differs from record, for the log and the workload's status


def numa_pin(workload, record: int, numa_cpus: dict[int, str]) -> NumaPin | None:
    """The pin of a NUMA-fit VM whose node of record is `record` on an engine host whose
    NUMA nodes are `numa_cpus` (node -> cpulist), or None when nothing is pinned (not a
    NUMA-fit VM, or no node recorded).

    The rule when the engine host has fewer real nodes than its registration (a host
    registered by hand, or an engine that hides its topology): the node of record when it
    exists; else real node number `record mod n_real` in ascending order, so VMs charged
    to different nodes spread over what exists as they were spread over the record; with
    no NUMA information at all, no pin. Either way the note says so."""
    if record < 0 or not (is_vm(workload) and workload.numa):
        return None
    if record in numa_cpus:
        return NumaPin(record, record, numa_cpus[record])
    if not numa_cpus:
        return NumaPin(record, -1, "", f"NUMA node {record} of record: this engine host reports no NUMA "
                                       "nodes, not pinned")
    real = sorted(numa_cpus)
    node = real[record % len(real)]
    return NumaPin(record, node, numa_cpus[node], f"NUMA node {record} of record is not on this engine host "
                                                  f"(nodes {','.join(map(str, real))}): pinned to node {node}")


def pin_matches(labels: dict, pin: NumaPin | None) -> bool:
    """Whether a container made from `labels` is pinned where `pin` says (a VM pinned
    elsewhere, by an agent that chose its own node, is replaced)."""
    want = str(pin.node) if pin is not None and pin.node >= 0 else ""
    return labels.get(LABEL_NUMA_NODE, "") == want


@dataclass
class RunSpec:
    """Everything the engine is asked for to run one workload."""

    name: str
    image: str
    entrypoint: list[str] | None
    command: list[str]
    environment: dict[str, str]
    labels: dict[str, str]
    nano_cpus: int
    mem_limit_mib: int
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    devices: list[str] = field(default_factory=list)
    binds: dict[str, dict] = field(default_factory=dict)
    storage_gib: int = 0
    warning: str = ""  # goes into the workload's status message (TCG)
    qmp_dir: str = ""


def qmp_dir_of(facts: HostFacts, workload_id: str) -> str:
    """The host directory holding a VM's QMP socket (and its migration sockets): short,
    since a unix socket path is at most 107 bytes."""
    import os

    return os.path.join(facts.qmp_root, hashlib.sha256(workload_id.encode()).hexdigest()[:12])


def is_vm(workload) -> bool:
    from ..v1 import scheduler_pb2 as pb

    return workload.kind == pb.WORKLOAD_KIND_VM


def run_spec(
    workload,
    spec_bytes: bytes,
    facts: HostFacts,
    restarts: int = 0,
    pin: NumaPin | None = None,
    incoming: str = "",
) -> RunSpec:
    """The RunSpec of a workload on this host. Limits come from its requests: nano_cpus =
    millicores * 1e6, a hard memory limit in MiB (a VM's adds qemu's overhead), cpuset and
    memory node of a NUMA-fit VM from its `pin` (see numa_pin); `incoming` starts a VM as a
    live migration's target (migration.incoming_uri). Raises ValidationError when nothing
    says what to run (no image)."""
    import os

    req = workload.requests
    cpu, memory = int(req.get("cpu", 0)), int(req.get("memory", 0))
    labels = {
        LABEL_WORKLOAD: workload.id,
        LABEL_SPEC_HASH: spec_hash(spec_bytes),
        LABEL_HOST: facts.host_id,
        LABEL_RESTARTS: str(restarts),
    }
    if len(spec_bytes) <= MAX_SPEC_LABEL:
        import base64

        labels[LABEL_SPEC] = base64.b64encode(spec_bytes).decode()
    spec = RunSpec(
        name=container_name(workload.id),
        image="",
        entrypoint=None,
        command=[],
        environment={},
        labels=labels,
        nano_cpus=cpu * 1_000_000,
        mem_limit_mib=memory,
        storage_gib=int(req.get("ssd", 0)) if facts.storage_limit else 0,
    )
    if is_vm(workload):
        labels[LABEL_KIND] = "vm"
        vcpus = vm.vcpus_of(cpu)
        if memory <= 0:
            raise ValidationError(
                f"workload {workload.id!r}: a VM needs a memory request, got {memory}"
            )
        disk = vm.disk_path(workload.vm.disk_image, facts.volumes_dir)
        cmd = vm.qemu_command(vcpus, memory, facts.kvm, disk, incoming)
        if incoming:
            labels[LABEL_INCOMING] = "1"
        spec.image = workload.vm.launcher_image or facts.vm_image
        spec.entrypoint = [f"/usr/bin/{'qemu-system-x86_64'}"]
        spec.command = cmd.argv
        spec.devices = cmd.devices
        spec.warning = cmd.warning
        spec.mem_limit_mib = vm.memory_limit_mib(memory, vcpus)
        spec.qmp_dir = qmp_dir_of(facts, workload.id)
        labels[LABEL_QMP_DIR] = spec.qmp_dir
        spec.binds[spec.qmp_dir] = {"bind": vm.QMP_DIR_INSIDE, "mode": "rw"}
        if disk:
            spec.binds[disk] = {"bind": vm.DISK_INSIDE, "mode": "rw"}
        if pin is not None:
            labels[LABEL_NUMA_RECORD] = str(pin.record)
            if pin.node >= 0:
                spec.cpuset_cpus, spec.cpuset_mems = pin.cpus, str(pin.node)
                labels[LABEL_NUMA_NODE] = str(pin.node)
            spec.warning = "; ".join(m for m in (spec.warning, pin.note) if m)
        return spec
    labels[LABEL_KIND] = "container"
    c = workload.container
    if not c.image:
        raise ValidationError(
            f"workload {workload.id!r} has no container image (Workload.container.image)"
        )
    spec.image = c.image
    if c.command:
        spec.entrypoint = list(c.command)
    spec.command = list(c.args)
    spec.environment = dict(c.env)
    for m in c.mounts:
        spec.binds[os.path.join(facts.volumes_dir, m.volume_id)] = {
            "bind": m.path,
            "mode": "ro" if m.read_only else "rw",
        }
    return spec


@dataclass(frozen=True)
class ContainerState:
    """The engine's state of one container, as the status report needs it."""

    status: str  # created, running, exited, dead, ...
    exit_code: int
    error: str
    oom_killed: bool
    started_at: str
    finished_at: str

    @property
    def running(self) -> bool:
        return self.status in ("running", "restarting")

    @classmethod
    def of(cls, container) -> "ContainerState":
        s = container.attrs.get("State", {})
        return cls(
            s.get("Status", container.status),
            int(s.get("ExitCode", 0) or 0),
            s.get("Error", "") or "",
            bool(s.get("OOMKilled")),
            s.get("StartedAt", ""),
            s.get("FinishedAt", ""),
        )


class Runtime:
    """The engine calls the agent makes, all with the client's timeout; only containers
    labelled with this host's id are ever listed, stopped or removed."""

    def __init__(self, client, host_id: str, stop_timeout_s: int = STOP_TIMEOUT_S):
        self.client = client
        self.host_id = host_id
        self.stop_timeout_s = stop_timeout_s

    def _inspected(self, filters: dict) -> list:
        """Containers matching filters, each inspected; one removed between the listing and
        its inspection is skipped (a non-sparse list would raise NotFound)."""
        import docker.errors

        out = []
        for c in self.client.containers.list(all=True, sparse=True, filters=filters):
            try:
                c.reload()
            except docker.errors.NotFound:
                continue
            out.append(c)
        return out

    def list(self) -> dict[str, list]:
        """Containers of this host by workload id (every state)."""
        out: dict[str, list] = {}
        for c in self._inspected({"label": f"{LABEL_HOST}={self.host_id}"}):
            wid = c.labels.get(LABEL_WORKLOAD)
            if wid is not None:
                out.setdefault(wid, []).append(c)
        return out

    def find(self, workload_id: str) -> list:
        return self._inspected(
            {"label": [f"{LABEL_HOST}={self.host_id}", f"{LABEL_WORKLOAD}={workload_id}"]}
        )

    def start(self, spec: RunSpec):
        """Create and start the container. Raises docker.errors.ImageNotFound / APIError with
        the engine's reason."""
        import docker.errors

        if spec.qmp_dir:
            import os

            os.makedirs(spec.qmp_dir, exist_ok=True)
        for host_path, bind in spec.binds.items():
            if bind["bind"] not in (vm.DISK_INSIDE,):
                import os

                os.makedirs(host_path, exist_ok=True)
        kwargs = dict(
            name=spec.name,
            entrypoint=spec.entrypoint,
            command=spec.command or None,
            environment=spec.environment,
            labels=spec.labels,
            nano_cpus=spec.nano_cpus or None,
            network_mode="none",
            detach=True,
            devices=spec.devices or None,
            volumes=spec.binds or None,
            restart_policy={"Name": "no"},
            stop_signal="SIGTERM",
        )
        if spec.mem_limit_mib:
            # Hard limit, no extra swap: memswap equal to the limit.
            kwargs["mem_limit"] = f"{spec.mem_limit_mib}m"
            kwargs["memswap_limit"] = f"{spec.mem_limit_mib}m"
        if spec.cpuset_cpus:
            kwargs["cpuset_cpus"], kwargs["cpuset_mems"] = spec.cpuset_cpus, spec.cpuset_mems
        if spec.storage_gib:
            kwargs["storage_opt"] = {"size": f"{spec.storage_gib}G"}
        try:
            container = self.client.containers.create(spec.image, **kwargs)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
            # A container of that name exists (a create whose answer was lost, or a restart):
            # adopt it when it is the same spec, else replace it.
            existing = self.client.containers.get(spec.name)
            if (
                existing.labels.get(LABEL_SPEC_HASH) == spec.labels[LABEL_SPEC_HASH]
                and existing.labels.get(LABEL_HOST) == self.host_id
                and existing.labels.get(LABEL_RESTARTS) == spec.labels[LABEL_RESTARTS]
            ):
                container = existing
            else:
                self.remove(existing)
                container = self.client.containers.create(spec.image, **kwargs)
        container.start()
        container.reload()
        return container

    def remove(self, container, timeout: int | None = None) -> None:
        """Stop (a VM is asked to quit over QMP first) and remove."""
        import docker.errors

        qmp_dir = container.labels.get(LABEL_QMP_DIR)
        if qmp_dir and container.status == "running":
            quit_vm(qmp_dir)
        try:
            if container.status == "running":
                container.stop(timeout=self.stop_timeout_s if timeout is None else timeout)
            container.remove(force=True)
        except docker.errors.NotFound:
            pass


def quit_vm(qmp_dir: str, wait_s: float = 5.0) -> bool:
    """Ask qemu to quit over QMP (a clean stop that flushes the disk); False when it cannot
    be reached."""
    import os

    from .qmp import QmpClient, QmpError

    try:
        with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET), timeout=wait_s) as q:
            q.quit()
        return True
    except (OSError, QmpError, ValueError):
        return False


def wait_running(qmp_dir: str, timeout_s: float = 10.0):
    """QMP query-status once qemu's socket accepts, or None when it does not in time."""
    import os

    from .qmp import QmpClient, QmpError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET), timeout=2.0) as q:
                return q.status()
        except (OSError, QmpError, ValueError):
            time.sleep(0.1)
    return None
