"""`hci-scheduler check --data-dir DIR`: verify a store offline, without changing it.

What a restart relies on, checked one by one so that every problem is reported, one
line each: every event decodes and says the sequence and type it is stored under, the
sequence has no gap, the high-water mark (mark.py) is not above the last sequence and
names the store's incarnation, the snapshots check out (snapshot.check_directory), and
the log (from the newest snapshot when it is compacted) replays into a Cluster without
error and without a host charged beyond its limit.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile

from google.protobuf.message import DecodeError

from ..store import MemoryStore, Record, StoreError
from ..store.base import COMPACTED_KEY, INCARNATION_KEY
from ..store.mark import mark_path, read_mark
from ..store.sqlite import open_read_only
from ..v1 import scheduler_pb2 as pb
from .snapshot import Snapshots, check_directory

DB_NAME = "scheduler.db"
SNAPSHOTS_DIR = "snapshots"  # as create_server lays out a data directory


def check_store(data_dir: str) -> list[str]:
    """The problems of the store under `data_dir`, one line each (empty: sound)."""
    path = os.path.join(data_dir, DB_NAME)
    if not os.path.exists(path):
        return [f"{path}: no store"]
    try:
        conn, scratch = open_read_only(path)  # changes none of the store's files
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            compacted = int(meta.get(COMPACTED_KEY) or 0)  # events up to it live in a snapshot
            problems, records = _check_events(conn.execute("SELECT seq, kind, body FROM events ORDER BY seq"),
                                              compacted + 1)
        finally:
            conn.close()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    except (sqlite3.Error, OSError) as exc:
        return [f"{path}: cannot be read: {exc}"]
    last = records[-1].sequence if records else compacted
    problems += _check_mark(path, meta.get(INCARNATION_KEY), last)
    snapshots = os.path.join(data_dir, SNAPSHOTS_DIR)
    problems += check_directory(snapshots, compacted)
    if not problems:  # replay needs a whole log (or a snapshot); the lines above say why it is not
        problems += _check_replay(meta, records, compacted, snapshots)
    return problems


def _check_events(rows, expected: int) -> tuple[list[str], list[Record]]:
    problems: list[str] = []
    records: list[Record] = []
    for seq, kind, body in rows:
        if seq != expected:
            problems.append(f"sequence gap: {expected - 1} is followed by {seq}")
        expected = seq + 1
        try:
            ev = pb.Event.FromString(body)
        except DecodeError as exc:
            problems.append(f"event {seq}: does not decode: {exc}")
            continue
        if ev.sequence != seq:
            problems.append(f"event {seq}: its body says sequence {ev.sequence}")
        if ev.type != kind:
            problems.append(f"event {seq}: stored as type {kind}, its body says type {ev.type}")
        records.append(Record(seq, kind, bytes(body)))
    return problems, records


def _check_mark(path: str, incarnation: str | None, last: int) -> list[str]:
    try:
        mark = read_mark(mark_path(path))
    except StoreError as exc:
        return [str(exc)]
    if mark is None:
        return []
    problems = []
    if incarnation is not None and mark.incarnation != incarnation:
        problems.append(f"high-water mark names incarnation {mark.incarnation}, the store is {incarnation}")
    if mark.sequence > last:
        problems.append(f"last sequence {last} is below the high-water mark {mark.sequence}: "
                        "acknowledged events were lost (the next start begins a new incarnation)")
    return problems


def _check_replay(meta: dict[str, str], records: list[Record], compacted: int, snapshots: str) -> list[str]:
    """Replay into a Cluster as a restart does (SchedulerState over a copy of the log in
    memory): the whole log, or a compacted one from the newest snapshot that follows it
    (read from a copy of the snapshot directory, which restoring may tidy); then check
    no host is charged beyond its limit."""
    from .state import SchedulerState

    copy = MemoryStore(compacted)
    for key, value in meta.items():
        copy.set_meta(key, value)
    copy.append(records)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            restorer = None
            if compacted:
                shutil.copytree(snapshots, os.path.join(scratch, SNAPSHOTS_DIR))
                restorer = Snapshots(os.path.join(scratch, SNAPSHOTS_DIR), every=0)
            state = SchedulerState(copy, snapshots=restorer)
    except Exception as exc:  # noqa: BLE001 - whatever stops a restart is the finding
        return [f"replay fails: {type(exc).__name__}: {exc}"]
    c = state.cluster
    problems = []
    over = c.usage() > c.limits()
    for row, dim in zip(*over.nonzero()):
        problems.append(f"host {c.host_id(int(row))}: {state.dimensions[dim]} charged {int(c.usage()[row, dim])} "
                        f"beyond its limit {int(c.limits()[row, dim])}")
    return problems

