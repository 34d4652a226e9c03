"""Durability under store faults (issue 13, items 4-7): the log's incarnation and its
high-water mark, watches that cannot resume, the offline check, a full or read-only
disk (reads go on, writes come back by themselves), fatal store errors exit non-zero,
store files that cannot be written are named instead of killing the process."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hci_scheduler.server.app import SERVICE_NAME, create_server, serve
from hci_scheduler.store import MemoryStore, Record, SQLiteStore, StoreError, StoreUnwritable
from hci_scheduler.store.mark import mark_path, read_mark
from hci_scheduler.v1 import scheduler_pb2 as pb

from tests.waiting import wait_for

from .conftest import ROOT, ServerProcess, in_process_server, make_host, make_workload, stub_for


@contextlib.contextmanager
def in_process(data_dir: Path, **options):
    """A started server over `data_dir` in this process: (server, stub, health stub)."""
    with in_process_server(data_dir, **options) as (srv, channel, stub):
        yield srv, stub, health_pb2_grpc.HealthStub(channel)


def watch(stub, after: int, incarnation: str = "", until: int | None = None) -> list[pb.WatchEventsResponse]:
    """The responses of a WatchEvents from `after` up to sequence `until`."""
    out = []
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after, incarnation=incarnation), timeout=10)
    for resp in stream:
        out.append(resp)
        if until is None or resp.event.sequence >= until:
            break
    stream.cancel()
    return out


def service_health(health) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status


# -- item 4: incarnation, watches that cannot resume, the high-water mark -------------


def test_every_event_and_watch_response_carries_the_incarnation(tmp_path):
    with in_process(tmp_path / "data") as (_, s, _):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0")]))
        s.Place(pb.PlaceRequest(workloads=[make_workload("w0"), make_workload("w1")]))
        s.Release(pb.ReleaseRequest(workload_ids=["w0"]))
        status = s.GetStatus(pb.GetStatusRequest())
        assert len(status.incarnation) == 16 and status.last_sequence == 4
        got = watch(s, 0, until=4)
        assert [r.event.sequence for r in got] == [1, 2, 3, 4]
        assert {r.incarnation for r in got} == {r.event.incarnation for r in got} == {status.incarnation}
    with in_process(tmp_path / "data") as (_, s, _):  # the incarnation survives a clean restart
        assert s.GetStatus(pb.GetStatusRequest()).incarnation == status.incarnation
        assert watch(s, 3, incarnation=status.incarnation)[0].event.workload_id == "w0"


def test_watch_beyond_the_last_sequence_is_out_of_range(tmp_path):
    with in_process(tmp_path / "data") as (_, s, _):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0")]))
        with pytest.raises(grpc.RpcError) as err:
            watch(s, 2)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "last sequence 1" in err.value.details()


def test_waiting_watch_fails_when_the_store_goes_back():
    """A watch that waits for sequence 3 on a store that then holds only 1 (its log was
    cut under it) fails OUT_OF_RANGE instead of waiting for other events numbered 2, 3."""
    from hci_scheduler.server.service import SchedulerServicer
    from hci_scheduler.server.state import SchedulerState

    store = MemoryStore()
    state = SchedulerState(store)
    servicer = SchedulerServicer(state, watch_poll_s=0.01)
    for i in range(3):
        state.execute("register", ([make_host(f"h{i}")], [_host_model(f"h{i}")]))

    class Context:
        def is_active(self):
            return True

        def abort(self, code, details):
            raise RuntimeError(code, details)

    stream = servicer.WatchEvents(pb.WatchEventsRequest(after_sequence=3), Context())
    cut = threading.Timer(0.05, lambda: store._records.__delitem__(slice(1, None)))
    cut.start()
    with pytest.raises(RuntimeError) as err:
        next(stream)
    assert err.value.args[0] == grpc.StatusCode.OUT_OF_RANGE and "last sequence 1" in err.value.args[1]


def _host_model(host_id: str):
    from hci_scheduler.server import convert

    return convert.host_to_model(make_host(host_id))


def test_store_below_its_mark_starts_a_new_incarnation(tmp_path, caplog):
    """A database file put back from an earlier copy (events 1..5 of 10) opens with an
    ERROR naming both sequences and a new incarnation, so no watcher takes the next
    events for the ones it saw under the same numbers."""
    path = str(tmp_path / "s.db")
    with SQLiteStore(path) as s:
        s.append([Record(i, 4, b"x") for i in range(1, 6)])
        old = s.incarnation()
    shutil.copy(path, path + ".copy")
    with SQLiteStore(path) as s:
        s.append([Record(i, 4, b"x") for i in range(6, 11)])
    assert read_mark(mark_path(path)) == (old, 10)  # written at the clean stop
    shutil.copy(path + ".copy", path)
    with caplog.at_level("ERROR", logger="hci_scheduler.store"), SQLiteStore(path) as s:
        assert s.last_sequence() == 5 and s.incarnation() != old
        new = s.incarnation()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "last sequence 5 is below the sequence 10" in errors[0].fields["reason"]
    assert read_mark(mark_path(path)) == (new, 5)
    with SQLiteStore(path) as s:  # once settled, the next open keeps it
        assert s.incarnation() == new


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_wal_after_a_kill_starts_a_new_incarnation(tmp_path, caplog, damage):
    """The issue's campaign: after a kill, the WAL truncated in the middle or 4 KiB of it
    overwritten. SQLite opens the store without the events from the damage on; the mark,
    written 0.1 s behind the log, names how far the log had come."""
    path = tmp_path / "s.db"
    s = SQLiteStore(str(path), checkpoint_interval_s=3600)  # no checkpoint: the events stay in the WAL
    try:
        for i in range(1, 501, 10):
            s.append([Record(j, 4, os.urandom(500)) for j in range(i, i + 10)])
        wait_for(lambda: read_mark(mark_path(str(path))) == (s.incarnation(), 500), "the mark at 500")
        old = s.incarnation()
        crash = tmp_path / "crash"  # the files as a kill leaves them (the WAL index is rebuilt)
        crash.mkdir()
        for name in ("s.db", "s.db-wal", "s.db.mark"):
            shutil.copy(tmp_path / name, crash / name)
    finally:
        s.close()
    wal = crash / "s.db-wal"
    size = wal.stat().st_size
    with open(wal, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(os.urandom(4096))
    with caplog.at_level("ERROR", logger="hci_scheduler.store"), SQLiteStore(str(crash / "s.db")) as s:
        last = s.last_sequence()
        assert last < 500 and s.incarnation() != old
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"last sequence {last} is below the sequence 500" in errors[0].fields["reason"]


def test_checkpoint_records_the_mark(tmp_path):
    path = str(tmp_path / "s.db")
    s = SQLiteStore(path, checkpoint_interval_s=0.02)
    try:
        s.append([Record(i, 4, b"x") for i in range(1, 8)])
        wait_for(lambda: read_mark(mark_path(path)) == (s.incarnation(), 7), "the mark at 7")
        assert read_mark(mark_path(path)) == (s.incarnation(), 7)
    finally:
        s.close()


def test_restored_database_gets_data_loss_for_old_watchers(tmp_path):
    """End to end: the server restarts on a database copied back from before its last
    events; it logs the loss, its incarnation changes, a watcher of the old one gets
    DATA_LOSS, and the events that reuse the numbers carry the new incarnation."""
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0", cpu=100_000)]))
    s.Place(pb.PlaceRequest(workloads=[make_workload(f"a{i}", cpu=10) for i in range(3)]))
    assert srv.terminate() == 0
    shutil.copy(data / "scheduler.db", tmp_path / "copy.db")
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    s.Place(pb.PlaceRequest(workloads=[make_workload(f"b{i}", cpu=10) for i in range(5)]))
    seen = s.GetStatus(pb.GetStatusRequest())
    assert seen.last_sequence == 9
    assert srv.terminate() == 0
    shutil.copy(tmp_path / "copy.db", data / "scheduler.db")
    srv = ServerProcess(tmp_path, data_dir=data).start()
    try:
        _, s = stub_for(srv.address)
        now = s.GetStatus(pb.GetStatusRequest())
        assert now.last_sequence == 4 and now.incarnation != seen.incarnation
        errors = [json.loads(ln) for ln in srv.log().splitlines() if ln.startswith("{")]
        errors = [e for e in errors if e["level"] == "error"]
        assert errors and "last sequence 4 is below the sequence 9" in errors[0]["reason"]
        with pytest.raises(grpc.RpcError) as err:
            watch(s, 9)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE  # 9 is beyond the last sequence 4
        s.Place(pb.PlaceRequest(workloads=[make_workload(f"c{i}", cpu=10) for i in range(5)]))
        with pytest.raises(grpc.RpcError) as err:
            watch(s, 4, incarnation=seen.incarnation)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS and "list and watch again" in err.value.details()
        fresh = watch(s, 4, incarnation=now.incarnation, until=9)
        assert [r.event.workload_id for r in fresh] == [f"c{i}" for i in range(5)]
        assert {r.event.incarnation for r in fresh} == {now.incarnation}
    finally:
        srv.kill()


# -- item 4: hci-scheduler check ---------------------------------------------------------


def run_check(data_dir: Path) -> tuple[int, list[str]]:
    p = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", "check", "--data-dir", str(data_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.splitlines()


def files_of(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


@pytest.fixture
def checked_store(tmp_path):
    """A data dir with hosts, placements and a release, stopped cleanly."""
    data = tmp_path / "data"
    with in_process(data) as (_, s, _):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0"), make_host("h1")]))
        s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}") for i in range(6)]))
        s.Release(pb.ReleaseRequest(workload_ids=["w1"]))
    return data


def test_check_passes_a_sound_store_and_changes_nothing(checked_store):
    before = files_of(checked_store)
    assert run_check(checked_store) == (0, [f"{checked_store}: store is sound"])
    assert files_of(checked_store) == before


def test_check_passes_a_store_left_by_sigkill(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0")]))
    s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}", cpu=10) for i in range(20)]))
    srv.kill()
    before = files_of(data)
    assert run_check(data)[0] == 0
    assert files_of(data) == before


def _edit(data: Path, sql: str, *args) -> None:
    conn = sqlite3.connect(data / "scheduler.db")
    conn.execute(sql, args)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage, expected", [
    (("DELETE FROM events WHERE seq = 3",), "sequence gap: 2 is followed by 4"),
    (("UPDATE events SET body = ? WHERE seq = 2", b"\xff\xff\xff"), "event 2: does not decode"),
    (("UPDATE events SET kind = 5 WHERE seq = 2",), "event 2: stored as type 5, its body says type 1"),
    (("DELETE FROM events WHERE seq > 4",), "last sequence 4 is below the high-water mark 9"),
], ids=["gap", "undecodable", "wrong-type", "below-mark"])
def test_check_names_each_problem_on_its_line(checked_store, damage, expected):
    _edit(checked_store, *damage)
    code, lines = run_check(checked_store)
    assert code == 1 and any(expected in ln for ln in lines), lines


def test_check_replays_a_compacted_log_from_its_snapshot(tmp_path):
    """A log compacted behind a snapshot is checked from the snapshot plus its tail; a
    snapshot that does not check out, with the log compacted past it, is a problem."""
    data = tmp_path / "data"
    with in_process(data, snapshot_every=0, snapshot_tail=0) as (srv, s, _):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0", cpu=100_000)]))
        for i in range(3):  # compaction stops at the snapshot before the newest
            s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}-{k}", cpu=10) for k in range(5)]))
            srv.state.snapshots.take(srv.state)
        s.Release(pb.ReleaseRequest(workload_ids=["w0-0"]))  # a tail after the snapshot
        assert srv.state.store.compacted_sequence() == 6
    assert run_check(data) == (0, [f"{data}: store is sound"])
    for snap in (data / "snapshots").iterdir():
        snap.write_bytes(snap.read_bytes()[:-8] + b"damaged!")
    code, lines = run_check(data)
    assert code == 1 and any("compacted" in ln for ln in lines), lines


def test_check_finds_a_host_charged_beyond_its_limit(checked_store):
    """Host h0 registered with 4000 millicores holds 4 x 1000; its event rewritten to 2000
    makes the replayed host charged beyond its limit (or refused by the replay)."""
    conn = sqlite3.connect(checked_store / "scheduler.db")
    body = conn.execute("SELECT body FROM events WHERE seq = 1").fetchone()[0]
    ev = pb.Event.FromString(body)
    ev.host.capacity["cpu"] = 2000
    conn.execute("UPDATE events SET body = ? WHERE seq = 1", (ev.SerializeToString(),))
    conn.commit()
    conn.close()
    code, lines = run_check(checked_store)
    assert code == 1 and any("h0" in ln or "replay fails" in ln for ln in lines), lines


# -- item 5: a store failure stops the server with a non-zero exit -------------------------


def test_fatal_store_error_exits_non_zero_naming_the_cause(tmp_path, capfd):
    srv, port = create_server("127.0.0.1:0", data_dir=str(tmp_path / "data"))

    def failing_append(records):
        raise StoreError("scheduler.db: commit failed: disk I/O error")

    srv.state.store.append = failing_append
    codes = []

    def client():
        _, s = stub_for(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as err:
            s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0")]))
        codes.append(err.value.code())

    threading.Timer(0.5, client).start()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert serve(srv, grace=0) == 1  # was 0: a supervisor read it as a clean stop
    finally:  # serve's handlers must not outlive it in the test process
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert codes == [grpc.StatusCode.UNAVAILABLE]
    assert isinstance(srv.fatal, StoreError) and "disk I/O error" in str(srv.fatal)


def test_unopenable_store_exits_non_zero_naming_the_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "scheduler.db").write_bytes(b"not a database" * 100)
    p = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", "127.0.0.1:0",
                        "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "store failed" in p.stderr and "scheduler.db" in p.stderr, p.stderr


# -- item 6: a full disk ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not possible)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Take every free byte of `disk` but `leave` with one file; returns it (delete it to
    free the disk)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        f.truncate(max(f.tell() - leave, 0))
    return filler


def test_full_disk_reports_the_real_error_and_keeps_nothing(small_disk):
    """A batch that hits a full disk fails with SQLite's own error (the explicit
    ROLLBACK once replaced it with "cannot rollback - no transaction is active"),
    leaves nothing behind, and the store takes the next batch once there is room."""
    s = SQLiteStore(str(small_disk / "s.db"))
    try:
        filler = fill(small_disk)
        seq = 1
        with pytest.raises(StoreUnwritable) as err:
            for _ in range(10_000):
                s.append([Record(seq, 4, os.urandom(3000)), Record(seq + 1, 4, os.urandom(3000))])
                seq += 2
        assert "database or disk is full" in str(err.value)
        assert s.last_sequence() == seq - 1 and [r.sequence for r in s.read()] == list(range(1, seq))
        with pytest.raises(StoreUnwritable):
            s.probe_write()
        filler.unlink()
        s.probe_write()
        s.append([Record(seq, 4, b"x"), Record(seq + 1, 4, b"y")])
        assert s.last_sequence() == seq + 1
    finally:
        s.close()


def used_by_host(allocs) -> dict[str, dict[str, int]]:
    used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for p in allocs:
        for dim, q in p.workload.requests.items():
            used[p.host_id][dim] += q
    return used


def test_full_disk_serves_reads_refuses_writes_and_resumes(small_disk):
    data = small_disk / "data"
    with in_process(data) as (srv, s, health):
        srv.state.probe_interval_s = 0.05
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"h{i}", cpu=10**9, memory=10**9)
                                                       for i in range(4)]))
        s.Place(pb.PlaceRequest(workloads=[make_workload("first", cpu=1, memory=1)]))
        filler = fill(small_disk, leave=128 * 1024)
        acked = {"first"}
        failure = None
        for call in range(2000):  # until the WAL needs room the disk does not have
            batch = [make_workload(f"w{call}-{k}", cpu=1, memory=1, group="g" * 60) for k in range(50)]
            try:
                resp = s.Place(pb.PlaceRequest(workloads=batch))
            except grpc.RpcError as exc:
                failure = exc
                break
            acked.update(p.workload_id for p in resp.placements if p.host_id)
        assert failure is not None and len(acked) > 1, "the disk never filled, or filled at once"
        assert failure.code() == grpc.StatusCode.UNAVAILABLE and "database or disk is full" in failure.details()
        status = s.GetStatus(pb.GetStatusRequest())
        assert not status.writable and "database or disk is full" in status.unwritable_reason
        assert service_health(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Reads serve exactly the durable state: the refused batch left no trace.
        allocs = s.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations
        assert {p.workload_id for p in allocs} == acked
        used = used_by_host(allocs)
        for h in s.ListHosts(pb.ListHostsRequest()).hosts:
            assert h.used["cpu"] == used[h.id]["cpu"] and h.workload_count == sum(p.host_id == h.id for p in allocs)
        assert status.allocations == len(acked)
        with pytest.raises(grpc.RpcError) as err:  # refused at once, with the reason
            s.Release(pb.ReleaseRequest(workload_ids=[next(iter(acked))]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "disk is full" in err.value.details()
        filler.unlink()
        wait_for(lambda: s.GetStatus(pb.GetStatusRequest()).writable, "the store to take writes again")
        assert s.GetStatus(pb.GetStatusRequest()).writable
        assert service_health(health) == health_pb2.HealthCheckResponse.SERVING
        resp = s.Place(pb.PlaceRequest(workloads=[make_workload("after", cpu=1, memory=1)]))
        assert resp.placements[0].host_id and resp.placements[0].sequence == status.last_sequence + 1


def test_restart_on_a_full_disk_serves_reads_not_writes(small_disk):
    data = small_disk / "data"
    with in_process(data) as (_, s, _):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h0")]))
        s.Place(pb.PlaceRequest(workloads=[make_workload("w0")]))
    fill(small_disk)
    with in_process(data) as (_, s, health):
        status = s.GetStatus(pb.GetStatusRequest())
        assert not status.writable and "full" in status.unwritable_reason
        assert service_health(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert [p.workload_id for p in s.ListAllocations(pb.ListAllocationsRequest()).allocations] == ["w0"]
        with pytest.raises(grpc.RpcError) as err:
            s.Place(pb.PlaceRequest(workloads=[make_workload("w1")]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# -- item 7: store files that cannot be written ------------------------------------------------


@pytest.fixture
def ext4_dir(tmp_path):
    """A directory on a small ext4 image (root only: mkfs.ext4, a loop mount, chattr)."""
    img, mnt = tmp_path / "img", tmp_path / "ext4"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(32 * 1024 * 1024)
    if (subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True).returncode != 0
            or subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True).returncode != 0):
        pytest.skip("cannot make and loop-mount an ext4 image here (needs root and mkfs.ext4)")
    try:
        yield mnt
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mnt)], capture_output=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_file_system_turning_read_only_refuses_writes_and_keeps_reads(ext4_dir):
    """ext4 mounted errors=remount-ro meets an error: SQLite reports `disk I/O error`, which
    is the read-only file system (writes refused, reads go on), not a fatal failure."""
    dev = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(ext4_dir)], capture_output=True, text=True)
    trigger = Path("/sys/fs/ext4") / os.path.basename(dev.stdout.strip()) / "trigger_fs_error"
    if subprocess.run(["mount", "-o", "remount,errors=remount-ro", str(ext4_dir)]).returncode or not trigger.exists():
        pytest.skip("cannot make this ext4 turn read-only on an error here")
    s = SQLiteStore(str(ext4_dir / "s.db"))
    try:
        s.append([Record(1, 4, b"kept")])
        trigger.write_text("test\n")
        with pytest.raises(StoreUnwritable) as err:
            s.append([Record(2, 4, b"x"), Record(3, 4, b"y")])
        assert "read-only" in str(err.value)
        with pytest.raises(StoreUnwritable):
            s.probe_write()
        assert s.read() == [Record(1, 4, b"kept")] and s.last_sequence() == 1
    finally:
        s.close()


# A restart with immutable store files serves reads: tests/server/test_readonly.py.


def test_fatal_signal_leaves_a_line(tmp_path):
    srv = ServerProcess(tmp_path, data_dir=tmp_path / "data").start()
    srv.proc.send_signal(signal.SIGBUS)
    assert srv.proc.wait(30) != 0
    srv.kill()
    assert "Fatal Python error: Bus error" in srv.log()
