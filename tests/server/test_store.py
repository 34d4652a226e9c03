"""The Store contract, on SQLite, in memory and on a real etcd (one suite for every store):
append, read, meta, compaction, snapshot storage, reopening; SQLite atomicity under SIGKILL."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading

import pytest

from hci_scheduler.store import MemoryStore, Record, SQLiteStore, StoreError
from tests.etcd.fixtures import etcd_prefix, etcd_server, leading_store  # noqa: F401 (fixtures)

STORES = ["sqlite", "memory", pytest.param("etcd", marks=pytest.mark.etcd)]
DURABLE = ["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)]


@contextlib.contextmanager
def _opener(kind: str, request, tmp_path):
    """A function that opens this test's store (again: the same log), closing all at the end."""
    opened = []

    def open_store():
        if kind == "sqlite":
            s = SQLiteStore(str(tmp_path / "s.db"))
        elif kind == "memory":
            s = MemoryStore()
        else:
            s = leading_store(request.getfixturevalue("etcd_server").endpoints,
                              request.getfixturevalue("etcd_prefix"))
        opened.append(s)
        return s

    try:
        yield open_store
    finally:
        for s in opened:
            s.close()


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    with _opener(request.param, request, tmp_path) as open_store:
        yield open_store()


@pytest.fixture(params=DURABLE)
def reopen(request, tmp_path):
    """Opens the durable store of this test; each call after closing the previous sees the same log."""
    with _opener(request.param, request, tmp_path) as open_store:
        yield open_store


def recs(start: int, n: int) -> list[Record]:
    return [Record(i, 4, f"body-{i}".encode()) for i in range(start, start + n)]


def test_store_append_then_read_in_order(store):
    store.append(recs(1, 3))
    store.append(recs(4, 2))
    assert [r.sequence for r in store.read()] == [1, 2, 3, 4, 5]
    assert store.read(3, 1) == [Record(4, 4, b"body-4")]
    assert store.last_sequence() == 5
    assert [r.sequence for r in store.iter_all(chunk=2)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("bad", [recs(2, 1), recs(1, 1) + recs(3, 1)], ids=["starts-late", "gap-inside"])
def test_store_rejects_gaps_and_keeps_nothing_of_the_batch(store, bad):
    with pytest.raises(StoreError):
        store.append(bad)
    assert store.read() == [] and store.last_sequence() == 0


def test_store_meta_roundtrip(store):
    assert store.get_meta("dimensions") is None
    store.set_meta("dimensions", "cpu,memory")
    store.set_meta("dimensions", "cpu")
    assert store.get_meta("dimensions") == "cpu"


def test_store_reopen_sees_everything(reopen):
    s = reopen()
    s.append(recs(1, 10))
    s.set_meta("k", "v")
    s.close()
    s = reopen()
    assert s.last_sequence() == 10 and s.get_meta("k") == "v"
    assert s.read(9) == [Record(10, 4, b"body-10")]
    with pytest.raises(StoreError):
        s.append(recs(1, 1))  # sequence must continue at 11
    s.append(recs(11, 1))
    assert [r.sequence for r in s.read(8)] == [9, 10, 11]


def test_store_compaction_keeps_the_tail_across_reopen(reopen):
    s = reopen()
    s.append(recs(1, 4))
    s.append(recs(5, 3))  # two appends: on etcd, two keys, and 6 falls inside the second
    s.append(recs(8, 3))
    s.compact(6)
    assert s.compacted_sequence() == 6 and s.first_sequence() == 7
    assert [r.sequence for r in s.read()] == [7, 8, 9, 10]
    assert s.read(0, 1) == [Record(7, 4, b"body-7")]
    s.compact(3)  # behind: nothing to do
    assert s.compacted_sequence() == 6
    s.close()
    s = reopen()
    assert s.compacted_sequence() == 6 and s.last_sequence() == 10
    assert [r.sequence for r in s.read()] == [7, 8, 9, 10]
    s.compact(10)  # the whole log: the next append still continues it
    assert s.read() == [] and s.last_sequence() == 10
    s.append(recs(11, 1))
    s.close()
    s = reopen()
    assert [r.sequence for r in s.read()] == [11] and s.compacted_sequence() == 10


def test_store_snapshot_storage_roundtrip(reopen):
    s = reopen()
    shots = s.snapshots()
    big = bytes(range(256)) * (10 * 1024)  # 2.5 MiB: several chunks on etcd
    assert shots.list() == []
    shots.put(5, b"small snapshot")
    shots.put(9, big)
    assert shots.list() == [9, 5]
    assert shots.get(5) == b"small snapshot" and shots.get(9) == big
    shots.delete(5)
    shots.delete(5)  # gone already: no error
    assert shots.list() == [9]
    with pytest.raises(StoreError):
        shots.get(5)
    shots.set_aside(9)  # beyond the log's end: out of the listing, kept for a person to look at
    assert shots.list() == []
    s.close()
    assert reopen().snapshots().list() == []


def test_sqlite_is_wal_with_full_sync(tmp_path):
    s = SQLiteStore(str(tmp_path / "s.db"))
    assert s._wconn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()
    with pytest.raises(StoreError):
        s.append(recs(1, 1))


def test_sqlite_appends_from_several_threads_keep_the_sequence(tmp_path):
    # Threads take turns on the sequence; each append is one transaction of its own
    # (grouping mutations into one commit is the server writer's job, not the store's).
    s = SQLiteStore(str(tmp_path / "s.db"))
    turn = threading.Condition()
    state = {"next": 1}

    def worker(n_appends: int) -> None:
        for _ in range(n_appends):
            with turn:
                seq = state["next"]
                state["next"] += 1
                s.append([Record(seq, 4, b"x")])

    threads = [threading.Thread(target=worker, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.sequence for r in s.read()] == list(range(1, 101))
    assert s.commits == 100
    s.close()


def test_sqlite_checkpoints_let_a_busy_writer_rewrite_the_wal(tmp_path):
    # Under steady commits the background checkpoint must still complete, so the
    # WAL restarts from its start instead of growing by a page per commit (appending
    # to a growing file costs a second fsync, of its metadata, on every commit).
    path = tmp_path / "s.db"
    s = SQLiteStore(str(path), checkpoint_interval_s=0.005)
    n = 1500
    for i in range(1, n + 1):
        s.append([Record(i, 4, b"x" * 100)])
    wal = (tmp_path / "s.db-wal").stat().st_size
    page = s._wconn.execute("PRAGMA page_size").fetchone()[0]
    s.close()
    assert wal < n * page / 4, f"WAL grew to {wal} bytes over {n} commits: checkpoints never completed"


def test_sqlite_sigkill_leaves_whole_batches(tmp_path):
    # A child appends batches of 50 as fast as it can and is killed mid-way; the
    # reopened log ends on a batch boundary and every body is intact.
    path = tmp_path / "s.db"
    ready = tmp_path / "ready"
    child = textwrap.dedent(f"""
        from hci_scheduler.store import SQLiteStore, Record
        s = SQLiteStore({str(path)!r})
        seq = 0
        for b in range(100000):
            s.append([Record(seq + i + 1, 4, b"payload-%d" % (seq + i + 1)) for i in range(50)])
            seq += 50
            if b == 20:
                open({str(ready)!r}, "w").close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child])
    import time

    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert ready.exists(), "the child never got going"
    time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    with SQLiteStore(str(path)) as s:
        records = s.read()
        assert len(records) >= 21 * 50
        assert len(records) % 50 == 0
        assert all(r.body == b"payload-%d" % r.sequence for r in records)
        assert [r.sequence for r in records] == list(range(1, len(records) + 1))


def test_sqlite_store_in_use_is_refused_naming_it(tmp_path, monkeypatch):
    """One process at a time (EXCLUSIVE locking: no shared-memory index to map): a second
    open fails, naming the file, and leaves the store as it was."""
    import hci_scheduler.store.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "OPEN_TIMEOUT_S", 0.2)
    path = str(tmp_path / "s.db")
    first = SQLiteStore(path)
    first.append(recs(1, 3))
    with pytest.raises(StoreError, match="s.db: cannot open: database is locked"):
        SQLiteStore(path)
    assert not (tmp_path / "s.db-shm").exists()
    first.append(recs(4, 1))
    first.close()
    again = SQLiteStore(path)
    assert [r.sequence for r in again.read()] == [1, 2, 3, 4]
    again.close()
