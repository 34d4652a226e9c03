"""Hypothesis fuzz of the API: every message gets a status code, and the server keeps serving."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import stub_for

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
)
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


def test_server_still_consistent_after_fuzzing(server):
    # Runs after the fuzz test in file order: the state still answers reads.
    _, stub = stub_for(server.address)
    st_ = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    assert st_.allocations == len(stub.ListAllocations(pb.ListAllocationsRequest(), timeout=10).allocations)
