"""Every Cluster mutation returns what it did, so a caller (the server turning it into
events) never has to work a decision out again; `restore` commits a recorded outcome.

Usage is checked against a recount from the returned outcomes, not the Cluster's own
counters."""
import numpy as np
import pytest

from hci_scheduler import Cluster, Volume, Workload
from hci_scheduler.errors import DuplicateId, NotFound, Unschedulable, ValidationError
from hci_scheduler.model import Placement

from ..conftest import make_host, make_workload

DIMS = ("cpu", "memory", "ssd", "net", "gpu")


def agent(cpu=1000) -> Workload:
    return Workload("agent", {"cpu": cpu, "memory": 100}, per_host=True)


def snapshot(c: Cluster):
    return c.usage().tolist(), c.placements(), c.assignments(), c.volumes(), c.workload_counts()


def recount(c: Cluster, requests: dict[str, np.ndarray]) -> np.ndarray:
    """Usage per host row from the placements alone (containers, no ratios, no volumes)."""
    used = np.zeros((len(c.host_ids()), len(DIMS)), dtype=np.int64)
    for p in c.placements():
        for hid in (p.replicas if p.host_id is None else (p.host_id,)):
            used[c.host_index(hid)] += requests[p.workload_id]
    return used


def vec(cpu=0, memory=0):
    return np.array([cpu, memory, 0, 0, 0], dtype=np.int64)


def test_add_hosts_reports_the_per_host_replicas_it_started():
    c = Cluster()
    c.add_host(make_host("h0"))
    c.place(agent())
    added = c.add_hosts([make_host("h1"), make_host("h2", cpu=500)])  # h2 has no room for 1000m
    assert list(added) == [1, 2]
    assert added.replicas == {"h1": ["agent"]}
    assert c.placements() == [Placement("agent", None, replicas=("h0", "h1"))]


def test_add_hosts_restores_recorded_replicas_exactly():
    c = Cluster()
    c.add_host(make_host("h0"))
    c.place(agent())
    added = c.add_hosts([make_host("h1"), make_host("h2")], replicas={"h2": ["agent"]})
    assert added.replicas == {"h2": ["agent"]}  # the log's choice, not the core's (h1 would fit)
    assert c.workload_counts() == {"h0": 1, "h2": 1}


@pytest.mark.parametrize("replicas, error", [
    ({"h9": ["agent"]}, ValidationError),   # a host not in the call
    ({"h1": ["nobody"]}, NotFound),         # not a registered per-host service
], ids=["unknown-host", "unknown-service"])
def test_add_hosts_refuses_bad_recorded_replicas_and_changes_nothing(replicas, error):
    c = Cluster()
    c.add_host(make_host("h0"))
    c.place(agent())
    before = snapshot(c)
    with pytest.raises(error):
        c.add_hosts([make_host("h1")], replicas=replicas)
    assert snapshot(c) == before and c.n_hosts == 1


def test_remove_host_reports_the_replicas_that_went_with_it():
    c = Cluster()
    c.add_hosts([make_host("h0"), make_host("h1")])
    c.place(agent())
    assert c.remove_host("h1") == ["agent"]
    assert c.placements() == [Placement("agent", None, replicas=("h0",))]


def test_update_host_takes_state_and_returns_the_host():
    c = Cluster()
    c.add_hosts([make_host("h0"), make_host("h1")])
    h = c.update_host("h0", labels={"zone": "b"}, state="cordoned")
    assert (h.state, dict(h.labels)) == ("cordoned", {"zone": "b"})
    assert c.place(make_workload("w", cpu=100)).host_id == "h1"  # cordoned takes nothing new
    with pytest.raises(ValidationError):
        c.update_host("h1", labels={"zone": "c"}, state="sleeping")
    assert c.host("h1").labels == {} and c.host("h1").state == "ready"  # nothing changed


def test_release_returns_where_the_workload_was():
    c = Cluster()
    c.add_hosts([make_host("h0"), make_host("h1")])
    c.place(agent())
    host = c.place(make_workload("w", cpu=100)).host_id
    assert c.release("w") == Placement("w", host)
    assert c.release("agent") == Placement("agent", None, replicas=("h0", "h1"))
    assert c.placements() == [] and not c.usage().any()


def test_place_batch_with_preempt_reports_evictions():
    c = Cluster()
    c.add_host(make_host("h0", cpu=4000))
    requests = {f"low{i}": vec(cpu=1000) for i in range(4)}
    c.place_batch([make_workload(w, cpu=1000) for w in requests], order="arrival")
    requests["urgent"] = vec(cpu=2000)
    r = c.place_batch([make_workload("urgent", cpu=2000, priority=10)], preempt=True)
    assert r.placements == {"urgent": "h0"}
    evicted = r.details["urgent"].evicted
    assert len(evicted) == 2 and set(evicted) <= {f"low{i}" for i in range(4)}
    assert {p.workload_id for p in c.placements()} == set(requests) - set(evicted)
    assert (recount(c, requests) == c.usage()).all()
    assert (c.usage() <= c.limits()).all()


def test_place_batch_refuses_preempt_with_a_gang():
    c = Cluster()
    c.add_host(make_host("h0"))
    with pytest.raises(ValidationError):
        c.place_batch([make_workload("a", cpu=1)], gang=True, preempt=True)


@pytest.mark.parametrize("bad", [
    make_workload("b", cpu=1, volumes=["no-such-volume"]),                           # unknown volume
    Workload("c", {"cpu": 1}, volumes=[Volume("v0", 10)]),                            # volume exists already
    Workload("d", {"cpu": 1}, volumes=[Volume("v9", 10), Volume("v9", 10)]),          # same new volume twice
    Workload("e", {"cpu": 1}, per_host=True, gang="g"),                               # per-host with a gang
    make_workload("a", cpu=1),                                                        # id twice in the batch
], ids=["unknown-volume", "existing-volume", "volume-twice", "per-host-gang", "duplicate-id"])
def test_a_batch_that_raises_changes_nothing(bad):
    c = Cluster()
    c.add_hosts([make_host("h0", ssd=100), make_host("h1", ssd=100)])
    c.add_volume(Volume("v0", 10))
    c.place(agent(cpu=100))
    before = snapshot(c)
    batch = [make_workload("a", cpu=100), Workload("nv", {"cpu": 100}, volumes=[Volume("v1", 5)]),
             Workload("osd", {"cpu": 10}, per_host=True), bad]
    with pytest.raises((ValidationError, NotFound, DuplicateId)):
        c.place_batch(batch, order="arrival")
    assert snapshot(c) == before


def test_place_batch_details_name_replicas_and_volumes():
    c = Cluster()
    c.add_hosts([make_host("h0", ssd=100), make_host("h1", ssd=100)])
    r = c.place_batch([make_workload("a", cpu=100), Workload("osd", {"cpu": 10}, per_host=True),
                       Workload("db", {"cpu": 100}, volumes=[Volume("v1", 30, replicas=2)])], order="arrival")
    assert list(r.placements) == ["a", "osd", "db"]  # the order they were committed in
    assert set(r.details) == {"osd", "db"}  # "a" only chose a host
    assert r.details["osd"].replicas == ("h0", "h1")
    db = r.details["db"]
    assert db.host_id in db.volumes["v1"] and sorted(db.volumes["v1"]) == ["h0", "h1"]
    # 30 GiB of ssd on each replica host: the volume's, not the workload's.
    assert c.usage()[:, DIMS.index("ssd")].tolist() == [30, 30]


def test_restore_recommits_a_recorded_outcome():
    live = Cluster()
    live.add_hosts([make_host("h0", ssd=100), make_host("h1", ssd=100), make_host("h2", ssd=100)])
    outcomes = []
    for w in [Workload("osd", {"cpu": 10}, per_host=True),
              Workload("db", {"cpu": 100}, volumes=[Volume("v1", 30, replicas=2)]),
              make_workload("web", cpu=500)]:
        outcomes.append((w, live.place(w)))
    replayed = Cluster()
    replayed.add_hosts([make_host("h0", ssd=100), make_host("h1", ssd=100), make_host("h2", ssd=100)])
    for w, p in outcomes:
        replayed.restore(w, p)
    assert snapshot(replayed) == snapshot(live)


def test_restore_refuses_a_host_without_room_and_changes_nothing():
    c = Cluster()
    c.add_hosts([make_host("h0", ssd=100)])
    before = snapshot(c)
    w = Workload("db", {"cpu": 9000}, volumes=[Volume("v1", 30)])  # more cpu than h0 has
    with pytest.raises(Unschedulable):
        c.restore(w, Placement("db", "h0", volumes={"v1": ["h0"]}))
    assert snapshot(c) == before


def test_workload_counts_match_the_placements():
    c = Cluster()
    c.add_hosts([make_host(f"h{i}") for i in range(4)])
    c.place(agent(cpu=100))
    c.place_batch([make_workload(f"w{i}", cpu=700) for i in range(10)])
    c.release("w3")
    expected: dict[str, int] = {}
    for p in c.placements():
        for hid in (p.replicas if p.host_id is None else (p.host_id,)):
            expected[hid] = expected.get(hid, 0) + 1
    assert c.workload_counts() == expected


def test_utilization_is_used_over_allocatable_and_exceeds_1_when_overcommitted():
    c = Cluster(dimensions=("cpu", "memory"))
    c.add_host(make_host_2d("h0", cpu=1000, memory=1000, allocation_ratio={"cpu": 2.0}, reserved={"memory": 500}))
    c.place(Workload("w", {"cpu": 1500, "memory": 250}))
    # cpu 1500 / 1000 allocatable (ratio 2 allows 2000); memory 250 / (1000 - 500)
    assert c.utilization() == {"cpu": 1.5, "memory": 0.5}


def make_host_2d(id, cpu, memory, **kw):
    from hci_scheduler import Host

    return Host(id, capacity={"cpu": cpu, "memory": memory}, **kw)


def test_placement_of_one_workload_is_what_placements_lists():
    c = Cluster()
    c.add_hosts([make_host("h0", ssd=100), make_host("h1", ssd=100)])
    c.place_batch([make_workload("a", cpu=100), Workload("osd", {"cpu": 10}, per_host=True),
                   Workload("db", {"cpu": 100}, volumes=[Volume("v1", 30, replicas=2)])], order="arrival")
    assert [c.placement(p.workload_id) for p in c.placements()] == c.placements()
    with pytest.raises(NotFound):
        c.placement("nobody")
