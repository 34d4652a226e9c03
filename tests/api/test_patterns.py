"""Packing by patterns: the bound never exceeds the optimum, the packing never
overcommits, and the result is never worse than the seed it was given.

The optimum comes from an exact CP-SAT bin-packing model written here (one Boolean
per request and host), independent of the column generation under test;
feasibility is recomputed from the returned host rows.
"""
from __future__ import annotations

import numpy as np
import pytest
from ortools.sat.python import cp_model

from hci_scheduler import Cluster
from hci_scheduler.bounds import covering_bound
from hci_scheduler.errors import ValidationError
from hci_scheduler.patterns import pack_by_patterns


def _fewest_hosts(capacity: np.ndarray, requests: np.ndarray) -> int:
    """Exact optimum of a small instance (assignment model, proven optimal)."""
    model = cp_model.CpModel()
    n, m = len(requests), len(capacity)
    x = [[model.new_bool_var(f"x{i}_{h}") for h in range(m)] for i in range(n)]
    y = [model.new_bool_var(f"y{h}") for h in range(m)]
    for i in range(n):
        model.add_exactly_one(x[i])
    for h in range(m):
        for d in range(capacity.shape[1]):
            model.add(sum(int(requests[i, d]) * x[i][h] for i in range(n)) <= int(capacity[h, d]) * y[h])
    model.minimize(sum(y))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 2
    solver.parameters.max_time_in_seconds = 60
    assert solver.solve(model) == cp_model.OPTIMAL
    return int(solver.objective_value)


def _check_feasible(capacity, requests, hosts):
    assert hosts.shape == (len(requests),) and (hosts >= 0).all() and (hosts < len(capacity)).all()
    usage = np.zeros_like(capacity)
    np.add.at(usage, hosts, requests)
    assert (usage <= capacity).all(), "a host is overcommitted"
    return len(np.unique(hosts))


def test_bound_reaches_the_optimum_where_pooled_capacity_does_not():
    # Three (3, 3) requests on (5, 5) hosts: pooled capacity says 2 hosts, but no host
    # holds two of them, so 3 are needed; the patterns prove it.
    capacity = np.full((4, 2), 5, dtype=np.int64)
    requests = np.full((3, 2), 3, dtype=np.int64)
    assert covering_bound(capacity, requests.sum(axis=0)) == 2
    result = pack_by_patterns(capacity, requests, time_limit_s=20)
    assert result.converged
    assert result.bound == 3 == result.used
    assert _check_feasible(capacity, requests, result.hosts) == 3


@pytest.mark.parametrize("seed", range(4))
def test_random_mixed_shapes_bound_and_packing_bracket_the_optimum(seed):
    rng = np.random.default_rng(seed)
    capacity = np.concatenate([np.tile([10, 4], (3, 1)), np.tile([6, 12], (3, 1)),
                               np.tile([12, 12], (2, 1))]).astype(np.int64)
    requests = np.concatenate([rng.integers(1, 5, size=(10, 1)), rng.integers(1, 5, size=(10, 1))],
                              axis=1).astype(np.int64)
    optimum = _fewest_hosts(capacity, requests)
    result = pack_by_patterns(capacity, requests, time_limit_s=20)
    used = _check_feasible(capacity, requests, result.hosts)
    assert used == result.used
    assert result.bound <= optimum <= result.used
    assert result.converged and result.lp <= optimum + 1e-6
    # Converged on a small instance, the LP bound is tight enough to meet the packing.
    assert result.bound == optimum == result.used


def test_never_worse_than_the_seed_and_bound_stays_below_it():
    rng = np.random.default_rng(11)
    capacity = np.concatenate([np.tile([8, 8], (30, 1)), np.tile([16, 32], (10, 1))]).astype(np.int64)
    requests = rng.integers(1, 7, size=(80, 2)).astype(np.int64)
    seed = Cluster.from_arrays(capacity, dimensions=("cpu", "memory")).place_array(requests)
    seed_hosts = _check_feasible(capacity, requests, seed)
    result = pack_by_patterns(capacity, requests, [seed], time_limit_s=6)
    assert _check_feasible(capacity, requests, result.hosts) == result.used <= seed_hosts
    assert result.bound <= result.used
    assert result.bound >= covering_bound(capacity, requests.sum(axis=0))


@pytest.mark.parametrize("capacity, requests, seeds, message", [
    (np.ones((2, 2), dtype=np.int64), np.ones((2, 3), dtype=np.int64), (), "n_dims"),
    (np.ones((2, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.int64), (), "at least one row"),
    (np.ones((2, 2)), np.ones((2, 2), dtype=np.int64), (), "integers"),
    (np.ones((2, 2), dtype=np.int64), -np.ones((2, 2), dtype=np.int64), (), "integers >= 0"),
    (np.ones((2, 2), dtype=np.int64), np.full((2, 2), 2, dtype=np.int64), (), "fits no host"),
    (np.ones((2, 2), dtype=np.int64), np.ones((2, 2), dtype=np.int64), [np.array([0, 0])], "overcommits"),
    (np.ones((2, 2), dtype=np.int64), np.ones((2, 2), dtype=np.int64), [np.array([0])], "integer array"),
    (np.ones((2, 2), dtype=np.int64), np.ones((2, 2), dtype=np.int64), [np.array([0, 2])], "outside"),
])
def test_bad_input_is_a_validation_error(capacity, requests, seeds, message):
    with pytest.raises(ValidationError, match=message):
        pack_by_patterns(capacity, requests, seeds, time_limit_s=5)


def test_without_a_seed_patterns_that_share_a_host_are_found():
    # One host: the single-kind patterns need two, so only a mixed pattern covers both.
    result = pack_by_patterns(np.array([[10, 10]]), np.array([[6, 6], [4, 4]]), time_limit_s=5)
    assert result.converged and result.bound == 1 == result.used
    assert result.hosts.tolist() == [0, 0]


def test_requests_that_no_packing_holds_are_a_validation_error():
    # Each request fits the host alone, never both together.
    with pytest.raises(ValidationError, match="cannot hold the requests together"):
        pack_by_patterns(np.array([[10, 10]]), np.array([[6, 6], [6, 6]]), time_limit_s=5)


@pytest.mark.parametrize("limits, message", [
    ({"time_limit_s": 0}, "time_limit_s"),
    ({"time_limit_s": "5"}, "time_limit_s"),
    ({"integer_share": 1.0}, "integer_share"),
    ({"integer_share": -0.1}, "integer_share"),
])
def test_bad_limits_are_a_validation_error(limits, message):
    with pytest.raises(ValidationError, match=message):
        pack_by_patterns(np.ones((1, 2), dtype=np.int64), np.ones((1, 2), dtype=np.int64), **limits)
