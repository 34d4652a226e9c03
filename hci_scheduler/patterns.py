"""Packing by patterns: column generation over what one host of each shape can hold.

A greedy packer cannot tell how far its host count is from the best possible, and
the covering and split bounds pool capacity, so on mixed host shapes with one
dominant request size they stay several hosts below any real packing (issue 14's
Google 2011 cell: 548 and 561 where the best packing found needs 566). Here the
requests are grouped into kinds (identical rows) and the hosts into shapes, and
a *pattern* is how many requests of each kind one host of a shape holds. The
Gilmore-Gomory master chooses how many hosts run each pattern:

    min sum_p x_p   s.t.  sum_p a_jp x_p >= n_j  (every kind covered)
                          sum_{p of shape s} x_p <= available_s,   x_p >= 0 integer.

Its linear relaxation is solved by column generation: GLOP for the master, and for
every shape a two-dimensional (or n-dimensional) bounded knapsack priced by CP-SAT
for the pattern of most dual value. Every pricing round gives a Lagrangian lower
bound on the integer optimum, valid whether or not the generation has converged:

    L(pi) = sum_j pi_j n_j + sum_s available_s * min(0, 1 - max_p pi . a_p)

computed in integers (pi rounded down to a fixed scale, the knapsack's proven
bound standing in for its maximum: CP-SAT's, or SCIP's where CP-SAT leaves a gap).
At convergence the bound is the LP value, rounded up. An integer master over the
patterns generated (SCIP, hinted with the best seed packing) then picks the
packing, which is realised host by host: every pattern fits its host by
construction, so the result is feasible with no repair.

It is a batch tool for a few hundred distinct request sizes and host shapes at
most (the pricing knapsack has one variable per kind), used by the heterogeneous
density bench to report a bound that reaches the optimum and a packing at it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .bounds import distinct_rows
from .errors import ValidationError

try:
    from ortools.linear_solver import pywraplp
    from ortools.sat.python import cp_model
except ImportError:  # pragma: no cover - OR-Tools is a declared dependency
    pywraplp = cp_model = None

__all__ = ["PatternPacking", "pack_by_patterns"]

# Duals are rounded down to multiples of 1/SCALE for the integer pricing; rounding
# down keeps them feasible Lagrangian multipliers, so the bound stays valid.
SCALE = 10**9
# A column enters the master only if its reduced cost is below -EPSILON.
EPSILON = 1e-7
# Weight of the best-bound duals in the point priced (Wentges smoothing).
SMOOTHING = 0.7
# Wall-clock cap of one pricing knapsack (its proven bound is used if it bites).
PRICING_S = 2.0
# A MIP solver's dual bound is exact only up to its tolerances: it is raised by this
# share before it stands in a proof.
MIP_SAFETY = 1e-7


@dataclass(frozen=True)
class PatternPacking:
    """The packing chosen by the integer master, and what the bound proves.

    Attributes
    ----------
    hosts : int64 (n_requests,)
        Host row of every request.
    used : int
        Hosts used by `hosts`.
    bound : int
        Proven lower bound on the hosts any packing needs (ceiling of the best
        Lagrangian bound of the column generation).
    lp : float
        The last master relaxation's value (equal to the bound's real value when
        `converged`).
    rounds : int
        Pricing rounds run.
    converged : bool
        No pattern with negative reduced cost was left: `lp` is the Gilmore-Gomory bound.
    patterns : int
        Patterns generated (seeds included).
    seconds : float
    """

    hosts: np.ndarray
    used: int
    bound: int
    lp: float
    rounds: int
    converged: bool
    patterns: int
    seconds: float


def pack_by_patterns(capacity, requests, seeds=(), *, time_limit_s: float = 60.0,
                     integer_share: float = 0.25) -> PatternPacking:
    """Pack `requests` onto `capacity` (rows are hosts) with as few hosts as the
    patterns generated within `time_limit_s` allow; the bound is proven either way.

    Parameters
    ----------
    capacity : int (n_hosts, n_dims)
        Room of each host (an empty cell).
    requests : int (n_requests, n_dims)
    seeds : iterable of int (n_requests,) arrays
        Feasible packings (host row per request, as `Cluster.place_array` returns)
        whose host contents start the master; the best of them is the integer
        master's hint, so the result is never worse than the best seed.
    time_limit_s : float
        Wall clock for the whole call (generation, then the integer master).
    integer_share : float
        Part of the time kept for the integer master.

    Raises
    ------
    ValidationError
        Malformed input, a request no host can hold, or a seed that is not a
        feasible packing of `requests`.
    """
    if cp_model is None:  # pragma: no cover
        raise ValidationError("pack_by_patterns needs OR-Tools")
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) or not time_limit_s > 0:
        raise ValidationError(f"time_limit_s must be a positive number, got {time_limit_s!r}")
    if isinstance(integer_share, bool) or not isinstance(integer_share, (int, float)) or not 0 <= integer_share < 1:
        raise ValidationError(f"integer_share must be a number in [0, 1), got {integer_share!r}")
    t0 = time.perf_counter()
    capacity, requests = _check(capacity, requests)
    problem = _Problem(capacity, requests)
    unfit = np.flatnonzero(problem.upper.max(axis=0) == 0)    # kinds no shape holds one of
    if len(unfit):
        raise ValidationError(f"request row {int(np.flatnonzero(problem.kind_of == unfit[0])[0])} fits no host")
    seeds = [_check_seed(capacity, requests, s) for s in seeds]
    for seed in seeds:
        for host, counts in problem.contents(seed):
            problem.add(problem.shape_of[host], counts)
    problem.add_single_kind()
    deadline = t0 + time_limit_s * (1.0 - integer_share)
    hint = min(seeds, key=lambda s: len(np.unique(s))) if seeds else None
    best_seed = None if hint is None else len(np.unique(hint))
    bound_scaled, lp, rounds, converged = _generate(problem, best_seed, deadline)
    bound = max(-(-bound_scaled // SCALE), 0)
    counts = _integer_master(problem, hint, bound, t0 + time_limit_s)
    if counts is None:
        if hint is None:
            raise ValidationError("no packing found within the time limit (give a seed packing)")
        hosts = hint.copy()
    else:
        hosts = problem.realise(counts)
        if hint is not None and best_seed < len(np.unique(hosts)):
            hosts = hint.copy()
    return PatternPacking(hosts, int(len(np.unique(hosts))), int(bound), float(lp), rounds, converged,
                          len(problem.columns), time.perf_counter() - t0)


def _generate(problem: "_Problem", best_seed: int | None, deadline: float) -> tuple[int, float, int, bool]:
    """Column generation until no pattern improves the master, the bound meets the
    best seed, or `deadline`. Returns the best Lagrangian bound (times SCALE), the
    last master value, the rounds run and whether the generation converged."""
    master = _Master(problem)
    bound_scaled, rounds, converged, lp = -1, 0, False, float("inf")
    centre = None  # the duals of the best Lagrangian bound so far (Wentges smoothing)
    while time.perf_counter() < deadline:
        lp, pi = master.solve()
        rounds += 1
        # Price at a point between the best-bound duals and the master's: the master's
        # duals jump between vertices and make the generation crawl; if the smoothed
        # point yields no column, price the master's own duals before concluding.
        points = [pi] if centre is None else [SMOOTHING * centre + (1 - SMOOTHING) * pi, pi]
        for point in points:
            added, scaled = _price(problem, point, deadline)
            if scaled > bound_scaled:
                bound_scaled, centre = scaled, point
            if added:
                break
        if not added:
            if master.uncovered() > 1e-6:
                raise ValidationError("the hosts cannot hold the requests together (no packing covers them)")
            converged = True
            break
        if best_seed is not None and best_seed <= -(-bound_scaled // SCALE):
            break
    return bound_scaled, lp, rounds, converged


def _check(capacity, requests) -> tuple[np.ndarray, np.ndarray]:
    capacity = np.asarray(capacity)
    requests = np.asarray(requests)
    if capacity.ndim != 2 or requests.ndim != 2 or capacity.shape[1] != requests.shape[1]:
        raise ValidationError(f"capacity (n_hosts, n_dims) and requests (n, n_dims) must share n_dims, got "
                              f"{capacity.shape} and {requests.shape}")
    if capacity.shape[0] == 0 or requests.shape[0] == 0:
        raise ValidationError("capacity and requests must have at least one row each")
    for name, a in (("capacity", capacity), ("requests", requests)):
        if not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
            raise ValidationError(f"{name} must hold integers >= 0")
    return capacity.astype(np.int64), requests.astype(np.int64)


def _check_seed(capacity: np.ndarray, requests: np.ndarray, seed) -> np.ndarray:
    seed = np.asarray(seed)
    if seed.shape != (requests.shape[0],) or not np.issubdtype(seed.dtype, np.integer):
        raise ValidationError(f"a seed must be an integer array of {requests.shape[0]} host rows")
    if (seed < 0).any() or (seed >= capacity.shape[0]).any():
        raise ValidationError("a seed places a request on no host or outside the host rows")
    usage = np.zeros_like(capacity)
    np.add.at(usage, seed, requests)
    if (usage > capacity).any():
        raise ValidationError(f"a seed overcommits host row {int(np.flatnonzero((usage > capacity).any(axis=1))[0])}")
    return seed.astype(np.int64)


class _Problem:
    """Kinds, shapes, and the patterns generated so far."""

    def __init__(self, capacity: np.ndarray, requests: np.ndarray):
        self.capacity, self.requests = capacity, requests
        self.shapes, self.shape_of = distinct_rows(capacity)
        self.available = np.bincount(self.shape_of, minlength=len(self.shapes))
        self.kinds, self.kind_of = distinct_rows(requests)
        self.n_kinds = len(self.kinds)
        self.kind_count = np.bincount(self.kind_of, minlength=self.n_kinds)
        # Most of a kind one host of a shape holds (each dimension, and no more than exist).
        with np.errstate(divide="ignore"):
            per_dim = np.where(self.kinds[None, :, :] > 0,
                               self.shapes[:, None, :] // np.maximum(self.kinds[None, :, :], 1), np.iinfo(np.int64).max)
        self.upper = np.minimum(per_dim.min(axis=2), self.kind_count[None, :])   # (n_shapes, n_kinds)
        self.columns: list[tuple[int, np.ndarray]] = []
        self.mip_shapes: set[int] = set()   # shapes whose knapsack CP-SAT could not close
        self._seen: set = set()
        self.new: list[int] = []

    def add(self, shape: int, counts: np.ndarray) -> bool:
        counts = np.minimum(np.asarray(counts, dtype=np.int64), self.kind_count)
        key = (int(shape), counts.tobytes())
        if key in self._seen or not counts.any():
            return False
        self._seen.add(key)
        self.columns.append((int(shape), counts))
        self.new.append(len(self.columns) - 1)
        return True

    def contents(self, hosts: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(host, count of each kind on it) for every host a packing uses."""
        used, row = np.unique(hosts, return_inverse=True)
        counts = np.zeros((len(used), self.n_kinds), dtype=np.int64)
        np.add.at(counts, (row.ravel(), self.kind_of), 1)
        return list(zip(used.tolist(), counts))

    def add_single_kind(self) -> None:
        for s in range(len(self.shapes)):
            for j in np.flatnonzero(self.upper[s] > 0):
                counts = np.zeros(self.n_kinds, dtype=np.int64)
                counts[j] = self.upper[s, j]
                self.add(s, counts)

    def realise(self, counts: list[int]) -> np.ndarray:
        """Host row per request from the integer master's pattern counts."""
        hosts = np.full(len(self.requests), -1, dtype=np.int64)
        pending = [list(np.flatnonzero(self.kind_of == j)) for j in range(self.n_kinds)]
        free_hosts = [list(np.flatnonzero(self.shape_of == s)[::-1]) for s in range(len(self.shapes))]
        for (shape, pattern), times in zip(self.columns, counts):
            for _ in range(times):
                host = free_hosts[shape].pop()
                for j in np.flatnonzero(pattern):
                    take = min(int(pattern[j]), len(pending[j]))
                    for _ in range(take):
                        hosts[pending[j].pop()] = host
        if (hosts < 0).any():  # pragma: no cover - the master covers every kind
            raise AssertionError("the integer master left requests uncovered")
        return hosts


class _Master:
    """The restricted master's relaxation, kept between rounds (columns are appended)."""

    def __init__(self, problem: _Problem):
        self.problem = problem
        self.solver = pywraplp.Solver.CreateSolver("GLOP")
        inf = self.solver.infinity()
        self.cover = [self.solver.Constraint(float(n), inf) for n in problem.kind_count]
        self.avail = [self.solver.Constraint(0.0, float(a)) for a in problem.available]
        self.objective = self.solver.Objective()
        self.objective.SetMinimization()
        # Requests left uncovered, each priced above any whole packing, keep the master
        # feasible whatever the columns so far (single-kind patterns alone may not fit in
        # the hosts available); they leave it once patterns can cover the requests.
        penalty = float(len(problem.shape_of) + 1)
        self.left = [self.solver.NumVar(0.0, float(n), f"left{j}") for j, n in enumerate(problem.kind_count)]
        for j, var in enumerate(self.left):
            self.objective.SetCoefficient(var, penalty)
            self.cover[j].SetCoefficient(var, 1.0)

    def uncovered(self) -> float:
        """Requests the last relaxation left uncovered (none once it covers them all)."""
        return sum(var.solution_value() for var in self.left)

    def solve(self) -> tuple[float, np.ndarray]:
        for c in self.problem.new:
            shape, pattern = self.problem.columns[c]
            x = self.solver.NumVar(0.0, float(self.problem.available[shape]), f"x{c}")
            self.objective.SetCoefficient(x, 1.0)
            self.avail[shape].SetCoefficient(x, 1.0)
            for j in np.flatnonzero(pattern):
                self.cover[j].SetCoefficient(x, float(pattern[j]))
        self.problem.new.clear()
        status = self.solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:  # pragma: no cover - the left variables make it feasible
            raise RuntimeError(f"GLOP returned status {status} on the pattern master")
        pi = np.maximum([c.dual_value() for c in self.cover], 0.0)
        return self.objective.Value(), pi


def _price(problem: _Problem, pi: np.ndarray, deadline: float) -> tuple[bool, int]:
    """One pricing round: the best pattern of every shape under the duals `pi`.

    Returns whether a column entered, and the Lagrangian bound times SCALE.
    """
    w = np.floor(pi * SCALE).astype(np.int64)
    bound = int((w * problem.kind_count).sum())
    added = False
    for s in range(len(problem.shapes)):
        upper, patterns = _best_patterns(problem, s, w, deadline)
        bound += int(problem.available[s]) * min(0, SCALE - upper)
        for counts in patterns:
            added |= problem.add(s, counts)
    return added, bound


def _best_patterns(problem: _Problem, s: int, w: np.ndarray, deadline: float) -> tuple[int, list]:
    """Shape `s`'s knapsack under the integer duals `w`: an upper bound on the best
    pattern's value, and the patterns of value above one host (SCALE) found on the way.

    CP-SAT finds good patterns fast, every improving one a column at no extra solve,
    but on some shapes leaves its bound far above them (3 % on the Google cell's
    64-core machines after 30 s, 5 hosts of bound); SCIP's cover cuts close those in
    a fraction of a second, so such a shape goes to SCIP from then on."""
    kinds = np.flatnonzero((problem.upper[s] > 0) & (w > 0))
    if len(kinds) == 0:
        return 0, []
    if s in problem.mip_shapes:
        return _knapsack_mip(problem, s, kinds, w, deadline)
    model = cp_model.CpModel()
    a = [model.new_int_var(0, int(problem.upper[s, j]), f"a{j}") for j in kinds]
    for d in range(problem.shapes.shape[1]):
        size = problem.kinds[kinds, d]
        if size.any():
            model.add(sum(int(size[i]) * a[i] for i in np.flatnonzero(size)) <= int(problem.shapes[s, d]))
    model.maximize(sum(int(w[j]) * a[i] for i, j in enumerate(kinds)))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, min(PRICING_S, deadline - time.perf_counter()))
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    found = _Columns(a)
    status = solver.solve(model, found)
    upper = int(np.ceil(solver.best_objective_bound)) if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) \
        else int((w[kinds] * problem.upper[s, kinds]).sum())
    patterns = []
    for value, solution in found.solutions:
        if value > SCALE * (1 + EPSILON):
            counts = np.zeros(problem.n_kinds, dtype=np.int64)
            counts[kinds] = solution
            patterns.append(counts)
    if status != cp_model.OPTIMAL:
        problem.mip_shapes.add(s)
        mip_upper, more = _knapsack_mip(problem, s, kinds, w, deadline)
        upper = min(upper, mip_upper)
        patterns += more
    return upper, patterns


def _knapsack_mip(problem: _Problem, s: int, kinds: np.ndarray, w: np.ndarray, deadline: float) -> tuple[int, list]:
    """The same knapsack in SCIP: its dual bound (raised by MIP_SAFETY for its
    tolerances) and its best pattern, kept only if it fits in integers."""
    solver = _mip()
    a = [solver.IntVar(0, int(problem.upper[s, j]), f"a{j}") for j in kinds]
    for d in range(problem.shapes.shape[1]):
        solver.Add(sum(int(problem.kinds[j, d]) * a[i] for i, j in enumerate(kinds)) <= int(problem.shapes[s, d]))
    solver.Maximize(sum(float(w[j]) * a[i] for i, j in enumerate(kinds)))
    solver.SetTimeLimit(int(1000 * max(0.05, min(PRICING_S, deadline - time.perf_counter()))))
    parameters = pywraplp.MPSolverParameters()
    parameters.SetDoubleParam(parameters.RELATIVE_MIP_GAP, 0.0)
    if solver.Solve(parameters) not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return int((w[kinds] * problem.upper[s, kinds]).sum()), []
    upper = int(np.ceil(solver.Objective().BestBound() * (1 + MIP_SAFETY)))
    counts = np.zeros(problem.n_kinds, dtype=np.int64)
    counts[kinds] = np.rint([v.solution_value() for v in a]).astype(np.int64)
    fits = (counts <= problem.upper[s]).all() and (counts >= 0).all() \
        and (counts @ problem.kinds <= problem.shapes[s]).all()
    return upper, [counts] if fits and int(w @ counts) > SCALE * (1 + EPSILON) else []


def _mip() -> "pywraplp.Solver":
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:  # pragma: no cover - the OR-Tools wheels ship SCIP
        raise RuntimeError("this OR-Tools build has no SCIP")
    return solver


class _Columns(cp_model.CpSolverSolutionCallback if cp_model else object):
    """Every improving knapsack solution CP-SAT finds: the last is the best pattern,
    the earlier ones are good columns too, at no extra solve."""

    def __init__(self, variables):
        super().__init__()
        self.variables = variables
        self.solutions: list[tuple[float, list[int]]] = []

    def on_solution_callback(self) -> None:
        self.solutions.append((self.objective_value, [self.value(v) for v in self.variables]))


def _integer_master(problem: _Problem, hint: np.ndarray | None, bound: int, deadline: float) -> list[int] | None:
    """Pattern counts of the fewest hosts over the patterns generated. SCIP, whose
    rounding heuristics on the LP (RENS) reach 566 hosts on the Google cell in 0.2 s
    where CP-SAT stays at the greedy's 568 after 100 s; the proven bound lets it
    stop as soon as it meets it."""
    solver = _mip()
    x = [solver.IntVar(0, int(problem.available[s]), f"x{c}") for c, (s, _) in enumerate(problem.columns)]
    by_kind: list[list] = [[] for _ in range(problem.n_kinds)]
    by_shape: list[list] = [[] for _ in range(len(problem.shapes))]
    for c, (s, pattern) in enumerate(problem.columns):
        by_shape[s].append(x[c])
        for j in np.flatnonzero(pattern):
            by_kind[j].append(int(pattern[j]) * x[c])
    for j in range(problem.n_kinds):
        solver.Add(sum(by_kind[j]) >= int(problem.kind_count[j]))
    for s in range(len(problem.shapes)):
        if by_shape[s]:
            solver.Add(sum(by_shape[s]) <= int(problem.available[s]))
    solver.Add(sum(x) >= bound)
    solver.Minimize(sum(x))
    if hint is not None:
        index = {(s, p.tobytes()): c for c, (s, p) in enumerate(problem.columns)}
        used = np.zeros(len(x))
        for host, pattern in problem.contents(hint):
            used[index[(int(problem.shape_of[host]), pattern.tobytes())]] += 1
        solver.SetHint(x, used.tolist())
    solver.SetTimeLimit(int(1000 * max(1.0, deadline - time.perf_counter())))
    if solver.Solve() not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return None
    counts = np.rint([v.solution_value() for v in x]).astype(np.int64)
    # The solution is read in floating point: keep it only if it covers exactly.
    cover = np.zeros(problem.n_kinds, dtype=np.int64)
    per_shape = np.zeros(len(problem.shapes), dtype=np.int64)
    for (s, pattern), n in zip(problem.columns, counts):
        cover += n * pattern
        per_shape[s] += n
    if (counts < 0).any() or (cover < problem.kind_count).any() or (per_shape > problem.available).any():
        return None
    return counts.tolist()
