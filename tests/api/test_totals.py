"""Cluster totals never overflow int64 (issue 13, item 13).

A host holds at most 2**46 - 1 per dimension, 64x that as a limit at the largest
allocation ratio; the cluster refuses a host that would bring a dimension's total past
2**63 - 1, so every sum over hosts (usage, allocatable, utilization, batch order) is
exact in int64. Expected totals below are computed with Python ints.
"""
import numpy as np
import pytest

from hci_scheduler import Cluster, Host, ValidationError, Workload

Q = 2**46 - 1          # the largest quantity a host or request may hold
INT64_MAX = 2**63 - 1


def big_host(i, ratio=1.0, cpu=Q):
    return Host(f"h{i}", {"cpu": cpu, "memory": 1}, allocation_ratio={"cpu": ratio})


def exact_used(c: Cluster) -> list[int]:
    return [sum(int(v) for v in col) for col in c.usage().T]


def test_issue_figures_2100_hosts_report_exact_totals():
    # 2,100 hosts of 2**46 - 1 millicores: 2,100 x (2**46 - 1) = 147,774,362,773,092,300.
    c = Cluster(dimensions=("cpu", "memory"))
    c.add_hosts([big_host(i) for i in range(2100)])
    assert c.utilization() == {"cpu": 0.0, "memory": 0.0}
    rows = c.place_array(np.array([[Q, 0]] * 2100))
    assert (rows >= 0).all()
    assert exact_used(c) == [2100 * Q, 0] == c.usage().sum(axis=0).tolist()
    assert c.utilization()["cpu"] == 1.0


def test_issue_figures_at_64x_overcommit_are_refused_whole():
    # The issue's cluster: 2,100 hosts of 2**46 - 1 millicores at a 64x ratio total
    # 2,100 x 64 x (2**46 - 1) = 9,457,559,217,477,907,200 > 2**63 - 1, so 134,400
    # placements drove used.cpu negative. The 2,049th host is the first past the bound:
    # 2,048 x 64 x (2**46 - 1) = 2**63 - 2**17.
    c = Cluster(dimensions=("cpu", "memory"))
    with pytest.raises(ValidationError, match=r"host h2048 .*total cpu .*2\*\*63 - 1"):
        c.add_hosts([big_host(i, ratio=64) for i in range(2100)])
    assert c.n_hosts == 0  # all or nothing


def test_largest_accepted_cluster_sums_without_overflow():
    c = Cluster(dimensions=("cpu", "memory"))
    c.add_hosts([big_host(i, ratio=64) for i in range(2048)])
    room = INT64_MAX - 2048 * 64 * Q                       # 131,071 millicores left
    assert room == 2**17 - 1
    with pytest.raises(ValidationError, match="host last"):
        c.add_host(Host("last", {"cpu": room + 1, "memory": 1}))
    c.add_host(Host("last", {"cpu": room, "memory": 1}))   # exactly 2**63 - 1 in total
    # Fill every host to its limit: 64 workloads of 2**46 - 1 per big host, and the last host.
    rows = c.place_array(np.array([[Q, 0]] * (2048 * 64) + [[room, 0]]), order="largest_first")
    assert (rows >= 0).all()
    assert exact_used(c)[0] == INT64_MAX
    assert c.usage().sum(axis=0).tolist()[0] == INT64_MAX       # int64 sums do not wrap
    assert c.limits().sum(axis=0).tolist()[0] == INT64_MAX
    alloc = 2048 * Q + room
    assert c.utilization()["cpu"] == INT64_MAX / alloc > 0
    # A named batch ordered by dominant share (a sum over hosts' limits) still places.
    c.release_array(np.arange(64))
    placed = c.place_batch([Workload(f"w{i}", {"cpu": Q}) for i in range(64)], order="largest_first")
    assert len(placed.placements) == 64
    assert exact_used(c)[0] == INT64_MAX


def test_removing_a_host_makes_room_in_the_bound():
    c = Cluster(dimensions=("cpu", "memory"))
    c.add_hosts([big_host(i, ratio=64) for i in range(2048)])
    with pytest.raises(ValidationError):
        c.add_host(big_host("x", ratio=64))
    c.remove_host("h0")
    c.add_host(big_host("x", ratio=64))
    assert c.n_hosts == 2048
