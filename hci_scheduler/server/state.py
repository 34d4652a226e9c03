"""Server state: the Cluster, its event log, and the one writer in front of them.

The Cluster is the single source of truth: hosts, allocations, per-host
services and volumes live there and nowhere else. Each mutation asks the
Cluster to act, and the value it returns (a BatchResult with its details,
AddedHosts with the per-host replicas started, the Placement a release undid)
is turned into events; the server never works out a decision of the core
after the fact. On start the events are replayed in order: placements go back
through `Cluster.restore`, hosts through `add_hosts` with the recorded
replicas, so the state is exactly the one that was acknowledged (same hosts
in the same rows, same allocations, same sequence).

What the server keeps beside the Cluster is what only the log knows: for each
placed workload, the sequence of its PLACED event and the canonical bytes of
the spec it was placed with (the idempotency key of a retried Place).

The log record is the public `Event` message itself. That is the right trade
here: WatchEvents hands out the records as they were written, with no second
format to keep in step with the first; agents and other orchestrators rebuild their view
from exactly the facts replay rebuilds the server from; and the record
evolves under protobuf's rules for the versioned wire contract (fields are
only ever added), which a private format would have to reinvent. The price
is that nothing private can go into a record; nothing needs to.
"""
from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from functools import cached_property
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from google.protobuf.message import DecodeError

from sched_core._wirescan import N_COLUMNS, scan_events

from ..errors import DuplicateId, NotFound, SchedulerError, ValidationError
from ..model import Placement
from ..store import Record, Store, StoreError, StoreUnwritable
from ..v1 import scheduler_pb2 as pb
from . import convert, paging
from .convert import PlaceItem
from .snapshot import id_prefix, plain_template
from .wire import event, event_head
from .writer import MAX_BATCH_WORKLOADS, DeadlineExpired, Op, StoreFailed, Writer  # noqa: F401 (re-exported)

log = logging.getLogger("hci_scheduler.server")

_PLACED = pb.EVENT_TYPE_PLACED
_DEDICATED = pb.ISOLATION_DEDICATED
_RELEASES = (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED)
#: The longest tail after a snapshot read (and decoded) before the snapshot loads; a
#: longer one is streamed and replayed against the whole snapshot.
MAX_TAIL_READ_AHEAD = 300_000
_NO_BYTES = b""


class _Events:
    """The events of one writer batch, numbered on from the state's last sequence."""

    __slots__ = ("records", "seq", "_ns", "_heads", "_tail")

    def __init__(self, last: int, incarnation_field: bytes = _NO_BYTES):
        self.records: list[Record] = []
        self.seq = last
        self._ns = time.time_ns()
        self._heads: dict[int, bytes] = {}
        self._tail = incarnation_field  # Event.incarnation, encoded once: every event carries it

    def add(self, etype: int, host_id: str = "", workload_id: str = "", spec: bytes = _NO_BYTES,
            **fields) -> int:
        """Append one event; `fields` are the rare ones (host, replica_host_ids, volumes,
        per_host_workload_ids, volume_id), encoded by protobuf. Returns its sequence."""
        head = self._heads.get(etype)
        if head is None:
            head = self._heads[etype] = event_head(etype, self._ns) + self._tail
        extra = pb.Event(**fields).SerializeToString() if fields else _NO_BYTES
        self.seq += 1
        self.records.append(Record(self.seq, etype, event(self.seq, head, host_id, workload_id, spec, extra)))
        return self.seq


class _PlainRun:
    """PLACED events of plain workloads (no per-host service, volume or dedicated tenant)
    met in a replay, restored in one `Cluster.restore_many` call, each distinct spec
    decoded and compiled once per run: a log's tail replays at the speed of a snapshot,
    not at one `restore` each.

    Releases do not end a run: a release of a workload the run holds drops it from the
    run, any other goes to the Cluster at once. Restoring the run after releases that
    came between its placements gives the same state: each host then holds what it held
    at the run's last event, and room only grew meanwhile, so nothing that fitted then
    would not fit now; live placements keep their order. A tail of release-and-place
    rounds is then one bulk restore instead of one per round (each restore_many call
    compiles its templates and sums charges over every host)."""

    __slots__ = ("models", "plain_specs", "rests", "templates", "ids", "spec_of", "hosts", "placed", "index",
                 "numa")

    def __init__(self):
        self.models: dict[bytes, object] = {}  # spec without its id -> its model (id "t")
        self.plain_specs: dict[bytes, bool] = {}  # spec without its id -> whether it is plain
        self.rests: dict[bytes, bytes | None] = {}  # see `rest`
        self._clear()

    def _clear(self) -> None:
        self.templates: dict[bytes, int] = {}  # spec without its id -> its index in this run
        self.ids: list[str | None] = []  # None: released before the run was restored
        self.spec_of: list[int] = []
        self.hosts: list[str] = []
        self.placed: list[tuple[int, bytes]] = []  # (sequence, canonical spec bytes)
        self.index: dict[str, int] = {}  # workload id -> its position in the run
        self.numa: dict[int, int] = {}  # position -> the NUMA node its event records

    def key(self, ev: pb.Event) -> tuple[bytes, int] | None:
        """(canonical spec bytes, length of its id prefix) of a PLACED event `add` may take,
        else None. Plain is a property of the spec (no per-host service, no volume, no
        dedicated tenant, which `restore` takes: it warns where a log written before the
        rule broke it), decided once per distinct spec; only those specs get replica
        hosts or volume replicas recorded in their event."""
        if not ev.host_id:
            return None
        w = ev.workload
        spec = convert.spec_bytes(w)
        prefix = id_prefix(w.id.encode())
        if not spec.startswith(prefix):
            return None
        n = len(prefix)
        plain = self.plain_specs.get(spec[n:])
        if plain is None:
            plain = self.plain_specs[spec[n:]] = not (w.per_host or w.volume_ids or w.new_volumes
                                                      or w.isolation == _DEDICATED)
        return (spec, n) if plain else None

    def rest(self, raw: bytes) -> bytes | None:
        """The canonical spec without its id of a workload whose stored bytes after its id
        field are `raw`, when that spec is plain (else None), decided once per distinct
        `raw`: what `key` gives without decoding and encoding each event's workload.
        Canonical bytes start with the id (field 1), so the id's field followed by this
        is the workload's canonical spec whatever order the log wrote `raw` in."""
        if raw in self.rests:
            return self.rests[raw]
        try:
            w = pb.Workload.FromString(raw)
        except DecodeError:
            w = None  # the event's own decoding names the error
        rest = None
        if w is not None and not w.id:  # an id again after the first would be the one protobuf keeps
            spec = convert.spec_bytes(w)
            plain = self.plain_specs.get(spec)
            if plain is None:
                plain = self.plain_specs[spec] = not (w.per_host or w.volume_ids or w.new_volumes
                                                      or w.isolation == _DEDICATED)
            rest = spec if plain else None
        self.rests[raw] = rest
        return rest

    def add(self, ev: pb.Event, key: tuple[bytes, int] | None) -> bool:
        """Take a PLACED event whose `key` is not None; False leaves it to `restore`."""
        if key is None or ev.workload_id in self.index:
            return False
        spec, n = key
        k = self.templates.setdefault(spec[n:], len(self.templates))
        self.index[ev.workload_id] = len(self.ids)
        self.ids.append(ev.workload_id)
        self.spec_of.append(k)
        self.hosts.append(ev.host_id)
        self.placed.append((ev.sequence, spec))
        if type(ev) is not _Scanned:  # a scanned event holds no field beyond the ids and the workload
            node = convert.numa_node_of(ev)
            if node >= 0:
                self.numa[len(self.ids) - 1] = node
        return True

    def release(self, workload_id: str) -> bool:
        """Drop a workload the run holds (True); False: the Cluster holds it."""
        i = self.index.pop(workload_id, None)
        if i is None:
            return False
        self.ids[i] = None
        return True

    def flush(self, cluster, placed: dict) -> None:
        if not self.ids:
            return
        models = self.models
        templates = [models.get(k) or models.setdefault(k, plain_template(k)) for k in self.templates]
        numa = self.numa
        if len(self.index) == len(self.ids):
            ids, spec_of, hosts, done = self.ids, self.spec_of, self.hosts, self.placed
        else:
            keep = [i for i, wid in enumerate(self.ids) if wid is not None]
            ids = [self.ids[i] for i in keep]
            spec_of = [self.spec_of[i] for i in keep]
            hosts = [self.hosts[i] for i in keep]
            done = [self.placed[i] for i in keep]
            numa = _renumbered(numa, keep)
        cluster.restore_many(templates, ids, spec_of, hosts, numa)
        placed.update(zip(ids, done))
        self._clear()


def _renumbered(numa: dict[int, int], keep: list[int]) -> dict[int, int]:
    """The NUMA nodes of a run's positions, renumbered to the positions `keep` leaves."""
    if not numa:
        return numa
    return {j: numa[i] for j, i in enumerate(keep) if i in numa}


class _Scanned(NamedTuple):
    """A plain PLACED event, or a RELEASED or EVICTED one, as replay reads it: the fields
    `scan_events` located, sliced from the log's bytes without a protobuf message; `full`
    decodes it when the replay needs more (an event that does not apply)."""

    sequence: int
    type: int
    workload_id: str
    host_id: str  # "" for a release: replay does not read it
    body: bytes

    def full(self) -> pb.Event:
        return pb.Event.FromString(self.body)


#: Records scanned at a time when the log is streamed (a full replay, a long tail).
_SCAN_CHUNK = 20_000


def _scanned(records: list[Record], run: _PlainRun) -> tuple[list, list]:
    """The events of `records` and, for PLACED ones, their `_PlainRun.key` (None for the
    rest). Plain placements and releases are read from the bounds `scan_events` finds
    (each workload's spec bytes are in its event: nothing is decoded or encoded again
    per event); every other event, and any the scan flags, is decoded by protobuf.
    Restarting with a 100,000-event tail spent most of its time decoding events."""
    n = len(records)
    if not n:
        return [], []
    bodies = [r.body for r in records]
    blob = b"".join(bodies)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, bodies), dtype=np.int64, count=n), out=starts[1:])
    cols = np.empty((n, N_COLUMNS), dtype=np.int64)
    scan_events(np.frombuffer(blob, dtype=np.uint8), starts, cols)
    events: list = []
    keys: list = []
    rests, new, scanned = run.rests, tuple.__new__, _Scanned
    released, evicted = _RELEASES
    for (seq, t, h0, h1, i0, i1, w0, w1, rest, flags), body in zip(cols.tolist(), bodies):
        if not flags and i1 > i0:
            try:
                if t == _PLACED and w1 > w0 and h1 > h0:
                    raw = blob[rest:w1]
                    tail = rests[raw] if raw in rests else run.rest(raw)
                    if tail is not None:
                        events.append(new(scanned, (seq, t, blob[i0:i1].decode(), blob[h0:h1].decode(), body)))
                        keys.append((blob[w0:rest] + tail, rest - w0))
                        continue
                elif (t == released or t == evicted) and w1 == w0:
                    events.append(new(scanned, (seq, t, blob[i0:i1].decode(), "", body)))
                    keys.append(None)
                    continue
            except UnicodeDecodeError:
                pass  # protobuf's decoding below names the error
        ev = pb.Event.FromString(body)
        events.append(ev)
        keys.append(run.key(ev) if t == _PLACED else None)
    return events, keys


def _scanned_log(store: Store, after: int, run: _PlainRun) -> Iterator[tuple[object, object]]:
    """(event, key) of every record after `after`, scanned a chunk at a time (`_scanned`)."""
    chunk: list[Record] = []
    for rec in store.iter_all(after=after):
        chunk.append(rec)
        if len(chunk) == _SCAN_CHUNK:
            yield from zip(*_scanned(chunk, run))
            chunk = []
    yield from zip(*_scanned(chunk, run))


def _take(ids: set, workload_id: str) -> bool:
    """Remove workload_id from ids; whether it was there."""
    if workload_id in ids:
        ids.remove(workload_id)
        return True
    return False


def _released_in(tail: list, keys: list) -> frozenset:
    """The workloads placed before `tail` that it releases, when every event of it is a
    plain placement, a release or a host added (empty otherwise): a snapshot followed by
    this tail need not restore them (snapshot.restore). Anything else may check or depend
    on what runs where (a special placement's affinity, a host update or removal), so
    the tail then replays against the whole snapshot."""
    placed, released = set(), set()
    for ev, key in zip(tail, keys):
        t = ev.type
        if t == _PLACED:
            if key is None:
                return frozenset()
            placed.add(ev.workload_id)
        elif t in _RELEASES:
            if ev.workload_id in placed:
                placed.remove(ev.workload_id)
            else:
                released.add(ev.workload_id)
        elif t != pb.EVENT_TYPE_HOST_ADDED and t != pb.EVENT_TYPE_STATUS:  # a status changes no placement
            return frozenset()
    return frozenset(released)


def place_response(answers: list) -> pb.PlaceResponse:
    """The PlaceResponse for a Place operation's answers. A plain placement is answered as
    a (workload id, host id, sequence) tuple and written straight into the response,
    without a Placement message per workload copied again into the response."""
    resp = pb.PlaceResponse()
    add, append = resp.placements.add, resp.placements.append
    for a in answers:
        if type(a) is tuple:
            add(workload_id=a[0], host_id=a[1], sequence=a[2])
        else:
            append(a)
    return resp


class SchedulerState:
    """The cluster and its event log, behind one writer at a time.

    Parameters
    ----------
    store : Store
        Where events are made durable; replayed on construction.
    dimensions : sequence of str
        The cluster's resource dimensions. Must match what the store was created with.
    cluster_factory : callable, optional
        Builds the Cluster from dimensions (tests and benchmarks may swap it).
    """

    def __init__(self, store: Store, dimensions: Sequence[str] | None = None,
                 cluster_factory: Callable | None = None, metrics=None,
                 max_batch: int = MAX_BATCH_WORKLOADS, snapshots=None):
        from ..cluster import Cluster

        saved = store.get_meta("dimensions")
        if saved is not None:
            saved_dims = tuple(saved.split(","))
            if dimensions is not None and tuple(dimensions) != saved_dims:
                raise ValidationError(f"dimensions {tuple(dimensions)} differ from the store's {saved_dims}")
            dimensions = saved_dims
        factory = cluster_factory or (lambda dims: Cluster(dimensions=tuple(dims)) if dims else Cluster())
        self.cluster = factory(dimensions)
        if saved is None:
            store.set_meta("dimensions", ",".join(self.cluster.dimensions))
        self.dimensions: tuple[str, ...] = tuple(self.cluster.dimensions)
        self.store = store
        self.metrics = metrics
        self.lock = threading.RLock()  # reads see only durable state: they wait at most one batch
        self.sequence = 0
        # workload id -> (sequence of its PLACED event, canonical spec bytes): what only the log knows.
        self._placed: dict[str, tuple[int, bytes]] = {}
        self.events_cond = threading.Condition()
        self._event_waiters = 0  # threads in wait_events
        self._cluster_factory = factory
        self.incarnation = store.incarnation()
        self._incarnation_field = pb.Event(incarnation=self.incarnation).SerializeToString()
        # Why the store refuses writes (None: it takes them); see _refuse_writes.
        self.unwritable_reason: str | None = None
        self.on_writable_change: Callable[[bool, str], None] | None = None
        self.probe_interval_s = 1.0
        self._probe_stop = threading.Event()
        self._prober: threading.Thread | None = None
        self.snapshots = snapshots  # a snapshot.Snapshots, or None: replay the whole log
        t0 = time.perf_counter()
        n = self._replay()
        log.info("state rebuilt", extra={"fields": {
            "events": n, "hosts": self.cluster.n_hosts, "allocations": len(self._placed),
            "sequence": self.sequence, "seconds": round(time.perf_counter() - t0, 3)}})
        self.health.load(self)
        self.writer = Writer(self._process, max_batch)
        if snapshots is not None:
            snapshots.start(self)
        try:  # a restart on a full disk serves reads and refuses writes from the start
            store.probe_write()
        except StoreUnwritable as exc:
            self._refuse_writes(exc)

    # -- replay --------------------------------------------------------------

    def _replay(self, wait_for_store: bool = True) -> int:
        """Rebuild the state from the store: the newest snapshot that checks out, then the
        log's tail through `_apply_events` (the one path that applies events: a follower's
        `follow` takes it too). `replay_phases` gets the seconds each step took (snapshot_*
        while the snapshot loads, tail_read, replay). With `wait_for_store`, a snapshot
        storage that cannot be reached (etcd briefly down after a compaction: the log alone
        cannot rebuild the state) is waited for instead of failing the start."""
        self.replay_phases: dict[str, float] = {}
        run = _PlainRun()
        tail, keys, tail_after = None, None, -1  # the events after a snapshot, read before it is loaded
        left_out: set = set()  # snapshot placements the tail releases, never restored
        if self.snapshots is not None:
            def released(after: int) -> frozenset:
                nonlocal tail, keys, tail_after
                tail, keys, tail_after = None, None, -1
                if self.store.last_sequence() - after > MAX_TAIL_READ_AHEAD:
                    return frozenset()  # streamed instead (memory)
                tail, keys = _scanned(list(self.store.iter_all(after=after)), run)
                tail_after = after
                return _released_in(tail, keys)

            left_out = self._restore_snapshot(released, wait_for_store)  # the newest that checks out
            if tail_after != self.sequence:
                tail = keys = None  # read after a snapshot that did not load
        elif self.store.compacted_sequence():
            raise StoreError(f"the log is compacted up to sequence {self.store.compacted_sequence()}: "
                             "start with its snapshots (a data directory)")
        t0 = time.perf_counter()
        events = zip(tail, keys) if tail is not None else _scanned_log(self.store, self.sequence, run)
        n = self._apply_events(events, run, left_out)
        self.replay_phases["replay"] = time.perf_counter() - t0
        return n

    def _restore_snapshot(self, released: Callable[[int], frozenset], wait_for_store: bool) -> set:
        """`Snapshots.restore` into this state; with `wait_for_store`, retried while the
        snapshot storage cannot be reached (StoreUnwritable: etcd without a quorum). A retry
        is safe: the snapshot is listed, read and checked before anything changes the state."""
        delay = 0.1
        while True:
            try:
                return self.snapshots.restore(self, released, self.replay_phases)
            except StoreUnwritable as exc:
                if not wait_for_store:
                    raise
                if delay == 0.1:
                    log.warning("snapshot storage unreachable: waiting for it to load the state", extra={
                        "fields": {"reason": str(exc)}})
                if self._probe_stop.wait(delay):
                    raise
                delay = min(delay * 2, 2.0)

    def _apply_events(self, events: Iterable[tuple[object, object]], run: _PlainRun,
                      left_out: set = frozenset()) -> int:
        """Apply (event, key) pairs (`_scanned`) that continue this state's sequence, in
        order: plain placements in bulk runs (`_PlainRun`), consecutive hosts in one
        `add_hosts` call, the rest through `_apply`. Replay at start and a follower's
        `follow` both come here, so a follower's state is exactly the one a restart at
        the same sequence would build. `left_out`: snapshot placements the events release
        (see snapshot.restore); their releases are skipped. StoreError at an event that does
        not continue the sequence (the events before it are applied). Returns how many."""
        c, placed = self.cluster, self._placed
        n = 0
        adds: list = []  # consecutive HOST_ADDED events, registered in one call

        def flush() -> None:
            if adds:
                c.add_hosts([convert.host_to_model(ev.host) for ev in adds],
                            replicas={ev.host.id: list(ev.per_host_workload_ids) for ev in adds})
                adds.clear()

        try:
            for ev, key in events:
                if ev.sequence != self.sequence + 1:
                    raise StoreError(f"event sequence {ev.sequence} follows {self.sequence}: the log does not "
                                     "continue this state")
                t = ev.type
                if t == _PLACED and (flush() or run.add(ev, key)):
                    pass  # restored with the plain placements next to it (hosts registered first)
                elif t in _RELEASES and (run.release(ev.workload_id) or _take(left_out, ev.workload_id)):
                    pass  # it never reaches the Cluster
                elif t in _RELEASES and ev.workload_id in placed:
                    c.release(ev.workload_id)  # the run goes on: see _PlainRun
                    del placed[ev.workload_id]
                elif t == pb.EVENT_TYPE_HOST_ADDED:
                    run.flush(c, placed)
                    adds.append(ev)  # add_hosts gives rows in the same order as one call per event
                elif t == pb.EVENT_TYPE_STATUS:
                    self.health.replay_status(ev)  # no placement changes: the run goes on
                else:
                    run.flush(c, placed)
                    flush()
                    self._apply(ev.full() if type(ev) is _Scanned else ev)
                self.sequence = ev.sequence
                n += 1
        finally:  # what was read so far is applied whole, even before a gap
            run.flush(c, placed)
            flush()
        return n

    def _apply(self, ev: pb.Event) -> None:
        c = self.cluster
        t = ev.type
        if t == _PLACED:
            w = ev.workload
            recorded = Placement(ev.workload_id, ev.host_id or None, replicas=tuple(ev.replica_host_ids),
                                 volumes={v.volume_id: list(v.host_ids) for v in ev.volumes},
                                 numa_node=convert.numa_node_of(ev))
            # Hard affinity and spread held against the workloads present when it was decided.
            c.restore(convert.workload_to_model(w), recorded)
            self._placed[ev.workload_id] = (ev.sequence, convert.spec_bytes(w))
        elif t in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
            c.release(ev.workload_id)
            del self._placed[ev.workload_id]
        elif t == pb.EVENT_TYPE_HOST_UPDATED:
            h = convert.host_to_model(ev.host)
            c.update_host(h.id, labels=h.labels, taints=h.taints, state=h.state)
        elif t == pb.EVENT_TYPE_HOST_REMOVED:
            c.remove_host(ev.host_id)
        elif t == pb.EVENT_TYPE_VOLUME_DELETED:
            c.remove_volume(ev.volume_id)
        elif t == pb.EVENT_TYPE_MOVED and not ev.plan_id:
            self.health.replay_moved(self, ev)  # the down-host policy's moves
        elif t in convert.PLAN_EVENT_TYPES:
            self.plans.replay(self, ev)  # MOVED through Cluster.apply_step, as a live apply
        else:
            raise StoreError(f"event {ev.sequence}: unknown type {t}")

    # -- mutations -----------------------------------------------------------

    def execute(self, kind: str, args: tuple, deadline: float | None = None, n: int = 1,
                coalesce: bool = False):
        """Apply a mutation (`_do_<kind>(*args)`) and return its result once it is durable.

        coalesce marks Place operations that may share one place_batch call with
        the Place operations queued next to them.
        """
        return self.writer.execute(kind, args, deadline, n, coalesce)

    @property
    def broken(self) -> BaseException | None:
        return self.writer.broken

    @property
    def on_fatal(self):
        return self.writer.on_fatal

    @on_fatal.setter
    def on_fatal(self, callback) -> None:
        self.writer.on_fatal = callback

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new mutations, let the queued ones finish, close the store."""
        self.writer.close(timeout)
        if self.snapshots is not None:
            # What changed since the last one, so the next start reads no tail; not after a fatal
            # store error: memory then holds a batch the log never took.
            self.snapshots.close(self, final=self.writer.broken is None)
        self._probe_stop.set()
        if self._prober is not None:
            self._prober.join()
        self.store.close()

    # -- high availability: follower and leader hooks (ha/replica.py) ----------

    def follow(self) -> int:
        """Apply the events the store holds beyond self.sequence, as replay applies a log's
        tail (`_apply_events`): a follower replays the leader's log as it grows, and a
        replica that won the election applies the tail before it writes. When the log was
        compacted past this state (a follower paused or cut off while the leader wrote past
        its snapshots), it catches up as a restart would (`_catch_up`). Returns how many
        events this state moved on by; StoreError when the log does not continue it."""
        if self.sequence < self.store.compacted_sequence():
            return self._catch_up()
        with self.lock:
            records = self.store.read(after=self.sequence)
            if not records:
                return 0
            run = _PlainRun()
            n = self._apply_events(zip(*_scanned(records, run)), run)
        self._notify_watchers()
        return n

    def _catch_up(self) -> int:
        """Load the newest snapshot the log continues and the tail after it into a state
        built beside this one (reads go on from this one meanwhile), then swap it in under
        the lock: readers see the old state or the new one, never a half. StoreUnwritable
        while the snapshots cannot be reached and SnapshotError when none checks out (the
        leader may have replaced them meanwhile): the caller tries again later."""
        t0 = time.perf_counter()
        before = self.sequence
        new = self._rebuilt()
        with self.lock:
            self.cluster, self._placed, self.sequence = new.cluster, new._placed, new.sequence
            self.__dict__["plans"] = new.plans  # the plans the log's tail knows, as after a restart
            for cached in ("_placement_order", "_volume_order"):  # orders of the old maps
                self.__dict__.pop(cached, None)
            # Statuses as a restart has them (the tail's, then those logged before the snapshot),
            # the durable agent set, and a fresh period for every agent's host.
            self.health.statuses = new.health.statuses
            self.health.load(self)
        log.info("caught up from a snapshot: the log was compacted past this replica", extra={"fields": {
            "from_sequence": before, "snapshot_sequence": self.snapshots.sequence, "sequence": self.sequence,
            "seconds": round(time.perf_counter() - t0, 3)}})
        self._notify_watchers()
        return self.sequence - before

    def _rebuilt(self) -> SchedulerState:
        """A state rebuilt from the store as a restart rebuilds one (`_replay`), beside this
        one: same store, snapshots and cluster factory, a cluster of its own. Made without
        __init__ (which would start a writer and write to the store): the attributes
        `_replay` reads are set here, so one it comes to read must be set here too."""
        if self.snapshots is None:
            raise StoreError(f"the log is compacted up to sequence {self.store.compacted_sequence()}, past this "
                             f"state's {self.sequence}, and there are no snapshots to catch up from")
        new = object.__new__(SchedulerState)
        new.store, new.snapshots, new.metrics = self.store, self.snapshots, None
        new.dimensions, new._cluster_factory = self.dimensions, self._cluster_factory
        new.cluster = self._cluster_factory(self.dimensions)
        new.lock = threading.RLock()
        new.sequence, new._placed = 0, {}
        new._probe_stop = self._probe_stop
        new._replay(wait_for_store=False)
        return new

    def _notify_watchers(self) -> None:
        if self._event_waiters:
            with self.events_cond:
                self.events_cond.notify_all()

    def step_down(self, exc: StoreUnwritable) -> None:
        """Stop taking mutations (this replica lost the lead): they fail with UNAVAILABLE
        and `exc`'s reason until resume_writes."""
        self._refuse_writes(exc)

    def resume_writes(self) -> None:
        """Take mutations again (this replica leads and has applied the whole log)."""
        if self.unwritable_reason is None:
            return
        self.unwritable_reason = None
        log.info("leading: taking mutations", extra={"fields": {"sequence": self.sequence}})
        if self.on_writable_change is not None:
            self.on_writable_change(True, "")

    # -- a store that refuses writes ------------------------------------------

    def _restore_durable(self, exc: StoreUnwritable) -> None:
        """Put the Cluster back to the durable state after a batch whose events the store
        refused: the batch already changed the Cluster, so it is rebuilt from the log
        (replay), the one path that is known to give exactly the acknowledged state.
        Called under the lock: reads wait for the rebuild and never see the lost batch."""
        log.error("store refused a batch: rebuilding the state from the log", extra={"fields": {
            "reason": str(exc), "sequence": self.sequence}})
        self.cluster = self._cluster_factory(self.dimensions)
        self._placed = {}
        self.sequence = 0
        self.health.forget_statuses()
        self._replay()

    def _refuse_writes(self, exc: StoreUnwritable) -> None:
        """Serve reads and refuse mutations (UNAVAILABLE, with the reason) until a write
        probe, once every probe_interval_s, succeeds; health follows."""
        first = self.unwritable_reason is None
        self.unwritable_reason = str(exc)
        if not first:
            return
        log.error("store refuses writes: serving reads only until it takes writes again", extra={"fields": {
            "reason": str(exc)}})
        if self.on_writable_change is not None:
            self.on_writable_change(False, str(exc))
        if self._prober is None or not self._prober.is_alive():
            self._prober = threading.Thread(target=self._probe_loop, name="store-probe", daemon=True)
            self._prober.start()

    def _probe_loop(self) -> None:
        while not self._probe_stop.wait(self.probe_interval_s):
            try:
                self.store.probe_write()
            except StoreUnwritable as exc:
                self.unwritable_reason = str(exc)
                continue
            except StoreError as exc:  # a closed store ends the probe; anything else is fatal
                if not self._probe_stop.is_set():
                    self.writer.fail(exc)
                return
            self.unwritable_reason = None
            log.info("store takes writes again", extra={"fields": {"sequence": self.sequence}})
            if self.on_writable_change is not None:
                self.on_writable_change(True, "")
            return

    def _process(self, ops: list[Op]) -> None:
        """Apply a batch under the lock and append its events in one transaction."""
        reason = self.unwritable_reason
        if reason is not None:
            for op in ops:
                op.error = StoreUnwritable(f"the store refuses writes: {reason}")
            return
        events = _Events(self.sequence, self._incarnation_field)
        outcomes: list[tuple[Op, object, BaseException | None]] = []
        now = time.monotonic()
        n_place = 0
        with self.lock:
            i = 0
            while i < len(ops):
                op = ops[i]
                if op.expired(now):
                    outcomes.append((op, None, DeadlineExpired("deadline passed before the operation ran")))
                    i += 1
                    continue
                if op.kind == "place":
                    group = self._coalesced(ops, i, now)
                    n_place += sum(o.n for o in group)
                    outcomes.extend(self._place_group(group, events))
                    i += len(group)
                    continue
                try:
                    outcomes.append((op, getattr(self, "_do_" + op.kind)(*op.args, events=events), None))
                except SchedulerError as exc:
                    outcomes.append((op, None, exc))
                i += 1
            if events.records:
                # Durable before any reply; one transaction (one fsync) for the whole batch.
                try:
                    self.store.append(events.records)
                except StoreUnwritable as exc:
                    self._restore_durable(exc)
                    self._refuse_writes(exc)
                    # Every call of the batch fails and changes nothing: the answers of the
                    # others may have depended on what the lost ones did.
                    outcomes = [(op, None, exc) for op, _, _ in outcomes]
                    events.records.clear()
                else:
                    self.sequence = events.seq
        if self.metrics is not None:
            self.metrics.batch(n_place)
        for op, result, exc in outcomes:
            op.result = result
            op.error = exc
        if events.records and self._event_waiters:
            with self.events_cond:
                self.events_cond.notify_all()

    @staticmethod
    def _coalesced(ops: list[Op], i: int, now: float) -> list[Op]:
        """ops[i] and the coalescable Place ops right after it (same strategy, live,
        no workload id in common)."""
        op = ops[i]
        group = [op]
        if not op.coalesce or i + 1 == len(ops):
            return group
        ids = {it.wid for it in op.args[0]}
        for nxt in ops[i + 1:]:
            if not (nxt.kind == "place" and nxt.coalesce and nxt.args[2] == op.args[2] and not nxt.expired(now)
                    and ids.isdisjoint(it.wid for it in nxt.args[0])):
                break
            ids.update(it.wid for it in nxt.args[0])
            group.append(nxt)
        return group

    def _do_register(self, hosts: list[pb.Host], models: list, *, events: _Events):
        added = self.cluster.add_hosts(models)  # all or nothing
        for h in hosts:
            started = added.replicas.get(h.id)
            if started:
                events.add(pb.EVENT_TYPE_HOST_ADDED, h.id, host=h, per_host_workload_ids=started)
            else:
                events.add(pb.EVENT_TYPE_HOST_ADDED, h.id, host=h)
        return hosts

    def _do_update(self, host_id: str, labels, taints, state, *, events: _Events):
        if state is not None:
            state = self.health.operator_state(self, host_id, state)  # a DOWN host stays DOWN
        host = convert.host_to_proto(self.cluster.update_host(host_id, labels=labels, taints=taints, state=state))
        events.add(pb.EVENT_TYPE_HOST_UPDATED, host_id, host=host)
        return host

    def _do_remove(self, host_id: str, *, events: _Events):
        self.cluster.remove_host(host_id)  # per-host service replicas go with it
        return events.add(pb.EVENT_TYPE_HOST_REMOVED, host_id)

    def _do_release(self, workload_ids: list[str], allow_missing: bool, *, events: _Events):
        missing = [w for w in workload_ids if w not in self._placed]
        if missing and not allow_missing:
            raise NotFound(f"workload_ids not placed: {missing[:10]!r}")
        released = []
        for wid in dict.fromkeys(workload_ids):
            if wid not in self._placed:
                continue
            where = self.cluster.release(wid)  # a per-host service: every replica
            del self._placed[wid]
            events.add(pb.EVENT_TYPE_RELEASED, where.host_id or "", wid)
            released.append(wid)
        return released

    # -- agents (server/hosts_health.py) --------------------------------------------

    @cached_property
    def health(self):
        """Agents' statuses and heartbeats, and hosts going DOWN (hosts_health.HostHealth)."""
        from .hosts_health import HostHealth

        return HostHealth()

    def _do_report(self, request: pb.ReportStatusRequest, *, events: _Events):
        return self.health.report(self, request, events)

    def _do_mark_down(self, host_ids: list[str], *, events: _Events):
        return self.health.mark_down(self, host_ids, events)

    def _do_reschedule_down(self, host_ids: list[str], *, events: _Events):
        return self.health.reschedule(self, host_ids, events)

    def _do_delete_volume(self, volume_id: str, *, events: _Events):
        self.cluster.remove_volume(volume_id)  # NotFound; StateConflict while a workload mounts it
        return events.add(pb.EVENT_TYPE_VOLUME_DELETED, volume_id=volume_id)

    # -- rebalance plans (server/plans.py) -------------------------------------

    @cached_property
    def plans(self):
        """The rebalance plans by id (plans.PlanRegistry)."""
        from .plans import PlanRegistry

        return PlanRegistry()

    def _do_apply_plan(self, plan_id: str, drain_host: str | None, *, events: _Events):
        """ApplyPlan and Drain: queued alone in their batch (see SchedulerServicer._apply_plan)."""
        return self.plans.apply(self, plan_id, events, drain_host)

    def _commit_now(self, events: _Events) -> None:
        """Make the events added so far durable inside the batch: a plan's step before its
        next step starts. A store that refuses the write has the state rebuilt from the log
        (undoing what was not durable) and raises StoreUnwritable; any other store failure
        stops the writer, as a failed commit of a whole batch does."""
        if not events.records:
            return
        try:
            self.store.append(events.records)
        except StoreUnwritable as exc:
            events.records.clear()
            self._restore_durable(exc)
            self._refuse_writes(exc)
            events.seq = self.sequence
            raise
        except StoreError as exc:
            from .plans import CommitFailed

            raise CommitFailed(f"store failed in the middle of a plan: {exc}") from exc
        self.sequence = events.seq
        events.records.clear()
        if self._event_waiters:
            with self.events_cond:
                self.events_cond.notify_all()

    # -- placing -------------------------------------------------------------

    def _place_group(self, group: list[Op], events: _Events):
        """Place the workloads of one or more Place calls (args: items, gang, strategy,
        preempt) in one cluster call; each call keeps its order and the calls go in
        arrival order, as if they had come one after another."""
        outcomes, live, fresh = [], [], []
        for op in group:
            try:
                answers = self._retried(op.args[0])
            except SchedulerError as exc:
                outcomes.append((op, None, exc))
                continue
            live.append((op, answers))
            fresh.extend(it for it in op.args[0] if answers[it.wid] is None)
        if fresh:
            _, gang, strategy, preempt = live[0][0].args
            # largest_first also sums the cluster's capacity, O(hosts): not worth it across calls.
            order = "arrival" if len(live) > 1 else "largest_first"
            try:
                result = self.cluster.place_batch([it.model for it in fresh], strategy=strategy, order=order,
                                                  gang=gang, preempt=preempt)
            except SchedulerError as exc:
                if len(live) == 1:
                    return outcomes + [(live[0][0], None, exc)]
                # One call's bad workload must not fail the others: the cluster is
                # unchanged, so place each call on its own.
                for op, _ in live:
                    outcomes.extend(self._place_group([op], events))
                return outcomes
            merged: dict[str, object] = {}
            self._record(fresh, result, merged, events)
            for _, answers in live:
                for wid, a in answers.items():
                    if a is None:
                        answers[wid] = merged[wid]
        for op, answers in live:
            outcomes.append((op, [answers[it.wid] for it in op.args[0]], None))
        return outcomes

    def _retried(self, items: list[PlaceItem]) -> dict[str, object]:
        """workload id -> the answer already given (a retried call), or None for a fresh one.

        Raises DuplicateId when a placed workload id comes with a different spec.
        """
        answers: dict[str, object] = {}
        placed = self._placed
        for it in items:
            known = placed.get(it.wid)
            if known is None:
                answers[it.wid] = None
                continue
            if known[1] != it.spec:
                raise DuplicateId(f"workload id {it.wid!r} is already placed with a different spec")
            answers[it.wid] = self._answer(self.cluster.placement(it.wid), known[0])
        return answers

    def _record(self, items: list[PlaceItem], result, answers: dict, events: _Events) -> None:
        """Events and answers for what `place_batch` did, in the order it committed."""
        by_id = {it.wid: it for it in items}
        placed = self._placed
        for wid, host_id in result.placements.items():
            spec = by_id[wid].spec
            detail = result.details.get(wid)
            if detail is None:  # the hot path: a workload on a host, nothing else
                seq = events.add(_PLACED, host_id, wid, spec)
                placed[wid] = (seq, spec)
                answers[wid] = (wid, host_id, seq)  # see place_response
                continue
            for victim in detail.evicted:
                del placed[victim]
                events.add(pb.EVENT_TYPE_EVICTED, detail.host_id, victim)
            extra = convert.numa_fields(detail.numa_node)
            if detail.replicas:
                extra["replica_host_ids"] = detail.replicas
            if detail.volumes:
                extra["volumes"] = [pb.VolumeReplicas(volume_id=vid, host_ids=hosts,
                                                      size_gib=self.cluster.volume(vid).size_gib)
                                    for vid, hosts in detail.volumes.items()]
            seq = events.add(_PLACED, detail.host_id or "", wid, spec, **extra)
            placed[wid] = (seq, spec)
            answers[wid] = self._answer(detail, seq)
        if self.metrics is not None and result.placements:
            self.metrics.placed(len(result.placements))
        for wid, expl in result.unplaced.items():
            answers[wid] = self._refused(wid, expl)

    def _answer(self, p: Placement, sequence: int) -> pb.Placement:
        out = pb.Placement(workload_id=p.workload_id, host_id=p.host_id or "", sequence=sequence,
                           evicted_workload_ids=p.evicted, replica_host_ids=p.replicas,
                           **convert.numa_fields(p.numa_node))
        for vid, hosts in p.volumes.items():
            out.volumes.add(volume_id=vid, host_ids=hosts, size_gib=self.cluster.volume(vid).size_gib)
        if p.explanation:  # a per-host service: the matching hosts without room
            out.explanation.CopyFrom(convert.explanation_to_proto(p.explanation))
        return out

    def _refused(self, wid: str, explanation) -> pb.Placement:
        expl = convert.explanation_to_proto(explanation)
        if self.metrics is not None:
            self.metrics.refused(convert.top_reason(expl))
        return pb.Placement(workload_id=wid, explanation=expl)

    # -- reads (any thread) --------------------------------------------------

    def list_hosts(self, state: int = 0, page_size: int = 0, page_token: str = "") -> pb.ListHostsResponse:
        """A page of hosts (in `state`, when given) in row order: a host keeps its row while
        it is registered (see paging)."""
        size = paging.page_size(page_size)
        start = paging.decode_token(page_token, paging.HOSTS, f"state={state}")
        with self.lock:
            c = self.cluster
            # Per row, whole: the Cluster has no cheaper way to them, and they cost
            # little beside converting a page of hosts.
            ids, usage, counts = c.host_ids(), c.usage(), c.workload_counts()
            dims = self.dimensions
            wanted = convert.HOST_STATES.get(state) if state else None

            def entries():
                for row in range(start, len(ids)):
                    if ids[row] is None:
                        continue
                    h = c.host(ids[row])
                    if wanted is not None and h.state != wanted:
                        continue
                    m = convert.host_to_proto(h)
                    for d, v in zip(dims, usage[row].tolist()):
                        if v:
                            m.used[d] = v
                    m.workload_count = counts.get(h.id, 0)
                    yield row, m

            hosts, next_row = paging.take_page(entries(), size, pb.Host.ByteSize)
            sequence = self.sequence
        token = "" if next_row is None else paging.encode_token(paging.HOSTS, f"state={state}", next_row)
        return pb.ListHostsResponse(hosts=hosts, next_page_token=token, sequence=sequence)

    @cached_property
    def _placement_order(self) -> paging.PlacementOrder:
        return paging.PlacementOrder()

    @cached_property
    def _volume_order(self) -> paging.CreationOrder:
        return paging.CreationOrder()

    def list_allocations(self, host_id: str = "", include_workloads: bool = False, page_size: int = 0,
                         page_token: str = "") -> pb.ListAllocationsResponse:
        """A page of placements (on `host_id`, when given) by the sequence of their PLACED event."""
        size = paging.page_size(page_size)
        start = paging.decode_token(page_token, paging.ALLOCATIONS, f"host_id={host_id!r}")
        with self.lock:
            c, placed = self.cluster, self._placed
            if host_id:
                try:
                    on_host = c.placements(host_id)  # O(allocations) in the Cluster
                except NotFound:
                    raise NotFound(f"host_id {host_id!r} is not registered") from None
                order = paging.PlacementOrder()
                order.reset((placed[p.workload_id][0], p.workload_id) for p in on_host)
            else:
                order = self._placement_order.sync(placed)

            status_of = self.health.status_of

            def entries():
                for seq, wid in order.live_from(start, order.live(placed)):
                    p = c.placement(wid)
                    m = self._answer(p, seq)
                    m.status.CopyFrom(status_of(wid, p.host_id))
                    yield seq, (m, placed[wid][1])

            def cost(item) -> int:
                return item[0].ByteSize() + (len(item[1]) if include_workloads else 0)

            page, next_seq = paging.take_page(entries(), size, cost)
            sequence = self.sequence
        if include_workloads:
            for m, spec in page:
                m.workload.MergeFromString(spec)
        token = "" if next_seq is None else paging.encode_token(paging.ALLOCATIONS, f"host_id={host_id!r}", next_seq)
        return pb.ListAllocationsResponse(allocations=[m for m, _ in page], next_page_token=token,
                                          sequence=sequence)

    def list_volumes(self, page_size: int = 0, page_token: str = "") -> pb.ListVolumesResponse:
        """A page of volumes in creation order."""
        size = paging.page_size(page_size)
        start = paging.decode_token(page_token, paging.VOLUMES, "")
        with self.lock:
            c = self.cluster
            volumes = c.volumes()  # whole: O(volumes) per page
            ordered = self._volume_order.ordinals((vid, c.volume(vid)) for vid in volumes)

            def entries():
                for i in range(bisect_left(ordered, (start,)), len(ordered)):
                    ordinal, vid = ordered[i]
                    yield ordinal, pb.VolumeReplicas(volume_id=vid, host_ids=volumes[vid],
                                                     size_gib=c.volume(vid).size_gib)

            page, next_ordinal = paging.take_page(entries(), size, pb.VolumeReplicas.ByteSize)
            sequence = self.sequence
        token = "" if next_ordinal is None else paging.encode_token(paging.VOLUMES, "", next_ordinal)
        return pb.ListVolumesResponse(volumes=page, next_page_token=token, sequence=sequence)

    def explain(self, model) -> pb.Explanation:
        with self.lock:
            return convert.explanation_to_proto(self.cluster.explain(model))

    def status(self) -> pb.GetStatusResponse:
        with self.lock:
            c = self.cluster
            reason = self.unwritable_reason
            out = pb.GetStatusResponse(dimensions=self.dimensions, allocations=len(self._placed),
                                       last_sequence=self.sequence, hosts_used=int(c.hosts_used()),
                                       incarnation=self.incarnation, writable=reason is None,
                                       unwritable_reason=reason or "")
            out.first_sequence = self.store.first_sequence()
            out.snapshot_sequence = self.snapshots.sequence if self.snapshots is not None else 0
            for name in convert.HOST_STATES.values():
                out.hosts_by_state[name] = 0
            for h in c.hosts():
                out.hosts_by_state[h.state] += 1
            # Rows of removed hosts are all zero, so sums over every row are sums over live hosts.
            for d, u, a in zip(self.dimensions, c.usage().sum(axis=0).tolist(),
                               c.allocatable().sum(axis=0).tolist()):
                out.used[d] = int(u)
                out.allocatable[d] = int(a)
            for d, v in c.utilization().items():
                out.utilization[d] = float(v)
            return out

    def wait_events(self, after: int, timeout: float) -> None:
        """Block until an event with sequence > after is durable, or timeout."""
        with self.events_cond:
            # Counted, so that a batch with no watcher skips the notify. A watcher
            # counts itself before it reads the sequence, so a batch that stored
            # events after that read sees the count (and a missed wake-up would
            # still end with the timeout).
            self._event_waiters += 1
            try:
                if self.store.last_sequence() <= after:
                    self.events_cond.wait(timeout)
            finally:
                self._event_waiters -= 1

