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
3. the workloads of every other host move, largest first, best fit, into the kept
   hosts' room, within their allowed hosts, host conflicts and dedicated tenants; one
   that fits nowhere opens the allowed unkept host with the most room (or keeps its own).

The caller keeps this candidate only if the independent check (`objective.violations`)
passes and its objective beats the search's.
"""
from __future__ import annotations

import numpy as np

from ..bounds import cover_by_shape
from ..errors import ValidationError
from .problem import Problem


def keep_set(problem: Problem, fixed_use: np.ndarray, max_moves: int | None = None) -> np.ndarray | None:
    """An assignment that frees the hosts outside a covering keep-set (within `max_moves`, the
    hosts with the fewest workloads), or None when the
    problem has terms this construction does not model (spread, dependencies, transient
    dimensions) or it would exceed `max_moves`."""
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

    kept = forced.copy()
    cand_rows = np.flatnonzero(candidates)
    if demand.any() and len(cand_rows):
        cost = problem.host_cost[cand_rows] if problem.host_cost[cand_rows].any() else None
        try:
            cover = cover_by_shape(room[cand_rows], demand, cost, prefer_room=True)
        except ValidationError:
            return None
        scale = np.maximum(room.max(axis=0), 1)
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
    assignment = initial.copy()
    leaving = ~kept[initial]
    if not leaving.any():
        return None
    usage = problem.fixed.copy()
    np.add.at(usage, initial[~leaving], charge_home[~leaving])
    on = np.bincount(initial[~leaving], minlength=m)
    conflict_count = {}
    for s in np.flatnonzero(problem.conflict).tolist():
        mine = (problem.service == s) & ~leaving
        conflict_count[s] = np.bincount(initial[mine], minlength=m)
    dedicated = np.zeros(n, dtype=bool)
    has_tenant = problem.tenant >= 0
    dedicated[has_tenant] = problem.dedicated[problem.tenant[has_tenant]]
    owner = np.full(m, -1, dtype=np.int64)           # the dedicated tenant on a host, if any
    owned = np.zeros(m, dtype=np.int64)              # how many of its workloads are there
    stay = ~leaving & dedicated
    np.add.at(owned, initial[stay], 1)
    owner[initial[stay]] = problem.tenant[stay]

    scale = np.maximum(room.max(axis=0), 1)
    order = np.flatnonzero(leaving)
    order = order[np.argsort(-(problem.request[order] / scale).max(axis=1), kind="stable")]
    moves = 0
    hosts = np.arange(m)
    done = np.zeros(n, dtype=bool)
    for w in order.tolist():
        if done[w]:
            continue      # its host was kept after all: it stayed there
        home = initial[w]
        # A container pays its request everywhere; only a VM's charge follows the host's ratio.
        charge = problem.charge(np.full(m, w), hosts) if problem.vm[w] else problem.request[w]
        ok = problem.allowed[problem.allowed_class[w]] & kept & problem.open
        ok &= (usage + charge <= problem.capacity).all(axis=1)
        s = problem.service[w]
        if s >= 0 and s in conflict_count:
            ok &= conflict_count[s] == 0
        if dedicated[w]:
            ok &= (on == 0) | ((owner == problem.tenant[w]) & (owned == on))
        else:
            ok &= owner < 0
        target = -1
        if ok.any():
            slack = ((problem.capacity - usage - charge) / scale).sum(axis=1)
            target = int(np.flatnonzero(ok)[np.argmin(slack[ok])])
        else:
            # It fits nowhere kept: open the allowed host with the most room (an empty big
            # one first), or failing that keep its own host with what is still on it.
            spare = problem.allowed[problem.allowed_class[w]] & ~kept & problem.open
            spare &= (usage + charge <= problem.capacity).all(axis=1) & (on == 0)
            if spare.any():
                free_room = ((problem.capacity - usage) / scale).sum(axis=1)
                target = int(np.flatnonzero(spare)[np.argmax(free_room[spare])])
                kept[target] = True
        if target >= 0:
            if target != home:
                assignment[w] = target
                moves += 1
                if max_moves is not None and moves > max_moves:
                    return None
            _add(w, target, problem, usage, on, conflict_count, owner, owned, dedicated,
                 charge[target] if charge.ndim == 2 else charge)
            done[w] = True
        else:
            kept[home] = True
            for u in np.flatnonzero((initial == home) & leaving & ~done).tolist():
                _add(u, home, problem, usage, on, conflict_count, owner, owned, dedicated)
                done[u] = True
    return assignment


def _add(w, h, problem, usage, on, conflict_count, owner, owned, dedicated, charge=None) -> None:
    usage[h] += problem.charge(np.array([w]), np.array([h]))[0] if charge is None else charge
    on[h] += 1
    s = problem.service[w]
    if s >= 0 and s in conflict_count:
        conflict_count[s][h] += 1
    if dedicated[w]:
        owner[h] = problem.tenant[w]
        owned[h] += 1
