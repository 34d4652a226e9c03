"""covering_bound / cover_by_shape / volume_bound: hand-computed cases and a brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hci_scheduler.bounds import cover_by_shape, covering_bound, volume_bound
from hci_scheduler.errors import ValidationError


def _hosts(*rows_and_counts):
    return np.array([row for row, n in rows_and_counts for _ in range(n)], dtype=np.int64)


@pytest.mark.parametrize("capacity, demand, cost, expected", [
    # cpu-rich (8, 2) x3 and memory-rich (2, 8) x3, demand (10, 10):
    # one of each gives (10, 10) -> 2 hosts; no single host covers 10 in a dimension.
    (_hosts(((8, 2), 3), ((2, 8), 3)), (10, 10), None, 2),
    # Same hosts, demand (16, 4): two cpu-rich give (16, 4) -> 2.
    (_hosts(((8, 2), 3), ((2, 8), 3)), (16, 4), None, 2),
    # Big (10, 10) x1 and small (4, 4) x5, demand (18, 18): big + 2 small = (18, 18) -> 3;
    # without the big one it would take 5 small (20 >= 18).
    (_hosts(((10, 10), 1), ((4, 4), 5)), (18, 18), None, 3),
    # Availability binds: one big (10, 10), small (4, 4) x5, demand (30, 4): big + 5 small
    # = (30, 30) -> 6 hosts; 10 + 4k >= 30 needs k = 5.
    (_hosts(((10, 10), 1), ((4, 4), 5)), (30, 4), None, 6),
    # Cost: big (10, 10) costs 7, small (4, 4) costs 2, demand (12, 12):
    # big + 1 small = 9; 3 small = 6 (12, 12) -> 6; big alone does not cover.
    (_hosts(((10, 10), 2), ((4, 4), 5)), (12, 12), np.array([7, 7, 2, 2, 2, 2, 2]), 6),
    # Nothing asked: 0 hosts.
    (_hosts(((4, 4), 2)), (0, 0), None, 0),
], ids=["mixed-shapes", "one-shape", "big-plus-small", "availability", "cost", "empty-demand"])
def test_covering_bound_hand_computed(capacity, demand, cost, expected):
    assert covering_bound(capacity, np.array(demand, dtype=np.int64), cost) == expected


def test_covering_bound_refuses_demand_beyond_all_hosts():
    # Two hosts (4, 4): 8 memory in total, 9 asked.
    with pytest.raises(ValidationError, match="dimension 1"):
        covering_bound(_hosts(((4, 4), 2)), np.array([1, 9]))


@pytest.mark.parametrize("capacity, demand, cost", [
    (np.array([4, 4]), np.array([1, 1]), None),
    (np.array([[4, 4]], dtype=np.float64), np.array([1, 1]), None),
    (np.array([[4, 4]]), np.array([1, 1, 1]), None),
    (np.array([[4, -1]]), np.array([1, 1]), None),
    (np.array([[4, 4]]), np.array([1, 1]), np.array([1, 2])),
], ids=["1-D capacity", "float", "dims disagree", "negative", "cost length"])
def test_covering_bound_rejects_malformed_input(capacity, demand, cost):
    with pytest.raises(ValidationError):
        covering_bound(capacity, demand, cost)


def test_cover_by_shape_counts_cover_and_respect_availability():
    capacity = _hosts(((8, 2), 3), ((2, 8), 3), ((5, 5), 1))
    demand = np.array([20, 14])
    cover = cover_by_shape(capacity, demand, prefer_room=True)
    assert cover.optimal
    available = np.bincount(cover.shape_of, minlength=len(cover.shapes))
    assert (cover.counts <= available).all()
    assert (cover.counts @ cover.shapes >= demand).all()
    assert cover.counts.sum() == cover.bound


def test_volume_bound_identical_hosts():
    # ceil(25 / 10) = 3 cpu, ceil(7 / 8) = 1 memory -> 3
    assert volume_bound(np.array([10, 8]), np.array([25, 7])) == 3
    with pytest.raises(ValidationError):
        volume_bound(np.array([10, 0]), np.array([5, 1]))


def _brute_force(capacity, demand, cost):
    best = None
    for mask in itertools.product((0, 1), repeat=len(capacity)):
        chosen = np.array(mask, dtype=bool)
        if (capacity[chosen].sum(axis=0) >= demand).all():
            value = int(cost[chosen].sum()) if cost is not None else int(chosen.sum())
            best = value if best is None else min(best, value)
    return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_covering_bound_matches_brute_force(data):
    n_hosts = data.draw(st.integers(1, 7))
    n_dims = data.draw(st.integers(1, 3))
    shapes = data.draw(st.lists(st.lists(st.integers(0, 6), min_size=n_dims, max_size=n_dims),
                                min_size=1, max_size=3))
    capacity = np.array([shapes[data.draw(st.integers(0, len(shapes) - 1))] for _ in range(n_hosts)],
                        dtype=np.int64)
    demand = np.array(data.draw(st.lists(st.integers(0, 15), min_size=n_dims, max_size=n_dims)), dtype=np.int64)
    cost = None
    if data.draw(st.booleans()):
        cost = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n_hosts, max_size=n_hosts)), dtype=np.int64)
    expected = _brute_force(capacity, demand, cost)
    if expected is None:
        with pytest.raises(ValidationError):
            covering_bound(capacity, demand, cost)
    else:
        assert covering_bound(capacity, demand, cost) == expected
