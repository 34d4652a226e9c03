"""What host agents report: workload statuses, heartbeats, and hosts that go DOWN.

Why a module of its own: the Cluster knows where workloads run, not whether they run.
An agent's ReportStatus says that (a status per workload, and, empty, that the agent
is alive). This module keeps the last status of each workload on its host and the
time of each host's last report; a host whose agent reported once and then stays
silent goes DOWN, and comes back to the state it had on its next report.

What is durable and what is not:
- a changed status is a STATUS event (watchers see it, replay rebuilds it); a status
  repeated unchanged by a heartbeat is not logged;
- report times are memory only: after a restart every host with an agent gets a fresh
  full period before it can go down;
- which hosts have an agent, and the state a DOWN host returns to, are kept in the
  store's metadata (AGENTS_KEY), written before the events that need them, so a
  snapshot that hides those events does not lose them.

Down-host policy (README "Agents and host health"): the containers of a host DOWN for
`reschedule_after_s` are re-placed under the normal constraints, one commit, each a
MOVED event with an empty plan_id and a reason. A container that fits nowhere stays
(and is tried again later); containers mounting volumes stay (their data is on the
host); VMs wait for their host; per-host services stay.
"""
from __future__ import annotations

import json
import logging
import threading
import time

from ..errors import NotFound, SchedulerError, StateConflict, ValidationError
from ..model import Placement
from ..store import StoreError
from ..v1 import scheduler_pb2 as pb
from . import convert
from .limits import MAX_ID_LENGTH, MAX_WORKLOADS_PER_CALL, check_count, check_id

log = logging.getLogger("hci_scheduler.server")

#: Store metadata: {"agents": [host ids whose agent has reported], "down_from": {host id: state}}.
AGENTS_KEY = "agent_hosts"
DEFAULT_DOWN_AFTER_S = 15.0
DEFAULT_RESCHEDULE_AFTER_S = 60.0
#: The longest status message kept (an engine's error can be long; listings carry it).
MAX_STATUS_MESSAGE = 4096
#: Why a workload moved off a DOWN host (Event.reason of its MOVED event).
DOWN_REASON = "host {host} down for {seconds:g} s: re-placed by the down-host policy"


def _same(a: pb.WorkloadStatus, b: pb.WorkloadStatus) -> bool:
    """Equal but for `since` (a heartbeat repeating a status is no change)."""
    return (a.state, a.exit_code, a.message, a.container_id, a.restarts, a.host_id) == \
        (b.state, b.exit_code, b.message, b.container_id, b.restarts, b.host_id)


class HostHealth:
    """Statuses and heartbeats of one server's hosts. Mutated only by the state's writer
    (under the state's lock) and by replay; read under the state's lock."""

    def __init__(self, down_after_s: float = DEFAULT_DOWN_AFTER_S,
                 reschedule_after_s: float = DEFAULT_RESCHEDULE_AFTER_S, clock=time.monotonic):
        self.down_after_s = down_after_s
        self.reschedule_after_s = reschedule_after_s
        self.clock = clock
        self.statuses: dict[tuple[str, str], pb.WorkloadStatus] = {}  # (workload id, host id) -> last status
        self.last_report: dict[str, float] = {}  # host id -> clock time of its agent's last report
        self.down_since: dict[str, float] = {}  # DOWN host id -> clock time it was seen down
        self.applied: dict[str, int] = {}  # host id -> the last event sequence its agent applied
        self.agents: set[str] = set()  # hosts whose agent has reported (durable, AGENTS_KEY)
        self.down_from: dict[str, str] = {}  # DOWN host id -> the state it returns to (durable)
        self._saved: str | None = None
        self._next_try: dict[str, float] = {}  # DOWN host id -> when the policy may try it again
        self._next_prune = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- replay and start ------------------------------------------------------

    def replay_status(self, ev: pb.Event) -> None:
        """A STATUS event read back from the log."""
        self.statuses[(ev.workload_id, ev.status.host_id or ev.host_id)] = ev.status

    def forget_statuses(self) -> None:
        """Before a replay rebuilds them (a batch the store refused may have changed them)."""
        self.statuses.clear()

    def load(self, state) -> None:
        """After replay: the durable agent set and return states, a fresh period for every
        host with an agent, and a fresh grace for every DOWN host."""
        self._saved = state.store.get_meta(AGENTS_KEY)
        saved = json.loads(self._saved) if self._saved else {}
        self.agents = set(saved.get("agents", ()))
        self.down_from = dict(saved.get("down_from", {}))
        now = self.clock()
        with state.lock:
            for h in state.cluster.hosts():
                if h.id in self.agents:
                    self.last_report[h.id] = now
                if h.state == "down":
                    self.down_since[h.id] = now
        self._statuses_behind_snapshot(state)

    def _statuses_behind_snapshot(self, state) -> None:
        """Statuses logged before the snapshot the state was restored from: a snapshot holds
        placements, not statuses, and replay read only the events after it. The log keeps
        a tail before its newest snapshot (--snapshot-tail), read here by record kind, so
        only STATUS records are decoded; one older than that tail comes back with the
        agent's next report of a change. (Snapshots holding the statuses would spare the scan.)"""
        snapshots = state.snapshots
        upto = snapshots.sequence if snapshots is not None else 0
        if not upto or not self.agents:
            return  # no agent ever reported: no STATUS record to look for (a scan of a
            # 100,000-record tail costs 0.17-0.38 s of a restart)
        older: dict[tuple[str, str], pb.WorkloadStatus] = {}
        for rec in state.store.iter_all(after=state.store.first_sequence() - 1):
            if rec.sequence > upto:
                break
            if rec.kind == pb.EVENT_TYPE_STATUS:
                ev = pb.Event.FromString(rec.body)
                older[(ev.workload_id, ev.status.host_id or ev.host_id)] = ev.status
        for key, st in older.items():
            self.statuses.setdefault(key, st)  # one the tail replayed is newer

    def _save(self, state) -> None:
        """The agent set and return states into the store's metadata, when they changed;
        called by the writer before the events that rely on them are appended."""
        value = json.dumps({"agents": sorted(self.agents), "down_from": self.down_from}, sort_keys=True)
        if value != self._saved:
            state.store.set_meta(AGENTS_KEY, value)
            self._saved = value

    # -- reads -------------------------------------------------------------------

    def status_of(self, workload_id: str, host_id: str | None) -> pb.WorkloadStatus:
        """The last status reported of a workload on its host; PENDING when none was."""
        st = self.statuses.get((workload_id, host_id)) if host_id else None
        if st is None:
            return pb.WorkloadStatus(workload_id=workload_id, host_id=host_id or "",
                                     state=pb.WORKLOAD_STATE_PENDING)
        return st

    # -- ReportStatus ------------------------------------------------------------

    def check_report(self, request: pb.ReportStatusRequest) -> None:
        """The checks that need no state (servicer thread): ids, enums, bounds, duplicates."""
        check_id("host_id", request.host_id)
        check_count("statuses", len(request.statuses), MAX_WORKLOADS_PER_CALL)
        seen = set()
        for st in request.statuses:
            check_id("statuses workload_id", st.workload_id)
            where = f"statuses[{st.workload_id[:MAX_ID_LENGTH]!r}]"
            if st.workload_id in seen:
                raise ValidationError(f"{where}: the workload appears twice in the report")
            seen.add(st.workload_id)
            if st.host_id and st.host_id != request.host_id:
                raise ValidationError(f"{where} host_id {st.host_id[:40]!r} is not the reporting host "
                                      f"{request.host_id!r}")
            if st.state not in convert.WORKLOAD_STATES:
                raise ValidationError(f"{where} state must be one of {sorted(convert.WORKLOAD_STATES)}, "
                                      f"got {st.state}")
            if len(st.message) > MAX_STATUS_MESSAGE:
                raise ValidationError(f"{where} message is longer than {MAX_STATUS_MESSAGE} characters")
            if len(st.container_id) > MAX_ID_LENGTH:
                raise ValidationError(f"{where} container_id is longer than {MAX_ID_LENGTH} characters")
            if st.restarts < 0:
                raise ValidationError(f"{where} restarts must be >= 0, got {st.restarts}")

    def report(self, state, request: pb.ReportStatusRequest, events) -> int:
        """Apply a checked report (writer thread): everything is checked against the
        placements before anything changes. Returns the sequence of the last event."""
        c = state.cluster
        host_id = request.host_id
        try:
            host = c.host(host_id)
        except NotFound:
            raise NotFound(f"host_id {host_id!r} is not registered") from None
        for st in request.statuses:
            wid = st.workload_id
            try:
                p = c.placement(wid)
            except NotFound:
                raise StateConflict(f"workload {wid!r} is not placed (status reported by host {host_id!r})") from None
            on = p.host_id == host_id if p.host_id else host_id in p.replicas
            if not on and st.state == pb.WORKLOAD_STATE_STOPPED and (wid, host_id) in self.statuses:
                continue  # a host it moved away from, which ran it, says its copy stopped
            if not on:
                raise StateConflict(f"workload {wid!r} is not placed on host {host_id!r} "
                                    f"(it is on {p.host_id or 'its per-host replicas'!r})")
        now = self.clock()
        if host_id not in self.agents or host.state == "down":
            self.agents.add(host_id)
            back = self.down_from.get(host_id, "ready") if host.state == "down" else None
            self._save(state)
            if back is not None:
                h = convert.host_to_proto(c.update_host(host_id, state=back))
                events.add(pb.EVENT_TYPE_HOST_UPDATED, host_id, host=h)
                self.down_since.pop(host_id, None)
                self._next_try.pop(host_id, None)
                log.info("host back", extra={"fields": {"host": host_id, "state": back}})
        ns = time.time_ns()
        for st in request.statuses:
            key = (st.workload_id, host_id)
            old = self.statuses.get(key)
            new = pb.WorkloadStatus()
            new.CopyFrom(st)
            new.host_id = host_id
            if old is not None and _same(old, new):
                continue
            if not new.HasField("since"):
                new.since.FromNanoseconds(ns)
            self.statuses[key] = new
            events.add(pb.EVENT_TYPE_STATUS, host_id, st.workload_id, status=new)
        self.last_report[host_id] = now
        self.applied[host_id] = request.applied_sequence
        if state.metrics is not None:
            state.metrics.status_report(len(request.statuses))
        return events.seq

    # -- hosts going DOWN ------------------------------------------------------------

    def silent(self, state) -> list[str]:
        """Hosts whose agent reported once and has been silent down_after_s (not DOWN yet)."""
        now = self.clock()
        with state.lock:
            c = state.cluster
            out = []
            for hid, t in self.last_report.items():
                if now - t >= self.down_after_s:
                    try:
                        if c.host(hid).state != "down":
                            out.append(hid)
                    except NotFound:
                        pass
            return out

    def mark_down(self, state, host_ids: list[str], events) -> list[str]:
        """Set silent hosts DOWN (writer thread), each checked again: a report may have
        come in since they were picked."""
        c = state.cluster
        now = self.clock()
        down = []
        for hid in host_ids:
            t = self.last_report.get(hid)
            if t is None or now - t < self.down_after_s:
                continue
            try:
                h = c.host(hid)
            except NotFound:
                self.last_report.pop(hid, None)
                continue
            if h.state == "down":
                continue
            self.down_from[hid] = h.state
            down.append((hid, h.state))
        if not down:
            return []
        self._save(state)
        for hid, before in down:
            h = convert.host_to_proto(c.update_host(hid, state="down"))
            events.add(pb.EVENT_TYPE_HOST_UPDATED, hid, host=h)
            self.down_since[hid] = now
            log.warning("host down: its agent is silent", extra={"fields": {
                "host": hid, "silent_s": round(now - self.last_report[hid], 1), "was": before}})
        if state.metrics is not None:
            state.metrics.hosts_marked_down(len(down))
        return [hid for hid, _ in down]

    def operator_state(self, state, host_id: str, wanted: str) -> str:
        """The state UpdateHost may set now: a DOWN host stays DOWN and returns to `wanted`."""
        h = state.cluster.host(host_id)
        if h.state != "down":
            return wanted
        self.down_from[host_id] = wanted
        self._save(state)
        return "down"

    # -- the down-host policy ----------------------------------------------------------

    def due(self, state) -> list[str]:
        """DOWN hosts past the grace whose containers may move."""
        if self.reschedule_after_s <= 0:
            return []
        now = self.clock()
        with state.lock:
            return [hid for hid, t in self.down_since.items()
                    if now - t >= self.reschedule_after_s and now >= self._next_try.get(hid, 0.0)
                    and self._movable(state, hid)]

    @staticmethod
    def _movable(state, host_id: str) -> list:
        """(workload id, spec) of the containers on a host that the policy moves: no VM,
        no per-host service (not in placements(host)), no volume."""
        c = state.cluster
        try:
            on_host = c.placements(host_id)
        except NotFound:
            return []
        out = []
        for p in on_host:
            known = state._placed.get(p.workload_id)
            if known is None:
                continue
            w = pb.Workload.FromString(known[1])
            if w.kind == pb.WORKLOAD_KIND_VM or w.per_host or w.volume_ids or w.new_volumes:
                continue
            out.append((p.workload_id, w))
        return out

    def reschedule(self, state, host_ids: list[str], events) -> list[pb.Placement]:
        """Re-place the movable containers of DOWN hosts past their grace (writer thread),
        one by one: release, place under the normal constraints (a DOWN host takes
        nothing), and put back on its host what fits nowhere else."""
        c = state.cluster
        now = self.clock()
        moved = []
        for hid in host_ids:
            since = self.down_since.get(hid)
            try:
                if since is None or now - since < self.reschedule_after_s or c.host(hid).state != "down":
                    continue
            except NotFound:
                self.down_since.pop(hid, None)
                continue
            reason = DOWN_REASON.format(host=hid, seconds=self.reschedule_after_s)
            # What stays (fits nowhere else) is tried again one grace later, not every tick.
            self._next_try[hid] = now + self.reschedule_after_s
            n_before = len(moved)
            for wid, w in self._movable(state, hid):
                model = convert.workload_to_model(w)
                if not c.explain(model).feasible:
                    continue  # fits nowhere else now: stays, tried again next round
                c.release(wid)
                try:
                    target = c.place_batch([model]).placements.get(wid)
                except SchedulerError:
                    target = None
                if target is None:
                    self._put_back(c, model, hid)
                    continue
                events.add(pb.EVENT_TYPE_MOVED, target, wid, source_host_id=hid, reason=reason)
                moved.append(pb.Placement(workload_id=wid, host_id=target, sequence=state._placed[wid][0]))
            if len(moved) > n_before:
                log.warning("containers re-placed off a down host", extra={"fields": {
                    "host": hid, "moved": len(moved) - n_before}})
        if state.metrics is not None and moved:
            state.metrics.rescheduled(len(moved))
        return moved

    def _put_back(self, c, model, host_id: str) -> None:
        """A released container that fitted elsewhere by `explain` but not once released (its
        own affinity, say) goes back where it was: the host is made schedulable for the
        restore (a DOWN host takes nothing), nothing else changed meanwhile."""
        c.update_host(host_id, state=self.down_from.get(host_id, "ready"))
        try:
            c.restore(model, Placement(model.id, host_id))
        finally:
            c.update_host(host_id, state="down")

    @staticmethod
    def replay_moved(state, ev: pb.Event) -> None:
        """A MOVED event of the down-host policy (no plan) read back from the log."""
        known = state._placed.get(ev.workload_id)
        if known is None:
            raise StoreError(f"event {ev.sequence}: MOVED of workload {ev.workload_id!r}, which is not placed")
        c = state.cluster
        model = convert.workload_to_model(pb.Workload.FromString(known[1]))
        c.release(ev.workload_id)
        try:
            c.restore(model, Placement(ev.workload_id, ev.host_id))
        except SchedulerError as exc:
            raise StoreError(f"event {ev.sequence}: move of {ev.workload_id!r} to {ev.host_id!r} does not "
                             f"replay: {exc}") from exc

    # -- the monitor thread --------------------------------------------------------------

    def start(self, state) -> None:
        """Check for silent hosts and due reschedules every tick, through the writer."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(state,), name="host-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def tick_s(self) -> float:
        return max(0.05, min(1.0, self.down_after_s / 5))

    def _run(self, state) -> None:
        while not self._stop.wait(self.tick_s()):
            try:
                self.tick(state)
            except SchedulerError as exc:  # a store refusing writes, a closing writer: next tick
                log.warning("host health check failed", extra={"fields": {"error": str(exc)}})
            except Exception:  # noqa: BLE001 - the monitor must outlive one bad round
                log.exception("host health check failed")

    def tick(self, state) -> None:
        """One round: while the store refuses writes, nobody can report, so every host
        gets a fresh period instead of going down for the store's silence."""
        if state.unwritable_reason is not None or state.broken is not None:
            now = self.clock()
            with state.lock:
                for hid in self.last_report:
                    self.last_report[hid] = now
                for hid in self.down_since:
                    self.down_since[hid] = now
            return
        silent = self.silent(state)
        if silent:
            state.execute("mark_down", (silent,))
        due = self.due(state)
        if due:
            state.execute("reschedule_down", (due,))
        self._prune(state)

    #: Seconds between two prunes of the statuses (a scan of every status).
    PRUNE_EVERY_S = 30.0

    def _prune(self, state) -> None:
        """Forget statuses of workloads no longer on the host they were reported on (listings
        never show them: they look a status up by the workload's current host)."""
        now = self.clock()
        if not self.statuses or now < self._next_prune:
            return
        self._next_prune = now + self.PRUNE_EVERY_S
        with state.lock:
            c = state.cluster
            gone = []
            for key in list(self.statuses):
                wid, hid = key
                try:
                    p = c.placement(wid)
                except NotFound:
                    gone.append(key)
                    continue
                if p.host_id != hid and hid not in p.replicas:
                    gone.append(key)
            for key in gone:
                del self.statuses[key]

