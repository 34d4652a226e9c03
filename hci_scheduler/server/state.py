"""Server state: one Cluster, one event log, one writer at a time.

Every mutation is an `Op` queued in arrival order. The calling thread that
finds no batch in flight becomes the *leader* (leader/follower): it takes the
queued operations, its own and every one that arrived meanwhile, applies them
to the Cluster under `lock`, appends their events to the Store in ONE
transaction (group commit, one fsync), wakes each caller it carried, and hands
the lead to the first operation still queued. No thread exists only to write:
a lone call is applied and committed by its own handler thread, with no
hand-off to a writer thread and back (two thread wake-ups saved per call).
Consecutive Place operations are coalesced into one `place_batch` call, so
throughput grows with the number of clients.

Reads take the same lock, so they see only durable state and wait at most one
batch (apply + commit).

On start the events in the Store are replayed in order into a fresh Cluster,
which rebuilds the state exactly: same hosts in the same order, same
allocations, same sequence number. Placements are replayed with `bind` on
the recorded host; a per-host service's replicas with `bind_replicas` on the
recorded hosts (PLACED lists them, and HOST_ADDED lists the services that got
a replica on a new host); volumes created with a workload with
`add_volume(hosts=...)` on their recorded replica hosts.
"""
from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import DuplicateId, NotFound, SchedulerError, StateConflict, Unschedulable, ValidationError
from ..model import Volume
from ..store import Record, Store, StoreError
from ..v1 import scheduler_pb2 as pb
from . import convert
from .convert import PlaceItem
from .wire import placed_event, varint

log = logging.getLogger("hci_scheduler.server")

#: Upper bound on the workloads one writer batch carries (keeps reads waiting
#: at most one bounded batch).
MAX_BATCH_WORKLOADS = 4096


class DeadlineExpired(SchedulerError):
    """The caller's deadline passed before the writer reached its operation."""


class StoreFailed(SchedulerError):
    """The store could not commit; the server stops taking mutations."""


class Unsupported(SchedulerError):
    """The request needs a Cluster feature this build of the core does not have."""


@dataclass(slots=True)
class Allocation:
    host_id: str  # "" for a per-host service
    spec: bytes  # canonical bytes of the normalized pb.Workload
    sequence: int
    replicas: list[str] | None = None  # per-host service: hosts running a replica, in order
    volumes: tuple[tuple[str, tuple[str, ...], int], ...] = ()  # new volumes: (id, replica hosts, GiB)


class Op:
    """One queued mutation. `wake` is held until the op is answered or made leader."""

    __slots__ = ("kind", "args", "deadline", "n", "wake", "taken", "lead", "result", "error")

    def __init__(self, kind: str, args: tuple, deadline: float | None, n: int = 1):
        self.kind = kind
        self.args = args
        self.deadline = deadline
        self.n = n  # workloads carried, for batch sizing
        self.wake = threading.Lock()
        self.wake.acquire()
        self.taken = False  # a leader took it into a batch
        self.lead = False  # the previous leader handed the lead to its thread
        self.result = None
        self.error: BaseException | None = None


# Field 7 (Event.workload), wire type 2 (length-delimited).
_EVENT_WORKLOAD_TAG = bytes([(7 << 3) | 2])
# Field 2 (Event.type) = PLACED, as a varint.
_EVENT_PLACED_TYPE = b"\x10" + varint(pb.EVENT_TYPE_PLACED)


def _event_time(ns: int) -> bytes:
    """Event.time (field 3, a Timestamp) in wire format. Written by hand: building a
    Timestamp with GetCurrentTime() went through datetime and cost ~15 us, a tenth of
    a single-workload batch."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    body = (b"\x08" + varint(seconds) if seconds else b"") + (b"\x10" + varint(nanos) if nanos else b"")
    return b"\x1a" + varint(len(body)) + body


def place_response(answers: list) -> pb.PlaceResponse:
    """The PlaceResponse for a Place operation's answers. A plain placement is answered as
    a (workload id, host id, sequence) tuple and written straight into the response: a
    Placement message per workload, copied again into the response, cost ~2 us each."""
    resp = pb.PlaceResponse()
    add, append = resp.placements.add, resp.placements.append
    for a in answers:
        if type(a) is tuple:
            add(workload_id=a[0], host_id=a[1], sequence=a[2])
        else:
            append(a)
    return resp


class SchedulerState:
    """The cluster, its allocations and event log, behind one writer at a time.

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
                 max_batch: int = MAX_BATCH_WORKLOADS):
        from ..cluster import Cluster

        saved = store.get_meta("dimensions")
        if saved is not None:
            saved_dims = tuple(saved.split(","))
            if dimensions is not None and tuple(dimensions) != saved_dims:
                raise ValidationError(
                    f"dimensions {tuple(dimensions)} differ from the store's {saved_dims}"
                )
            dimensions = saved_dims
        factory = cluster_factory or (lambda dims: Cluster(dimensions=tuple(dims)) if dims else Cluster())
        self.cluster = factory(dimensions)
        if saved is None:
            store.set_meta("dimensions", ",".join(self.cluster.dimensions))
        self.dimensions: tuple[str, ...] = tuple(self.cluster.dimensions)
        self.store = store
        self.metrics = metrics
        self.max_batch = max_batch
        self.lock = threading.RLock()
        self.hosts: dict[str, pb.Host] = {}
        self.host_workloads: collections.Counter[str] = collections.Counter()
        self.allocations: dict[str, Allocation] = {}
        self.daemons: dict[str, object] = {}  # per-host service id -> model Workload
        self.volumes: dict[str, tuple[tuple[str, ...], int]] = {}  # volume id -> (replica hosts, GiB)
        self.sequence = 0
        self.events_cond = threading.Condition()
        self._event_waiters = 0  # threads in wait_events
        self.broken: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        t0 = time.perf_counter()
        n = self._replay()
        log.info("state rebuilt", extra={"fields": {
            "events": n, "hosts": len(self.hosts), "allocations": len(self.allocations),
            "sequence": self.sequence, "seconds": round(time.perf_counter() - t0, 3)}})
        self._queue: collections.deque[Op] = collections.deque()
        self._queue_cond = threading.Condition()
        self._leading = False  # invariant: a non-empty queue has a leader
        self._stopping = False

    # -- replay --------------------------------------------------------------

    def _replay(self) -> int:
        n = 0
        c = self.cluster
        adds: list[pb.Event] = []  # consecutive HOST_ADDED events, registered in one call

        def flush() -> None:
            if adds:
                c.add_hosts([convert.host_to_model(ev.host) for ev in adds])
                for ev in adds:
                    self.hosts[ev.host.id] = ev.host
                if self.daemons:
                    self._replay_host_replicas(adds)
                adds.clear()

        for rec in self.store.iter_all():
            ev = pb.Event.FromString(rec.body)
            t = ev.type
            if t == pb.EVENT_TYPE_HOST_ADDED:
                # add_hosts assigns rows in the same order as one add_host per event.
                adds.append(ev)
            else:
                flush()
            if t == pb.EVENT_TYPE_HOST_ADDED:
                pass
            elif t == pb.EVENT_TYPE_HOST_UPDATED:
                self._apply_host_update(ev.host)
                self.hosts[ev.host.id] = ev.host
            elif t == pb.EVENT_TYPE_HOST_REMOVED:
                c.remove_host(ev.host_id)
                del self.hosts[ev.host_id]
                self._host_gone(ev.host_id)
            elif t == pb.EVENT_TYPE_PLACED:
                self._replay_placed(ev)
            elif t in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
                c.release(ev.workload_id)
                self._forget(ev.workload_id)
            elif t == pb.EVENT_TYPE_VOLUME_DELETED:
                c.remove_volume(ev.volume_id)
                del self.volumes[ev.volume_id]
            else:
                raise StoreError(f"event {rec.sequence}: unknown type {t}")
            if ev.sequence != self.sequence + 1:
                raise StoreError(f"event sequence {ev.sequence} follows {self.sequence}")
            self.sequence = ev.sequence
            n += 1
        flush()
        return n

    def _replay_placed(self, ev: pb.Event) -> None:
        c = self.cluster
        w = ev.workload
        model = convert.workload_to_model(w)
        spec = convert.spec_bytes(w)
        if w.per_host:
            replicas = list(ev.replica_host_ids)
            c.bind_replicas(model, replicas)
            self.daemons[ev.workload_id] = model
            self.allocations[ev.workload_id] = Allocation("", spec, ev.sequence, replicas=replicas)
            for h in replicas:
                self.host_workloads[h] += 1
            return
        vols = ()
        if ev.volumes:
            specs = {v.id: v for v in w.new_volumes}
            vols = tuple((v.volume_id, tuple(v.host_ids), v.size_gib) for v in ev.volumes)
            for vid, hosts, size in vols:
                v = specs.get(vid)
                if v is None:
                    raise StoreError(f"event {ev.sequence}: volume {vid!r} is not among the workload's new volumes")
                c.add_volume(Volume(v.id, v.size_gib, v.replicas or 1, v.spread or "host"), hosts=list(hosts))
                self.volumes[vid] = (hosts, size)
        c.bind(model, ev.host_id, restore=True)  # counters-based terms held when it was decided
        self.allocations[ev.workload_id] = Allocation(ev.host_id, spec, ev.sequence, volumes=vols)
        self.host_workloads[ev.host_id] += 1

    def _replay_host_replicas(self, adds: list[pb.Event]) -> None:
        """add_hosts gave registered per-host services a replica on each new host that
        fits one; make that exactly the recorded set (it is, unless the core decides
        differently than the build that wrote the log)."""
        c = self.cluster
        for ev in adds:
            h = ev.host.id
            recorded = list(ev.per_host_workload_ids)
            want = set(recorded)
            for d, model in self.daemons.items():
                rid = f"{d}@{h}"
                try:
                    c.workload(rid)
                    has = True
                except NotFound:
                    has = False
                if has and d not in want:
                    c.release(rid)
                elif not has and d in want:
                    c.bind_replicas(model, [h])
            for d in recorded:
                alloc = self.allocations.get(d)
                if alloc is None or alloc.replicas is None:
                    raise StoreError(f"event {ev.sequence}: {d!r} is not a placed per-host service")
                alloc.replicas.append(h)
                self.host_workloads[h] += 1

    def _new_host_replicas(self, host_ids: list[str]) -> dict[str, list[str]]:
        """host id -> the per-host services add_hosts gave a replica there (recorded in HOST_ADDED)."""
        out: dict[str, list[str]] = {}
        if not self.daemons:
            return out
        c = self.cluster
        for h in host_ids:
            for d in self.daemons:
                try:
                    c.workload(f"{d}@{h}")
                except NotFound:
                    continue
                out.setdefault(h, []).append(d)
                self.allocations[d].replicas.append(h)
                self.host_workloads[h] += 1
        return out

    def _host_gone(self, host_id: str) -> None:
        """A removed host takes its per-host service replicas with it."""
        if self.daemons:
            for d in self.daemons:
                replicas = self.allocations[d].replicas
                if host_id in replicas:
                    replicas.remove(host_id)
        self.host_workloads.pop(host_id, None)

    def _forget(self, workload_id: str) -> None:
        alloc = self.allocations.pop(workload_id)
        hw = self.host_workloads
        for h in (alloc.host_id,) if alloc.replicas is None else alloc.replicas:
            hw[h] -= 1
            if not hw[h]:
                del hw[h]
        if alloc.replicas is not None:
            del self.daemons[workload_id]

    def _apply_host_update(self, host: pb.Host) -> None:
        model = convert.host_to_model(host)
        old = self.hosts.get(host.id)
        if old is None or old.labels != host.labels or list(old.taints) != list(host.taints):
            update = getattr(self.cluster, "update_host", None)
            if update is None:
                raise Unsupported("changing labels or taints needs Cluster.update_host, "
                                  "which this core does not provide yet")
            update(host.id, labels=dict(model.labels), taints=list(model.taints))
        self.cluster.set_host_state(host.id, model.state)

    # -- submitting: leader/follower -----------------------------------------

    def execute(self, kind: str, args: tuple, deadline: float | None = None, n: int = 1,
                coalesce: bool = False):
        """Apply a mutation and return its result once it is durable (or raise its error).

        deadline is a time.monotonic() value: an operation still queued then is
        dropped unapplied (DeadlineExpired); one already in a batch is answered.
        coalesce marks Place operations that may share one place_batch call.
        """
        op = Op(kind, args, deadline, n)
        op.taken = False
        if coalesce:
            op.kind = "place*"
        with self._queue_cond:
            if self.broken is not None:
                raise StoreFailed(f"store failed earlier: {self.broken}")
            if self._stopping:
                raise StateConflict("server is stopping")
            self._queue.append(op)
            lead = not self._leading
            self._leading = True
        if not lead:
            self._await_turn(op)
            lead = op.lead
        if lead:
            self._lead(op)
        if op.error is not None:
            raise op.error
        return op.result

    def submit(self, kind: str, args: tuple, deadline: float | None = None, n: int = 1):
        """`execute` wrapped in a completed Future (for callers written against the old writer)."""
        from concurrent.futures import Future

        fut: Future = Future()
        try:
            fut.set_result(self.execute(kind, args, deadline, n))
        except SchedulerError as exc:
            fut.set_exception(exc)
        return fut

    def _await_turn(self, op: Op) -> None:
        """Sleep until a leader answered `op` or handed this thread the lead."""
        if op.deadline is None:
            op.wake.acquire()
            return
        if op.wake.acquire(timeout=max(op.deadline - time.monotonic(), 0.0)):
            return
        with self._queue_cond:
            if not op.taken and not op.lead:
                self._queue.remove(op)
                op.error = DeadlineExpired("deadline passed while the operation waited for the writer")
                return
        op.wake.acquire()  # in a batch already (or leading): answered within one batch

    def _lead(self, mine: Op) -> None:
        """Run batches until `mine` is answered, then pass the lead on."""
        while True:
            with self._queue_cond:
                ops = self._take_locked()
            try:
                self._process(ops)
            except BaseException as exc:  # a bug or a store failure: fail-stop
                log.exception("writer failed")
                for op in ops:
                    if op.error is None and op.result is None:
                        op.error = StoreFailed(str(exc))
                self._fail(exc)
                for op in ops:
                    if op is not mine:
                        op.wake.release()
                return
            for op in ops:
                if op is not mine:
                    op.wake.release()
            if mine.taken:
                with self._queue_cond:
                    if self._queue:
                        nxt = self._queue[0]
                        nxt.lead = True
                        nxt.wake.release()
                    else:
                        self._leading = False
                        if self._stopping:  # close() waits for the last batch
                            self._queue_cond.notify_all()
                return

    def _take_locked(self) -> list[Op]:
        q = self._queue
        op = q.popleft()
        op.taken = True
        ops = [op]
        n = op.n
        while q and n + q[0].n <= self.max_batch:
            op = q.popleft()
            op.taken = True
            ops.append(op)
            n += op.n
        return ops

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new mutations, let the queued ones finish, close the store."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._queue_cond:
            self._stopping = True
            while self._leading or self._queue:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._queue_cond.wait(remaining)
        self.store.close()

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        with self._queue_cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._leading = False
            self._queue_cond.notify_all()
        for op in pending:
            op.error = StoreFailed(f"store failed: {exc}")
            op.wake.release()
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _process(self, ops: list[Op]) -> None:
        records: list[Record] = []
        outcomes: list[tuple[Op, object, BaseException | None]] = []
        now = time.monotonic()
        # Event.time (field 3) serialized once for the whole batch.
        ts = _event_time(time.time_ns())
        n_place = 0
        with self.lock:
            seq0 = self.sequence
            i = 0
            while i < len(ops):
                op = ops[i]
                if op.deadline is not None and op.deadline < now:
                    outcomes.append((op, None, DeadlineExpired("deadline passed before the operation ran")))
                    i += 1
                    continue
                if op.kind == "place*":
                    group = [op]
                    n_place += op.n
                    j = i + 1
                    if j < len(ops):  # (the id set only when there is something to join)
                        ids = {it.wid for it in op.args[0]}
                        while j < len(ops) and ops[j].kind == "place*" and ops[j].args[2] == op.args[2] \
                                and (ops[j].deadline is None or ops[j].deadline >= now) \
                                and ids.isdisjoint(it.wid for it in ops[j].args[0]):
                            ids.update(it.wid for it in ops[j].args[0])
                            group.append(ops[j])
                            n_place += ops[j].n
                            j += 1
                    outcomes.extend(self._place_group(group, records, ts))
                    i = j
                    continue
                try:
                    result = getattr(self, "_do_" + op.kind)(*op.args, records=records, ts=ts)
                    outcomes.append((op, result, None))
                except SchedulerError as exc:
                    outcomes.append((op, None, exc))
                if op.kind == "place":
                    n_place += op.n
                i += 1
            if records:
                # Durable before any reply; one transaction (one fsync) for the whole batch.
                self.store.append(records)
            assert self.sequence == seq0 + len(records)
        if self.metrics is not None:
            self.metrics.batch(n_place)
        for op, result, exc in outcomes:
            op.result = result
            op.error = exc
        if records and self._event_waiters:
            with self.events_cond:
                self.events_cond.notify_all()

    # -- events --------------------------------------------------------------

    def _event(self, records: list[Record], ts: bytes, etype: int, *, host_id: str = "",
               workload_id: str = "", host: pb.Host | None = None, spec: bytes | None = None,
               **repeated) -> int:
        """Append one Event record; `ts` is the serialized Event.time field (tag included).
        repeated: replica_host_ids, volumes, per_host_workload_ids, volume_id."""
        self.sequence += 1
        if host is None and not repeated:
            # Hot path (releases): write the Event's wire format directly; fields may
            # come in any order and concatenate into one valid message. Three times
            # cheaper than building a pb.Event.
            hid = host_id.encode()
            wid = workload_id.encode()
            body = b"".join((b"\x08", varint(self.sequence), b"\x10", varint(etype), ts,
                             b"\x22", varint(len(hid)), hid, b"\x2a", varint(len(wid)), wid))
        else:
            ev = pb.Event(sequence=self.sequence, type=etype, host_id=host_id,
                          workload_id=workload_id, host=host, **repeated)
            body = ev.SerializeToString() + ts
        if spec is not None:
            body += _EVENT_WORKLOAD_TAG + varint(len(spec)) + spec
        records.append(Record(self.sequence, etype, body))
        return self.sequence

    # -- mutations (leader thread, under self.lock) --------------------------

    def _do_register(self, hosts: list[pb.Host], models: list, *, records, ts):
        self.cluster.add_hosts(models)  # all or nothing
        replicas = self._new_host_replicas([h.id for h in hosts])
        for h in hosts:
            self.hosts[h.id] = h
            daemons = replicas.get(h.id)
            if daemons:
                self._event(records, ts, pb.EVENT_TYPE_HOST_ADDED, host_id=h.id, host=h,
                            per_host_workload_ids=daemons)
            else:
                self._event(records, ts, pb.EVENT_TYPE_HOST_ADDED, host_id=h.id, host=h)
        return hosts

    def _do_update(self, host_id: str, labels, taints, state, *, records, ts):
        old = self.hosts.get(host_id)
        if old is None:
            raise NotFound(f"host_id {host_id!r} is not registered")
        new = pb.Host()
        new.CopyFrom(old)
        if labels is not None:
            new.ClearField("labels")
            new.labels.update(labels)
        if taints is not None:
            del new.taints[:]
            new.taints.extend(taints)
        if state is not None:
            new.state = state
        convert.host_to_model(new)  # validate before touching the cluster
        self._apply_host_update(new)
        self.hosts[host_id] = new
        self._event(records, ts, pb.EVENT_TYPE_HOST_UPDATED, host_id=host_id, host=new)
        return new

    def _do_remove(self, host_id: str, *, records, ts):
        if host_id not in self.hosts:
            raise NotFound(f"host_id {host_id!r} is not registered")
        self.cluster.remove_host(host_id)  # per-host service replicas go with it
        del self.hosts[host_id]
        self._host_gone(host_id)
        return self._event(records, ts, pb.EVENT_TYPE_HOST_REMOVED, host_id=host_id)

    def _do_release(self, workload_ids: list[str], allow_missing: bool, *, records, ts):
        missing = [w for w in workload_ids if w not in self.allocations]
        if missing and not allow_missing:
            raise NotFound(f"workload_ids not placed: {missing[:10]!r}")
        released = []
        for wid in dict.fromkeys(workload_ids):
            alloc = self.allocations.get(wid)
            if alloc is None:
                continue
            self.cluster.release(wid)  # a per-host service: every replica
            self._forget(wid)
            self._event(records, ts, pb.EVENT_TYPE_RELEASED, host_id=alloc.host_id, workload_id=wid)
            released.append(wid)
        return released

    def _do_delete_volume(self, volume_id: str, *, records, ts):
        if volume_id not in self.volumes:
            raise NotFound(f"volume_id {volume_id!r} does not exist")
        self.cluster.remove_volume(volume_id)  # StateConflict while a workload mounts it
        del self.volumes[volume_id]
        seq = self._event(records, ts, pb.EVENT_TYPE_VOLUME_DELETED, volume_id=volume_id)
        return seq

    def _do_place(self, items: list[PlaceItem], gang: bool, strategy: str, preempt: bool, *, records, ts):
        # Gang, preempting and per-host/volume calls are never coalesced.
        answers, fresh = self._idempotent(items)
        if fresh:
            placed, unplaced = self._apply_place(fresh, gang, strategy, preempt)
            self._record(placed, unplaced, answers, records, ts)
        return [answers[it.wid] for it in items]

    def _place_group(self, group: list[Op], records, ts):
        """Place the workloads of several coalescable Place calls in one core call."""
        strategy = group[0].args[2]
        outcomes, live, fresh_all = [], [], []
        for op in group:
            try:
                answers, fresh = self._idempotent(op.args[0])
            except SchedulerError as exc:
                outcomes.append((op, None, exc))
                continue
            live.append((op, answers))
            fresh_all.extend(fresh)
        if fresh_all:
            try:
                # Several calls: each keeps its order and the calls go in arrival order,
                # as if they had come one after another. (largest_first also sums the
                # cluster's capacity, O(hosts): a third of a coalesced unary call.)
                placed, unplaced = self._apply_place(fresh_all, False, strategy, False,
                                                     order="arrival" if len(live) > 1 else "largest_first")
            except SchedulerError as exc:
                if len(live) == 1:
                    outcomes.append((live[0][0], None, exc))
                    return outcomes
                # One call's bad workload must not fail the others: the cluster is
                # unchanged, so place each call on its own.
                for op, _ in live:
                    try:
                        outcomes.append((op, self._do_place(*op.args, records=records, ts=ts), None))
                    except SchedulerError as exc2:
                        outcomes.append((op, None, exc2))
                return outcomes
            merged: dict[str, pb.Placement] = {}
            self._record(placed, unplaced, merged, records, ts)
            for _, answers in live:
                for wid, a in answers.items():
                    if a is None:
                        answers[wid] = merged[wid]
        for op, answers in live:
            outcomes.append((op, [answers[it.wid] for it in op.args[0]], None))
        return outcomes

    def _idempotent(self, items: list[PlaceItem]):
        """Split a call into answers already given (retries) and fresh workloads.

        Raises DuplicateId when a placed workload id comes with a different spec.
        """
        answers: dict[str, pb.Placement | tuple | None] = {}
        fresh = []
        allocs = self.allocations
        for it in items:
            wid = it.wid
            alloc = allocs.get(wid)
            if alloc is None:
                answers[wid] = None
                fresh.append(it)
            elif alloc.spec != it.spec:
                raise DuplicateId(f"workload id {wid!r} is already placed with a different spec")
            else:
                answers[wid] = self._answer(wid, alloc)
        return answers, fresh

    def _apply_place(self, fresh: list[PlaceItem], gang: bool, strategy: str, preempt: bool,
                     order: str = "largest_first"):
        """Place `fresh` in the cluster; returns (placed, unplaced).

        placed lists (item, host id, model Placement or None) in the order the
        cluster applied them, which is the order their events are recorded and
        replayed in. All or nothing: a SchedulerError (not Unschedulable) undoes
        what this call placed, so a failed call changes nothing.
        """
        c = self.cluster
        placed: list[tuple[PlaceItem, str, object]] = []
        unplaced: dict[str, object] = {}
        try:
            if preempt:
                if "preempt" not in inspect.signature(c.place).parameters:
                    raise Unsupported("preempt needs Cluster.place(preempt=True), "
                                      "which this core does not provide yet")
                for it in fresh:
                    try:
                        p = c.place(it.model, strategy=strategy, preempt=True)
                    except Unschedulable as exc:
                        unplaced[it.wid] = exc.explanation
                        continue
                    placed.append((it, p.host_id or "", p))
                return placed, unplaced
            plain = fresh
            if fresh[0].special if len(fresh) == 1 else any(it.special for it in fresh):
                # Per-host services and workloads creating volumes: one `place` each,
                # which reports their replica hosts (place_batch does not).
                plain = []
                for it in fresh:
                    if not it.special:
                        plain.append(it)
                        continue
                    try:
                        p = c.place(it.model, strategy=strategy)
                    except Unschedulable as exc:
                        unplaced[it.wid] = exc.explanation
                        continue
                    placed.append((it, p.host_id or "", p))
            if len(plain) == 1 and not gang:
                it = plain[0]
                try:
                    placed.append((it, c.place(it.model, strategy=strategy).host_id, None))
                except Unschedulable as exc:
                    unplaced[it.wid] = exc.explanation
            elif plain:
                r = c.place_batch([it.model for it in plain], strategy=strategy, order=order, gang=gang)
                by_id = {it.wid: it for it in plain}
                # placements is filled in placement order (largest first): keep it.
                placed += [(by_id[wid], host_id, None) for wid, host_id in r.placements.items()]
                unplaced.update(r.unplaced)
        except SchedulerError:
            self._undo(placed)
            raise
        return placed, unplaced

    def _undo(self, placed) -> None:
        """Take back placements not yet recorded, newest first."""
        c = self.cluster
        for it, _host_id, p in reversed(placed):
            c.release(it.wid)
            if p is None:
                continue
            for vid in p.volumes:
                c.remove_volume(vid)
            for wid in p.evicted:
                alloc = self.allocations[wid]
                c.bind(convert.workload_to_model(pb.Workload.FromString(alloc.spec)), alloc.host_id, restore=True)

    def _record(self, placed, unplaced: dict, answers: dict, records: list[Record], ts: bytes) -> None:
        """Events, allocations and answers for what `_apply_place` did."""
        allocs = self.allocations
        hw = self.host_workloads
        head = _EVENT_PLACED_TYPE + ts
        kind = pb.EVENT_TYPE_PLACED
        seq = self.sequence
        for it, host_id, p in placed:
            wid = it.wid
            if p is not None:
                self.sequence = seq
                answers[wid] = self._placed_special(it, p, records, ts)
                seq = self.sequence
                continue
            # Plain placements, the hot path: the Event's wire format written directly.
            seq += 1
            spec = it.spec
            records.append(Record(seq, kind, placed_event(seq, head, host_id, wid, spec)))
            allocs[wid] = Allocation(host_id, spec, seq)
            hw[host_id] += 1
            answers[wid] = (wid, host_id, seq)  # see place_response
        self.sequence = seq
        if self.metrics is not None and placed:
            self.metrics.placed(len(placed))
        for wid, expl in unplaced.items():
            answers[wid] = self._refused(wid, expl)

    def _placed_special(self, it: PlaceItem, p, records, ts) -> pb.Placement:
        """Record a placement with evictions, per-host replicas or new volumes."""
        wid = it.wid
        for victim in p.evicted:
            alloc = self.allocations[victim]
            self._forget(victim)
            self._event(records, ts, pb.EVENT_TYPE_EVICTED, host_id=alloc.host_id, workload_id=victim)
        extra = {}
        if it.model.per_host:
            replicas = list(p.replicas)
            extra["replica_host_ids"] = replicas
            alloc = Allocation("", it.spec, 0, replicas=replicas)
            for h in replicas:
                self.host_workloads[h] += 1
            self.daemons[wid] = it.model
        else:
            vols = ()
            if p.volumes:
                sizes = {v.id: v.size_gib for v in it.proto.new_volumes}
                vols = tuple((vid, tuple(hosts), sizes[vid]) for vid, hosts in p.volumes.items())
                extra["volumes"] = [pb.VolumeReplicas(volume_id=vid, host_ids=hosts, size_gib=size)
                                    for vid, hosts, size in vols]
                for vid, hosts, size in vols:
                    self.volumes[vid] = (hosts, size)
            alloc = Allocation(p.host_id, it.spec, 0, volumes=vols)
            self.host_workloads[p.host_id] += 1
        alloc.sequence = self._event(records, ts, pb.EVENT_TYPE_PLACED, host_id=alloc.host_id,
                                     workload_id=wid, spec=it.spec, **extra)
        self.allocations[wid] = alloc
        out = self._answer(wid, alloc, evicted=p.evicted)
        if it.model.per_host and p.explanation:
            out.explanation.CopyFrom(convert.explanation_to_proto(p.explanation))
        return out

    @staticmethod
    def _answer(wid: str, alloc: Allocation, evicted=()) -> pb.Placement:
        out = pb.Placement(workload_id=wid, host_id=alloc.host_id, sequence=alloc.sequence,
                           evicted_workload_ids=evicted)
        if alloc.replicas is not None:
            out.replica_host_ids.extend(alloc.replicas)
        for vid, hosts, size in alloc.volumes:
            out.volumes.add(volume_id=vid, host_ids=hosts, size_gib=size)
        return out

    def _refused(self, wid: str, explanation) -> pb.Placement:
        expl = convert.explanation_to_proto(explanation)
        if self.metrics is not None:
            self.metrics.refused(convert.top_reason(expl))
        return pb.Placement(workload_id=wid, explanation=expl)

    # -- reads (any thread) --------------------------------------------------

    def list_hosts(self, state: int = 0) -> list[pb.Host]:
        with self.lock:
            usage = self.cluster.usage()
            dims = self.dimensions
            out = []
            for hid, h in self.hosts.items():
                if state and h.state != state:
                    continue
                row = usage[self.cluster.host_index(hid)]
                m = pb.Host()
                m.CopyFrom(h)
                for d, v in zip(dims, row.tolist()):
                    if v:
                        m.used[d] = v
                m.workload_count = self.host_workloads.get(hid, 0)
                out.append(m)
            return out

    def list_allocations(self, host_id: str = "", include_workloads: bool = False) -> list[pb.Placement]:
        with self.lock:
            if host_id and host_id not in self.hosts:
                raise NotFound(f"host_id {host_id!r} is not registered")
            items = [(w, a) for w, a in self.allocations.items()
                     if not host_id or a.host_id == host_id or (a.replicas is not None and host_id in a.replicas)]
            out = [self._answer(w, a) for w, a in items]
        if include_workloads:
            for p, (_, a) in zip(out, items):
                p.workload.MergeFromString(a.spec)
        return out

    def list_volumes(self) -> list[pb.VolumeReplicas]:
        with self.lock:
            return [pb.VolumeReplicas(volume_id=vid, host_ids=hosts, size_gib=size)
                    for vid, (hosts, size) in self.volumes.items()]

    def explain(self, model) -> pb.Explanation:
        with self.lock:
            return convert.explanation_to_proto(self.cluster.explain(model))

    def status(self) -> pb.GetStatusResponse:
        with self.lock:
            c = self.cluster
            out = pb.GetStatusResponse(dimensions=self.dimensions, allocations=len(self.allocations),
                                       last_sequence=self.sequence, hosts_used=int(c.hosts_used()))
            for name in convert.HOST_STATES.values():
                out.hosts_by_state[name] = 0
            live = []
            for hid, h in self.hosts.items():
                out.hosts_by_state[convert.HOST_STATES.get(h.state, "ready")] += 1
                live.append(c.host_index(hid))
            usage, alloc = c.usage(), c.allocatable()
            used_tot = usage[live].sum(axis=0).tolist() if live else [0] * len(self.dimensions)
            alloc_tot = alloc[live].sum(axis=0).tolist() if live else [0] * len(self.dimensions)
            for d, u, a in zip(self.dimensions, used_tot, alloc_tot):
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


def _current_exception() -> BaseException:
    import sys

    return sys.exc_info()[1]
