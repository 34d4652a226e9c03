"""The priced local search (sched_core._priced) on ROADEF problems: its deltas against a
full recomputation by the benchmark's independent checker, the transient room it prices,
and the return-home move, which charges no transient room."""
from __future__ import annotations

import numpy as np
import pytest
from hci_scheduler.bench import roadef
from sched_core._moves import MoveState
from sched_core._priced import held_load, home_sweep, priced_search, priced_shift, priced_swap

from hci_scheduler.rebalance import objective
from hci_scheduler.rebalance.problem import Problem
from hci_scheduler.rebalance.search import search

from ..bench.test_roadef import TINY_INITIAL, TINY_MODEL


@pytest.fixture
def tiny():
    inst = roadef.parse_model(TINY_MODEL)
    init = roadef.parse_assignment(TINY_INITIAL, inst)
    return inst, init, roadef.to_problem(inst, init)


def held_by_hand(inst, init, assignment) -> np.ndarray:
    """Transient load held on initial machines, per resource, from the assignment alone."""
    moved = init != assignment
    return (inst.requirement[moved] * inst.transient[None, :]).sum(axis=0)


def test_priced_deltas_equal_full_recomputation_on_random_moves(tiny):
    inst, init, p = tiny
    rng = np.random.default_rng(7)
    price = np.array([3.0, 5.0])          # resource 1 (mem) is the transient one
    state = MoveState(p, init, -1, 0)
    checked = 0
    for _ in range(400):
        cur = state.assignment
        before = roadef.check(inst, init, cur)
        if rng.random() < 0.5:
            w, b = int(rng.integers(inst.n_processes)), int(rng.integers(inst.n_machines))
            ok, delta, pen = priced_shift(state, w, b, price)
            after = cur.copy()
            after[w] = b
        else:
            w, w2 = (int(v) for v in rng.choice(inst.n_processes, 2, replace=False))
            ok, delta, pen = priced_swap(state, w, w2, price)
            after = cur.copy()
            after[w], after[w2] = cur[w2], cur[w]
        if (after == cur).all():
            continue
        judged = roadef.check(inst, init, after)
        assert ok == judged.valid, (cur, after, judged.violations)
        if ok:
            checked += 1
            assert delta == judged.total - before.total
            held_change = held_by_hand(inst, init, after) - held_by_hand(inst, init, cur)
            assert pen == pytest.approx(float(price @ held_change))
            if rng.random() < 0.5:  # walk on, so moves are judged from many states
                for v in np.flatnonzero(after != cur):
                    state.apply(int(v), int(after[v]))
                assert state.value == roadef.check(inst, init, state.assignment).total
    assert checked > 50


def test_priced_search_keeps_the_state_exact_and_feasible():
    rng = np.random.default_rng(3)
    for seed in range(5):
        m, n, d = 8, 30, 3
        cap = rng.integers(60, 100, (m, d))
        initial = np.arange(n) % m
        p = Problem(capacity=cap, request=rng.integers(1, 12, (n, d)), initial=initial,
                    target=cap * 6 // 10, service=rng.integers(0, 10, n), conflict=np.ones(10, bool),
                    move_cost=rng.integers(1, 5, n), load_weight=np.array([10, 10, 10]),
                    transient=np.array([True, False, True]), process_move_weight=1,
                    service_move_weight=5, machine_move_weight=1,
                    move_cost_matrix=rng.integers(0, 5, (m, m)) * (1 - np.eye(m, dtype=int)))
        if objective.violations(p, p.initial):
            continue
        state = MoveState(p, p.initial, -1, seed)
        for level, away in ((4.0, 0), (1.0, 100), (0.0, 50)):
            start = state.value
            evaluated, _, gain = priced_search(state, 20_000, 10.0, level * p.load_weight, 40, 10,
                                               True, away)
            assert evaluated == 20_000
            assert gain == start - state.value
            assert state.value == objective.total(p, state.assignment)
            assert objective.violations(p, state.assignment) == []
            # held load recomputed from the assignment, not from the state's counters
            moved = state.assignment != p.initial
            assert (held_load(state) == (p.request[moved] * p.transient).sum(axis=0)).all()
        # with no price the search only descends
        assert state.value <= objective.total(p, p.initial)


def two_machines(transient: bool) -> Problem:
    """Two machines, one resource at 10 each, safety 5. Machine 0 runs a (4) and b (4):
    load 3 above safety costs 30; moving b to machine 1 saves 30 and pays 1."""
    return Problem(capacity=[[10], [10]], request=[[4], [4]], initial=[0, 0], target=[[5], [5]],
                   move_cost=[1, 1], load_weight=[10], transient=[transient], process_move_weight=1)


def test_price_blocks_a_move_worth_less_than_the_room_it_holds():
    p = two_machines(transient=True)
    # b holds 4 units on machine 0 if it leaves: at 10 per unit that is 40 > the gain 29.
    state = MoveState(p, p.initial, -1, 0)
    ok, delta, pen = priced_shift(state, 1, 1, [10.0])
    assert (ok, delta, pen) == (True, -29, 40.0)
    priced_search(state, 5_000, 10.0, [10.0], 0, 0, True)
    assert state.assignment.tolist() == [0, 0]
    # at 5 per unit (20 < 29) it moves, and so it does with no price
    priced_search(state, 5_000, 10.0, [5.0], 0, 0, True)
    assert sorted(state.assignment.tolist()) == [0, 1]
    # a resource that is not transient is never priced
    p = two_machines(transient=False)
    state = MoveState(p, p.initial, -1, 0)
    assert priced_shift(state, 1, 1, [10.0])[2] == 0.0


def test_return_home_charges_no_transient_room():
    # Machine 0 (capacity 10) ran a (6); a moved to machine 1, and c (4) took the rest of
    # machine 0, so machine 0 is exactly full counting the 6 a still holds there.
    p = Problem(capacity=[[10], [10], [10]], request=[[6], [4], [4]], initial=[0, 2, 2],
                target=[[10], [10], [10]], move_cost=[1, 1, 1], load_weight=[1],
                transient=[True], process_move_weight=1)
    state = MoveState(p, np.array([1, 0, 2]), -1, 0)
    use, hold = state.usage()
    assert use[0, 0] + hold[0, 0] == 10
    # Home again: allowed although machine 0 has no room left for a newcomer of 6.
    ok, delta, pen = priced_shift(state, 0, 0, [2.0])
    assert ok and delta == -1 and pen == -12.0
    # A newcomer of 4 (c, at home on machine 2) does not fit there.
    assert priced_shift(state, 2, 0, [0.0])[0] is False
    # The sweep sends a home, then b (machine 2 has room for it once it is back).
    assert home_sweep(state, True) == (2, 2)
    assert state.assignment.tolist() == [0, 2, 2]
    assert roadef_like_check(p, state.assignment)
    assert state.usage()[1].sum() == 0


def roadef_like_check(p: Problem, assignment) -> bool:
    """Capacity with transient holds, recomputed from the assignment alone."""
    use = np.zeros_like(p.capacity)
    np.add.at(use, assignment, p.request)
    moved = assignment != p.initial
    held = np.zeros_like(p.capacity)
    np.add.at(held, p.initial[moved], p.request[moved] * p.transient)
    return bool((use + held <= p.capacity).all())


def test_search_on_a_transient_problem_returns_moves_whose_gain_is_gone(tiny):
    inst, init, p = tiny
    result = search(p, time_limit_s=5.0, work_budget=200_000, seed=1)
    judged = roadef.check(inst, init, result.assignment)
    assert judged.valid
    # No moved process could go home without raising the objective.
    state = MoveState(p, result.assignment, -1, 0)
    for w in np.flatnonzero(result.assignment != init):
        ok, delta, _ = priced_shift(state, int(w), int(init[w]), [0.0, 0.0])
        assert not ok or delta > 0


def test_lns_share_follows_gain_per_unit_within_bounds():
    from hci_scheduler.rebalance import search as engine

    assert engine._lns_share(1.0, 1.0) == pytest.approx(0.5)
    assert engine._lns_share(3.0, 1.0) == pytest.approx(0.25)
    assert engine._lns_share(1.0, 0.0) == engine.LNS_SHARE_MIN      # LNS gained nothing: it keeps a turn
    assert engine._lns_share(0.0, 5.0) == engine.LNS_SHARE_MAX      # nor does the local search lose its own
    assert engine._lns_share(-2.0, -1.0) == engine.LNS_SHARE       # neither gains: the starting share


def test_price_falls_in_cycles_to_zero_by_its_share_of_the_search():
    from hci_scheduler.rebalance import search as engine

    share, cycles = engine.PRICE_SHARE, engine.PRICE_CYCLES
    levels = [engine._price_level(i / 1000) for i in range(1001)]
    assert levels[0] == engine.PRICE_START
    assert all(v == 0.0 for i, v in enumerate(levels) if i / 1000 >= share)
    assert all(v >= 0.0 for v in levels)
    rises = [i for i in range(1, 1001) if levels[i] > levels[i - 1]]
    assert len(rises) == cycles - 1                       # it climbs once per new cycle...
    for i in rises:                                       # ...to a lower start than the last
        assert levels[i] < engine.PRICE_START
