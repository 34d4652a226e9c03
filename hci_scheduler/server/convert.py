"""Conversions between the wire messages (hci_scheduler.v1) and the model.

Every function here is a plain mapping: no scheduling logic. Malformed input
(unknown enum numbers, bad quantities, empty ids, strings and lists over the
bounds of limits.py) raises ValidationError, which the servicer maps to
INVALID_ARGUMENT.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping

from ..errors import ValidationError
from ..model import (Affinity, ContainerSpec, Host, LabelExpr, Spread, Taint, Toleration, VmSpec, Volume,
                     VolumeMount, Workload)
from ..v1 import scheduler_pb2 as pb
from .limits import (MAX_NAME_LENGTH, MAX_TAINTS, MAX_TERMS, check_count, check_id, check_label_key,
                     check_labels, check_name)

HOST_STATES = {
    pb.HOST_STATE_READY: "ready",
    pb.HOST_STATE_CORDONED: "cordoned",
    pb.HOST_STATE_DRAINING: "draining",
    pb.HOST_STATE_DOWN: "down",
}
HOST_STATE_NUMBERS = {v: k for k, v in HOST_STATES.items()}
KINDS = {pb.WORKLOAD_KIND_CONTAINER: "container", pb.WORKLOAD_KIND_VM: "vm"}
KIND_NUMBERS = {v: k for k, v in KINDS.items()}
EFFECTS = {pb.TAINT_EFFECT_NO_SCHEDULE: "NoSchedule", pb.TAINT_EFFECT_PREFER_NO_SCHEDULE: "PreferNoSchedule"}
EFFECT_NUMBERS = {v: k for k, v in EFFECTS.items()}
OPERATORS = {
    pb.LABEL_OPERATOR_IN: "In",
    pb.LABEL_OPERATOR_NOT_IN: "NotIn",
    pb.LABEL_OPERATOR_EXISTS: "Exists",
    pb.LABEL_OPERATOR_DOES_NOT_EXIST: "DoesNotExist",
}
OPERATOR_NUMBERS = {v: k for k, v in OPERATORS.items()}
ISOLATIONS = {pb.ISOLATION_SHARED: "shared", pb.ISOLATION_DEDICATED: "dedicated"}
STRATEGIES = {
    pb.STRATEGY_UNSPECIFIED: "binpack",
    pb.STRATEGY_BINPACK: "binpack",
    pb.STRATEGY_SPREAD: "spread",
    pb.STRATEGY_BALANCED: "balanced",
    pb.STRATEGY_DOT: "dot",
}
EVENT_TYPES = {
    pb.EVENT_TYPE_HOST_ADDED: "host_added",
    pb.EVENT_TYPE_HOST_UPDATED: "host_updated",
    pb.EVENT_TYPE_HOST_REMOVED: "host_removed",
    pb.EVENT_TYPE_PLACED: "placed",
    pb.EVENT_TYPE_RELEASED: "released",
    pb.EVENT_TYPE_EVICTED: "evicted",
    pb.EVENT_TYPE_VOLUME_DELETED: "volume_deleted",
    pb.EVENT_TYPE_MOVED: "moved",
    pb.EVENT_TYPE_PLAN_STARTED: "plan_started",
    pb.EVENT_TYPE_PLAN_APPLIED: "plan_applied",
    pb.EVENT_TYPE_STATUS: "status",
}
RESTART_POLICIES = {
    pb.RESTART_POLICY_ALWAYS: "always",
    pb.RESTART_POLICY_ON_FAILURE: "on-failure",
    pb.RESTART_POLICY_NEVER: "never",
}
RESTART_POLICY_NUMBERS = {v: k for k, v in RESTART_POLICIES.items()}
WORKLOAD_STATES = {
    pb.WORKLOAD_STATE_PENDING: "pending",
    pb.WORKLOAD_STATE_RUNNING: "running",
    pb.WORKLOAD_STATE_EXITED: "exited",
    pb.WORKLOAD_STATE_FAILED: "failed",
    pb.WORKLOAD_STATE_STOPPED: "stopped",
}


def _enum(field: str, table: Mapping[int, str], value: int) -> str:
    try:
        return table[value]
    except KeyError:
        raise ValidationError(f"{field} must be one of {sorted(table)}, got {value}") from None


def strategy(value: int) -> str:
    return _enum("strategy", STRATEGIES, value)


# -- hosts -------------------------------------------------------------------


def taint_to_model(t: pb.Taint, where: str) -> Taint:
    check_label_key(f"{where} taint key", t.key)
    check_name(f"{where} taint {t.key!r} value", t.value)
    effect = "NoSchedule" if t.effect == pb.TAINT_EFFECT_UNSPECIFIED else _enum(f"{where} taint effect", EFFECTS, t.effect)
    return Taint(t.key, t.value, effect)


def host_state(value: int, where: str) -> str:
    return _enum(f"{where} state", HOST_STATES, value)


def client_host_state(value: int, where: str) -> str:
    """A host state a client may set: DOWN is the service's own (agent heartbeats)."""
    if value == pb.HOST_STATE_DOWN:
        raise ValidationError(f"{where} state: HOST_STATE_DOWN is set only by the service, when a host's "
                              "agent stops reporting")
    return host_state(value, where)


def normalize_host(h: pb.Host) -> pb.Host:
    """A copy of `h` with defaults made explicit and output-only fields cleared."""
    out = pb.Host()
    out.CopyFrom(h)
    out.ClearField("used")
    out.workload_count = 0
    if out.state == pb.HOST_STATE_UNSPECIFIED:
        out.state = pb.HOST_STATE_READY
    if not out.pool:
        out.pool = "onprem"
    for t in out.taints:
        if t.effect == pb.TAINT_EFFECT_UNSPECIFIED:
            t.effect = pb.TAINT_EFFECT_NO_SCHEDULE
    return out


def host_to_model(h: pb.Host) -> Host:
    where = f"host {h.id!r}"
    check_labels(f"{where} labels", h.labels)
    check_count(f"{where} taints", len(h.taints), MAX_TAINTS)
    check_count(f"{where} numa_nodes", len(h.numa_nodes), MAX_TERMS)
    check_name(f"{where} pool", h.pool)
    return Host(
        id=h.id,
        capacity=dict(h.capacity),
        labels=dict(h.labels),
        taints=tuple(taint_to_model(t, where) for t in h.taints),
        allocation_ratio=dict(h.allocation_ratios),
        reserved=dict(h.reserved),
        numa=tuple(dict(n.resources) for n in h.numa_nodes),
        pool=h.pool or "onprem",
        state="ready" if h.state == pb.HOST_STATE_UNSPECIFIED else host_state(h.state, where),
    )


def taint_to_proto(t: Taint) -> pb.Taint:
    return pb.Taint(key=t.key, value=t.value, effect=EFFECT_NUMBERS[t.effect])


def host_to_proto(h: Host) -> pb.Host:
    """The wire form of a model Host (the inverse of `host_to_model` on a normalized host).
    Empty fields are left out of the constructor: each map given costs a Python-level
    update even when empty, and ListHosts converts every host."""
    fields = {}
    if h.labels:
        fields["labels"] = h.labels
    if h.taints:
        fields["taints"] = [taint_to_proto(t) for t in h.taints]
    if h.reserved:
        fields["reserved"] = h.reserved
    if h.allocation_ratio:
        fields["allocation_ratios"] = h.allocation_ratio
    if h.numa:
        fields["numa_nodes"] = [pb.NumaNode(resources=n) for n in h.numa]
    return pb.Host(id=h.id, capacity=h.capacity, pool=h.pool, state=HOST_STATE_NUMBERS[h.state], **fields)


# -- workloads ----------------------------------------------------------------


def normalize_workload(w: pb.Workload) -> pb.Workload:
    """A copy of `w` with defaults made explicit, so equal specs serialize equally."""
    out = pb.Workload()
    out.CopyFrom(w)
    if out.kind == pb.WORKLOAD_KIND_UNSPECIFIED:
        out.kind = pb.WORKLOAD_KIND_CONTAINER
    if out.isolation == pb.ISOLATION_UNSPECIFIED:
        out.isolation = pb.ISOLATION_SHARED
    for term in list(out.affinities) + list(out.anti_affinities):
        term.topology = term.topology or "host"
        term.weight = term.weight or 1
    for s in out.spreads:
        s.max_skew = s.max_skew or 1
    for v in out.new_volumes:
        v.replicas = v.replicas or 1
        v.spread = v.spread or "host"
    for k in [k for k, v in out.requests.items() if v == 0]:
        del out.requests[k]
    if out.HasField("container") and out.container.restart_policy == pb.RESTART_POLICY_UNSPECIFIED:
        out.container.restart_policy = pb.RESTART_POLICY_ON_FAILURE
    return out


def spec_bytes(w: pb.Workload) -> bytes:
    """The canonical bytes of a normalized workload (idempotency key)."""
    return w.SerializeToString(deterministic=True)


#: The attributes of a validated plain Workload (no constraint, volume, gang or
#: per-host flag), taken from a real instance so that defaults stay the model's.
_PLAIN_TEMPLATE = dict(Workload(id="template").__dict__)
_KIND_NAMES = {0: "container", **KINDS}
_ISOLATION_NAMES = {0: "shared", **ISOLATIONS}


def _check_dims(w: pb.Workload, keys, dims: tuple[str, ...]) -> None:
    for k in keys:
        if k not in dims:
            raise ValidationError(f"workload {w.id!r} requests: unknown dimension {k[:40]!r}, the cluster has {dims}")


@dataclass(slots=True)
class PlaceItem:
    """One workload of a Place call, converted once by the calling thread."""

    wid: str  # the workload id, read from the proto once (each read builds a new str)
    proto: pb.Workload | None  # normalized; None when decoded from the wire (wire.pyx: plain workloads only)
    spec: bytes  # canonical bytes of the normalized workload (the idempotency key)
    model: Workload
    special: bool = False  # a per-host service or a workload creating volumes: placed on its own


def place_item(w: pb.Workload, wid: str, dims: tuple[str, ...]) -> PlaceItem:
    """The converted workload `w` (id `wid`, already checked) of a Place call.

    Normalizes `w` IN PLACE (the caller owns the request). A plain workload
    (only id, requests, kind, isolation, tenant, group, priority set) skips the
    copy and the empty loops of `normalize_workload`, and builds its Workload
    without `__post_init__`: every check it would make holds by construction
    here (enums come from the tables above, ids were checked by the servicer,
    proto integers are ints); the conversion was the largest cost of a batched
    Place call. (The server decodes requests whose workloads are all plain from
    their bytes, in wire.pyx; this path serves the others and in-process callers.)
    """
    for f, _ in w.ListFields():
        if f not in _PLAIN_FIELDS:
            return _full_item(w, wid, dims)
    kind_number, isolation_number, tenant, group = w.kind, w.isolation, w.tenant, w.group
    kind = _KIND_NAMES.get(kind_number)
    isolation = _ISOLATION_NAMES.get(isolation_number)
    if kind is None or isolation is None or (isolation == "dedicated" and not tenant) \
            or len(tenant) > MAX_NAME_LENGTH or len(group) > MAX_NAME_LENGTH:
        return _full_item(w, wid, dims)  # raises, naming the field
    if not kind_number:
        w.kind = pb.WORKLOAD_KIND_CONTAINER
    if not isolation_number:
        w.isolation = pb.ISOLATION_SHARED
    m = w.requests
    requests = {k: m[k] for k in m}  # the map's own iteration: dict(m) goes through collections.abc, 2x slower
    for k in requests:
        if k not in dims:
            _check_dims(w, requests, dims)  # raises, naming the dimension
    if 0 in requests.values():
        for k in [k for k, v in requests.items() if not v]:
            del m[k]
            del requests[k]
    model = object.__new__(Workload)
    model.__dict__.update(_PLAIN_TEMPLATE, id=wid, requests=requests, kind=kind, isolation=isolation,
                          tenant=tenant or None, group=group or None, priority=w.priority)
    return PlaceItem(wid, w, w.SerializeToString(deterministic=True), model)


def _full_item(w: pb.Workload, wid: str, dims: tuple[str, ...]) -> PlaceItem:
    _check_dims(w, w.requests, dims)
    n = normalize_workload(w)
    return PlaceItem(wid, n, spec_bytes(n), workload_to_model(n), bool(n.per_host or n.new_volumes))


def _affinity(term: pb.AffinityTerm) -> Affinity:
    return Affinity(term.group, term.topology or "host", term.hard, term.weight or 1)


#: Fields whose presence alone keeps a workload on the fast path below.
_PLAIN_FIELDS = frozenset(pb.Workload.DESCRIPTOR.fields_by_name[n]
                          for n in ("id", "requests", "kind", "isolation", "priority", "group", "tenant"))


def check_workload(w: pb.Workload) -> None:
    """The bounds of a workload's strings and lists (limits.py), naming the field."""
    where = f"workload {w.id!r}"
    check_name(f"{where} tenant", w.tenant)
    check_name(f"{where} group", w.group)
    if w.gang:
        check_id(f"{where} gang", w.gang)
    check_count(f"{where} node_selector and selector_expressions",
                len(w.node_selector) + len(w.selector_expressions), MAX_TERMS)
    for k, v in w.node_selector.items():
        check_label_key(f"{where} node_selector key", k)
        check_name(f"{where} node_selector[{k!r}]", v)
    for e in w.selector_expressions:
        check_label_key(f"{where} selector_expressions key", e.key)
        check_count(f"{where} selector_expressions {e.key!r} values", len(e.values), MAX_TERMS)
        for v in e.values:
            check_name(f"{where} selector_expressions {e.key!r} value", v)
    check_count(f"{where} tolerations", len(w.tolerations), MAX_TAINTS)
    for t in w.tolerations:
        check_label_key(f"{where} toleration key", t.key)
        check_name(f"{where} toleration {t.key!r} value", t.value)
    for name, terms in (("affinities", w.affinities), ("anti_affinities", w.anti_affinities)):
        check_count(f"{where} {name}", len(terms), MAX_TERMS)
        for term in terms:
            check_name(f"{where} {name} group", term.group)
            check_label_key(f"{where} {name} topology", term.topology)
    check_count(f"{where} spreads", len(w.spreads), MAX_TERMS)
    for sp in w.spreads:
        check_label_key(f"{where} spreads topology", sp.topology)
    check_count(f"{where} volume_ids and new_volumes", len(w.volume_ids) + len(w.new_volumes), MAX_TERMS)
    for v in w.volume_ids:
        check_id(f"{where} volume_ids", v)
    for nv in w.new_volumes:
        check_id(f"{where} new_volumes id", nv.id)
        check_label_key(f"{where} new_volumes spread", nv.spread)


def workload_to_model(w: pb.Workload) -> Workload:
    # Most workloads carry no constraint: skip the empty loops (about half the
    # cost of this function on a batch of plain containers).
    if all(f in _PLAIN_FIELDS for f, _ in w.ListFields()):
        if len(w.tenant) > MAX_NAME_LENGTH or len(w.group) > MAX_NAME_LENGTH:
            check_workload(w)  # raises, naming the field
        return Workload(
            id=w.id, requests=dict(w.requests),
            kind="container" if w.kind == pb.WORKLOAD_KIND_UNSPECIFIED else _enum(f"workload {w.id!r} kind", KINDS, w.kind),
            tenant=w.tenant or None,
            isolation="shared" if w.isolation == pb.ISOLATION_UNSPECIFIED
            else _enum(f"workload {w.id!r} isolation", ISOLATIONS, w.isolation),
            group=w.group or None, priority=w.priority)
    check_workload(w)
    where = f"workload {w.id!r}"
    selector = [LabelExpr(k, "In", (v,)) for k, v in sorted(w.node_selector.items())]
    selector += [
        LabelExpr(e.key, _enum(f"{where} selector operator", OPERATORS, e.operator), tuple(e.values))
        for e in w.selector_expressions
    ]
    tolerations = tuple(
        Toleration(
            t.key,
            t.value if t.HasField("value") else None,
            None if t.effect == pb.TAINT_EFFECT_UNSPECIFIED else _enum(f"{where} toleration effect", EFFECTS, t.effect),
        )
        for t in w.tolerations
    )
    volumes: list = list(w.volume_ids)
    volumes += [Volume(v.id, v.size_gib, v.replicas or 1, v.spread or "host") for v in w.new_volumes]
    container = container_to_model(w.container, where) if w.HasField("container") else None
    vm = vm_to_model(w.vm, where) if w.HasField("vm") else None
    model = Workload(
        id=w.id,
        requests=dict(w.requests),
        kind="container" if w.kind == pb.WORKLOAD_KIND_UNSPECIFIED else _enum(f"{where} kind", KINDS, w.kind),
        tenant=w.tenant or None,
        isolation="shared" if w.isolation == pb.ISOLATION_UNSPECIFIED else _enum(f"{where} isolation", ISOLATIONS, w.isolation),
        group=w.group or None,
        selector=tuple(selector),
        tolerations=tolerations,
        affinity=tuple(_affinity(a) for a in w.affinities),
        anti_affinity=tuple(_affinity(a) for a in w.anti_affinities),
        spread=tuple(Spread(s.topology, s.max_skew or 1, s.hard) for s in w.spreads),
        volumes=tuple(volumes),
        gang=w.gang or None,
        priority=w.priority,
        numa=w.numa,
        per_host=w.per_host,
        container=container,
        vm=vm,
    )
    if container is not None or vm is not None:
        model.check_mounted_volumes()
    return model


def container_to_model(c: pb.ContainerSpec, where: str) -> ContainerSpec:
    """The model of a container spec; its bounds are the model's (ValidationError naming the field)."""
    policy = "on-failure" if c.restart_policy == pb.RESTART_POLICY_UNSPECIFIED else \
        _enum(f"{where} container restart_policy", RESTART_POLICIES, c.restart_policy)
    try:
        return ContainerSpec(image=c.image, command=tuple(c.command), args=tuple(c.args), env=dict(c.env),
                             restart_policy=policy,
                             mounts=tuple(VolumeMount(m.volume_id, m.path, m.read_only) for m in c.mounts),
                             single_instance=c.single_instance)
    except ValidationError as exc:
        raise ValidationError(f"{where} {exc}") from None


def container_to_proto(c: ContainerSpec) -> pb.ContainerSpec:
    return pb.ContainerSpec(image=c.image, command=c.command, args=c.args, env=c.env,
                            restart_policy=RESTART_POLICY_NUMBERS[c.restart_policy],
                            mounts=[pb.VolumeMount(volume_id=m.volume_id, path=m.path, read_only=m.read_only)
                                    for m in c.mounts],
                            single_instance=c.single_instance)


def vm_to_model(v: pb.VmSpec, where: str) -> VmSpec:
    try:
        return VmSpec(v.disk_image, v.launcher_image)
    except ValidationError as exc:
        raise ValidationError(f"{where} {exc}") from None


def vm_to_proto(v: VmSpec) -> pb.VmSpec:
    return pb.VmSpec(disk_image=v.disk_image, launcher_image=v.launcher_image)


# -- explanations -------------------------------------------------------------


def numa_node_of(msg) -> int:
    """The NUMA node a Placement or Event records (`numa_node`), -1 when it names none."""
    return msg.numa_node if msg.HasField("numa_node") and msg.numa_node >= 0 else -1


def numa_fields(node: int) -> dict:
    """The `numa_node` field of a Placement or Event naming `node` (nothing for -1)."""
    return {"numa_node": node} if node >= 0 else {}


def explanation_to_proto(expl) -> pb.Explanation:
    """Map a core Explanation (str(), .filters, .nearest_miss) onto the wire."""
    if expl is None:
        return pb.Explanation()
    out = pb.Explanation(message=str(expl))
    filters = getattr(expl, "filters", None) or {}
    for reason, hosts in filters.items():
        out.filters.add(reason=str(reason), hosts=int(hosts))
    nearest = getattr(expl, "nearest_miss", None)
    if nearest is not None:
        out.nearest_miss = str(nearest)
    return out


def top_reason(expl: pb.Explanation) -> str:
    """The filter that removed the most hosts (metrics label), or "unknown"."""
    if not expl.filters:
        return "unknown"
    return max(expl.filters, key=lambda f: f.hosts).reason


# -- rebalance plans and capacity ----------------------------------------------

GOALS = {
    pb.REBALANCE_GOAL_CONSOLIDATE: "consolidate",
    pb.REBALANCE_GOAL_DRAIN: "drain",
    pb.REBALANCE_GOAL_DEFRAGMENT: "defragment",
    pb.REBALANCE_GOAL_BALANCE: "balance",
}
GOAL_NUMBERS = {v: k for k, v in GOALS.items()}
PLAN_STATUSES = {"optimal": pb.PLAN_STATUS_OPTIMAL, "feasible": pb.PLAN_STATUS_FEASIBLE,
                 "unchanged": pb.PLAN_STATUS_UNCHANGED}
PLAN_STATUS_NAMES = {v: k for k, v in PLAN_STATUSES.items()}
#: The events of a plan's apply (replayed by server/plans.py).
PLAN_EVENT_TYPES = frozenset((pb.EVENT_TYPE_MOVED, pb.EVENT_TYPE_PLAN_STARTED, pb.EVENT_TYPE_PLAN_APPLIED))


def goal(value: int) -> str:
    return _enum("goal", GOALS, value)


def _search_stats(search: Mapping, out: pb.RebalancePlan, prefix: str = "") -> None:
    """Numbers into search_stats, text into search_notes; nested mappings flattened as a.b."""
    for k, v in search.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _search_stats(v, out, key + ".")
        elif isinstance(v, numbers.Real):  # numpy's numbers too
            out.search_stats[key] = float(v)
        elif v is not None:
            out.search_notes[key] = str(v)


def plan_to_proto(plan, base_sequence: int = 0) -> pb.RebalancePlan:
    """The wire form of a rebalance.Plan."""
    out = pb.RebalancePlan(
        id=plan.id, goal=GOAL_NUMBERS[plan.goal], cost=int(plan.cost),
        objective_before=int(plan.objective_before), objective_after=int(plan.objective_after),
        terms_before={k: int(v) for k, v in plan.terms_before.items()},
        terms_after={k: int(v) for k, v in plan.terms_after.items()},
        hosts_used_before=int(plan.hosts_used_before), hosts_used_after=int(plan.hosts_used_after),
        hosts_freed=int(plan.hosts_freed), status=PLAN_STATUSES.get(plan.status, pb.PLAN_STATUS_FEASIBLE),
        unordered=plan.unordered, base_sequence=base_sequence)
    if plan.lower_bound is not None:
        out.lower_bound = int(plan.lower_bound)
    for step in plan.steps:
        out.steps.add().moves.extend(pb.Move(workload_id=m.workload_id, source_host_id=m.source,
                                             target_host_id=m.target, cost=int(m.cost)) for m in step)
    _search_stats(plan.search or {}, out)
    return out


def plan_from_proto(p: pb.RebalancePlan):
    """The rebalance.Plan of a logged plan (PLAN_STARTED): its steps and figures;
    base_version is the caller's to set."""
    from ..rebalance.plan import Move, Plan

    return Plan(goal=GOALS.get(p.goal, "consolidate"), id=p.id, cost=p.cost,
                steps=[[Move(m.workload_id, m.source_host_id, m.target_host_id, m.cost) for m in s.moves]
                       for s in p.steps],
                objective_before=p.objective_before, objective_after=p.objective_after,
                terms_before=dict(p.terms_before), terms_after=dict(p.terms_after),
                lower_bound=p.lower_bound if p.HasField("lower_bound") else None,
                hosts_used_before=p.hosts_used_before, hosts_used_after=p.hosts_used_after,
                hosts_freed=p.hosts_freed, status=PLAN_STATUS_NAMES.get(p.status, "feasible"),
                unordered=p.unordered)


def host_type_to_model(t: pb.HostType):
    """A rebalance.HostType; HostType itself checks capacity, price and ratios."""
    from ..rebalance.capacity import HostType

    check_id("host_types name", t.name)
    where = f"host type {t.name!r}"
    check_labels(f"{where} labels", t.labels)
    check_count(f"{where} taints", len(t.taints), MAX_TAINTS)
    check_name(f"{where} pool", t.pool)
    return HostType(name=t.name, capacity=dict(t.capacity), price=t.price, labels=dict(t.labels),
                    taints=tuple(taint_to_model(x, where) for x in t.taints), reserved=dict(t.reserved),
                    allocation_ratio=dict(t.allocation_ratios), pool=t.pool or "cloud",
                    max_count=t.max_count if t.HasField("max_count") else None)


def capacity_to_proto(plan) -> pb.PlanCapacityResponse:
    return pb.PlanCapacityResponse(hosts_to_add={k: int(v) for k, v in plan.add.items()},
                                   cost=int(plan.cost),
                                   placements=dict(plan.placements), lower_bound=int(plan.lower_bound),
                                   fits_now=int(plan.fits_now))
