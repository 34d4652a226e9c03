"""SIGKILL in the middle of a concurrent load, then restart: every acknowledged
placement is present, nothing is half-applied, no host is overcommitted."""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import grpc

from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ServerProcess, make_host, stub_for

N_HOSTS = 40
BATCH = 10


def test_sigkill_under_load_loses_no_acknowledged_placement(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    # Hosts of different sizes; the load asks for more than they hold in total
    # so that refusals happen too and a wrong replay would overcommit.
    hosts = [make_host(f"h{i}", cpu=2000 + 500 * (i % 5), memory=4096 + 1024 * (i % 3)) for i in range(N_HOSTS)]
    capacity = {h.id: dict(h.capacity) for h in hosts}
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts))

    acked: dict[str, str] = {}            # workload id -> host id, acknowledged placements
    released: set[str] = set()            # acknowledged releases
    releasing: set[str] = set()           # releases sent (maybe applied before the kill, unacknowledged)
    sent_batches: list[list[str]] = []    # every batch call, acknowledged or not
    lock = threading.Lock()
    stop = threading.Event()

    def client(t: int) -> None:
        _, st = stub_for(srv.address)
        for i in range(10_000):  # bounded; the kill ends it much earlier
            if stop.is_set():
                return
            if t % 2 == 0:  # unary calls
                w = pb.Workload(id=f"u{t}-{i}", requests={"cpu": 100 + 37 * (i % 7), "memory": 64 + 13 * (i % 5)})
                batch = [w]
            else:           # batched calls, never refused as a whole
                batch = [pb.Workload(id=f"b{t}-{i}-{k}", requests={"cpu": 50, "memory": 32}) for k in range(BATCH)]
            with lock:
                sent_batches.append([w.id for w in batch])
            try:
                resp = st.Place(pb.PlaceRequest(workloads=batch), timeout=30)
                with lock:
                    for p in resp.placements:
                        if p.host_id:
                            acked[p.workload_id] = p.host_id
                if t == 0 and i % 5 == 4:  # some churn
                    victim = f"u0-{i - 2}"
                    if victim in acked:
                        with lock:
                            releasing.add(victim)
                        st.Release(pb.ReleaseRequest(workload_ids=[victim]), timeout=30)
                        with lock:
                            released.add(victim)
            except grpc.RpcError:
                return  # the server was killed

    threads = [threading.Thread(target=client, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.proc.kill()  # SIGKILL, in the middle of the load
    srv.proc.wait(30)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acked) >= 300, "the load did not get going before the kill"

    srv2 = ServerProcess(tmp_path, data_dir=data).start()
    try:
        _, s2 = stub_for(srv2.address)
        allocs = s2.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations
        present = {p.workload_id: p.host_id for p in allocs}
        # Every acknowledged placement is there, on its host, unless a release of it was
        # sent: a release in flight at the kill may have been made durable unacknowledged.
        for wid, hid in acked.items():
            if wid in releasing and wid not in released:
                assert present.get(wid) in (hid, None), wid
            elif wid not in released:
                assert present.get(wid) == hid, wid
        for wid in released:
            assert wid not in present
        # Nothing half-applied: a batch call is wholly present or wholly absent
        # (its members are small enough that none is refused).
        for ids in sent_batches:
            if len(ids) == BATCH:
                n = sum(i in present for i in ids)
                assert n in (0, BATCH), ids
        # No host overcommitted, recomputed from the allocations alone.
        used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for p in allocs:
            for dim, q in p.workload.requests.items():
                used[p.host_id][dim] += q
        for hid, dims in used.items():
            for dim, q in dims.items():
                assert q <= capacity[hid].get(dim, 0), (hid, dim, q)
        # ... and the server's own accounting agrees with the recomputation.
        for h in s2.ListHosts(pb.ListHostsRequest()).hosts:
            for dim in ("cpu", "memory"):
                assert h.used[dim] == used[h.id][dim], (h.id, dim)
        # The event log replays to the same allocations.
        last = s2.GetStatus(pb.GetStatusRequest()).last_sequence
        replay: dict[str, str] = {}
        stream = s2.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=60)
        for resp in stream:
            e = resp.event
            if e.type == pb.EVENT_TYPE_PLACED:
                replay[e.workload_id] = e.host_id
            elif e.type in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
                del replay[e.workload_id]
            if e.sequence == last:
                break
        stream.cancel()
        assert replay == present
    finally:
        srv2.kill()
