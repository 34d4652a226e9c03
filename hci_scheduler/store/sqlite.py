"""The embedded default Store: one SQLite file in WAL mode with synchronous=FULL.

With `journal_mode=WAL` and `synchronous=FULL` SQLite fsyncs the WAL on every
commit, so a committed transaction survives a process kill and a power loss,
and a transaction that did not commit leaves no trace (atomic batches).

`append` writes its records in one transaction; calls from several threads
take turns (and give the background checkpoint its turn between two commits).
Grouping many mutations into one commit is the server's writer's job.

A full disk or a read-only database raises StoreUnwritable (reads go on; the
failed transaction left nothing); any other SQLite error raises StoreError.
Beside the database, a high-water mark (mark.py) records the incarnation and
the last sequence at each checkpoint and at close: a store that opens below
it lost acknowledged events, says so in an ERROR and starts a new incarnation.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from typing import Sequence

from .base import (COMPACTED_KEY, INCARNATION_KEY, Record, Store, StoreError, StoreUnwritable, check_contiguous,
                   new_incarnation)
from .mark import Mark, mark_path, read_mark, write_mark

log = logging.getLogger("hci_scheduler.store")

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq  INTEGER PRIMARY KEY,   -- 1, 2, ... without gaps
    kind INTEGER NOT NULL,      -- hci_scheduler.v1.EventType number
    body BLOB    NOT NULL       -- serialized hci_scheduler.v1.Event
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


SYNC_MODES = ("FULL", "NORMAL")
_INSERT = "INSERT INTO events (seq, kind, body) VALUES (?, ?, ?)"


#: SQLite's primary result codes for "writes refused for now" (SQLITE_READONLY, SQLITE_FULL).
_UNWRITABLE_CODES = (8, 13)


#: SQLite's primary result code of an I/O error (SQLITE_IOERR).
_IOERR = 10


def read_only_fs(path: str) -> bool:
    """Whether the file system holding `path` refuses writes as read-only (an ext4 that met
    an error with errors=remount-ro, say). Asked by creating a file beside it: ext4 turns
    read-only without its mount flags (statvfs) saying so."""
    probe = path + ".rw-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        return exc.errno == errno.EROFS
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return False


def _store_error(path: str, what: str, exc: sqlite3.Error) -> StoreError:
    """StoreUnwritable for a full disk, a read-only database, or an I/O error on a file
    system now read-only (SQLite reports the last as `disk I/O error`); StoreError otherwise."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary in _UNWRITABLE_CODES:
        return StoreUnwritable(f"{path}: {what}: {exc}")
    if primary == _IOERR and read_only_fs(path):
        return StoreUnwritable(f"{path}: {what}: {exc} (the file system is read-only)")
    return StoreError(f"{path}: {what}: {exc}")


def check_files_writable(path: str) -> None:
    """Raise StoreError naming the first store file that exists and cannot be opened for
    writing (immutable, read-only file system, permissions). SQLite would open it
    read-only and map its shared memory anyway; a write to that mapping kills the
    process with SIGBUS, with nothing in the log."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            fd = os.open(p, os.O_RDWR)  # opening changes nothing in the file
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (immutable? see lsattr)" if exc.errno == errno.EPERM else ""
            raise StoreError(f"{p}: store file not writable: {reason}{hint}") from exc
        os.close(fd)


#: Bytes kept beside the database (`<db>.reserve`). SQLite cannot open a database in WAL
#: mode without its shared-memory index (`-shm`, 32 KiB to start), which a clean stop
#: deletes; on a full disk the reserve is given up to make room for it, so that a restart
#: on a full disk serves reads (and refuses writes) instead of failing to start. Writes
#: resume only once the reserve could be made again (see probe_write).
RESERVE_BYTES = 128 * 1024


def _keep_reserve(path: str) -> None:
    """Make the reserve when it is missing; OSError when there is no room. Written, not
    truncated: a sparse file would hold no blocks."""
    reserve = path + ".reserve"
    with contextlib.suppress(OSError):
        if os.path.getsize(reserve) == RESERVE_BYTES:
            return
    try:
        with open(reserve, "wb", buffering=0) as f:
            data = memoryview(bytes(RESERVE_BYTES))
            while data:  # a short write on a nearly full disk, then ENOSPC
                data = data[f.write(data):]
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(reserve)
        raise


def _session(path: str, synchronous: str | None = None) -> sqlite3.Connection:
    """Another connection to the open store (a reader, the checkpointer): the database is
    in WAL mode already, so no statement that may write, and it opens on a full disk too."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def _open_with_reserve(path: str, synchronous: str) -> sqlite3.Connection:
    """_connect, giving up the reserve once when the disk has no room to open."""
    try:
        return _connect(path, synchronous)
    except sqlite3.Error as exc:
        reserve = path + ".reserve"
        if not os.path.exists(reserve):
            raise
        os.unlink(reserve)
        log.warning("cannot open the store, giving up its reserve to make room", extra={"fields": {
            "path": path, "reason": str(exc)}})
        return _connect(path, synchronous)


def _connect(path: str, synchronous: str = "FULL") -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one append is
    # exactly one transaction.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    # Before WAL (which writes the header): a new database gives the pages of compacted
    # events back to the file system (see compact); on an existing one this changes nothing.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class SQLiteStore(Store):
    """An event log in one SQLite database file (created when missing).

    Parameters
    ----------
    path : str
        The database file. The WAL (`-wal`) and shared-memory (`-shm`) files sit beside it.
    synchronous : {"FULL", "NORMAL"}
        FULL (the default) fsyncs the WAL on every commit: a reply means the
        mutation survives a power loss. NORMAL fsyncs only at checkpoints: a
        commit still survives a process crash (SIGKILL) but the last ones may
        be lost on power loss. NORMAL exists for benchmarks on slow disks.
    checkpoint_interval_s : float
        How often the background thread copies the WAL into the database file.
    """

    def __init__(self, path: str, synchronous: str = "FULL", checkpoint_interval_s: float = 1.0) -> None:
        synchronous = synchronous.upper()
        if synchronous not in SYNC_MODES:
            raise StoreError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        self.path = path
        self.synchronous = synchronous
        check_files_writable(path)
        try:
            self._wconn = _open_with_reserve(path, synchronous)
        except sqlite3.Error as exc:  # not a database, no room for the WAL index, ...
            raise _store_error(path, "cannot open", exc) from exc
        self._cond = threading.Condition()
        self._committing = False
        self._checkpoint_wanted = False
        self._waiting = 0  # threads in _wait: a commit with none skips notify_all
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.commits = 0  # transactions committed (group commit shares them)
        self.checkpoint_interval_s = checkpoint_interval_s
        mode = self._wconn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{path}: could not switch to WAL mode (got {mode!r})")
        self._wconn.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{path}: schema_version {version!r}, this build reads {SCHEMA_VERSION!r}")
        row = self._wconn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        self._last = int(row[0])
        self._compacted = self._finish_compaction()
        self._last = max(self._last, self._compacted)  # a log compacted whole goes on from there
        self.mark_path = mark_path(path)
        self._marked: Mark | None = None
        self._mark_failing = False
        self._marked_synced = False
        self._mark_lock = threading.Lock()
        self.mark_interval_s = 0.1
        self._settle_incarnation()
        with contextlib.suppress(OSError):  # on a full disk, probe_write says so
            _keep_reserve(path)
        # Checkpoints copy the WAL into the database file and fsync it. Run inline (SQLite's
        # default, every 1000 pages) one lands on some commit and stalls its reply: the p99.
        # A background thread checkpoints instead, once a second, between two commits.
        self._wconn.execute("PRAGMA wal_autocheckpoint=0")
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()
        self._marker = threading.Thread(target=self._mark_loop, name="sqlite-mark", daemon=True)
        self._marker.start()

    def _settle_incarnation(self) -> None:
        """The store's incarnation, checked against the high-water mark: a log below its
        mark (or of another incarnation) lost acknowledged events, so it gets a new
        incarnation and watchers of the old one are told (DATA_LOSS) instead of being
        handed other events under numbers they have seen."""
        current = self.get_meta(INCARNATION_KEY)
        try:
            mark = read_mark(self.mark_path)
        except StoreError as exc:
            log.warning("high-water mark ignored", extra={"fields": {"reason": str(exc)}})
            mark = None
        lost = None
        if current is not None and mark is not None:
            if mark.incarnation != current:
                lost = (f"the store's incarnation {current} is not the one its high-water mark "
                        f"records ({mark.incarnation} at sequence {mark.sequence}): the database was replaced")
            elif self._last < mark.sequence:
                lost = (f"the store's last sequence {self._last} is below the sequence {mark.sequence} "
                        "it recorded at a checkpoint or clean stop: acknowledged events were lost")
        if current is None or lost:
            fresh = new_incarnation()
            if lost:
                log.error("store lost acknowledged events; starting a new log incarnation", extra={"fields": {
                    "path": self.path, "reason": lost, "last_sequence": self._last,
                    "mark_sequence": mark.sequence, "old_incarnation": current, "incarnation": fresh}})
            try:
                self.set_meta(INCARNATION_KEY, fresh)
            except sqlite3.Error as exc:
                raise _store_error(self.path, "cannot record a new incarnation", exc) from exc
            current = fresh
        self._incarnation = current
        self._write_mark(self._last)

    def _write_mark(self, sequence: int, sync: bool = True) -> None:
        """Record the high-water mark (fsynced with `sync`); a failure (full disk) is
        logged, not fatal: the mark only adds detection."""
        mark = Mark(self._incarnation, sequence)
        with self._mark_lock:
            if mark == self._marked and (self._marked_synced or not sync):
                return
            try:
                write_mark(self.mark_path, mark, sync)
            except OSError as exc:
                if not self._mark_failing:  # once, not every second while the disk is full
                    log.warning("cannot write the high-water mark", extra={"fields": {
                        "path": self.mark_path, "reason": str(exc)}})
                self._mark_failing = True
                return
            self._mark_failing = False
            self._marked, self._marked_synced = mark, sync

    def _mark_loop(self) -> None:
        """Keep the mark close behind the log (every mark_interval_s, without fsync: a
        process kill keeps it, a power loss may leave an older one), so that damage to the
        WAL, which holds the commits since the last checkpoint, is detected too."""
        while not self._stop_checkpoints.wait(self.mark_interval_s):
            self._write_mark(self._last, sync=False)

    def incarnation(self) -> str:
        return self._incarnation

    def probe_write(self) -> None:
        """Rewrite one meta row: a real commit, so it fails as long as the disk is full."""
        try:
            _keep_reserve(self.path)
        except OSError as exc:
            raise StoreUnwritable(f"{self.path}: write probe failed: no room for the reserve: "
                                  f"{os.strerror(exc.errno) if exc.errno else exc}") from exc
        try:
            self.set_meta("probe", "1")
        except sqlite3.Error as exc:
            raise _store_error(self.path, "write probe failed", exc) from exc

    def _checkpoint_loop(self) -> None:
        """Checkpoint with no commit in flight, so every frame is copied and the next
        commit rewrites the WAL from its start. A checkpoint racing the writer rarely
        catches up with it: the WAL then only grows, and appending to a growing file
        costs an fsync of its metadata too, which roughly doubled a commit's time on
        ext4 (bench/README.md). At most one commit a second waits for a checkpoint."""
        conn = _session(self.path, self.synchronous)
        try:
            while not self._stop_checkpoints.wait(self.checkpoint_interval_s):
                with self._cond:
                    # Ask for the next turn: a writer that commits back to back would
                    # otherwise always take the store again before this thread wakes.
                    self._checkpoint_wanted = True
                    while self._committing:
                        self._wait()
                    self._checkpoint_wanted = False
                    if self._closed:
                        self._cond.notify_all()  # appends held back by the request go on
                        return
                    self._committing = True
                reached = self._last  # durable: no commit is in flight
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # busy (a reader holds an old snapshot): the next round tries again
                finally:
                    with self._cond:
                        self._committing = False
                        if self._waiting:
                            self._cond.notify_all()
                self._write_mark(reached)  # outside the turn: its fsync delays no commit
        finally:
            conn.close()

    # -- writing -------------------------------------------------------------

    def _wait(self) -> None:
        """Wait for the store to change hands (self._cond held). Counted, so that
        the single writer of an idle server does not notify nobody on every commit."""
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1

    def append(self, records: Sequence[Record]) -> None:
        """One transaction (one fsync) for all `records`. Calls are serialized, not
        grouped: the server's writer already hands over one batch at a time."""
        if records:
            self._turn(self._commit, records)

    def _commit(self, rows: Sequence[Record]) -> None:
        check_contiguous(self._last, rows)
        conn = self._wconn
        try:
            if len(rows) == 1:
                # One statement outside BEGIN is its own transaction, committed (and
                # fsynced) as the statement ends: one round trip instead of three.
                conn.execute(_INSERT, rows[0])  # Records are (seq, kind, body) tuples
            else:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise _store_error(self.path, "commit failed", exc) from exc
        self._last = rows[-1].sequence
        self.commits += 1

    # -- compaction ----------------------------------------------------------

    def _turn(self, fn, *args):
        """fn(*args) in the store's turn: one commit (or compaction step) at a time, and
        the background checkpoint gets its turn between two."""
        with self._cond:
            while self._committing or self._checkpoint_wanted:
                self._wait()
            if self._closed:
                raise StoreError("store is closed")
            self._committing = True
        try:
            return fn(*args)
        finally:
            with self._cond:
                self._committing = False
                if self._waiting:
                    self._cond.notify_all()

    def _finish_compaction(self) -> int:
        """Delete what a compaction interrupted by a crash left (at open); returns compacted_seq."""
        upto = int(self.get_meta(COMPACTED_KEY) or 0)
        if upto:
            self._wconn.execute("DELETE FROM events WHERE seq <= ?", (upto,))
        return upto

    def compacted_sequence(self) -> int:
        return self._compacted

    def compact(self, upto: int, chunk: int = 20_000) -> None:
        """Record compacted_seq, then delete in chunks of `chunk` events, each its own
        transaction in its own turn (an append waits for one chunk at most); then give
        the freed pages back (a database created with auto_vacuum) and truncate the WAL,
        which the deletes grew."""
        try:
            self._compact(upto, chunk)
        except sqlite3.Error as exc:
            raise _store_error(self.path, "compaction failed", exc) from exc

    def _compact(self, upto: int, chunk: int) -> None:
        upto = min(upto, self._last)
        done = self._compacted
        if upto <= done:
            return
        conn = self._wconn

        def record() -> None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (COMPACTED_KEY, str(upto)))
            self._compacted = upto

        self._turn(record)
        while done < upto:
            step = min(done + chunk, upto)
            self._turn(conn.execute, "DELETE FROM events WHERE seq > ? AND seq <= ?", (done, step))
            done = step
        if self._turn(lambda: conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2:  # else pages are reused
            while self._turn(lambda: conn.execute("PRAGMA freelist_count").fetchone()[0]):
                self._turn(lambda: conn.execute("PRAGMA incremental_vacuum(2000)").fetchall())
        self._turn(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    # -- reading -------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError("store is closed")
            conn = _session(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def read(self, after: int = 0, limit: int | None = None) -> list[Record]:
        if self._closed:
            raise StoreError("store is closed")
        sql = "SELECT seq, kind, body FROM events WHERE seq > ? ORDER BY seq"
        args: tuple = (after,)
        if limit is not None:
            sql += " LIMIT ?"
            args = (after, limit)
        try:
            rows = self._reader().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _store_error(self.path, "read failed", exc) from exc
        return [Record(int(s), int(k), bytes(b)) for s, k, b in rows]

    def last_sequence(self) -> int:
        return self._last

    def get_meta(self, key: str) -> str | None:
        row = self._wconn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        # In the store's turn: its own transaction, never inside an append's.
        self._turn(self._wconn.execute, "INSERT INTO meta (key, value) VALUES (?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def close(self) -> None:
        with self._cond:
            while self._committing:
                self._wait()
            if self._closed:
                return
            self._closed = True
        self._stop_checkpoints.set()
        self._checkpointer.join()
        self._marker.join()
        try:
            self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._write_mark(self._last)
        with self._readers_lock:
            for conn in self._readers:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._readers.clear()
        self._wconn.close()
