"""The rebalancing engine: incremental evaluator vs the numpy reference, repair, search."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hci_scheduler.rebalance import objective
from hci_scheduler.rebalance.errors import RebalanceInfeasible
from hci_scheduler.rebalance.problem import Problem
from hci_scheduler.rebalance.search import search
from sched_core._moves import MoveState


def make_problem(rng, m=6, n=14, d=2, **over) -> Problem:
    """A random problem using every feature of the model (ROADEF and cluster)."""
    cap = rng.integers(50, 100, (m, d))
    s = 4
    tenant = np.where(rng.random(n) < 0.3, 0, -1)
    kw = dict(
        capacity=cap, request=rng.integers(1, 20, (n, d)), initial=rng.integers(0, m, n),
        target=cap * 7 // 10, ratio_milli=rng.choice([1000, 1500], (m, d)), vm=rng.random(n) < 0.3,
        fixed=rng.integers(0, 10, (m, d)), host_cost=rng.integers(0, 50, m),
        location=rng.integers(0, 3, m), neighbourhood=rng.integers(0, 2, m),
        service=rng.integers(-1, s, n), conflict=rng.random(s) < 0.5, spread_min=rng.integers(0, 3, s),
        depends=[[0, 1], [2, 3]], tenant=tenant, dedicated=[True] if (tenant >= 0).any() else None,
        move_cost=rng.integers(1, 10, n), load_weight=rng.integers(0, 5, d), balance=[(0, 1, 2, 3)],
        transient=np.array([True] + [False] * (d - 1)), process_move_weight=2, service_move_weight=7,
        machine_move_weight=3, group_move_weight=rng.integers(0, 4, s), location_move_cost=5,
        allowed=rng.random((2, m)) < 0.8, allowed_class=rng.integers(0, 2, n),
        movable=rng.random(n) < 0.9,
    )
    kw.update(over)
    p = Problem(**kw)
    p.allowed[p.allowed_class, p.initial] = True  # the initial host is always allowed
    return p


def with_initial(p: Problem, initial) -> Problem:
    kw = {k: getattr(p, k) for k in p.__dataclass_fields__}
    kw["initial"] = np.asarray(initial)
    return Problem(**kw)


def feasible_start(p: Problem, rng, tries=300) -> Problem:
    """The problem started from a random assignment that is feasible as a start (or None)."""
    for _ in range(tries):
        q = with_initial(p, rng.integers(0, p.n_hosts, p.n_workloads))
        q.allowed[q.allowed_class, q.initial] = True
        if not objective.violations(q, q.initial):
            return q
    return None


# -- the evaluator against the reference ------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_moves_delta_matches_reference(seed):
    rng = np.random.default_rng(seed)
    p = make_problem(rng)
    a = rng.integers(0, p.n_hosts, p.n_workloads)
    state = MoveState(p, a)
    base = objective.total(p, a)
    assert state.value == base
    clean = not objective.violations(p, a)
    for _ in range(30):
        w, w2, h = rng.integers(p.n_workloads), rng.integers(p.n_workloads), rng.integers(p.n_hosts)
        ok, delta = state._py_shift(w, h)
        b = a.copy()
        b[w] = h
        if ok:
            assert delta == objective.total(p, b) - base
            if clean:  # a feasible move from a feasible state breaks nothing
                assert objective.violations(p, b) == []
        elif clean and h != a[w] and p.movable[w]:
            # a refused move from a feasible state really breaks something
            assert objective.violations(p, b) != []
        ok, delta = state._py_swap(w, w2)
        c = a.copy()
        c[w], c[w2] = a[w2], a[w]
        if ok:
            assert delta == objective.total(p, c) - base
            if clean:
                assert objective.violations(p, c) == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_moves_state_follows_applied_moves(seed):
    # After a sequence of applied moves the counters give the reference objective and usage.
    rng = np.random.default_rng(seed)
    p = make_problem(rng)
    a = rng.integers(0, p.n_hosts, p.n_workloads)
    state = MoveState(p, a)
    for _ in range(25):
        w, h = rng.integers(p.n_workloads), rng.integers(p.n_hosts)
        state.apply(w, h)
        a[w] = h
    assert state.value == objective.total(p, a)
    use, hold = state.usage()
    np.testing.assert_array_equal(use, objective.usage(p, a))
    np.testing.assert_array_equal(use + hold, objective.transient_usage(p, a))
    terms = objective.terms(p, a)
    got = state.terms()
    assert got["host_cost"] == terms["host_cost"]
    assert got["load_balance_cost"] == terms["load_cost"] + terms["balance_cost"]
    for k in ("process_move_cost", "service_move_cost", "machine_move_cost", "group_move_cost"):
        assert got[k] == terms[k], k


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_search_result_feasible_and_not_worse(seed):
    rng = np.random.default_rng(seed)
    p = feasible_start(make_problem(rng), rng)
    if p is None:
        return
    r = search(p, work_budget=20_000, seed=seed % 7)
    assert objective.violations(p, r.assignment) == []
    assert objective.total(p, r.assignment) <= objective.total(p, p.initial)
    assert r.stats["objective_after"] == objective.total(p, r.assignment)


# -- the objective by hand ------------------------------------------------------------------

def test_objective_terms_by_hand():
    # 2 hosts (cap 10, target 6, load weight 3), 3 workloads of size 4; w2 moved 0 -> 1.
    p = Problem(capacity=[[10], [10]], target=[[6], [6]], request=[[4], [4], [4]], initial=[0, 0, 0],
                host_cost=[100, 70], load_weight=[3], move_cost=[5, 6, 7], process_move_weight=2,
                service=[0, 0, 0], service_move_weight=11, location=[0, 1], location_move_cost=9,
                machine_move_weight=1, group_move_weight=[4])
    t = objective.terms(p, np.array([0, 0, 1]))
    # host 0: usage 8 -> 3 x (8 - 6) = 6 load; host 1: 4 <= 6
    assert t == {"host_cost": 170, "load_cost": 6, "balance_cost": 0, "process_move_cost": 2 * 7,
                 "service_move_cost": 11, "machine_move_cost": 9, "group_move_cost": 4}
    assert objective.violations(p, np.array([0, 0, 0])) == ["host 0: dimension 0 over capacity by 2"]


# -- small instances against exhaustive enumeration -----------------------------------------

def exhaustive_optimum(p: Problem) -> int:
    best = None
    for a in itertools.product(range(p.n_hosts), repeat=p.n_workloads):
        a = np.array(a)
        if not objective.violations(p, a):
            v = objective.total(p, a)
            best = v if best is None else min(best, v)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_search_reaches_exhaustive_optimum_on_tiny(seed):
    rng = np.random.default_rng(100 + seed)
    # 4 hosts, 6 workloads: 4^6 = 4096 assignments; the first drawn problem with a feasible start
    p = None
    while p is None:
        p = feasible_start(make_problem(rng, m=4, n=6, d=2, spread_min=[0, 2, 0, 0], depends=[[0, 1]],
                                        fixed=np.zeros((4, 2), int), tenant=np.full(6, -1),
                                        dedicated=None), rng, tries=100)
    r = search(p, work_budget=300_000, seed=0)
    assert objective.violations(p, r.assignment) == []
    assert objective.total(p, r.assignment) == exhaustive_optimum(p)


# -- repair ------------------------------------------------------------------------------------

def drain_problem(open_hosts, big=4, second=3):
    # 4 hosts of capacity 10: host 0 holds workloads 0, 1 (sizes `big`, `second`), the others 5 each.
    return Problem(capacity=np.full((4, 1), 10), request=[[big], [second], [5], [5], [5]],
                   initial=[0, 0, 1, 2, 3], open=open_hosts, move_cost=[1, 1, 1, 1, 1],
                   process_move_weight=1, workload_ids=["w0", "w1", "w2", "w3", "w4"])


def test_repair_drain_moves_exactly_the_drained_workloads():
    p = drain_problem([False, True, True, True])
    r = search(p, work_budget=50_000, seed=0)
    assert objective.violations(p, r.assignment) == []
    assert (r.assignment != 0).all()
    # only w0 and w1 had to move; nothing else pays a move cost for no gain
    assert list(np.flatnonzero(r.assignment != p.initial)) == [0, 1]


def test_repair_infeasible_drain_names_the_workload():
    # w0 and w1 (size 6 each) fit beside no 5 (11 > 10); re-packing all (exact sub-model):
    # 6 + 6 + 3 x 5 = 27 <= 30, but {6}, {6}, {5, 5} leaves a 5 out: infeasible.
    p = drain_problem([False, True, True, True], big=6, second=6)
    with pytest.raises(RebalanceInfeasible) as err:
        search(p, work_budget=50_000, seed=0)
    assert err.value.workload_ids == ["w0", "w1"]
    assert "w0" in str(err.value)


def test_repair_drain_repacks_when_no_single_move_fits():
    # w0 (6) fits beside no 5 greedily, but 6 + 3 | 5 + 5 | 5 does: the exact repair finds it.
    p = drain_problem([False, True, True, True], big=6)
    r = search(p, work_budget=50_000, seed=0)
    assert objective.violations(p, r.assignment) == []


def test_repair_pinned_on_closed_host_raises():
    p = Problem(capacity=[[10], [10]], request=[[1]], initial=[0], open=[False, True], movable=[False],
                workload_ids=["pinned"])
    with pytest.raises(RebalanceInfeasible, match="pinned"):
        search(p, work_budget=1000)


def test_repair_reservation_overfilling_a_host():
    # defragment: a reservation of 8 in `fixed` on host 0 which runs sizes 4 and 3 (cap 10):
    # 8 + 4 + 3 = 15 -> one workload covering the 5 over: none (4 < 5) -> both leave... the
    # 4 covers most; then 8 + 3 = 11 still 1 over -> the 3 leaves too.
    p = Problem(capacity=np.full((3, 1), 10), request=[[4], [3], [2]], initial=[0, 0, 1],
                fixed=[[8], [0], [0]], move_cost=[1, 1, 1], process_move_weight=1)
    r = search(p, work_budget=20_000, seed=0)
    assert objective.violations(p, r.assignment) == []
    assert r.assignment[0] != 0 and r.assignment[1] != 0


# -- search options ------------------------------------------------------------------------------

def consolidation_problem(m=30, per_host=3, seed=0) -> Problem:
    rng = np.random.default_rng(seed)
    cap = np.array([[32, 128], [64, 256]])[rng.integers(0, 2, m)]
    n = m * per_host
    req = np.stack([rng.integers(1, 8, n), rng.integers(2, 32, n)], 1)
    return Problem(capacity=cap, request=req, initial=np.repeat(np.arange(m), per_host),
                   host_cost=np.full(m, 100), move_cost=np.ones(n), process_move_weight=1)


def test_search_consolidates_and_respects_max_moves():
    p = consolidation_problem()
    free = search(p, work_budget=2_000_000, seed=0)
    assert objective.violations(p, free.assignment) == []
    assert free.stats["hosts_used_after"] < p.n_hosts // 2
    capped = search(p, work_budget=2_000_000, seed=0, max_moves=7)
    assert objective.violations(p, capped.assignment) == []
    assert (capped.assignment != p.initial).sum() <= 7
    # 7 moves can empty at most 7 hosts holding 3 workloads each: 2
    assert capped.stats["hosts_used_after"] >= p.n_hosts - 2


def test_search_is_deterministic_with_a_seed():
    p = consolidation_problem(seed=3)
    a = search(p, work_budget=500_000, seed=5, time_limit_s=60)
    b = search(p, work_budget=500_000, seed=5, time_limit_s=60)
    np.testing.assert_array_equal(a.assignment, b.assignment)


def test_search_rejects_bad_arguments():
    p = consolidation_problem(m=3)
    with pytest.raises(Exception, match="max_moves"):
        search(p, max_moves=-1)
    with pytest.raises(Exception, match="work_budget"):
        search(p, work_budget=-5)


# -- CP-SAT sub-models -----------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_submodel_solution_is_feasible_and_its_objective_is_the_delta(seed):
    from hci_scheduler.rebalance import model, solve

    rng = np.random.default_rng(seed)
    p = feasible_start(make_problem(rng, m=8, n=20), rng)
    if p is None:
        return
    cur = p.initial
    hosts = np.sort(rng.choice(p.n_hosts, 4, replace=False))
    ws = np.flatnonzero(np.isin(cur, hosts))
    cap = int(rng.integers(0, 4))
    sub = model.build(p, cur, ws, hosts, max_moves=cap)
    out = solve.solve(sub, time_limit_s=10, det_time=5, seed=0)
    assert out.status in ("optimal", "feasible")  # the current placement is a solution
    new = cur.copy()
    new[ws] = out.hosts
    assert objective.violations(p, new) == []
    assert (new != p.initial).sum() <= cap
    # the sub-model's value of the current placement: every x fixed to it
    for (w, h), var in sub.x.items():
        sub.model.add(var == int(cur[w] == h))
    now = solve.solve(sub, time_limit_s=10, det_time=5, seed=0)
    assert now.status == "optimal"
    assert out.objective - now.objective == objective.total(p, new) - objective.total(p, cur)


def test_search_proves_optimum_when_one_submodel_covers_everything():
    # 3 hosts, 5 workloads: the LNS neighbourhood is the whole problem and CP-SAT proves it.
    p = consolidation_problem(m=3, per_host=2)
    r = search(p, work_budget=3_000_000, seed=0)
    assert r.status == "optimal"
    assert objective.total(p, r.assignment) == exhaustive_optimum(p)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_local_search_with_tolerance_ends_on_its_best_state(seed):
    # Record-to-record travel climbs on the way, but never returns a state worse than its start,
    # and the counters it ends with are the reference's.
    rng = np.random.default_rng(seed)
    p = feasible_start(make_problem(rng), rng)
    if p is None:
        return
    state = MoveState(p, p.initial, -1, seed)
    start = state.value
    state.local_search(5_000, 10.0, 50, False, max(1, start // 10))
    a = state.assignment
    assert state.value == objective.total(p, a) <= start
    assert objective.violations(p, a) == []


def test_search_reports_progress_with_a_falling_objective():
    p = consolidation_problem(m=20, seed=1)
    seen = []
    r = search(p, work_budget=1_500_000, seed=0, progress=lambda f, best: seen.append((f, best)))
    assert seen and all(0.0 <= f <= 1.0 for f, _ in seen)
    bests = [b for _, b in seen]
    assert bests == sorted(bests, reverse=True)  # each round ends no worse than the last
    assert bests[-1] == objective.total(p, r.assignment)


@pytest.mark.parametrize("problem", [
    Problem(capacity=[[10], [10]], request=np.zeros((0, 1)), initial=np.zeros(0, int)),
    Problem(capacity=[[10], [10]], request=[[3]], initial=[1], movable=[False], host_cost=[1, 1]),
], ids=["no workloads", "all pinned"])
def test_search_with_nothing_to_move_returns_the_start(problem):
    r = search(problem, time_limit_s=60)
    assert r.status == "unchanged"
    assert r.stats["work"] < 1000  # returns at once, not at the time limit
