"""Snapshots as files in a directory (`<data dir>/snapshots`): the SQLite store's SnapshotStorage.

Atomic by rename: a snapshot is written to a temporary file, fsynced, renamed to
`snapshot-<20-digit sequence>.snap`, and the directory fsynced; a crash mid-way leaves a
`.tmp` file that `clean` removes at the next start.
"""
from __future__ import annotations

import logging
import os

from .base import SnapshotStorage, StoreError

log = logging.getLogger("hci_scheduler.store")

SUFFIX = ".snap"
_PREFIX = "snapshot-"


def snapshot_files(directory: str) -> list[tuple[int, str]]:
    """(sequence, path) of the snapshot files in `directory`, newest first."""
    out = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(_PREFIX) and name.endswith(SUFFIX):
            try:
                out.append((int(name[len(_PREFIX):-len(SUFFIX)]), os.path.join(directory, name)))
            except ValueError:
                continue
    return sorted(out, reverse=True)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(directory: str, sequence: int, data: bytes) -> str:
    """Write a snapshot atomically: a temporary file, fsync, rename, fsync the directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{_PREFIX}{sequence:020d}{SUFFIX}")
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):  # a full disk: leave no partial file behind
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return path


class DirectorySnapshots(SnapshotStorage):
    """Snapshot files in `directory` (created at the first put)."""

    def __init__(self, directory: str):
        self.directory = directory

    def name(self, sequence: int) -> str:
        return os.path.join(self.directory, f"{_PREFIX}{sequence:020d}{SUFFIX}")

    def put(self, sequence: int, data: bytes) -> str:
        return write_file(self.directory, sequence, data)

    def list(self) -> list[int]:
        return [seq for seq, _ in snapshot_files(self.directory)]

    def get(self, sequence: int) -> bytes:
        path = self.name(sequence)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise StoreError(f"snapshot {path}: cannot read: {exc}") from exc

    def delete(self, sequence: int) -> None:
        try:
            os.remove(self.name(sequence))
        except FileNotFoundError:
            pass

    def set_aside(self, sequence: int) -> str:
        path = self.name(sequence)
        try:
            os.replace(path, path + ".beyond-log")
            return f"moved aside to {path}.beyond-log"
        except OSError as exc:  # a read-only store: skipped now, moved aside at a later start
            return f"cannot move it aside: {exc}"

    def clean(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):  # a snapshot a crash interrupted
                try:
                    os.remove(os.path.join(self.directory, name))
                except OSError as exc:  # a read-only store: never read, removed once it is writable
                    log.warning("cannot remove an interrupted snapshot", extra={"fields": {
                        "path": name, "reason": str(exc)}})
