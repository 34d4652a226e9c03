"""Per-host services and volumes created with a workload, over gRPC and across restarts.

Each test runs its own server: a per-host service puts a replica on every host,
which would disturb the shared server of test_service.py.
"""
from __future__ import annotations

import grpc
import pytest

from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ServerProcess, make_host, make_workload, restart_after, snapshot, stub_for


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def ssd_host(id: str, ssd: int = 100, **kw) -> pb.Host:
    return pb.Host(id=id, capacity={"cpu": 4000, "memory": 8192, "ssd": ssd}, **kw)


def daemon(id: str = "agent", cpu: int = 100, **kw) -> pb.Workload:
    return pb.Workload(id=id, requests={"cpu": cpu}, per_host=True, **kw)


def with_volume(id: str, volume: str, size: int = 10, replicas: int = 2, **kw) -> pb.Workload:
    return pb.Workload(id=id, requests={"cpu": 200},
                       new_volumes=[pb.Volume(id=volume, size_gib=size, replicas=replicas)], **kw)


@pytest.fixture
def srv(tmp_path):
    server = ServerProcess(tmp_path, data_dir=tmp_path / "data").start()
    yield server
    server.kill()


def test_per_host_service_gets_a_replica_on_every_matching_host(srv):
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}", labels={"role": "storage" if i < 3 else "compute"})
                                                   for i in range(4)]))
    p = s.Place(pb.PlaceRequest(workloads=[daemon(node_selector={"role": "storage"})])).placements[0]
    # host_id is empty for a per-host service; the sequence says it was placed.
    assert (p.host_id, list(p.replica_host_ids)) == ("", ["h0", "h1", "h2"])
    assert p.sequence > 0
    hosts = {h.id: h for h in s.ListHosts(pb.ListHostsRequest()).hosts}
    assert [hosts[f"h{i}"].workload_count for i in range(4)] == [1, 1, 1, 0]
    assert hosts["h0"].used["cpu"] == 100
    # A retry returns the first answer; the same id with another spec is ALREADY_EXISTS.
    again = s.Place(pb.PlaceRequest(workloads=[daemon(node_selector={"role": "storage"})])).placements[0]
    assert again == p
    assert code_of(lambda: s.Place(pb.PlaceRequest(workloads=[daemon(cpu=200)]))) == grpc.StatusCode.ALREADY_EXISTS
    # A matching host registered later gets a replica; the HOST_ADDED event says so.
    added = s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host("h9", labels={"role": "storage"})]))
    assert added.hosts[0].id == "h9"
    listed = s.ListAllocations(pb.ListAllocationsRequest(host_id="h9")).allocations
    assert [(a.workload_id, list(a.replica_host_ids)) for a in listed] == [("agent", ["h0", "h1", "h2", "h9"])]
    last = s.GetStatus(pb.GetStatusRequest()).last_sequence
    ev = next(iter(s.WatchEvents(pb.WatchEventsRequest(after_sequence=last - 1)))).event
    assert (ev.type, ev.host_id, list(ev.per_host_workload_ids)) == (pb.EVENT_TYPE_HOST_ADDED, "h9", ["agent"])
    # A host that runs only replicas can be removed; the replica goes with it.
    s.RemoveHost(pb.RemoveHostRequest(host_id="h1"))
    p = s.ListAllocations(pb.ListAllocationsRequest()).allocations[0]
    assert list(p.replica_host_ids) == ["h0", "h2", "h9"]
    # Releasing the service frees every replica.
    assert list(s.Release(pb.ReleaseRequest(workload_ids=["agent"])).released_workload_ids) == ["agent"]
    assert all(h.workload_count == 0 and not h.used for h in s.ListHosts(pb.ListHostsRequest()).hosts)


def test_new_volume_replicas_are_reported_and_mounted_with_locality(srv):
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}") for i in range(4)]))
    p = s.Place(pb.PlaceRequest(workloads=[with_volume("db", "vol-db", size=30, replicas=2)])).placements[0]
    assert p.host_id and p.sequence > 0
    [vol] = p.volumes
    # The first replica sits with the workload, the second on another host.
    assert vol.volume_id == "vol-db" and vol.size_gib == 30
    assert vol.host_ids[0] == p.host_id and len(set(vol.host_ids)) == 2
    assert s.ListVolumes(pb.ListVolumesRequest()).volumes == [vol]
    hosts = {h.id: h for h in s.ListHosts(pb.ListHostsRequest()).hosts}
    assert [hosts[h].used["ssd"] for h in vol.host_ids] == [30, 30]
    # A workload mounting the volume lands on a replica host.
    m = s.Place(pb.PlaceRequest(workloads=[make_workload("reader", cpu=100, volume_ids=["vol-db"])])).placements[0]
    assert m.host_id in vol.host_ids
    # The volume outlives its workload.
    s.Release(pb.ReleaseRequest(workload_ids=["db", "reader"]))
    assert [v.volume_id for v in s.ListVolumes(pb.ListVolumesRequest()).volumes] == ["vol-db"]


def test_delete_volume_frees_its_replicas_and_survives_a_restart(tmp_path):
    def setup(s):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}") for i in range(3)]))
        vol = s.Place(pb.PlaceRequest(workloads=[with_volume("db", "vol-db", size=30)])).placements[0].volumes[0]
        s.Place(pb.PlaceRequest(workloads=[with_volume("cache", "vol-c", size=20)]))
        before = snapshot(s)
        for volume_id, code in (("vol-db", grpc.StatusCode.FAILED_PRECONDITION),  # db mounts it
                                ("nope", grpc.StatusCode.NOT_FOUND), ("", grpc.StatusCode.INVALID_ARGUMENT)):
            assert code_of(lambda: s.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id))) == code
        assert snapshot(s) == before  # refusals change nothing
        s.Release(pb.ReleaseRequest(workload_ids=["db"]))
        seq = s.DeleteVolume(pb.DeleteVolumeRequest(volume_id="vol-db")).sequence
        status = s.GetStatus(pb.GetStatusRequest())
        assert seq == status.last_sequence
        assert [v.volume_id for v in s.ListVolumes(pb.ListVolumesRequest()).volumes] == ["vol-c"]
        hosts = {h.id: h for h in s.ListHosts(pb.ListHostsRequest()).hosts}
        cache = s.ListVolumes(pb.ListVolumesRequest()).volumes[0]
        for h in vol.host_ids:
            assert hosts[h].used["ssd"] == (20 if h in cache.host_ids else 0)
        stream = s.WatchEvents(pb.WatchEventsRequest(after_sequence=seq - 1))
        ev = next(iter(stream)).event
        stream.cancel()
        assert ev.type == pb.EVENT_TYPE_VOLUME_DELETED and ev.volume_id == "vol-db"
        return snapshot(s)

    with restart_after(tmp_path, setup) as (after, s):
        assert snapshot(s) == after
        # The id is free again.
        again = s.Place(pb.PlaceRequest(workloads=[with_volume("db2", "vol-db", size=30)])).placements[0]
        assert again.volumes[0].volume_id == "vol-db"


def test_bad_per_host_and_volume_requests_change_nothing(srv):
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}") for i in range(3)]))
    s.Place(pb.PlaceRequest(workloads=[with_volume("first", "v1")]))
    before = snapshot(s)
    cases = [
        # (request, code)
        (pb.PlaceRequest(workloads=[daemon()], gang=True), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[daemon(gang="g")]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[daemon(volume_ids=["v1"])]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[with_volume("w", "v2")], gang=True), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[with_volume("w", "v2", size=0)]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[with_volume("w", "")]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[with_volume("w", "v2"), with_volume("x", "v2")]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.PlaceRequest(workloads=[make_workload("m", volume_ids=["nope"])]), grpc.StatusCode.NOT_FOUND),
        # A daemon and a plain workload are placed, then the existing volume id fails
        # the call: both are taken back.
        (pb.PlaceRequest(workloads=[daemon(), make_workload("plain"), with_volume("w", "v1")]),
         grpc.StatusCode.ALREADY_EXISTS),
    ]
    for request, code in cases:
        assert code_of(lambda: s.Place(request)) == code, request
    assert snapshot(s) == before


def test_restart_rebuilds_replicas_and_volumes_exactly(tmp_path):
    def setup(s):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}", labels={"rack": f"r{i % 2}"})
                                                       for i in range(5)]))
        s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}", cpu=700) for i in range(6)]))
        s.Place(pb.PlaceRequest(workloads=[
            daemon("agent", cpu=300),
            pb.Workload(id="db", requests={"cpu": 500},
                        new_volumes=[pb.Volume(id="vol-a", size_gib=40, replicas=2, spread="rack"),
                                     pb.Volume(id="vol-b", size_gib=5, replicas=3)]),
            make_workload("w-after", cpu=900)]))
        s.Place(pb.PlaceRequest(workloads=[make_workload("reader", cpu=100, volume_ids=["vol-a"])]))
        # A later host gets the agent; a removed one takes its replica along.
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host("h9", labels={"rack": "r0"})]))
        s.Place(pb.PlaceRequest(workloads=[daemon("probe", cpu=50, node_selector={"rack": "r1"})]))
        s.Release(pb.ReleaseRequest(workload_ids=["w2"]))
        busy = {p.host_id for p in s.ListAllocations(pb.ListAllocationsRequest()).allocations}
        busy |= {h for v in s.ListVolumes(pb.ListVolumesRequest()).volumes for h in v.host_ids}
        idle = sorted(({f"h{i}" for i in range(5)} | {"h9"}) - busy)
        assert idle, "the test needs a host that runs only per-host replicas"
        s.RemoveHost(pb.RemoveHostRequest(host_id=idle[0]))
        return snapshot(s)

    with restart_after(tmp_path, setup) as (before, s):
        assert snapshot(s) == before
        allocs = {p.workload_id: p for p in before[1]}
        assert allocs["agent"].replica_host_ids and not allocs["agent"].host_id
        assert {v.volume_id for v in allocs["db"].volumes} == {"vol-a", "vol-b"}
        # Retries still return the first answers, and new work continues the sequence.
        again = s.Place(pb.PlaceRequest(workloads=[daemon("agent", cpu=300)])).placements[0]
        assert list(again.replica_host_ids) == list(allocs["agent"].replica_host_ids)
        nxt = s.Place(pb.PlaceRequest(workloads=[make_workload("w-next", cpu=1)])).placements[0]
        assert nxt.sequence == before[3].last_sequence + 1


def test_sigkill_then_restart_keeps_replicas(tmp_path):
    def setup(s):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[ssd_host(f"h{i}") for i in range(3)]))
        s.Place(pb.PlaceRequest(workloads=[daemon(), with_volume("db", "vol", replicas=3)]))
        return snapshot(s)

    with restart_after(tmp_path, setup, kill=True) as (before, s):  # SIGKILL: no checkpoint, no graceful close
        assert snapshot(s) == before


def test_replay_follows_the_log_where_the_core_would_choose_otherwise():
    # The log, not the core's choice at replay time, decides where replicas are:
    # with the agent dropped from h1's HOST_ADDED event (as if an older core had
    # not put it there), a replay must not have it on h1 either.
    from hci_scheduler.server import convert
    from hci_scheduler.server.state import SchedulerState
    from hci_scheduler.store import MemoryStore, Record

    store = MemoryStore()
    state = SchedulerState(store)
    hosts = [convert.normalize_host(make_host("h0"))]
    state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))
    items, _ = _items(state, [daemon(cpu=1000)])
    state.execute("place", (items, False, "binpack", False))
    hosts = [convert.normalize_host(make_host(f"h{i}", cpu=500 if i == 2 else 4000)) for i in (1, 2)]
    state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))
    assert _replicas(state, "agent") == ("h0", "h1")  # h2 lacks room for 1000m

    records = store.read()
    edited = MemoryStore()
    for rec in records:
        ev = pb.Event.FromString(rec.body)
        if ev.type == pb.EVENT_TYPE_HOST_ADDED and ev.host_id == "h1":
            del ev.per_host_workload_ids[:]
        rec = Record(rec.sequence, rec.kind, ev.SerializeToString())
        edited.append([rec])
    replayed = SchedulerState(edited)
    assert _replicas(replayed, "agent") == ("h0",)
    assert replayed.cluster.workloads_on("h1") == []
    assert {h.id: h.workload_count for h in replayed.list_hosts().hosts} == {"h0": 1, "h1": 0, "h2": 0}


def _replicas(state, workload_id):
    (p,) = [p for p in state.list_allocations().allocations if p.workload_id == workload_id]
    return tuple(p.replica_host_ids)


def _items(state, workloads):
    from hci_scheduler.server.service import SchedulerServicer

    return SchedulerServicer(state)._items(workloads, False)
