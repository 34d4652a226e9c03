"""The Cluster's parts seen through its public API: one commit path (usage always equals what
the placements account for), per-host counts, per-host services leaving with their host,
and calls that raise changing nothing. Expected values are computed here, from the
requests the test chose, never read back from the cluster's own bookkeeping."""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hci_scheduler import (
    Cluster, DuplicateId, Host, LabelExpr, NotFound, SchedulerError, StateConflict, Unschedulable, ValidationError, Volume,
    Workload,
)
from hci_scheduler.model import Placement

DIMS = ("cpu", "memory", "ssd")


def make_cluster(n_hosts: int = 4, cpu: int = 4000) -> Cluster:
    c = Cluster(DIMS)
    c.add_hosts([Host(f"h{i}", {"cpu": cpu, "memory": 8192, "ssd": 100},
                      labels={"role": "storage" if i % 2 else "compute"}) for i in range(n_hosts)])
    return c


def snapshot(c: Cluster):
    return (c.usage().tolist(), c.placements(), c.assignments(), c.volumes(), c.workload_counts(),
            c.host_ids())


def recount(c: Cluster) -> Counter:
    """Named workloads per host, from placements() (a per-host service once per replica host)."""
    counts = Counter()
    for p in c.placements():
        for hid in (p.replicas if p.host_id is None else (p.host_id,)):
            counts[hid] += 1
    return counts


def expected_usage(c: Cluster, requests: dict[str, dict], volume_size: dict[str, int]) -> np.ndarray:
    """Usage per row from the placements and volumes the cluster reports and the requests the
    test itself chose."""
    rows = {hid: r for r, hid in enumerate(c.host_ids()) if hid is not None}
    usage = np.zeros((len(c.host_ids()), len(DIMS)), dtype=np.int64)
    for p in c.placements():
        req = np.array([requests[p.workload_id].get(d, 0) for d in DIMS], dtype=np.int64)
        for hid in (p.replicas if p.host_id is None else (p.host_id,)):
            usage[rows[hid]] += req
    for vid, hosts in c.volumes().items():
        for hid in hosts:
            usage[rows[hid], DIMS.index("ssd")] += volume_size[vid]
    return usage


def test_workload_counts_match_a_recount_from_placements():
    c = make_cluster(6)
    c.place(Workload("svc", {"cpu": 100}, per_host=True))
    c.place_batch([Workload(f"w{i}", {"cpu": 300 + 10 * i, "memory": 100}) for i in range(20)])
    c.bind(Workload("pinned", {"cpu": 100}), "h5")
    c.release("w3")
    c.add_hosts([Host("h9", {"cpu": 4000, "memory": 8192, "ssd": 100})])  # svc gets a replica there
    assert c.workload_counts() == dict(recount(c))
    assert c.workload_counts()["h9"] == 1
    c.release("svc")
    assert c.workload_counts() == dict(recount(c))
    assert "h9" not in c.workload_counts()


def test_remove_host_reports_the_per_host_services_gone():
    c = make_cluster(4)
    c.place(Workload("node-exporter", {"cpu": 50}, per_host=True))
    osd = Workload("ceph-osd", {"cpu": 500}, per_host=True, selector=[LabelExpr("role", "In", ("storage",))])
    assert c.place(osd).replicas == ("h1", "h3")
    assert sorted(c.remove_host("h3")) == ["ceph-osd", "node-exporter"]
    assert c.remove_host("h0") == ["node-exporter"]
    assert c.assignments() == {"node-exporter@h1": "h1", "node-exporter@h2": "h2", "ceph-osd@h1": "h1"}
    assert {p.workload_id: p.replicas for p in c.placements()} == {
        "node-exporter": ("h1", "h2"), "ceph-osd": ("h1",)}
    np.testing.assert_array_equal(c.usage()[c.host_index("h1")], [550, 0, 0])
    # The next host reuses a freed row and gets a replica of each service it matches.
    added = c.add_hosts([Host("h7", {"cpu": 4000, "memory": 8192, "ssd": 100}, labels={"role": "storage"})])
    assert added.replicas == {"h7": ["node-exporter", "ceph-osd"]}
    assert sorted(c.workloads_on("h7")) == ["ceph-osd@h7", "node-exporter@h7"]


def test_remove_host_refused_while_a_workload_runs_there_changes_nothing():
    c = make_cluster(2)
    c.place(Workload("svc", {"cpu": 50}, per_host=True))
    c.bind(Workload("w", {"cpu": 100}), "h0")
    before = snapshot(c)
    with pytest.raises(StateConflict):
        c.remove_host("h0")
    assert snapshot(c) == before


@pytest.mark.parametrize("gang_kw", [{"gang": True}, {}])
def test_place_batch_with_preempt_is_refused_with_a_gang(gang_kw):
    c = make_cluster(2)
    c.place(Workload("low", {"cpu": 4000}, priority=0))
    members = [Workload(f"g{i}", {"cpu": 100}, gang=None if gang_kw else "g") for i in range(2)]
    before = snapshot(c)
    with pytest.raises(ValidationError):
        c.place_batch(members, preempt=True, **gang_kw)
    assert snapshot(c) == before


def test_place_batch_refuses_a_gang_member_that_creates_volumes():
    # Rolling the gang back would release the workload but leave the volume it created.
    c = make_cluster(3)
    batch = [Workload("db", {"cpu": 100}, volumes=(Volume("data", 10, replicas=2),), gang="g"),
             Workload("big", {"cpu": 99_999}, gang="g")]
    before = snapshot(c)
    with pytest.raises(ValidationError):
        c.place_batch(batch)
    assert snapshot(c) == before


def test_calls_that_raise_change_nothing():
    c = make_cluster(3, cpu=1000)
    c.place(Workload("svc", {"cpu": 100}, per_host=True))
    c.bind(Workload("full", {"cpu": 900}), "h2")     # h2 is now full
    c.add_volume(Volume("vol", 20, replicas=2))
    c.place(Workload("user", {"cpu": 100}, volumes=("vol",)))
    before = snapshot(c)
    failing = [
        (DuplicateId, lambda: c.place(Workload("full", {"cpu": 1}))),
        (DuplicateId, lambda: c.place(Workload("svc", {"cpu": 1}))),
        (Unschedulable, lambda: c.place(Workload("huge", {"cpu": 5000}))),
        (Unschedulable, lambda: c.bind(Workload("x", {"cpu": 200}), "h2")),
        (NotFound, lambda: c.bind(Workload("x", {"cpu": 200}), "nope")),
        # h0 and h1 take a replica, h2 does not: all or nothing.
        (Unschedulable, lambda: c.bind_replicas(Workload("agent", {"cpu": 200}, per_host=True), ["h0", "h1", "h2"])),
        (DuplicateId, lambda: c.bind_replicas(Workload("svc", {"cpu": 100}, per_host=True), ["h0"])),
        (DuplicateId, lambda: c.place_batch([Workload("a", {"cpu": 1}), Workload("a", {"cpu": 1})])),
        (ValidationError, lambda: c.place_batch([Workload("a", {"cpu": 1}), "not a workload"])),
        (DuplicateId, lambda: c.place_batch([Workload("a", {"cpu": 1}),
                                             Workload("b", {"cpu": 1}, volumes=(Volume("vol", 5),))])),
        (DuplicateId, lambda: c.add_hosts([Host("h9", {"cpu": 1}), Host("h0", {"cpu": 1})])),
        (NotFound, lambda: c.add_hosts([Host("h9", {"cpu": 1})], replicas={"h9": ["nope"]})),
        (StateConflict, lambda: c.remove_host("h2")),
        (StateConflict, lambda: c.remove_volume("vol")),
        (Unschedulable, lambda: c.add_volume(Volume("v2", 500, replicas=2))),
        (ValidationError, lambda: c.restore(Workload("r", {"cpu": 1}, volumes=(Volume("nv", 5),)),
                                            Placement("r", "h0"))),
        (Unschedulable, lambda: c.restore(Workload("r", {"cpu": 500}, volumes=(Volume("nv", 5),)),
                                          Placement("r", "h2", volumes={"nv": ["h0"]}))),
        (NotFound, lambda: c.release("nope")),
        (ValidationError, lambda: c.update_host("h0", state="sleeping")),
    ]
    for exc, call in failing:
        with pytest.raises(exc):
            call()
        assert snapshot(c) == before, call


def test_preempt_that_cannot_free_a_host_changes_nothing():
    c = make_cluster(2, cpu=1000)
    c.bind(Workload("hi0", {"cpu": 600}, priority=10), "h0")
    c.bind(Workload("lo1", {"cpu": 600}, priority=0), "h1")
    before = snapshot(c)
    with pytest.raises(Unschedulable):  # only lower priorities may be evicted: lo1 frees 600, not enough
        c.place(Workload("new", {"cpu": 1001}, priority=5), preempt=True)
    assert snapshot(c) == before
    p = c.place(Workload("new", {"cpu": 900}, priority=5), preempt=True)
    assert (p.host_id, p.evicted) == ("h1", ("lo1",))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_usage_always_equals_what_the_placements_account_for(seed):
    """A random mix of every way to commit and release; after each step the usage equals the
    sum of the requests at the hosts placements() and volumes() report, and the per-host
    counts equal a recount."""
    rng = np.random.default_rng(seed)
    c = Cluster(DIMS)
    n_hosts = int(rng.integers(2, 8))
    c.add_hosts([Host(f"h{i}", {"cpu": int(rng.integers(500, 3000)), "memory": 4096, "ssd": 200})
                 for i in range(n_hosts)])
    requests: dict[str, dict] = {}
    volume_size: dict[str, int] = {}
    next_host = n_hosts

    def req():
        return {"cpu": int(rng.integers(0, 800)), "memory": int(rng.integers(0, 1024))}

    for step in range(60):
        op = rng.integers(0, 9)
        wid = f"w{step}"
        try:
            if op == 0:
                requests[wid] = req()
                c.place(Workload(wid, requests[wid], priority=int(rng.integers(0, 3))),
                        preempt=bool(rng.integers(0, 2)))
            elif op == 1:
                batch = []
                for k in range(int(rng.integers(1, 6))):
                    requests[f"{wid}.{k}"] = req()
                    batch.append(Workload(f"{wid}.{k}", requests[f"{wid}.{k}"]))
                c.place_batch(batch, gang=bool(rng.integers(0, 2)))
            elif op == 2:
                requests[wid] = req()
                c.bind(Workload(wid, requests[wid]), f"h{int(rng.integers(0, next_host))}")
            elif op == 3:
                requests[wid] = {"cpu": int(rng.integers(0, 100))}
                c.place(Workload(wid, requests[wid], per_host=True))
            elif op == 4:
                size = int(rng.integers(1, 60))
                requests[wid] = req()
                volume_size[f"v{step}"] = size
                c.place(Workload(wid, requests[wid], volumes=(Volume(f"v{step}", size, replicas=2),)))
            elif op == 5:
                size = int(rng.integers(1, 60))
                volume_size[f"v{step}"] = size
                c.add_volume(Volume(f"v{step}", size, replicas=int(rng.integers(1, 3))))
            elif op == 6 and c.placements():
                victim = c.placements()[int(rng.integers(len(c.placements())))]
                c.release(victim.workload_id)
            elif op == 7 and c.volumes():
                c.remove_volume(sorted(c.volumes())[int(rng.integers(len(c.volumes())))])
            elif op == 8:
                if rng.integers(0, 2):
                    c.add_hosts([Host(f"h{next_host}", {"cpu": 2000, "memory": 4096, "ssd": 200})])
                    next_host += 1
                else:
                    c.remove_host(f"h{int(rng.integers(0, next_host))}")
        except (SchedulerError, StateConflict):
            pass
        np.testing.assert_array_equal(c.usage(), expected_usage(c, requests, volume_size))
        assert c.workload_counts() == dict(recount(c))
        assert (c.usage() <= c.limits()).all()
    for p in c.placements():
        c.release(p.workload_id)
    for vid in list(c.volumes()):
        c.remove_volume(vid)
    assert c.usage().sum() == 0 and c.workload_counts() == {} and c.assignments() == {}
