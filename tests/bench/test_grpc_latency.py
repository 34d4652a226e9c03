"""bench.grpc_latency against a real server: every timed call is a fresh placement
(a repeated id would be an idempotent retry, answered without placing)."""
from bench import grpc_latency as g


def test_grpc_bench_places_every_workload_it_times():
    from hci_scheduler.v1 import scheduler_pb2 as pb

    server = g._Server("normal")
    try:
        ch, stub = g._stub(server.address)
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
            pb.Host(id=f"h{j}", capacity={"cpu": 64_000, "memory": 262_144}) for j in range(50)]), timeout=60)
        u = g.unary(server.address, clients=2, calls_per_client=10, tag="u", warm=3)
        b1 = g.batched(server.address, calls=2, batch=40, tag="b1", warm=1)
        b2 = g.batched(server.address, calls=2, batch=40, tag="b2", clients=2, warm=1)
        assert u["calls"] == 20 and b1["placements"] == 80 and b2["placements"] == 160
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        # warm-up calls place too: 2 x 3 unary, 1 x 40 and 2 x 40 batched
        assert status.allocations == 20 + 6 + 80 + 40 + 160 + 80
        ch.close()
    finally:
        server.stop()
