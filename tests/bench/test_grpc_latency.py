"""bench.grpc_latency against a real server: every timed call is a fresh placement
(a repeated id would be an idempotent retry, answered without placing)."""
from hci_scheduler.bench import grpc_latency as g


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


def test_grpc_bench_compares_transports_measured_in_turn(capsys):
    def fake(p50: float, per_s: float) -> dict:
        return {"health": {"p50_ms": 0.3, "p99_ms": 0.5},
                "unary": [{"p50_ms": p50, "p99_ms": 2 * p50, "server_cpu_us_per_call": 500, "calls_per_s": 1000},
                          {"p50_ms": 3.0, "p99_ms": 6.0, "calls_per_s": 2500}],
                "batched": {"placements_per_s": per_s}, "batched_2_clients": {"placements_per_s": per_s}}

    table = g.compare({"grpcio": [fake(0.7, 60_000), fake(0.9, 50_000), fake(0.8, 70_000)],
                       "aio": [fake(1.0, 40_000)] * 3})
    # grpcio: median of 0.7, 0.9, 0.8 = 0.8 (0.7-0.9); batched median 60,000 (50,000-70,000)
    assert "| grpcio | 0.3 (0.3-0.3) | 0.5 (0.5-0.5) | 0.8 (0.7-0.9) |" in table
    assert "60,000 (50,000-70,000)" in table
    assert "median (min-max) of 3 round(s)" in table
