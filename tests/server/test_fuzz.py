"""Hypothesis fuzz of the API: every message gets a status code, and the server keeps serving."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ServerProcess, stub_for

# Codes a well-behaved server may answer with; UNKNOWN, INTERNAL and
# UNAVAILABLE would mean a crash or an unmapped exception.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED}

ids = st.one_of(st.just(""), st.text(min_size=1, max_size=8), st.text(min_size=250, max_size=300))
dims = st.sampled_from(["cpu", "memory", "ssd", "net", "gpu", "", "bogus", "CPU"])
quantities = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(0, 10_000), st.just(0))
enums = st.integers(-5, 10)
qmap = st.dictionaries(dims, quantities, max_size=6)
smap = st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
doubles = st.floats(allow_nan=True, allow_infinity=True)

taints = st.builds(pb.Taint, key=st.text(max_size=4), value=st.text(max_size=4), effect=enums)
hosts = st.builds(pb.Host, id=ids, capacity=qmap, reserved=qmap, labels=smap, taints=st.lists(taints, max_size=2),
                  allocation_ratios=st.dictionaries(dims, doubles, max_size=2), state=enums,
                  pool=st.text(max_size=4))
terms = st.builds(pb.AffinityTerm, group=st.text(max_size=4), topology=st.text(max_size=4), hard=st.booleans(),
                  weight=st.integers(-200, 200))
workloads = st.builds(
    pb.Workload, id=ids, requests=qmap, kind=enums, isolation=enums, tenant=st.text(max_size=3),
    group=st.text(max_size=3), node_selector=smap, priority=st.integers(-(2**63), 2**63 - 1),
    anti_affinities=st.lists(terms, max_size=2),
    selector_expressions=st.lists(st.builds(pb.LabelExpression, key=st.text(max_size=3), operator=enums,
                                            values=st.lists(st.text(max_size=3), max_size=2)), max_size=2),
    spreads=st.lists(st.builds(pb.SpreadConstraint, topology=st.text(max_size=3),
                               max_skew=st.integers(-5, 5), hard=st.booleans()), max_size=1),
    new_volumes=st.lists(st.builds(pb.Volume, id=ids, size_gib=quantities, replicas=st.integers(-3, 3)),
                         max_size=1),
    container=st.one_of(st.none(), st.builds(
        pb.ContainerSpec, image=st.one_of(st.just(""), st.text(max_size=5), st.text(min_size=250, max_size=300)),
        command=st.lists(st.text(max_size=4), max_size=3), args=st.lists(st.text(max_size=4), max_size=300),
        env=smap, restart_policy=enums,
        mounts=st.lists(st.builds(pb.VolumeMount, volume_id=ids, path=st.text(max_size=4)), max_size=2))),
    vm=st.one_of(st.none(), st.builds(pb.VmSpec, disk_image=st.text(max_size=10), launcher_image=st.text(max_size=5))),
)
statuses = st.builds(pb.WorkloadStatus, workload_id=ids, host_id=ids, state=enums,
                     exit_code=st.integers(-(2**31), 2**31 - 1), message=st.text(max_size=10),
                     restarts=st.integers(-3, 3))
calls = st.one_of(
    st.builds(lambda hs: ("RegisterHosts", pb.RegisterHostsRequest(hosts=hs)), st.lists(hosts, max_size=4)),
    st.builds(lambda ws, g, s, p: ("Place", pb.PlaceRequest(workloads=ws, gang=g, strategy=s, preempt=p)),
              st.lists(workloads, max_size=5), st.booleans(), enums, st.booleans()),
    st.builds(lambda n: ("Place", pb.PlaceRequest(workloads=[pb.Workload(id=f"many-{i}") for i in range(n)])),
              st.sampled_from([0, 1, 5000])),
    st.builds(lambda i, s, l: ("UpdateHost", pb.UpdateHostRequest(host_id=i, state=s, labels=l)), ids, enums, smap),
    st.builds(lambda i: ("RemoveHost", pb.RemoveHostRequest(host_id=i)), ids),
    st.builds(lambda ws, m: ("Release", pb.ReleaseRequest(workload_ids=ws, allow_missing=m)),
              st.lists(ids, max_size=4), st.booleans()),
    st.builds(lambda w: ("Explain", pb.ExplainRequest(workload=w)), workloads),
    st.builds(lambda s: ("ListHosts", pb.ListHostsRequest(state=s)), enums),
    st.builds(lambda h: ("ListAllocations", pb.ListAllocationsRequest(host_id=h)), ids),
    st.builds(lambda v: ("DeleteVolume", pb.DeleteVolumeRequest(volume_id=v)), ids),
    st.builds(lambda h, ss, a: ("ReportStatus", pb.ReportStatusRequest(host_id=h, statuses=ss, applied_sequence=a)),
              ids, st.lists(statuses, max_size=3), st.integers(0, 2**64 - 1)),
)


@pytest.fixture(scope="module")
def conn(server):
    channel, stub = stub_for(server.address)
    yield stub, health_pb2_grpc.HealthStub(channel)
    channel.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls)
def test_fuzzed_messages_get_a_status_and_the_server_keeps_serving(conn, call):
    stub, health = conn
    method, request = call
    try:
        getattr(stub, method)(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, (method, exc.code(), exc.details())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


def _allocation_count(stub) -> int:
    n, token = 0, ""
    while True:
        page = stub.ListAllocations(pb.ListAllocationsRequest(page_token=token), timeout=10)
        n += len(page.allocations)
        token = page.next_page_token
        if not token:
            return n


def test_server_still_consistent_after_fuzzing(server):
    # Runs after the fuzz test in file order: the state still answers reads.
    _, stub = stub_for(server.address)
    st_ = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert st_.allocations == _allocation_count(stub)


# -- raw bytes: what protobuf cannot read, or reads as something else ------------

SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"]
#: A valid request of every method, to mutate.
SAMPLES = {
    "RegisterHosts": pb.RegisterHostsRequest(hosts=[pb.Host(id="raw-h", capacity={"cpu": 4000, "memory": 8192},
                                                             labels={"zone": "a"}, taints=[pb.Taint(key="t")])]),
    "UpdateHost": pb.UpdateHostRequest(host_id="raw-h", labels={"zone": "b"}),
    "RemoveHost": pb.RemoveHostRequest(host_id="raw-gone"),
    "ListHosts": pb.ListHostsRequest(state=pb.HOST_STATE_READY),
    "Place": pb.PlaceRequest(workloads=[pb.Workload(id="raw-w", requests={"cpu": 100}, tenant="t", group="g"),
                                        pb.Workload(id="raw-v", node_selector={"zone": "a"},
                                                    tolerations=[pb.Toleration(key="t")])]),
    "Release": pb.ReleaseRequest(workload_ids=["raw-w"], allow_missing=True),
    "ListAllocations": pb.ListAllocationsRequest(include_workloads=True),
    "Explain": pb.ExplainRequest(workload=pb.Workload(id="raw-e", requests={"cpu": 1})),
    "WatchEvents": pb.WatchEventsRequest(after_sequence=0, types=[pb.EVENT_TYPE_PLACED]),
    "GetStatus": pb.GetStatusRequest(),
    "ListVolumes": pb.ListVolumesRequest(),
    "DeleteVolume": pb.DeleteVolumeRequest(volume_id="raw-vol"),
    "Rebalance": pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, max_moves=5, time_limit_s=0.5, seed=1),
    "ApplyPlan": pb.ApplyPlanRequest(plan_id="raw-plan"),
    "Drain": pb.DrainRequest(host_id="raw-gone", time_limit_s=0.5),
    "PlanCapacity": pb.PlanCapacityRequest(workloads=[pb.Workload(id="raw-p", requests={"cpu": 100})],
                                           host_types=[pb.HostType(name="raw-t", capacity={"cpu": 4000}, price=3)]),
    "ReportStatus": pb.ReportStatusRequest(host_id="raw-h", applied_sequence=3, statuses=[
        pb.WorkloadStatus(workload_id="raw-w", state=pb.WORKLOAD_STATE_RUNNING, container_id="c1")]),
}
#: Answers to bytes that decode into a request the server may refuse; never INTERNAL or UNKNOWN.
RAW_ALLOWED = ALLOWED | {grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS}


def test_every_method_has_a_sample():
    assert set(SAMPLES) == {m.name for m in SERVICE.methods}


@pytest.fixture(scope="module", params=["grpcio", "aio", "lean"])
def raw_server(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"raw-{request.param}")
    srv = ServerProcess(tmp, data_dir=tmp / "data", extra=["--transport", request.param]).start()
    channel, stub = stub_for(srv.address)
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[pb.Host(id="base", capacity={"cpu": 64000,
                                                                                     "memory": 65536})]))
    yield channel, stub
    channel.close()
    srv.kill()


def _mutated(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, at, value in edits:
        i = at % (len(out) + 1)
        if op == "flip" and out:
            out[i % len(out)] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[i % len(out)] = value
        elif op == "insert":
            out.insert(i, value)
        elif op == "cut":
            del out[i:]
    return bytes(out)


def _call_raw(channel, method: str, data: bytes):
    """The status code of `method` called with `data` as its request's bytes."""
    path = f"/{SERVICE.full_name}/{method}"
    try:
        if method == "WatchEvents":
            stream = channel.unary_stream(path)(data, timeout=2)
            for _ in stream:
                break  # a request that decodes may stream: one answer is enough
            stream.cancel()
        else:
            channel.unary_unary(path)(data, timeout=30)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and method == "WatchEvents":
            return grpc.StatusCode.OK
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method == "WatchEvents":
            return grpc.StatusCode.OK  # decoded, and waiting for events
        return exc.code()
    return grpc.StatusCode.OK


edits = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "cut"]), st.integers(0, 1 << 16),
                           st.integers(0, 255)), min_size=1, max_size=6)
raw_bytes = st.one_of(st.binary(min_size=1, max_size=200),
                      st.builds(lambda m, e: _mutated(SAMPLES[m].SerializeToString(), e), st.sampled_from(sorted(SAMPLES)),
                                edits))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(SAMPLES)), data=raw_bytes)
def test_random_and_mutated_bytes_are_invalid_argument_and_change_nothing(raw_server, method, data):
    channel, stub = raw_server
    before = stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    code = _call_raw(channel, method, data)
    assert code == grpc.StatusCode.OK or code in RAW_ALLOWED, (method, code, data)
    if code != grpc.StatusCode.OK:
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence == before  # a failed call changes nothing


#: A request of each method whose string holds invalid UTF-8 ("\u00a7" is the two bytes c2 a7).
BAD_UTF8 = {m: r.SerializeToString().replace("\u00a7".encode(), b"\xc3\x28") for m, r in {
    "RegisterHosts": pb.RegisterHostsRequest(hosts=[pb.Host(id="\u00a7")]),
    "UpdateHost": pb.UpdateHostRequest(host_id="\u00a7"),
    "RemoveHost": pb.RemoveHostRequest(host_id="\u00a7"),
    "ListHosts": pb.ListHostsRequest(page_token="\u00a7"),
    "Place": pb.PlaceRequest(workloads=[pb.Workload(id="\u00a7", requests={"cpu": 1})]),
    "Release": pb.ReleaseRequest(workload_ids=["\u00a7"]),
    "ListAllocations": pb.ListAllocationsRequest(host_id="\u00a7"),
    "Explain": pb.ExplainRequest(workload=pb.Workload(id="\u00a7")),
    "WatchEvents": pb.WatchEventsRequest(incarnation="\u00a7"),
    "ListVolumes": pb.ListVolumesRequest(page_token="\u00a7"),
    "DeleteVolume": pb.DeleteVolumeRequest(volume_id="\u00a7"),
    "Rebalance": pb.RebalanceRequest(host_ids=["\u00a7"]),
    "ApplyPlan": pb.ApplyPlanRequest(plan_id="\u00a7"),
    "Drain": pb.DrainRequest(host_id="\u00a7"),
    "PlanCapacity": pb.PlanCapacityRequest(host_types=[pb.HostType(name="\u00a7")]),
}.items()}


@pytest.mark.parametrize("method", sorted(SAMPLES))
def test_undecodable_requests_are_invalid_argument_on_every_method(raw_server, method):
    channel, stub = raw_server
    before = stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    undecodable = [b"\xff" * 11,  # a varint that never ends
                   b"\x0a\x7f",  # field 1: 127 bytes announced, none sent
                   b"\x0f",  # wire type 7 does not exist
                   b"\x0b"]  # a group that never ends
    for data in undecodable + ([BAD_UTF8[method]] if method in BAD_UTF8 else []):
        assert _call_raw(channel, method, data) == grpc.StatusCode.INVALID_ARGUMENT, (method, data)
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence == before
