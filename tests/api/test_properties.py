"""Properties checked independently of the code under test, on random clusters (hypothesis)."""
import numpy as np
from hypothesis import given, settings, strategies as st

from hci_scheduler import Cluster
from tests import reference

STRATEGIES = ["binpack", "spread", "balanced", "dot"]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_hosts=st.integers(1, 120), n_dims=st.integers(1, 5),
       strategy=st.sampled_from(STRATEGIES), order=st.sampled_from(["arrival", "largest_first"]))
def test_place_array_never_overcommits_and_release_restores(seed, n_hosts, n_dims, strategy, order):
    rng = np.random.default_rng(seed)
    capacity = rng.integers(0, 1000, size=(n_hosts, n_dims)).astype(np.int64)
    requests = rng.integers(0, 400, size=(int(rng.integers(1, 600)), n_dims)).astype(np.int64)
    c = Cluster.from_arrays(capacity)
    hosts = c.place_array(requests, strategy=strategy, order=order)
    usage = reference.usage_from_assignments(n_hosts, n_dims, hosts, requests)
    np.testing.assert_array_equal(usage, c.usage())
    assert (usage <= capacity).all()
    # Every refused request really fit nowhere at the end of the run? Not required online,
    # but none may be refused while an empty host could take it.
    empty = usage.sum(axis=1) == 0
    for r in np.flatnonzero(hosts < 0):
        assert not ((capacity[empty] >= requests[r]).all(axis=1)).any()
    placed = np.flatnonzero(hosts >= 0)
    half = placed[: len(placed) // 2]
    c.release_array(half)
    np.testing.assert_array_equal(
        c.usage(), reference.usage_from_assignments(n_hosts, n_dims, np.where(np.isin(np.arange(len(hosts)), half), -1, hosts), requests))
    c.release_array(placed[len(placed) // 2:])
    assert c.usage().sum() == 0 and c.hosts_used() == 0
    np.testing.assert_array_equal(c.free(), capacity)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_named_workloads_interleaved_never_overcommit(seed):
    from hci_scheduler import Host, Unschedulable, Workload

    rng = np.random.default_rng(seed)
    dims = ("cpu", "memory")
    c = Cluster(dimensions=dims)
    cap = {}
    for i in range(int(rng.integers(1, 30))):
        cap[f"h{i}"] = rng.integers(100, 2000, size=2)
        c.add_host(Host(f"h{i}", dict(zip(dims, map(int, cap[f"h{i}"])))))
    specs = {}
    live = []
    for step in range(200):
        if live and rng.random() < 0.3:
            wid = live.pop(int(rng.integers(len(live))))
            c.release(wid)
        else:
            wid = f"w{step}"
            req = rng.integers(0, 600, size=2)
            try:
                c.place(Workload(wid, dict(zip(dims, map(int, req)))),
                        strategy=STRATEGIES[int(rng.integers(4))])
            except Unschedulable:
                continue
            specs[wid] = req
            live.append(wid)
        used = {h: np.zeros(2, dtype=np.int64) for h in cap}
        for wid, hid in c.assignments().items():
            used[hid] += specs[wid]
        assert set(c.assignments()) == set(live)
        for h in cap:
            assert (used[h] <= cap[h]).all()
