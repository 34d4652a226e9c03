"""The server's state on an etcd store, in-process: snapshots and compaction in etcd, a restart
from them, and a follower that applies the leader's log as it grows."""
from __future__ import annotations

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


def register(state, n: int) -> None:
    hosts = [pb.Host(id=f"h{i}", capacity={"cpu": 8000, "memory": 32_768}) for i in range(n)]
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
