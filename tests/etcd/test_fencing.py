"""Fencing on a real etcd: a replica that lost the leader key writes nothing, whatever it
believes; the election gives up the lead when its lease is gone; large appends are split."""
from __future__ import annotations

import math
import threading
import time

import pytest

from hci_scheduler.ha.election import Election
from hci_scheduler.ha.etcd_client import EtcdClient
from hci_scheduler.store import Record, StoreError
from hci_scheduler.store.etcd import EtcdStore, NotLeader

from .fixtures import leading_store

pytestmark = pytest.mark.etcd


def recs(start: int, n: int, size: int = 0) -> list[Record]:
    return [Record(i, 4, b"body-%d" % i + b"x" * size) for i in range(start, start + n)]


def read_log(endpoints, prefix) -> list[Record]:
    """The log as etcd holds it, through a store that never writes."""
    reader = EtcdStore(EtcdClient(endpoints), prefix, own_client=True)
    try:
        return reader.read()
    finally:
        reader.close()


def paused(store: EtcdStore) -> None:
    """Make store's replica look like a process that was paused: its keep-alive stops, and
    it still believes it leads (its local lease deadline is pushed out)."""
    election = store.election
    election._stop.set()
    election._thread.join(5)
    election._valid_until = math.inf


def test_takeover_fences_the_old_leader_and_it_writes_nothing(etcd_server, etcd_prefix):
    a = leading_store(etcd_server.endpoints, etcd_prefix, "replica-a:1")
    a.append(recs(1, 3))
    paused(a)
    # Its lease runs out at etcd (revoked here rather than waited for), and b takes over.
    admin = EtcdClient(etcd_server.endpoints)
    admin.revoke(a.election.lease)
    b = leading_store(etcd_server.endpoints, etcd_prefix, "replica-b:1")
    assert b.election.leader() == ("replica-b:1", b.election.revision)
    assert b.election.revision != a.election.revision

    lost = []
    a.election.on_lost = lost.append
    with pytest.raises(NotLeader, match="replica-b:1"):
        a.append(recs(4, 2))
    assert a.election.revision is None and lost  # stepped down, and said so
    for write in (lambda: a.set_meta("k", "v"), lambda: a.compact(2), lambda: a.snapshots().put(3, b"s"),
                  lambda: a.append(recs(4, 1))):
        with pytest.raises(NotLeader):
            write()
    assert [r.sequence for r in read_log(etcd_server.endpoints, etcd_prefix)] == [1, 2, 3]
    assert b.get_meta("k") is None and b.compacted_sequence() == 0 and b.snapshots().list() == []

    b.append(recs(4, 1))  # the new leader continues the log
    assert read_log(etcd_server.endpoints, etcd_prefix)[-1] == Record(4, 4, b"body-4")
    for s in (a, b):
        s.close()
    admin.close()


def test_old_leader_with_stale_sequence_cannot_overwrite(etcd_server, etcd_prefix):
    # Even holding a valid token, an append whose next key exists writes nothing: another
    # writer's events are never overwritten (the second compare of every append).
    a = leading_store(etcd_server.endpoints, etcd_prefix)
    a.append(recs(1, 2))
    a.append(recs(3, 2))
    a._last = 2  # as if the answer to the last append had been lost although it committed
    with pytest.raises(StoreError, match="moved on"):
        a.append([Record(3, 4, b"other")])
    a._last = 0
    with pytest.raises(StoreError, match="moved on"):
        a.append([Record(1, 4, b"other")])
    assert read_log(etcd_server.endpoints, etcd_prefix) == recs(1, 4)
    a.close()


def test_lost_lease_steps_down_without_a_write(etcd_server, etcd_prefix):
    a = leading_store(etcd_server.endpoints, etcd_prefix)
    lost = threading.Event()
    a.election.on_lost = lambda why: lost.set()
    EtcdClient(etcd_server.endpoints).revoke(a.election.lease)  # the lease ends at etcd
    assert lost.wait(5), "the keep-alive never noticed that the lease was gone"
    assert not a.election.is_leader
    with pytest.raises(NotLeader):
        a.append(recs(1, 1))
    assert read_log(etcd_server.endpoints, etcd_prefix) == []
    a.close()


def test_keep_alive_holds_the_lead_past_many_ttls(etcd_server, etcd_prefix):
    a = leading_store(etcd_server.endpoints, etcd_prefix)
    other = Election(EtcdClient(etcd_server.endpoints), etcd_prefix, "replica-b:1", ttl_s=1)
    assert not other.campaign(timeout_s=3.5)  # 3 TTLs: the lease was renewed all along
    assert a.election.is_leader
    a.append(recs(1, 1))
    a.close()  # resigns: the key goes at once
    assert other.campaign(timeout_s=2)
    other.resign()


def test_resign_hands_over_at_once(etcd_server, etcd_prefix):
    # a's lease lives 60 s: b, which gives up after 30 s, can only win because closing a
    # deleted the leader key (and revoked the lease), not because the lease ran out.
    client = EtcdClient(etcd_server.endpoints)
    election = Election(client, etcd_prefix, "replica-a:1", ttl_s=60)
    assert election.campaign(timeout_s=10)
    a = EtcdStore(client, etcd_prefix, election, own_client=True)
    b = Election(EtcdClient(etcd_server.endpoints), etcd_prefix, "replica-b:1", ttl_s=5)
    won = []
    t = threading.Thread(target=lambda: won.append(b.campaign(timeout_s=30)))
    t.start()
    time.sleep(0.3)
    assert won == []  # a still leads
    a.close()
    t.join()
    assert won == [True]
    b.resign()


def test_append_over_the_request_limit_is_split_and_reads_back_whole(etcd_server, etcd_prefix):
    client = EtcdClient(etcd_server.endpoints)
    election = Election(client, etcd_prefix, "a:1")
    assert election.campaign(timeout_s=5)
    s = EtcdStore(client, etcd_prefix, election, max_request_bytes=64 * 1024)
    batch = recs(1, 1000, size=300)  # about 310 kB: 5 Txns of at most 60 kB
    s.append(batch)
    assert s.commits == math.ceil(1000 * (len(batch[500].body) + 6) / (60 * 1024))
    with pytest.raises(StoreError, match="request limit"):
        s.append([Record(1001, 4, b"x" * 70_000)])
    assert s.last_sequence() == 1000
    assert read_log(etcd_server.endpoints, etcd_prefix) == batch
    s.close()
    client.close()
