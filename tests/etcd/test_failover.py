"""Failover with real processes: `hci-scheduler serve --store etcd://...` replicas on a real
etcd. A leader paused past its lease writes nothing when it wakes and becomes a follower; a
leader SIGKILLed under concurrent clients, again and again, loses no acknowledged placement,
overcommits no host and leaves a gap-free log. Everything is checked from the log etcd holds,
independently of the servers."""
from __future__ import annotations

import collections
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.etcd_client import EtcdClient
from hci_scheduler.ha.local_etcd import free_port
from hci_scheduler.store.etcd import EtcdStore
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.etcd

CPU, MEM = 64_000, 262_144


def replica(tmp_path, etcd, prefix: str) -> ServerProcess:
    return ServerProcess(tmp_path, extra=["--store", etcd.url, "--etcd-prefix", prefix, "--lease-ttl-s", "1",
                                          "--snapshot-every", "0"],
                         listen=f"127.0.0.1:{free_port()}")


def logged_events(etcd, prefix: str) -> list[pb.Event]:
    """The log as etcd holds it, decoded (a store that never writes)."""
    store = EtcdStore(EtcdClient(etcd.endpoints), prefix, own_client=True)
    try:
        return [pb.Event.FromString(r.body) for r in store.read()]
    finally:
        store.close()


def status(address: str) -> pb.GetStatusResponse | None:
    try:
        with SchedulerClient(address, timeout=2) as c:
            return c.status()
    except grpc.RpcError:
        return None


def leader_of(replicas) -> ServerProcess | None:
    for r in replicas:
        if r.proc.poll() is None:
            st = status(r.address)
            if st is not None and st.writable:
                return r
    return None


def workload(wid: str, cpu: int = 1000, mem: int = 1024) -> pb.Workload:
    return pb.Workload(id=wid, requests={"cpu": cpu, "memory": mem})


def test_paused_leader_wakes_writes_nothing_and_follows(tmp_path, etcd_server, etcd_prefix):
    a = replica(tmp_path, etcd_server, etcd_prefix).start()
    wait_for(lambda: leader_of([a]), what="the first replica to lead")
    metrics_port = free_port()
    b = replica(tmp_path, etcd_server, etcd_prefix)
    b.extra += ["--metrics", f"127.0.0.1:{metrics_port}"]
    b.start()
    try:
        with SchedulerClient(a.address) as ca:
            ca.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": CPU, "memory": MEM}) for i in range(2)])
            ca.place([workload("before")])
        a.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(lambda: leader_of([b]), what="the follower to take over")
        took_over_s = time.monotonic() - t0
        with SchedulerClient(b.address) as cb:
            after = cb.place([workload("after")]).placements[0]
        assert after.host_id and after.sequence == 4  # 2 hosts, "before", then this

        a.proc.send_signal(signal.SIGCONT)
        with SchedulerClient(a.address, timeout=10) as ca, pytest.raises(grpc.RpcError) as refused:
            ca.place([workload("from-the-paused-one")])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # It stepped down and follows: it has b's event, refuses writes and names b as leader.
        st = wait_for(lambda: (s := status(a.address)) is not None and s.last_sequence == 4 and s, what="a to follow")
        assert not st.writable and a.proc.poll() is None
        trailers = dict(refused.value.trailing_metadata() or ())
        assert trailers.get("hci-leader") in (None, b.address)  # named once a knows who leads
        assert "lost leadership" in a.log() or "this replica does not hold the leader key" in a.log()

        events = logged_events(etcd_server, etcd_prefix)
        assert [e.sequence for e in events] == [1, 2, 3, 4]
        assert [e.workload_id for e in events if e.type == pb.EVENT_TYPE_PLACED] == ["before", "after"]
        assert took_over_s < 10
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert "hci_ha_is_leader 1.0" in metrics and "hci_ha_leader_changes_total 1.0" in metrics
        assert "hci_ha_follower_lag_events 0.0" in metrics and "hci_ha_etcd_commits " in metrics
    finally:
        for r in (a, b):
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)
                r.kill()


def test_sigkill_leader_under_concurrent_clients_loses_nothing(tmp_path, etcd_server, etcd_prefix):
    # 8 clients place and release (each holds at most 2 workloads of 1,000 mCPU on 8 hosts of
    # 4,000: hosts fill up and free again) while the leader is SIGKILLed 3 times.
    n_hosts, host_cpu, n_clients, kills = 8, 4000, 8, 3
    replicas = [replica(tmp_path, etcd_server, etcd_prefix).start()]
    wait_for(lambda: leader_of(replicas), what="a leader")
    replicas += [replica(tmp_path, etcd_server, etcd_prefix).start() for _ in range(2)]
    addresses = [r.address for r in replicas]
    with SchedulerClient(addresses=addresses) as c:
        c.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": host_cpu, "memory": MEM}) for i in range(n_hosts)])
    acked: dict[str, tuple[str, int]] = {}  # workload id -> (host, sequence) as answered
    released: set[str] = set()  # releases answered
    failed = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with SchedulerClient(addresses=addresses, timeout=5, failover_s=20) as cl:
            i, previous = 0, None
            while not stop.is_set():
                wid = f"c{k}-{i}"
                i += 1
                try:
                    p = cl.place([workload(wid, cpu=1000, mem=64)]).placements[0]
                    if not p.host_id:
                        continue  # no room now: refused with its explanation
                    with lock:
                        acked[wid] = (p.host_id, p.sequence)
                    if previous is not None:
                        cl.release([previous], allow_missing=True)
                        with lock:
                            released.add(previous)
                    previous = wid
                except grpc.RpcError as exc:
                    failed[exc.code().name] += 1  # unanswered: may or may not be in the log

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    try:
        for _ in range(kills):
            wait_for(lambda: len(acked) > 20, what="placements before the kill")
            before = len(acked)
            leader = wait_for(lambda: leader_of(replicas), what="a leader")
            leader.kill()
            wait_for(lambda before=before: len(acked) > before + 20, timeout_s=30,
                     what="placements after the failover")
            fresh = replica(tmp_path, etcd_server, etcd_prefix)
            fresh.listen = leader.listen  # the same address: the clients' list stays right
            replicas[replicas.index(leader)] = fresh.start()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for r in replicas:
            r.kill()

    events = logged_events(etcd_server, etcd_prefix)
    # Gap-free and in order.
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    placed = {e.workload_id: e for e in events if e.type == pb.EVENT_TYPE_PLACED}
    assert len(placed) == sum(e.type == pb.EVENT_TYPE_PLACED for e in events)  # no workload placed twice
    # Every acknowledged placement is in the log, on the host and at the sequence it was answered with;
    # every acknowledged release too.
    for wid, (host, seq) in acked.items():
        assert wid in placed, f"acknowledged placement {wid} lost"
        assert (placed[wid].host_id, placed[wid].sequence) == (host, seq)
    gone = {e.workload_id for e in events if e.type == pb.EVENT_TYPE_RELEASED}
    assert released <= gone
    # No host ever holds more than its capacity: usage recomputed event by event from the log alone.
    used, where = collections.Counter(), {}
    for e in events:
        if e.type == pb.EVENT_TYPE_PLACED:
            where[e.workload_id] = (e.host_id, e.workload.requests["cpu"])
            used[e.host_id] += e.workload.requests["cpu"]
            assert used[e.host_id] <= host_cpu, f"event {e.sequence} overcommits {e.host_id}"
        elif e.type == pb.EVENT_TYPE_RELEASED:
            host, cpu = where.pop(e.workload_id)
            used[host] -= cpu
    assert len(acked) > (kills + 1) * 20 and len(released) > 20
