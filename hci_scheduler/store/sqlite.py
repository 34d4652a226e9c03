"""The embedded default Store: one SQLite file in WAL mode with synchronous=FULL.

With `journal_mode=WAL` and `synchronous=FULL` SQLite fsyncs the WAL on every
commit, so a committed transaction survives a process kill and a power loss,
and a transaction that did not commit leaves no trace (atomic batches).

`append` writes its records in one transaction; calls from several threads
take turns (and give the background checkpoint its turn between two commits).
Grouping many mutations into one commit is the server's writer's job.

One connection, in EXCLUSIVE locking mode: SQLite then keeps the WAL index in heap
memory instead of a shared-memory file (`-shm`) it maps. A mapped file that becomes
unwritable under the process (made immutable, say) kills it with SIGBUS at the next
write to the mapping, with nothing in the log; with no mapping, the same fault is an
error SQLite returns. Reads take the store's turn like commits (bench/README.md,
"Durability", gives the cost); a second process cannot open a store in use.

A full disk or a read-only database raises StoreUnwritable (reads go on; the
failed transaction left nothing); any other SQLite error raises StoreError. A store
whose files or directory cannot be written at open (a read-only remount, an
immutable file) is opened read-only: reads are served from it (from a copy when a
crash left a WAL to recover), and probe_write opens it for writing again once the
files take writes.
Beside the database, a high-water mark (mark.py) records the incarnation and
the last sequence at each checkpoint and at close: a store that opens below
it lost acknowledged events, says so in an ERROR and starts a new incarnation.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import urllib.parse
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
#: How long an open waits for a store another process holds (EXCLUSIVE locking: one
#: process at a time) before it fails, naming the file.
OPEN_TIMEOUT_S = 5.0
_INSERT = "INSERT INTO events (seq, kind, body) VALUES (?, ?, ?)"


#: SQLite's primary result codes for "writes refused for now" (SQLITE_READONLY, SQLITE_FULL).
_UNWRITABLE_CODES = (8, 13)


#: SQLite's primary result code of an I/O error (SQLITE_IOERR).
_IOERR = 10
#: SQLite's primary result code of a database locked by another connection (SQLITE_BUSY).
_BUSY = 5


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
    system now read-only or on a store file made unwritable (SQLite reports the last two
    as `disk I/O error`), naming the file; StoreError otherwise."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if code is not None else None
    if primary in _UNWRITABLE_CODES or primary == _IOERR:
        if primary == _IOERR and read_only_fs(path):
            return StoreUnwritable(f"{path}: {what}: {exc} (the file system is read-only)")
        why = unwritable_files(path)  # made immutable (or read-only) under the running server
        if why is not None:
            return StoreUnwritable(f"{path}: {what}: {exc} ({why})")
        if primary != _IOERR:
            return StoreUnwritable(f"{path}: {what}: {exc}")
    return StoreError(f"{path}: {what}: {exc}")


def unwritable_files(path: str) -> str | None:
    """Why the store at `path` cannot be written, naming the file or directory (None: it
    can): a store file that exists and cannot be opened for writing (immutable,
    read-only file system, permissions), or a directory where no file can be created
    (SQLite creates the WAL there). Asked by opening, which changes nothing, and by
    creating a probe file: permission bits do not stop root, and ext4 turns read-only
    without its mount flags (statvfs) saying so."""
    for p in (path, path + "-wal"):
        try:
            fd = os.open(p, os.O_RDWR)
        except FileNotFoundError:
            continue
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (immutable? see lsattr)" if exc.errno == errno.EPERM else ""
            return f"{p}: store file not writable: {reason}{hint}"
        os.close(fd)
    probe = path + ".rw-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # full, not read-only: SQLite says so at the next write
            return None
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"{os.path.dirname(os.path.abspath(path))}: store directory not writable: {reason}"
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


#: Bytes kept beside the database (`<db>.reserve`). SQLite cannot open a database in WAL
#: mode on a disk without a free block (it makes the WAL again, which a clean stop
#: deletes); on a full disk the reserve is given up to make room, so that a restart on a
#: full disk serves reads (and refuses writes) instead of failing to start. Writes
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


def open_read_only(path: str) -> tuple[sqlite3.Connection, str | None]:
    """A connection that reads the store and writes none of its files (a store that
    refuses writes, `hci-scheduler check`), and the scratch directory it reads from (None:
    the store itself; the caller removes it). Without a WAL to recover the file
    is opened as immutable; with one (a crash left it), SQLite must rebuild the WAL index
    from it, which it cannot do read-only, so the database and its WAL are read from
    copies in a scratch directory (the store's files do not change while it refuses
    writes)."""
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        scratch = tempfile.mkdtemp(prefix="hci-store-ro-")
        copy = os.path.join(scratch, os.path.basename(path))
        try:
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, copy + "-wal")
            return _connect(copy, "OFF"), scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro&immutable=1"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False), None


def _open_with_reserve(path: str, synchronous: str) -> sqlite3.Connection:
    """_connect, giving up the reserve once when the disk has no room to open."""
    try:
        return _connect(path, synchronous)
    except sqlite3.Error as exc:
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _BUSY:
            # EXCLUSIVE locking: another process (a second server) holds the store.
            raise StoreError(f"{path}: cannot open: {exc} (in use by another process?)") from exc
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
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=OPEN_TIMEOUT_S)
    # Before the first WAL access: the WAL index in heap memory, no mapped -shm (see the
    # module docstring); the database stays locked to this connection.
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    try:
        # Before WAL (which writes the header): a new database gives the pages of compacted
        # events back to the file system (see compact); on an existing one this changes nothing.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
    except BaseException:
        conn.close()  # it may hold the exclusive lock: another try would find the store locked
        raise
    return conn


class SQLiteStore(Store):
    """An event log in one SQLite database file (created when missing).

    Parameters
    ----------
    path : str
        The database file. The WAL (`-wal`) sits beside it; no `-shm` (EXCLUSIVE locking).
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
        self._cond = threading.Condition()
        self._committing = False
        self._checkpoint_wanted = False
        self._waiting = 0  # threads in _wait: a commit with none skips notify_all
        self._closed = False
        self.commits = 0  # transactions committed (group commit shares them)
        self.checkpoint_interval_s = checkpoint_interval_s
        self._checkpoint_failing = False
        # Why the store was opened read-only (None: it takes writes); see probe_write.
        self.read_only: str | None = unwritable_files(path)
        self._scratch: str | None = None  # the copies a read-only store reads from
        self._incarnation_recorded = True
        if self.read_only is None:
            self._wconn = self._open_writable()
        else:
            if not os.path.exists(path):
                raise StoreError(f"{path}: no store, and none can be created: {self.read_only}")
            try:
                self._wconn, self._scratch = open_read_only(path)
                self._check_schema()
            except (sqlite3.Error, OSError) as exc:
                self._drop_scratch()
                raise StoreError(f"{path}: cannot open read-only ({self.read_only}): {exc}") from exc
            log.error("store files not writable: serving reads only until they take writes", extra={"fields": {
                "path": path, "reason": self.read_only, "copy": self._scratch}})
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
        if self.read_only is None:
            with contextlib.suppress(OSError):  # on a full disk, probe_write says so
                _keep_reserve(path)
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True)
        self._checkpointer.start()
        self._marker = threading.Thread(target=self._mark_loop, name="sqlite-mark", daemon=True)
        self._marker.start()

    def _open_writable(self) -> sqlite3.Connection:
        try:
            conn = _open_with_reserve(self.path, self.synchronous)
        except sqlite3.Error as exc:  # not a database, no room for the WAL, ...
            raise _store_error(self.path, "cannot open", exc) from exc
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL mode (got {mode!r})")
            conn.executescript(_SCHEMA)
            self._wconn = conn
            self._check_schema(create=True)
        except BaseException as exc:
            conn.close()  # it holds the exclusive lock
            if isinstance(exc, sqlite3.Error):
                raise _store_error(self.path, "cannot open", exc) from exc
            raise
        # Checkpoints copy the WAL into the database file and fsync it. Run inline (SQLite's
        # default, every 1000 pages) one lands on some commit and stalls its reply: the p99.
        # A background thread checkpoints instead, once a second, between two commits.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    def _check_schema(self, create: bool = False) -> None:
        version = self.get_meta("schema_version")
        if version is None and create:
            self._wconn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema_version {version!r}, this build reads {SCHEMA_VERSION!r}")

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

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
            if self.read_only is None:
                try:
                    self.set_meta(INCARNATION_KEY, fresh)
                except sqlite3.Error as exc:
                    raise _store_error(self.path, "cannot record a new incarnation", exc) from exc
            else:  # recorded before the first write (see _reopen_writable)
                self._incarnation_recorded = False
            current = fresh
        self._incarnation = current
        self._write_mark(self._last)

    def _write_mark(self, sequence: int, sync: bool = True) -> None:
        """Record the high-water mark (fsynced with `sync`); a failure (full disk) is
        logged, not fatal: the mark only adds detection."""
        if not self._incarnation_recorded:  # the store does not say it yet (read-only)
            return
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
        """Rewrite one meta row: a real commit, so it fails as long as the disk is full.
        A store opened read-only is opened for writing first, once its files take writes."""
        if self.read_only is not None:
            why = unwritable_files(self.path)
            if why is not None:
                self.read_only = why
                raise StoreUnwritable(f"{self.path}: opened read-only: {why}")
            self._turn(self._reopen_writable)
        try:
            _keep_reserve(self.path)
        except OSError as exc:
            raise StoreUnwritable(f"{self.path}: write probe failed: no room for the reserve: "
                                  f"{os.strerror(exc.errno) if exc.errno else exc}") from exc
        try:
            self.set_meta("probe", "1")
        except sqlite3.Error as exc:
            raise _store_error(self.path, "write probe failed", exc) from exc

    def _reopen_writable(self) -> None:
        """Replace the read-only connection by a writable one (in the store's turn). The
        store's files did not change while it was read-only, so the state read from it
        stays the state of the log."""
        old = self._wconn
        try:
            self._open_writable()  # sets self._wconn
        except StoreError as exc:
            self._wconn = old
            raise StoreUnwritable(f"{self.path}: opened read-only, cannot open for writing: {exc}") from exc
        with contextlib.suppress(sqlite3.Error):
            old.close()
        self._drop_scratch()
        try:
            self._compacted = self._finish_compaction()
            if not self._incarnation_recorded:
                self._wconn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                                    "SET value = excluded.value", (INCARNATION_KEY, self._incarnation))
        except sqlite3.Error as exc:
            raise _store_error(self.path, "opened for writing", exc) from exc
        self._incarnation_recorded = True
        self.read_only = None
        log.info("store files take writes again: opened for writing", extra={"fields": {"path": self.path}})

    def _checkpoint_loop(self) -> None:
        """Checkpoint with no commit in flight, so every frame is copied and the next
        commit rewrites the WAL from its start. A checkpoint racing the writer rarely
        catches up with it: the WAL then only grows, and appending to a growing file
        costs an fsync of its metadata too, which roughly doubled a commit's time on
        ext4 (bench/README.md). At most one commit a second waits for a checkpoint."""
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
                if self.read_only is None:
                    self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    self._checkpoint_failing = False
            except sqlite3.Error as exc:
                self._checkpoint_failed(exc)
            finally:
                with self._cond:
                    self._committing = False
                    if self._waiting:
                        self._cond.notify_all()
            self._write_mark(reached)  # outside the turn: its fsync delays no commit

    def _checkpoint_failed(self, exc: sqlite3.Error) -> None:
        """Say once per streak why checkpoints fail: commits still go to the WAL, which
        then grows until the database file takes writes again."""
        if not self._checkpoint_failing:
            why = unwritable_files(self.path)
            log.error("checkpoint failed: commits go on into the WAL, which grows until it succeeds",
                      extra={"fields": {"path": self.path, "reason": str(exc) + (f" ({why})" if why else "")}})
        self._checkpoint_failing = True

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
        if upto and self.read_only is None:  # read-only: reads start after upto anyway
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

    def read(self, after: int = 0, limit: int | None = None) -> list[Record]:
        if self._closed:
            raise StoreError("store is closed")
        sql = "SELECT seq, kind, body FROM events WHERE seq > ? ORDER BY seq"
        args: tuple = (after,)
        if limit is not None:
            sql += " LIMIT ?"
            args = (after, limit)
        try:
            rows = self._turn(lambda: self._wconn.execute(sql, args).fetchall())
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

    def snapshots(self):
        """Snapshot files in `snapshots/` beside the database (store/snapfiles.py)."""
        from .snapfiles import DirectorySnapshots

        return DirectorySnapshots(os.path.join(os.path.dirname(os.path.abspath(self.path)), "snapshots"))

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
        if self.read_only is None:
            try:
                self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._write_mark(self._last)
        self._wconn.close()
        self._drop_scratch()
