"""Consolidation by choosing the hosts to keep: a second candidate beside the local search.

Local search frees a host only when every workload on it finds room one move at a time,
which stalls on a cell of many small tasks spread over mixed machines (the Google 2011
cell: 845 hosts in use, 558 by the covering bound, 800 after 20 s of search). Here the
hosts to keep are chosen first, by the capacity they offer for the demand at hand:

1. hosts that must stay (pinned workloads, volume replicas, array rows) are kept;
2. the cheapest mix of host shapes whose room covers the rest of the demand
   (`bounds.cover_by_shape` over every open host, empty ones included, most room among
   the optimal mixes) is kept, and within a shape the hosts that already carry the most
   load (fewest moves);
3. the workloads leave, largest first, into the kept hosts' room
   (`sched_core._keepset.keep_fill`), within their allowed hosts, host conflicts and
   dedicated tenants; one that fits nowhere opens the allowed unkept host with the most
   room (or keeps its own). With no move budget every movable workload leaves (a
   repack: the load already on a kept host was placed online and may strand its scarce
   dimension), each to the host whose stranded room it grows least: room that load
   shaped like the workloads still to place could not use, so a memory-heavy workload
   goes to a host whose cpu runs out first and the reverse (`keep_fill`'s
   least_stranding; Google 1k cell: 606 hosts by best fit into the loaded hosts, 594 by
   the dot product over each host's capacity, 588 by the dot product over one scale,
   579 so).
   Within a budget, or when a repacked workload fits nowhere, only those of the hosts
   not kept leave, by best fit into the gaps of the loaded hosts;
4. identical workloads trade destinations so that as many as possible stay where they
   are (`stay_home`): the same hosts end up with the same load, with fewer moves.

The caller checks the candidate independently (`objective.violations`) and the search
starts from it.
"""
from __future__ import annotations

import numpy as np

from ..bounds import cover_by_shape
from ..errors import ValidationError
from .problem import Problem
from sched_core._keepset import keep_fill


def keep_set(problem: Problem, fixed_use: np.ndarray, max_moves: int | None = None) -> np.ndarray | None:
    """An assignment that frees the hosts outside a covering keep-set (within `max_moves`, the
    hosts with the fewest workloads), or None when the
    problem has terms this construction does not model (spread, dependencies, transient
    dimensions) or it would exceed `max_moves`."""
    kept = kept_hosts(problem, fixed_use, max_moves)
    if kept is None:
        return None
    assignment = fill(problem, kept, None, repack=True) if max_moves is None else None
    if assignment is None and (~kept[problem.initial]).any():
        assignment = fill(problem, kept, max_moves)
    return None if assignment is None else stay_home(problem, assignment)


def kept_hosts(problem: Problem, fixed_use: np.ndarray, max_moves: int | None = None) -> np.ndarray | None:
    """bool (m,): the hosts to keep (steps 1 and 2, and the move budget), or None when the
    construction does not apply (see `keep_set`)."""
    if problem.spread_min.any() or len(problem.depends) or problem.transient.any():
        return None
    n, m = problem.n_workloads, problem.n_hosts
    if n == 0:
        return None
    initial = problem.initial
    idx = np.arange(n)
    charge_home = problem.charge(idx, initial)
    movable = problem.movable
    forced = fixed_use.copy()
    forced[initial[~movable]] = True
    occupied = np.zeros(m, dtype=bool)
    occupied[initial] = True
    # Empty hosts are candidates too: one memory-rich host may replace several small ones.
    candidates = ~forced & problem.open
    room = np.maximum(problem.capacity - problem.fixed, 0)
    load = np.zeros_like(room)
    np.add.at(load, initial, charge_home)
    on_candidates = ~forced[initial]
    spare = np.maximum(room - load, 0)[forced].sum(axis=0)
    demand = np.maximum(charge_home[on_candidates].sum(axis=0) - spare, 0)

    scale = np.maximum(room.max(axis=0), 1)
    kept = forced.copy()
    cand_rows = np.flatnonzero(candidates)
    if demand.any() and len(cand_rows):
        cost = problem.host_cost[cand_rows] if problem.host_cost[cand_rows].any() else None
        try:
            cover = cover_by_shape(room[cand_rows], demand, cost, prefer_room=True)
        except ValidationError:
            return None
        weight = (load[cand_rows] / scale).sum(axis=1)
        for s, count in enumerate(cover.counts.tolist()):
            rows = np.flatnonzero(cover.shape_of == s)
            heaviest = rows[np.argsort(-weight[rows], kind="stable")][:count]
            kept[cand_rows[heaviest]] = True

    if max_moves is not None:
        # Within a move budget, empty the hosts with the fewest workloads first; the others stay.
        emptied = np.flatnonzero(occupied & ~kept)
        counts = np.bincount(initial, minlength=m)[emptied]
        order = np.argsort(counts, kind="stable")
        kept[emptied[order[np.cumsum(counts[order]) > max_moves]]] = True
    return kept


def fill(problem: Problem, kept: np.ndarray, max_moves: int | None = None,
         repack: bool = False) -> np.ndarray | None:
    """Step 3: the workloads of the hosts outside `kept` (with `repack`, every movable
    workload) move into the kept hosts' room (`sched_core._keepset.keep_fill`); None when
    that exceeds `max_moves`, or a repacked workload fits nowhere."""
    n, m = problem.n_workloads, problem.n_hosts
    initial = problem.initial
    charge_home = problem.charge(np.arange(n), initial)
    scale = np.maximum(np.maximum(problem.capacity - problem.fixed, 0).max(axis=0), 1)
    kept = kept.copy()
    leaving = problem.movable.copy() if repack else ~kept[initial]
    usage = problem.fixed.copy()
    np.add.at(usage, initial[~leaving], charge_home[~leaving])
    on = np.bincount(initial[~leaving], minlength=m).astype(np.int32)
    conflicting = np.flatnonzero(problem.conflict)
    conflict_row = np.full(problem.n_services, -1, dtype=np.int32)
    conflict_row[conflicting] = np.arange(len(conflicting), dtype=np.int32)
    conflict_count = np.zeros((max(len(conflicting), 1), m), dtype=np.int32)
    stays = ~leaving & (problem.service >= 0)
    if len(conflicting):
        stays &= conflict_row[np.maximum(problem.service, 0)] >= 0
    else:
        stays[:] = False
    np.add.at(conflict_count, (conflict_row[problem.service[stays]], initial[stays]), 1)
    dedicated = np.zeros(n, dtype=bool)
    has_tenant = problem.tenant >= 0
    dedicated[has_tenant] = problem.dedicated[problem.tenant[has_tenant]]
    owner = np.full(m, -1, dtype=np.int64)           # the dedicated tenant on a host, if any
    owned = np.zeros(m, dtype=np.int64)              # how many of its workloads are there
    stay = ~leaving & dedicated
    np.add.at(owned, initial[stay], 1)
    owner[initial[stay]] = problem.tenant[stay]

    order = leaving_order(problem, leaving, scale)
    # The leaving workloads by home host, so a host kept after all takes its own back.
    members = np.flatnonzero(leaving)
    home_members = members[np.argsort(initial[members], kind="stable")].astype(np.intp)
    home_ptr = np.zeros(m + 1, dtype=np.intp)
    np.cumsum(np.bincount(initial[members], minlength=m), out=home_ptr[1:])
    kept_u8 = kept.astype(np.uint8)
    assignment = initial.astype(np.int32)
    moves = keep_fill(problem.capacity, usage, problem.ratio_milli, problem.request, problem.vm.view(np.uint8),
                      initial, order.astype(np.intp), home_ptr, home_members,
                      problem.allowed.view(np.uint8), problem.allowed_class, problem.open.view(np.uint8),
                      kept_u8, on, problem.service, conflict_row, conflict_count, problem.tenant,
                      dedicated.view(np.uint8), owner, owned, scale.astype(np.float64), assignment,
                      -1 if max_moves is None else int(max_moves), False, not repack, over_scale=True,
                      least_stranding=True)
    if moves < 0:
        return None
    return assignment


def leaving_order(problem: Problem, leaving: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The leaving workloads, largest first (largest share of a dimension's `scale`);
    identical ones together (request, then index), so the core scores each run once."""
    rows = np.flatnonzero(leaving)
    req = problem.request[rows]
    size = (req / scale).max(axis=1)
    keys = (rows,) + tuple(req[:, r] for r in range(req.shape[1] - 1, -1, -1)) + (-size,)
    return rows[np.lexsort(keys)].astype(np.intp)


def stay_home(problem: Problem, assignment: np.ndarray) -> np.ndarray:
    """Identical workloads (request, kind, allowed hosts, group, tenant) share out the hosts
    `assignment` gives them so that the most stay on their initial host: each host keeps up
    to its count of its own, and the rest take the hosts left over. Every host's load,
    group and tenant counts are unchanged, so feasibility and host costs are too."""
    movable = np.flatnonzero(problem.movable)
    if len(movable) == 0:
        return assignment
    key = np.column_stack([problem.request[movable], problem.vm[movable], problem.allowed_class[movable],
                           problem.service[movable], problem.tenant[movable]])
    _, group = np.unique(key, axis=0, return_inverse=True)
    group = group.ravel()
    home, target = problem.initial[movable].astype(np.int64), assignment[movable].astype(np.int64)
    m = problem.n_hosts
    # Slots: (group, host) pairs the assignment fills, with multiplicity.
    want = np.bincount(group * m + target, minlength=(group.max() + 1) * m)
    # Each workload, in (group, home, index) order, stays if its rank at home is below
    # the slots its group has there.
    order = np.lexsort((movable, home, group))
    pair = group[order] * m + home[order]
    first = np.searchsorted(pair, pair, side="left")
    rank = np.arange(len(order)) - first
    stays = np.zeros(len(movable), dtype=bool)
    stays[order] = rank < want[pair]
    out = assignment.copy()
    out[movable[stays]] = home[stays]
    # The rest take the slots left, group by group.
    left = want - np.bincount(group[stays] * m + home[stays], minlength=len(want))
    slots = np.repeat(np.arange(len(want)), left)          # sorted by group, then host
    movers = np.flatnonzero(~stays)
    movers = movers[np.argsort(group[movers], kind="stable")]
    out[movable[movers]] = slots % m
    return out
