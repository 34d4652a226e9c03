"""The Store interface: an append-only, gap-free, durable log of events."""
from __future__ import annotations

import abc
import secrets
from typing import Iterable, NamedTuple, Sequence

from ..errors import SchedulerError


class StoreError(SchedulerError):
    """The store cannot honour a request (gap in the sequence, closed, I/O failure)."""


class StoreUnwritable(StoreError):
    """The store refuses writes for now (disk full, read-only database) but still reads:
    nothing of the failed write was kept, and a later write may succeed."""


#: The meta key of the log's incarnation (see Store.incarnation).
INCARNATION_KEY = "incarnation"
#: The meta key of the last compacted sequence (see Store.compact).
COMPACTED_KEY = "compacted_seq"


def new_incarnation() -> str:
    """A fresh incarnation id: 16 random hex characters."""
    return secrets.token_hex(8)


class Record(NamedTuple):
    """One event as stored: its sequence number, type code and opaque body.

    sequence starts at 1 and has no gaps; kind is the `EventType` number of the
    wire contract; body is the serialized `hci_scheduler.v1.Event`. A named
    tuple, because the writer builds one per placement (a frozen dataclass
    cost three times as much).
    """

    sequence: int
    kind: int
    body: bytes


class Store(abc.ABC):
    """An append-only log with a few metadata keys.

    Implementations must make `append` atomic (all records of one call or none
    survive a crash) and durable (they survive a crash once `append` returns),
    and must be safe to call from several threads (calls take turns). Grouping
    many mutations into one append is the caller's job (the server's writer).
    """

    @abc.abstractmethod
    def append(self, records: Sequence[Record]) -> None:
        """Durably append records whose sequence numbers continue the log."""

    @abc.abstractmethod
    def read(self, after: int = 0, limit: int | None = None) -> list[Record]:
        """Records with sequence > after, in order, at most `limit` of them."""

    @abc.abstractmethod
    def last_sequence(self) -> int:
        """The sequence number of the last durable record (0 when empty)."""

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A metadata value (cluster dimensions, schema version), or None."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Durably set a metadata value."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release files and connections; later calls raise StoreError."""

    def incarnation(self) -> str:
        """The identity of this log: a sequence number names one event only within one
        incarnation. Made when the log is created (set here on first use), replaced when
        the log is found to have lost acknowledged events (see SQLiteStore)."""
        value = self.get_meta(INCARNATION_KEY)
        if value is None:
            value = new_incarnation()
            self.set_meta(INCARNATION_KEY, value)
        return value

    def probe_write(self) -> None:
        """A harmless durable write; raises StoreUnwritable while the store refuses writes
        (the server probes with it to learn when writes work again)."""

    def compacted_sequence(self) -> int:
        """The last sequence compacted away: records up to it are gone, a snapshot holds
        their effect (0: nothing compacted)."""
        value = self.get_meta(COMPACTED_KEY)
        return int(value) if value else 0

    def first_sequence(self) -> int:
        """The oldest sequence `read` can still return (compacted_sequence() + 1)."""
        return self.compacted_sequence() + 1

    def compact(self, upto: int) -> None:
        """Delete the records with sequence <= upto, whose effect a snapshot holds.
        compacted_sequence() says upto before any is deleted, so a crash half-way
        leaves a log that the next open finishes compacting (never a gap inside it)."""
        raise StoreError(f"{type(self).__name__} does not compact")

    def snapshots(self) -> "SnapshotStorage | None":
        """Where this store keeps the server's snapshots (server/snapshot.py), or None: a
        store that keeps nothing across restarts needs none."""
        return None

    def iter_all(self, chunk: int = 10_000, after: int = 0) -> Iterable[Record]:
        """Every record with sequence > after in order, read in chunks (for replay on restart)."""
        while True:
            batch = self.read(after, chunk)
            if not batch:
                return
            yield from batch
            after = batch[-1].sequence

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SnapshotStorage(abc.ABC):
    """Snapshot blobs of one store, named by the sequence they were taken at. A blob is
    written whole or not at all (a crash mid-way leaves nothing `list` shows); what they
    hold and how they are checked is server/snapshot.py's business."""

    @abc.abstractmethod
    def put(self, sequence: int, data: bytes) -> str:
        """Store a snapshot atomically and durably; returns its name (for logs)."""

    @abc.abstractmethod
    def list(self) -> list[int]:
        """The sequences of the complete snapshots, newest first."""

    @abc.abstractmethod
    def get(self, sequence: int) -> bytes:
        """The bytes of one snapshot; StoreError when it is gone or unreadable."""

    @abc.abstractmethod
    def delete(self, sequence: int) -> None:
        """Remove one snapshot (no error when it is gone already)."""

    @abc.abstractmethod
    def name(self, sequence: int) -> str:
        """How messages name one snapshot (a file path, a key)."""

    @abc.abstractmethod
    def set_aside(self, sequence: int) -> str:
        """Take a snapshot out of `list` without destroying it (one beyond the log's end);
        returns what was done, for the log."""

    def clean(self) -> None:
        """Remove what interrupted writes left (at start)."""

    def writable(self) -> bool:
        """Whether `put` can succeed now (False on a replica that does not lead)."""
        return True


def check_contiguous(last: int, records: Sequence[Record]) -> None:
    """Raise StoreError unless records number last+1, last+2, ..."""
    expected = last + 1
    for r in records:
        if r.sequence != expected:
            raise StoreError(f"record sequence must be {expected}, got {r.sequence}")
        expected += 1
