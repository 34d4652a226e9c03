"""FitIndex and the placement kernels against the plain-numpy reference."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import sched_core
from sched_core._score import _py_alignment, _py_free_key, _py_imbalance
from tests import reference

STRATEGY_CODES = {"binpack": sched_core.BINPACK, "spread": sched_core.SPREAD,
                  "balanced": sched_core.BALANCED, "dot": sched_core.DOT}


def make_state(limit: np.ndarray) -> sched_core.HostState:
    inv_ref = 1.0 / np.maximum(limit.max(axis=0), 1)
    state = sched_core.HostState(len(limit), inv_ref)
    for h, row in enumerate(limit):
        state.set_limit(h, row)
        state.set_schedulable(h, True)
    return state


@pytest.mark.parametrize(
    "free,inv_ref,expected",
    [
        # 100*0.01 + 50*0.02 = 1 + 1 = 2
        ([100, 50], [0.01, 0.02], 2.0),
        # a skipped dimension (inv_ref 0) does not count: 7*0.5 = 3.5
        ([7, 1000], [0.5, 0.0], 3.5),
    ],
    ids=["two dims", "skipped dim"],
)
def test_free_key_formula(free, inv_ref, expected):
    assert _py_free_key(np.array(free, dtype=np.int64), np.array(inv_ref)) == pytest.approx(expected)


def test_imbalance_counts_only_requested_dims():
    # used+req: cpu 3000/4000 = 0.75, mem 5000/10000 = 0.5 -> mean 0.625, var 0.015625; ssd not requested
    v = _py_imbalance(np.array([2000, 4000, 0], dtype=np.int64), np.array([4000, 10000, 100], dtype=np.int64),
                      np.array([1000, 1000, 0], dtype=np.int64))
    assert v == pytest.approx(0.015625)


def test_alignment_formula():
    # (2*0.1)*(10*0.1) + (4*0.5)*(1*0.5) = 0.2 + 1.0
    assert _py_alignment(np.array([10, 1], dtype=np.int64), np.array([2, 4], dtype=np.int64),
                         np.array([0.1, 0.5])) == pytest.approx(1.2)


def test_binpack_prefers_tighter_host():
    # host0 free 8 cpu, host1 free 3 cpu: a 2-cpu request goes to the tighter host1
    state = make_state(np.array([[8, 8], [3, 8]], dtype=np.int64))
    assert sched_core.place_one(state, np.array([2, 1], dtype=np.int64), sched_core.BINPACK) == 1


def test_spread_prefers_emptier_host_and_lowest_row_on_ties():
    # three identical hosts: spread takes row 0, then the two untouched ones in row order
    state = make_state(np.array([[8, 8]] * 3, dtype=np.int64))
    picks = [sched_core.place_one(state, np.array([1, 1], dtype=np.int64), sched_core.SPREAD) for _ in range(3)]
    assert picks == [0, 1, 2]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_hosts=st.integers(1, 400),
    n_dims=st.integers(1, 6),
    strategy=st.sampled_from(sorted(STRATEGY_CODES)),
)
def test_kernels_match_reference_under_place_release_cordon(seed, n_hosts, n_dims, strategy):
    """Random interleaving of place, release and cordon: every choice equals the full-scan reference."""
    rng = np.random.default_rng(seed)
    limit = rng.integers(0, 60, size=(n_hosts, n_dims)).astype(np.int64)
    state = make_state(limit)
    inv_ref = state.inv_ref_array.copy()
    used = np.zeros_like(limit)
    load = np.zeros(n_hosts, dtype=np.int64)
    schedulable = np.ones(n_hosts, dtype=bool)
    placed = []
    for _ in range(300):
        op = rng.random()
        if op < 0.65:
            request = rng.integers(0, 25, size=n_dims).astype(np.int64)
            expected = reference.select(strategy, limit - used, used, limit, load, schedulable, request, inv_ref)
            got = sched_core.place_one(state, request, STRATEGY_CODES[strategy])
            assert got == expected
            if got >= 0:
                used[got] += request
                load[got] += 1
                placed.append((got, request))
        elif op < 0.9 and placed:
            h, request = placed.pop(int(rng.integers(len(placed))))
            state.release_row(h, request)
            used[h] -= request
            load[h] -= 1
        else:
            h = int(rng.integers(n_hosts))
            schedulable[h] = not schedulable[h]
            state.set_schedulable(h, bool(schedulable[h]))
        assert (used <= limit).all()
        if rng.random() < 0.05:
            state.index.check()
    state.index.check()
    np.testing.assert_array_equal(state.used_array, used)
    np.testing.assert_array_equal(state.free_array, limit - used)


def test_index_splits_and_merges_keep_invariants():
    """Thousands of hosts force block splits; emptying most of them forces merges."""
    rng = np.random.default_rng(7)
    n = 3000
    limit = rng.integers(1, 1000, size=(n, 3)).astype(np.int64)
    state = make_state(limit)
    state.index.check()
    order = state.index.rows_in_order()
    keys = reference.free_key(limit, state.inv_ref_array)
    assert order == sorted(range(n), key=lambda h: (keys[h], h))
    for h in rng.permutation(n)[: n - 50]:
        state.set_schedulable(int(h), False)
    state.index.check()
    assert state.index.n_members == 50


@pytest.mark.parametrize("n", [2, 95, 96, 97, 3000])
def test_bulk_load_equals_one_by_one_inserts(n):
    """add_rows into an empty index (bulk load) orders rows as n inserts would, keeps every
    invariant, and the index stays correct under later removes, inserts and set_reference."""
    rng = np.random.default_rng(n)
    limit = rng.integers(1, 50, size=(n, 3)).astype(np.int64)  # many equal keys: ties by row
    one_by_one = make_state(limit)
    bulk = sched_core.HostState(n, one_by_one.inv_ref_array.copy())
    for h, row in enumerate(limit):
        bulk.set_limit(h, row)
    rows = rng.permutation(n).astype(np.intp)
    bulk.set_schedulable_rows(np.concatenate([rows, rows[:3]]))  # duplicates are ignored
    bulk.index.check()
    assert bulk.index.rows_in_order() == one_by_one.index.rows_in_order()
    for h in rows[: n // 2]:
        bulk.set_schedulable(int(h), False)
    bulk.index.check()
    bulk.set_reference(np.array([0.5, 0.0, 1.0]) / 50, np.full(3, 50.0))
    bulk.index.check()
    assert bulk.index.n_members == n - n // 2


@pytest.mark.parametrize("n", [1, 96, 3000])
def test_load_subset_equals_bulk_load_of_the_same_rows(n):
    """load_subset copies the kept members in the source's order, as add_rows of those rows
    into an empty index would lay them out, and the copy stays correct under updates."""
    rng = np.random.default_rng(n)
    limit = rng.integers(1, 50, size=(n, 3)).astype(np.int64)  # many equal keys: ties by row
    state = make_state(limit)
    keep = (rng.random(n) < 0.6).astype(np.uint8)
    keep[0] = 1
    sub = sched_core.FitIndex(state.free_array, state.inv_ref_array)
    sub.load_subset(state.index, keep)
    bulk = sched_core.FitIndex(state.free_array, state.inv_ref_array)
    bulk.add_rows(np.flatnonzero(keep).astype(np.intp))
    sub.check()
    assert sub.rows_in_order() == bulk.rows_in_order()
    for h in np.flatnonzero(keep)[::2]:
        sub.discard(int(h))
    sub.add(int(np.flatnonzero(keep)[0]))
    sub.check()
    with pytest.raises(ValueError):
        sub.load_subset(state.index, keep)  # not empty


def test_place_rows_matches_place_one_sequence():
    rng = np.random.default_rng(3)
    limit = rng.integers(10, 100, size=(300, 4)).astype(np.int64)
    requests = rng.integers(0, 30, size=(2000, 4)).astype(np.int64)
    a, b = make_state(limit), make_state(limit)
    out = np.full(len(requests), -2, dtype=np.int64)
    n_placed = sched_core.place_rows(a, requests, np.arange(len(requests), dtype=np.intp), sched_core.BINPACK, out)
    one = [sched_core.place_one(b, r, sched_core.BINPACK) for r in requests]
    np.testing.assert_array_equal(out, one)
    assert n_placed == int((out >= 0).sum())
    np.testing.assert_array_equal(reference.usage_from_assignments(300, 4, out, requests), a.used_array)


def test_filter_hosts_reports_first_failing_reason():
    free = np.array([[5, 5], [1, 5], [5, 1], [0, 0]], dtype=np.int64)
    schedulable = np.array([1, 1, 1, 0], dtype=np.uint8)
    reasons = np.zeros(4, dtype=np.int32)
    n = sched_core.filter_hosts(free, np.array([2, 2], dtype=np.int64), schedulable, reasons)
    # row0 fits; row1 lacks dim 0; row2 lacks dim 1; row3 is not schedulable
    assert n == 1
    assert reasons.tolist() == [0, sched_core.REASON_DIM, sched_core.REASON_DIM + 1, sched_core.REASON_NOT_SCHEDULABLE]


def test_grown_state_keeps_rows_and_index():
    state = make_state(np.array([[10, 10], [5, 5]], dtype=np.int64))
    state.commit_row(0, np.array([3, 3], dtype=np.int64))
    bigger = state.grown(200)
    assert bigger.n_rows == 200
    np.testing.assert_array_equal(bigger.used_array[:2], [[3, 3], [0, 0]])
    bigger.index.check()
    assert bigger.index.n_members == 2


def test_debug_build_is_the_one_loaded():
    """CI sets SCHED_CORE_DEBUG_DIR when it runs these tests on the bounds-checked build."""
    import os

    debug_dir = os.environ.get("SCHED_CORE_DEBUG_DIR")
    if not debug_dir:
        pytest.skip("not the debug-build run (SCHED_CORE_DEBUG_DIR unset)")
    assert sched_core.__file__.startswith(debug_dir), sched_core.__file__
