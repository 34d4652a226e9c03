"""The reference objective and hard-constraint check of a Problem, in plain numpy.

Written straight from the Problem's docstring, independently of the incremental
evaluator in `sched_core._moves`: the tests compare the two, and the search checks
its result here before returning it. Not fast; never called in a loop.
"""
from __future__ import annotations

import numpy as np

from .problem import Problem

TERMS = ("host_cost", "load_cost", "balance_cost", "process_move_cost",
         "service_move_cost", "machine_move_cost", "group_move_cost")


def usage(problem: Problem, assignment: np.ndarray) -> np.ndarray:
    """Load per host (fixed plus each workload's charge there), int64 (m, d)."""
    n = problem.n_workloads
    use = problem.fixed.copy()
    if n:
        np.add.at(use, assignment, problem.charge(np.arange(n), assignment))
    return use


def transient_usage(problem: Problem, assignment: np.ndarray) -> np.ndarray:
    """Load counted against capacity: `usage` plus, on transient dimensions, the charge of
    every moved workload on its initial host (ROADEF transient resources)."""
    use = usage(problem, assignment)
    moved = np.flatnonzero(assignment != problem.initial)
    if moved.size and problem.transient.any():
        held = problem.charge(moved, problem.initial[moved]) * problem.transient[None, :]
        np.add.at(use, problem.initial[moved], held)
    return use


def machine_move_costs(problem: Problem, assignment: np.ndarray) -> np.ndarray:
    """Host-pair move cost of each workload, int64 (n,)."""
    src, dst = problem.initial, assignment
    if problem.move_cost_matrix is not None:
        return problem.move_cost_matrix[src, dst]
    differ = problem.location[src] != problem.location[dst]
    return np.where(differ, problem.location_move_cost, 0).astype(np.int64)


def terms(problem: Problem, assignment: np.ndarray) -> dict[str, int]:
    """The objective of `assignment` by named term (the total is their sum).

    Parameters
    ----------
    problem : Problem
    assignment : int (n,)
        host of every workload.

    Returns
    -------
    dict str -> int
        host_cost (per used host), load_cost (above target), balance_cost, and the move
        terms (process, service = largest moved count of one service, machine, group).
    """
    a = np.asarray(assignment, dtype=np.int64)
    p = problem
    use = usage(p, a)
    used = np.bincount(a, minlength=p.n_hosts) > 0
    out = {"host_cost": int(p.host_cost[used].sum())}
    out["load_cost"] = int((np.maximum(0, use - p.target) * p.load_weight[None, :]).sum())
    balance = 0
    avail = p.capacity - use
    for dim_a, dim_b, target, weight in p.balance:
        balance += int(weight) * int(np.maximum(0, int(target) * avail[:, dim_a] - avail[:, dim_b]).sum())
    out["balance_cost"] = balance
    moved = a != p.initial
    out["process_move_cost"] = int(p.process_move_weight) * int(p.move_cost[moved].sum())
    svc = p.service[moved]
    svc = svc[svc >= 0]
    counts = np.bincount(svc, minlength=p.n_services) if svc.size else np.zeros(p.n_services, np.int64)
    out["service_move_cost"] = int(p.service_move_weight) * int(counts.max() if counts.size else 0)
    out["machine_move_cost"] = int(p.machine_move_weight) * int(machine_move_costs(p, a).sum())
    out["group_move_cost"] = int((counts * p.group_move_weight).sum()) if counts.size else 0
    return out


def total(problem: Problem, assignment: np.ndarray) -> int:
    """The objective: the sum of `terms`."""
    return sum(terms(problem, assignment).values())


def violations(problem: Problem, assignment: np.ndarray) -> list[str]:
    """Every hard constraint `assignment` breaks, one readable line each (empty: feasible).

    Checks: capacity per dimension (fixed and transient load included), closed hosts,
    allowed host classes, pinned workloads unmoved, conflict, spread_min, depends and
    dedicated tenants.
    """
    p = problem
    a = np.asarray(assignment, dtype=np.int64)
    hid = p.host_ids or [f"host {i}" for i in range(p.n_hosts)]
    wid = p.workload_ids or [f"workload {i}" for i in range(p.n_workloads)]
    out: list[str] = []
    if a.shape != (p.n_workloads,) or (a.size and (a.min() < 0 or a.max() >= p.n_hosts)):
        return [f"assignment: expected {p.n_workloads} host indices in [0, {p.n_hosts}), got shape {a.shape}"]
    over = transient_usage(p, a) - p.capacity
    for h, k in zip(*np.nonzero(over > 0)):
        out.append(f"{hid[h]}: dimension {k} over capacity by {over[h, k]}")
    for w in np.flatnonzero((a != p.initial) & ~p.movable):
        out.append(f"{wid[w]}: pinned to {hid[p.initial[w]]}, moved to {hid[a[w]]}")
    for w in np.flatnonzero(~p.open[a]):
        out.append(f"{wid[w]}: on closed {hid[a[w]]}")
    for w in np.flatnonzero(~p.allowed[p.allowed_class, a]):
        out.append(f"{wid[w]}: {hid[a[w]]} not allowed by its filters")
    in_svc = p.service >= 0
    svc, host = p.service[in_svc], a[in_svc]
    # Conflict: (service, host) pairs held more than once.
    pairs, counts = np.unique(np.stack([svc, host]), axis=1, return_counts=True)
    for (s, h), c in zip(pairs.T, counts):
        if c > 1 and p.conflict[s]:
            out.append(f"service {s}: {c} workloads on {hid[h]} (conflict)")
    # Spread: distinct locations per service.
    locs = np.unique(np.stack([svc, p.location[host]]), axis=1)
    covered = np.bincount(locs[0], minlength=p.n_services) if locs.size else np.zeros(p.n_services, int)
    present = np.bincount(svc, minlength=p.n_services) > 0
    for s in np.flatnonzero(present & (covered < p.spread_min)):
        out.append(f"service {s}: covers {covered[s]} locations, spread_min {p.spread_min[s]}")
    # Dependency: every (a, neighbourhood) pair needs its (b, neighbourhood).
    held = set(zip(svc.tolist(), p.neighbourhood[host].tolist()))
    nbh_of = {}
    for s, nb in sorted(held):
        nbh_of.setdefault(s, []).append(nb)
    for sa, sb in p.depends.tolist():
        for nb in nbh_of.get(sa, []):
            if (sb, nb) not in held:
                out.append(f"service {sa} in neighbourhood {nb} without service {sb} (depends)")
    for t in np.flatnonzero(p.dedicated):
        for h in np.unique(a[p.tenant == t]):
            others = np.flatnonzero((a == h) & (p.tenant != t))
            if others.size:
                out.append(f"dedicated tenant {t} shares {hid[h]} with {wid[others[0]]}")
    return out
