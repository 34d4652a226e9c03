"""Bounded, deterministic improvement of a greedy batch packing.

`improve_assignment` takes the greedy result of a batch placement and tries
to empty hosts, one at a time, by moving their workloads onto the other hosts
the greedy used. It never touches a host the greedy did not use, so the
number of hosts in use can only go down, and every row the greedy placed
stays placed.

Method
------
0. Restart from a minimum-bin-slack construction (MBS' of Gupta & Ho,
   1999, extended to vectors) over the greedy's hosts when it needs fewer
   of them than the greedy did; it finds the exact fills (items that sum to
   a full host) that a one-item-at-a-time greedy misses.
   Small instances (n_items * hosts <= CPSAT_MAX_PAIRS) on identical hosts
   whose maximal host fillings number at most COVER_MAX_SETS are first
   solved as a set cover over those fillings with OR-Tools CP-SAT (the
   Gilmore-Gomory model, on its own share of the work); when that proves
   its packing optimal, stop. Otherwise steps 1-3 run as they would without
   it and the better packing is kept.
1. Close the least-filled used host; its items become *pending*.
2. Repeat, in the style of the consistent neighbourhood search of
   Buljubašić & Vasquez, "Consistent neighborhood search for one-dimensional
   bin packing and two-dimensional vector packing", Computers & Operations
   Research 76 (2016): insert pending items into hosts where they fit
   (tightest fit first); otherwise swap a pending item with one or two
   placed items of a host where that fits, taking the move that lowers the
   total *weight* of the pending set most (weight = size summed over
   dimensions, each normalised by the largest capacity; an ejected item
   that fits straight into another host costs nothing). When no move lowers
   the weight, take the least bad one; an ejected item may not re-enter the
   host it left for a few steps (tabu), so the search does not cycle.
3. When the pending set empties, the closed host is freed: keep the packing
   and close the next one. When the attempt stalls, restore the last
   complete packing and try the next least-filled host; when all have
   failed, retry with twice the patience. Stop as soon as the packing meets
   a lower bound (volume, or on small instances a clique of items no two of
   which fit one host together).
4. If work is left and the instance is small (and the set cover did not
   run), re-solve it exactly with OR-Tools CP-SAT (one worker,
   deterministic time limit), warm-started from the best packing with
   ``add_hint``.

Effort is counted in *work units* (array elements examined plus a fixed
cost per step, and CP-SAT's deterministic time), never in seconds, so the
result is the same on every machine for a given budget. ``budget_s``
converts to work units at ``WORK_UNITS_PER_SECOND`` (calibrated so that the
work takes at most about half of ``budget_s`` on the 2-core AMD EPYC
machine the benchmarks ran on); the wall clock is only a safety cap, and if
it bites (a machine more than about twice slower, or heavily loaded) the
result is still valid but no longer reproducible. The set-cover stage's
wall cap is COVER_WALL_SHARE of the time left, so that on a loaded machine
it is this stage, never the search after it, that gets cut.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .errors import ValidationError

try:  # imported once here: the first import costs more than a whole budget
    from ortools.sat.python import cp_model
except ImportError:  # the improver works without OR-Tools, only without the exact polish
    cp_model = None

__all__ = ["improve_assignment", "WORK_UNITS_PER_SECOND"]

# Work units per second of budget. A search step costs STEP_UNITS (its Python
# overhead) plus one unit per ELEMENTS_PER_UNIT array elements it compares.
# Calibrated on a 2.x GHz core so that a budget of T seconds takes at most
# about half of T of wall time, leaving room for a loaded machine before the
# wall-clock cap (which breaks determinism) bites.
WORK_UNITS_PER_SECOND = 18_000_000
STEP_UNITS = 3_000
# Array elements per work unit: a vectorised comparison of one element costs a
# small fraction of a unit of Python overhead (figures: bench/README.md, Measured).
ELEMENTS_PER_UNIT = 8
# Steps without a new lowest pending weight before an attempt gives up.
STALL_STEPS = 150
MAX_STALL_STEPS = 8 * STALL_STEPS
# Steps during which a moved item may not return to the host it left.
TABU_TENURE = 12
# Heaviest candidates considered for the pair of a min-slack bin fill.
PAIR_CANDIDATES = 160
# Largest items x bins on which the min-slack construction runs (every shared
# vbp instance is under 250,000).
MIN_SLACK_MAX_PAIRS = 2_000_000
# Exact polish with the work left after the search gives up: CP-SAT runs when
# n_items * n_bins is at most CPSAT_MAX_PAIRS; CPSAT_DET_PER_SECOND converts a
# second of budget into CP-SAT deterministic time.
CPSAT_MAX_PAIRS = 3_000
CPSAT_DET_PER_SECOND = 0.5
# Heaviest items tried for the conflict-clique lower bound.
CLIQUE_CANDIDATES = 400
# Set-cover stage: most feasible bin fillings enumerated, and the work units
# charged per (column, item) term of the model (Python model building).
COVER_MAX_SETS = 20_000
COVER_TERM_UNITS = 60
# Work of the set-cover stage, as a share of the budget's work units, given
# on top of the search's (which runs unchanged after it when the stage does
# not prove its packing optimal). With this share the whole improvement of the
# shared instances under 100 items still ends within improve_s (the wall times
# are in bench/README.md, Measured).
COVER_SHARE = 0.6
# Share of the wall time left at which the set-cover stage is cut.
COVER_WALL_SHARE = 0.5
# Largest temporary (rows x columns) matrix a move evaluation may build, so
# that batches of 10^5 rows on 10^4 hosts stay within memory.
MAX_MATRIX = 4_000_000


def _check_inputs(free, requests, assignment, budget_s):
    for name, arr, ndim in (("free", free, 2), ("requests", requests, 2),
                            ("assignment", assignment, 1)):
        if not isinstance(arr, np.ndarray):
            raise ValidationError(f"{name} must be a numpy ndarray, got {type(arr).__name__}")
        if arr.dtype != np.int64:
            raise ValidationError(f"{name} must have dtype int64, got {arr.dtype}")
        if arr.ndim != ndim:
            raise ValidationError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if free.shape[1] != requests.shape[1]:
        raise ValidationError(
            f"requests has {requests.shape[1]} dimensions, free has {free.shape[1]}"
        )
    if assignment.shape[0] != requests.shape[0]:
        raise ValidationError(
            f"assignment has {assignment.shape[0]} rows, requests has {requests.shape[0]}"
        )
    if (free < 0).any():
        raise ValidationError("free must be >= 0 everywhere")
    if (requests < 0).any():
        raise ValidationError("requests must be >= 0 everywhere")
    if assignment.size and (assignment.min() < -1 or assignment.max() >= free.shape[0]):
        raise ValidationError(
            f"assignment values must be -1 or a host index in [0, {free.shape[0]})"
        )
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float, np.floating)):
        raise ValidationError(f"budget_s must be a number, got {budget_s!r}")
    if not math.isfinite(budget_s) or budget_s < 0:
        raise ValidationError(f"budget_s must be finite and >= 0, got {budget_s!r}")


def _fits(room: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """fits[i, j] = sizes[i] <= room[j] in every dimension.

    room (a, d), sizes (b, d) -> (b, a) bool. One 2-D comparison per
    dimension, ANDed in place: broadcasting to (b, a, d) and reducing over the
    last axis would build a temporary d times larger, and d is small (<= 10).
    """
    out = sizes[:, 0][:, None] <= room[:, 0][None, :]
    for k in range(1, sizes.shape[1]):
        out &= sizes[:, k][:, None] <= room[:, k][None, :]
    return out


def _is_tabu(tabu, pending: np.ndarray, bins: np.ndarray, step: int) -> np.ndarray:
    """(n_pending, n_bins_listed) bool: pending item p may not enter bins[j] yet."""
    last_bin, until = tabu
    return (last_bin[pending][:, None] == bins[None, :]) & (until[pending][:, None] > step)


def _usage(n_hosts: int, requests: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    used = np.zeros((n_hosts, requests.shape[1]), dtype=np.int64)
    placed = assignment >= 0
    np.add.at(used, assignment[placed], requests[placed])
    return used


def improve_assignment(free, requests, assignment, budget_s, *, seed=0):
    """Improve a greedy packing within a bounded, deterministic effort.

    Parameters
    ----------
    free : ndarray of int64, shape (n_hosts, n_dims)
        Free capacity of every host before the batch (all-zero rows for
        hosts that cannot take anything).
    requests : ndarray of int64, shape (n, n_dims)
        The batch's requests.
    assignment : ndarray of int64, shape (n,)
        The greedy result: a host index per row, or -1 for unplaced rows.
        Must be feasible against ``free``.
    budget_s : float
        Effort budget in seconds (0 returns a copy of ``assignment``). It is
        converted to work units, so the result does not depend on the
        machine unless the wall-time safety cap of ``budget_s`` is hit.
    seed : int, keyword-only
        Seed of the tie-breaking random generator.

    Returns
    -------
    ndarray of int64, shape (n,)
        A feasible assignment that places exactly the rows the greedy placed,
        only on hosts the greedy used, and so never uses more hosts.

    Raises
    ------
    ValidationError
        On wrong types, dtypes, shapes, negative values, or an input
        assignment that overcommits a host.
    """
    _check_inputs(free, requests, assignment, budget_s)
    out = assignment.copy()
    if budget_s == 0 or requests.shape[0] < 2:
        return out
    if (_usage(free.shape[0], requests, assignment) > free).any():
        raise ValidationError("assignment overcommits a host: it is not a feasible greedy result")
    placed_rows = np.flatnonzero(assignment >= 0)
    hosts, local_bin = np.unique(assignment[placed_rows], return_inverse=True)
    if hosts.size < 2:
        return out
    search = _BinEmptier(
        np.ascontiguousarray(free[hosts]),
        np.ascontiguousarray(requests[placed_rows]),
        local_bin.astype(np.int64),
        work_budget=int(budget_s * WORK_UNITS_PER_SECOND),
        wall_deadline=time.perf_counter() + float(budget_s),
        seed=seed,
    )
    best_bin = search.run()
    out[placed_rows] = hosts[best_bin]
    # Defensive re-check, independent of the search's own bookkeeping.
    if (
        (_usage(free.shape[0], requests, out) > free).any()
        or np.unique(out[placed_rows]).size > hosts.size
        or (out[placed_rows] < 0).any()
    ):
        return assignment.copy()
    return out


class _BinEmptier:
    """Tabu search state over the greedy's hosts (local indices 0..n_bins-1).

    Attributes
    ----------
    cap : (n_bins, n_dims) int64, capacity of each bin
    sizes : (n_items, n_dims) int64
    weight : (n_items,) float64, normalised size used as the pending cost
    bin_of : (n_items,) int64, current bin of each item, -1 while pending
    """

    def __init__(self, cap, sizes, bin_of, *, work_budget, wall_deadline, seed):
        self.cap = cap
        self.sizes = sizes
        self.n_bins, self.n_dims = cap.shape
        self.n_items = sizes.shape[0]
        ref = cap.max(axis=0).astype(np.float64)
        ref[ref == 0] = 1.0  # a zero-capacity dimension carries no request either
        self.scaled = sizes / ref
        self.cap_scaled = cap / ref
        self.weight = self.scaled.sum(axis=1)
        self.bin_of = bin_of.copy()
        self.work_left = work_budget
        self.deadline = wall_deadline
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.stall_limit = STALL_STEPS

    # -- bookkeeping ---------------------------------------------------------

    def _spend(self, elements: int) -> bool:
        self.work_left -= elements // ELEMENTS_PER_UNIT + STEP_UNITS
        return self.work_left > 0 and time.perf_counter() < self.deadline

    def _loads(self, bin_of: np.ndarray) -> np.ndarray:
        load = np.zeros_like(self.cap)
        placed = bin_of >= 0
        np.add.at(load, bin_of[placed], self.sizes[placed])
        return load

    # -- outer loop: close one bin at a time ---------------------------------

    def run(self) -> np.ndarray:
        best = self.bin_of.copy()
        # Two size measures for the min-slack construction: the sum of the
        # normalised sizes, and the largest normalised size (dominant share).
        # The construction costs O(items x bins) Python-level steps: past
        # MIN_SLACK_MAX_PAIRS it would spend the whole budget before the search
        # starts (20,808 items on 598 bins: 5 s for 98 of its bins).
        measures = (self.weight, self.scaled.max(axis=1)) if self.n_items * self.n_bins <= MIN_SLACK_MAX_PAIRS else ()
        for measure in measures:
            alt = self._min_slack_start(measure)
            if alt is not None and np.unique(alt).size < np.unique(best).size:
                best = alt
        small = cp_model is not None and self.n_items * np.unique(best).size <= CPSAT_MAX_PAIRS
        lower = self._lower_bound(with_clique=small)
        covered = None
        if small and np.unique(best).size > lower and (self.cap == self.cap[0]).all():
            # Small instances with identical bins: the set-cover stage runs
            # first, on its own COVER_SHARE of the work (listing included).
            # When it proves its packing optimal (most small instances) the
            # search is not needed. Otherwise the search runs exactly as it
            # would without this stage (same start, work and random draws)
            # and the better packing is kept, so no result gets worse.
            search_work, self.work_left = self.work_left, int(self.work_left * COVER_SHARE)
            sets = self._maximal_sets(self.cap[0])
            if sets is not None:
                covered, proved = self._cpsat_cover(best, sets)
                if proved or np.unique(covered).size <= lower:
                    return covered
            self.work_left = search_work
        failed: set[int] = set()
        while self.work_left > 0 and time.perf_counter() < self.deadline:
            used = np.bincount(best, minlength=self.n_bins) > 0
            if used.sum() <= lower:
                return best  # proven optimal: nothing left to gain
            fill = np.bincount(best, weights=self.weight, minlength=self.n_bins)
            candidates = [b for b in np.flatnonzero(used)[np.argsort(fill[used], kind="stable")]
                          if b not in failed]
            if used.sum() < 2:
                break
            if len(candidates) == 0:
                # Every bin failed at this persistence: retry all of them with
                # twice the patience while work remains.
                if self.stall_limit >= MAX_STALL_STEPS:
                    break
                self.stall_limit *= 2
                failed.clear()
                continue
            target = int(candidates[0])
            result = self._empty_bin(best, target, used)
            if result is None:
                failed.add(target)
            else:
                best = result
                failed.clear()
        if covered is not None:
            return covered if np.unique(covered).size < np.unique(best).size else best
        # The search gave up with work left: spend the rest on an exact
        # polish when the model is small enough to be worth it.
        if self.work_left > 0 and small and np.unique(best).size > lower:
            best = self._cpsat_polish(best)
        return best

    def _lower_bound(self, with_clique: bool = True) -> int:
        """Fewest bins any packing needs: the volume bound or a conflict clique.

        Volume: max over dimensions of ceil(total size / largest capacity).
        Clique: items that pairwise fit in no bin together (checked against
        the largest capacity per dimension, so it holds for mixed bins) need
        a bin each; grown greedily, heaviest first, over the heaviest
        CLIQUE_CANDIDATES items. Not charged as work (at most
        CLIQUE_CANDIDATES**2 * n_dims comparisons), so that stopping at the
        bound saves work without changing any result.
        """
        top = self.cap.max(axis=0)
        volume = int(np.max(-(-self.sizes.sum(axis=0) // np.maximum(top, 1))))
        if not with_clique:
            return volume
        order = np.argsort(-self.weight, kind="stable")[:CLIQUE_CANDIDATES]
        clique: list[int] = []
        for i in order:
            if not clique or (self.sizes[clique] + self.sizes[i] > top).any(axis=1).all():
                clique.append(int(i))
        return max(volume, len(clique))

    # -- exact stage: set cover over maximal bin fillings ---------------------

    def _maximal_sets(self, cap: np.ndarray):
        """Every maximal set of items that fits one bin of capacity `cap`, or None.

        Level-wise enumeration of the feasible sets as sorted index tuples
        (a set of size s + 1 extends one of size s by a larger index), then
        keeps those to which no other item can be added. Gives up (None) when
        more than COVER_MAX_SETS feasible sets exist: instances with many
        small items per bin, where the search does well anyway.
        """
        sizes = self.sizes
        n = self.n_items
        index = np.arange(n)
        level = index[:, None]
        load = sizes.copy()
        maximal = []
        total = n
        while level.size:
            if level.shape[0] * n > MAX_MATRIX:
                return None
            room = cap - load                           # (n_sets, d)
            fits = _fits(room, sizes).T                 # [s, i]: item i fits into set s
            if not self._spend(fits.size * self.n_dims):
                return None
            member = np.zeros_like(fits)
            np.put_along_axis(member, level, True, axis=1)
            fits &= ~member
            maximal.append(level[~fits.any(axis=1)])
            # Extend by items of a larger index only, so each set appears once.
            extend = fits & (index[None, :] > level[:, -1][:, None])
            total += int(np.count_nonzero(extend))
            if total > COVER_MAX_SETS:  # counted before the index arrays are built
                return None
            rows, items = np.nonzero(extend)
            level = np.concatenate([level[rows], items[:, None]], axis=1)
            load = load[rows] + sizes[items]
        return [m for m in maximal if m.size]

    def _cpsat_cover(self, best: np.ndarray, sets: list) -> tuple[np.ndarray, bool]:
        """Re-solve a small identical-bin packing as a set cover with CP-SAT.

        Columns are the maximal bin fillings (`_maximal_sets`); minimise the
        columns chosen so that every item is in one. This is the set-covering
        form of the Gilmore-Gomory model of bin packing: every bin of a
        packing lies in some maximal filling, so its optimum is the packing
        optimum, and its linear relaxation is very close to that optimum,
        which lets CP-SAT prove it on instances where the item-to-bin model
        of `_cpsat_polish` stays at the volume bound (an example is in
        bench/README.md, Measured). A cover becomes a packing by keeping each
        item in the first chosen column that holds it. No hint: hinting the
        packing `best` made CP-SAT slower to prove the optimum on the
        instances measured. Returns ``(packing, proved)``: `best` unless a
        packing into fewer bins is found, and whether the packing returned is
        optimal.
        """
        bins = np.unique(best)
        cap_b = self.cap[bins]
        if cp_model is None or not (cap_b == cap_b[0]).all():
            return best, False
        t0 = time.perf_counter()
        # (column, item) terms, one per member of each maximal filling.
        offsets = np.cumsum([0] + [level.shape[0] for level in sets[:-1]])
        col_of = np.concatenate([np.repeat(np.arange(level.shape[0]), level.shape[1]) + off
                                 for level, off in zip(sets, offsets)])
        item_of = np.concatenate([level.ravel() for level in sets])
        n_columns = int(col_of[-1]) + 1
        # The model is written straight into its proto, not through new_bool_var /
        # add: those Python calls per variable and per term were most of this
        # stage's wall time on models of thousands of columns.
        model = cp_model.CpModel()
        proto = model.proto
        # Variables: column c is a bin of the packing.
        for _ in range(n_columns):
            proto.variables.add().domain.extend((0, 1))
        # Every item is in at least one chosen column.
        by_item = np.argsort(item_of, kind="stable")
        bounds = np.searchsorted(item_of[by_item], np.arange(self.n_items + 1))
        cols_sorted = col_of[by_item].tolist()
        for i in range(self.n_items):
            holders = cols_sorted[bounds[i]:bounds[i + 1]]
            linear = proto.constraints.add().linear
            linear.vars.extend(holders)
            linear.coeffs.extend([1] * len(holders))
            linear.domain.extend((1, len(holders)))
        # Fewest columns.
        proto.objective.vars.extend(range(n_columns))
        proto.objective.coeffs.extend([1] * n_columns)
        self.work_left -= item_of.size * COVER_TERM_UNITS  # model building
        # The linear relaxation is what closes these models; presolve costs
        # far more wall time per deterministic second than the search and
        # does not help here (measured on the New/class3-4 instances).
        # The wall clock may stop this stage at COVER_WALL_SHARE of the time
        # left, never the search after it: the search's result is the one
        # that must not depend on the machine; this stage can only improve
        # on it.
        status, solver = self._solve(model, t0, wall_share=COVER_WALL_SHARE,
                                     linearization_level=2, cp_model_presolve=False)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return best, False
        proved = status == cp_model.OPTIMAL
        value = np.array(solver.response_proto.solution, dtype=np.int64)
        chosen = np.flatnonzero(value[:n_columns])
        if chosen.size >= bins.size:
            return best, proved
        # Each item stays in the first chosen column that holds it.
        out = np.full(self.n_items, -1, dtype=np.int64)
        rank = np.full(n_columns, -1, dtype=np.int64)
        rank[chosen] = np.arange(chosen.size)
        take = rank[col_of] >= 0
        for i, c in zip(item_of[take].tolist(), rank[col_of[take]].tolist()):
            if out[i] < 0:
                out[i] = bins[c]
        if not (out >= 0).all():
            return best, False
        return out, proved

    def _solve(self, model, t0: float, wall_share: float, **params):
        """Solve `model` on one worker within the work left; (status, solver).

        The deterministic time limit comes from the work left, and the
        deterministic time used is charged back, so the result is the same
        on every machine; the wall clock only caps it, at `wall_share` of the
        time left. The seed is the improver's own, not a draw from its
        generator, so that the search's random draws stay the same.
        """
        det_time = self.work_left / WORK_UNITS_PER_SECOND * CPSAT_DET_PER_SECOND
        # Keep a margin for reading the solution back.
        wall_left = wall_share * (self.deadline - time.perf_counter()) - (time.perf_counter() - t0)
        if det_time <= 0.005 or wall_left <= 0.005:
            return cp_model.UNKNOWN, None
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = int(self.seed)
        solver.parameters.max_deterministic_time = float(det_time)
        solver.parameters.max_time_in_seconds = float(wall_left)
        for key, value in params.items():
            setattr(solver.parameters, key, value)
        status = solver.solve(model)
        used = solver.deterministic_time / CPSAT_DET_PER_SECOND
        self.work_left -= int(used * WORK_UNITS_PER_SECOND)
        return status, solver

    # -- exact polish -------------------------------------------------------

    def _cpsat_polish(self, best: np.ndarray) -> np.ndarray:
        """Re-solve a small packing exactly with CP-SAT, warm-started from `best`.

        Model: x[i, b] item on bin (only the bins `best` uses), y[b] bin
        used; one bin per item; per bin and dimension sum(size * x) <= cap * y;
        x[i, b] => y[b]; identical bins used in index order; minimise sum(y).
        The hint is `best`. One worker, a fixed seed and a *deterministic*
        time limit (CP-SAT's own work measure, from the work units left) make
        the result reproducible; the wall clock only caps it.
        """
        if cp_model is None:
            return best
        t0 = time.perf_counter()
        bins = np.unique(best)
        n_bins = bins.size
        cap_b = self.cap[bins]
        lower = int(np.max(-(-self.sizes.sum(axis=0) // np.maximum(cap_b.max(axis=0), 1))))
        if n_bins <= max(lower, 1):
            return best  # already at the volume bound
        local = np.searchsorted(bins, best)
        cap = cap_b.tolist()
        sizes = self.sizes.tolist()
        dims = [k for k in range(self.n_dims) if self.sizes[:, k].any()]
        model = cp_model.CpModel()
        # Variables: item i on bin b, bin b used.
        x = [[model.new_bool_var(f"x{i}_{b}") for b in range(n_bins)] for i in range(self.n_items)]
        y = [model.new_bool_var(f"y{b}") for b in range(n_bins)]
        # Each item is on exactly one bin.
        for i in range(self.n_items):
            model.add_exactly_one(x[i])
        # Capacity per bin and dimension, only when the bin is used.
        for b in range(n_bins):
            for k in dims:
                model.add(sum(sizes[i][k] * x[i][b] for i in range(self.n_items) if sizes[i][k])
                          <= cap[b][k] * y[b])
            for i in range(self.n_items):
                model.add_implication(x[i][b], y[b])
        # Identical bins are interchangeable: use them in index order.
        if (cap_b == cap_b[0]).all():
            for b in range(n_bins - 1):
                model.add_implication(y[b + 1], y[b])
        model.add(sum(y) >= lower)
        model.minimize(sum(y))
        for i in range(self.n_items):
            for b in range(n_bins):
                model.add_hint(x[i][b], int(local[i] == b))
        for b in range(n_bins):
            model.add_hint(y[b], 1)
        self.work_left -= self.n_items * n_bins * len(dims) * 50  # model building
        det_time = self.work_left / WORK_UNITS_PER_SECOND * CPSAT_DET_PER_SECOND
        # Keep a margin for reading the solution back.
        wall_left = 0.8 * (self.deadline - time.perf_counter()) - (time.perf_counter() - t0)
        if det_time <= 0.005 or wall_left <= 0.005:
            return best
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = int(self.rng.integers(2**31))
        solver.parameters.max_deterministic_time = float(det_time)
        solver.parameters.max_time_in_seconds = float(wall_left)
        status = solver.solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return best  # UNKNOWN: nothing better found in time; keep the search's result
        out = np.array([bins[next(b for b in range(n_bins) if solver.boolean_value(x[i][b]))]
                        for i in range(self.n_items)], dtype=np.int64)
        return out if np.unique(out).size < n_bins else best

    def _empty_bin(self, start: np.ndarray, target: int, used: np.ndarray):
        """Pack every item onto the used bins other than `target`, or None."""
        bin_of = start.copy()
        open_bin = used.copy()
        open_bin[target] = False
        # Closed bins get capacity -1 so no feasibility test ever accepts them.
        cap = np.where(open_bin[:, None], self.cap, -1)
        load = self._loads(np.where(bin_of == target, -1, bin_of))
        bin_of[bin_of == target] = -1
        # Tabu: an ejected item may not re-enter the bin it left (the last
        # one per item) until step tabu_until; O(n_items) memory.
        tabu = (np.full(self.n_items, -1, dtype=np.int64), np.zeros(self.n_items, dtype=np.int64))
        locked = np.zeros(self.n_items, dtype=np.int64)
        sizes, weight = self.sizes, self.weight
        best_pending = math.inf
        stall = 0
        step = 0
        while True:
            step += 1
            self._insert_fitting(bin_of, load, cap)
            pending = np.flatnonzero(bin_of < 0)
            if pending.size == 0:
                return bin_of
            pending_weight = float(weight[pending].sum())
            if pending_weight < best_pending - 1e-12:
                best_pending, stall = pending_weight, 0
            else:
                stall += 1
            if stall > self.stall_limit:
                return None
            move = self._best_swap(pending, bin_of, load, cap, tabu, locked, step)
            if move is None:
                return None
            p, b, out_items = move
            for j in out_items:
                bin_of[j] = -1
                load[b] -= sizes[j]
                tabu[0][j] = b
                tabu[1][j] = step + TABU_TENURE
            bin_of[p] = b
            load[b] += sizes[p]
            locked[p] = step + TABU_TENURE
            if not self._spend(0):
                return None

    # -- alternative start ----------------------------------------------------

    def _min_slack_start(self, weight: np.ndarray):
        """Minimum-bin-slack construction over the same bins, or None.

        Fills one bin at a time: the heaviest remaining item plus the one or
        two other items that leave the least normalised slack, then tops the
        bin up first-fit. This is MBS' of Gupta & Ho (1999), "A new heuristic
        algorithm for the one-dimensional bin-packing problem", restricted to
        subsets of size three and extended to vectors; it finds the exact
        fills that a one-item-at-a-time greedy misses. Candidates are capped
        at the PAIR_CANDIDATES heaviest so the cost stays O(n) per bin.
        """
        sizes = self.sizes
        remaining = list(np.argsort(-weight, kind="stable"))
        bin_of = np.full(self.n_items, -1, dtype=np.int64)
        # Largest bins first, as the greedy's hosts may differ in size.
        for b in np.argsort(-self.cap_scaled.sum(axis=1), kind="stable"):
            if not remaining:
                break
            rest = np.array(remaining, dtype=np.int64)
            slack = self.cap[b] - sizes[rest[0]]
            if (slack < 0).any():
                return None
            chosen = [rest[0]]
            others = rest[1:]
            cand = others[(sizes[others] <= slack).all(axis=1)][:PAIR_CANDIDATES]
            if cand.size:
                after = slack - sizes[cand]                     # (c, d)
                pair_ok = _fits(after, sizes[cand]).T  # [j, k]: k fits beside j
                pair_ok &= np.triu(np.ones((cand.size, cand.size), dtype=bool), 1)
                if not self._spend(pair_ok.size * self.n_dims):
                    return None
                value = np.where(pair_ok, weight[cand][:, None] + weight[cand][None, :], -1.0)
                j, k = np.unravel_index(int(np.argmax(value)), value.shape)
                if value[j, k] > weight[cand[0]]:
                    chosen += [cand[j], cand[k]]
                else:
                    chosen.append(cand[0])
                slack = slack - sizes[chosen[1:]].sum(axis=0)
            taken = set(int(c) for c in chosen)
            # Top up, heaviest first; only items that fit the slack now can.
            fit_now = others[(sizes[others] <= slack).all(axis=1)]
            if not self._spend(others.size * self.n_dims):
                return None
            for i in fit_now:
                if int(i) not in taken and (sizes[i] <= slack).all():
                    slack = slack - sizes[i]
                    taken.add(int(i))
            for i in taken:
                bin_of[i] = b
            remaining = [i for i in remaining if int(i) not in taken]
        return None if remaining else bin_of

    # -- moves ----------------------------------------------------------------

    def _insert_fitting(self, bin_of, load, cap) -> None:
        """Insert pending items, heaviest first, each into its tightest fitting bin."""
        pending = np.flatnonzero(bin_of < 0)
        if pending.size == 0:
            return
        pending = pending[np.argsort(-self.weight[pending], kind="stable")]
        slack = cap - load  # (n_bins, n_dims)
        self._spend(pending.size * slack.size)
        for p in pending:
            fits = (slack >= self.sizes[p]).all(axis=1)
            if not fits.any():
                continue
            # Tightest fit: least normalised room left after the insertion
            # (best fit, the rule the greedy's binpack strategy also uses).
            room = ((slack - self.sizes[p]) / np.maximum(self.cap, 1)).sum(axis=1)
            room[~fits] = np.inf
            b = int(np.argmin(room))
            bin_of[p] = b
            load[b] += self.sizes[p]
            slack[b] -= self.sizes[p]

    def _best_swap(self, pending, bin_of, load, cap, tabu, locked, step):
        """The best (pending item in, one or two placed items out) move, or None.

        Returns ``(p, b, out_items)``. Improving moves (pending weight goes
        down) are preferred; otherwise the least worsening non-tabu move.
        """
        sizes, weight = self.sizes, self.weight
        placed = np.flatnonzero((bin_of >= 0) & (locked <= step))
        best = None
        best_delta = math.inf
        if placed.size:
            pb = bin_of[placed]
            # room_j = slack of j's bin once j leaves it: (n_placed, n_dims)
            room = cap[pb] - load[pb] + sizes[placed]
            # feasible[p, j]: pending p fits in place of j.
            feasible = _fits(room, sizes[pending])
            feasible &= ~_is_tabu(tabu, pending, pb, step)
            self._spend(feasible.size * self.n_dims)
            if feasible.any():
                # An ejected item that fits directly into another open bin
                # costs nothing: the swap is then a two-step ejection chain.
                out_cost = weight[placed].copy()
                cand = np.flatnonzero(feasible.any(axis=0))
                if cand.size * self.n_bins > MAX_MATRIX:  # keep the heaviest
                    keep = max(1, MAX_MATRIX // self.n_bins)
                    cand = cand[np.argsort(-weight[placed[cand]], kind="stable")[:keep]]
                slack = cap - load
                elsewhere = _fits(slack, sizes[placed[cand]])
                elsewhere[np.arange(cand.size), pb[cand]] = False
                self._spend(elsewhere.size * self.n_dims)
                out_cost[cand[elsewhere.any(axis=1)]] = 0.0
                delta = out_cost[None, :] - weight[pending][:, None]
                delta = np.where(feasible, delta, np.inf)
                best_delta = float(delta.min())
                pi, ji = self._pick(delta, best_delta)
                best = (int(pending[pi]), int(pb[ji]), (int(placed[ji]),))
        if best_delta < -1e-12:
            return best
        pair = self._best_pair_swap(pending, placed, bin_of, load, cap, tabu, step)
        if pair is not None and pair[0] < best_delta:
            return pair[1]
        return best

    def _best_pair_swap(self, pending, placed, bin_of, load, cap, tabu, step):
        """Best move putting one pending item in place of two items of one bin."""
        if placed.size < 2:
            return None
        order = placed[np.argsort(bin_of[placed], kind="stable")]
        ob = bin_of[order]
        first, second = [], []
        total, limit = 0, MAX_MATRIX // max(pending.size, 1)
        for offset in range(1, order.size):
            same = ob[:-offset] == ob[offset:]
            if not same.any():
                break
            first.append(order[:-offset][same])
            second.append(order[offset:][same])
            total += first[-1].size
            if total > limit:  # too many pairs to evaluate at once: skip this move
                return None
        if not first:
            return None
        j = np.concatenate(first)
        k = np.concatenate(second)
        b = bin_of[j]
        sizes, weight = self.sizes, self.weight
        room = cap[b] - load[b] + sizes[j] + sizes[k]
        feasible = _fits(room, sizes[pending])
        feasible &= ~_is_tabu(tabu, pending, b, step)
        self._spend(feasible.size * self.n_dims)
        if not feasible.any():
            return None
        delta = (weight[j] + weight[k])[None, :] - weight[pending][:, None]
        delta = np.where(feasible, delta, np.inf)
        best_delta = float(delta.min())
        pi, qi = self._pick(delta, best_delta)
        return best_delta, (int(pending[pi]), int(b[qi]), (int(j[qi]), int(k[qi])))

    def _pick(self, delta: np.ndarray, value: float) -> tuple[int, int]:
        """Seeded choice among the entries equal to the minimum."""
        rows, cols = np.nonzero(delta <= value + 1e-12)
        i = int(self.rng.integers(rows.size)) if rows.size > 1 else 0
        return int(rows[i]), int(cols[i])
