"""The agent: one per Docker host; makes the scheduler's placements on that host run.

    hci-scheduler agent --scheduler ADDR --docker-host unix:///var/run/docker.sock --host-id ID

Level-triggered, after kubelet's PLEG: the desired state (the workloads the event log puts on
this host) is kept from `WatchEvents`; the actual state is the engine's containers labelled
with this host's id, relisted every --relist-s seconds (Docker's event stream only wakes the
loop early). Any difference marks a workload dirty, and a pool of workers brings each dirty
workload to its desired state, one workload at a time per worker: start, adopt, replace, stop,
restart by policy, and report the outcome with ReportStatus. An empty report every
--heartbeat-s seconds is the heartbeat that keeps the host out of DOWN.

Moves (ApplyPlan's MOVED events): the target starts the workload and the source stops it once
the target reports it RUNNING (a STATUS event); a workload that must not run twice
(single_instance) and every VM (a cold migration from the same disk) stops on the source first
and starts on the target once the source reports it STOPPED. Either side gives up waiting
after --move-timeout-s (the other agent may be dead). Between two agents that both run with
--migration-listen, a VM moves live instead (migration.py): the target starts qemu with
-incoming, the source migrates the running guest to it and then reports it STOPPED; if that
fails, the source stops it and the target starts it cold from its disk.
"""

from __future__ import annotations

import heapq
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import grpc

from ..errors import ValidationError
from ..v1 import scheduler_pb2 as pb
from . import hostinfo, migration, runtime, statefile
from .runtime import LABEL_RESTARTS, ContainerState, HostFacts, Runtime

log = logging.getLogger("hci_scheduler.agent")

RESYNC_CODES = (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS)
#: Seconds a live migration's target waits, after the source reported it migrated, for its
#: qemu to leave "inmigrate" (the last state may still be loading) before starting cold.
INCOMING_GRACE_S = 10.0
MIGRATED_LIVE = "migrated live to "  # the source's STOPPED message after a live migration
MAX_BACKOFF_S = 300.0  # restart backoff: base doubling to this, with jitter (kubelet)
REPORT_BATCH = 500  # statuses per ReportStatus call


@dataclass
class AgentConfig:
    scheduler: str
    docker_host: str
    host_id: str
    labels: dict[str, str]
    state_dir: str
    heartbeat_s: float = 5.0
    vm_image: str = ""
    relist_s: float = 2.0
    restart_backoff_s: float = 10.0
    move_timeout_s: float = 60.0
    workers: int = 8
    stop_timeout_s: int = runtime.STOP_TIMEOUT_S
    engine_timeout_s: float = 60.0
    volumes_dir: str = ""
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    rpc_timeout_s: float = 30.0
    migration_listen: str = ""  # HOST:PORT: VMs move live between agents that both listen
    accel: str = "auto"  # "tcg": qemu emulates even where /dev/kvm works (the kvm label stays true)


@dataclass
class Desired:
    """A workload the log puts on this host."""

    spec: pb.Workload
    spec_bytes: bytes
    hash: str
    numa_node: int = -1  # the NUMA node of record (Placement.numa_node), -1 none
    wait_for: str = ""  # a move's source host that must report the workload stopped first
    wait_until: float = 0.0  # monotonic: when to stop waiting for it
    live_from: str = ""  # a VM moving here live: its source host (see _sync_incoming)
    source_stopped: str | None = None  # the source's STOPPED message, once it came
    source_stopped_at: float = 0.0  # monotonic: when it came

    @classmethod
    def of(cls, spec_bytes: bytes, numa_node: int = -1) -> "Desired":
        w = pb.Workload.FromString(spec_bytes)
        return cls(w, spec_bytes, runtime.spec_hash(spec_bytes), numa_node)


def _numa_of(msg) -> int:
    """The NUMA node a Placement or an Event records, -1 when none."""
    return msg.numa_node if msg.HasField("numa_node") and msg.numa_node >= 0 else -1


@dataclass
class Leaving:
    """A workload moved away: its container runs until the target runs it (or at once)."""

    target: str
    until: float  # monotonic deadline
    stop_now: bool
    live: bool = False  # a VM to migrate live first, if the target listens (see _migrate_out)
    migrated: bool = False  # the live migration completed


def _names_first_sequence(exc: grpc.RpcError) -> bool:
    """Whether an OUT_OF_RANGE says the log was compacted past the watch (its trailers name
    the oldest sequence), rather than that the replica has not reached it yet."""
    return any(k == "first-sequence" for k, _ in exc.trailing_metadata() or ())


def _must_not_run_twice(w: pb.Workload) -> bool:
    return runtime.is_vm(w) or w.container.single_instance


def _restart_wanted(w: pb.Workload, exit_code: int) -> bool:
    policy = w.container.restart_policy
    if policy == pb.RESTART_POLICY_ALWAYS:
        return True
    if policy == pb.RESTART_POLICY_NEVER:
        return False
    return exit_code != 0  # ON_FAILURE, the default


class Agent:
    """The agent's loops. `run()` blocks until `stop()`; containers keep running after it."""

    def __init__(self, config: AgentConfig):
        import docker

        from ..client import SchedulerClient

        self.cfg = config
        self.sched = self._client(config.scheduler)
        # Unary calls follow the leader (SchedulerClient, on UNAVAILABLE and its hci-leader
        # trailer); the watch has a client per replica, since any replica serves WatchEvents
        # from the log: it moves on when its replica fails (see _watch_loop).
        self._watch_clients: dict[str, SchedulerClient] = {}
        self.watch_address = self.sched.addresses[0]
        # Every engine call has a timeout (kubernetes #94829); the event stream has its own client
        # without one, and the pool is sized to the workers (docker-py's 10 starves: #1636).
        self.docker = docker.DockerClient(
            base_url=config.docker_host,
            timeout=config.engine_timeout_s,
            max_pool_size=config.workers + 4,
        )
        self.docker_events = docker.DockerClient(base_url=config.docker_host, timeout=None)
        self.runtime = Runtime(self.docker, config.host_id, config.stop_timeout_s)
        self.lock = threading.RLock()
        self.desired: dict[str, Desired] = {}
        self.leaving: dict[str, Leaving] = {}
        self.sequence = 0
        self.incarnation = ""
        self._stop = threading.Event()
        self._dirty: set[str] = set()
        self._busy: set[str] = set()
        self._queue_cv = threading.Condition()
        self._timers: list[tuple[float, str]] = []  # (monotonic due, workload id)
        self._reports: dict[str, pb.WorkloadStatus] = {}  # latest unsent status per workload
        self._report_cv = threading.Condition()
        self._reported: dict[str, tuple] = {}  # workload id -> last status key sent
        self._failed: dict[
            str, str
        ] = {}  # workload id -> spec hash that failed to start (no retry loop)
        self._exit_seen: dict[str, float] = {}  # container id -> monotonic time its exit was seen
        self._seen_states: dict[str, str] = {}  # container id -> state at the last relist
        self._state_dirty = False
        self._synced = threading.Event()  # set after the first full relist
        self._reconciled = threading.Event()  # set once the first full relist's work is done
        self._started_at = time.monotonic()
        self.counts = {"adopted": 0, "started": 0, "removed": 0, "restarted": 0}
        self.last_relist = 0.0
        self.facts: HostFacts | None = None
        self._watch_call = None
        self._engine_stream = None
        self.migration = None  # a migration.MigrationListener with --migration-listen
        self._threads: list[threading.Thread] = []

    def _client(self, address: str):
        from ..client import SchedulerClient

        c = self.cfg
        return SchedulerClient(
            address,
            token=c.token,
            tls_ca=c.tls_ca,
            tls_cert=c.tls_cert,
            tls_key=c.tls_key,
            tls_server_name=c.tls_server_name,
            timeout=c.rpc_timeout_s,
        )

    # -- start-up ----------------------------------------------------------------------

    def register(self) -> None:
        """Register the host from `docker info` (labels updated when it exists)."""
        labels = dict(self.cfg.labels)
        if self.migration is not None:  # peers find the listener here (live migration)
            labels[migration.ADDRESS_LABEL] = self.migration.address
        eh = hostinfo.engine_host(self.docker, self.cfg.docker_host, labels)
        if not eh.kvm:
            log.warning("kvm=false: %s", eh.kvm_reason)
        elif self.cfg.accel == "tcg":
            log.warning("--accel tcg: VMs run under TCG although /dev/kvm works here")
        volumes = self.cfg.volumes_dir or os.path.join(self.cfg.state_dir, "volumes")
        self.facts = HostFacts(
            self.cfg.host_id,
            eh.kvm and self.cfg.accel != "tcg",
            self.cfg.vm_image,
            volumes,
            os.path.join(self.cfg.state_dir, "q"),
            eh.storage_limit,
            eh.numa_cpus,
        )
        host = pb.Host(
            id=self.cfg.host_id,
            capacity=eh.capacity,
            labels=eh.labels,
            numa_nodes=[pb.NumaNode(resources=r) for r in eh.numa_resources],
        )
        try:
            self.sched.register_hosts([host])
            log.info("registered host %s: %s", self.cfg.host_id, dict(eh.capacity))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            registered = self.sched.update_host(self.cfg.host_id, labels=eh.labels).host
            log.info("host %s exists: labels updated", self.cfg.host_id)
            if len(registered.numa_nodes) > len(eh.numa_cpus):
                log.warning(
                    "host %s is registered with %d NUMA nodes, this engine host has %d (%s): a VM "
                    "charged to a node it lacks is pinned by runtime.numa_pin's rule",
                    self.cfg.host_id,
                    len(registered.numa_nodes),
                    len(eh.numa_cpus),
                    ",".join(map(str, sorted(eh.numa_cpus))) or "none reported",
                )

    def _resync(self) -> None:
        """Desired state from scratch: a listing of this host's allocations, then the watch
        continues after the listing's sequence."""
        status = self.sched.status()
        listing = self.sched.allocations(self.cfg.host_id, include_workloads=True)
        specs, numa = {}, {}
        for p in listing:
            if p.host_id == self.cfg.host_id or self.cfg.host_id in p.replica_host_ids:
                specs[p.workload_id] = p.workload.SerializeToString(deterministic=True)
                numa[p.workload_id] = _numa_of(p)
        with self.lock:
            old = set(self.desired)
            self.desired = {wid: Desired.of(b, numa[wid]) for wid, b in specs.items()}
            self.sequence = listing.sequence or status.last_sequence
            self.incarnation = status.incarnation
            self._state_dirty = True
        self._mark(old | set(specs))
        log.info("resynced from a listing: %d workloads at sequence %d", len(specs), self.sequence)

    def _load_state(self) -> bool:
        saved = statefile.load(self.cfg.state_dir)
        if saved is None:
            return False
        if saved.numa is None and saved.specs:
            # Written by an agent that kept no NUMA nodes: a listing names them, where
            # resuming would take every pinned VM for one pinned elsewhere and replace it.
            log.info("state file without NUMA nodes of record: relisting")
            return False
        with self.lock:
            self.desired = {wid: Desired.of(b, saved.numa.get(wid, -1)) for wid, b in saved.specs.items()}
            self.sequence, self.incarnation = saved.sequence, saved.incarnation
        self._mark(set(saved.specs))
        log.info("resuming at sequence %d with %d workloads", saved.sequence, len(saved.specs))
        return True

    def _save_state(self) -> None:
        with self.lock:
            if not self._state_dirty:
                return
            state = statefile.AgentState(
                self.sequence,
                self.incarnation,
                {w: d.spec_bytes for w, d in self.desired.items()},
                {w: d.numa_node for w, d in self.desired.items() if d.numa_node >= 0},
            )
            self._state_dirty = False
        statefile.save(self.cfg.state_dir, state)

    # -- the loops -----------------------------------------------------------------------

    def run(self) -> None:
        if self.cfg.migration_listen and self.migration is None:
            self.migration = migration.MigrationListener(
                self.cfg.migration_listen, self._incoming_dir
            )
            log.info("live migration: listening on %s", self.migration.address)
        self._retry(self.register)
        if not self._load_state():
            self._retry(self._resync)
        self._save_state()
        loops = [
            self._watch_loop,
            self._engine_events_loop,
            self._relist_loop,
            self._report_loop,
            self._persist_loop,
        ] + [self._worker] * self.cfg.workers
        for fn in loops:
            t = threading.Thread(target=fn, name=f"agent-{fn.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        self._stop.wait()
        self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        with self._queue_cv:
            self._queue_cv.notify_all()
        with self._report_cv:
            self._report_cv.notify_all()
        call = self._watch_call
        if call is not None:
            call.cancel()
        stream = self._engine_stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # the stream may be mid-read in its thread
                pass

    def _shutdown(self) -> None:
        for t in self._threads:
            t.join(timeout=self.cfg.engine_timeout_s)
        self._save_state()
        if self.migration is not None:
            self.migration.close()
        self.sched.close()
        for c in self._watch_clients.values():
            c.close()
        self.docker.close()
        self.docker_events.close()

    def _retry(self, fn) -> None:
        """Call fn until it succeeds or the agent stops (the server may be restarting)."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                return fn()
            except grpc.RpcError as exc:
                log.warning(
                    "%s: %s %s (retrying in %.1f s)",
                    fn.__name__,
                    exc.code().name,
                    exc.details(),
                    delay,
                )
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _watch_loop(self) -> None:
        """WatchEvents from the sequence applied, on one replica at a time. With several
        replicas (--scheduler a,b,c) a watch that fails or ends moves to the replica the
        unary calls last reached (the leader, once they followed it), else to the next one,
        and resumes from the stored sequence; a replica that has not yet seen that sequence
        (OUT_OF_RANGE without first-sequence: a follower behind) sends the watch on to the
        next, and only when every replica says so does the agent relist."""
        delay = 0.2
        behind = 0  # replicas in a row that had not reached the agent's sequence
        several = len(self.sched.addresses) > 1
        while not self._stop.is_set():
            with self.lock:
                req = pb.WatchEventsRequest(
                    after_sequence=self.sequence, incarnation=self.incarnation
                )
            client = self._watch_client()
            call = client.stub.WatchEvents(req, metadata=client.metadata)
            self._watch_call = call
            try:
                for resp in call:
                    delay, behind = 0.2, 0
                    self._apply_event(resp.event, resp.incarnation)
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code()
                if (
                    several
                    and code == grpc.StatusCode.OUT_OF_RANGE
                    and not _names_first_sequence(exc)
                    and behind < len(self.sched.addresses) - 1
                ):
                    behind += 1
                    self._next_watch_address()
                    log.warning(
                        "watch: %s (a replica behind this agent): watching %s",
                        exc.details(),
                        self.watch_address,
                    )
                    continue
                if code in RESYNC_CODES:
                    log.warning("watch: %s %s: relisting", code.name, exc.details())
                    behind = 0
                    self._retry(self._resync)
                    continue
                log.warning("watch: %s %s (again in %.1f s)", code.name, exc.details(), delay)
            if several:
                self._next_watch_address()
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def _watch_client(self):
        if len(self.sched.addresses) == 1:
            return self.sched  # one server: one channel
        c = self._watch_clients.get(self.watch_address)
        if c is None:
            c = self._watch_clients[self.watch_address] = self._client(self.watch_address)
        return c

    def _next_watch_address(self) -> None:
        """The replica the next watch goes to: the one unary calls last reached, unless the
        watch just failed there; else the next in the list."""
        addrs, failed = self.sched.addresses, self.watch_address
        if self.sched.address != failed:
            self.watch_address = self.sched.address
        else:
            i = addrs.index(failed) if failed in addrs else -1
            self.watch_address = addrs[(i + 1) % len(addrs)]
        log.info("watch moves from %s to %s", failed, self.watch_address)

    def _apply_event(self, ev: pb.Event, incarnation: str) -> None:
        """Fold one event into the desired state (under the lock, with its sequence)."""
        me = self.cfg.host_id
        wid = ev.workload_id
        relist = False
        with self.lock:
            if ev.sequence <= self.sequence:
                return  # already in a listing taken after it
            t = ev.type
            if t == pb.EVENT_TYPE_PLACED and (ev.host_id == me or me in ev.replica_host_ids):
                b = ev.workload.SerializeToString(deterministic=True)
                self.desired[wid] = Desired.of(b, _numa_of(ev))
                self._failed.pop(wid, None)
                self._mark({wid})
            elif t in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
                if wid in self.leaving:
                    self.leaving[wid].until = 0.0  # moved away, then released: stop now
                    self._mark({wid})
                if wid in self.desired:
                    del self.desired[wid]
                    self._mark({wid})
            elif t == pb.EVENT_TYPE_MOVED:
                if ev.source_host_id == me and wid in self.desired:
                    d = self.desired.pop(wid)
                    self.leaving[wid] = Leaving(
                        ev.host_id,
                        time.monotonic() + self.cfg.move_timeout_s,
                        _must_not_run_twice(d.spec),
                        live=bool(ev.plan_id) and self.migration is not None and runtime.is_vm(d.spec),
                    )
                    self._mark({wid})
                if ev.host_id == me:
                    relist = True  # the event does not carry the spec
            elif t == pb.EVENT_TYPE_STATUS:
                self._on_status(ev)
            elif t == pb.EVENT_TYPE_HOST_ADDED and ev.host_id == me and ev.per_host_workload_ids:
                relist = True
            self.sequence = ev.sequence
            self.incarnation = incarnation or self.incarnation
            self._state_dirty = True
        if relist:
            self._adopt_moved(ev)

    def _adopt_moved(self, ev: pb.Event) -> None:
        """A workload moved here: its spec from this host's allocations."""
        wid = ev.workload_id
        listing = None
        for attempt in range(5):
            try:
                listing = [
                    p for p in self.sched.allocations(self.cfg.host_id, include_workloads=True)
                ]
                break
            except grpc.RpcError as exc:
                log.warning("moved %s here: listing failed: %s", wid, exc.code().name)
                self._stop.wait(0.5)
        if listing is None:
            self._retry(self._resync)
            return
        live = (
            ev.type == pb.EVENT_TYPE_MOVED
            and ev.plan_id
            and self.migration is not None
            and bool(self._peer_address(ev.source_host_id))
        )
        with self.lock:
            for p in listing:
                if p.workload_id == wid or (
                    ev.type == pb.EVENT_TYPE_HOST_ADDED
                    and p.workload_id not in self.desired
                    and self.cfg.host_id in p.replica_host_ids
                ):
                    d = Desired.of(p.workload.SerializeToString(deterministic=True), _numa_of(p))
                    # A move off a DOWN host (no plan) has nobody to wait for.
                    if (
                        ev.type == pb.EVENT_TYPE_MOVED
                        and _must_not_run_twice(d.spec)
                        and ev.plan_id
                    ):
                        if live and runtime.is_vm(d.spec):
                            d.live_from = ev.source_host_id  # both listen: it moves live
                        else:
                            d.wait_for = ev.source_host_id
                        d.wait_until = time.monotonic() + self.cfg.move_timeout_s
                    self.desired[p.workload_id] = d
                    self.leaving.pop(p.workload_id, None)  # moved away and back: it stays
                    self._mark({p.workload_id})
            self._state_dirty = True

    def _on_status(self, ev: pb.Event) -> None:
        s = ev.status
        wid = s.workload_id
        leaving = self.leaving.get(wid)
        if (
            leaving is not None
            and s.host_id == leaving.target
            and s.state == pb.WORKLOAD_STATE_RUNNING
        ):
            leaving.until = 0.0  # the target runs it: stop here now
            self._mark({wid})
        d = self.desired.get(wid)
        stopped = (pb.WORKLOAD_STATE_STOPPED, pb.WORKLOAD_STATE_EXITED, pb.WORKLOAD_STATE_FAILED)
        if d is not None and d.wait_for and s.host_id == d.wait_for and s.state in stopped:
            d.wait_for = ""
            self._mark({wid})
        if d is not None and d.live_from and s.host_id == d.live_from and s.state in stopped:
            d.source_stopped, d.source_stopped_at = s.message, time.monotonic()
            self._mark({wid})

    def _engine_events_loop(self) -> None:
        """Docker's events wake the workers early; the relist stays the truth. The stream ends
        silently when the daemon restarts (docker-py), so it reconnects with `since`."""
        since = None
        while not self._stop.is_set():
            try:
                stream = self.docker_events.events(
                    decode=True,
                    since=since,
                    filters={
                        "type": "container",
                        "label": f"{runtime.LABEL_HOST}={self.cfg.host_id}",
                    },
                )
                self._engine_stream = stream
                for e in stream:
                    since = e.get("time", since)
                    wid = (e.get("Actor", {}).get("Attributes") or {}).get(runtime.LABEL_WORKLOAD)
                    if wid and e.get("Action") in ("die", "start", "oom", "destroy"):
                        self._mark({wid})
            except Exception as exc:  # a closed or broken stream
                if self._stop.is_set():
                    return
                log.warning("engine events: %s", exc)
            self._stop.wait(1.0)
            self._relist()

    def _relist_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._relist()
            except Exception as exc:
                log.warning("relist: %s", exc)
            wait = self.cfg.relist_s
            now = time.monotonic()
            with self.lock:
                while self._timers and self._timers[0][0] <= now:
                    self._mark({heapq.heappop(self._timers)[1]})
                if self._timers:
                    wait = min(wait, self._timers[0][0] - now)
                for wid, lv in self.leaving.items():
                    if lv.until <= now:
                        self._mark({wid})
                for wid, d in self.desired.items():
                    if d.wait_for and d.wait_until <= now:
                        self._mark({wid})
            self._stop.wait(max(0.05, wait))

    def _relist(self) -> None:
        """One listing of this host's containers (sparse: no inspect per container), diffed
        against the desired state; what differs is marked dirty."""
        containers = self.docker.containers.list(
            all=True, sparse=True, filters={"label": f"{runtime.LABEL_HOST}={self.cfg.host_id}"}
        )
        by_wid: dict[str, list] = {}
        dirty = set()
        seen = {}
        for c in containers:
            labels = c.attrs.get("Labels") or {}
            wid = labels.get(runtime.LABEL_WORKLOAD)
            if wid is None:
                continue
            by_wid.setdefault(wid, []).append((c, labels))
            state = c.attrs.get("State", "")
            seen[c.id] = state
            if self._seen_states.get(c.id) != state:
                dirty.add(wid)
        with self.lock:
            for wid, d in self.desired.items():
                have = by_wid.get(wid, [])
                if (
                    len(have) != 1
                    or not runtime.matches(have[0][1], d.hash, d.spec)
                    or not runtime.pin_matches(have[0][1], self._pin(d))
                ):
                    if self._failed.get(wid) != d.hash:
                        dirty.add(wid)
                elif have[0][0].attrs.get("State") != "running" and wid not in self._reported:
                    dirty.add(wid)
            for wid in by_wid:
                if wid not in self.desired:
                    dirty.add(wid)
            self._seen_states = seen
        self.last_relist = time.monotonic()
        self._mark(dirty)
        self._synced.set()
        self._check_reconciled()

    def _persist_loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._save_state()
            except OSError as exc:
                log.error("state dir: %s", exc)

    # -- workers -------------------------------------------------------------------------

    def _mark(self, wids) -> None:
        if not wids:
            return
        with self._queue_cv:
            self._dirty.update(wids)
            self._queue_cv.notify(len(wids))

    def _worker(self) -> None:
        while True:
            with self._queue_cv:
                wid = None
                while wid is None:
                    if self._stop.is_set():
                        return
                    ready = self._dirty - self._busy
                    if ready:
                        wid = next(iter(ready))
                        self._dirty.discard(wid)
                        self._busy.add(wid)
                    else:
                        self._queue_cv.wait(1.0)
            try:
                self._sync(wid)
            except Exception as exc:  # an engine call failed: try again at the next relist
                log.warning("workload %s: %s", wid, exc)
            finally:
                with self._queue_cv:
                    self._busy.discard(wid)
                    if wid in self._dirty:
                        self._queue_cv.notify()
            self._check_reconciled()

    def _check_reconciled(self) -> None:
        """Log, once, when the work the first full relist found is done (the benchmark's
        reconcile time after a restart)."""
        if self._reconciled.is_set() or not self._synced.is_set():
            return
        with self._queue_cv:
            if self._dirty or self._busy:
                return
            self._reconciled.set()
        log.info(
            "reconciled %d workloads in %.3f s after start: %s",
            len(self.desired),
            time.monotonic() - self._started_at,
            ", ".join(f"{k} {v}" for k, v in self.counts.items()),
        )

    def _schedule(self, wid: str, due: float) -> None:
        with self.lock:
            heapq.heappush(self._timers, (due, wid))

    def _sync(self, wid: str) -> None:
        """Bring one workload's containers to its desired state."""
        now = time.monotonic()
        with self.lock:
            d = self.desired.get(wid)
            leaving = self.leaving.get(wid)
        containers = self.runtime.find(wid)
        if d is None:
            if leaving is not None and leaving.live:
                running = [c for c in containers if c.status == "running"]
                if running and leaving.until > now:
                    self._migrate_out(wid, leaving, running[0])
                with self.lock:
                    leaving.live = False  # done, or given up: stopped below either way
            if (
                leaving is not None
                and not leaving.stop_now
                and leaving.until > now
                and any(c.status == "running" for c in containers)
            ):
                return  # a move away: runs until the target reports it running
            if containers and not self._synced.is_set():
                return  # reap only after the first full sync (hashicorp/nomad PR #7792)
            for c in containers:
                self.runtime.remove(c)
                self.counts["removed"] += 1
            with self.lock:
                self.leaving.pop(wid, None)
                self._failed.pop(wid, None)
                self._reported.pop(wid, None)
            if leaving is not None:
                done = MIGRATED_LIVE if leaving.migrated else "moved to "
                self._report(wid, pb.WORKLOAD_STATE_STOPPED, message=done + leaving.target)
            return
        if d.live_from and self._sync_incoming(wid, d, containers, now):
            return
        if d.wait_for and d.wait_until > now:
            self._report(
                wid, pb.WORKLOAD_STATE_PENDING, message=f"waiting for {d.wait_for} to stop it"
            )
            return
        pin = self._pin(d)
        keep = [
            c
            for c in containers
            if runtime.matches(c.labels, d.hash, d.spec) and runtime.pin_matches(c.labels, pin)
        ]
        for c in containers:
            if c not in keep:
                self.runtime.remove(c)  # another spec: replaced
        keep.sort(
            key=lambda c: (c.status == "running", int(c.labels.get(LABEL_RESTARTS, "0"))),
            reverse=True,
        )
        for c in keep[1:]:
            self.runtime.remove(c)  # never two of one workload
        if not keep:
            self._start(wid, d, restarts=0)
            return
        c = keep[0]
        st = ContainerState.of(c)
        restarts = int(c.labels.get(LABEL_RESTARTS, "0"))
        if st.running:
            if wid not in self._reported:
                self.counts["adopted"] += 1
            self._exit_seen.pop(c.id, None)
            self._report(
                wid,
                pb.WORKLOAD_STATE_RUNNING,
                container=c,
                restarts=restarts,
                message=self._vm_message(d),
                since=st.started_at,
            )
            return
        if st.status == "created":
            c.start()
            self._mark({wid})
            return
        message = (
            "out of memory (OOM killed)"
            if st.oom_killed
            else st.error or f"exited with code {st.exit_code}"
        )
        state = pb.WORKLOAD_STATE_FAILED if st.error else pb.WORKLOAD_STATE_EXITED
        self._report(
            wid,
            state,
            exit_code=st.exit_code,
            container=c,
            restarts=restarts,
            message=message,
            since=st.finished_at,
        )
        if not _restart_wanted(d.spec, st.exit_code):
            return
        seen = self._exit_seen.setdefault(c.id, now)
        delay = min(self.cfg.restart_backoff_s * (2**restarts), MAX_BACKOFF_S)
        delay *= 1 + random.uniform(-0.1, 0.1)
        if now < seen + delay:
            self._schedule(wid, seen + delay)
            return
        self.runtime.remove(c)
        self._exit_seen.pop(c.id, None)
        self.counts["restarted"] += 1
        self._start(wid, d, restarts=restarts + 1)

    def _pin(self, d: Desired) -> runtime.NumaPin | None:
        """Where a NUMA-fit VM is pinned: the node the scheduler charged (see runtime.numa_pin)."""
        return runtime.numa_pin(d.spec, d.numa_node, self.facts.numa_cpus)

    def _start(self, wid: str, d: Desired, restarts: int, incoming: bool = False) -> None:
        import docker.errors

        if self._failed.get(wid) == d.hash:
            return
        try:
            pin = self._pin(d)
            spec = runtime.run_spec(
                d.spec,
                d.spec_bytes,
                self.facts,
                restarts,
                pin,
                migration.incoming_uri() if incoming else "",
            )
            c = self.runtime.start(spec)
        except (docker.errors.ImageNotFound, docker.errors.APIError, ValidationError) as exc:
            reason = getattr(exc, "explanation", None) or str(exc)
            if (
                isinstance(exc, docker.errors.APIError)
                and exc.status_code
                and exc.status_code >= 500
                and not isinstance(exc, docker.errors.ImageNotFound)
                and "no such image" not in str(reason)
            ):
                raise  # the engine's own trouble: try again at the next relist
            with self.lock:
                self._failed[wid] = d.hash  # not again until the spec changes
            self._report(wid, pb.WORKLOAD_STATE_FAILED, message=f"failed to start: {reason}")
            log.warning("workload %s failed to start: %s", wid, reason)
            return
        self.counts["started"] += 1
        if pin is not None and pin.note:
            log.warning("workload %s: %s", wid, pin.note)
        if spec.qmp_dir:
            state = runtime.wait_running(spec.qmp_dir, timeout_s=10.0)
            log.info("VM %s: qemu %s", wid, state)
        if incoming:
            self._report(
                wid, pb.WORKLOAD_STATE_PENDING, message=f"waiting for the live migration from {d.live_from}"
            )
            self._schedule(wid, time.monotonic() + 0.5)
            return
        self._report(
            wid,
            pb.WORKLOAD_STATE_RUNNING,
            container=c,
            restarts=restarts,
            message=spec.warning,
            since=ContainerState.of(c).started_at,
        )

    # -- live migration ----------------------------------------------------------------

    def _peer_address(self, host_id: str) -> str:
        """The migration listener of another agent's host (its label), "" when this agent
        or that one does not migrate live, or the listing fails (the move is then cold)."""
        if self.migration is None:
            return ""
        try:
            for h in self.sched.hosts():
                if h.id == host_id:
                    return h.labels.get(migration.ADDRESS_LABEL, "")
        except grpc.RpcError as exc:
            log.warning("live migration: hosts not listed (%s): the move is cold", exc.code().name)
        return ""

    def _incoming_dir(self, wid: str) -> str | None:
        """The QMP directory of wid's incoming qemu, while wid moves here live (the
        migration listener asks)."""
        with self.lock:
            d = self.desired.get(wid)
            if d is None or not d.live_from:
                return None
        return runtime.qmp_dir_of(self.facts, wid)

    def _migrate_out(self, wid: str, leaving: Leaving, container) -> None:
        """Source side of a live move: send the running VM to the target's agent; on success
        the guest runs there and this container is removed like any other that left."""
        address = self._peer_address(leaving.target)
        if not address:
            return
        qmp_dir = container.labels.get(runtime.LABEL_QMP_DIR, "")
        log.info("live migration of %s to %s (%s)", wid, leaving.target, address)
        out = migration.migrate(qmp_dir, address, wid, leaving.until)
        if out.done:
            leaving.migrated = True
            log.info(
                "live migration of %s to %s completed: total %d ms, downtime %d ms",
                wid,
                leaving.target,
                out.total_ms,
                out.downtime_ms,
            )
        else:
            log.warning(
                "live migration of %s failed (%s): stopped here, started cold there", wid, out.reason
            )

    def _sync_incoming(self, wid: str, d: Desired, containers: list, now: float) -> bool:
        """Target side of a live move: an incoming qemu waits for the guest's state; once it
        runs, the move is over (False: the normal sync adopts the container and reports it
        RUNNING). When the source stopped the VM without migrating it, or the migration did
        not finish in time, the VM starts here cold from its disk. True while it waits."""
        incoming = [c for c in containers if c.labels.get(runtime.LABEL_INCOMING) == "1"]
        live = [c for c in incoming if c.status == "running"]
        state = migration.qemu_state(live[0].labels[runtime.LABEL_QMP_DIR]) if live else ""
        if state == "running":
            with self.lock:
                d.live_from = ""
            log.info("live migration of %s: running here", wid)
            return False
        migrated = d.source_stopped is not None and d.source_stopped.startswith(MIGRATED_LIVE)
        give_up = d.wait_until <= now or (
            d.source_stopped is not None
            and (not migrated or now > d.source_stopped_at + INCOMING_GRACE_S)
        )
        if give_up:
            for c in containers:
                self.runtime.remove(c)
            with self.lock:
                d.live_from = ""
            log.warning("workload %s: no live migration from its source: started cold", wid)
            self._start(wid, d, restarts=0)
            return True
        if not live:
            for c in containers:
                self.runtime.remove(c)  # an incoming qemu that died, or a stale container
            self._start(wid, d, restarts=0, incoming=True)
            return True
        self._report(
            wid, pb.WORKLOAD_STATE_PENDING, message=f"waiting for the live migration from {d.live_from}"
        )
        self._schedule(wid, now + 0.5)
        return True

    def _vm_message(self, d: Desired) -> str:
        """The status message of a running VM: TCG, and a NUMA pin that is not the record's."""
        tcg = runtime.vm.TCG_WARNING if runtime.is_vm(d.spec) and not self.facts.kvm else ""
        pin = self._pin(d)
        return "; ".join(m for m in (tcg, pin.note if pin is not None else "") if m)

    # -- reports -------------------------------------------------------------------------

    def _report(
        self,
        wid: str,
        state: int,
        *,
        exit_code: int = 0,
        container=None,
        restarts: int = 0,
        message: str = "",
        since: str = "",
    ) -> None:
        """Queue a status when it differs from the last one sent for the workload."""
        cid = container.id if container is not None else ""
        key = (state, exit_code, cid, restarts, message)
        with self.lock:
            if self._reported.get(wid) == key:
                return
            self._reported[wid] = key
        status = pb.WorkloadStatus(
            workload_id=wid,
            host_id=self.cfg.host_id,
            state=state,
            exit_code=exit_code,
            message=message,
            container_id=cid,
            restarts=restarts,
        )
        if since:
            try:
                status.since.FromJsonString(since[:26].rstrip("Z") + "Z" if "." in since else since)
            except ValueError:
                pass
        with self._report_cv:
            self._reports[wid] = status
            self._report_cv.notify()

    def _report_loop(self) -> None:
        """Status changes as they come (batched), and an empty report as the heartbeat."""
        last = 0.0
        while not self._stop.is_set():
            with self._report_cv:
                if not self._reports:
                    self._report_cv.wait(max(0.0, last + self.cfg.heartbeat_s - time.monotonic()))
                if self._stop.is_set():
                    return
                batch = dict(list(self._reports.items())[:REPORT_BATCH])
                for wid in batch:
                    del self._reports[wid]
            if not batch and time.monotonic() < last + self.cfg.heartbeat_s:
                continue
            with self.lock:
                applied = self.sequence
            try:
                self.sched.call(
                    "ReportStatus",
                    pb.ReportStatusRequest(
                        host_id=self.cfg.host_id,
                        statuses=list(batch.values()),
                        applied_sequence=applied,
                    ),
                )
                last = time.monotonic()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and batch:
                    # A status of a workload no longer placed here (released or moved while
                    # the report was queued) refuses the whole report: send one at a time.
                    self._report_each(batch, applied)
                    last = time.monotonic()
                    continue
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    # The host is gone from the scheduler (removed, or a store rebuilt):
                    # register again.
                    self._retry(self.register)
                log.warning("report: %s %s", exc.code().name, exc.details())
                with self._report_cv:
                    for wid, s in batch.items():
                        self._reports.setdefault(wid, s)  # a newer one wins
                self._stop.wait(0.5)

    def _report_each(self, batch: dict, applied: int) -> None:
        for wid, status in batch.items():
            try:
                self.sched.call(
                    "ReportStatus",
                    pb.ReportStatusRequest(
                        host_id=self.cfg.host_id, statuses=[status], applied_sequence=applied
                    ),
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.debug("status of %s dropped: %s", wid, exc.details())
                    continue
                with self._report_cv:
                    self._reports.setdefault(wid, status)


# -- command line ------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument(
        "--scheduler",
        required=True,
        help="HOST:PORT of the scheduler service; replicas comma-separated (the agent follows "
        "the leader across a failover)",
    )
    p.add_argument(
        "--docker-host",
        default=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        help="the engine's URL (env DOCKER_HOST)",
    )
    p.add_argument("--host-id", required=True, help="this host's id in the scheduler")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="host label, repeatable"
    )
    p.add_argument(
        "--state-dir",
        default="/var/lib/hci-scheduler-agent",
        help="applied sequence, desired workloads, QMP sockets (keep the path short)",
    )
    p.add_argument(
        "--volumes-dir", default="", help="volume directories (default: STATE_DIR/volumes)"
    )
    p.add_argument(
        "--heartbeat-s", type=float, default=5.0, help="seconds between heartbeats (default 5)"
    )
    p.add_argument(
        "--vm-image", default="", help="launcher image for VMs without one (hci-scheduler/qemu:...)"
    )
    p.add_argument(
        "--relist-s", type=float, default=2.0, help="seconds between container relists (default 2)"
    )
    p.add_argument(
        "--restart-backoff-s",
        type=float,
        default=10.0,
        help="first restart delay, doubling to 300 s (default 10)",
    )
    p.add_argument(
        "--move-timeout-s",
        type=float,
        default=60.0,
        help="how long a move waits for the other host's report (default 60)",
    )
    p.add_argument(
        "--stop-timeout-s",
        type=int,
        default=runtime.STOP_TIMEOUT_S,
        help="seconds a stopped container gets between SIGTERM and SIGKILL (default 10)",
    )
    p.add_argument(
        "--workers", type=int, default=8, help="workloads synced in parallel (default 8)"
    )
    p.add_argument(
        "--migration-listen",
        default="",
        metavar="HOST:PORT",
        help="move VMs live (QMP migrate) between agents that both listen; this agent's "
        "listener, published as its host label migration-address (port 0: any free port)",
    )
    p.add_argument(
        "--accel",
        choices=("auto", "tcg"),
        default="auto",
        help="qemu's accelerator: auto (KVM where /dev/kvm works, else TCG) or tcg (always "
        "emulate; the host still counts as kvm=true when it has KVM)",
    )
    p.add_argument("--tls-ca", help="CA certificate to verify the server (turns on TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", help="client key for mutual TLS")
    p.add_argument("--tls-server-name", help="override the name checked in the server certificate")
    p.add_argument(
        "--token-file",
        default=os.environ.get("HCI_SCHEDULER_TOKEN_FILE"),
        help="file whose first token is sent as a bearer token",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument("--log-level", default="info", help="debug, info, warning (default info)")


def config_from_args(args) -> AgentConfig:
    from ..client import read_token_file

    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"--label must be KEY=VALUE, got {item!r}")
        labels[key] = value
    if args.heartbeat_s <= 0:
        raise ValidationError(f"--heartbeat-s must be positive, got {args.heartbeat_s}")
    if args.workers < 1:
        raise ValidationError(f"--workers must be at least 1, got {args.workers}")
    vm_image = args.vm_image
    if not vm_image:
        from .images import QEMU_REPO

        vm_image = f"{QEMU_REPO}:latest"
        try:
            from .images import image_names

            vm_image = image_names()[1]
        except Exception:  # qemu or busybox not installed here: the name stays a guess
            pass
    return AgentConfig(
        scheduler=args.scheduler,
        docker_host=args.docker_host,
        host_id=args.host_id,
        labels=labels,
        state_dir=args.state_dir,
        heartbeat_s=args.heartbeat_s,
        vm_image=vm_image,
        relist_s=args.relist_s,
        restart_backoff_s=args.restart_backoff_s,
        move_timeout_s=args.move_timeout_s,
        workers=args.workers,
        volumes_dir=args.volumes_dir,
        stop_timeout_s=args.stop_timeout_s,
        token=read_token_file(args.token_file) if args.token_file else None,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        rpc_timeout_s=args.timeout,
        migration_listen=args.migration_listen,
        accel=args.accel,
    )


def run(args) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # one line per engine call otherwise
    import sys

    try:
        config = config_from_args(args)
    except ValidationError as exc:
        print(f"hci-scheduler agent: {exc}", file=sys.stderr)
        return 2
    agent = Agent(config)
    if args.metrics:
        from .metrics import serve_metrics

        port = serve_metrics(agent, args.metrics)
        log.info("metrics on %s", f"{args.metrics.rpartition(':')[0] or '127.0.0.1'}:{port}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()
    return 0
