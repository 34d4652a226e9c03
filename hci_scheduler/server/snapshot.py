"""Snapshots: the server's state at one sequence, so that restart reads it and the log's
tail instead of the whole history, and the log before it can be compacted (STYLE.md 14).

Why this shape:

- Own file format, not a copy of the database (`VACUUM INTO`): the database holds the
  log, not the state, so a copy of it would replay as slowly as the original. Once the
  log is compacted the snapshot is the only copy of the past, so its format is stable
  and versioned (FORMAT; a reader refuses a version it does not know) and carries a
  SHA-256 of everything before it: a restart uses the newest snapshot that checks out.
- Facts in the log's own terms: hosts as `Host` messages in row order (empty entries
  for free rows, so every host gets its row back and later placements tie-break the
  same way), volumes with their replica hosts, per-host services and workloads with
  volumes as PLACED `Event`s. Plain placements (the bulk) are columns: id, host row,
  sequence of their PLACED event and an index into the distinct specs; a spec is the
  canonical `Workload` bytes without the id (field 1, written first), so each spec is
  decoded once and the stored spec bytes (idempotency key) are rebuilt as bytes,
  never decoded. `Cluster.restore_many` commits them in bulk.
- Consistent at one sequence without stalling the writer for long: `capture` copies
  what it needs under the state's lock (two dicts of ids and the host list: about 40 ms
  of CPU for 200,000 placements), the rest (encoding, SHA-256, write, fsync) runs on
  the snapshot thread outside the lock.
- Of one history: the header holds the SHA-256 of the event at its sequence, and a log
  whose event there differs (same numbers, other events) never loads it; one beyond the
  log's last sequence (the log lost events) is moved aside.
- Atomic: written to a temporary file, fsynced, renamed, directory fsynced; a crash
  mid-way leaves the previous snapshot as it was (the temporary file is removed at start).
- Compaction keeps the previous snapshot usable: after snapshot S it compacts the log
  up to min(S - tail, previous snapshot), so a damaged newest snapshot falls back to
  the previous one plus a longer tail; older snapshots are deleted. On disk: the live
  state twice plus at most tail + 2 x every events.

Restoring is exact, the NUMA node of each VM that asked for NUMA fit included (recorded
in its own sections, `numa_at`/`numa_node`, so that snapshots without such VMs pay nothing
and a snapshot written before they existed still loads: its nodes are chosen again, as
they were then). Per-host services and workloads with volumes go through
`Cluster.restore`, which, like a replay, checks no node selector: a host relabelled since
keeps what it runs.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import struct
import threading
import time
from typing import NamedTuple

import numpy as np

from ..errors import SchedulerError
from ..model import Host, Volume, Workload
from ..cluster import PlacementView
from ..store import StoreError
from ..store.base import SnapshotStorage, StoreUnwritable
from ..store.snapfiles import DirectorySnapshots, snapshot_files, write_file
from ..v1 import scheduler_pb2 as pb
from . import convert
from .wire import varint

log = logging.getLogger("hci_scheduler.server")

FORMAT = 1
MAGIC = b"HCISNAP\x00"
#: The most events between two snapshots: the longest tail a crash restart replays. A
#: restart with 200,000 live placements loads the snapshot in about 0.4 s and replays a
#: tail at about 4-5 us an event, so 50,000 keeps it under the 1 s target (0.74-0.87 s
#: CPU measured on a loaded machine; bench/README.md, "Restart"); a snapshot costs about
#: 0.3 s of CPU at that size, about 6 us per event written at this cadence.
DEFAULT_EVERY = 50_000
MIN_EVERY = 10_000  # events: below this a snapshot is written only every `every` events
#: Events kept before the newest snapshot for watchers a little behind; restart does
#: not read them, only disk use grows with it.
DEFAULT_TAIL = 100_000
_DIGEST = 32  # SHA-256
_LEN = struct.Struct("<I")


#: The tag and length of a workload id of n bytes, for n < 1024.
ID_TAGS = [b"\n" + varint(n) for n in range(1024)]


def id_prefix(id_bytes: bytes) -> bytes:
    """How canonical Workload bytes start: field 1 (the id), length-delimited. What
    follows it is the spec without its id, shared by every workload of one shape."""
    return ID_TAGS[len(id_bytes)] + id_bytes if len(id_bytes) < len(ID_TAGS) else \
        b"\n" + varint(len(id_bytes)) + id_bytes


def plain_template(spec_without_id: bytes) -> Workload:
    """The model of a workload spec without its id (id "t"), for Cluster.restore_many."""
    return convert.workload_to_model(pb.Workload.FromString(id_prefix(b"t") + spec_without_id))


class SnapshotError(StoreError):
    """A snapshot file that does not check out (names the file and what is wrong)."""


def _frames(items) -> bytes:
    """Length-prefixed byte strings, one after another."""
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def _unframe(data: bytes) -> list[bytes]:
    out, i, n = [], 0, len(data)
    while i < n:
        (size,) = _LEN.unpack_from(data, i)
        i += 4
        out.append(data[i:i + size])
        i += size
    if i != n:
        raise ValueError("framed section overruns its length")
    return out


class Captured(NamedTuple):
    """What `capture` copies under the state's lock; encoded later, outside it."""

    sequence: int
    incarnation: str         # the log's incarnation when it was taken
    last_event: str | None   # SHA-256 of the event at `sequence`: which history it belongs to
    dimensions: tuple
    row_hosts: list          # Host or None per row
    placed: dict             # workload id -> (sequence of its PLACED event, canonical spec bytes)
    view: PlacementView      # where every workload runs and its NUMA node, mapped by `encode`
    volumes: list            # (Volume, replica host ids), in creation order
    numa: dict | None = None  # workload id -> NUMA node when given (tests); None: from `view`


def capture(state) -> Captured:
    """Copy the state at its current sequence; call with state.lock held (the copies
    are shallow: hosts, volumes and specs are immutable)."""
    c = state.cluster
    placed = dict(state._placed)
    view = c.placement_view()  # container copies: the maps are built by `encode`, outside the lock
    row_hosts = [None if hid is None else c.host(hid) for hid in c.host_ids()]
    volumes = [(c.volume(vid), list(hosts)) for vid, hosts in c.volumes().items()]
    return Captured(state.sequence, state.store.incarnation(), _event_digest(state.store, state.sequence),
                    tuple(state.dimensions), row_hosts, placed, view, volumes)


def _event_digest(store, sequence: int) -> str | None:
    """SHA-256 of the stored event at `sequence` (None: not in the log, compacted or none)."""
    rec = store.read(sequence - 1, 1) if sequence else []
    return hashlib.sha256(rec[0].body).hexdigest() if rec and rec[0].sequence == sequence else None


def _replicas(placed: dict, where: dict) -> dict:
    """Per-host service id -> its replica hosts, in the order they were bound (the order
    `assignments` lists them in), from the captured copies (outside the lock)."""
    services = {wid: [] for wid in placed.keys() - where.keys()}
    if services:
        for key, host in where.items():
            sid = key[: -len(host) - 1]
            if key.endswith("@" + host) and sid in services:
                services[sid].append(host)
    return services


def encode(cap: Captured) -> bytes:
    """The snapshot file's bytes (see the module docstring)."""
    where = cap.view.assignments()
    numa = cap.view.numa_nodes() if cap.numa is None else cap.numa
    services = _replicas(cap.placed, where)
    row_of = {h.id: r for r, h in enumerate(cap.row_hosts) if h is not None}
    spec_index: dict[bytes, int] = {}  # spec without its id -> its index in specs, -1: not plain
    specs: list[bytes] = []
    ids, rows, seqs, spec_of, events = [], [], [], [], []
    # One pass of a few dict operations per placement: at the default cadence a snapshot is
    # written every 50,000 events, and this loop was most of its CPU (id_prefix inlined).
    tags = ID_TAGS
    for wid, (seq, spec) in cap.placed.items():
        host_id = where.get(wid)
        idb = wid.encode()
        prefix = tags[len(idb)] + idb if len(idb) < 1024 else id_prefix(idb)
        if host_id is not None and spec.startswith(prefix):
            key = spec[len(prefix):]
            k = spec_index.get(key)
            if k is None:
                w = pb.Workload.FromString(key)
                k = spec_index[key] = -1 if w.per_host or w.volume_ids or w.new_volumes else len(specs)
                if k >= 0:
                    specs.append(key)
            if k >= 0:
                ids.append(idb)
                rows.append(row_of[host_id])
                seqs.append(seq)
                spec_of.append(k)
                continue
        ev = pb.Event(type=pb.EVENT_TYPE_PLACED, sequence=seq, workload_id=wid, host_id=host_id or "",
                      replica_host_ids=services.get(wid, ()), **convert.numa_fields(numa.get(wid, -1)))
        ev.workload.MergeFromString(spec)
        events.append(ev.SerializeToString())
    sections = {
        "hosts": _frames(b"" if h is None else convert.host_to_proto(h).SerializeToString()
                         for h in cap.row_hosts),
        "events": _frames(events),
        "specs": _frames(specs),
        "id_len": np.array([len(b) for b in ids], dtype=np.uint32).tobytes(),
        "ids": b"".join(ids),
        "rows": np.array(rows, dtype=np.int32).tobytes(),
        "seqs": np.array(seqs, dtype=np.uint64).tobytes(),
        "spec_of": np.array(spec_of, dtype=np.int32).tobytes(),
        **_numa_sections(ids, numa),
    }
    header = {
        "format": FORMAT, "sequence": cap.sequence, "incarnation": cap.incarnation, "last_event": cap.last_event,
        "dimensions": list(cap.dimensions),
        "placements": len(cap.placed), "volumes": [
            {"id": v.id, "size_gib": v.size_gib, "replicas": v.replicas, "spread": v.spread, "hosts": hosts}
            for v, hosts in cap.volumes],
        "sections": [[name, len(data)] for name, data in sections.items()],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join([MAGIC, _LEN.pack(len(head)), head, *sections.values()])
    return body + hashlib.sha256(body).digest()


class Snapshot(NamedTuple):
    """A snapshot file read and checked: its header and sections."""

    path: str
    sequence: int
    header: dict
    sections: dict


def read(path: str) -> Snapshot:
    """Read and check a snapshot file; SnapshotError (naming the file) when it does not
    check out: truncated, checksum mismatch, unknown format."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SnapshotError(f"snapshot {path}: cannot read: {exc}") from exc
    return parse(path, data)


def load(storage: SnapshotStorage, sequence: int, phases: dict | None = None) -> Snapshot:
    """Get one snapshot from a store's snapshot storage and check it (see parse). A store
    that cannot be reached raises its StoreUnwritable; a snapshot that cannot be read is
    a SnapshotError (an older one may do). `phases`, if given, gets the seconds spent
    reading it and checking it."""
    name = storage.name(sequence)
    t0 = time.perf_counter()
    try:
        data = storage.get(sequence)
    except StoreUnwritable:
        raise
    except StoreError as exc:
        raise SnapshotError(f"snapshot {name}: cannot read: {exc}") from exc
    t1 = time.perf_counter()
    snap = parse(name, data)
    if phases is not None:
        phases["snapshot_read"] = t1 - t0
        phases["snapshot_sha256"] = time.perf_counter() - t1
    return snap


def parse(path: str, data: bytes) -> Snapshot:
    """Check a snapshot's bytes (`path` names it in messages)."""
    if len(data) < len(MAGIC) + 4 + _DIGEST or not data.startswith(MAGIC):
        raise SnapshotError(f"snapshot {path}: not a snapshot file (bad magic or truncated)")
    body = memoryview(data)[:-_DIGEST]
    if hashlib.sha256(body).digest() != data[-_DIGEST:]:
        raise SnapshotError(f"snapshot {path}: checksum mismatch (damaged or truncated)")
    try:
        (n,) = _LEN.unpack_from(data, len(MAGIC))
        at = len(MAGIC) + 4
        header = json.loads(bytes(data[at:at + n]))
        at += n
        if header.get("format") != FORMAT:
            raise SnapshotError(f"snapshot {path}: format {header.get('format')!r}, this build reads {FORMAT}")
        sections = {}
        for name, size in header["sections"]:
            sections[name] = data[at:at + size]
            at += size
        if at != len(body):
            raise ValueError("sections do not fill the file")
        return Snapshot(path, int(header["sequence"]), header, sections)
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot {path}: malformed: {exc}") from exc


def verify(path: str) -> Snapshot:
    """Check one snapshot file offline (for `hci-scheduler check`): raises SnapshotError
    with a one-line reason, or returns it checked: checksum, format, and every section
    decodes (hosts, events, specs, columns of equal length)."""
    snap = read(path)
    _decoded(snap)
    return snap


def _decoded(snap: Snapshot) -> _Decoded:
    try:
        return _decode(snap)
    except SnapshotError:
        raise
    except Exception as exc:  # a section that does not decode: say which file
        raise SnapshotError(f"snapshot {snap.path}: does not decode: {exc}") from exc


class _Decoded(NamedTuple):
    hosts: list          # pb.Host or None per row
    events: list         # pb.Event (PLACED)
    specs: list          # canonical Workload bytes without the id
    ids: list            # str
    id_bytes: list       # bytes
    rows: np.ndarray
    seqs: np.ndarray
    spec_of: np.ndarray
    numa: np.ndarray     # int32 per plain placement: its NUMA node, -1 none


def _numa_sections(id_bytes: list, numa: dict) -> dict:
    """The NUMA nodes of the plain placements (ids in column order) as two sections: the
    positions that have one and their nodes. None: no section, as before NUMA was kept."""
    if not numa:
        return {}
    at, nodes = [], []
    for i, idb in enumerate(id_bytes):
        node = numa.get(idb.decode(), -1)
        if node >= 0:
            at.append(i)
            nodes.append(node)
    return {"numa_at": np.array(at, dtype=np.uint32).tobytes(), "numa_node": np.array(nodes, dtype=np.int32).tobytes()}


def _numa_column(path: str, sections: dict, n: int) -> np.ndarray:
    """int32 (n,): each plain placement's NUMA node, -1 for none (and for every one of a
    snapshot written before nodes were recorded: they are chosen again on restore)."""
    out = np.full(n, -1, dtype=np.int32)
    if "numa_at" in sections:
        at = np.frombuffer(sections["numa_at"], dtype=np.uint32)
        nodes = np.frombuffer(sections["numa_node"], dtype=np.int32)
        if len(at) != len(nodes) or (len(at) and (int(at.max()) >= n or int(nodes.min()) < 0)):
            raise SnapshotError(f"snapshot {path}: NUMA nodes name placements that are not there")
        out[at] = nodes
    return out


def _numa_slice(numa: np.ndarray) -> dict[int, int]:
    """position -> NUMA node, for Cluster.restore_many, of a slice of the NUMA column."""
    at = np.flatnonzero(numa >= 0)
    return dict(zip(at.tolist(), numa[at].tolist())) if len(at) else {}


def _decode(snap: Snapshot) -> _Decoded:
    s = snap.sections
    hosts = [pb.Host.FromString(b) if b else None for b in _unframe(s["hosts"])]
    events = [pb.Event.FromString(b) for b in _unframe(s["events"])]
    specs = _unframe(s["specs"])
    lens = np.frombuffer(s["id_len"], dtype=np.uint32)
    ends = np.cumsum(lens).tolist()
    blob = bytes(s["ids"])
    if (ends[-1] if ends else 0) != len(blob):
        raise SnapshotError(f"snapshot {snap.path}: ids do not match their lengths")
    starts = [0] + ends[:-1]
    id_bytes = [blob[a:b] for a, b in zip(starts, ends)]
    text = blob.decode()
    # ASCII ids (the usual case): the same offsets slice the decoded text, at C speed.
    ids = [text[a:b] for a, b in zip(starts, ends)] if len(text) == len(blob) else [b.decode() for b in id_bytes]
    rows = np.frombuffer(s["rows"], dtype=np.int32)
    seqs = np.frombuffer(s["seqs"], dtype=np.uint64)
    spec_of = np.frombuffer(s["spec_of"], dtype=np.int32)
    n = len(ids)
    if not len(rows) == len(seqs) == len(spec_of) == n:
        raise SnapshotError(f"snapshot {snap.path}: placement columns differ in length")
    if n and (spec_of.min() < 0 or spec_of.max() >= len(specs) or rows.min() < 0 or rows.max() >= len(hosts)):
        raise SnapshotError(f"snapshot {snap.path}: a placement names a spec or row that is not there")
    return _Decoded(hosts, events, specs, ids, id_bytes, rows, seqs, spec_of, _numa_column(snap.path, s, n))


def _gap_id(row: int, taken) -> str:
    hid = f"snapshot-free-row-{row}"
    while hid in taken:
        hid += "_"
    return hid


def restore(state, snap: Snapshot, released=frozenset(), phases: dict | None = None) -> set:
    """Rebuild the state's (empty) cluster, placed map and sequence from a checked snapshot.

    `released` names workloads the log's tail releases: plain placements among them that
    no special placement came after are left out (a release in the tail would undo them;
    restoring fewer leaves only more room, and no special placement's affinity was checked
    against them). Returns the ids left out: the caller skips their release. `phases`,
    if given, gets the seconds spent decoding, restoring hosts and placements."""
    t0 = time.perf_counter()
    if tuple(snap.header["dimensions"]) != tuple(state.dimensions):
        raise SnapshotError(f"snapshot {snap.path}: dimensions {snap.header['dimensions']} differ from the "
                            f"store's {list(state.dimensions)}")
    d = _decoded(snap)
    try:
        templates = [plain_template(k) for k in d.specs]
        models = [None if h is None else convert.host_to_model(h) for h in d.hosts]
        specials = sorted(((ev, convert.workload_to_model(ev.workload)) for ev in d.events),
                          key=lambda e: e[0].sequence)
    except SchedulerError as exc:
        raise SnapshotError(f"snapshot {snap.path}: does not decode: {exc}") from exc
    # Nothing changed so far: a snapshot that does not decode leaves the cluster empty for
    # an older one. From here on a failure means the snapshot disagrees with itself.
    phases = {} if phases is None else phases
    phases["snapshot_decode"] = time.perf_counter() - t0
    try:
        return _rebuild(state, snap, _without(d, released, specials), templates, models, specials, phases)
    except SchedulerError as exc:
        raise StoreError(f"snapshot {snap.path} checks out but does not restore: {exc}; "
                         "move it aside to start from an older one") from exc


def _without(d: _Decoded, released, specials: list) -> tuple[_Decoded, set]:
    """The plain placements of `d` but those in `released` placed after every special
    placement, and the ids left out."""
    if not released or not d.ids:
        return d, set()
    after = max((ev.sequence for ev, _ in specials), default=0)
    keep = np.fromiter((wid not in released for wid in d.ids), dtype=bool, count=len(d.ids)) | (d.seqs <= after)
    if keep.all():
        return d, set()
    left_out = {wid for wid, k in zip(d.ids, keep.tolist()) if not k}
    idx = np.flatnonzero(keep).tolist()
    return d._replace(ids=[d.ids[i] for i in idx], id_bytes=[d.id_bytes[i] for i in idx], rows=d.rows[keep],
                      seqs=d.seqs[keep], spec_of=d.spec_of[keep], numa=d.numa[keep]), left_out


def _rebuild(state, snap: Snapshot, dropped: tuple[_Decoded, set], templates: list, models: list,
             specials: list, phases: dict) -> set:
    t0 = time.perf_counter()
    d, left_out = dropped
    c = state.cluster
    # Hosts in their rows, ready and untainted while placements are restored (a host
    # tainted or cordoned since keeps what it runs); free rows are filled and freed again.
    taken = {m.id for m in models if m is not None}
    gaps = {r: _gap_id(r, taken) for r, m in enumerate(models) if m is None}
    c.add_hosts([dataclasses.replace(m, taints=(), state="ready") if m is not None else
                 Host(gaps[r], {}) for r, m in enumerate(models)],
                replicas={})
    for hid in gaps.values():
        c.remove_host(hid)
    for v in snap.header["volumes"]:
        c.add_volume(Volume(v["id"], v["size_gib"], v["replicas"], v["spread"]), hosts=v["hosts"])
    row_ids = [None if m is None else m.id for m in models]
    t1 = time.perf_counter()
    phases["snapshot_hosts"] = t1 - t0
    specs = d.specs
    placed: dict = {}
    seqs = d.seqs.tolist()
    spec_of = d.spec_of.tolist()
    at = 0

    def run(upto: int) -> None:
        """Plain placements at..upto-1, in one bulk restore."""
        nonlocal at
        if upto > at:
            ids = d.ids[at:upto]
            c.restore_many(templates, ids, spec_of[at:upto], [row_ids[r] for r in d.rows[at:upto].tolist()],
                           _numa_slice(d.numa[at:upto]))
            tags = ID_TAGS
            placed.update(zip(ids, zip(seqs[at:upto], [tags[len(b)] + b + specs[k] if len(b) < 1024 else
                                                       id_prefix(b) + specs[k] for b, k in
                                                       zip(d.id_bytes[at:upto], spec_of[at:upto])])))
            at = upto

    # Everything in the order it was placed: plain runs between the special placements.
    for ev, model in specials:
        run(int(np.searchsorted(d.seqs, ev.sequence)))
        if model.per_host:
            c.bind_replicas(model, list(ev.replica_host_ids))
        else:
            c.bind(model, ev.host_id, restore=True,  # its new volumes were restored above
                   numa_node=convert.numa_node_of(ev))
        placed[ev.workload_id] = (ev.sequence, convert.spec_bytes(ev.workload))
    run(len(d.ids))
    for m in models:  # taints and states as they are now, over what the hosts run
        if m is not None and (m.taints or m.state != "ready"):
            c.update_host(m.id, taints=m.taints or None, state=m.state)
    state._placed = placed
    state.sequence = snap.sequence
    phases["snapshot_placements"] = time.perf_counter() - t1
    return left_out


def _check_history(snap: Snapshot, store) -> None:
    """SnapshotError unless the log continues the snapshot's history: the log's event at
    the snapshot's sequence is the one the snapshot saw (a log that lost events and started
    a new incarnation still continues it up to the loss); when that event was compacted,
    the log's incarnation must be the snapshot's."""
    stored = _event_digest(store, snap.sequence)
    if stored is not None:
        if stored != snap.header.get("last_event"):
            raise SnapshotError(f"snapshot {snap.path}: the log's event {snap.sequence} is not the one it saw "
                                "(another history)")
    elif snap.header.get("incarnation") != store.incarnation():
        raise SnapshotError(f"snapshot {snap.path}: of log incarnation {snap.header.get('incarnation')}, "
                            f"the store's is {store.incarnation()}")


def check_directory(directory: str, compacted: int = 0) -> list[str]:
    """Problems with the snapshots of a store, one line each (for `hci-scheduler check`):
    files that do not check out, and no usable snapshot when the log is compacted."""
    problems, usable = [], False
    for seq, path in snapshot_files(directory):
        try:
            verify(path)
        except SnapshotError as exc:
            problems.append(str(exc))
            continue
        usable = usable or seq >= compacted
    if compacted and not usable:
        problems.append(f"the log is compacted up to sequence {compacted} and no snapshot at or after it checks out")
    return problems


def write(directory: str, sequence: int, data: bytes) -> str:
    """Write a snapshot file atomically (store/snapfiles.py)."""
    return write_file(directory, sequence, data)


class Snapshots:
    """The snapshots of one store: restore at start, a background thread that writes one
    every `every` events and then compacts the log, keeping `tail` events before it.

    Parameters
    ----------
    storage : SnapshotStorage or str
        Where snapshots live: the store's (`Store.snapshots()`), or a directory of
        snapshot files (`<data dir>/snapshots`).
    every : int
        The most events between two snapshots (0: none in the background; one is still
        written at a clean stop); a small state is snapshotted sooner (see `due`).
    tail : int
        Events kept in the log before the newest snapshot, so that a watcher a little
        behind is not cut off.
    """

    def __init__(self, storage: SnapshotStorage | str, every: int = DEFAULT_EVERY, tail: int = DEFAULT_TAIL,
                 poll_s: float = 0.1):
        if every < 0 or tail < 0:
            raise ValueError(f"snapshot every and tail must be >= 0, got {every} and {tail}")
        self.storage = DirectorySnapshots(storage) if isinstance(storage, str) else storage
        self.directory = getattr(self.storage, "directory", None) or repr(self.storage)  # for messages
        self.every = every
        self.tail = tail
        self.poll_s = poll_s
        self.sequence = 0           # the newest snapshot written or restored
        self._floor = 0             # the snapshot before it (compaction never passes it)
        self._lock = threading.Lock()  # one snapshot at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_pause_s = 0.0     # time the last capture held the state's lock
        self.last_write_s = 0.0     # time it took to encode and write the last one
        self.last_lag_events = 0    # events written while the last one was made (see `due`)

    # -- start ---------------------------------------------------------------

    def restore(self, state, released=None, phases: dict | None = None) -> set:
        """Load the newest snapshot that checks out and can be followed by the log into the
        state; `released(sequence)` names the workloads the log's tail after that sequence
        releases (see `restore`), and the ids left out are returned. A damaged one is logged
        and an older one tried; the server refuses to start (SnapshotError naming the files)
        when the log is compacted past every usable one. `phases`, if given, gets the
        seconds each step of loading the snapshot took (bench/restart.py prints them)."""
        phases = {} if phases is None else phases
        storage = self.storage
        if self._thread is None:  # at start (also called to rebuild later)
            storage.clean()
        store = state.store
        compacted, last = store.compacted_sequence(), store.last_sequence()
        bad = []
        for seq in storage.list():
            path = storage.name(seq)
            if seq > last:
                # The log lost the events it holds (see SQLiteStore's incarnation): moved aside,
                # so that it is never taken for the state at a number the log reuses.
                aside = storage.set_aside(seq)
                bad.append(f"{path}: sequence {seq} is beyond the log's last sequence {last} ({aside})")
                continue
            if seq < compacted:
                break  # older ones cannot be followed by the log either
            try:
                snap = load(storage, seq, phases)
                t0 = time.perf_counter()
                _check_history(snap, store)
                phases["snapshot_history"] = time.perf_counter() - t0
                enabled = gc.isenabled()
                gc.disable()  # hundreds of thousands of objects, no cycles: collections only cost
                try:
                    t0 = time.perf_counter()
                    gone = released(seq) if released is not None else frozenset()
                    phases["tail_read"] = time.perf_counter() - t0
                    left_out = restore(state, snap, gone, phases)
                    if self._thread is None:
                        # At start: the restored state lives as long as the server, so it goes
                        # to the permanent generation at once (as app._quiet_gc does after a
                        # replay), which spares a full collection walking it (0.14 s at 200,000).
                        t0 = time.perf_counter()
                        gc.freeze()
                        phases["gc_freeze"] = time.perf_counter() - t0
                finally:
                    if enabled:
                        gc.enable()
            except SnapshotError as exc:
                log.error("snapshot does not check out; trying an older one", extra={"fields": {
                    "path": path, "reason": str(exc)}})
                bad.append(str(exc))
                continue
            self.sequence = seq
            others = [s for s in storage.list() if s < seq]
            self._floor = others[0] if others else seq
            return left_out
        if compacted:
            raise SnapshotError(f"the log is compacted up to sequence {compacted} and no snapshot at or after "
                                f"it checks out in {self.directory}" + (f": {'; '.join(bad)}" if bad else ""))
        for reason in bad:
            log.error("snapshot ignored", extra={"fields": {"reason": reason}})
        return set()

    # -- background ----------------------------------------------------------

    def start(self, state) -> None:
        if self.every and self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(state,), name="snapshots", daemon=True)
            self._thread.start()

    def _loop(self, state) -> None:
        failing = False
        while not self._stop.wait(self.poll_s):
            # A follower's storage takes no snapshot: capturing and encoding one only to be refused costs its CPU.
            if self.storage.writable() and self.due(state):
                try:
                    self.take(state)
                except (OSError, StoreError) as exc:
                    if not failing:  # once per streak (a full disk fails every round until freed)
                        log.error("snapshot failed; retrying", extra={"fields": {"reason": str(exc)}})
                    failing = True
                else:
                    if failing:
                        log.info("snapshot written again", extra={"fields": {"sequence": self.sequence}})
                    failing = False

    def due(self, state) -> bool:
        """Whether the log has grown enough since the newest snapshot: `every` events, or
        sooner, half as many events as the state holds live items (at least MIN_EVERY).
        A crash restart replays the tail after the snapshot, so the tail is kept in
        proportion to the state the snapshot loads (restart time follows the live state,
        not the history), and each snapshot's cost, in proportion to the same state, is
        spread over as many events (a constant cost per event).

        A crash while a snapshot is being made replays everything since the one before,
        the events written meanwhile included: the next snapshot starts as many events
        sooner as the last one saw written while it was made (`last_lag_events`, at
        most half the bound), so under load too the tail stays near the bound."""
        grown = state.sequence - self.sequence
        if not self.every or grown < min(self.every, MIN_EVERY):
            return False
        bound = min(self.every, (len(state._placed) + state.cluster.n_hosts) // 2)
        return grown + min(self.last_lag_events, bound // 2) >= bound

    def take(self, state) -> int:
        """Write a snapshot of the state now, then compact the log; returns its sequence."""
        with self._lock:
            t0 = time.perf_counter()
            with state.lock:
                cap = capture(state)
            t1 = time.perf_counter()
            if cap.sequence <= self.sequence:
                return self.sequence
            path = self.storage.put(cap.sequence, encode(cap))
            self.last_pause_s, self.last_write_s = t1 - t0, time.perf_counter() - t1
            self.last_lag_events = max(0, state.sequence - cap.sequence)  # an int read: no lock needed
            previous, self.sequence = self.sequence, cap.sequence
            self._floor = previous
            log.info("snapshot written", extra={"fields": {
                "path": path, "sequence": cap.sequence, "placements": len(cap.placed),
                "pause_s": round(self.last_pause_s, 4), "write_s": round(self.last_write_s, 3),
                "lag_events": self.last_lag_events}})
            self._compact(state)
            return cap.sequence

    def _compact(self, state) -> None:
        """Compact up to min(newest - tail, the snapshot before it); delete older snapshots."""
        upto = min(self.sequence - self.tail, self._floor)
        if upto > state.store.compacted_sequence():
            state.store.compact(upto)
        for seq in self.storage.list():
            if seq < self._floor:
                self.storage.delete(seq)

    def close(self, state, final: bool = True) -> None:
        """Stop the thread; with final, write a snapshot of what changed since the last one
        (the writer must be closed: nothing changes any more)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if final and state.sequence > self.sequence:
            try:
                self.take(state)
            except (OSError, StoreError) as exc:
                log.error("final snapshot failed", extra={"fields": {"reason": str(exc)}})
