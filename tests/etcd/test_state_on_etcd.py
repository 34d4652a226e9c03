"""The server's state on an etcd store, in-process: snapshots and compaction in etcd, a restart
from them, and a follower that applies the leader's log as it grows."""
from __future__ import annotations

import threading

import pytest

from hci_scheduler.ha.election import Election
from hci_scheduler.ha.etcd_client import EtcdClient
from hci_scheduler.server import convert
from hci_scheduler.server.snapshot import Snapshots
from hci_scheduler.server.state import SchedulerState
from hci_scheduler.store import Record, StoreUnwritable
from hci_scheduler.store.etcd import EtcdStore, NotLeader
from hci_scheduler.v1 import scheduler_pb2 as pb

from .fixtures import leading_store

pytestmark = pytest.mark.etcd


def register(state, n: int, first: int = 0) -> None:
    hosts = [pb.Host(id=f"h{i}", capacity={"cpu": 8000, "memory": 32_768}) for i in range(first, first + n)]
    state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))


def place(state, ids) -> list:
    items = [convert.place_item(w, w.id, state.dimensions)
             for w in (pb.Workload(id=i, requests={"cpu": 500, "memory": 1024}) for i in ids)]
    return state.execute("place", (items, False, "binpack", False), n=len(items))


def view(state) -> dict:
    """workload id -> host, from the state's cluster."""
    return dict(state.cluster.assignments())


def test_snapshots_and_compaction_in_etcd_then_restart(etcd_server, etcd_prefix):
    store = leading_store(etcd_server.endpoints, etcd_prefix)
    state = SchedulerState(store, snapshots=Snapshots(store.snapshots(), every=0, tail=0))
    register(state, 4)
    place(state, [f"a{i}" for i in range(20)])
    first = state.snapshots.take(state)
    state.execute("release", (["a0", "a1"], False))
    place(state, [f"b{i}" for i in range(10)])
    second = state.snapshots.take(state)
    # Compaction keeps the log from the snapshot before the newest on (a damaged newest falls back).
    assert store.compacted_sequence() == first and store.snapshots().list() == [second, first]
    before, sequence = view(state), state.sequence
    state.close()  # resigns: the next replica leads at once

    again = leading_store(etcd_server.endpoints, etcd_prefix, "replica-b:1")
    restarted = SchedulerState(again, snapshots=Snapshots(again.snapshots(), every=0, tail=0))
    assert restarted.snapshots.sequence == second
    assert view(restarted) == before and restarted.sequence == sequence
    place(restarted, ["c0"])
    assert restarted.sequence == sequence + 1
    restarted.close()


def test_follower_applies_the_leaders_log_and_cannot_write(etcd_server, etcd_prefix):
    leader = leading_store(etcd_server.endpoints, etcd_prefix)
    lstate = SchedulerState(leader)
    register(lstate, 3)
    place(lstate, ["x0", "x1"])

    client = EtcdClient(etcd_server.endpoints)
    follower_election = Election(client, etcd_prefix, "replica-b:1")
    assert not follower_election.try_acquire()
    # The lost attempt names the winner (a follower sends clients there before any other read).
    assert follower_election.holder == ("replica-a:1", leader.election.revision)
    follower = EtcdStore(client, etcd_prefix, follower_election, own_client=True)
    fstate = SchedulerState(follower)  # replays what the leader wrote so far; refuses writes
    assert view(fstate) == view(lstate) and fstate.unwritable_reason is not None
    with pytest.raises(StoreUnwritable, match="does not hold the leader key"):
        place(fstate, ["never"])
    with pytest.raises(NotLeader):
        follower.append([Record(follower.last_sequence() + 1, 4, b"x")])

    lstate.execute("release", (["x0"], False))
    place(lstate, [f"y{i}" for i in range(5)])
    assert follower.refresh() == 6
    assert fstate.follow() == 6
    assert view(fstate) == view(lstate) and fstate.sequence == lstate.sequence
    assert fstate.follow() == 0  # nothing new
    fstate.close()
    lstate.close()


def allocations(state) -> tuple[int, dict]:
    """(sequence, workload id -> (host, sequence of its placement)) as one read answers them."""
    resp = state.list_allocations(page_size=100_000)
    assert not resp.next_page_token
    return resp.sequence, {p.workload_id: (p.host_id, p.sequence) for p in resp.allocations}


def compacted_past(lstate, follower_sequence: int) -> None:
    """Write and snapshot on the leader until its log is compacted past follower_sequence
    (two snapshots at least: compaction keeps the log from the one before the newest)."""
    k = 0
    while lstate.store.compacted_sequence() <= follower_sequence:
        place(lstate, [f"p{k}-{i}" for i in range(15)])
        lstate.execute("release", ([f"p{k}-{i}" for i in range(0, 15, 4)], False))
        lstate.snapshots.take(lstate)
        k += 1
    assert k >= 2


def test_follower_the_log_was_compacted_past_catches_up_from_a_snapshot(etcd_server, etcd_prefix):
    leader = leading_store(etcd_server.endpoints, etcd_prefix)
    lstate = SchedulerState(leader, snapshots=Snapshots(leader.snapshots(), every=0, tail=0))
    register(lstate, 6)
    place(lstate, [f"x{i}" for i in range(10)])

    client = EtcdClient(etcd_server.endpoints)
    election = Election(client, etcd_prefix, "replica-b:1")
    follower = EtcdStore(client, etcd_prefix, election, own_client=True)
    fstate = SchedulerState(follower, snapshots=Snapshots(follower.snapshots(), every=0, tail=0))
    old = allocations(fstate)
    assert old == allocations(lstate)

    lstate.execute("release", (["x0", "x3"], False))
    compacted_past(lstate, fstate.sequence)
    register(lstate, 1, first=6)  # the tail after the newest snapshot: a host and placements
    place(lstate, ["after-0", "after-1"])
    new = allocations(lstate)

    # Readers see the state before the catch-up or after it, never a mix.
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(allocations(fstate))

    t = threading.Thread(target=reader)
    t.start()
    try:
        follower.refresh()
        assert fstate.follow() == new[0] - old[0]
    finally:
        stop.set()
        t.join()
    assert allocations(fstate) == new
    assert view(fstate) == view(lstate) and fstate.cluster.n_hosts == 7
    assert all(s in (old, new) for s in seen)
    assert fstate.snapshots.sequence == lstate.snapshots.sequence  # it loaded the newest
    # It follows on from there as from any other position.
    place(lstate, ["later"])
    follower.refresh()
    assert fstate.follow() == 1 and allocations(fstate) == allocations(lstate)
    fstate.close()
    lstate.close()


def test_replica_starting_while_etcd_is_down_after_a_compaction_waits_for_it(etcd_server, etcd_prefix):
    leader = leading_store(etcd_server.endpoints, etcd_prefix)
    lstate = SchedulerState(leader, snapshots=Snapshots(leader.snapshots(), every=0, tail=0))
    register(lstate, 4)
    compacted_past(lstate, 1)
    expected = allocations(lstate)
    lstate.close()

    # The log is read; then etcd goes away before the snapshot it needs could be.
    store = EtcdStore(EtcdClient(etcd_server.endpoints, timeout_s=0.5), etcd_prefix, own_client=True)
    assert store.compacted_sequence() > 0
    member = etcd_server.members[0]
    member.stop()
    built, failed = [], []

    def start():
        try:
            built.append(SchedulerState(store, snapshots=Snapshots(store.snapshots(), every=0, tail=0)))
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failed.append(exc)

    t = threading.Thread(target=start)
    try:
        t.start()
        t.join(3)
        assert t.is_alive() and not failed  # waiting for etcd, not given up
    finally:
        etcd_server.restart(member)
    t.join(60)
    assert not failed and built
    assert allocations(built[0]) == expected
    built[0].close()
