"""The four goals as tweaks of one compiled Problem, then search, ordering and the Plan.

consolidate: free hosts (each host in use costs its pool's price), dear ones first.
drain: the named hosts take nothing and every workload on them moves; destinations are
    chosen up front, or the call fails naming what fits nowhere.
defragment: make room for one workload no host can take now: the host where the room
    costs the fewest moves gets it (its charge is reserved there while searching).
balance: usage above a soft target per dimension costs in proportion; hosts stay open.

The cluster lock is held only while compiling: the search works on arrays, and
`Cluster.apply` refuses the plan if the cluster changed meanwhile.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable, Mapping, Sequence

import numpy as np

import sched_core

from ..errors import NotFound, ValidationError
from ..model import Workload
from .compile import Compiled, CostModel, compile_cluster
from .errors import RebalanceInfeasible
from .order import order_moves
from .plan import Move, Plan
from .blocks import search_in_blocks, splittable
from .search import search

GOALS = ("consolidate", "drain", "defragment", "balance")
#: Candidate hosts a defragment tries (those with the smallest shortfall), each a short search.
DEFRAGMENT_CANDIDATES = 4
#: Share of a consolidation's time (no move budget) given to packing by patterns
#: (patterned.py): on the Google cells it converges in 25-40 s, the search's start in
#: 1-10 s; the search improves whichever start is better in the rest.
PATTERN_SHARE = 0.5


def rebalance(cluster, goal: str = "consolidate", *, hosts: Sequence[str] | None = None,
              workload: Workload | None = None, targets: Mapping[str, float] | None = None,
              max_moves: int | None = None, time_limit_s: float = 30.0, seed: int = 0,
              cost: CostModel | None = None, progress: Callable | None = None) -> Plan:
    """A move plan for `goal` (see `Cluster.rebalance`)."""
    if goal not in GOALS:
        raise ValidationError(f"goal must be one of {GOALS}, got {goal!r}")
    if max_moves is not None and (not isinstance(max_moves, int) or isinstance(max_moves, bool) or max_moves < 0):
        raise ValidationError(f"max_moves must be a non-negative integer, got {max_moves!r}")
    if not isinstance(time_limit_s, (int, float)) or isinstance(time_limit_s, bool) or not time_limit_s > 0:
        raise ValidationError(f"time_limit_s must be a positive number, got {time_limit_s!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValidationError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    if goal == "drain" and not hosts:
        raise ValidationError("goal drain needs hosts=[...] to drain")
    if goal == "defragment" and not isinstance(workload, Workload):
        raise ValidationError("goal defragment needs workload=Workload(...) to make room for")
    if goal == "balance" and not targets:
        raise ValidationError("goal balance needs targets={dimension: utilisation in (0, 1]}")
    cost = cost or CostModel()
    t0 = time.perf_counter()
    with cluster._lock:
        compiled = compile_cluster(cluster, cost)
        version = cluster.version
        room = None
        if goal == "drain":
            _drain(compiled, hosts)
        elif goal == "balance":
            _balance(compiled, targets, cluster.dimensions, cost)
        elif goal == "defragment":
            room = _defragment_candidates(cluster, compiled, workload)
    problem = compiled.problem
    if goal in ("balance", "drain"):
        # Hosts stay as they are; a drain still prefers hosts already in use (a smaller price).
        problem.host_cost = problem.host_cost // cost.host_unit if goal == "drain" else np.zeros_like(problem.host_cost)
    if room is not None:
        assignment, stats, problem = _defragment(problem, room, max_moves, time_limit_s, seed, progress)
        stats["room_on"] = compiled.host_ids[stats.pop("room_row")]
    else:
        # Consolidation builds its keep-set candidate first, so the search gets what is left
        # of the time limit and the whole plan stays near it. The search then improves the
        # candidate (swaps and host emptying free what the one-pass fill left half used:
        # Google 1k cell 594 -> 583 hosts in 20 s) rather than start again from the cluster
        # as it is (818 hosts).
        candidate = _keep_set_candidate(compiled, problem, max_moves) if goal == "consolidate" else None
        start = "keep-set"
        if goal == "consolidate" and max_moves is None:
            # Packing by patterns gets half of the time left; the search the rest, from
            # whichever start is better.
            share = (time_limit_s - (time.perf_counter() - t0)) * PATTERN_SHARE
            patterned = _pattern_candidate(compiled, problem, candidate, share) if share > 0 else None
            if patterned is not None:
                candidate, start = patterned, "patterns"
        left = max(time_limit_s - (time.perf_counter() - t0), min(1.0, time_limit_s))
        if candidate is not None and splittable(problem):
            # A large cluster is searched a block of hosts at a time (blocks.py).
            result = search_in_blocks(problem, candidate, time_limit_s=left, seed=seed, max_moves=max_moves,
                                      progress=progress)
            method = f"{start} + block search"
        else:
            result = search(problem, time_limit_s=left, seed=seed, max_moves=max_moves, progress=progress,
                            start=candidate)
            method = "search" if candidate is None else f"{start} + search"
        assignment, stats = result.assignment, dict(result.stats, status=result.status, method=method)
        if candidate is not None and _total(problem, candidate) < _total(problem, assignment):
            assignment, stats = candidate, dict(stats, method=start, status="feasible")
    return _plan(goal, compiled, problem, assignment, stats, version, time.perf_counter() - t0)


def _host_rows(compiled: Compiled, hosts: Sequence[str]) -> list[int]:
    index = {h: i for i, h in enumerate(compiled.host_ids)}
    missing = [h for h in hosts if h not in index]
    if missing:
        raise NotFound(f"no host {', '.join(map(repr, missing))}")
    return [index[h] for h in hosts]


def _drain(compiled: Compiled, hosts: Sequence[str]) -> None:
    """The hosts take nothing; what is pinned on them cannot leave, so the drain is refused."""
    problem = compiled.problem
    rows = _host_rows(compiled, hosts)
    problem.open[rows] = False
    on = np.isin(problem.initial, rows)
    stuck = [f"{compiled.ids[i]} ({compiled.pinned[compiled.ids[i]]})" for i in np.flatnonzero(on & ~problem.movable)]
    if stuck:
        raise RebalanceInfeasible(f"cannot drain {', '.join(hosts)}: pinned workloads may not move: "
                                  + "; ".join(stuck[:10]) + (f" and {len(stuck) - 10} more" if len(stuck) > 10 else ""))


def _balance(compiled: Compiled, targets: Mapping[str, float], dims: Sequence[str], cost: CostModel) -> None:
    problem = compiled.problem
    for name, fraction in targets.items():
        if name not in dims:
            raise ValidationError(f"targets: unknown dimension {name!r} (dimensions: {', '.join(dims)})")
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction <= 1:
            raise ValidationError(f"targets[{name!r}] must be a utilisation in (0, 1], got {fraction!r}")
        d = dims.index(name)
        problem.target[:, d] = (problem.capacity[:, d] * fraction).astype(np.int64)
        # One unit above target weighs target_weight per millionth of the largest host, so
        # every dimension's overload counts alike whatever its unit.
        largest = int(problem.capacity[:, d].max()) if problem.n_hosts else 0
        problem.load_weight[d] = max(1, cost.target_weight * 10**6 // max(largest, 1))


def _defragment_candidates(cluster, compiled: Compiled, workload: Workload) -> list[tuple[int, np.ndarray]]:
    """(host, charge) for the hosts that may take `workload` by its static filters, the
    smallest normalised shortfall first."""
    problem = compiled.problem
    request = cluster._compiler.request(workload)
    out = np.zeros(cluster._hosts.n_rows, dtype=np.uint8)
    sched_core.static_hosts(cluster._hosts.cons.state, cluster._compiler.terms(workload).core, out)
    ok = out[compiled.rows].astype(bool) & problem.open & np.array(
        [cluster._hosts.row_hosts[r].state == "ready" for r in compiled.rows], dtype=bool)
    ratio = problem.ratio_milli
    charge = (request[None, :] * ratio + 999) // 1000 if workload.kind == "vm" else np.broadcast_to(request, ratio.shape)
    ok &= (charge <= problem.capacity - problem.fixed).all(axis=1)
    if not ok.any():
        raise RebalanceInfeasible(f"workload {workload.id} fits no host even when emptied (selector, taints, "
                                  "kvm, volumes or size)")
    usage = problem.fixed.copy()
    np.add.at(usage, problem.initial, problem.charge(np.arange(problem.n_workloads), problem.initial))
    scale = np.maximum(problem.capacity.max(axis=0), 1)
    shortfall = (np.maximum(usage + charge - problem.capacity, 0) / scale).sum(axis=1)
    order = [int(h) for h in np.argsort(shortfall, kind="stable") if ok[h]][:DEFRAGMENT_CANDIDATES]
    return [(h, np.array(charge[h], dtype=np.int64)) for h in order]


def _defragment(problem, candidates, max_moves, time_limit_s, seed, progress):
    """Reserve the workload's charge on each candidate host in turn; keep the cheapest room."""
    best = None
    share = time_limit_s / len(candidates)
    base_fixed = problem.fixed
    for h, charge in candidates:
        problem.fixed = base_fixed.copy()
        problem.fixed[h] += charge
        try:
            result = search(problem, time_limit_s=share, seed=seed, max_moves=max_moves, progress=progress)
        except RebalanceInfeasible:
            continue
        moved = int((result.assignment != problem.initial).sum())
        key = (moved, int((problem.move_cost * (result.assignment != problem.initial)).sum()))
        if best is None or key < best[0]:
            best = (key, h, result, problem.fixed)
    problem.fixed = base_fixed
    if best is None:
        raise RebalanceInfeasible("no host can be emptied enough for the workload within the move budget")
    _, h, result, fixed = best
    problem.fixed = fixed
    return result.assignment, dict(result.stats, status=result.status, room_row=h), problem


def _keep_set_candidate(compiled: Compiled, problem, max_moves):
    """The keep-set construction's assignment (see keepset.py), if the independent check passes."""
    from . import objective
    from .keepset import keep_set

    candidate = keep_set(problem, compiled.fixed_use, max_moves)
    if candidate is None or objective.violations(problem, candidate):
        return None
    return candidate


def _pattern_candidate(compiled: Compiled, problem, candidate, time_limit_s: float):
    """A start from packing by patterns (see patterned.py), if it checks out independently
    and costs less than `candidate`."""
    from . import objective
    from .patterned import pattern_start

    patterned = pattern_start(problem, compiled.fixed_use, candidate, time_limit_s)
    if patterned is None or objective.violations(problem, patterned):
        return None
    if candidate is not None and _total(problem, patterned) >= _total(problem, candidate):
        return None
    return patterned


def _total(problem, assignment) -> int:
    from . import objective
    return objective.total(problem, assignment)


def _hosts_used(compiled: Compiled, assignment: np.ndarray) -> np.ndarray:
    used = compiled.fixed_use.copy()
    used[assignment] = True
    return used


def _plan(goal: str, compiled: Compiled, problem, assignment: np.ndarray, stats: dict, version: int,
          elapsed: float) -> Plan:
    from . import objective

    initial = problem.initial
    order = order_moves(problem, initial, assignment)
    steps: list[list[Move]] = []
    for step in order.steps:
        steps.append([_move(compiled, problem, w, src, dst) for w, src, dst in step])
    before, after = objective.terms(problem, initial), objective.terms(problem, assignment)
    used_before, used_after = _hosts_used(compiled, initial), _hosts_used(compiled, assignment)
    moved = assignment != initial
    stats = dict(stats, seconds=round(elapsed, 3), moved=int(moved.sum()), bounces=order.bounces,
                 pinned=len(compiled.pinned), pinned_reasons=_count(compiled.pinned.values()))
    status = stats.pop("status", "feasible")
    return Plan(
        goal=goal, steps=steps if not order.unordered else [],
        cost=sum(m.cost for s in steps for m in s),
        objective_before=sum(before.values()), objective_after=sum(after.values()),
        terms_before=before, terms_after=after,
        lower_bound=_lower_bound(compiled, problem) if goal == "consolidate" else None,
        hosts_used_before=int(used_before.sum()), hosts_used_after=int(used_after.sum()),
        hosts_freed=int((used_before & ~used_after).sum()),
        status="unchanged" if not moved.any() else status,
        unordered=order.unordered, base_version=version, id=uuid.uuid4().hex, search=stats,
    )


def _move(compiled: Compiled, problem, w: int, src: int, dst: int) -> Move:
    cost = int(problem.move_cost[w]) * problem.process_move_weight
    if problem.location[src] != problem.location[dst]:
        cost += problem.location_move_cost * problem.machine_move_weight
    return Move(compiled.ids[w], compiled.host_ids[src], compiled.host_ids[dst], cost)


def _count(reasons) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        kind = r.split(" from ")[0].split(" by ")[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def _lower_bound(compiled: Compiled, problem) -> int | None:
    """Fewest hosts in use any plan can reach: the hosts that must stay (fixed use or a
    pinned workload) plus the fewest others whose room covers the rest of the demand
    (requests, never more than charges, so the bound holds)."""
    try:
        from ..bounds import covering_bound
    except ImportError:
        return None
    forced = compiled.fixed_use.copy()
    forced[problem.initial[~problem.movable]] = True
    room = np.maximum(problem.capacity - problem.fixed, 0)
    used_forced = np.zeros_like(room)
    np.add.at(used_forced, problem.initial[~problem.movable],
              problem.request[~problem.movable])
    spare = np.maximum(room - used_forced, 0)[forced & problem.open].sum(axis=0)
    demand = np.maximum(problem.request[problem.movable].sum(axis=0) - spare, 0)
    others = ~forced & problem.open
    if not demand.any():
        return int(forced.sum())
    try:
        return int(forced.sum()) + int(covering_bound(room[others], demand))
    except ValidationError:
        return None
