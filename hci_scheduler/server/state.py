"""Server state: one Cluster, one event log, one writer.

Every mutation goes through `Writer`: a single thread that takes the queued
operations in arrival order, applies them to the Cluster under `lock`,
appends their events to the Store in ONE transaction (group commit), and only
then answers the callers. Consecutive Place operations are coalesced into one
`place_batch` call, so throughput grows with the number of clients.

Reads take the same lock, so they see only durable state and wait at most one
batch (apply + commit) for the writer.

On start the events in the Store are replayed in order into a fresh Cluster
(`Cluster.bind` for placements), which rebuilds the state exactly: same hosts
in the same order, same allocations, same sequence number.
"""
from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from ..errors import DuplicateId, NotFound, SchedulerError, StateConflict, Unschedulable, ValidationError
from ..store import Record, Store, StoreError
from ..v1 import scheduler_pb2 as pb
from . import convert

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
    host_id: str
    spec: bytes  # canonical bytes of the normalized pb.Workload
    sequence: int


@dataclass(slots=True)
class PlaceItem:
    """One workload of a Place call, converted once by the calling thread."""

    proto: pb.Workload  # normalized
    spec: bytes
    model: object  # hci_scheduler.model.Workload


class Op:
    __slots__ = ("kind", "args", "future", "deadline", "n")

    def __init__(self, kind: str, args: tuple, deadline: float | None, n: int = 1):
        self.kind = kind
        self.args = args
        self.future: Future = Future()
        self.deadline = deadline
        self.n = n  # workloads carried, for batch sizing


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Field 7 (Event.workload), wire type 2 (length-delimited).
_EVENT_WORKLOAD_TAG = bytes([(7 << 3) | 2])


class SchedulerState:
    """The cluster, its allocations and event log, behind one writer.

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
        self.sequence = 0
        self.events_cond = threading.Condition()
        self.broken: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None
        t0 = time.perf_counter()
        n = self._replay()
        log.info("state rebuilt", extra={"fields": {
            "events": n, "hosts": len(self.hosts), "allocations": len(self.allocations),
            "sequence": self.sequence, "seconds": round(time.perf_counter() - t0, 3)}})
        self._queue: collections.deque[Op] = collections.deque()
        self._queue_cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="scheduler-writer", daemon=True)
        self._thread.start()

    # -- replay --------------------------------------------------------------

    def _replay(self) -> int:
        n = 0
        c = self.cluster
        adds: list[pb.Host] = []  # consecutive HOST_ADDED events, registered in one call

        def flush() -> None:
            if adds:
                c.add_hosts([convert.host_to_model(h) for h in adds])
                for h in adds:
                    self.hosts[h.id] = h
                adds.clear()

        for rec in self.store.iter_all():
            ev = pb.Event.FromString(rec.body)
            t = ev.type
            if t == pb.EVENT_TYPE_HOST_ADDED:
                # add_hosts assigns rows in the same order as one add_host per event.
                adds.append(ev.host)
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
            elif t == pb.EVENT_TYPE_PLACED:
                c.bind(convert.workload_to_model(ev.workload), ev.host_id)
                self.allocations[ev.workload_id] = Allocation(
                    ev.host_id, convert.spec_bytes(ev.workload), ev.sequence)
                self.host_workloads[ev.host_id] += 1
            elif t in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
                c.release(ev.workload_id)
                self._forget(ev.workload_id)
            else:
                raise StoreError(f"event {rec.sequence}: unknown type {t}")
            if ev.sequence != self.sequence + 1:
                raise StoreError(f"event sequence {ev.sequence} follows {self.sequence}")
            self.sequence = ev.sequence
            n += 1
        flush()
        return n

    def _forget(self, workload_id: str) -> None:
        alloc = self.allocations.pop(workload_id)
        self.host_workloads[alloc.host_id] -= 1
        if not self.host_workloads[alloc.host_id]:
            del self.host_workloads[alloc.host_id]

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

    # -- submitting ----------------------------------------------------------

    def submit(self, kind: str, args: tuple, deadline: float | None = None, n: int = 1) -> Future:
        """Queue a mutation for the writer; the future resolves once it is durable."""
        op = Op(kind, args, deadline, n)
        if self.broken is not None:
            op.future.set_exception(StoreFailed(f"store failed earlier: {self.broken}"))
            return op.future
        with self._queue_cond:
            if self._stopping:
                op.future.set_exception(StateConflict("server is stopping"))
                return op.future
            self._queue.append(op)
            self._queue_cond.notify()
        return op.future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued mutations, stop the writer and close the store."""
        with self._queue_cond:
            self._stopping = True
            self._queue_cond.notify()
        self._thread.join(timeout)
        self.store.close()

    # -- the writer ----------------------------------------------------------

    def _take(self) -> list[Op] | None:
        with self._queue_cond:
            while not self._queue and not self._stopping:
                self._queue_cond.wait()
            if not self._queue:
                return None
            ops = [self._queue.popleft()]
            n = ops[0].n
            while self._queue and n + self._queue[0].n <= self.max_batch:
                op = self._queue.popleft()
                ops.append(op)
                n += op.n
            return ops

    def _run(self) -> None:
        while True:
            ops = self._take()
            if ops is None:
                return
            try:
                self._process(ops)
            except BaseException as exc:  # a bug or a store failure: fail-stop
                log.exception("writer failed")
                for op in ops:
                    if not op.future.done():
                        op.future.set_exception(StoreFailed(str(exc)))
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        with self._queue_cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
        for op in pending:
            op.future.set_exception(StoreFailed(f"store failed: {exc}"))
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _process(self, ops: list[Op]) -> None:
        records: list[Record] = []
        outcomes: list[tuple[Op, object, BaseException | None]] = []
        now = time.monotonic()
        stamp = Timestamp()
        stamp.GetCurrentTime()
        # Event.time (field 3) serialized once for the whole batch.
        ts = pb.Event(time=stamp).SerializeToString()
        with self.lock:
            seq0 = self.sequence
            i = 0
            while i < len(ops):
                op = ops[i]
                if op.deadline is not None and op.deadline < now:
                    outcomes.append((op, None, DeadlineExpired("deadline passed before the operation ran")))
                    i += 1
                    continue
                if op.kind == "place" and self._coalescable(op):
                    group, ids = [op], {it.proto.id for it in op.args[0]}
                    j = i + 1
                    while j < len(ops) and ops[j].kind == "place" and self._coalescable(ops[j]) \
                            and ops[j].args[2] == op.args[2] \
                            and (ops[j].deadline is None or ops[j].deadline >= now) \
                            and ids.isdisjoint(it.proto.id for it in ops[j].args[0]):
                        ids.update(it.proto.id for it in ops[j].args[0])
                        group.append(ops[j])
                        j += 1
                    outcomes.extend(self._place_group(group, records, ts))
                    i = j
                    continue
                try:
                    result = getattr(self, "_do_" + op.kind)(*op.args, records=records, ts=ts)
                    outcomes.append((op, result, None))
                except SchedulerError as exc:
                    outcomes.append((op, None, exc))
                i += 1
            if records:
                # Durable before any reply; one transaction for the whole batch.
                self.store.append(records)
            assert self.sequence == seq0 + len(records)
        if self.metrics is not None:
            self.metrics.batch(sum(op.n for op in ops if op.kind == "place"))
        for op, result, exc in outcomes:
            if exc is not None:
                op.future.set_exception(exc)
            else:
                op.future.set_result(result)
        if records:
            with self.events_cond:
                self.events_cond.notify_all()

    @staticmethod
    def _coalescable(op: Op) -> bool:
        items, gang, _strategy, preempt = op.args
        return not gang and not preempt and not any(it.proto.gang for it in items)

    # -- events --------------------------------------------------------------

    def _event(self, records: list[Record], ts: bytes, etype: int, *, host_id: str = "",
               workload_id: str = "", host: pb.Host | None = None, spec: bytes | None = None) -> int:
        """Append one Event record; `ts` is the serialized Event.time field (tag included)."""
        self.sequence += 1
        if host is None:
            # Hot path (placements, releases): write the Event's wire format
            # directly; fields may come in any order and concatenate into one
            # valid message. Three times cheaper than building a pb.Event.
            hid = host_id.encode()
            wid = workload_id.encode()
            body = b"".join((b"\x08", _varint(self.sequence), b"\x10", _varint(etype), ts,
                             b"\x22", _varint(len(hid)), hid, b"\x2a", _varint(len(wid)), wid))
        else:
            ev = pb.Event(sequence=self.sequence, type=etype, host_id=host_id,
                          workload_id=workload_id, host=host)
            body = ev.SerializeToString() + ts
        if spec is not None:
            body += _EVENT_WORKLOAD_TAG + _varint(len(spec)) + spec
        records.append(Record(self.sequence, etype, body))
        return self.sequence

    # -- mutations (writer thread, under self.lock) --------------------------

    def _do_register(self, hosts: list[pb.Host], models: list, *, records, ts):
        self.cluster.add_hosts(models)  # all or nothing
        for h in hosts:
            self.hosts[h.id] = h
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
        self.cluster.remove_host(host_id)
        del self.hosts[host_id]
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
            self.cluster.release(wid)
            self._forget(wid)
            self._event(records, ts, pb.EVENT_TYPE_RELEASED, host_id=alloc.host_id, workload_id=wid)
            released.append(wid)
        return released

    def _do_place(self, items: list[PlaceItem], gang: bool, strategy: str, preempt: bool, *, records, ts):
        # Gang and preempting calls are never coalesced.
        answers, fresh = self._idempotent(items)
        if preempt:
            if "preempt" not in inspect.signature(self.cluster.place).parameters:
                raise Unsupported("preempt needs Cluster.place(preempt=True), "
                                  "which this core does not provide yet")
            for it in fresh:
                try:
                    p = self.cluster.place(it.model, strategy=strategy, preempt=True)
                except Unschedulable as exc:
                    answers[it.proto.id] = self._refused(it.proto.id, exc.explanation)
                    continue
                evicted = list(p.evicted)
                for wid in evicted:
                    alloc = self.allocations[wid]
                    self._forget(wid)
                    self._event(records, ts, pb.EVENT_TYPE_EVICTED, host_id=alloc.host_id, workload_id=wid)
                answers[it.proto.id] = self._placed(it, p.host_id, records, ts, evicted)
        elif fresh:
            result = self.cluster.place_batch([it.model for it in fresh], strategy=strategy, gang=gang)
            self._record_batch(fresh, result, answers, records, ts)
        return [answers[it.proto.id] for it in items]

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
            mark = (len(records), self.sequence)
            try:
                if len(fresh_all) == 1:
                    it = fresh_all[0]
                    try:
                        p = self.cluster.place(it.model, strategy=strategy)
                        result_pl, result_un = {it.proto.id: p.host_id}, {}
                    except Unschedulable as exc:
                        result_pl, result_un = {}, {it.proto.id: exc.explanation}
                else:
                    r = self.cluster.place_batch([it.model for it in fresh_all], strategy=strategy)
                    result_pl, result_un = r.placements, r.unplaced
            except SchedulerError:
                if len(live) == 1:
                    op = live[0][0]
                    outcomes.append((op, None, _current_exception()))
                    return outcomes
                # One call's bad workload must not fail the others: the core left
                # the cluster unchanged, so place each call on its own.
                del records[mark[0]:]
                self.sequence = mark[1]
                for op, _ in live:
                    try:
                        outcomes.append((op, self._do_place(*op.args, records=records, ts=ts), None))
                    except SchedulerError as exc:
                        outcomes.append((op, None, exc))
                return outcomes
            merged: dict[str, pb.Placement] = {}
            self._record(fresh_all, result_pl, result_un, merged, records, ts)
            for _, answers in live:
                for wid in list(answers):
                    if answers[wid] is None:
                        answers[wid] = merged[wid]
        for op, answers in live:
            outcomes.append((op, [answers[it.proto.id] for it in op.args[0]], None))
        return outcomes

    def _idempotent(self, items: list[PlaceItem]):
        """Split a call into answers already given (retries) and fresh workloads.

        Raises DuplicateId when a placed workload id comes with a different spec.
        """
        answers: dict[str, pb.Placement | None] = {}
        fresh = []
        for it in items:
            alloc = self.allocations.get(it.proto.id)
            if alloc is None:
                answers[it.proto.id] = None
                fresh.append(it)
            elif alloc.spec != it.spec:
                raise DuplicateId(f"workload id {it.proto.id!r} is already placed with a different spec")
            else:
                answers[it.proto.id] = pb.Placement(workload_id=it.proto.id, host_id=alloc.host_id,
                                                    sequence=alloc.sequence)
        return answers, fresh

    def _record_batch(self, fresh, result, answers, records, ts):
        merged: dict[str, pb.Placement] = {}
        self._record(fresh, result.placements, result.unplaced, merged, records, ts)
        answers.update(merged)

    def _record(self, fresh, placed: dict, unplaced: dict, out: dict, records, ts):
        for it in fresh:
            wid = it.proto.id
            host_id = placed.get(wid)
            if host_id is not None:
                out[wid] = self._placed(it, host_id, records, ts)
            else:
                out[wid] = self._refused(wid, unplaced.get(wid))

    def _placed(self, it: PlaceItem, host_id: str, records, ts, evicted=()) -> pb.Placement:
        wid = it.proto.id
        seq = self._event(records, ts, pb.EVENT_TYPE_PLACED, host_id=host_id, workload_id=wid, spec=it.spec)
        self.allocations[wid] = Allocation(host_id, it.spec, seq)
        self.host_workloads[host_id] += 1
        if self.metrics is not None:
            self.metrics.placed(1)
        return pb.Placement(workload_id=wid, host_id=host_id, sequence=seq, evicted_workload_ids=evicted)

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
            items = [(w, a) for w, a in self.allocations.items() if not host_id or a.host_id == host_id]
        out = []
        for wid, a in items:
            p = pb.Placement(workload_id=wid, host_id=a.host_id, sequence=a.sequence)
            if include_workloads:
                p.workload.MergeFromString(a.spec)
            out.append(p)
        return out

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
            if self.store.last_sequence() <= after:
                self.events_cond.wait(timeout)


def _current_exception() -> BaseException:
    import sys

    return sys.exc_info()[1]
