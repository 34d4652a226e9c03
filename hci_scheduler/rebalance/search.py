"""The rebalancing engine: repair an infeasible start, then improve by local search and LNS.

Phases
------
1. Repair (a drain closes hosts, a defragment reservation overfills one): workloads on
   closed hosts must move; on an over-full host the fewest, cheapest workloads whose
   departure brings it within capacity are chosen. Each goes (largest first) to its
   feasible host of least objective delta. What fits nowhere is retried in a CP-SAT
   sub-model with the hosts that have most room; still nowhere: RebalanceInfeasible
   naming the workloads.
2. Improvement, in rounds until the work budget is spent:
   - local search: random shifts and swaps (sched_core._moves, nogil), each kept when it
     does not raise the objective (every other round: record-to-record travel);
   - with transient dimensions (ROADEF), the priced local search instead
     (sched_core._priced): a descent on objective + price x transient load held on
     initial hosts, the price falling from the load weight to zero (twice, the second
     time from half as high) by PRICE_SHARE of the search, so the room a first move
     off a host spends goes to the moves that gain most for it; it also sends moved
     workloads home (no transient charge there);
   - a return-home sweep: every moved workload whose move no longer gains goes back;
   - host emptying (when hosts have a cost): move every workload off one used host onto
     the other used hosts, kept when the objective goes down (consolidation frees hosts
     this way; single shifts never pay before the last one);
   - LNS: a few hosts and their workloads re-solved exactly by CP-SAT (model.py, solve.py)
     with the rest fixed, kept when better; its share of the work follows its gain per
     unit against the local search's.

Effort is counted in work units (moves evaluated, and CP-SAT's deterministic time), so a
given seed and work_budget give the same result on any machine; the wall clock only caps.
Schedules (the price) follow the larger of the work and the time spent, so they still
run their course when a loaded machine hits the wall clock first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from sched_core._moves import MoveState
from sched_core._priced import home_sweep, priced_search

from ..errors import ValidationError
from . import model, objective, solve
from .errors import RebalanceInfeasible
from .problem import Problem

# Work units per second of time_limit_s when no work_budget is given. A shift or swap
# evaluated is one unit; the local search evaluates about 7.5 million a second on one core
# of the 2-core benchmark machine (a1_2: 5,000,000 in 0.66 s), so a budget takes about
# half of its time, leaving room for a loaded machine before the wall-clock cap (which
# breaks determinism) bites.
WORK_PER_SECOND = 4_000_000
# Moves evaluated per local-search round, before host emptying and LNS get a turn.
LS_ROUND = 200_000
# Hosts a host-emptying move scans per workload (from a rotating start) on large clusters.
SCAN_LIMIT = 512
# Used hosts a round of host emptying tries, the cheapest to empty first: about as many
# shift evaluations as the round's local search (16 hosts x ~30 workloads x SCAN_LIMIT).
EMPTY_TRIES = 16
# Record-to-record tolerance of the climbing rounds, as a share of the objective.
TOLERANCE = 1e-4
# Transient room (ROADEF): the price of a unit of transient load held on an initial host
# starts at PRICE_START x the dimension's load weight and falls linearly to zero, twice
# (the second time from half as high), by PRICE_SHARE of the search (_price_level,
# sched_core/_priced.pyx).
PRICE_START = 1.0
PRICE_SHARE = 0.8
PRICE_CYCLES = 2
# Shares of swap and return-home draws in the priced search.
PRICED_SWAPS = 40
PRICED_HOMES = 10
# Share of the priced search's draws among moved workloads (see sched_core/_priced.pyx).
PRICED_AWAY = 50
# Share of the work given to LNS sub-models at first; then it follows LNS's gain per unit
# of work against the local search's, within these bounds.
LNS_SHARE = 0.3
LNS_SHARE_MIN = 0.05
LNS_SHARE_MAX = 0.5
# Size of an LNS neighbourhood: at most this many hosts, and this many of their
# workloads move (a random part when the hosts hold more; the rest stay fixed).
LNS_HOSTS = 6
LNS_WORKLOADS = 36
# Work units per second of CP-SAT deterministic time (a sub-model of 280 variables took
# 1.05 s of wall time for 0.2 s of deterministic time on a1_2), and per model variable
# built (about 150 us of Python each).
WORK_PER_DET = 5 * WORK_PER_SECOND
WORK_PER_VAR = 600
# Deterministic time limit of one sub-model solve.
LNS_DET = 0.05


@dataclass
class SearchResult:
    """What `search` returns.

    assignment : int32 (n,)
        host of every workload; `objective.violations(problem, assignment) == []`.
    status : str
        "optimal" (proved), "feasible" (changed), or "unchanged".
    stats : dict
        objective before/after (None before when the start was infeasible), terms, work
        units, rounds, moves accepted per neighbourhood, repairs, hosts emptied, seconds.
    """

    assignment: np.ndarray
    status: str
    stats: dict = field(default_factory=dict)


def search(problem: Problem, *, time_limit_s: float = 30.0, work_budget: int | None = None,
           seed: int = 0, max_moves: int | None = None, progress=None,
           start: np.ndarray | None = None) -> SearchResult:
    """Find a feasible assignment of lower objective than the problem's initial one.

    Parameters
    ----------
    problem : Problem
    time_limit_s : float
        wall-clock safety cap; also sets the work budget when `work_budget` is None.
    work_budget : int, optional
        work units to spend (deterministic given `seed`).
    seed : int
    max_moves : int, optional
        most workloads away from their initial host in the result.
    progress : callable(fraction: float, best_objective: int), optional
    start : int (n,), optional
        a feasible assignment to improve instead of the initial one (a constructed
        candidate, such as the keep-set's); moves still count from the initial hosts.

    Returns
    -------
    SearchResult

    Raises
    ------
    ValidationError
        on bad arguments.
    RebalanceInfeasible
        when the start breaks a hard constraint and the repair cannot restore it (names
        the workloads that fit nowhere, or the hosts and constraints at fault).
    """
    if not isinstance(problem, Problem):
        raise ValidationError(f"problem must be a Problem, got {type(problem).__name__}")
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s >= 0):
        raise ValidationError(f"time_limit_s must be a number >= 0, got {time_limit_s!r}")
    if work_budget is not None and (not isinstance(work_budget, (int, np.integer)) or work_budget < 0):
        raise ValidationError(f"work_budget must be an integer >= 0, got {work_budget!r}")
    if max_moves is not None and (not isinstance(max_moves, (int, np.integer)) or max_moves < 0):
        raise ValidationError(f"max_moves must be an integer >= 0, got {max_moves!r}")
    if start is not None:
        start = np.asarray(start)
        if start.shape != problem.initial.shape or objective.violations(problem, start):
            raise ValidationError("start must be a feasible assignment of every workload")
        if max_moves is not None and int((start != problem.initial).sum()) > max_moves:
            raise ValidationError(f"start moves more than max_moves={max_moves} workloads")
    t0 = time.perf_counter()
    # The final check against the reference (objective.violations, terms) takes about
    # 10 us per workload: kept out of the search's time so the whole call meets the limit.
    deadline = t0 + float(time_limit_s) - min(0.1 * float(time_limit_s), 0.05 + 1e-5 * problem.n_workloads)
    budget = int(work_budget) if work_budget is not None else int(time_limit_s * WORK_PER_SECOND)
    engine = _Engine(problem, seed=seed, max_moves=-1 if max_moves is None else int(max_moves),
                     budget=budget, deadline=deadline, progress=progress,
                     start=problem.initial if start is None else start)
    start_violations = objective.violations(problem, problem.initial)
    engine.repair(start_violations if start is None else [])
    engine.improve()
    out = engine.state.assignment
    left = objective.violations(problem, out)
    if left:  # the evaluator and the reference disagree: a bug; never return a bad plan
        raise AssertionError("search produced an infeasible assignment: " + "; ".join(left[:5]))
    moved = out != problem.initial
    status = "optimal" if engine.proved else ("feasible" if moved.any() else "unchanged")
    after = objective.terms(problem, out)
    engine.stats.update(
        objective_before=None if start_violations else objective.total(problem, problem.initial),
        objective_after=sum(after.values()), terms_after=after, moved=int(moved.sum()),
        hosts_used_before=int(np.unique(problem.initial).size), hosts_used_after=int(np.unique(out).size),
        work=budget - engine.work_left, seconds=round(time.perf_counter() - t0, 3))
    return SearchResult(assignment=out, status=status, stats=engine.stats)


def _price_level(progress: float) -> float:
    """The price at this point of the search, in units of the load weight: PRICE_CYCLES
    linear falls to zero within the first PRICE_SHARE of it, each starting lower (1, 1/2,
    ...). A new cycle raises the price again, so returns home (paid the room they free) buy
    back room the last one spent cheaply, for the moves that gain more for it."""
    if progress >= PRICE_SHARE or PRICE_SHARE <= 0:
        return 0.0
    span = PRICE_SHARE / PRICE_CYCLES
    k = min(int(progress / span), PRICE_CYCLES - 1)
    return (1 - (progress - k * span) / span) / (k + 1) * PRICE_START


def _smooth(old: float | None, new: float) -> float:
    """Running mean of a rate over the last few rounds."""
    return new if old is None else 0.7 * old + 0.3 * new


def _lns_share(rate_ls: float, rate_lns: float) -> float:
    """LNS's share of a round: its part of the gain per unit of both, within
    LNS_SHARE_MIN..LNS_SHARE_MAX (each keeps a turn: the better one now may stall later)."""
    a, b = max(rate_ls, 0.0), max(rate_lns, 0.0)
    share = b / (a + b) if a + b > 0 else LNS_SHARE
    return min(LNS_SHARE_MAX, max(LNS_SHARE_MIN, share))


class _Engine:
    """One search: the move state, the budget, and the neighbourhoods."""

    def __init__(self, problem, *, seed, max_moves, budget, deadline, progress, start):
        self.p = problem
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.state = MoveState(problem, start, max_moves, seed)
        self.max_moves = max_moves
        self.budget = budget
        self.work_left = budget
        self.deadline = deadline
        self.t_start = time.perf_counter()
        self.progress = progress
        self.proved = False
        # Dimensions whose demand exceeds the summed targets: load cost is due on them
        # anyway, and a host left below its target there wastes room (ROADEF's load bound).
        demand = problem.request.sum(axis=0) + problem.fixed.sum(axis=0)
        self._short = (demand > problem.target.sum(axis=0)) & (problem.load_weight > 0)
        self.stats = {"ls_accepted": 0, "hosts_emptied": 0, "repaired": 0, "lns_solved": 0,
                      "lns_improved": 0, "rounds": 0}

    def _progress(self) -> float:
        """Share of the search done: of the work budget, or of the time when the wall
        clock runs out first (a loaded machine), so schedules still reach their end."""
        work = 1 - self.work_left / max(self.budget, 1)
        span = self.deadline - self.t_start
        return max(work, (time.perf_counter() - self.t_start) / span if span > 0 else 1.0)

    def _spend(self, units: int) -> bool:
        self.work_left -= int(units)
        return self.work_left > 0 and time.perf_counter() < self.deadline

    def _ids(self, workloads) -> list[str]:
        names = self.p.workload_ids
        return [names[w] if names else f"workload {w}" for w in workloads]

    # -- phase 1 --------------------------------------------------------------

    def repair(self, start_violations: list[str]) -> None:
        """Move workloads off closed and over-full hosts; raise when some fit nowhere."""
        if not start_violations:
            return
        p, st = self.p, self.state
        cur = st.assignment
        bad_host = ~p.open[cur] | ~p.allowed[p.allowed_class, cur]
        stuck = np.flatnonzero(bad_host & ~p.movable)
        if stuck.size:
            raise RebalanceInfeasible([f"{name}: pinned to a host it may not stay on"
                                       for name in self._ids(stuck)], self._ids(stuck))
        must = list(np.flatnonzero(bad_host))
        use, hold = st.usage()
        over = use + hold - p.capacity
        for h in np.flatnonzero((over > 0).any(axis=1)):
            must += self._ejections(int(h), over[h], cur)
        # Largest first: the big ones have the fewest hosts with room.
        must = sorted(set(must), key=lambda w: (-float((p.request[w] / np.maximum(p.capacity.max(axis=0), 1)).sum()), w))
        if self.max_moves >= 0 and len(must) > self.max_moves:
            raise RebalanceInfeasible(f"the repair needs {len(must)} moves, max_moves is {self.max_moves}")
        failed = []
        for w in must:
            host, work = st.relocate(int(w), int(cur[w]), False)
            self._spend(work)
            if host < 0:
                failed.append(int(w))
        if failed:
            failed = self._repair_exact(failed)
        if failed:
            failed = self._repair_exact(failed, hosts=LNS_HOSTS * 3)
        if failed:
            raise RebalanceInfeasible([f"{name}: fits on no open host it may use"
                                       for name in self._ids(failed)], self._ids(failed))
        self.stats["repaired"] = len(must)
        left = objective.violations(p, st.assignment)
        if left:
            raise RebalanceInfeasible(left)

    def _ejections(self, h: int, over: np.ndarray, cur: np.ndarray) -> list[int]:
        """Workloads to take off over-full host h: repeatedly the one that covers most of
        what is still over per unit of move cost (one that covers all of it: the cheapest)."""
        p = self.p
        on = [int(w) for w in np.flatnonzero((cur == h) & p.movable)]
        need = np.maximum(over, 0).astype(np.int64)
        # Transient load stays on the initial host when its workload leaves: no relief.
        relief = lambda w: np.where(p.transient & (p.initial[w] == h), 0, p.charge(np.array([w]), np.array([h]))[0])
        chosen = []
        while (need > 0).any() and on:
            scale = np.maximum(need, 1)
            whole = [w for w in on if (relief(w) >= need).all()]
            if whole:
                w = min(whole, key=lambda w: (p.move_cost[w], w))
            else:
                w = max(on, key=lambda w: (float((np.minimum(relief(w), need) / scale).sum()) / (1 + p.move_cost[w]), -w))
            chosen.append(w)
            on.remove(w)
            need = need - relief(w)
        if (need > 0).any():
            name = p.host_ids[h] if p.host_ids else f"host {h}"
            raise RebalanceInfeasible(f"{name}: over capacity even with every movable workload gone")
        return chosen

    def _repair_exact(self, failed: list[int], hosts: int = LNS_HOSTS) -> list[int]:
        """Place what the greedy could not with a CP-SAT sub-model over the hosts with most
        room for them (their workloads may move too); returns what still fails."""
        p, st = self.p, self.state
        cur = st.assignment
        use, hold = st.usage()
        room = p.capacity - use - hold
        need = p.request[failed].max(axis=0)
        ok = p.open & p.allowed[p.allowed_class[failed]].any(axis=0)
        ok[cur[failed]] = False
        score = (np.minimum(room, need) / np.maximum(need, 1)).sum(axis=1)
        cand = np.flatnonzero(ok)
        H = cand[np.lexsort((cand, -score[cand]))][:hosts]
        W = np.union1d(np.array(failed), np.flatnonzero(np.isin(cur, H) & p.movable))
        sub = model.build(p, cur, W, H, max_moves=self.max_moves)
        out = solve.solve(sub, time_limit_s=max(1.0, self.deadline - time.perf_counter()),
                          det_time=max(1.0, self.work_left / WORK_PER_DET), seed=self.seed)
        self._spend(len(sub.x) * WORK_PER_VAR + out.det_time * WORK_PER_DET)
        if out.hosts is None:
            return failed
        for w, h in zip(W, out.hosts):
            st.apply(int(w), int(h))
        return []

    # -- phase 2 --------------------------------------------------------------

    def improve(self) -> None:
        p, st = self.p, self.state
        if not p.movable.any():
            return  # nothing can move: the start is the answer
        empty_hosts = bool((p.host_cost > 0).any())
        lns = self.p.n_workloads > 0 and self.p.movable.any()
        priced = bool(p.transient.any())
        unit = np.where(p.load_weight > 0, p.load_weight, max(int(p.load_weight.max()), 1)).astype(np.float64)
        rate_ls = rate_lns = None      # objective gained per work unit, smoothed
        while self.work_left > 0 and time.perf_counter() < self.deadline:
            self.stats["rounds"] += 1
            chunk = min(LS_ROUND, self.work_left)
            wall = max(0.0, self.deadline - time.perf_counter())
            level = _price_level(self._progress())
            before = st.value
            if priced and (level > 0 or self.stats["rounds"] % 2 == 1):
                # Transient room is priced while it is scarce (early); then plain descent
                # with returns home, alternating with record-to-record travel as below.
                evaluated, accepted, _ = priced_search(st, chunk, wall, level * unit, PRICED_SWAPS,
                                                       PRICED_HOMES, True, PRICED_AWAY)
            else:
                # Every other round may climb (record-to-record travel): out of the local optima
                # of pure descent (a1_2: 803.6M by descent alone, 782.5M with it, same work).
                tolerance = int(st.value * TOLERANCE) if self.stats["rounds"] % 2 == 0 else 0
                evaluated, accepted, _ = st.local_search(chunk, wall, 50, True, tolerance)
            self.stats["ls_accepted"] += accepted
            evaluated_home, accepted_home = home_sweep(st, True)
            evaluated += evaluated_home
            self.stats["homes"] = self.stats.get("homes", 0) + accepted_home
            rate_ls = _smooth(rate_ls, (before - st.value) / max(evaluated, 1))
            if not self._spend(max(evaluated, 1)):
                break
            if empty_hosts:
                self._empty_hosts()
            if lns:
                # LNS gets a share of the work by what it gains per unit against the local
                # search (deterministic: both are counted in work units).
                share = LNS_SHARE if rate_lns is None else _lns_share(rate_ls, rate_lns)
                before, t_lns, left = st.value, time.perf_counter(), self.work_left
                go_on = self._lns(int(LS_ROUND * share / (1 - share)))
                rate_lns = _smooth(rate_lns, (before - st.value) / max(left - self.work_left, 1))
                lns_s = self.stats.get("lns_seconds", 0.0) + time.perf_counter() - t_lns
                self.stats["lns_seconds"] = round(lns_s, 3)
                if not go_on:
                    break
            if self.progress is not None:
                self.progress(min(1.0, 1 - self.work_left / max(self.budget, 1)), int(st.value))
        if self.progress is not None:
            self.progress(1.0, int(st.value))

    def _empty_hosts(self) -> None:
        """Host emptying: the EMPTY_TRIES used hosts cheapest to empty per cost, each tried.

        Every round tries again: the local search's drift between rounds changes where
        there is room, so a host that could not be emptied may be now (Google 1k cell, 20 s
        from the keep-set: 596 hosts when a failed host waited for another success, 586 so)."""
        p, st = self.p, self.state
        cur = st.assignment
        counts = np.bincount(cur, minlength=p.n_hosts)
        used = np.flatnonzero((counts > 0) & (p.host_cost > 0))
        if used.size < 2:
            return
        ref = np.maximum(p.capacity.max(axis=0), 1)
        use, _ = st.usage()
        load = ((use[used] - p.fixed[used]) / ref).sum(axis=1)
        order = used[np.lexsort((used, load / p.host_cost[used]))][:EMPTY_TRIES]
        for h in order:
            done, work = st.empty_host(int(h), True, False, SCAN_LIMIT)
            if done:
                self.stats["hosts_emptied"] += 1
            if not self._spend(work):
                break

    # -- LNS ----------------------------------------------------------------------

    def _lns(self, units: int) -> bool:
        """Solve sub-models until `units` of work are spent; False when nothing is left to do
        (budget out, or a sub-model covering the whole problem was solved to optimality)."""
        p, st = self.p, self.state
        spent = 0
        while spent < units:
            cur = st.assignment
            H, kind = self._neighbourhood(cur)
            W = np.flatnonzero(np.isin(cur, H) & p.movable)
            if W.size > LNS_WORKLOADS:  # crowded hosts: a random part of their workloads moves
                W = np.sort(self.rng.choice(W, LNS_WORKLOADS, replace=False))
            if W.size == 0:
                spent += 1000
                continue
            sub = model.build(p, cur, W, H, max_moves=self.max_moves)
            det = min(LNS_DET, max(self.work_left, 0) / WORK_PER_DET)
            out = solve.solve(sub, time_limit_s=max(0.01, min(2.0, self.deadline - time.perf_counter())),
                              det_time=det, seed=self.seed + self.stats["lns_solved"])
            cost = len(sub.x) * WORK_PER_VAR + int(out.det_time * WORK_PER_DET)
            spent += cost
            self.stats["lns_solved"] += 1
            if out.hosts is not None:
                before = st.value
                changed = [(int(w), int(cur[w]), int(h)) for w, h in zip(W, out.hosts) if h != cur[w]]
                for w, _, h in changed:
                    st.apply(w, h)
                if st.value < before:
                    self.stats["lns_improved"] += 1
                    self.stats.setdefault(f"lns_{kind}", 0)
                    self.stats[f"lns_{kind}"] += 1
                else:
                    for w, h0, _ in reversed(changed):
                        st.apply(w, h0)
                whole = H.size == p.n_hosts and W.size == int(p.movable.sum())
                if whole and out.status == "optimal":
                    self.proved = True
                    return False
            if not self._spend(cost):
                return False
        return True

    def _neighbourhood(self, cur: np.ndarray) -> tuple[np.ndarray, str]:
        """A few hosts whose workloads are re-solved together: drawn at random, by cost
        (the dearest hosts beside random ones), by shared service, or (when hosts have a
        cost) the emptiest used hosts beside the ones with most room."""
        p, rng = self.p, self.rng
        counts = np.bincount(cur, minlength=p.n_hosts)
        hosts_open = np.flatnonzero(p.open)
        if hosts_open.size <= LNS_HOSTS and counts.sum() <= LNS_WORKLOADS:
            return hosts_open, "whole"
        kinds = (["random", "cost", "service"] + (["consolidate"] if (p.host_cost > 0).any() else [])
                 + (["slack"] if self._short.any() else []))
        kind = kinds[self.stats["lns_solved"] % len(kinds)]
        n_hosts = int(rng.integers(2, LNS_HOSTS + 1))
        used = np.flatnonzero(counts > 0)
        if kind == "cost":
            host_obj = self._host_objective()
            first = list(np.argsort(-host_obj, kind="stable")[:2])
        elif kind == "service":
            svc = p.service[p.movable & (p.service >= 0)]
            if svc.size:
                s = svc[rng.integers(svc.size)]
                first = list(np.unique(cur[p.service == s]))
                rng.shuffle(first)
            else:
                first = []
        elif kind == "slack":
            # Load above the target costs, yet a host is below it on a dimension short
            # overall: the room it wastes is what the dearest hosts need.
            use = self.state.usage()[0]
            room = (np.maximum(0, p.target - use)[:, self._short] * p.load_weight[self._short]).sum(axis=1)
            host_obj = self._host_objective()
            first = [int(np.argmax(room)), int(np.argmax(host_obj))]
            rng.shuffle(first)
        elif kind == "consolidate":
            ref = np.maximum(p.capacity.max(axis=0), 1)
            load = (self.state.usage()[0][used] / ref).sum(axis=1)
            first = list(used[np.argsort(load, kind="stable")[: 1 + rng.integers(3)]])
        else:
            first = []
        chosen: list[int] = []
        pool = list(first) + list(rng.permutation(used if used.size else hosts_open))
        if rng.random() < 0.5:  # now and then an empty host, so workloads can spread out
            empty = np.flatnonzero((counts == 0) & p.open)
            if empty.size:
                pool.insert(min(len(pool), 1), int(empty[rng.integers(empty.size)]))
        for h in pool:
            h = int(h)
            if h in chosen:
                continue
            chosen.append(h)
            if len(chosen) >= n_hosts or counts[chosen].sum() >= 2 * LNS_WORKLOADS:
                break
        return np.array(sorted(chosen), dtype=np.int64), kind

    def _host_objective(self) -> np.ndarray:
        """Load and balance cost per host (the hosts an LNS step by cost starts from)."""
        p = self.p
        use, _ = self.state.usage()
        c = (np.maximum(0, use - p.target) * p.load_weight).sum(axis=1)
        avail = p.capacity - use
        for da, db, t, wb in p.balance:
            c = c + wb * np.maximum(0, t * avail[:, da] - avail[:, db])
        return c
