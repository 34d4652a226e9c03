"""Rebalance plans in the server: a registry by id, and their apply through the writer.

Why this shape:

- A plan is made outside the writer (the search runs on the calling thread for up to its
  time limit; the Cluster holds its own lock only while compiling) and applied inside it:
  ApplyPlan is one writer operation, alone in its batch, that applies the steps in order
  under the state's lock and commits each step's events before the next step starts. A
  crash therefore leaves whole steps in the log, never part of one (one step, one commit),
  and no other mutation runs between two steps of a plan.
- The log says which steps are done: PLAN_STARTED carries the plan and the first step of
  the run, the MOVED events of each step follow in one commit, PLAN_APPLIED closes the run.
  Replay applies a step once all its MOVED events are read, through `Cluster.apply_step`,
  the path a live apply takes. A run with no PLAN_APPLIED was interrupted: ApplyPlan
  continues it if every remaining move's workload is still on its source.
- A plan applies only to the state it was made for: the same Cluster object (a store that
  refused a batch makes the state rebuild it) at the same `Cluster.version`.
- Interrupted plans outlive snapshots: a snapshot holds placements, not plans, and a start
  from it replays only the log after it, so the interrupted plans are also kept in the
  store's metadata (INTERRUPTED_KEY), written inside the writer whenever their set
  changes, before the events that change it; what the log's tail says of a plan wins.
- Bounded: the last MAX_PLANS plans made or applied are kept, plus every interrupted one
  until it completes; a restart knows the interrupted plans and those its log's tail applied.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from ..errors import NotFound, SchedulerError, StateConflict
from ..store import StoreError
from ..v1 import scheduler_pb2 as pb
from . import convert
from .writer import DeadlineExpired

log = logging.getLogger("hci_scheduler.server")

#: Plans kept for ApplyPlan besides the interrupted ones (older ones are NOT_FOUND).
MAX_PLANS = 64
#: Searches that run at once; more wait their turn. A search takes a core for up to its time
#: limit, and placements, the server's hot path, must keep theirs.
MAX_SEARCHES = 1
#: Calls that may wait for their turn; more are refused (RESOURCE_EXHAUSTED): each waiting call
#: holds a thread of the server's (a pool worker, or a poller of the lean transport).
MAX_SEARCH_WAITERS = 4
#: The store metadata key of the interrupted plans (JSON: plan bytes in base64, steps done, reason).
INTERRUPTED_KEY = "interrupted_plans"


class StalePlan(StateConflict):
    """The cluster changed since the plan was made; plan again."""


class SearchCancelled(SchedulerError):
    """The caller went away (cancelled, or its deadline passed) while its search ran."""


class SearchesBusy(SchedulerError):
    """Searches are running and as many calls already wait for their turn; retry later."""


class CommitFailed(RuntimeError):
    """The store failed in the middle of a plan (not a refusal of writes): like a failed
    commit of any batch, it stops the writer. Deliberately not a SchedulerError, which
    the writer would report to the caller and carry on past."""


@dataclass
class PlanEntry:
    """A plan and what became of it.

    cluster is a weak reference to the Cluster the plan was made for (None for a plan read
    from the log: only a continuation applies it);
    steps_done the steps applied and durable; running says a run started (PLAN_STARTED)
    and did not finish, which, seen from outside the writer, means it was interrupted;
    outcome is the answer every repeat of ApplyPlan gets once the plan is applied or
    refused at its start.
    """

    plan: object
    proto: pb.RebalancePlan
    cluster: weakref.ref | None = None
    steps_done: int = 0
    running: bool = False
    reason: str = ""
    outcome: pb.ApplyPlanResponse | SchedulerError | None = None

    @property
    def steps_total(self) -> int:
        return len(self.plan.steps)


class PlanRegistry:
    """Plans by id (see the module docstring). Entries change only in the writer, under
    the state's lock; the registry's own lock guards the mapping for the other threads."""

    def __init__(self, max_plans: int = MAX_PLANS):
        self.max_plans = max_plans
        self._entries: OrderedDict[str, PlanEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: list = []  # replay: the MOVED events read of the step being replayed
        self._saved: str | None = None  # the interrupted plans as last read from or written to the store
        self._searches = threading.BoundedSemaphore(MAX_SEARCHES)
        self._calls = 0  # calls in make(): searching or waiting for their turn

    # -- the mapping -----------------------------------------------------------------

    def _add(self, entry: PlanEntry) -> None:
        with self._lock:
            self._entries[entry.plan.id] = entry
            self._entries.move_to_end(entry.plan.id)
            excess = len(self._entries) - self.max_plans
            for pid in [p for p, e in self._entries.items() if not e.running][:max(excess, 0)]:
                del self._entries[pid]

    def get(self, plan_id: str) -> PlanEntry:
        with self._lock:
            entry = self._entries.get(plan_id)
        if entry is None:
            raise NotFound(f"plan_id {plan_id!r} is unknown: the server keeps the last {self.max_plans} plans "
                           "and those a restart found interrupted; plan again")
        return entry

    def interrupted(self) -> list[PlanEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.running]

    # -- making a plan (any thread) -------------------------------------------------------

    def make(self, state, goal: str, deadline: float | None = None, gone=None, **options) -> PlanEntry:
        """Search a plan for `goal` on the state's cluster (`Cluster.rebalance` options) and
        keep it; one search at a time (MAX_SEARCHES), waiting at most until `deadline` (a
        time.monotonic() value) for its turn, behind at most MAX_SEARCH_WAITERS others
        (SearchesBusy past them). `gone()` says the caller went away: the search then stops
        at its next progress report (SearchCancelled) and frees the turn. The state may change
        while it searches: ApplyPlan then refuses the plan."""
        with self._lock:
            if self._calls >= MAX_SEARCHES + MAX_SEARCH_WAITERS:
                raise SearchesBusy(f"{MAX_SEARCHES} search(es) run and {MAX_SEARCH_WAITERS} wait already; "
                                   "retry later")
            self._calls += 1
        try:
            self._search_turn(deadline)
        except BaseException:
            with self._lock:
                self._calls -= 1
            raise
        try:
            with state.lock:  # what the reads see is durable
                cluster, sequence, version = state.cluster, state.sequence, state.cluster.version
            if gone is not None:
                options["progress"] = _stop_when(gone)
            plan = cluster.rebalance(goal, **options)
        finally:
            self._searches.release()
            with self._lock:
                self._calls -= 1
        return self.keep(state, plan, cluster, sequence if plan.base_version == version else None)

    def _search_turn(self, deadline: float | None) -> None:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self._searches.acquire(timeout=-1 if wait is None else wait):
            raise DeadlineExpired("deadline passed while the search waited for the one before it")

    def keep(self, state, plan, cluster, sequence: int | None = None) -> PlanEntry:
        """Keep a plan made on `cluster` (the state's, at `plan.base_version`) for ApplyPlan:
        what Rebalance does with a plan it made, and what a program embedding the server does
        with one it made itself (another cost model, say). `sequence` is the event sequence
        of the state it was made for; None: the state's now, if still at that version, else 0."""
        if sequence is None:
            with state.lock:
                current = state.cluster is cluster and cluster.version == plan.base_version
                sequence = state.sequence if current else 0
        entry = PlanEntry(plan, convert.plan_to_proto(plan, sequence), weakref.ref(cluster))
        self._add(entry)
        return entry

    # -- applying (the writer, under the state's lock) ------------------------------------

    def apply(self, state, plan_id: str, events, drain_host: str | None = None) -> pb.ApplyPlanResponse:
        """Apply (or continue) a plan, each step durable before the next; see ApplyPlan."""
        entry = self.get(plan_id)
        if entry.outcome is not None:  # idempotent: the first answer
            if isinstance(entry.outcome, SchedulerError):
                raise entry.outcome
            return entry.outcome
        cluster, plan = state.cluster, entry.plan
        n, start = entry.steps_total, entry.steps_done
        undo_drain = None  # the state a drained host had before this call set it draining
        was_running = entry.running
        if plan.unordered:
            entry.outcome = StateConflict(f"plan {plan_id} cannot be applied: its moves could not be ordered "
                                          f"into feasible steps ({plan.unordered})")
            raise entry.outcome
        if entry.running:
            self._check_sources(cluster, entry)
        else:
            made_for = entry.cluster() if entry.cluster is not None else None
            if made_for is not cluster or plan.base_version != cluster.version:
                entry.outcome = StalePlan(
                    f"plan {plan_id} was made for cluster version {plan.base_version}, the cluster is at "
                    f"version {cluster.version}: it changed since; plan again" if made_for is cluster else
                    f"plan {plan_id} was made for a state the server has since rebuilt from its log; plan again")
                raise entry.outcome
            if drain_host is not None and (was := cluster.host(drain_host).state) != "draining":
                host = convert.host_to_proto(cluster.update_host(drain_host, state="draining"))
                events.add(pb.EVENT_TYPE_HOST_UPDATED, drain_host, host=host)
                undo_drain = was
        # A continuation resumes: the log says which steps are done (sources are checked move by
        # move). So does a drain past its host update, the one change since planning (and the
        # drain plan already kept the host out of every destination).
        resume = entry.running or undo_drain is not None
        for i, k in enumerate(range(start, n)):
            try:
                cluster.apply_step(plan, k, resume=resume and i == 0)  # a refused step is undone
            except StateConflict as exc:
                if i == 0:  # nothing of this call is applied
                    if undo_drain is not None:  # nor the drain's host update
                        cluster.update_host(drain_host, state=undo_drain)
                        events.records.pop()
                        events.seq -= 1
                    if not entry.running:
                        entry.outcome = exc
                    raise
                entry.reason = f"step {k} was refused: {exc}"
                self._save(state)
                log.error(f"plan {plan_id} interrupted after step {k} of {n}", extra={"fields": {
                    "plan_id": plan_id, "steps_done": k, "steps_total": n, "reason": str(exc)}})
                raise StateConflict(f"plan {plan_id} stopped after step {k} of {n}: {exc}; ApplyPlan continues "
                                    "it once the move fits") from None
            if i == 0:
                events.add(pb.EVENT_TYPE_PLAN_STARTED, plan_id=plan_id, plan_step=start, plan=entry.proto)
                entry.running = True
            for m in plan.steps[k]:
                events.add(pb.EVENT_TYPE_MOVED, m.target, m.workload_id, source_host_id=m.source,
                           plan_id=plan_id, plan_step=k)
            try:
                state._commit_now(events)  # durable before the next step starts
            except SchedulerError as exc:  # the store refuses writes: the state was rebuilt from the log
                if i == 0:  # the log has not heard of this run
                    entry.running, entry.steps_done = was_running, start
                # else the rebuild replayed this run's steps before k: steps_done is the log's
                entry.reason = f"the store refused step {k}: {exc}"
                raise
            entry.steps_done = k + 1
        entry.running = False
        entry.reason = ""
        self._save(state)  # before PLAN_APPLIED is durable: a crash between leaves the log's word
        sequence = events.add(pb.EVENT_TYPE_PLAN_APPLIED, plan_id=plan_id) if n else 0
        entry.outcome = _response(state, entry, sequence)
        return entry.outcome

    @staticmethod
    def _check_sources(cluster, entry: PlanEntry) -> None:
        """Every workload of the remaining steps is where its first remaining move takes it from."""
        first: dict[str, tuple[int, str]] = {}
        for k in range(entry.steps_done, entry.steps_total):
            for m in entry.plan.steps[k]:
                first.setdefault(m.workload_id, (k, m.source))
        wrong = []
        for wid, (k, source) in first.items():
            try:
                now = cluster.placement(wid).host_id
            except NotFound:
                now = None
            if now != source:
                wrong.append(f"{wid} (step {k} moves it from {source}; it "
                             + ("is not placed" if now is None else f"runs on {now}") + ")")
        if wrong:
            raise StateConflict(
                f"plan {entry.plan.id} cannot continue after step {entry.steps_done} of {entry.steps_total}: "
                f"{len(wrong)} workload(s) of its remaining moves left their source: " + "; ".join(wrong[:10])
                + (" ..." if len(wrong) > 10 else ""))

    # -- replay (the state's _apply) ------------------------------------------------------

    def replay(self, state, ev: pb.Event) -> None:
        """One logged event of a plan's apply, fed back in order."""
        t = ev.type
        if t == pb.EVENT_TYPE_PLAN_STARTED:
            self._no_partial_step(ev)
            with self._lock:
                entry = self._entries.get(ev.plan_id)
            if entry is None:  # else a plan this process made or read before: the same plan
                entry = PlanEntry(convert.plan_from_proto(ev.plan), ev.plan)
            entry.running, entry.steps_done, entry.outcome = True, ev.plan_step, None
            entry.reason = "the server stopped before the plan's last step"
            self._add(entry)
            return
        entry = self._running(ev)
        if t == pb.EVENT_TYPE_MOVED:
            k = ev.plan_step
            if k != entry.steps_done or k >= entry.steps_total:
                raise StoreError(f"event {ev.sequence}: MOVED of step {k} of plan {ev.plan_id}, "
                                 f"which is at step {entry.steps_done} of {entry.steps_total}")
            self._pending.append((ev.workload_id, ev.source_host_id, ev.host_id))
            step = entry.plan.steps[k]
            if len(self._pending) < len(step):
                return  # one step is one commit: its other moves follow
            moved, self._pending = self._pending, []
            if moved != [(m.workload_id, m.source, m.target) for m in step]:
                raise StoreError(f"event {ev.sequence}: the MOVED events of step {k} of plan {ev.plan_id} are "
                                 "not the moves its PLAN_STARTED event lists")
            try:
                state.cluster.apply_step(entry.plan, k, resume=True)
            except SchedulerError as exc:
                raise StoreError(f"event {ev.sequence}: step {k} of plan {ev.plan_id} does not replay: {exc}") from exc
            entry.steps_done += 1
        elif t == pb.EVENT_TYPE_PLAN_APPLIED:
            self._no_partial_step(ev)
            entry.running, entry.reason = False, ""
            entry.outcome = _response(state, entry, ev.sequence)

    def _running(self, ev: pb.Event) -> PlanEntry:
        with self._lock:
            entry = self._entries.get(ev.plan_id)
        if entry is None or not entry.running:
            raise StoreError(f"event {ev.sequence}: {pb.EventType.Name(ev.type)} of plan {ev.plan_id!r}, "
                             "which no PLAN_STARTED before it began")
        return entry

    def _no_partial_step(self, ev: pb.Event) -> None:
        if self._pending:
            raise StoreError(f"event {ev.sequence}: a step of {len(self._pending)} MOVED event(s) before it "
                             "is incomplete (a step is committed whole)")

    # -- read-outs ----------------------------------------------------------------------

    def progress(self, state) -> list[pb.PlanProgress]:
        """The interrupted plans, for GetStatus."""
        with state.lock:
            return [pb.PlanProgress(plan_id=e.plan.id, steps_done=e.steps_done, steps_total=e.steps_total,
                                    reason=e.reason) for e in self.interrupted()]

    def _save(self, state) -> None:
        """The interrupted plans into the store's metadata, when their set changed. A store
        that refuses the write leaves the old value: the log's tail still says what happened
        (the events that changed the set are not durable before this either)."""
        value = json.dumps([{"plan": base64.b64encode(e.proto.SerializeToString()).decode(),
                             "steps_done": e.steps_done, "reason": e.reason} for e in self.interrupted()])
        if value == (self._saved or "[]"):
            return
        try:
            state.store.set_meta(INTERRUPTED_KEY, value)
        except StoreError as exc:
            log.error("interrupted plans not saved", extra={"fields": {"reason": str(exc)}})
            return
        self._saved = value

    def recovered(self, state) -> None:
        """At start, once the log is replayed: the interrupted plans its tail did not mention
        come back from the store's metadata (a snapshot hid their events), the metadata is
        brought up to date, and the log says which plans were interrupted after which step."""
        self._saved = state.store.get_meta(INTERRUPTED_KEY)
        with state.lock:
            for item in json.loads(self._saved or "[]"):
                proto = pb.RebalancePlan.FromString(base64.b64decode(item["plan"]))
                with self._lock:
                    known = proto.id in self._entries
                if not known:  # else the tail replayed it: the log's word
                    self._add(PlanEntry(convert.plan_from_proto(proto), proto, steps_done=int(item["steps_done"]),
                                        running=True, reason=str(item["reason"])))
            self._save(state)
        for e in self.interrupted():
            log.warning(f"plan {e.plan.id} interrupted after step {e.steps_done} of {e.steps_total}",
                        extra={"fields": {"plan_id": e.plan.id, "steps_done": e.steps_done,
                                          "steps_total": e.steps_total, "reason": e.reason}})


def _stop_when(gone):
    """A search progress callback that stops the search once `gone()`."""
    def progress(fraction: float, best: int) -> None:
        if gone():
            raise SearchCancelled(f"the caller went away at {100 * fraction:.0f}% of the search")

    return progress


def _response(state, entry: PlanEntry, sequence: int) -> pb.ApplyPlanResponse:
    """What an applied plan did: where each moved workload runs now (its last move)."""
    final = {m.workload_id: m.target for step in entry.plan.steps for m in step}
    placed = state._placed
    return pb.ApplyPlanResponse(
        plan_id=entry.plan.id, steps_applied=entry.steps_total, sequence=sequence,
        placements=[pb.Placement(workload_id=w, host_id=h, sequence=placed[w][0] if w in placed else 0)
                    for w, h in final.items()])
