"""The user-facing model: hosts, workloads, volumes and their constraints.

These are plain frozen dataclasses. They check what they can on their own
(types, signs, enumerations); checks that need the cluster (dimension names,
unknown groups or topology keys) happen in `Cluster` when the object is
compiled into arrays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
# collections.abc, not typing: isinstance on typing's aliases first goes through
# typing's Python-level __instancecheck__.
from collections.abc import Iterable, Mapping, Sequence

from .errors import ValidationError

DEFAULT_DIMENSIONS = ("cpu", "memory", "ssd", "net", "gpu")
KINDS = ("container", "vm")
HOST_STATES = ("ready", "cordoned", "draining", "down")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule")
LABEL_OPS = ("In", "NotIn", "Exists", "DoesNotExist")
ISOLATIONS = ("shared", "dedicated")
RESTART_POLICIES = ("on-failure", "always", "never")
#: Bounds of a runtime spec: what an agent hands to the engine, and what every
#: listing and watch carries, so they are capped like every other string (issue 13).
MAX_IMAGE_LENGTH = 255
MAX_ARGUMENT_LENGTH = 4096  # one command or args item, one mount path
MAX_ARGUMENTS = 256  # command items, args items, mounts
MAX_ENV_ENTRIES = 256
MAX_ENV_KEY_LENGTH = 255
MAX_ENV_VALUE_LENGTH = 32768


def _check_id(kind: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{kind} id must be a non-empty string, got {value!r}")


def check_quantity(field_name: str, value) -> int:
    """Return `value` as an int, or raise naming the field.

    Quantities are integers in the base unit (millicores, MiB, GiB, Mbit/s,
    count): floats are accepted only when integral, NaN and negatives never.
    """
    if isinstance(value, bool):
        raise ValidationError(f"{field_name} must be an integer, got bool {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValidationError(f"{field_name} must be a finite integer, got {value!r}")
        if not value.is_integer():
            raise ValidationError(f"{field_name} must be an integer, got {value!r}")
        result = int(value)
    else:
        try:
            import numpy as np

            if isinstance(value, np.integer):
                result = int(value)
            else:
                raise TypeError
        except TypeError:
            raise ValidationError(
                f"{field_name} must be an integer, got {type(value).__name__} {value!r}"
            ) from None
    if result < 0:
        raise ValidationError(f"{field_name} must be >= 0, got {result}")
    if result >= 2**46:
        raise ValidationError(f"{field_name} is too large: {result} (at most 2**46 - 1)")
    return result


def _check_mapping(field_name: str, value) -> None:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{field_name} must be a mapping, got {type(value).__name__}")


def _check_str_map(field_name: str, value) -> None:
    _check_mapping(field_name, value)
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValidationError(f"{field_name} must map non-empty strings to strings, got {k!r}: {v!r}")


@dataclass(frozen=True)
class Taint:
    """Keeps workloads off a host unless they tolerate it."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValidationError(f"taint key must be a non-empty string, got {self.key!r}")
        if not isinstance(self.value, str):
            raise ValidationError(f"taint value must be a string, got {self.value!r}")
        if self.effect not in TAINT_EFFECTS:
            raise ValidationError(f"taint effect must be one of {TAINT_EFFECTS}, got {self.effect!r}")

    @classmethod
    def parse(cls, text: str) -> "Taint":
        """Parse `key=value:Effect` (value optional)."""
        try:
            kv, effect = text.rsplit(":", 1)
        except ValueError:
            raise ValidationError(f"taint must look like key=value:Effect, got {text!r}") from None
        key, _, value = kv.partition("=")
        return cls(key, value, effect)

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}"


@dataclass(frozen=True)
class Toleration:
    """Lets a workload onto hosts with a matching taint. value=None matches any value,
    effect=None matches any effect."""

    key: str
    value: str | None = None
    effect: str | None = None

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValidationError(f"toleration key must be a non-empty string, got {self.key!r}")
        if self.value is not None and not isinstance(self.value, str):
            raise ValidationError(f"toleration value must be a string or None, got {self.value!r}")
        if self.effect is not None and self.effect not in TAINT_EFFECTS:
            raise ValidationError(
                f"toleration effect must be one of {TAINT_EFFECTS} or None, got {self.effect!r}"
            )

    def tolerates(self, taint: Taint) -> bool:
        return (
            self.key == taint.key
            and (self.value is None or self.value == taint.value)
            and (self.effect is None or self.effect == taint.effect)
        )


@dataclass(frozen=True)
class LabelExpr:
    """A label selector term: key In/NotIn values, Exists, DoesNotExist."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def __post_init__(self):
        if not isinstance(self.key, str) or not self.key:
            raise ValidationError(f"selector key must be a non-empty string, got {self.key!r}")
        if self.op not in LABEL_OPS:
            raise ValidationError(f"selector operator must be one of {LABEL_OPS}, got {self.op!r}")
        values = tuple(self.values) if not isinstance(self.values, str) else (self.values,)
        object.__setattr__(self, "values", values)
        if self.op in ("In", "NotIn") and not values:
            raise ValidationError(f"selector {self.key} {self.op} needs at least one value")
        if self.op in ("Exists", "DoesNotExist") and values:
            raise ValidationError(f"selector {self.key} {self.op} takes no values, got {values!r}")
        if not all(isinstance(v, str) for v in values):
            raise ValidationError(f"selector {self.key} values must be strings, got {values!r}")

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "In":
            return labels.get(self.key) in self.values
        if self.op == "NotIn":
            return labels.get(self.key) not in self.values
        if self.op == "Exists":
            return self.key in labels
        return self.key not in labels

    def __str__(self) -> str:
        if self.op in ("In", "NotIn"):
            return f"{self.key} {self.op} ({', '.join(self.values)})"
        return f"{self.key} {self.op}"


@dataclass(frozen=True)
class Affinity:
    """Attraction (in `affinity`) or repulsion (in `anti_affinity`) to the workloads
    of `group` within one domain of the `topology` key ("host", or a host label)."""

    group: str
    topology: str = "host"
    hard: bool = True
    weight: int = 1

    def __post_init__(self):
        if not isinstance(self.group, str) or not self.group:
            raise ValidationError(f"affinity group must be a non-empty string, got {self.group!r}")
        if not isinstance(self.topology, str) or not self.topology:
            raise ValidationError(f"affinity topology must be a non-empty string, got {self.topology!r}")
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or not 1 <= self.weight <= 100:
            raise ValidationError(f"affinity weight must be an integer in 1..100, got {self.weight!r}")


@dataclass(frozen=True)
class Spread:
    """Keep the workloads of the same group within `max_skew` of each other across
    the domains of `topology`."""

    topology: str
    max_skew: int = 1
    hard: bool = True

    def __post_init__(self):
        if not isinstance(self.topology, str) or not self.topology:
            raise ValidationError(f"spread topology must be a non-empty string, got {self.topology!r}")
        if not isinstance(self.max_skew, int) or isinstance(self.max_skew, bool) or self.max_skew < 1:
            raise ValidationError(f"spread max_skew must be an integer >= 1, got {self.max_skew!r}")


@dataclass(frozen=True)
class Volume:
    """A replicated volume on host SSDs; replicas sit on distinct hosts or racks."""

    id: str
    size_gib: int
    replicas: int = 1
    spread: str = "host"

    def __post_init__(self):
        _check_id("volume", self.id)
        object.__setattr__(self, "size_gib", check_quantity(f"volume {self.id} size_gib", self.size_gib))
        if self.size_gib == 0:
            raise ValidationError(f"volume {self.id} size_gib must be > 0")
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) or self.replicas < 1:
            raise ValidationError(f"volume {self.id} replicas must be an integer >= 1, got {self.replicas!r}")
        if not isinstance(self.spread, str) or not self.spread:
            raise ValidationError(f"volume {self.id} spread must be 'host' or a host label, got {self.spread!r}")


def _check_text(field_name: str, value, cap: int, *, empty: bool = True) -> None:
    if not isinstance(value, str):
        raise ValidationError(f"{field_name} must be a string, got {type(value).__name__} {value!r}")
    if not empty and not value:
        raise ValidationError(f"{field_name} must not be empty")
    if len(value) > cap:
        raise ValidationError(f"{field_name} is longer than {cap} characters: {value[:40]!r}...")


def _check_strings(field_name: str, values) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"{field_name} must be a list of strings, got {values!r}")
    values = tuple(values)
    if len(values) > MAX_ARGUMENTS:
        raise ValidationError(f"{field_name}: at most {MAX_ARGUMENTS} items, got {len(values)}")
    for v in values:
        _check_text(f"{field_name} item", v, MAX_ARGUMENT_LENGTH)
    return values


@dataclass(frozen=True)
class VolumeMount:
    """A volume of the workload mounted at `path` inside its container."""

    volume_id: str
    path: str
    read_only: bool = False

    def __post_init__(self):
        _check_id("mount volume", self.volume_id)
        _check_text(f"mount {self.volume_id} path", self.path, MAX_ARGUMENT_LENGTH, empty=False)
        if not self.path.startswith("/"):
            raise ValidationError(f"mount {self.volume_id} path must be absolute, got {self.path[:40]!r}")
        if not isinstance(self.read_only, bool):
            raise ValidationError(f"mount {self.volume_id} read_only must be a bool, got {self.read_only!r}")


@dataclass(frozen=True)
class ContainerSpec:
    """How the agent runs a container. Placement ignores it; it is part of the spec
    (a retry with another image is another spec). single_instance: the container must
    never run twice, so a move stops it on its source before starting it on its target."""

    image: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    restart_policy: str = "on-failure"
    mounts: Sequence[VolumeMount] = ()
    single_instance: bool = False

    def __post_init__(self):
        _check_text("container image", self.image, MAX_IMAGE_LENGTH, empty=False)
        object.__setattr__(self, "command", _check_strings("container command", self.command))
        object.__setattr__(self, "args", _check_strings("container args", self.args))
        _check_mapping("container env", self.env)
        if len(self.env) > MAX_ENV_ENTRIES:
            raise ValidationError(f"container env: at most {MAX_ENV_ENTRIES} entries, got {len(self.env)}")
        for k, v in self.env.items():
            _check_text("container env key", k, MAX_ENV_KEY_LENGTH, empty=False)
            _check_text(f"container env[{k!r}]", v, MAX_ENV_VALUE_LENGTH)
        if self.restart_policy not in RESTART_POLICIES:
            raise ValidationError(f"container restart_policy must be one of {RESTART_POLICIES}, "
                                  f"got {self.restart_policy!r}")
        mounts = tuple(self.mounts) if isinstance(self.mounts, Iterable) else self.mounts
        if not isinstance(mounts, tuple) or not all(isinstance(m, VolumeMount) for m in mounts):
            raise ValidationError(f"container mounts must be VolumeMount objects, got {self.mounts!r}")
        if len(mounts) > MAX_ARGUMENTS:
            raise ValidationError(f"container mounts: at most {MAX_ARGUMENTS}, got {len(mounts)}")
        paths = [m.path for m in mounts]
        if len(set(paths)) != len(paths):
            raise ValidationError(f"container mounts: a path is mounted twice in {paths[:10]!r}")
        object.__setattr__(self, "mounts", mounts)
        if not isinstance(self.single_instance, bool):
            raise ValidationError(f"container single_instance must be a bool, got {self.single_instance!r}")


@dataclass(frozen=True)
class VmSpec:
    """How the agent runs a KVM guest: its boot disk (a host path, or "volume:<id>" for
    a volume of the workload) and the launcher image running qemu (empty: the agent's
    --vm-image). vCPUs and memory come from the workload's requests."""

    disk_image: str
    launcher_image: str = ""

    def __post_init__(self):
        _check_text("vm disk_image", self.disk_image, MAX_ARGUMENT_LENGTH, empty=False)
        if self.disk_image == "volume:":
            raise ValidationError("vm disk_image 'volume:' names no volume")
        _check_text("vm launcher_image", self.launcher_image, MAX_IMAGE_LENGTH)

    @property
    def disk_volume(self) -> str | None:
        """The volume id of a "volume:<id>" disk, else None."""
        return self.disk_image[len("volume:"):] if self.disk_image.startswith("volume:") else None


@dataclass(frozen=True)
class Host:
    """A server (or cloud instance) that runs workloads.

    capacity and reserved are integers in each dimension's base unit; allocatable
    = capacity - reserved. allocation_ratio overcommits a dimension for
    containers only (VMs are counted at 1.0). numa lists the NUMA nodes as
    resource maps (cpu and memory per node) for VMs that ask for NUMA fit.
    """

    id: str
    capacity: Mapping[str, int]
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Taint] = ()
    allocation_ratio: Mapping[str, float] = field(default_factory=dict)
    reserved: Mapping[str, int] = field(default_factory=dict)
    numa: Sequence[Mapping[str, int]] = ()
    pool: str = "onprem"
    state: str = "ready"

    def __post_init__(self):
        _check_id("host", self.id)
        _check_mapping(f"host {self.id} capacity", self.capacity)
        _check_mapping(f"host {self.id} reserved", self.reserved)
        _check_str_map(f"host {self.id} labels", self.labels)
        _check_mapping(f"host {self.id} allocation_ratio", self.allocation_ratio)
        for name, ratio in self.allocation_ratio.items():
            if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (1.0 <= ratio <= 64.0):
                raise ValidationError(
                    f"host {self.id} allocation_ratio[{name!r}] must be a number in [1, 64], got {ratio!r}"
                )
        taints = tuple(Taint.parse(t) if isinstance(t, str) else t for t in self.taints)
        for t in taints:
            if not isinstance(t, Taint):
                raise ValidationError(f"host {self.id} taints must be Taint objects, got {t!r}")
        object.__setattr__(self, "taints", taints)
        object.__setattr__(self, "numa", tuple(dict(n) for n in self.numa))
        if self.state not in HOST_STATES:
            raise ValidationError(f"host {self.id} state must be one of {HOST_STATES}, got {self.state!r}")
        if not isinstance(self.pool, str) or not self.pool:
            raise ValidationError(f"host {self.id} pool must be a non-empty string, got {self.pool!r}")


@dataclass(frozen=True)
class Workload:
    """A container or KVM guest to place.

    requests are integers in each dimension's base unit (missing dimensions are 0).
    isolation="dedicated" (needs a tenant): the tenant's workloads share a host with
    nobody else's, tenant-less ones included; per-host services are the one exception.
    """

    id: str
    requests: Mapping[str, int] = field(default_factory=dict)
    kind: str = "container"
    tenant: str | None = None
    isolation: str = "shared"
    group: str | None = None
    selector: Mapping[str, str] | Sequence[LabelExpr] = field(default_factory=dict)
    tolerations: Sequence[Toleration] = ()
    affinity: Sequence[Affinity] = ()
    anti_affinity: Sequence[Affinity] = ()
    spread: Sequence[Spread] = ()
    volumes: Sequence[str | Volume] = ()
    gang: str | None = None
    priority: int = 0
    numa: bool = False
    per_host: bool = False
    container: ContainerSpec | None = None
    vm: VmSpec | None = None

    def __post_init__(self):
        _check_id("workload", self.id)
        _check_mapping(f"workload {self.id} requests", self.requests)
        if self.container is not None or self.vm is not None:
            self._check_runtime()
        if self.kind not in KINDS:
            raise ValidationError(f"workload {self.id} kind must be one of {KINDS}, got {self.kind!r}")
        if self.isolation not in ISOLATIONS:
            raise ValidationError(
                f"workload {self.id} isolation must be one of {ISOLATIONS}, got {self.isolation!r}"
            )
        if self.isolation == "dedicated" and not self.tenant:
            raise ValidationError(f"workload {self.id} isolation 'dedicated' needs a tenant")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValidationError(f"workload {self.id} priority must be an integer, got {self.priority!r}")
        for name in ("tenant", "group", "gang"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValidationError(f"workload {self.id} {name} must be a non-empty string or None, got {value!r}")
        if (not self.selector and not self.tolerations and not self.affinity and not self.anti_affinity
                and not self.spread and not self.volumes):
            # The common plain workload: nothing to check term by term.
            for name in ("selector", "tolerations", "affinity", "anti_affinity", "spread", "volumes"):
                if getattr(self, name) != ():
                    object.__setattr__(self, name, ())
            return
        for name in ("selector", "tolerations", "affinity", "anti_affinity", "spread", "volumes"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())  # None reads as "none of these"
            elif not isinstance(value, (Iterable, Mapping)) or isinstance(value, str):
                raise ValidationError(f"workload {self.id} {name} must be a list, got {value!r}")
        selector = self.selector
        if isinstance(selector, Mapping):
            _check_str_map(f"workload {self.id} selector", selector)
            selector = tuple(LabelExpr(k, "In", (v,)) for k, v in sorted(selector.items()))
        else:
            selector = tuple(selector)
            for s in selector:
                if not isinstance(s, LabelExpr):
                    raise ValidationError(f"workload {self.id} selector terms must be LabelExpr, got {s!r}")
        object.__setattr__(self, "selector", selector)
        for name, cls in (("tolerations", Toleration), ("affinity", Affinity),
                          ("anti_affinity", Affinity), ("spread", Spread)):
            items = tuple(getattr(self, name))
            for item in items:
                if not isinstance(item, cls):
                    raise ValidationError(f"workload {self.id} {name} must hold {cls.__name__}, got {item!r}")
            object.__setattr__(self, name, items)
        volumes = tuple(self.volumes)
        for v in volumes:
            if not isinstance(v, (str, Volume)) or (isinstance(v, str) and not v):
                raise ValidationError(f"workload {self.id} volumes must be volume ids or Volume, got {v!r}")
        object.__setattr__(self, "volumes", volumes)

    def _check_runtime(self) -> None:
        """A container spec only on a container, a VM spec only on a VM."""
        for name, cls, kind in (("container", ContainerSpec, "container"), ("vm", VmSpec, "vm")):
            spec = getattr(self, name)
            if spec is None:
                continue
            if not isinstance(spec, cls):
                raise ValidationError(f"workload {self.id} {name} must be a {cls.__name__}, got {spec!r}")
            if self.kind != kind:
                raise ValidationError(f"workload {self.id} {name}: a {cls.__name__} is for kind {kind!r}, "
                                      f"not {self.kind!r}")

    def check_mounted_volumes(self) -> None:
        """Raise unless what the runtime spec mounts is a volume of the workload: placement
        puts the workload with its volumes' replicas, and nowhere else is its data. Called
        where a workload enters (the server's conversion), not in __post_init__: the
        Cluster derives copies without the volumes it creates."""
        own = {v if isinstance(v, str) else v.id for v in self.volumes}
        wanted = [m.volume_id for m in self.container.mounts] if self.container is not None else []
        if self.vm is not None and self.vm.disk_volume is not None:
            wanted.append(self.vm.disk_volume)
        for vid in wanted:
            if vid not in own:
                raise ValidationError(f"workload {self.id} mounts volume {vid!r}, which is not one of its volumes")


@dataclass(frozen=True)
class Placement:
    """Where a workload landed (host_id None when it did not fit)."""

    workload_id: str
    host_id: str | None
    evicted: tuple[str, ...] = ()
    explanation: object = None
    replicas: tuple[str, ...] = ()   # per-host services: every host that got a replica
    volumes: dict = field(default_factory=dict)  # inline volumes created with the workload: id -> host ids
    numa_node: int = -1              # a NUMA-fit VM: the host's NUMA node it is charged to (-1: none)


@dataclass
class BatchResult:
    """Outcome of `place_batch`: assignments for what fit (in the order they were
    committed), a reason for what did not, and the full `Placement` of every workload
    whose placement did more than choose a host (evictions, per-host replicas, new
    volumes)."""

    placements: dict[str, str]
    unplaced: dict[str, object]
    details: dict[str, Placement] = field(default_factory=dict)

    @property
    def all_placed(self) -> bool:
        return not self.unplaced

    def __len__(self) -> int:
        return len(self.placements) + len(self.unplaced)


class AddedHosts(list):
    """What `Cluster.add_hosts` did: the new hosts' rows (it is the list of them), and
    `replicas`, host id -> the per-host services that got a replica on that host."""

    def __init__(self, rows, replicas: dict[str, list[str]] | None = None):
        super().__init__(rows)
        self.replicas: dict[str, list[str]] = replicas or {}
