"""Every method of SchedulerService against the real server in a subprocess."""
from __future__ import annotations

import re
import urllib.request

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hci_scheduler.server.metrics import RPC_SECONDS
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ServerProcess, make_host, make_workload, restart_after, stub_for

SERVICE = "hci_scheduler.v1.SchedulerService"


@pytest.fixture(scope="module", params=["grpcio", "aio", "lean"])
def server(request, tmp_path_factory):
    """Every test here runs on every transport: grpcio's own server (the default, public
    API only), grpc.aio, and the opt-in LeanServer (which falls back to grpcio's server
    on a grpcio release it was not tested on)."""
    tmp = tmp_path_factory.mktemp(f"srv-{request.param}")
    srv = ServerProcess(tmp, data_dir=tmp / "data", extra=["--transport", request.param]).start()
    yield srv
    srv.kill()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def allocations(stub) -> dict[str, str]:
    return {p.workload_id: p.host_id for p in stub.ListAllocations(pb.ListAllocationsRequest()).allocations}


def hosts(stub) -> dict[str, pb.Host]:
    return {h.id: h for h in stub.ListHosts(pb.ListHostsRequest()).hosts}


# -- hosts ----------------------------------------------------------------------


def test_register_hosts_then_list_shows_them(stub):
    resp = stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("reg-a"), make_host("reg-b", cpu=8000)]))
    assert [h.id for h in resp.hosts] == ["reg-a", "reg-b"]
    listed = hosts(stub)
    assert listed["reg-b"].capacity["cpu"] == 8000
    assert listed["reg-a"].state == pb.HOST_STATE_READY  # unspecified state registers as ready


def test_register_duplicate_is_already_exists_and_all_or_nothing(stub):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("dup-a")]))
    # dup-new is valid but must not be registered: the call fails as a whole.
    code = code_of(lambda: stub.RegisterHosts(
        pb.RegisterHostsRequest(hosts=[make_host("dup-new"), make_host("dup-a")])))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert "dup-new" not in hosts(stub)


@pytest.mark.parametrize("request_", [
    pb.RegisterHostsRequest(),                                                       # no hosts
    pb.RegisterHostsRequest(hosts=[pb.Host(id="", capacity={"cpu": 1})]),            # empty id
    pb.RegisterHostsRequest(hosts=[pb.Host(id="bad-dim", capacity={"bogus": 1})]),   # unknown dimension
    pb.RegisterHostsRequest(hosts=[pb.Host(id="neg", capacity={"cpu": -5})]),        # negative quantity
    pb.RegisterHostsRequest(hosts=[pb.Host(id="st", capacity={"cpu": 1}, state=99)]),  # unknown enum
    pb.RegisterHostsRequest(hosts=[make_host("twice"), make_host("twice")]),         # same id twice
], ids=["empty", "empty-id", "unknown-dimension", "negative", "unknown-state", "same-id-twice"])
def test_register_malformed_is_invalid_argument(stub, request_):
    assert code_of(lambda: stub.RegisterHosts(request_)) == grpc.StatusCode.INVALID_ARGUMENT


def test_cordon_keeps_new_work_off_and_uncordon_restores(stub):
    # "huge" is the only host big enough for 1,000,000 millicores, so where the
    # workload lands depends only on that host's state.
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("huge", cpu=3_000_000, memory=10**6)]))
    assert stub.Place(pb.PlaceRequest(workloads=[make_workload("big-1", cpu=1_000_000)])).placements[0].host_id == "huge"
    resp = stub.UpdateHost(pb.UpdateHostRequest(host_id="huge", state=pb.HOST_STATE_CORDONED))
    assert resp.host.state == pb.HOST_STATE_CORDONED
    refused = stub.Place(pb.PlaceRequest(workloads=[make_workload("big-2", cpu=1_000_000)])).placements[0]
    assert refused.host_id == "" and refused.explanation.message
    stub.UpdateHost(pb.UpdateHostRequest(host_id="huge", state=pb.HOST_STATE_READY,
                                         update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    assert stub.Place(pb.PlaceRequest(workloads=[make_workload("big-2", cpu=1_000_000)])).placements[0].host_id == "huge"


@pytest.mark.parametrize("request_, code", [
    (pb.UpdateHostRequest(host_id="nope", state=pb.HOST_STATE_CORDONED), grpc.StatusCode.NOT_FOUND),
    # DOWN is the service's own (a silent agent): a client may not set it.
    (pb.UpdateHostRequest(host_id="reg-a", state=pb.HOST_STATE_DOWN), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UpdateHostRequest(host_id="reg-a", state=42), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UpdateHostRequest(host_id="reg-a"), grpc.StatusCode.INVALID_ARGUMENT),  # nothing to change
    (pb.UpdateHostRequest(host_id="reg-a", update_mask=field_mask_pb2.FieldMask(paths=["capacity"])),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UpdateHostRequest(host_id="", state=pb.HOST_STATE_DOWN), grpc.StatusCode.INVALID_ARGUMENT),
], ids=["unknown-host", "down-refused", "unknown-state", "empty-update", "bad-mask", "empty-id"])
def test_update_host_errors(stub, request_, code):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("reg-a")])) if "reg-a" not in hosts(stub) else None
    assert code_of(lambda: stub.UpdateHost(request_)) == code


def test_update_labels_reaches_the_core_or_is_unimplemented(stub):
    from hci_scheduler import Cluster

    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("lbl", labels={"zone": "a"})]))
    req = pb.UpdateHostRequest(host_id="lbl", labels={"zone": "b"})
    if not hasattr(Cluster, "update_host"):
        # Without core support the server must say so, not pretend.
        assert code_of(lambda: stub.UpdateHost(req)) == grpc.StatusCode.UNIMPLEMENTED
        assert hosts(stub)["lbl"].labels["zone"] == "a"
    else:
        assert stub.UpdateHost(req).host.labels["zone"] == "b"
        assert hosts(stub)["lbl"].labels["zone"] == "b"


def test_remove_host_refused_while_busy_then_removed(stub):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("rm", cpu=5_000_000, memory=10**6)]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("rm-w", cpu=4_000_000)]))
    assert allocations(stub)["rm-w"] == "rm"
    assert code_of(lambda: stub.RemoveHost(pb.RemoveHostRequest(host_id="rm"))) == \
        grpc.StatusCode.FAILED_PRECONDITION
    stub.Release(pb.ReleaseRequest(workload_ids=["rm-w"]))
    assert stub.RemoveHost(pb.RemoveHostRequest(host_id="rm")).sequence > 0
    assert "rm" not in hosts(stub)
    assert code_of(lambda: stub.RemoveHost(pb.RemoveHostRequest(host_id="rm"))) == grpc.StatusCode.NOT_FOUND


def test_list_hosts_filters_by_state_and_reports_usage(stub):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
        make_host("usage", cpu=7_000_000, memory=10**6), make_host("offhost", state=pb.HOST_STATE_CORDONED)]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("usage-w", cpu=6_500_000, memory=300)]))
    h = hosts(stub)["usage"]
    # 6,500,000 millicores only fit on "usage" (7,000,000), so its usage is exactly the request.
    assert (h.used["cpu"], h.used["memory"], h.workload_count) == (6_500_000, 300, 1)
    off = stub.ListHosts(pb.ListHostsRequest(state=pb.HOST_STATE_CORDONED)).hosts
    assert "offhost" in [x.id for x in off] and all(x.state == pb.HOST_STATE_CORDONED for x in off)
    # A host cannot be registered DOWN: only the service sets it.
    bad = pb.RegisterHostsRequest(hosts=[make_host("born-down", state=pb.HOST_STATE_DOWN)])
    assert code_of(lambda: stub.RegisterHosts(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert "born-down" not in hosts(stub)


# -- workloads --------------------------------------------------------------------


def test_place_then_allocations_list_it(stub):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("pl-h", cpu=64000, memory=65536, labels={"kvm": "true"})]))
    resp = stub.Place(pb.PlaceRequest(workloads=[make_workload("pl-1"), make_workload("pl-2", kind=pb.WORKLOAD_KIND_VM)]))
    got = {p.workload_id: p for p in resp.placements}
    assert all(p.host_id and p.sequence > 0 for p in got.values())
    listed = allocations(stub)
    assert listed["pl-1"] == got["pl-1"].host_id and listed["pl-2"] == got["pl-2"].host_id
    with_specs = stub.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations
    spec = {p.workload_id: p.workload for p in with_specs}["pl-2"]
    assert spec.kind == pb.WORKLOAD_KIND_VM and spec.requests["cpu"] == 1000


def test_unschedulable_is_an_answer_with_explanation(stub):
    resp = stub.Place(pb.PlaceRequest(workloads=[make_workload("never", cpu=10**13)]))
    p = resp.placements[0]
    assert p.host_id == "" and p.sequence == 0
    assert "cpu" in p.explanation.message
    assert sum(f.hosts for f in p.explanation.filters) > 0
    assert "never" not in allocations(stub)


def test_place_retry_returns_first_answer(stub):
    w = make_workload("idem-1", cpu=1234)
    first = stub.Place(pb.PlaceRequest(workloads=[w])).placements[0]
    again = stub.Place(pb.PlaceRequest(workloads=[w])).placements[0]
    assert (again.host_id, again.sequence) == (first.host_id, first.sequence)
    # The same spec with defaults spelled out is the same workload.
    explicit = make_workload("idem-1", cpu=1234, kind=pb.WORKLOAD_KIND_CONTAINER)
    assert stub.Place(pb.PlaceRequest(workloads=[explicit])).placements[0].sequence == first.sequence


def test_same_id_different_spec_is_already_exists(stub):
    stub.Place(pb.PlaceRequest(workloads=[make_workload("idem-2", cpu=100)]))
    code = code_of(lambda: stub.Place(pb.PlaceRequest(workloads=[make_workload("idem-2", cpu=200)])))
    assert code == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("request_", [
    pb.PlaceRequest(),                                                                   # no workloads
    pb.PlaceRequest(workloads=[make_workload("")]),                                      # empty id
    pb.PlaceRequest(workloads=[make_workload("d"), make_workload("d")]),                 # same id twice
    pb.PlaceRequest(workloads=[pb.Workload(id="x", requests={"bogus": 1})]),             # unknown dimension
    pb.PlaceRequest(workloads=[pb.Workload(id="x", requests={"cpu": -1})]),              # negative
    pb.PlaceRequest(workloads=[make_workload("x", kind=7)]),                             # unknown kind
    pb.PlaceRequest(workloads=[make_workload("x")], strategy=99),                        # unknown strategy
    pb.PlaceRequest(workloads=[make_workload("x")], gang=True, preempt=True),            # exclusive flags
    pb.PlaceRequest(workloads=[make_workload("x", selector_expressions=[pb.LabelExpression(key="z")])]),
], ids=["empty", "empty-id", "same-id-twice", "unknown-dimension", "negative", "unknown-kind",
        "unknown-strategy", "gang-and-preempt", "selector-without-operator"])
def test_place_malformed_is_invalid_argument(stub, request_):
    assert code_of(lambda: stub.Place(request_)) == grpc.StatusCode.INVALID_ARGUMENT


def test_place_bytes_that_are_no_place_request_are_invalid_argument(server):
    channel, _ = stub_for(server.address)
    place = channel.unary_unary(f"/{SERVICE}/Place")
    for garbage in (b"\xff\xff\xff", b"\x0a\x05\x0a\x01"):  # a bad varint; a workload cut short
        assert code_of(lambda: place(garbage, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_gang_is_all_or_nothing(stub):
    members = [make_workload("gang-1"), make_workload("gang-2"), make_workload("gang-3", cpu=10**13)]
    resp = stub.Place(pb.PlaceRequest(workloads=members, gang=True))
    assert [p.host_id for p in resp.placements] == ["", "", ""]
    assert all(p.explanation.message for p in resp.placements)
    assert not {"gang-1", "gang-2", "gang-3"} & set(allocations(stub))
    # Without the flag the two that fit are placed.
    resp = stub.Place(pb.PlaceRequest(workloads=members))
    assert [bool(p.host_id) for p in resp.placements] == [True, True, False]


def test_release_and_release_errors(stub):
    stub.Place(pb.PlaceRequest(workloads=[make_workload("rel-1"), make_workload("rel-2")]))
    # All or nothing: one unknown id fails the call and releases nothing.
    assert code_of(lambda: stub.Release(pb.ReleaseRequest(workload_ids=["rel-1", "rel-unknown"]))) == \
        grpc.StatusCode.NOT_FOUND
    assert {"rel-1", "rel-2"} <= set(allocations(stub))
    resp = stub.Release(pb.ReleaseRequest(workload_ids=["rel-1", "rel-2"]))
    assert list(resp.released_workload_ids) == ["rel-1", "rel-2"]
    assert not {"rel-1", "rel-2"} & set(allocations(stub))
    assert code_of(lambda: stub.Release(pb.ReleaseRequest(workload_ids=["rel-1"]))) == grpc.StatusCode.NOT_FOUND
    assert list(stub.Release(pb.ReleaseRequest(workload_ids=["rel-1"], allow_missing=True)).released_workload_ids) == []
    assert code_of(lambda: stub.Release(pb.ReleaseRequest())) == grpc.StatusCode.INVALID_ARGUMENT


def test_list_allocations_unknown_host_is_not_found(stub):
    assert code_of(lambda: stub.ListAllocations(pb.ListAllocationsRequest(host_id="nope"))) == \
        grpc.StatusCode.NOT_FOUND


def test_explain_places_nothing(stub):
    e = stub.Explain(pb.ExplainRequest(workload=make_workload("expl", cpu=10**13))).explanation
    assert "cpu" in e.message and e.filters
    assert "expl" not in allocations(stub)
    assert code_of(lambda: stub.Explain(pb.ExplainRequest())) == grpc.StatusCode.INVALID_ARGUMENT


def test_status_counts(stub):
    st = stub.GetStatus(pb.GetStatusRequest())
    assert list(st.dimensions) == ["cpu", "memory", "ssd", "net", "gpu"]
    listed = stub.ListHosts(pb.ListHostsRequest()).hosts
    assert sum(st.hosts_by_state.values()) == len(listed)
    assert st.allocations == len(allocations(stub))
    assert st.used["cpu"] == sum(h.used["cpu"] for h in listed)


# -- events -----------------------------------------------------------------------


def test_watch_resumes_from_a_sequence_number(stub):
    start = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("ev-h", cpu=9_000_000, memory=10**6)]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("ev-w", cpu=8_500_000)]))
    stub.Release(pb.ReleaseRequest(workload_ids=["ev-w"]))
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=start), timeout=30)
    got = [next(stream).event for _ in range(3)]
    stream.cancel()
    assert [e.sequence for e in got] == [start + 1, start + 2, start + 3]
    assert [e.type for e in got] == [pb.EVENT_TYPE_HOST_ADDED, pb.EVENT_TYPE_PLACED, pb.EVENT_TYPE_RELEASED]
    assert got[1].host_id == "ev-h" and got[1].workload.requests["cpu"] == 8_500_000


def test_watch_delivers_live_events_and_filters_types(stub):
    start = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=start, types=[pb.EVENT_TYPE_PLACED]),
                              timeout=30)
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("live-h")]))  # filtered out
    stub.Place(pb.PlaceRequest(workloads=[make_workload("live-w", cpu=1)]))
    e = next(stream).event
    stream.cancel()
    assert (e.type, e.workload_id) == (pb.EVENT_TYPE_PLACED, "live-w")


def test_watch_beyond_last_sequence_is_out_of_range(stub):
    last = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=last + 1000), timeout=30)
    assert code_of(lambda: next(stream)) == grpc.StatusCode.OUT_OF_RANGE


# -- health, reflection -------------------------------------------------------------


def test_health_reports_serving(server):
    channel, _ = stub_for(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for name in (SERVICE, ""):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_health_watch_streams_the_status_until_cancelled(server):
    channel, _ = stub_for(server.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert code_of(lambda: next(watch)) == grpc.StatusCode.CANCELLED
    # The server let go of the watcher and goes on serving.
    assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_reflection_lists_the_service(server):
    channel, _ = stub_for(server.address)
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]), timeout=10)
    listed, files = list(responses)
    assert SERVICE in [s.name for s in listed.list_services_response.service]
    assert files.file_descriptor_response.file_descriptor_proto
    channel.close()


# -- restart, metrics ------------------------------------------------------------------


def test_restart_rebuilds_exact_state(tmp_path):
    def state(s):
        status = s.GetStatus(pb.GetStatusRequest())
        status.ClearField("snapshot_sequence")  # the log's bounds: a clean stop writes a snapshot
        status.ClearField("first_sequence")
        return (s.ListHosts(pb.ListHostsRequest()), s.ListAllocations(pb.ListAllocationsRequest()), status)

    def setup(s):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"r{i}", cpu=4000 + i) for i in range(6)]))
        s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}", cpu=700, memory=100 * i) for i in range(20)]))
        s.Release(pb.ReleaseRequest(workload_ids=["w3", "w7"]))
        s.UpdateHost(pb.UpdateHostRequest(host_id="r5", state=pb.HOST_STATE_DRAINING))
        return state(s)

    with restart_after(tmp_path, setup) as (before, s):
        assert state(s) == before
        # The sequence goes on where it stopped, and a retry still returns the first answer.
        nxt = s.Place(pb.PlaceRequest(workloads=[make_workload("w-next", cpu=1)])).placements[0]
        assert nxt.sequence == before[2].last_sequence + 1
        retry = s.Place(pb.PlaceRequest(workloads=[make_workload("w1", cpu=700, memory=100)])).placements[0]
        assert retry.host_id == {p.workload_id: p.host_id for p in before[1].allocations}["w1"]


def test_metrics_endpoint_exports_placements_and_refusals(tmp_path):
    srv = ServerProcess(tmp_path, extra=["--metrics", "127.0.0.1:0"]).start()
    try:
        _, s = stub_for(srv.address)
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("m1")]))
        s.Place(pb.PlaceRequest(workloads=[make_workload("m-ok"), make_workload("m-no", cpu=10**9)]))
        port = int(re.search(r'"msg": "metrics endpoint".*?"port": (\d+)', srv.log()).group(1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "hci_scheduler_placements_total 1.0" in text
        assert re.search(r'hci_scheduler_refusals_total\{reason="[^"]+"\} 1\.0', text)
        assert 'hci_scheduler_hosts{state="ready"} 1.0' in text
        assert 'hci_scheduler_utilization_ratio{dimension="cpu"}' in text
        assert "hci_scheduler_writer_batch_workloads_bucket" in text
        # The one Place call is counted by method and status, and its latency histogram holds
        # exactly one observation (its count, not its values: timings are bench/'s business).
        assert re.search(r'hci_scheduler_rpc_total\{[^}]*method="Place"[^}]*\} 1\.0', text)
        assert re.search(RPC_SECONDS + r'_count\{[^}]*method="Place"[^}]*\} 1\.0', text)
    finally:
        srv.kill()


def test_preempt_evicts_lower_priority_and_reports_it(stub):
    # "pre-h" is the only host with 20,000,000 millicores: the high-priority
    # workload fits only after the low-priority one leaves it.
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("pre-h", cpu=20_000_000, memory=10**6)]))
    low = stub.Place(pb.PlaceRequest(workloads=[make_workload("pre-low", cpu=15_000_000, priority=1)]))
    assert low.placements[0].host_id == "pre-h"
    start = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    high = stub.Place(pb.PlaceRequest(workloads=[make_workload("pre-high", cpu=10_000_000, priority=10)],
                                      preempt=True)).placements[0]
    assert (high.host_id, list(high.evicted_workload_ids)) == ("pre-h", ["pre-low"])
    listed = allocations(stub)
    assert listed["pre-high"] == "pre-h" and "pre-low" not in listed
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=start), timeout=30)
    events = [next(stream).event for _ in range(2)]
    stream.cancel()
    # The eviction is logged before the placement, so a replay frees the room first.
    assert [(e.type, e.workload_id) for e in events] == [(pb.EVENT_TYPE_EVICTED, "pre-low"),
                                                          (pb.EVENT_TYPE_PLACED, "pre-high")]


@pytest.mark.parametrize("request_", [
    # a per-host service in a gang call; one with a gang id of its own; one with volumes
    pb.PlaceRequest(workloads=[pb.Workload(id="ph-a", requests={"cpu": 1}, per_host=True)], gang=True),
    pb.PlaceRequest(workloads=[pb.Workload(id="ph-b", requests={"cpu": 1}, per_host=True, gang="g")]),
    pb.PlaceRequest(workloads=[pb.Workload(id="ph-c", requests={"cpu": 1}, per_host=True, volume_ids=["v"])]),
    # a workload creating a volume in a gang; a volume of 0 GiB; negative replicas; the same new volume twice
    pb.PlaceRequest(workloads=[pb.Workload(id="nv-a", requests={"cpu": 1}, gang="g",
                                           new_volumes=[pb.Volume(id="nv-a-v", size_gib=1)])]),
    pb.PlaceRequest(workloads=[pb.Workload(id="nv-b", new_volumes=[pb.Volume(id="nv-b-v", size_gib=0)])]),
    pb.PlaceRequest(workloads=[pb.Workload(id="nv-c", new_volumes=[pb.Volume(id="nv-c-v", size_gib=1,
                                                                               replicas=-1)])]),
    pb.PlaceRequest(workloads=[pb.Workload(id="nv-d", new_volumes=[pb.Volume(id="same", size_gib=1)]),
                               pb.Workload(id="nv-e", new_volumes=[pb.Volume(id="same", size_gib=1)])]),
], ids=["per-host-gang-call", "per-host-gang-id", "per-host-volumes", "volume-gang", "volume-0-gib",
        "volume-negative-replicas", "volume-twice"])
def test_place_special_workload_misuse_is_invalid_argument_and_places_nothing(stub, request_):
    assert code_of(lambda: stub.Place(request_)) == grpc.StatusCode.INVALID_ARGUMENT
    placed = allocations(stub)
    assert not any(w.id in placed for w in request_.workloads)
