"""Capacity planning: the cheapest new hosts, from a catalogue of host types, on which
pending workloads fit together with what runs now.

Method: the pending workloads first go into the room the cluster has (largest first,
best fit, each within the hosts its selector, taints, kvm need and volumes allow); what
is left is packed into new hosts. Candidates for the new hosts are each single type that
takes every leftover workload, and the covering solution (the cheapest multiset of types
whose summed capacity covers the leftover demand, `bounds.covering_bound`) completed with
the cheapest type that takes the largest workload still out; the cheapest candidate that
holds everything wins. The covering cost is the lower bound reported beside it.

Checked: capacity (allocation ratios and reserved included, VMs at ratio 1 as the core
charges them), static filters, and host anti-affinity within a group among the pending
workloads. Other affinity between pending workloads is checked when they are placed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

import sched_core

from ..errors import ValidationError
from ..model import KINDS, Host, Taint, Workload


@dataclass(frozen=True)
class HostType:
    """A host shape that can be bought: capacity, labels, taints and price per host (integer units)."""

    name: str
    capacity: Mapping[str, int]
    price: int
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: Sequence[Taint] = ()
    reserved: Mapping[str, int] = field(default_factory=dict)
    allocation_ratio: Mapping[str, float] = field(default_factory=dict)
    pool: str = "cloud"
    max_count: int | None = None

    def __post_init__(self):
        if not isinstance(self.price, int) or isinstance(self.price, bool) or self.price < 0:
            raise ValidationError(f"host type {self.name!r} price must be a non-negative integer, got {self.price!r}")
        if self.max_count is not None and (not isinstance(self.max_count, int) or self.max_count < 0):
            raise ValidationError(f"host type {self.name!r} max_count must be a non-negative integer")
        # Host checks the rest (id, capacity, labels, taints, ratios) with the same messages.
        self.host(self.name)

    def host(self, host_id: str) -> Host:
        return Host(host_id, dict(self.capacity), labels=dict(self.labels), taints=tuple(self.taints),
                    allocation_ratio=dict(self.allocation_ratio), reserved=dict(self.reserved), pool=self.pool)


@dataclass
class CapacityPlan:
    """add: type name -> how many to buy; cost: their summed price; placements: workload id ->
    an existing host id or "<type>#<k>" (the k-th new host of that type); lower_bound: no
    set of new hosts holding the leftover demand costs less."""

    add: dict[str, int]
    cost: int
    placements: dict[str, str]
    lower_bound: int
    fits_now: int


def plan_capacity(cluster, workloads: Sequence[Workload], host_types: Sequence[HostType]) -> CapacityPlan:
    """See `Cluster.plan_capacity`."""
    workloads = list(workloads)
    types = list(host_types)
    if not types:
        raise ValidationError("host_types: give at least one host type")
    if len({t.name for t in types}) != len(types):
        raise ValidationError("host_types: names must be unique")
    ids = [w.id for w in workloads]
    if len(set(ids)) != len(ids):
        raise ValidationError("workloads: ids must be unique")
    dims = cluster.dimensions
    with cluster._lock:
        table = cluster._hosts
        rows = np.flatnonzero(table.live[: table.n_rows])
        rows = np.array([r for r in rows if table.row_hosts[r].state == "ready"], dtype=np.intp)
        free = table.state.free_array[rows].astype(np.int64).copy()
        host_ids = [table.row_hosts[r].id for r in rows]
        req = np.array([cluster._compiler.request(w) for w in workloads], dtype=np.int64).reshape(len(workloads), len(dims))
        out = np.zeros(table.n_rows, dtype=np.uint8)
        allowed_now = np.zeros((len(workloads), len(rows)), dtype=bool)
        for i, w in enumerate(workloads):
            if w.kind not in KINDS:
                raise ValidationError(f"workload {w.id} kind must be one of {KINDS}")
            sched_core.static_hosts(table.cons.state, cluster._compiler.terms(w).core, out)
            allowed_now[i] = out[rows].astype(bool)
        ratio_now = table.ratio_milli[rows].astype(np.int64)
    vm = np.array([w.kind == "vm" for w in workloads], dtype=bool)
    conflict_group = [w.group if any(a.hard and a.topology == "host" and a.group == w.group
                                     for a in w.anti_affinity) else None for w in workloads]

    # Pending workloads into the room there is now, largest first (dominant share), best fit.
    scale = np.maximum(np.maximum(free.max(axis=0) if len(rows) else 0,
                                  max((_limit(t, dims) for t in types), key=lambda a: a.sum()).max(initial=0)), 1)
    order = np.argsort(-(req / scale).max(axis=1), kind="stable")
    placements: dict[str, str] = {}
    groups_on: dict[str, set] = {}
    left = []
    for i in order.tolist():
        charge = _charge(req[i], ratio_now, vm[i])
        fits = allowed_now[i] & (charge <= free).all(axis=1)
        g = conflict_group[i]
        if g is not None:
            fits &= np.array([g not in groups_on.get(h, ()) for h in host_ids], dtype=bool)
        if fits.any():
            slack = ((free - charge) / scale).sum(axis=1)
            h = int(np.flatnonzero(fits)[np.argmin(slack[fits])])
            free[h] -= charge[h]
            placements[workloads[i].id] = host_ids[h]
            if g is not None:
                groups_on.setdefault(host_ids[h], set()).add(g)
        else:
            left.append(i)
    fits_now = len(placements)
    if not left:
        return CapacityPlan({}, 0, placements, 0, fits_now)

    accepts = np.array([[_accepts(t, workloads[i]) and (_charge(req[i], _ratio(t, dims)[None], vm[i])[0]
                                                        <= _limit(t, dims)).all() for t in types] for i in left])
    homeless = [workloads[left[k]].id for k in np.flatnonzero(~accepts.any(axis=1))]
    if homeless:
        raise ValidationError(f"no host type can take {', '.join(homeless[:10])}"
                              + (f" and {len(homeless) - 10} more" if len(homeless) > 10 else ""))
    demand = req[left].sum(axis=0)
    bound, covering = _covering(types, dims, demand)
    candidates = [dict(covering)] + [{t.name: 0} for k, t in enumerate(types) if accepts[:, k].all()]
    best = None
    for start in candidates:
        packed = _pack(start, types, dims, [workloads[i] for i in left], req[left], vm[left], accepts,
                       [conflict_group[i] for i in left], scale)
        if packed is not None:
            count, where = packed
            cost = sum(t.price * count.get(t.name, 0) for t in types)
            if best is None or cost < best[0]:
                best = (cost, count, where)
    if best is None:
        raise ValidationError("the pending workloads do not fit within the host types' max_count")
    cost, count, where = best
    placements.update(where)
    return CapacityPlan({k: v for k, v in count.items() if v}, cost, placements, bound, fits_now)


def _limit(t: HostType, dims) -> np.ndarray:
    cap = np.array([t.capacity.get(d, 0) - t.reserved.get(d, 0) for d in dims], dtype=np.int64)
    return (cap * _ratio(t, dims) // 1000).astype(np.int64)


def _ratio(t: HostType, dims) -> np.ndarray:
    return np.array([int(round(t.allocation_ratio.get(d, 1.0) * 1000)) for d in dims], dtype=np.int64)


def _charge(request: np.ndarray, ratio: np.ndarray, vm: bool) -> np.ndarray:
    """Per host row, what the workload costs it (the core's rule: VMs pay request x ratio)."""
    ratio = np.atleast_2d(ratio)
    return (request[None, :] * ratio + 999) // 1000 if vm else np.broadcast_to(request, ratio.shape)


def _accepts(t: HostType, w: Workload) -> bool:
    """The type's hosts pass the workload's static filters (selector, kvm, taints); a workload
    that mounts an existing volume runs only beside its replicas, never on a new host."""
    labels = t.labels
    if isinstance(w.selector, Mapping):
        if any(labels.get(k) != v for k, v in w.selector.items()):
            return False
    elif not all(expr.matches(labels) for expr in w.selector):
        return False
    if w.kind == "vm" and labels.get("kvm") != "true":
        return False
    if any(t_.effect == "NoSchedule" and not any(tol.tolerates(t_) for tol in w.tolerations) for t_ in t.taints):
        return False
    return not any(isinstance(v, str) for v in w.volumes)


def _covering(types, dims, demand) -> tuple[int, dict[str, int]]:
    """The cheapest count per type whose summed limits cover `demand` in every dimension (CP-SAT
    over the few types): its cost is a lower bound on the new hosts' cost, its counts a start."""
    from ortools.sat.python import cp_model

    limits = np.array([_limit(t, dims) for t in types], dtype=np.int64)
    model = cp_model.CpModel()
    counts = []
    for t, lim in zip(types, limits):
        need = max((-(-int(dm) // int(lm)) for dm, lm in zip(demand, lim) if lm > 0), default=0)
        counts.append(model.new_int_var(0, need if t.max_count is None else min(need, t.max_count), t.name))
    # The new hosts' limits cover the leftover demand in every dimension.
    for d in range(len(dims)):
        if demand[d] > 0:
            model.add(sum(int(lim[d]) * c for lim, c in zip(limits, counts)) >= int(demand[d]))
    # Cheapest first; among equal prices, fewest hosts.
    hosts = sum(counts)
    model.minimize(sum(t.price * c for t, c in zip(types, counts)) * (len(types) * int(demand.max(initial=1)) + 1)
                   + hosts if any(t.price for t in types) else hosts)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = 10.0
    solver.parameters.num_workers = 1
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        raise ValidationError("the pending workloads do not fit within the host types' max_count")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return 0, {t.name: 0 for t in types}
    chosen = {t.name: int(solver.value(c)) for t, c in zip(types, counts)}
    cost = sum(t.price * chosen[t.name] for t in types)
    return (cost if status == cp_model.OPTIMAL else 0), chosen


def _pack(start, types, dims, workloads, req, vm, accepts, groups, scale):
    """Largest first into the start's hosts (best fit); a workload that fits none opens the
    cheapest type that takes it. Returns (count per type, placements) or None."""
    limits = {t.name: _limit(t, dims) for t in types}
    ratios = {t.name: _ratio(t, dims) for t in types}
    col = {t.name: k for k, t in enumerate(types)}
    bins: list[list] = []       # [type name, free, groups]
    count = {t.name: 0 for t in types}
    for name, c in start.items():
        for _ in range(c):
            bins.append([name, limits[name].copy(), set()])
            count[name] += 1
    by_price = sorted(types, key=lambda t: (t.price, t.name))
    order = np.argsort(-(req / scale).max(axis=1), kind="stable")
    where: dict[str, str] = {}
    slot: list[str] = []
    for i in order.tolist():
        best, best_slack = -1, None
        for b, (name, room, gs) in enumerate(bins):
            if not accepts[i, col[name]] or (groups[i] is not None and groups[i] in gs):
                continue
            charge = _charge(req[i], ratios[name], vm[i])[0]
            if (charge <= room).all():
                slack = ((room - charge) / scale).sum()
                if best_slack is None or slack < best_slack:
                    best, best_slack = b, slack
        if best < 0:
            t = next((t for t in by_price if accepts[i, col[t.name]]
                      and (t.max_count is None or count[t.name] < t.max_count)), None)
            if t is None:
                return None
            bins.append([t.name, limits[t.name].copy(), set()])
            count[t.name] += 1
            best = len(bins) - 1
        name, room, gs = bins[best]
        room -= _charge(req[i], ratios[name], vm[i])[0]
        if groups[i] is not None:
            gs.add(groups[i])
        where[workloads[i].id] = best
    # Drop hosts of the start that nothing went to, and name the rest "<type>#<k>".
    used = sorted(set(where.values()))
    names, seen = {}, {}
    for b in used:
        t = bins[b][0]
        names[b] = f"{t}#{seen.get(t, 0)}"
        seen[t] = seen.get(t, 0) + 1
    return seen, {wid: names[b] for wid, b in where.items()}
