"""GetStatus totals stay exact at the largest cluster the scheduler accepts (issue 13, item 13).

An in-process server on a memory store. Expected figures are Python ints; the proto's
used and allocatable are int64, which the cluster's bound (every dimension totals at
most 2**63 - 1 over hosts) keeps exact.
"""
import grpc
import pytest

from hci_scheduler.server import app
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import stub_for

Q = 2**46 - 1
INT64_MAX = 2**63 - 1


@pytest.fixture
def stub():
    srv, port = app.create_server("127.0.0.1:0", dimensions=("cpu", "memory"))
    srv.start()
    channel, s = stub_for(f"127.0.0.1:{port}")
    yield s
    channel.close()
    srv.stop(0)


def hosts(n, start=0, ratio=64.0):
    return [pb.Host(id=f"h{i}", capacity={"cpu": Q, "memory": 1}, allocation_ratios={"cpu": ratio},
                    labels={"kvm": "true"})
            for i in range(start, start + n)]


def test_get_status_totals_are_exact_up_to_the_largest_cluster(stub):
    # The cluster, 2,100 hosts of 2**46 - 1 millicores at 64x, totals
    # 9,457,559,217,477,907,200 > 2**63 - 1: refused whole, naming the first host past it.
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts(2100)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "h2048" in err.value.details() and "cpu" in err.value.details()
    status = stub.GetStatus(pb.GetStatusRequest())
    assert status.hosts_by_state["ready"] == 0

    # 2,048 of them fit: 2,048 x 64 x (2**46 - 1) = 2**63 - 2**17.
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts(2048)))
    status = stub.GetStatus(pb.GetStatusRequest())
    assert status.utilization["cpu"] == 0.0  # nothing placed: 0, not negative
    assert status.used["cpu"] == 0
    assert status.allocatable["cpu"] == 2048 * Q

    # Fill every host to its limit: a VM of 2**46 - 1 millicores is charged 64x that
    # (VMs are never overcommitted), as much as 64 containers of the same size.
    ws = [pb.Workload(id=f"vm{i}", requests={"cpu": Q}, kind=pb.WORKLOAD_KIND_VM) for i in range(2048)]
    placed = stub.Place(pb.PlaceRequest(workloads=ws)).placements
    assert all(p.host_id for p in placed)
    status = stub.GetStatus(pb.GetStatusRequest())
    assert status.used["cpu"] == 2048 * 64 * Q == INT64_MAX - (2**17 - 1)
    assert status.utilization["cpu"] == 64.0
    assert status.allocations == 2048
