"""Durable state of the scheduler service.

The service is event-sourced: every mutation it acknowledges is one or more
numbered events (host added/updated/removed, workload placed/released/evicted),
appended to a `Store` and made durable before the reply. On restart the server
replays the events in order into a fresh `Cluster`, which rebuilds exactly the
state it had (same hosts in the same order, same allocations, same sequence).

`SQLiteStore` is the embedded default; `MemoryStore` keeps nothing across
restarts (tests, throwaway runs). Another backend (a replicated log, etcd, ...)
implements the small `Store` interface.
"""
from .base import Record, Store, StoreError, StoreUnwritable
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["Record", "Store", "StoreError", "StoreUnwritable", "MemoryStore", "SQLiteStore", "open_store"]


def open_store(data_dir: str | None, synchronous: str = "FULL") -> Store:
    """The SQLite store under `data_dir`, or a memory store when it is None."""
    if data_dir is None:
        return MemoryStore()
    import os

    os.makedirs(data_dir, exist_ok=True)
    return SQLiteStore(os.path.join(data_dir, "scheduler.db"), synchronous)
