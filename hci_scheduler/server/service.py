"""The SchedulerService servicer: proto -> model, call the state, model -> proto.

No scheduling logic lives here. Every error is mapped to a status code by the
one table `ERROR_CODES`; an unschedulable workload is a normal answer. Requests
arrive as bytes and are decoded here (`method_handlers`), so that bytes protobuf
cannot read are INVALID_ARGUMENT like any other bad request.
"""
from __future__ import annotations

import functools
import logging
import time

import grpc

from ..cluster import MAX_QUANTITY
from ..errors import (DuplicateId, NotFound, SchedulerError, StateConflict, Unschedulable,
                      ValidationError)
from ..rebalance.errors import RebalanceInfeasible
from ..store import StoreError
from ..v1 import scheduler_pb2 as pb
from ..v1 import scheduler_pb2_grpc as pb_grpc
from . import convert, limits
from .convert import PlaceItem
from .limits import (DEFAULT_REBALANCE_SECONDS, MAX_HOSTS_PER_CALL, MAX_ID_LENGTH, MAX_NAME_LENGTH,
                     MAX_REBALANCE_SECONDS, MAX_SEED, MAX_WORKLOADS_PER_CALL)
from .plans import SearchCancelled, SearchesBusy, StalePlan
from .state import SchedulerState, place_response
from .writer import DeadlineExpired, StoreFailed
from .wire import PlainDecoder

log = logging.getLogger("hci_scheduler.server")

#: The one table from typed errors to status codes; the first match wins, so
#: subclasses come before their bases.
ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (DuplicateId, grpc.StatusCode.ALREADY_EXISTS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (StateConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (Unschedulable, grpc.StatusCode.FAILED_PRECONDITION),
    (RebalanceInfeasible, grpc.StatusCode.FAILED_PRECONDITION),  # what fits nowhere, named
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (SearchesBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SearchCancelled, grpc.StatusCode.CANCELLED),
    (StoreFailed, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (SchedulerError, grpc.StatusCode.INTERNAL),
)

def status_code(exc: BaseException) -> grpc.StatusCode:
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _rpc(method):
    """Map SchedulerError to a status, and record the call in metrics."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return method(self, request, context)
        except SchedulerError as exc:
            code = status_code(exc)
            context.abort(code, _details(str(exc)))
        except (ValueError, TypeError, OverflowError) as exc:
            # Conversions from wire values (e.g. a NaN ratio) that the model rejects untyped.
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, _details(f"invalid request: {exc}"))
        finally:
            if self.metrics is not None:
                self.metrics.rpc(name, code.name, time.perf_counter() - t0)

    return wrapper


def _details(message: str) -> str:
    """An error message short enough for a status (gRPC refuses metadata over 16 KiB, and
    the client then sees RESOURCE_EXHAUSTED instead of the error): values are echoed."""
    return message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS] + "..."


def _strategy(gang: bool, strategy: int, preempt: bool) -> str:
    """The strategy name of a PlaceRequest, once its flags are known to go together."""
    if gang and preempt:
        raise ValidationError("gang and preempt cannot be combined")
    return convert.strategy(strategy)


_check_id = limits.check_id
MAX_DETAILS = 1000


def _gone(context):
    """Whether the call is over for its caller (cancelled, or past its deadline): a search
    for it stops."""
    return lambda: not context.is_active()


def method_handlers(servicer: "SchedulerServicer") -> dict[str, grpc.RpcMethodHandler]:
    """The handlers of every SchedulerService method, each taking its request as wire
    bytes. Place decodes its own (plain workloads skip protobuf); the others go through
    `limits.decode`, so undecodable bytes are INVALID_ARGUMENT (a deserializer that
    raises makes gRPC answer INTERNAL) and unknown fields are dropped on every transport."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["SchedulerService"].methods:
        behavior = getattr(servicer, method.name)
        if method.name != "Place":
            behavior = _decoding(behavior, getattr(pb, method.input_type.name), method.server_streaming,
                                 servicer.metrics)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else \
            grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(behavior, request_deserializer=None,
                                     response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    return handlers


def _decoding(behavior, request_class, streaming: bool, metrics):
    """`behavior` called with its request decoded from the call's bytes."""
    name = behavior.__name__

    def decode(data: bytes, context):
        t0 = time.perf_counter()
        try:
            return limits.decode(request_class, data)
        except ValidationError as exc:
            if metrics is not None:
                metrics.rpc(name, grpc.StatusCode.INVALID_ARGUMENT.name, time.perf_counter() - t0)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    if streaming:
        def stream(data: bytes, context):
            yield from behavior(decode(data, context), context)

        return stream

    def unary(data: bytes, context):
        return behavior(decode(data, context), context)

    return unary


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    """Implements hci_scheduler.v1.SchedulerService over a SchedulerState."""

    def __init__(self, state: SchedulerState, metrics=None, watch_poll_s: float = 0.5):
        self.state = state
        self.metrics = metrics
        self._plain = PlainDecoder(state.dimensions, MAX_QUANTITY, MAX_ID_LENGTH, MAX_WORKLOADS_PER_CALL,
                                   MAX_NAME_LENGTH)
        self.watch_poll_s = watch_poll_s
        self.stopping = False
        state.plans.recovered(state)  # logs "plan <id> interrupted after step k of n" for each one

    # -- helpers -------------------------------------------------------------

    def _deadline(self, context) -> float | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e8:
            return None
        return time.monotonic() + remaining

    def _execute(self, kind: str, args: tuple, context, n: int = 1, coalesce: bool = False):
        """Run a mutation through the state's writer; returns once it is durable."""
        return self.state.execute(kind, args, self._deadline(context), n=n, coalesce=coalesce)

    def _check_dims(self, field: str, mapping) -> None:
        dims = self.state.dimensions
        for k in mapping:
            if k not in dims:
                raise ValidationError(f"{field}: unknown dimension {k[:40]!r}, the cluster has {dims}")

    # -- hosts ---------------------------------------------------------------

    @_rpc
    def RegisterHosts(self, request, context):
        if not request.hosts:
            raise ValidationError("hosts must not be empty")
        if len(request.hosts) > MAX_HOSTS_PER_CALL:
            raise ValidationError(f"hosts: at most {MAX_HOSTS_PER_CALL} per call, got {len(request.hosts)}")
        hosts, models, seen = [], [], set()
        for h in request.hosts:
            _check_id("host id", h.id)
            if h.id in seen:
                raise ValidationError(f"host id {h.id!r} appears twice in hosts")
            seen.add(h.id)
            self._check_dims(f"host {h.id!r} capacity", h.capacity)
            self._check_dims(f"host {h.id!r} reserved", h.reserved)
            self._check_dims(f"host {h.id!r} allocation_ratios", h.allocation_ratios)
            for node in h.numa_nodes:
                self._check_dims(f"host {h.id!r} numa_nodes", node.resources)
            if h.state:
                convert.client_host_state(h.state, f"host {h.id!r}")
            n = convert.normalize_host(h)
            hosts.append(n)
            models.append(convert.host_to_model(n))
        return pb.RegisterHostsResponse(hosts=self._execute("register", (hosts, models), context))

    @_rpc
    def UpdateHost(self, request, context):
        _check_id("host_id", request.host_id)
        paths = set(request.update_mask.paths)
        unknown = paths - {"labels", "taints", "state"}
        if unknown:
            raise ValidationError(f"update_mask: unknown paths {sorted(unknown)}, allowed labels, taints, state")
        if not paths:
            paths = {p for p, present in (("labels", bool(request.labels)), ("taints", bool(request.taints)),
                                          ("state", request.state != pb.HOST_STATE_UNSPECIFIED)) if present}
        if not paths:
            raise ValidationError("nothing to update: set labels, taints, state or update_mask")
        where = f"host {request.host_id!r}"
        labels = None
        if "labels" in paths:
            limits.check_labels(f"{where} labels", request.labels)
            labels = dict(request.labels)
        taints = None
        if "taints" in paths:
            limits.check_count(f"{where} taints", len(request.taints), limits.MAX_TAINTS)
            taints = [convert.taint_to_model(t, where) for t in request.taints]
        state = convert.client_host_state(request.state, where) if "state" in paths else None
        return pb.UpdateHostResponse(host=self._execute("update", (request.host_id, labels, taints, state), context))

    @_rpc
    def RemoveHost(self, request, context):
        _check_id("host_id", request.host_id)
        return pb.RemoveHostResponse(sequence=self._execute("remove", (request.host_id,), context))

    @_rpc
    def ListHosts(self, request, context):
        if request.state:
            convert.host_state(request.state, "state")
        return self.state.list_hosts(request.state, request.page_size, request.page_token)

    # -- workloads -----------------------------------------------------------

    def _items(self, workloads, gang: bool) -> tuple[list[PlaceItem], bool]:
        """The converted workloads of a Place call, and whether the call may be
        coalesced with others (no gang, no per-host service, no new volume)."""
        items, seen, volume_ids = [], set(), set()
        dims = self.state.dimensions
        coalesce = not gang
        for w in workloads:
            wid = w.id
            if not wid or len(wid) > MAX_ID_LENGTH:
                _check_id("workload id", wid)
            if wid in seen:
                raise ValidationError(f"workload id {wid!r} appears twice in workloads")
            seen.add(wid)
            item = convert.place_item(w, wid, dims)
            if item.special:
                self._check_special(item.proto, volume_ids)
                coalesce = False
            elif item.model.gang:
                coalesce = False
            items.append(item)
        return items, coalesce

    @staticmethod
    def _check_special(w: pb.Workload, volume_ids: set[str]) -> None:
        """The wire-level checks of new volumes' ids (length, and a volume id twice in one
        call); the rules of per-host services, gangs and volumes are the Cluster's, which
        checks a whole batch before placing any of it."""
        for v in w.new_volumes:
            _check_id(f"workload {w.id!r} new_volumes id", v.id)
            if v.id in volume_ids:
                raise ValidationError(f"workload {w.id!r} new_volumes: volume id {v.id!r} appears twice")
            volume_ids.add(v.id)

    @_rpc
    def Place(self, request, context):
        """`request` is a PlaceRequest, or its wire bytes (how the server passes it):
        plain workloads are then decoded from the bytes (wire.pyx), anything else
        goes through protobuf."""
        if type(request) is bytes:
            decoded = self._plain.decode(request)
            if decoded is not None:
                items, gang, strategy, preempt = decoded
                return self._place(items, not gang, gang, _strategy(gang, strategy, preempt), preempt, context)
            request = limits.decode(pb.PlaceRequest, request)
        n = len(request.workloads)
        if not n:
            raise ValidationError("workloads must not be empty")
        if n > MAX_WORKLOADS_PER_CALL:
            raise ValidationError(f"workloads: at most {MAX_WORKLOADS_PER_CALL} per call, got {n}")
        strategy = _strategy(request.gang, request.strategy, request.preempt)  # before converting the workloads
        items, coalesce = self._items(request.workloads, request.gang)
        return self._place(items, coalesce, request.gang, strategy, request.preempt, context)

    def _place(self, items: list[PlaceItem], coalesce: bool, gang: bool, strategy: str, preempt: bool, context):
        answers = self._execute("place", (items, gang, strategy, preempt), context, n=len(items),
                                coalesce=coalesce and not preempt)
        return place_response(answers)

    @_rpc
    def Release(self, request, context):
        if not request.workload_ids:
            raise ValidationError("workload_ids must not be empty")
        if len(request.workload_ids) > MAX_WORKLOADS_PER_CALL:
            raise ValidationError(f"workload_ids: at most {MAX_WORKLOADS_PER_CALL} per call")
        for wid in request.workload_ids:
            _check_id("workload id", wid)
        released = self._execute("release", (list(request.workload_ids), request.allow_missing), context,
                                 n=len(request.workload_ids))
        return pb.ReleaseResponse(released_workload_ids=released)

    @_rpc
    def ListAllocations(self, request, context):
        return self.state.list_allocations(request.host_id, request.include_workloads, request.page_size,
                                           request.page_token)

    @_rpc
    def Explain(self, request, context):
        if not request.HasField("workload"):
            raise ValidationError("workload must be set")
        w = request.workload
        _check_id("workload id", w.id)
        self._check_dims(f"workload {w.id!r} requests", w.requests)
        model = convert.workload_to_model(convert.normalize_workload(w))
        return pb.ExplainResponse(explanation=self.state.explain(model))

    @_rpc
    def GetStatus(self, request, context):
        out = self.state.status()
        out.interrupted_plans.extend(self.state.plans.progress(self.state))
        return out

    @_rpc
    def ListVolumes(self, request, context):
        return self.state.list_volumes(request.page_size, request.page_token)

    @_rpc
    def DeleteVolume(self, request, context):
        _check_id("volume_id", request.volume_id)
        return pb.DeleteVolumeResponse(sequence=self._execute("delete_volume", (request.volume_id,), context))

    # -- rebalance -------------------------------------------------------------

    @staticmethod
    def _search_options(max_moves: int, time_limit_s: float, seed: int) -> dict:
        if max_moves < 0:
            raise ValidationError(f"max_moves must be >= 0 (0: no limit), got {max_moves}")
        if not 0 <= time_limit_s <= MAX_REBALANCE_SECONDS:  # NaN fails too
            raise ValidationError(f"time_limit_s must be in [0, {MAX_REBALANCE_SECONDS:g}] "
                                  f"(0: {DEFAULT_REBALANCE_SECONDS:g}), got {time_limit_s}")
        if not 0 <= seed <= MAX_SEED:
            raise ValidationError(f"seed must be in [0, {MAX_SEED}] (CP-SAT's random_seed), got {seed}")
        return {"max_moves": max_moves or None, "time_limit_s": time_limit_s or DEFAULT_REBALANCE_SECONDS,
                "seed": seed}

    @_rpc
    def Rebalance(self, request, context):
        goal = convert.goal(request.goal)
        options = self._search_options(request.max_moves, request.time_limit_s, request.seed)
        # A field another goal uses is refused rather than ignored.
        for field, present, owner in (("host_ids", bool(request.host_ids), "drain"),
                                      ("workload", request.HasField("workload"), "defragment"),
                                      ("targets", bool(request.targets), "balance")):
            if present and goal != owner:
                raise ValidationError(f"{field} is for goal {owner}, not {goal}")
        limits.check_count("host_ids", len(request.host_ids), MAX_HOSTS_PER_CALL)
        for h in request.host_ids:
            _check_id("host_ids", h)
        workload = None
        if request.HasField("workload"):
            w = request.workload
            _check_id("workload id", w.id)
            self._check_dims(f"workload {w.id!r} requests", w.requests)
            workload = convert.workload_to_model(convert.normalize_workload(w))
        self._check_dims("targets", request.targets)
        entry = self.state.plans.make(self.state, goal, self._deadline(context), _gone(context),
                                      hosts=list(request.host_ids) or None, workload=workload,
                                      targets=dict(request.targets) or None, **options)
        return pb.RebalanceResponse(plan=entry.proto)

    def _apply_plan(self, plan_id: str, drain_host: str | None, context) -> pb.ApplyPlanResponse:
        # Queued as a whole batch's worth of work, so that the writer runs it alone: no other
        # mutation comes between two steps, and each step's commit holds its events only.
        return self._execute("apply_plan", (plan_id, drain_host), context, n=self.state.writer.max_batch)

    @_rpc
    def ApplyPlan(self, request, context):
        _check_id("plan_id", request.plan_id)
        return self._apply_plan(request.plan_id, None, context)

    #: Plans a Drain makes when the cluster changes while it plans (each made stale by a mutation).
    DRAIN_ATTEMPTS = 3

    @_rpc
    def Drain(self, request, context):
        _check_id("host_id", request.host_id)
        options = self._search_options(request.max_moves, request.time_limit_s, request.seed)
        for attempt in range(self.DRAIN_ATTEMPTS):
            entry = self.state.plans.make(self.state, "drain", self._deadline(context), _gone(context),
                                          hosts=[request.host_id], **options)
            try:
                applied = self._apply_plan(entry.plan.id, request.host_id, context)
            except StalePlan:
                if attempt + 1 == self.DRAIN_ATTEMPTS:
                    raise
                continue
            return pb.DrainResponse(plan=entry.proto, applied=applied)

    @_rpc
    def PlanCapacity(self, request, context):
        if not request.host_types:
            raise ValidationError("host_types must not be empty")
        limits.check_count("workloads", len(request.workloads), MAX_WORKLOADS_PER_CALL)
        limits.check_count("host_types", len(request.host_types), MAX_HOSTS_PER_CALL)
        workloads, seen = [], set()
        for w in request.workloads:
            _check_id("workload id", w.id)
            if w.id in seen:
                raise ValidationError(f"workload id {w.id!r} appears twice in workloads")
            seen.add(w.id)
            self._check_dims(f"workload {w.id!r} requests", w.requests)
            workloads.append(convert.workload_to_model(convert.normalize_workload(w)))
        types = []
        for t in request.host_types:
            for field, mapping in (("capacity", t.capacity), ("reserved", t.reserved),
                                   ("allocation_ratios", t.allocation_ratios)):
                self._check_dims(f"host type {t.name[:40]!r} {field}", mapping)
            types.append(convert.host_type_to_model(t))
        with self.state.lock:  # the durable state, as every read sees it
            plan = self.state.cluster.plan_capacity(workloads, types)
        return convert.capacity_to_proto(plan)

    # -- agents --------------------------------------------------------------

    @_rpc
    def ReportStatus(self, request, context):
        self.state.health.check_report(request)
        sequence = self._execute("report", (request,), context, n=max(1, len(request.statuses)))
        return pb.ReportStatusResponse(sequence=sequence)

    # -- events --------------------------------------------------------------

    def _check_compacted(self, after: int, context) -> None:
        """OUT_OF_RANGE when events after `after` were compacted into a snapshot, naming the
        oldest sequence still available and the snapshot's (also in the trailing metadata
        as first-sequence and snapshot-sequence): list, then watch from the listing's sequence."""
        first = self.state.store.first_sequence()
        if after + 1 < first:
            snapshots = self.state.snapshots
            snap = snapshots.sequence if snapshots is not None else 0
            context.set_trailing_metadata((("first-sequence", str(first)), ("snapshot-sequence", str(snap))))
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"after_sequence {after}: events up to {first - 1} were compacted (newest snapshot at "
                          f"sequence {snap}); the oldest available is {first}: list, then watch from the "
                          "listing's sequence")

    def WatchEvents(self, request, context):
        types = set(request.types)
        bad = types - set(convert.EVENT_TYPES)
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"types must be among {sorted(convert.EVENT_TYPES)}, got {sorted(bad)}")
        incarnation = self.state.incarnation
        if request.incarnation and request.incarnation != incarnation:
            # The log was started again after losing acknowledged events: the watcher's
            # sequence numbers may name other events now.
            context.abort(grpc.StatusCode.DATA_LOSS,
                          f"incarnation {request.incarnation!r} is not the log's current one {incarnation!r}: "
                          "the log lost events and numbers were reused; list and watch again")
        after = request.after_sequence
        store = self.state.store
        while context.is_active() and not self.stopping:
            # Checked on every idle round too: a watcher waiting at a sequence the store
            # no longer holds must not wait for other events to reuse its numbers.
            last = store.last_sequence()
            if after > last:
                context.abort(grpc.StatusCode.OUT_OF_RANGE,
                              f"after_sequence {after} is beyond the last sequence {last}")
            self._check_compacted(after, context)
            try:
                records = store.read(after, 1000)
            except StoreError as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            if records and records[0].sequence != after + 1:  # compacted between the check and the read
                self._check_compacted(after, context)
            if not records:
                self.state.wait_events(after, self.watch_poll_s)
                continue
            for rec in records:
                after = rec.sequence
                if types and rec.kind not in types:
                    continue
                yield pb.WatchEventsResponse(event=pb.Event.FromString(rec.body), incarnation=incarnation)
