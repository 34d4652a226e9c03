"""Consolidation from a packing by patterns (rebalance/patterned.py): fewer hosts than its
seed, feasible by an independent recount, laid out so that what can stay stays, and
declined where the problem has a constraint the patterns do not model."""
from __future__ import annotations

import numpy as np
import pytest

from hci_scheduler import Cluster
from hci_scheduler.model import Host, Workload
from hci_scheduler.rebalance import objective
from hci_scheduler.rebalance.patterned import pattern_start
from hci_scheduler.rebalance.problem import Problem
from hci_scheduler.rebalance.validate import replay_plan


def _usage(problem: Problem, assignment: np.ndarray) -> np.ndarray:
    usage = problem.fixed.copy()
    np.add.at(usage, assignment, problem.request)
    return usage


def _four_singles(**extra) -> Problem:
    # Four (10, 10) hosts, one workload each: (6, 6) on hosts 0 and 1, (4, 4) on 2 and 3.
    # Two hosts hold them all ((6, 6) + (4, 4) each), and only two moves get there.
    return Problem(capacity=np.full((4, 2), 10), request=[[6, 6], [6, 6], [4, 4], [4, 4]],
                   initial=[0, 1, 2, 3], **extra)


def test_packs_fewer_hosts_and_keeps_what_can_stay():
    problem = _four_singles()
    assignment = pattern_start(problem, np.zeros(4, dtype=bool), None, 10.0)
    assert assignment is not None
    assert (_usage(problem, assignment) <= problem.capacity).all()
    assert len(np.unique(assignment)) == 2
    assert int((assignment != problem.initial).sum()) == 2
    assert assignment[0] == 0 and assignment[1] == 1     # the (6, 6) ones stay home
    assert objective.violations(problem, assignment) == []


def test_no_better_packing_than_the_seed_gives_none():
    problem = _four_singles()
    seed = np.array([0, 1, 0, 1], dtype=np.int32)
    assert pattern_start(problem, np.zeros(4, dtype=bool), seed, 10.0) is None


@pytest.mark.parametrize("extra, fixed_use", [
    ({"movable": [True, True, True, False]}, None),
    ({"service": [0, 0, 0, 0], "conflict": [True]}, None),
    ({"service": [0, 0, 0, 0], "spread_min": [2]}, None),
    ({"tenant": [0, -1, -1, -1], "dedicated": [True]}, None),
    ({"host_cost": [1, 1, 3, 3]}, None),
    ({"open": [True, True, True, False]}, None),                 # a workload sits on a closed host
    ({"allowed": [[True] * 4, [True, True, False, True]], "allowed_class": [0, 0, 1, 0]}, None),
    ({}, [False, False, False, True]),                            # a host that must stay in use
    ({"vm": [True] * 4, "ratio_milli": np.full((4, 2), 1500)}, None),
])
def test_declines_what_the_patterns_do_not_model(extra, fixed_use):
    problem = _four_singles(**extra)
    fixed_use = np.zeros(4, dtype=bool) if fixed_use is None else np.array(fixed_use)
    assert pattern_start(problem, fixed_use, None, 10.0) is None


def test_consolidation_plan_from_patterns_replays_clean():
    # Through the public API: the plan may start from the patterns (its search statistics
    # say which start won); either way it reaches the 2 hosts the patterns prove and
    # replays with no violation.
    cluster = Cluster(("cpu", "memory"))
    cluster.add_hosts([Host(f"h{i}", {"cpu": 10, "memory": 10}) for i in range(4)])
    sizes = [6, 6, 4, 4]
    for i, size in enumerate(sizes):
        cluster.bind(Workload(f"w{i}", {"cpu": size, "memory": size}), f"h{i}")
    plan = cluster.rebalance("consolidate", time_limit_s=5.0)
    assert plan.hosts_used_after == 2 and len(plan.moves) == 2
    assert plan.search["method"].split(" + ")[0] in ("keep-set", "patterns")
    assert replay_plan(cluster, plan) == []


def test_consolidation_starts_from_patterns_where_the_keep_set_stops_short():
    # Mixed shapes (10, 6), (6, 10) and (12, 12); 14 workloads on 9 hosts. The keep-set
    # construction alone leaves them on 6 hosts; the patterns prove 5 and pack at 5, so
    # the plan starts from them, and reaches 5 with every step checked by the replay.
    capacity = [[10, 6]] * 4 + [[6, 10]] * 4 + [[12, 12]] * 2
    requests = [[1, 3], [5, 3], [6, 2], [3, 2], [2, 6], [4, 3], [2, 5], [4, 5], [3, 1], [1, 3], [6, 3],
                [5, 1], [2, 2], [4, 2]]
    initial = [3, 8, 2, 5, 7, 1, 4, 0, 1, 5, 9, 3, 5, 2]
    cluster = Cluster(("cpu", "memory"))
    cluster.add_hosts([Host(f"h{i}", {"cpu": a, "memory": b}) for i, (a, b) in enumerate(capacity)])
    for i, ((cpu, memory), host) in enumerate(zip(requests, initial)):
        cluster.bind(Workload(f"w{i}", {"cpu": cpu, "memory": memory}), f"h{host}")
    plan = cluster.rebalance("consolidate", time_limit_s=5.0)
    assert plan.search["method"].startswith("patterns")
    assert (plan.hosts_used_before, plan.hosts_used_after) == (9, 5)
    assert replay_plan(cluster, plan) == []
    cluster.apply(plan)
    usage = {}
    for wid, hid in cluster.assignments().items():
        w = cluster.workload(wid)
        usage[hid] = [u + w.requests[d] for u, d in zip(usage.get(hid, [0, 0]), ("cpu", "memory"))]
    limits = dict(zip((f"h{i}" for i in range(len(capacity))), capacity))
    assert len(usage) == 5 and all(u[0] <= limits[h][0] and u[1] <= limits[h][1] for h, u in usage.items())
