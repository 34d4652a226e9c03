"""The high-water mark: the log's incarnation and a sequence it is known to have reached,
kept in a small file beside the database, outside SQLite's WAL.

A damaged WAL (truncated, overwritten) makes SQLite drop every frame from the damage on,
silently: the store opens with fewer events than it acknowledged, and the next events
would reuse the lost sequence numbers. The mark is written (fsync, then rename) at each
checkpoint and at a clean stop, and without fsync every 0.1 s between them (a process
kill keeps it), so a store that opens below its mark has lost events that were
acknowledged; the store then starts a new incarnation instead of reusing numbers a
watcher may have seen (see SQLiteStore). The commits made after the mark was last
written (0.1 s of them; after a power loss, one checkpoint interval) can be lost
without detection.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

from .base import StoreError


class Mark(NamedTuple):
    """An incarnation and a sequence the log of that incarnation has reached."""

    incarnation: str
    sequence: int


def mark_path(db_path: str) -> str:
    """Where the mark of the database at `db_path` lives."""
    return db_path + ".mark"


def read_mark(path: str) -> Mark | None:
    """The mark in `path`, None when there is none; StoreError when it is garbled."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        mark = Mark(str(data["incarnation"]), int(data["sequence"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: unreadable high-water mark: {exc}") from exc
    if mark.sequence < 0:
        raise StoreError(f"{path}: unreadable high-water mark: sequence {mark.sequence} < 0")
    return mark


def write_mark(path: str, mark: Mark, sync: bool = True) -> None:
    """Replace the mark atomically: a process kill leaves the old mark or the new one,
    never half of one; with `sync`, so does a power loss. Raises OSError (a full disk,
    a read-only directory)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps({"incarnation": mark.incarnation, "sequence": mark.sequence}).encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
