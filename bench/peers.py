"""Peers that our scheduler is compared with, run in the same process.

Each peer takes the same arrays as the cluster: ``capacity`` (n_hosts,
n_dims) int64 and ``requests`` (n, n_dims) int64, and returns an int64
assignment (n,) of host indices, -1 where a request was refused.

A peer whose package is not installed (``binpacking`` comes with the test
extra only) is skipped: it returns None, and :func:`skipped_notes` gives the
one-line note the report prints for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "dominant_share_order",
    "numpy_best_fit",
    "ffd_python",
    "cpsat_exact",
    "CpSatResult",
    "binpacking_1d",
    "hosts_used",
    "check_feasible",
    "stranded_fraction",
    "skipped_notes",
    "clear_skipped",
]

# Peers skipped in this process because their package is missing: name -> one-line note.
_skipped: dict[str, str] = {}


def skipped_notes() -> list[str]:
    """One line per peer skipped so far because its package is not installed."""
    return list(_skipped.values())


def clear_skipped() -> None:
    """Forget the skipped peers (a new run starts)."""
    _skipped.clear()


def hosts_used(assignment: np.ndarray) -> int:
    """Number of distinct hosts in an assignment (-1 rows ignored)."""
    placed = assignment[assignment >= 0]
    return int(np.unique(placed).size)


def check_feasible(capacity: np.ndarray, requests: np.ndarray, assignment: np.ndarray) -> bool:
    """True when no host receives more than its capacity in any dimension."""
    used = np.zeros_like(capacity)
    placed = assignment >= 0
    np.add.at(used, assignment[placed], requests[placed])
    return bool((used <= capacity).all())


def stranded_fraction(capacity: np.ndarray, requests: np.ndarray, assignment: np.ndarray,
                      pending: np.ndarray | None = None) -> float:
    """Share of the used hosts' capacity that is free but stranded (DESIGN.md).

    A used host's free vector is stranded when no request of ``pending``
    (default: every row of ``requests``) fits into it. Returns the sum of
    stranded free capacity divided by the used hosts' capacity, averaged over
    the dimensions that have capacity; 0.0 when nothing is placed.

    Parameters
    ----------
    capacity : ndarray of int64, shape (n_hosts, n_dims)
    requests : ndarray of int64, shape (n, n_dims)
    assignment : ndarray of int64, shape (n,)
    pending : ndarray of int64, shape (m, n_dims), optional
    """
    placed = assignment >= 0
    used_hosts = np.unique(assignment[placed])
    if used_hosts.size == 0:
        return 0.0
    load = np.zeros_like(capacity)
    np.add.at(load, assignment[placed], requests[placed])
    free = (capacity - load)[used_hosts]
    probe = np.unique(requests if pending is None else pending, axis=0)
    fits_any = np.zeros(used_hosts.size, dtype=bool)
    for chunk in np.array_split(probe, max(1, probe.shape[0] // 256)):
        fits_any |= (free[:, None, :] >= chunk[None, :, :]).all(axis=2).any(axis=1)
    total = capacity[used_hosts].sum(axis=0).astype(np.float64)
    stranded = free[~fits_any].sum(axis=0)
    dims = total > 0
    return float(np.mean(stranded[dims] / total[dims])) if dims.any() else 0.0


def dominant_share_order(capacity: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """Row order for largest-first: by dominant share of the total capacity, descending.

    Ties keep arrival order (stable sort), so the order is deterministic.
    """
    total = capacity.sum(axis=0).astype(np.float64)
    total[total == 0] = 1.0
    share = (requests / total).max(axis=1)
    return np.argsort(-share, kind="stable")


def numpy_best_fit(capacity: np.ndarray, requests: np.ndarray, order: str = "arrival") -> np.ndarray:
    """Plain numpy best fit: what a user writes in an afternoon.

    For each request, test every host, then take the fitting host with the
    least normalised free capacity left (sum over dimensions of free/capacity),
    lowest index on ties.

    Parameters
    ----------
    capacity : ndarray of int64, shape (n_hosts, n_dims)
    requests : ndarray of int64, shape (n, n_dims)
    order : {"arrival", "largest_first"}

    Returns
    -------
    ndarray of int64, shape (n,)
    """
    free = capacity.astype(np.int64, copy=True)
    scale = 1.0 / np.maximum(capacity, 1)
    out = np.full(requests.shape[0], -1, dtype=np.int64)
    rows = dominant_share_order(capacity, requests) if order == "largest_first" else range(len(requests))
    for i in rows:
        r = requests[i]
        fits = (free >= r).all(axis=1)
        if not fits.any():
            continue
        left = ((free - r) * scale).sum(axis=1)
        left[~fits] = np.inf
        h = int(np.argmin(left))
        free[h] -= r
        out[i] = h
    return out


def ffd_python(capacity: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """First-fit decreasing in pure Python (lists, no numpy in the loop).

    Items sorted by the sum of their sizes normalised by the largest host
    capacity per dimension, descending; each goes to the lowest-index host
    where it fits.
    """
    cap = capacity.tolist()
    ref = [max(c) or 1 for c in zip(*cap)] if cap else []
    reqs = requests.tolist()
    order = sorted(range(len(reqs)), key=lambda i: -sum(x / r for x, r in zip(reqs[i], ref)))
    free = [row[:] for row in cap]
    out = [-1] * len(reqs)
    n_dims = len(ref)
    for i in order:
        r = reqs[i]
        for h, f in enumerate(free):
            if all(f[k] >= r[k] for k in range(n_dims)):
                for k in range(n_dims):
                    f[k] -= r[k]
                out[i] = h
                break
    return np.array(out, dtype=np.int64)


@dataclass(frozen=True)
class CpSatResult:
    """Outcome of the CP-SAT peer.

    Attributes
    ----------
    assignment : ndarray of int64, shape (n,), or None when no solution was found
    status : str, "OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN" or "MODEL_INVALID"
    hosts : int or None, hosts used by the solution
    bound : int, the solver's proven lower bound on hosts
    seconds : float
    """

    assignment: np.ndarray | None
    status: str
    hosts: int | None
    bound: int
    seconds: float


def cpsat_exact(capacity: np.ndarray, requests: np.ndarray, time_limit_s: float = 5.0,
                hint: np.ndarray | None = None, seed: int = 0, workers: int = 1) -> CpSatResult:
    """Solve bin packing exactly with OR-Tools CP-SAT within a time limit.

    Model: x[i, h] item i on host h, y[h] host used; each item on exactly one
    host; per host and dimension sum(size * x) <= capacity * y; y ordered
    (y[h] >= y[h+1]) to break the symmetry of identical hosts; minimise
    sum(y). Hosts beyond ``hint``'s count are not created.

    Parameters
    ----------
    capacity : ndarray of int64, shape (n_hosts, n_dims)
    requests : ndarray of int64, shape (n, n_dims)
    time_limit_s : float
    hint : ndarray of int64, shape (n,), optional
        A feasible assignment used as the solution hint; its host count also
        caps the number of hosts in the model.
    seed, workers : int
    """
    from ortools.sat.python import cp_model

    t0 = time.perf_counter()
    n, n_dims = requests.shape
    if hint is not None and (hint >= 0).all():
        used = np.unique(hint)
        capacity = capacity[used]
        remap = np.searchsorted(used, hint)
    else:
        remap = None
    n_hosts = capacity.shape[0]
    model = cp_model.CpModel()
    # Variables: one boolean per (item, host) pair and per host.
    x = [[model.new_bool_var(f"x{i}_{h}") for h in range(n_hosts)] for i in range(n)]
    y = [model.new_bool_var(f"y{h}") for h in range(n_hosts)]
    # Each item is on exactly one host.
    for i in range(n):
        model.add_exactly_one(x[i])
    # Capacity per host and dimension, only when the host is used.
    req = requests.tolist()
    cap = capacity.tolist()
    for h in range(n_hosts):
        for k in range(n_dims):
            if any(req[i][k] for i in range(n)):
                model.add(sum(req[i][k] * x[i][h] for i in range(n) if req[i][k])
                          <= cap[h][k] * y[h])
        for i in range(n):
            model.add_implication(x[i][h], y[h])
    # Identical hosts: use them in index order (symmetry breaking).
    if n_hosts > 1 and (capacity == capacity[0]).all():
        for h in range(n_hosts - 1):
            model.add_implication(y[h + 1], y[h])
    model.minimize(sum(y))
    if remap is not None:
        for i in range(n):
            for h in range(n_hosts):
                model.add_hint(x[i][h], int(remap[i] == h))
        for h in range(n_hosts):
            model.add_hint(y[h], 1)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    status = solver.solve(model)
    name = solver.status_name(status)
    if name == "MODEL_INVALID":
        raise RuntimeError("CP-SAT rejected the bin packing model as invalid")
    assignment = hosts = None
    if name in ("OPTIMAL", "FEASIBLE"):
        local = np.array([next(h for h in range(n_hosts) if solver.value(x[i][h]))
                          for i in range(n)], dtype=np.int64)
        assignment = used[local] if remap is not None else local
        hosts = hosts_used(assignment)
    bound = int(np.ceil(solver.best_objective_bound - 1e-9)) if name != "INFEASIBLE" else 0
    return CpSatResult(assignment, name, hosts, bound, time.perf_counter() - t0)


def binpacking_1d(capacity: np.ndarray, requests: np.ndarray) -> int | None:
    """Bins the PyPI ``binpacking`` package needs on the 1-D projections.

    The package packs one dimension at a time (``to_constant_volume``), so
    this is the max over dimensions of its bin count: a relaxation of the
    vector problem (each dimension on its own), not a feasible vector packing.
    Requires identical hosts. None when the package is not installed (the
    peer is skipped; see :func:`skipped_notes`).
    """
    if not (capacity == capacity[0]).all():
        raise ValueError("binpacking_1d needs identical hosts")
    try:
        import binpacking
    except ImportError:
        _skipped["binpacking_1d"] = ("peer binpacking 1-D skipped: the binpacking package is not "
                                     "installed (it comes with hci-scheduler[test])")
        return None
    best = 0
    for k in range(requests.shape[1]):
        col = requests[:, k]
        if not col.any():
            continue
        bins = binpacking.to_constant_volume({i: int(v) for i, v in enumerate(col)},
                                             int(capacity[0, k]))
        best = max(best, len(bins))
    return best
