"""A live cluster compiled into a rebalancing `Problem`, and the cost model the goals share.

Every named workload becomes a row. What the engine's model cannot express exactly is
pinned (the row stays where it is), so a plan never breaks a hard constraint the
placement core honours; `Compiled.pinned` says why each pinned row is pinned, and the
plan's report counts them:

- NUMA-pinned VMs (their NUMA node is part of the placement);
- workloads with hard affinity, and the groups hard affinity points at (moving an anchor
  would strand its dependants);
- hard anti-affinity other than "not two of my own group on one host", and the groups it
  points at; hard spread (max skew), whole groups;
- a group whose members already share a host although one asks for host anti-affinity
  to its own group (the engine's conflict is all pairs);
- tenants with both dedicated and shared workloads (the engine's rule is per tenant).

Per-host service replicas, volume replicas and array (anonymous) rows never move: they are
`fixed` load. Hosts that are not ready take nothing new (they are cut from every allowed
class; the workloads on them may stay, the initial host being always allowed).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

import sched_core

from ..errors import ValidationError
from .problem import Problem

#: Cost of moving a container (a restart), in the unit of a VM's move (one MiB of memory copied).
CONTAINER_MOVE_COST = 256


@dataclass(frozen=True)
class CostModel:
    """The cost terms every goal shares (integers; each term is named in the plan's report).

    container_move : cost of moving a container (a restart).
    vm_move_per_mib : cost per MiB of a VM's memory (a migration copies it).
    host_price : price of a host in use, per pool; consolidation frees the dear ones first.
    host_unit : what one unit of host price weighs against the move costs. The default makes
        a freed host worth more than any number of moves a plan may make, so the plan frees
        as many hosts as it can and then moves as little as it can.
    zone_move_cost : cost of a move between two zones (topology distance), per move.
    group_move_weight : group -> weight on how many of its workloads move.
    target_weight : weight of one unit of utilisation above a soft target, per dimension,
        scaled by 1e6 / the largest host's limit in that dimension (so dimensions compare).
    """

    container_move: int = CONTAINER_MOVE_COST
    vm_move_per_mib: int = 1
    host_price: dict = field(default_factory=lambda: {"onprem": 1, "cloud": 3})
    host_unit: int = 10**9
    zone_move_cost: int = 0
    group_move_weight: dict = field(default_factory=dict)
    target_weight: int = 1000

    def __post_init__(self):
        for name in ("container_move", "vm_move_per_mib", "host_unit", "zone_move_cost", "target_weight"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValidationError(f"cost model {name} must be a non-negative integer, got {value!r}")
        for pool, price in self.host_price.items():
            if not isinstance(price, int) or isinstance(price, bool) or price < 0:
                raise ValidationError(f"cost model host_price[{pool!r}] must be a non-negative integer")
        for group, weight in self.group_move_weight.items():
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise ValidationError(f"cost model group_move_weight[{group!r}] must be a non-negative integer")


@dataclass
class Compiled:
    """A Problem and the names behind its rows.

    rows : int (m,) cluster host row per problem host; ids : workload id per problem row;
    pinned : workload id -> why it may not move; fixed_use : bool (m,) hosts kept in use by
    load that never moves (volume replicas, array rows), so they can never be freed.
    """

    problem: Problem
    rows: np.ndarray
    host_ids: list[str]
    ids: list[str]
    pinned: dict[str, str]
    fixed_use: np.ndarray
    zone_key: str | None


def compile_cluster(cluster, cost: CostModel) -> Compiled:
    """The cluster's named workloads and live hosts as a Problem (caller holds the cluster lock)."""
    table, ledger = cluster._hosts, cluster._ledger
    n_rows = table.n_rows
    rows = np.flatnonzero(table.live[:n_rows]).astype(np.intp)
    m, n_dims = len(rows), len(cluster.dimensions)
    problem_of_row = np.full(max(n_rows, 1), -1, dtype=np.int64)
    problem_of_row[rows] = np.arange(m)
    hosts = [table.row_hosts[r] for r in rows]
    limit = table.state.limit_array[rows].astype(np.int64)
    used = table.state.used_array[rows].astype(np.int64)
    ready = np.array([h.state == "ready" for h in hosts], dtype=bool)

    records = list(ledger.records.values())
    n = len(records)
    ids = [r.workload.id for r in records]
    initial = problem_of_row[np.array([r.row for r in records], dtype=np.intp)].astype(np.int32) if n else \
        np.zeros(0, np.int32)
    charge = np.array([r.charge for r in records], dtype=np.int64).reshape(n, n_dims)
    request = np.array([cluster._compiler.request(r.workload) for r in records], dtype=np.int64).reshape(n, n_dims)
    vm = np.array([r.workload.kind == "vm" for r in records], dtype=bool)
    ratio = table.ratio_milli[rows].astype(np.int64)

    # Load that never moves: everything charged that is not a named workload's row.
    fixed = used.copy()
    np.subtract.at(fixed, initial, charge)
    array_rows = np.zeros(m, dtype=np.int64)
    placed = cluster._arrays.host[: cluster._arrays.n]
    placed = placed[placed >= 0]
    if placed.size:
        np.add.at(array_rows, problem_of_row[placed], 1)
    volume_use = np.zeros(m, dtype=bool)
    for vrec in cluster._volumes.records.values():
        volume_use[problem_of_row[np.asarray(vrec.rows, dtype=np.intp)]] = True
    fixed_use = volume_use | (array_rows > 0)

    pinned: dict[str, str] = {}
    groups: dict[str, int] = {}
    service = np.full(n, -1, dtype=np.int32)
    for i, rec in enumerate(records):
        g = rec.workload.group
        if g is not None:
            service[i] = groups.setdefault(g, len(groups))
    members: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(service.tolist()):
        if s >= 0:
            members[s].append(i)

    def pin_group(name: str, why: str) -> None:
        for j in members.get(groups.get(name, -1), ()):
            pinned.setdefault(ids[j], why)

    conflict = np.zeros(len(groups), dtype=bool)
    # The charge rule must reproduce what the host was charged, else the row is pinned at
    # exactly that charge (a workload that created volumes gave part to them).
    scaled = (request * ratio[initial] + 999) // 1000 if n else request
    differs = (np.where(vm[:, None], scaled, request) != charge).any(axis=1).tolist()
    for i, rec in enumerate(records):
        w = rec.workload
        if differs[i]:
            pinned.setdefault(w.id, "charged differently from its request (volumes it created)")
        if w.numa:
            pinned.setdefault(w.id, "NUMA-pinned VM")
        for a in w.affinity:
            if a.hard:
                pinned.setdefault(w.id, f"hard affinity to group {a.group}")
                pin_group(a.group, f"anchor of a hard affinity from {w.id}")
        for a in w.anti_affinity:
            if not a.hard:
                continue
            if a.topology == "host" and a.group == w.group:
                conflict[service[i]] = True
            else:
                pinned.setdefault(w.id, f"hard anti-affinity to group {a.group} by {a.topology}")
                pin_group(a.group, f"target of a hard anti-affinity from {w.id}")
        if any(s.hard for s in w.spread):
            pin_group(w.group, "group with a hard spread") if w.group else pinned.setdefault(w.id, "hard spread")
    for s in np.flatnonzero(conflict).tolist():
        on_host = initial[members[s]]
        if len(np.unique(on_host)) < len(on_host):
            conflict[s] = False
            name = next(g for g, k in groups.items() if k == s)
            pin_group(name, f"group {name} already shares a host under host anti-affinity")

    tenants: dict[str, int] = {}
    tenant = np.full(n, -1, dtype=np.int32)
    modes: dict[int, set] = defaultdict(set)
    for i, rec in enumerate(records):
        w = rec.workload
        if w.tenant is not None:
            tenant[i] = tenants.setdefault(w.tenant, len(tenants))
            modes[tenant[i]].add(w.isolation)
    dedicated = np.zeros(len(tenants), dtype=bool)
    for t, kinds in modes.items():
        if kinds == {"dedicated"}:
            dedicated[t] = True
        elif "dedicated" in kinds:
            for i in np.flatnonzero(tenant == t).tolist():
                pinned.setdefault(ids[i], "tenant with both dedicated and shared workloads")

    # Allowed hosts per class of static filters (selector, taints, kvm, volumes), from the core.
    classes: dict[tuple, int] = {}
    masks: list[np.ndarray] = []
    allowed_class = np.zeros(n, dtype=np.int32)
    out = np.zeros(n_rows, dtype=np.uint8)
    for i, rec in enumerate(records):
        w = rec.workload
        ded = tenant[i] >= 0 and dedicated[tenant[i]]
        key = (w.kind, _freeze(w.selector), tuple(map(str, w.tolerations)), tuple(map(str, w.volumes)), ded)
        k = classes.get(key)
        if k is None:
            k = classes[key] = len(masks)
            sched_core.static_hosts(table.cons.state, cluster._compiler.terms(w).core, out)
            mask = out[rows].astype(bool) & ready
            if ded:
                mask &= array_rows == 0     # anonymous rows are tenant-less workloads
            masks.append(mask)
        allowed_class[i] = k
    allowed = np.array(masks, dtype=bool).reshape(len(masks), m) if masks else np.ones((1, m), dtype=bool)

    movable = np.array([wid not in pinned for wid in ids], dtype=bool)
    # A pinned row is charged exactly what its host was charged.
    request = np.where(movable[:, None], request, charge)
    vm = vm & movable

    zone_key = _zone_key(hosts)
    zone = _domain_ids(hosts, zone_key)
    memory = request[:, cluster.dimensions.index("memory")] if "memory" in cluster.dimensions else 0
    move_cost = np.where(vm, memory * cost.vm_move_per_mib, cost.container_move).astype(np.int64)
    group_weight = np.zeros(len(groups), dtype=np.int64)
    for name, weight in cost.group_move_weight.items():
        if name in groups:
            group_weight[groups[name]] = weight
    host_cost = np.array([cost.host_price.get(h.pool, 1) * cost.host_unit for h in hosts], dtype=np.int64)
    problem = Problem(
        capacity=limit, request=request, initial=initial, ratio_milli=ratio, fixed=fixed, host_cost=host_cost,
        location=zone, neighbourhood=zone, vm=vm, movable=movable, allowed_class=allowed_class, allowed=allowed,
        service=service, tenant=tenant, dedicated=dedicated, move_cost=move_cost, conflict=conflict,
        process_move_weight=1, group_move_weight=group_weight, location_move_cost=cost.zone_move_cost,
        machine_move_weight=1 if cost.zone_move_cost else 0,
        host_ids=[h.id for h in hosts], workload_ids=ids,
    )
    return Compiled(problem, rows, [h.id for h in hosts], ids, pinned, fixed_use, zone_key)


def _freeze(selector) -> tuple:
    if isinstance(selector, dict):
        return tuple(sorted(selector.items()))
    return tuple(map(str, selector))


def _zone_key(hosts) -> str | None:
    """The topology key of zones: "zone" or the well-known Kubernetes label, when hosts carry one."""
    for key in ("zone", "topology.kubernetes.io/zone"):
        if any(key in h.labels for h in hosts):
            return key
    return None


def _domain_ids(hosts, key: str | None) -> np.ndarray:
    if key is None:
        return np.zeros(len(hosts), dtype=np.int32)
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(h.labels.get(key, ""), len(ids)) for h in hosts], dtype=np.int32)
