"""A follower the leader's log was compacted past, with real processes on a real etcd: paused
(SIGSTOP) while the leader writes past two snapshots and a compaction, it catches up by
itself from the newest snapshot once it runs again, with the leader's allocations and
sequence, and takes over with nothing lost when the leader is then killed. Checked against
what the clients were answered, not against the servers' own view of themselves."""
from __future__ import annotations

import contextlib
import signal
import threading

import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.local_etcd import free_port
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

from .test_failover import leader_of, status, workload

pytestmark = pytest.mark.etcd

HOST_CPU, N_HOSTS = 16_000, 4


def replica(tmp_path, etcd, prefix: str) -> ServerProcess:
    # A snapshot every 100 events, no tail kept before the one before the newest: a few hundred
    # events compact the log past a paused follower.
    return ServerProcess(tmp_path, extra=["--store", etcd.url, "--etcd-prefix", prefix, "--lease-ttl-s", "1",
                                          "--snapshot-every", "100", "--snapshot-tail", "0"],
                         listen=f"127.0.0.1:{free_port()}")


class Acked:
    """What the clients were answered: live placements (id -> (host, sequence)), and the
    highest sequence any answer carried."""

    def __init__(self):
        self.live: dict[str, tuple[str, int]] = {}
        self.released = 0

    def place(self, c: SchedulerClient, ids: list[str]) -> None:
        for p in c.place([workload(w, cpu=500, mem=64) for w in ids]).placements:
            assert p.host_id, f"{p.workload_id} found no room: the test's setup is wrong"
            self.live[p.workload_id] = (p.host_id, p.sequence)

    def release(self, c: SchedulerClient, ids: list[str]) -> None:
        c.release(ids)
        for w in ids:
            del self.live[w]
        self.released += len(ids)


def listed(address: str) -> tuple[int, dict, dict]:
    """(sequence, workload id -> (host, sequence), host -> cpu used) from one replica's listing."""
    with SchedulerClient(address, timeout=10) as c:
        items = c.allocations(include_workloads=True)
        out, used = {}, {}
        for p in items:
            out[p.workload_id] = (p.host_id, p.sequence)
            used[p.host_id] = used.get(p.host_id, 0) + p.workload.requests["cpu"]
        return items.sequence, out, used


def churn_until(c: SchedulerClient, acked: Acked, leader: str, past: int, tag: str = "r") -> int:
    """Place 8 and release the 8 placed the round before (16 events a round) until the
    leader's log is compacted past sequence `past` (snapshots are written in the background
    as the log grows: how many rounds that takes depends on the machine). Returns the rounds."""
    previous: list[str] = []
    for k in range(400):
        ids = [f"{tag}{k}-{i}" for i in range(8)]
        acked.place(c, ids)
        if previous:
            acked.release(c, previous)
        previous = ids
        if k >= 12 and (st := status(leader)) is not None and st.first_sequence > past + 1:
            return k + 1
    raise AssertionError(f"the leader's log was not compacted past {past} after 400 rounds")


@contextlib.contextmanager
def paused_follower(tmp_path, etcd, prefix: str, base: int):
    """A leader a and a follower b on `N_HOSTS` hosts with `base` placements, b paused
    (SIGSTOP) once it follows them: (a, b, client of both, Acked, b's sequence). Both
    resumed and killed at the end."""
    a = replica(tmp_path, etcd, prefix).start()
    wait_for(lambda: leader_of([a]), what="the first replica to lead")
    b = replica(tmp_path, etcd, prefix).start()
    acked = Acked()
    try:
        with SchedulerClient(addresses=[a.address, b.address], timeout=10, failover_s=30) as c:
            c.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": HOST_CPU, "memory": 262_144})
                              for i in range(N_HOSTS)])
            acked.place(c, [f"base-{i}" for i in range(base)])
            paused_at = wait_for(lambda: (s := status(b.address)) and s.last_sequence == N_HOSTS + base and s.last_sequence,
                                 what="b to follow")
            b.proc.send_signal(signal.SIGSTOP)
            yield a, b, c, acked, paused_at
    finally:
        for r in (a, b):
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)
            r.kill()


def test_paused_follower_catches_up_past_compaction_then_takes_over(tmp_path, etcd_server, etcd_prefix):
    with paused_follower(tmp_path, etcd_server, etcd_prefix, base=20) as (a, b, c, acked, paused_at):
        rounds = churn_until(c, acked, a.address, paused_at)  # snapshots every 100 events
        st = status(a.address)
        assert st.snapshot_sequence > st.first_sequence  # a newer snapshot than the one compacted to
        b.proc.send_signal(signal.SIGCONT)

        # b catches up by itself: the leader's sequence and allocations, the ones answered.
        leader_seq = status(a.address).last_sequence
        wait_for(lambda: (s := status(b.address)) and s.last_sequence == leader_seq, timeout_s=30,
                 what="b to catch up")
        seq_b, on_b, used_b = listed(b.address)
        seq_a, on_a, _ = listed(a.address)
        assert (seq_b, on_b) == (seq_a, on_a) == (leader_seq, acked.live)
        assert b.proc.poll() is None and "caught up from a snapshot" in b.log()

        # The caught-up follower takes over from a killed leader with nothing lost.
        a.kill()
        wait_for(lambda: leader_of([b]), timeout_s=30, what="b to take over")
        acked.place(c, ["after-failover"])
        assert acked.live["after-failover"][1] == leader_seq + 1  # the log goes on, gap-free
        seq_b, on_b, used_b = listed(b.address)
        assert seq_b == leader_seq + 1 and on_b == acked.live
        assert all(cpu <= HOST_CPU for cpu in used_b.values())  # recomputed from the placements
        assert acked.released == (rounds - 1) * 8


def test_follower_paused_past_compaction_and_the_leaders_death_takes_over(tmp_path, etcd_server, etcd_prefix):
    # b wakes to a log compacted past it and no leader: it catches up and leads at once.
    with paused_follower(tmp_path, etcd_server, etcd_prefix, base=10) as (a, b, c, acked, paused_at):
        churn_until(c, acked, a.address, paused_at)
        last = status(a.address).last_sequence
        a.kill()
        b.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: leader_of([b]), timeout_s=30, what="b to take over")
        acked.place(c, ["after-failover"])
        assert acked.live["after-failover"][1] == last + 1
        seq_b, on_b, used_b = listed(b.address)
        assert (seq_b, on_b) == (last + 1, acked.live)
        assert all(cpu <= HOST_CPU for cpu in used_b.values())
        assert "caught up from a snapshot" in b.log()


def test_replica_started_while_etcd_is_down_after_a_compaction_comes_up_with_it(tmp_path, etcd_server, etcd_prefix):
    a = replica(tmp_path, etcd_server, etcd_prefix).start()
    wait_for(lambda: leader_of([a]), what="the first replica to lead")
    acked = Acked()
    with SchedulerClient(a.address, timeout=10) as c:
        c.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": HOST_CPU, "memory": 262_144}) for i in range(N_HOSTS)])
        churn_until(c, acked, a.address, 0)
    sequence = status(a.address).last_sequence
    assert a.terminate() == 0  # a clean stop: resigns, so the next replica leads at once

    member = etcd_server.members[0]
    member.stop()
    b = replica(tmp_path, etcd_server, etcd_prefix)
    starting = threading.Thread(target=b.start, kwargs={"timeout": 120})
    try:
        starting.start()
        wait_for(lambda: "etcd unavailable: waiting for it to open the store" in b.log(), what="b to wait for etcd")
    finally:
        etcd_server.restart(member)
    starting.join(130)
    try:
        assert b.proc.poll() is None and b.port
        wait_for(lambda: leader_of([b]), timeout_s=30, what="b to lead")
        assert listed(b.address)[:2] == (sequence, acked.live)
    finally:
        b.kill()
