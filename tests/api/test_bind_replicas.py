"""Cluster.bind_replicas: a per-host service rebuilt on exactly the recorded hosts."""
import numpy as np
import pytest

from hci_scheduler.cluster import Cluster
from hci_scheduler.errors import DuplicateId, Unschedulable, ValidationError
from hci_scheduler.model import Host, Workload


def make_cluster(n_hosts: int = 4) -> Cluster:
    c = Cluster()
    c.add_hosts([Host(id=f"h{j}", capacity={"cpu": 4000, "memory": 8192, "ssd": 100}) for j in range(n_hosts)])
    return c


def test_bind_replicas_matches_place():
    # h2 runs a 2000m workload, so the 3000m service fits on h0, h1, h3 only.
    placed, rebuilt = make_cluster(), make_cluster()
    for c in (placed, rebuilt):
        c.bind(Workload(id="x", requests={"cpu": 2000}), "h2")
    svc = Workload(id="svc", requests={"cpu": 3000}, per_host=True)
    p = placed.place(svc)
    assert p.replicas == ("h0", "h1", "h3")
    rebuilt.bind_replicas(svc, list(p.replicas))
    assert np.array_equal(placed.usage(), rebuilt.usage())
    assert placed.assignments() == rebuilt.assignments()
    # A host joining later gets a replica in both, and release frees every replica.
    for c in (placed, rebuilt):
        c.add_hosts([Host(id="h9", capacity={"cpu": 4000, "memory": 8192})])
        c.release("svc")
        assert c.assignments() == {"x": "h2"}


def test_bind_replicas_all_or_nothing():
    c = make_cluster()
    c.bind(Workload(id="x", requests={"cpu": 2000}), "h2")
    svc = Workload(id="svc", requests={"cpu": 3000}, per_host=True)
    before = c.usage().copy()
    with pytest.raises(Unschedulable):
        c.bind_replicas(svc, ["h0", "h2"])  # h2 lacks 1000m: h0's replica is rolled back
    assert np.array_equal(before, c.usage())
    c.bind_replicas(svc, ["h0"])
    with pytest.raises(DuplicateId):
        c.bind_replicas(svc, ["h1", "h0"])
    assert c.assignments() == {"x": "h2", "svc@h0": "h0"}
    with pytest.raises(ValidationError):
        c.bind_replicas(Workload(id="plain", requests={"cpu": 1}), ["h1"])
