"""Snapshots and log compaction: a restart from the newest snapshot plus the log's tail
rebuilds exactly the state a full replay does; crashes mid-snapshot or mid-compaction
lose nothing acknowledged; a damaged snapshot is never silently skipped past lost
history; a watcher behind the compacted log is told where to resume; the log stays
bounded."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

from hci_scheduler.cluster import Cluster
from hci_scheduler.model import Host, Placement, Workload
from hci_scheduler.server import snapshot as snap_mod
from hci_scheduler.server.app import create_server
from hci_scheduler.server.snapshot import SnapshotError
from hci_scheduler.store import MemoryStore, Record, SQLiteStore, StoreError
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ServerProcess, SnapshotServer, stub_for

# -- the bulk restore ---------------------------------------------------------


def _cluster() -> Cluster:
    c = Cluster()
    c.add_hosts([Host(f"h{i}", {"cpu": 64_000, "memory": 262_144, "ssd": 2000},
                      labels={"kvm": "true", "zone": "ab"[i % 2]}, allocation_ratio={"cpu": 2.0})
                 for i in range(40)])
    return c


def test_restore_many_gives_the_state_of_one_restore_per_workload():
    """Plain, VM (charged at the allocation ratio), grouped and tenant workloads: the same
    usage, free capacity, records in the same order, per-host counts, and the same next
    decisions (placing and releasing afterwards)."""
    templates = [Workload("t", {"cpu": 500, "memory": 1024}), Workload("t", {"cpu": 1000, "memory": 2048}, kind="vm"),
                 Workload("t", {"cpu": 250}, group="web", tenant="blue"),
                 Workload("t", {"cpu": 300}, group="db", tenant="red", isolation="dedicated")]
    rng = random.Random(3)
    n = 2000
    ids = [f"w{i}" for i in range(n)]
    spec_of = [rng.randrange(3) for _ in range(n)]
    hosts = [f"h{rng.randrange(36)}" for _ in range(n)]
    ids += ["d0", "d1"]
    spec_of += [3, 3]
    hosts += ["h38", "h38"]
    one, bulk = _cluster(), _cluster()
    for wid, k, hid in zip(ids, spec_of, hosts):
        one.restore(dataclasses.replace(templates[k], id=wid), Placement(wid, hid))
    bulk.restore_many(templates, ids, spec_of, hosts)
    for c in (one, bulk):
        c.release("w7")
        c.release("d1")
    assert np.array_equal(one.usage(), bulk.usage())
    assert np.array_equal(one.free(), bulk.free())
    assert list(one.assignments().items()) == list(bulk.assignments().items())
    assert one.workload_counts() == bulk.workload_counts()
    assert [one.workload(w) for w in ids[8:50]] == [bulk.workload(w) for w in ids[8:50]]
    for k, t in enumerate([*templates[:3], Workload("x", {"cpu": 100}, group="web", anti_affinity=())]):
        w = dataclasses.replace(t, id=f"new{k}")
        assert one.place(w).host_id == bulk.place(w).host_id
    # The dedicated tenant's host stays closed to others in both.
    other = Workload("other", {"cpu": 1}, tenant="blue")
    assert one.explain(other) == bulk.explain(other)


def test_restore_many_records_are_those_of_one_restore_per_workload():
    """The records restore_many makes lazily (workload and charge on first use) read the
    same as those restore makes, whichever is read first, and preemption over them
    evicts the same workloads and leaves the same usage (recomputed from the records)."""
    templates = [Workload("t", {"cpu": 8_000, "memory": 1024}, priority=1),
                 Workload("t", {"cpu": 4_000, "memory": 2048}, kind="vm"),
                 Workload("t", {"cpu": 2_000}, group="web", tenant="blue")]
    rng = random.Random(5)
    n = 300
    ids = [f"w{i}" for i in range(n)]
    spec_of = [rng.randrange(3) for _ in range(n)]
    hosts = [f"h{rng.randrange(40)}" for _ in range(n)]
    one, bulk = _cluster(), _cluster()
    for wid, k, hid in zip(ids, spec_of, hosts):
        one.restore(dataclasses.replace(templates[k], id=wid), Placement(wid, hid))
    bulk.restore_many(templates, ids, spec_of, hosts)
    for i, wid in enumerate(ids):
        a, b = one._ledger.records[wid], bulk._ledger.records[wid]
        if i % 2:  # the charge made first, then the workload
            assert np.array_equal(a.charge, b.charge)
        assert b.workload == a.workload == dataclasses.replace(templates[spec_of[i]], id=wid)
        assert (b.row, b.numa) == (a.row, a.numa) and np.array_equal(a.charge, b.charge)
    # Fill the cluster, then preempt: victims chosen over restored records in both.
    for c in (one, bulk):
        c.place_batch([Workload(f"f{i}", {"cpu": 4_000}) for i in range(600)])
    big = Workload("big", {"cpu": 60_000, "memory": 4096}, priority=5)
    p1, p2 = one.place(big, preempt=True), bulk.place(big, preempt=True)
    assert p1.host_id == p2.host_id and p1 == p2
    assert list(one.assignments().items()) == list(bulk.assignments().items())
    for c in (one, bulk):  # usage recomputed from the records alone
        want = np.zeros_like(c.usage())
        for rec in c._ledger.records.values():
            want[rec.row] += rec.charge
        assert np.array_equal(c.usage(), want)


def test_restore_many_refuses_what_would_overcommit_and_changes_nothing():
    c = _cluster()
    before = c.usage()
    with pytest.raises(Exception, match="h0"):
        c.restore_many([Workload("t", {"cpu": 100_000})], ["a", "b"], [0, 0], ["h0", "h0"])
    with pytest.raises(Exception, match="not registered"):
        c.restore_many([Workload("t", {"cpu": 1})], ["a"], [0], ["nope"])
    assert np.array_equal(c.usage(), before) and not c.assignments()


# -- in-process servers ------------------------------------------------------


def _host(i: int, **kw) -> pb.Host:
    return pb.Host(id=f"h{i}", capacity={"cpu": 8000, "memory": 16384, "ssd": 100},
                   labels={"zone": "ab"[i % 2], "kvm": "true"}, **kw)


def _mutate(s, rnd: int) -> None:
    """A mix of everything the state holds, round `rnd` (ids unique per round)."""
    r = f"r{rnd}"
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}w{i}", requests={"cpu": 100 + i, "memory": 64})
                                       for i in range(30)]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}g{i}", requests={"cpu": 50}, group="web", tenant="blue",
                                                   spreads=[pb.SpreadConstraint(topology="zone", max_skew=1,
                                                                                hard=True)])
                                       for i in range(6)]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}vm{i}", requests={"cpu": 300, "memory": 512},
                                                   kind=pb.WORKLOAD_KIND_VM, node_selector={"kvm": "true"})
                                       for i in range(3)]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}creator", requests={"cpu": 20},
                                                   new_volumes=[pb.Volume(id=f"{r}v", size_gib=2, replicas=2)])]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}mounter", requests={"cpu": 20}, volume_ids=[f"{r}v"])]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"{r}tmp", requests={"cpu": 20},
                                                   new_volumes=[pb.Volume(id=f"{r}v2", size_gib=1)])]))
    s.Release(pb.ReleaseRequest(workload_ids=[f"{r}w3", f"{r}w4", f"{r}g2", f"{r}tmp", f"{r}vm1"]))


def _setup(s) -> None:
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(i) for i in range(8)]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id="agent", requests={"cpu": 10}, per_host=True)]))
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(8), _host(9)]))  # the agent follows
    s.RemoveHost(pb.RemoveHostRequest(host_id="h3"))  # a free row, reused by the next host
    s.RemoveHost(pb.RemoveHostRequest(host_id="h6"))
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(10)]))
    # Tainted under the agent's replica (which tolerates nothing): it stays.
    s.UpdateHost(pb.UpdateHostRequest(host_id="h7", taints=[pb.Taint(key="maintenance", value="yes")]))


def _view(s) -> tuple:
    """What a user sees of the state (everything but the log's own bounds)."""
    status = s.GetStatus(pb.GetStatusRequest())
    for f in ("first_sequence", "snapshot_sequence"):
        status.ClearField(f)
    hosts = s.ListHosts(pb.ListHostsRequest(page_size=1000)).hosts
    allocs = s.ListAllocations(pb.ListAllocationsRequest(include_workloads=True, page_size=1000)).allocations
    return list(hosts), list(allocs), list(s.ListVolumes(pb.ListVolumesRequest(page_size=1000)).volumes), status


def _rows(server) -> list:
    return server.state.cluster.host_ids()


def test_restart_from_snapshot_and_tail_is_exactly_the_full_replay(tmp_path):
    """Snapshot in the middle, a tail after it, no snapshot at the stop: the restart
    (snapshot + tail) and a full replay of a copy of the whole log give the same hosts
    in the same rows, allocations with their specs and sequences, per-host services,
    volumes, status; a retried Place is still recognised, a changed spec refused."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    a.stub.UpdateHost(pb.UpdateHostRequest(host_id="h1", labels={"zone": "c"}))  # its VMs' kvm label goes
    a.stub.UpdateHost(pb.UpdateHostRequest(host_id="h2", state=pb.HOST_STATE_CORDONED))
    _mutate(a.stub, 1)
    taken = a.state.snapshots.take(a.state)
    assert taken == a.state.sequence
    _mutate(a.stub, 2)
    a.stub.UpdateHost(pb.UpdateHostRequest(host_id="h4", state=pb.HOST_STATE_DRAINING))
    want, rows = _view(a.stub), _rows(a)
    a.stop(final_snapshot=False)
    full = tmp_path / "full"
    shutil.copytree(data, full)
    shutil.rmtree(full / "snapshots")

    for d, replayed in ((data, taken), (full, 0)):
        b = SnapshotServer(d)
        try:
            assert b.state.snapshots.sequence == replayed
            assert _view(b.stub) == want
            assert _rows(b) == rows
            # A retried Place returns the first answer; the same id with another spec is refused.
            first = next(p for p in want[1] if p.workload_id == "r1w5")
            again = b.stub.Place(pb.PlaceRequest(workloads=[first.workload])).placements[0]
            assert (again.host_id, again.sequence) == (first.host_id, first.sequence)
            changed = pb.Workload(id="r1w5", requests={"cpu": 1})
            with pytest.raises(grpc.RpcError) as e:
                b.stub.Place(pb.PlaceRequest(workloads=[changed]))
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        finally:
            b.stop(final_snapshot=False)


def test_a_tail_of_placements_and_releases_replays_exactly(tmp_path, monkeypatch):
    """A tail of plain placements, releases and hosts added only: the snapshot's plain
    placements the tail releases are never restored (those placed before a per-host service
    or volume workload still are, and released), releases do not break the tail's bulk
    restore (one of a workload placed in the tail, an id placed again with another spec);
    the state is the live one, exactly, and so is a full replay of the same log."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    a.stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"late{i}", requests={"cpu": 200 + i, "memory": 64})
                                            for i in range(12)]))
    taken = a.state.snapshots.take(a.state)
    s = a.stub
    s.Release(pb.ReleaseRequest(workload_ids=["late1", "late2", "r0w7", "r0g1"]))  # r0w7 came before r0creator
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(11)]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"t{i}", requests={"cpu": 2500, "memory": 64})
                                       for i in range(8)]))
    s.Release(pb.ReleaseRequest(workload_ids=["t3", "late5"]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id="late1", requests={"cpu": 999, "memory": 64}),
                                       pb.Workload(id="t3", requests={"cpu": 100})]))
    s.Release(pb.ReleaseRequest(workload_ids=["late1", "t5"]))
    s.Place(pb.PlaceRequest(workloads=[pb.Workload(id="late1", requests={"cpu": 7, "memory": 64})]))
    want, rows = _view(s), _rows(a)
    a.stop(final_snapshot=False)
    full = tmp_path / "full"
    shutil.copytree(data, full)
    shutil.rmtree(full / "snapshots")
    left_out = []
    restore = snap_mod.restore
    monkeypatch.setattr(snap_mod, "restore", lambda *args: (r := restore(*args), left_out.append(set(r)))[0])

    for d, replayed in ((data, taken), (full, 0)):
        b = SnapshotServer(d)
        try:
            assert b.state.snapshots.sequence == replayed
            assert _view(b.stub) == want
            assert _rows(b) == rows
        finally:
            b.stop(final_snapshot=False)
    assert left_out == [{"late1", "late2", "late5"}]  # r0w7 and r0g1 came before the volume workloads


def test_clean_stop_writes_a_snapshot_and_restart_reads_no_tail(tmp_path):
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    want, last = _view(a.stub), a.state.sequence
    a.stop()
    b = SnapshotServer(data)
    try:
        status = b.stub.GetStatus(pb.GetStatusRequest())
        assert status.snapshot_sequence == last == status.last_sequence
        assert _view(b.stub) == want
    finally:
        b.stop()


# -- damaged snapshots ---------------------------------------------------------


def _two_snapshots(tmp_path):
    """A store with two snapshots and the log compacted up to the older one."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    older = a.state.snapshots.take(a.state)
    _mutate(a.stub, 1)
    newer = a.state.snapshots.take(a.state)  # compacts up to min(newer - 0, older)
    want = _view(a.stub)
    a.stop(final_snapshot=False)
    files = dict(snap_mod.snapshot_files(str(data / "snapshots")))
    assert set(files) == {older, newer}
    return data, files, older, newer, want


def _flip_byte(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_a_damaged_newest_snapshot_falls_back_to_the_older_one(tmp_path, caplog):
    data, files, older, newer, want = _two_snapshots(tmp_path)
    _flip_byte(files[newer], os.path.getsize(files[newer]) // 2)
    with pytest.raises(SnapshotError, match="checksum"):
        snap_mod.verify(files[newer])
    b = SnapshotServer(data)
    try:
        assert b.state.snapshots.sequence == older
        assert _view(b.stub) == want
    finally:
        b.stop(final_snapshot=False)
    said = [r.fields for r in caplog.records if r.levelname == "ERROR" and hasattr(r, "fields")]
    assert said and said[0]["path"] == files[newer] and "checksum" in said[0]["reason"]


def test_no_usable_snapshot_past_the_compacted_log_refuses_to_start_naming_it(tmp_path):
    data, files, older, newer, _ = _two_snapshots(tmp_path)
    for path in files.values():
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(StoreError) as e:
        create_server("127.0.0.1:0", data_dir=str(data))
    assert "compacted up to sequence" in str(e.value) and files[newer] in str(e.value)
    problems = snap_mod.check_directory(str(data / "snapshots"), compacted=older)
    assert len(problems) == 3 and all("not a snapshot file" in p or "checksum" in p or "compacted" in p
                                      for p in problems)
    # The command line says so and exits non-zero.
    srv = ServerProcess(tmp_path, data_dir=data)
    with pytest.raises(RuntimeError, match="snapshot"):
        srv.start()
    assert srv.proc.returncode == 1


def test_a_snapshot_is_loaded_only_by_the_log_whose_history_it_holds(tmp_path):
    """A log that lost events starts a new incarnation but still continues the history up
    to the loss: its snapshots there are loaded. A log whose event at the snapshot's
    sequence is another one (another history, same numbers) never loads it."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    seq = a.state.snapshots.take(a.state)
    want = _view(a.stub)
    a.stop(final_snapshot=False)
    store = SQLiteStore(str(data / "scheduler.db"))
    store.set_meta("incarnation", "0123456789abcdef")  # as after a loss (see SQLiteStore)
    store.close()
    b = SnapshotServer(data)
    try:
        assert b.state.snapshots.sequence == seq
        assert _view(b.stub)[:3] == want[:3]
    finally:
        b.stop(final_snapshot=False)
    db = sqlite3.connect(str(data / "scheduler.db"))
    (body,) = db.execute("SELECT body FROM events WHERE seq = ?", (seq,)).fetchone()
    other = pb.Event.FromString(body)
    other.time.seconds += 1  # the same change at another time: another event under the number
    db.execute("UPDATE events SET body = ? WHERE seq = ?", (other.SerializeToString(), seq))
    db.commit()
    db.close()
    c = SnapshotServer(data)
    try:
        assert c.state.snapshots.sequence == 0  # the whole log replayed instead
        assert _view(c.stub)[:3] == want[:3]
    finally:
        c.stop(final_snapshot=False)


def test_a_snapshot_beyond_the_log_is_moved_aside(tmp_path):
    """The log lost its last events (a damaged WAL): the snapshot that holds them is moved
    aside, not loaded, and not left where later events reusing its numbers would meet it."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    kept = a.state.sequence
    want = _view(a.stub)
    _mutate(a.stub, 1)
    seq = a.state.snapshots.take(a.state)
    a.stop(final_snapshot=False)
    db = sqlite3.connect(str(data / "scheduler.db"))
    db.execute("DELETE FROM events WHERE seq > ?", (kept,))  # what the lost WAL frames held
    db.commit()
    db.close()
    b = SnapshotServer(data)
    try:
        assert b.state.snapshots.sequence == 0 and b.state.sequence == kept
        assert _view(b.stub)[:3] == want[:3]
        assert not snap_mod.snapshot_files(str(data / "snapshots"))
        assert (data / "snapshots" / f"snapshot-{seq:020d}.snap.beyond-log").exists()
    finally:
        b.stop(final_snapshot=False)


# -- crashes -------------------------------------------------------------------


def test_leftovers_of_a_crash_mid_snapshot_or_mid_compaction_are_cleaned_up(tmp_path):
    """A half-written snapshot (a .tmp file) is removed and ignored; a compaction that
    recorded compacted_seq but deleted nothing yet is finished at open."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _setup(a.stub)
    _mutate(a.stub, 0)
    seq = a.state.snapshots.take(a.state)
    _mutate(a.stub, 1)
    want = _view(a.stub)
    a.stop(final_snapshot=False)
    tmp_file = data / "snapshots" / f"snapshot-{seq + 5:020d}.snap.tmp"
    tmp_file.write_bytes(b"HCISNAP\x00 half")
    store = SQLiteStore(str(data / "scheduler.db"))
    store.set_meta("compacted_seq", str(seq - 3))  # recorded, then the crash
    store.close()
    b = SnapshotServer(data)
    try:
        assert not tmp_file.exists()
        assert b.state.store.read(0, 1)[0].sequence == seq - 2
        assert b.stub.GetStatus(pb.GetStatusRequest()).first_sequence == seq - 2
        assert _view(b.stub) == want
    finally:
        b.stop(final_snapshot=False)


def _acked_places(stub, prefix: str, stop: threading.Event, acked: dict, released: set, unsure: set) -> None:
    """Place batches of 20 and release some until stopped or the server dies: acknowledged
    placements go to `acked`, acknowledged releases to `released`, the ids of a release
    that got no answer to `unsure` (it may or may not have happened)."""
    i = 0
    while not stop.is_set():
        ids = [f"{prefix}-{i}-{k}" for k in range(20)]
        i += 1
        try:
            resp = stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=w, requests={"cpu": 1}) for w in ids]),
                              timeout=10)
        except grpc.RpcError:
            return
        for p in resp.placements:
            if p.host_id:
                acked[p.workload_id] = p.host_id
        if i % 5 == 0:  # releases too, so compaction has something to drop
            gone = list(acked)[:40]
            for w in gone:
                del acked[w]
            try:
                stub.Release(pb.ReleaseRequest(workload_ids=gone), timeout=10)
            except grpc.RpcError:
                unsure.update(gone)
                return
            released.update(gone)


def test_sigkill_during_snapshots_and_compactions_loses_nothing_acknowledged(tmp_path):
    """serve with a snapshot every 150 events and a tail of 50, killed (SIGKILL) at random
    moments while clients place and release: after every restart each acknowledged
    placement is where it was acknowledged, each acknowledged release stays released,
    the sequence never goes back, and the log's first sequence follows a snapshot."""
    data = tmp_path / "data"
    extra = ["--snapshot-every", "150", "--snapshot-tail", "50", "--fsync", "normal"]
    acked: dict = {}
    released: set = set()
    unsure: set = set()
    last = 0
    rng = random.Random(5)
    for trial in range(4):
        srv = ServerProcess(tmp_path, data_dir=data, extra=extra).start()
        try:
            channel, s = stub_for(srv.address)
            status = s.GetStatus(pb.GetStatusRequest())
            assert status.last_sequence >= last
            last = status.last_sequence
            if trial:
                assert status.snapshot_sequence > 0 and status.first_sequence <= status.snapshot_sequence + 1
            allocs, token = {}, ""
            while True:  # every page
                page = s.ListAllocations(pb.ListAllocationsRequest(page_size=10_000, page_token=token))
                allocs.update((p.workload_id, p.host_id) for p in page.allocations)
                token = page.next_page_token
                if not token:
                    break
            assert {w: allocs.get(w) for w in acked} == acked
            assert not released & set(allocs)
            for w in unsure:  # settled now: follow what the restarted server says
                if w in allocs:
                    acked[w] = allocs[w]
                else:
                    released.add(w)
            unsure.clear()
            if trial == 0:
                s.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(i) for i in range(4)]))
            stop = threading.Event()
            t = threading.Thread(target=_acked_places, args=(s, f"t{trial}", stop, acked, released, unsure))
            t.start()
            time.sleep(rng.uniform(1.5, 3.0))
            srv.proc.kill()
            srv.proc.wait(30)
            stop.set()
            t.join(30)
            channel.close()
        finally:
            srv.kill()
    # The snapshots were written and the log compacted, killed in the middle or not.
    store = SQLiteStore(str(data / "scheduler.db"))
    try:
        assert store.compacted_sequence() > 0
        assert store.read(0, 1)[0].sequence == store.compacted_sequence() + 1
    finally:
        store.close()


# -- watchers and the log's size ---------------------------------------------


def test_watch_from_a_compacted_sequence_is_out_of_range_naming_the_oldest(tmp_path):
    data, _, older, newer, _ = _two_snapshots(tmp_path)
    b = SnapshotServer(data)
    try:
        status = b.stub.GetStatus(pb.GetStatusRequest())
        assert (status.first_sequence, status.snapshot_sequence) == (older + 1, newer)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(b.stub.WatchEvents(pb.WatchEventsRequest(after_sequence=older - 1))))
        assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert f"oldest available is {older + 1}" in e.value.details()
        trailers = dict(e.value.trailing_metadata())
        assert trailers["first-sequence"] == str(older + 1) and trailers["snapshot-sequence"] == str(newer)
        # The resync: a listing says its sequence; watching from there works.
        stream = b.stub.WatchEvents(pb.WatchEventsRequest(after_sequence=older))
        assert next(iter(stream)).event.sequence == older + 1
        stream.cancel()
    finally:
        b.stop(final_snapshot=False)


def test_the_log_stays_bounded_by_the_tail_and_the_snapshot_interval(tmp_path):
    """Background snapshots every 300 events, tail 100: after 40 rounds of place and
    release (about 8,000 events) the log holds at most tail + 2 x every events, the
    database file is bounded by them (not by the history), and two snapshots remain."""
    every, tail = 300, 100
    data = tmp_path / "data"
    a = SnapshotServer(data, every=every, tail=tail)
    a.state.snapshots.poll_s = 0.05
    try:
        a.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(i) for i in range(4)]))
        for rnd in range(40):
            ids = [f"x{rnd}-{i}" for i in range(100)]
            a.stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=w, requests={"cpu": 1}) for w in ids]))
            a.stub.Release(pb.ReleaseRequest(workload_ids=ids))
            time.sleep(0.1)
        sequence = a.state.sequence
    finally:
        a.stop()  # waits for a snapshot in progress, writes the last one, compacts
    store = SQLiteStore(str(data / "scheduler.db"))
    try:
        held = store.last_sequence() - store.first_sequence() + 1
        event_bytes = max(len(r.body) for r in store.read(0))
    finally:
        store.close()
    assert sequence > 10 * every
    assert held <= tail + 2 * every
    db_bytes = sum(os.path.getsize(p) for p in data.glob("scheduler.db*") if p.suffix in (".db", ".db-wal"))
    assert db_bytes <= 64 * 1024 + 3 * event_bytes * (tail + 2 * every) < event_bytes * sequence
    assert len(snap_mod.snapshot_files(str(data / "snapshots"))) <= 2


def test_memory_and_sqlite_stores_compact_the_same_way(tmp_path):
    for store in (MemoryStore(), SQLiteStore(str(tmp_path / "s.db"))):
        store.append([Record(i, 1, b"x") for i in range(1, 11)])
        store.compact(4)
        store.compact(2)  # never backwards
        assert (store.compacted_sequence(), store.first_sequence(), store.last_sequence()) == (4, 5, 10)
        assert [r.sequence for r in store.read(0)] == list(range(5, 11))
        assert [r.sequence for r in store.iter_all(after=7)] == [8, 9, 10]
        store.compact(10)  # all of it: the sequence goes on
        assert store.read(0) == [] and store.last_sequence() == 10
        store.append([Record(11, 1, b"y")])
        assert [r.sequence for r in store.read(0)] == [11]
        store.close()
    reopened = SQLiteStore(str(tmp_path / "s.db"))
    assert (reopened.first_sequence(), reopened.last_sequence()) == (11, 11)
    reopened.close()


def test_workloads_whose_host_was_relabelled_since_restore_from_a_snapshot(tmp_path):
    """A per-host service and a workload creating a volume, both with a node selector, on a
    host whose labels changed after they were placed: they keep running there (UpdateHost
    moves nothing), so the snapshot restores them there, as a full replay does."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    a.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(i) for i in range(4)]))
    a.stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id="kvm-agent", requests={"cpu": 10}, per_host=True,
                                                        node_selector={"kvm": "true"})]))
    made = a.stub.Place(pb.PlaceRequest(workloads=[pb.Workload(
        id="db", requests={"cpu": 100}, node_selector={"zone": "a"},
        new_volumes=[pb.Volume(id="dbv", size_gib=2, replicas=2)])])).placements[0]
    for i in range(4):  # every host loses the labels the two selected
        a.stub.UpdateHost(pb.UpdateHostRequest(host_id=f"h{i}", labels={"zone": "c"}))
    want = _view(a.stub)
    assert {p.workload_id for p in want[1]} == {"kvm-agent", "db"} and made.host_id
    a.stop()  # a clean stop: the snapshot holds everything, the log no tail
    b = SnapshotServer(data)
    try:
        assert b.state.snapshots.sequence == want[3].last_sequence
        assert _view(b.stub) == want
    finally:
        b.stop()


def test_a_small_state_is_snapshotted_sooner_than_every(tmp_path):
    """`every` is the most events between two snapshots: with a few hundred live items, one
    is due after MIN_EVERY events, so a crash restart never replays a tail out of proportion
    to the state (a large state waits for `every`)."""
    shots = snap_mod.Snapshots(str(tmp_path), every=100_000)

    class _State:
        def __init__(self, sequence, live, hosts):
            self.sequence, self._placed = sequence, dict.fromkeys(range(live))
            self.cluster = type("C", (), {"n_hosts": hosts})()

    assert not shots.due(_State(snap_mod.MIN_EVERY - 1, 100, 10))
    assert shots.due(_State(snap_mod.MIN_EVERY, 100, 10))
    assert not shots.due(_State(snap_mod.MIN_EVERY, 190_000, 10_000))  # half of 200,000 live
    assert shots.due(_State(100_000, 190_000, 10_000))
    assert not snap_mod.Snapshots(str(tmp_path), every=0).due(_State(10**6, 10, 1))
    assert snap_mod.Snapshots(str(tmp_path), every=500).due(_State(500, 10**6, 1))
    # 30,000 events were written while the last snapshot was made: the next starts 30,000
    # sooner, so a crash during it replays about `every`; never sooner than half of it.
    shots.last_lag_events = 30_000
    assert not shots.due(_State(69_999, 190_000, 10_000)) and shots.due(_State(70_000, 190_000, 10_000))
    shots.last_lag_events = 10**6
    assert not shots.due(_State(49_999, 190_000, 10_000)) and shots.due(_State(50_000, 190_000, 10_000))
    assert shots.due(_State(snap_mod.MIN_EVERY, 100, 10)) and not shots.due(_State(snap_mod.MIN_EVERY - 1, 100, 10))


def test_a_snapshot_records_the_events_written_while_it_was_made(tmp_path):
    """take() measures the lag `due` uses: events committed between the capture and the
    end of the write (here Place calls made while the file is written)."""
    srv = SnapshotServer(tmp_path / "data")
    try:
        srv.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host(0)]))
        shots = srv.state.snapshots
        real_put = shots.storage.put

        def slow_put(sequence, data):  # more events commit while the snapshot is written
            for i in range(3):
                srv.stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"late{i}", requests={"cpu": 1})]))
            return real_put(sequence, data)

        shots.storage.put = slow_put
        before = srv.state.sequence
        try:
            assert shots.take(srv.state) == before
        finally:
            shots.storage.put = real_put
        assert shots.last_lag_events == srv.state.sequence - before == 3
    finally:
        srv.stop()


def test_no_final_snapshot_after_a_fatal_store_error(tmp_path):
    """A Place the store refused was answered UNAVAILABLE: the stop that follows must not
    snapshot the memory that holds it, or the next start would bring back a placement
    nobody was told about."""
    srv, port = create_server("127.0.0.1:0", data_dir=str(tmp_path))
    srv.start()
    channel, stub = stub_for(f"127.0.0.1:{port}")
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[pb.Host(id="h1", capacity={"cpu": 1000})]))

    def failing(records):
        raise StoreError("injected I/O error")

    srv.state.store.append = failing
    with pytest.raises(grpc.RpcError) as err:
        stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id="ghost", requests={"cpu": 10})]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    srv.wait(10)
    channel.close()
    again, _ = create_server("127.0.0.1:0", data_dir=str(tmp_path))
    try:
        assert again.state.cluster.assignments() == {}
        assert again.state.sequence == 1           # the HOST_ADDED event only
    finally:
        again.stop(0)


# -- the log's events read from their bytes ---------------------------------------


def _placed_event(seq: int, wid: str, host: str, rest: bytes, **fields) -> bytes:
    """A PLACED event whose workload is its id field followed by `rest` as given (in any
    field order, as an older writer may have written it)."""
    idb = wid.encode()
    spec = b"\n" + bytes([len(idb)]) + idb + rest
    head = pb.Event(sequence=seq, type=pb.EVENT_TYPE_PLACED, host_id=host, workload_id=wid, incarnation="i1",
                    **fields).SerializeToString()
    return head + b"\x3a" + bytes([len(spec)]) + spec


def test_replay_reads_events_from_their_bytes_exactly_as_protobuf_decodes_them():
    """Plain placements and releases are read without protobuf (state._scanned): for every
    event, canonical or not, what replay reads equals what protobuf decodes, and the spec
    bytes kept are the canonical ones."""
    from hci_scheduler.server import convert
    from hci_scheduler.server.state import _PlainRun, _Scanned, _scanned

    req = pb.Workload(requests={"cpu": 100, "memory": 64}).SerializeToString()
    cpu, mem = pb.Workload(requests={"cpu": 100}).SerializeToString(), pb.Workload(
        requests={"memory": 64}).SerializeToString()
    kind = pb.Workload(kind=pb.WORKLOAD_KIND_CONTAINER).SerializeToString()
    bodies = [
        _placed_event(1, "a", "h0", req),                      # as protobuf writes it
        _placed_event(2, "b", "h1", kind + mem + cpu),         # fields and map entries out of order
        _placed_event(3, "c", "h0", mem + cpu),                # the same spec as b, other bytes
        _placed_event(4, "d", "h1", pb.Workload(per_host=True).SerializeToString()),  # not plain
        _placed_event(5, "e", "h1", req + b"\n\x01x"),         # an id again: protobuf keeps "x"
        pb.Event(sequence=6, type=pb.EVENT_TYPE_RELEASED, workload_id="a", host_id="h0").SerializeToString(),
        pb.Event(sequence=7, type=pb.EVENT_TYPE_HOST_ADDED, host=pb.Host(id="h2")).SerializeToString(),
        pb.Event(sequence=8, type=pb.EVENT_TYPE_EVICTED, workload_id="b", reason="preempted").SerializeToString(),
    ]
    events, keys = _scanned([Record(i + 1, 0, b) for i, b in enumerate(bodies)], _PlainRun())
    reference = _PlainRun()
    for body, ev, key in zip(bodies, events, keys):
        want = pb.Event.FromString(body)
        got = ev.full() if isinstance(ev, _Scanned) else ev
        assert got == want
        assert (ev.sequence, ev.type, ev.workload_id) == (want.sequence, want.type, want.workload_id)
        if want.type == pb.EVENT_TYPE_PLACED:
            assert ev.host_id == want.host_id
            assert key == reference.key(want)
            if key is not None:
                assert key[0] == convert.spec_bytes(want.workload)  # canonical, whatever was written
    # Which were read from bytes: the plain placements and the plain release only.
    assert [isinstance(ev, _Scanned) for ev in events] == [True, True, True, False, False, True, False, False]
    # Invalid UTF-8 in an id fails as protobuf fails, never as something else.
    bad = pb.Event(sequence=9, type=pb.EVENT_TYPE_RELEASED, workload_id="z").SerializeToString().replace(
        b"z", b"\xff")
    with pytest.raises(type(_decode_error(bad))):
        _scanned([Record(9, 0, bad)], _PlainRun())


def _decode_error(body: bytes) -> Exception:
    try:
        pb.Event.FromString(body)
    except Exception as exc:  # noqa: BLE001 (the type protobuf raises is what is compared)
        return exc
    raise AssertionError("protobuf decoded it")


def test_full_replay_of_a_log_written_out_of_canonical_order_keeps_canonical_specs(tmp_path, monkeypatch):
    """A log an older writer wrote with other field orders replays (scanned in chunks) to
    the placements it records, each kept under its canonical spec bytes (what a retried
    Place is compared with)."""
    from hci_scheduler.server import convert, state as state_mod
    from hci_scheduler.server.state import SchedulerState

    monkeypatch.setattr(state_mod, "_SCAN_CHUNK", 7)  # chunks end mid-run and between a place and its release

    store = SQLiteStore(str(tmp_path / "scheduler.db"), "NORMAL")
    hosts = [pb.Event(sequence=i + 1, type=pb.EVENT_TYPE_HOST_ADDED,
                      host=pb.Host(id=f"h{i}", capacity={"cpu": 10_000, "memory": 10_000})).SerializeToString()
             for i in range(3)]
    cpu, mem = pb.Workload(requests={"cpu": 100}).SerializeToString(), pb.Workload(
        requests={"memory": 64}).SerializeToString()
    placed = [_placed_event(4 + i, f"w{i}", f"h{i % 3}", (mem + cpu) if i % 2 else (cpu + mem)) for i in range(40)]
    releases = [pb.Event(sequence=44 + k, type=pb.EVENT_TYPE_RELEASED, workload_id=f"w{i}").SerializeToString()
                for k, i in enumerate(range(0, 40, 3))]
    bodies = hosts + placed + releases
    store.append([Record(pb.Event.FromString(b).sequence, pb.Event.FromString(b).type, b) for b in bodies])
    store.close()
    state = SchedulerState(SQLiteStore(str(tmp_path / "scheduler.db"), "NORMAL"), ("cpu", "memory"))
    try:
        gone = {f"w{i}" for i in range(0, 40, 3)}
        want = {f"w{i}": f"h{i % 3}" for i in range(40) if f"w{i}" not in gone}
        assert state.cluster.assignments() == want
        for i, body in enumerate(placed):
            ev = pb.Event.FromString(body)
            if ev.workload_id in want:
                assert state._placed[ev.workload_id] == (ev.sequence, convert.spec_bytes(ev.workload))
        # Usage recomputed from the placements: 100 cpu and 64 memory each.
        per_host = {h: sum(1 for v in want.values() if v == h) for h in ("h0", "h1", "h2")}
        usage = state.cluster.usage()
        for r, h in enumerate(("h0", "h1", "h2")):
            assert usage[r].tolist() == [100 * per_host[h], 64 * per_host[h]]
    finally:
        state.close()
