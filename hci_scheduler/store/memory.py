"""A Store that keeps everything in memory (nothing survives a restart)."""
from __future__ import annotations

import threading
from typing import Sequence

from .base import Record, Store, StoreError, check_contiguous


class MemoryStore(Store):
    """The Store contract without durability, for tests and throwaway servers."""

    def __init__(self, compacted: int = 0) -> None:
        """compacted > 0 makes the copy of a log compacted up to it (its first record follows it)."""
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._meta: dict[str, str] = {}
        self._compacted = compacted  # records up to this sequence were compacted away
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def append(self, records: Sequence[Record]) -> None:
        with self._lock:
            self._check_open()
            check_contiguous(self._records[-1].sequence if self._records else self._compacted, records)
            self._records.extend(records)

    def read(self, after: int = 0, limit: int | None = None) -> list[Record]:
        with self._lock:
            self._check_open()
            # Sequences have no gaps, so record i has sequence i + 1 + the compacted ones.
            start = max(after - self._compacted, 0)
            out = self._records[start:]
            return out[:limit] if limit is not None else list(out)

    def last_sequence(self) -> int:
        with self._lock:
            return self._records[-1].sequence if self._records else self._compacted

    def compacted_sequence(self) -> int:
        with self._lock:
            return self._compacted

    def compact(self, upto: int) -> None:
        with self._lock:
            self._check_open()
            drop = min(upto, self._records[-1].sequence if self._records else self._compacted) - self._compacted
            if drop > 0:
                del self._records[:drop]
                self._compacted += drop

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._check_open()
            self._meta[key] = value

    def close(self) -> None:
        with self._lock:
            self._closed = True
