"""The search on a large cluster, one block of hosts at a time.

On the 10,000-host Google cell (187,272 workloads) a local-search move costs about 0.75 us
against 0.2 us on the 1,000-host cell (the state no longer sits in cache), and in a 60 s
plan each workload is drawn a few hundred times instead of a thousand or more: the search
freed 28 hosts beyond the keep-set there, against 11 of 594 on the 1,000-host cell in 8 s.
Here the hosts are dealt at random into blocks of about BLOCK_WORKLOADS workloads; each
block is searched alone (its hosts, the workloads on them, the rest of the cluster left as
it is) for its share of the time, and the blocks are dealt again for a second pass, so
workloads can meet hosts of other blocks.

A block is exact, not an approximation of the whole: every hard constraint it checks is
per host (capacity, allowed hosts, host conflicts, dedicated tenants) and every cost term
is a sum over hosts or workloads, so a block's gain is the cluster's gain. Problems with
terms that span hosts (spread, dependencies, transient dimensions, the ROADEF service move
cost, a maximum) are searched whole.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import objective
from .problem import Problem
from .search import SearchResult, search

# Workloads per block: about the 1,000-host Google cell, where the search's state stays
# in cache and a host's workloads still find room among the block's other hosts.
BLOCK_WORKLOADS = 25_000
# Passes over the blocks, each with hosts dealt afresh.
PASSES = 2


def splittable(problem: Problem) -> bool:
    """Whether every constraint and cost term of `problem` is per host or per workload."""
    return (problem.n_workloads > BLOCK_WORKLOADS and not problem.spread_min.any()
            and not len(problem.depends) and not problem.transient.any() and problem.service_move_weight == 0)


def block_problem(problem: Problem, hosts: np.ndarray, workloads: np.ndarray) -> tuple[Problem, np.ndarray]:
    """The sub-problem of `hosts` (sorted) and `workloads` (all those on them), and its host
    rows in `problem`. A workload's initial host outside the block is carried as a closed
    row, so its move cost stays what it is in the whole problem."""
    p = problem
    rows = np.union1d(hosts, p.initial[workloads])
    inside = np.isin(rows, hosts)
    local = np.full(p.n_hosts, -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    sub = dataclasses.replace(
        p, capacity=p.capacity[rows], request=p.request[workloads], initial=local[p.initial[workloads]],
        target=p.target[rows], ratio_milli=p.ratio_milli[rows], fixed=p.fixed[rows], open=p.open[rows] & inside,
        host_cost=p.host_cost[rows], location=p.location[rows], neighbourhood=p.neighbourhood[rows],
        move_cost_matrix=None if p.move_cost_matrix is None else p.move_cost_matrix[np.ix_(rows, rows)],
        vm=p.vm[workloads], movable=p.movable[workloads], allowed_class=p.allowed_class[workloads],
        allowed=p.allowed[:, rows], service=p.service[workloads], tenant=p.tenant[workloads],
        move_cost=p.move_cost[workloads], conflict=p.conflict, spread_min=p.spread_min,
        dedicated=p.dedicated[: int(p.tenant[workloads].max(initial=-1)) + 1], group_move_weight=p.group_move_weight,
        host_ids=None, workload_ids=None)
    return sub, rows


def search_in_blocks(problem: Problem, start: np.ndarray, *, time_limit_s: float, seed: int = 0,
                     max_moves: int | None = None, progress=None) -> SearchResult:
    """Improve the feasible `start` block by block (see the module docstring); the result
    passes `objective.violations` on the whole problem."""
    t0 = time.perf_counter()
    p = problem
    rng = np.random.default_rng(seed)
    current = np.asarray(start, dtype=np.int32).copy()
    # The whole-problem check at the end takes about 10 us per workload: kept out of the time.
    deadline = t0 + time_limit_s - 1e-5 * p.n_workloads
    n_blocks = -(-p.n_workloads // BLOCK_WORKLOADS)
    stats = {"blocks": n_blocks, "passes": 0, "hosts_emptied": 0, "ls_accepted": 0, "lns_improved": 0}
    hosts_open = np.flatnonzero(p.open)
    value = objective.total(p, current)
    for k in range(PASSES * n_blocks):
        if k % n_blocks == 0:
            deal = np.array_split(rng.permutation(hosts_open), n_blocks)
            stats["passes"] += 1
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        hosts = np.sort(deal[k % n_blocks])
        workloads = np.flatnonzero(np.isin(current, hosts))
        if len(workloads) == 0 or not p.movable[workloads].any():
            continue
        sub, rows = block_problem(p, hosts, workloads)
        budget = None
        if max_moves is not None:
            # The block may use what the rest of the plan leaves of the budget.
            outside = np.ones(p.n_workloads, dtype=bool)
            outside[workloads] = False
            budget = max_moves - int((current[outside] != p.initial[outside]).sum())
        local = np.searchsorted(rows, current[workloads]).astype(np.int32)
        share = left / (PASSES * n_blocks - k)
        result = search(sub, time_limit_s=share, seed=seed + k, max_moves=budget, start=local)
        # Cost terms are sums over hosts and workloads: the block's change is the whole's.
        value += objective.total(sub, result.assignment) - objective.total(sub, local)
        current[workloads] = rows[result.assignment]
        for key in ("hosts_emptied", "ls_accepted", "lns_improved"):
            stats[key] += int(result.stats.get(key, 0))
        if progress is not None:
            progress(min(1.0, (k + 1) / (PASSES * n_blocks)), int(value))
    left = objective.violations(p, current)
    if left:  # a block's check passed, so the whole must: a bug; never return a bad plan
        raise AssertionError("block search produced an infeasible assignment: " + "; ".join(left[:5]))
    moved = current != p.initial
    after = objective.terms(p, current)
    stats.update(objective_after=sum(after.values()), terms_after=after, moved=int(moved.sum()),
                 hosts_used_after=int(np.unique(current).size), seconds=round(time.perf_counter() - t0, 3))
    return SearchResult(assignment=current, status="feasible" if moved.any() else "unchanged", stats=stats)
