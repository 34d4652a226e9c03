import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hci_scheduler.bench import peers
from hci_scheduler.errors import ValidationError
from hci_scheduler.improve import _BinEmptier, improve_assignment


def _load(n_hosts, requests, assignment):
    """Usage per host recomputed from scratch (independent of the improver)."""
    used = np.zeros((n_hosts, requests.shape[1]), dtype=np.int64)
    for row, host in enumerate(assignment):
        if host >= 0:
            used[host] += requests[row]
    return used


def _check(free, requests, greedy, better):
    assert better.dtype == np.int64 and better.shape == greedy.shape
    assert (_load(len(free), requests, better) <= free).all(), "overcommits a host"
    assert np.array_equal(better >= 0, greedy >= 0), "placed rows changed"
    used_before = set(greedy[greedy >= 0].tolist())
    assert set(better[better >= 0].tolist()) <= used_before, "opened a host the greedy did not use"


def _triplet_case():
    # 1-D capacity 10: sizes 4,4,3,3,3,3 (optimum 2). Best fit in this order opens 3 hosts.
    req = np.array([[4], [4], [3], [3], [3], [3]], dtype=np.int64)
    free = np.full((6, 1), 10, dtype=np.int64)
    greedy = peers.numpy_best_fit(free, req)
    return free, req, greedy


def test_improve_reaches_optimum_on_small_case():
    free, req, greedy = _triplet_case()
    assert peers.hosts_used(greedy) == 3
    better = improve_assignment(free, req, greedy, 0.2)
    _check(free, req, greedy, better)
    assert peers.hosts_used(better) == 2


def test_improve_zero_budget_is_identity():
    free, req, greedy = _triplet_case()
    out = improve_assignment(free, req, greedy, 0)
    assert np.array_equal(out, greedy) and out is not greedy


def test_improve_is_deterministic():
    rng = np.random.default_rng(7)
    req = rng.integers(5, 60, size=(80, 3)).astype(np.int64)
    free = np.full((80, 3), 100, dtype=np.int64)
    greedy = peers.numpy_best_fit(free, req)
    a = improve_assignment(free, req, greedy, 0.2, seed=1)
    b = improve_assignment(free, req, greedy, 0.2, seed=1)
    assert np.array_equal(a, b)
    _check(free, req, greedy, a)


def test_improve_keeps_unplaced_rows_unplaced():
    free = np.array([[10, 10], [10, 10]], dtype=np.int64)
    req = np.array([[6, 6], [6, 6], [6, 6], [3, 3]], dtype=np.int64)
    greedy = peers.numpy_best_fit(free, req)  # third row does not fit anywhere
    assert greedy[2] == -1
    out = improve_assignment(free, req, greedy, 0.1)
    _check(free, req, greedy, out)
    assert out[2] == -1


def test_improve_never_uses_unused_hosts():
    # hosts 2 and 3 are empty and larger; the improver must stay on the greedy's hosts
    free = np.array([[10], [10], [100], [100]], dtype=np.int64)
    req = np.array([[6], [6], [4], [4]], dtype=np.int64)
    greedy = np.array([0, 1, 0, 1], dtype=np.int64)
    out = improve_assignment(free, req, greedy, 0.1)
    _check(free, req, greedy, out)


@pytest.mark.parametrize("bad", [
    dict(free=np.zeros((2, 2), dtype=np.int32)),
    dict(requests=np.zeros((3, 3), dtype=np.int64)),
    dict(assignment=np.array([0, 5, 0], dtype=np.int64)),
    dict(assignment=np.array([0, -2, 0], dtype=np.int64)),
    dict(requests=-np.ones((3, 2), dtype=np.int64)),
    dict(budget_s=-1.0),
    dict(budget_s=float("nan")),
    dict(assignment=np.array([0, 0, 0], dtype=np.int64)),  # overcommits host 0
])
def test_improve_rejects_bad_input(bad):
    args = dict(free=np.full((2, 2), 10, dtype=np.int64),
                requests=np.full((3, 2), 4, dtype=np.int64),
                assignment=np.array([0, 1, 1], dtype=np.int64), budget_s=0.1)
    args.update(bad)
    with pytest.raises(ValidationError):
        improve_assignment(args["free"], args["requests"], args["assignment"], args["budget_s"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 40), st.integers(0, 2**31 - 1), st.booleans())
def test_improve_property_feasible_and_never_worse(n_dims, n_items, seed, hetero):
    rng = np.random.default_rng(seed)
    cap = rng.integers(20, 100, size=n_dims)
    free = np.repeat(cap[None, :], n_items, axis=0).astype(np.int64)
    if hetero:
        free = (free * rng.uniform(0.5, 1.5, size=(n_items, 1))).astype(np.int64)
        free[rng.random(n_items) < 0.2] = 0  # unusable hosts
    req = (rng.random((n_items, n_dims)) * cap * rng.uniform(0.1, 0.7)).astype(np.int64)
    greedy = peers.numpy_best_fit(free, req)
    out = improve_assignment(free, req, greedy, 0.05, seed=seed % 3)
    _check(free, req, greedy, out)
    assert peers.hosts_used(out) <= peers.hosts_used(greedy)


def test_improve_beats_greedy_on_shared_instances(shared_data):
    from hci_scheduler import datasets

    gained = 0
    for name in ("New/class1_60_5_0", "Triplet/classF_60_3_0", "Panigrahy/class9_40_5_0"):
        inst = datasets.load_vbp(name)
        free = np.repeat(inst.capacity[None, :], inst.n_items, axis=0)
        greedy = peers.numpy_best_fit(free, inst.items, order="largest_first")
        out = improve_assignment(free, inst.items, greedy, 0.5)
        _check(free, inst.items, greedy, out)
        assert peers.hosts_used(out) >= inst.optimum
        gained += peers.hosts_used(greedy) - peers.hosts_used(out)
    assert gained > 0


def _brute_force_maximal_sets(sizes, cap):
    """Every maximal subset of rows of `sizes` that fits `cap`, by enumeration."""
    n = len(sizes)
    fitting = [frozenset(c) for k in range(1, n + 1) for c in itertools.combinations(range(n), k)
               if (sizes[list(c)].sum(axis=0) <= cap).all()]
    fitting_set = set(fitting)
    return {s for s in fitting if not any(s | {i} in fitting_set for i in range(n) if i not in s)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_maximal_sets_match_brute_force(seed):
    # 9 items of 2 dims, sizes 5..60 of a capacity of 100: 1 to 5 items per bin.
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 60, size=(9, 2)).astype(np.int64)
    cap = np.array([100, 100], dtype=np.int64)
    search = _BinEmptier(np.repeat(cap[None, :], 9, axis=0), sizes, np.arange(9, dtype=np.int64),
                         work_budget=10**9, wall_deadline=math.inf, seed=0)
    levels = search._maximal_sets(cap)
    got = {frozenset(row.tolist()) for level in levels for row in level}
    assert got == _brute_force_maximal_sets(sizes, cap)


def test_improve_closes_small_instance_by_set_cover(shared_data):
    # New/class3_40_10_2: 40 items in 10 dimensions, optimum 16. The bin
    # emptying search alone stops at 18; the set-cover stage proves 16.
    from hci_scheduler import datasets

    inst = datasets.load_vbp("New/class3_40_10_2")
    free = np.repeat(inst.capacity[None, :], inst.n_items, axis=0)
    greedy = peers.numpy_best_fit(free, inst.items, order="largest_first")
    out = improve_assignment(free, inst.items, greedy, 1.0)
    _check(free, inst.items, greedy, out)
    assert peers.hosts_used(out) == inst.optimum == 16


def test_maximal_sets_gives_up_on_many_small_items():
    # 300 items of size 1 on hosts of 100: C(300, 2) = 44,850 pairs already
    # exceed COVER_MAX_SETS, so the listing stops (None) after one level.
    sizes = np.ones((300, 1), dtype=np.int64)
    cap = np.array([100], dtype=np.int64)
    search = _BinEmptier(np.repeat(cap[None, :], 3, axis=0), sizes,
                         np.repeat(np.arange(3, dtype=np.int64), 100),
                         work_budget=10**9, wall_deadline=math.inf, seed=0)
    assert search._maximal_sets(cap) is None
