"""One scheduler replica on an etcd store: follower while another leads, leader when it wins.

Follower: it applies the leader's log as it grows (a Watch on the prefix wakes it, then a
Range reads what is new: level-triggered, so a missed or compacted watch loses nothing; a
follower the log was compacted past loads the newest snapshot and follows from there),
answers reads from that state with the sequence it is at, and refuses mutations with
UNAVAILABLE and the leader's address in the trailing metadata (`hci-leader`) for clients to
follow (chosen over forwarding: a forwarded call would cross two hops and hide from the
client where the leader is). Its health is SERVING while it has applied the whole log it
has seen, NOT_SERVING while behind.

Leader: when the leader key is free it creates it (ha/election.py), reads the log's tail,
applies it, and only then accepts writes (the store refuses them until `accept_writes`), so
a new leader never writes over events it has not applied. Losing the key (lease not
renewed in time, a fenced write refused) makes it a follower again, without a restart.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc

from ..server.snapshot import SnapshotError
from ..store.base import StoreError, StoreUnwritable
from ..store.etcd import EtcdStore, NotLeader
from .etcd_client import prefix_end

log = logging.getLogger("hci_scheduler.ha")

#: Trailing metadata key that names the leader's address on a follower's replies.
LEADER_METADATA = "hci-leader"


class HAMetrics:
    """Prometheus metrics of one replica: leader changes, follower lag, etcd commit latency."""

    #: Bounds of the commit latency histogram (seconds): an etcd Txn on a quiet local member takes
    #: about 1-3 ms (its WAL fsync), a loaded machine or a remote quorum tens to hundreds.
    COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self, registry, replica: Replica):
        from prometheus_client import Counter, Gauge, Histogram

        self.leader_changes = Counter("hci_ha_leader_changes", "Times this replica became or stopped being "
                                      "leader", registry=registry)
        g = Gauge("hci_ha_is_leader", "1 while this replica leads", registry=registry)
        g.set_function(lambda: 1.0 if replica.store.leading else 0.0)
        g = Gauge("hci_ha_follower_lag_events", "Events of the log this replica has not applied yet",
                  registry=registry)
        g.set_function(lambda: float(replica.lag))
        g = Gauge("hci_ha_etcd_commits", "etcd Txns the log's appends committed", registry=registry)
        g.set_function(lambda: float(replica.store.commits))
        latency = Histogram("hci_ha_etcd_commit_seconds", "Time of each of those commits (seconds): a fenced "
                            "Txn through etcd's raft", buckets=self.COMMIT_BUCKETS, registry=registry)
        replica.store.on_commit = latency.observe


class Replica:
    """Follows or leads; see the module docstring.

    Parameters
    ----------
    state : SchedulerState
    store : EtcdStore
        The state's store, with its election.
    set_serving : callable(bool)
        Sets the scheduler service's health.
    on_fatal : callable(exc)
        The log no longer continues this state (a gap, a commit whose answer was lost):
        the server stops, a restart rebuilds it. A log compacted past a lagging follower is
        not one of these: the follower catches up from a snapshot by itself (state.follow).
    """

    def __init__(self, state, store: EtcdStore, set_serving, on_fatal, poll_s: float = 0.5, registry=None):
        self.state = state
        self.store = store
        self.election = store.election
        self.set_serving = set_serving
        self.on_fatal = on_fatal
        self.poll_s = poll_s
        self.leader_address: str | None = None
        self.leader_changes = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics = HAMetrics(registry, self) if registry is not None else None
        self.election.on_lost = self._lost
        if store.leading:  # won at open: a leader change as much as a later take-over
            self.leader_address = self.election.address
            self._changed()

    @property
    def lag(self) -> int:
        return max(self.store.last_sequence() - self.state.sequence, 0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ha-replica", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    # -- transitions -------------------------------------------------------------

    def _lost(self, why: str) -> None:
        """The election gave up the lead: follow from now on."""
        self.leader_address = None
        self.state.step_down(NotLeader(f"this replica is a follower ({why})"))
        self._changed()
        self._wake.set()

    def _take_over(self) -> None:
        """Won the key: apply the tail, then write."""
        t0 = time.perf_counter()
        with self.state.lock:
            self.store.refresh()
            self.state.follow()
            self.store.accept_writes()
        self.leader_address = self.election.address
        self.state.resume_writes()
        self._changed()
        self.set_serving(True)
        log.info("took over as leader", extra={"fields": {
            "sequence": self.state.sequence, "catch_up_s": round(time.perf_counter() - t0, 3)}})

    def _changed(self) -> None:
        self.leader_changes += 1
        if self.metrics is not None:
            self.metrics.leader_changes.inc()

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                if self.store.leading:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
                    continue
                self._follow_round()
                failing = False
            except StoreUnwritable as exc:  # etcd unreachable: reads go on from memory
                if not failing:
                    log.warning("etcd unreachable: serving reads, retrying", extra={"fields": {"reason": str(exc)}})
                failing = True
                self._stop.wait(self.poll_s)
            except SnapshotError as exc:
                # Catching up past a compaction found no snapshot that checks out: the leader may
                # have replaced them while this replica read one. Reads go on from the state it had.
                if not failing:
                    log.error("cannot catch up from a snapshot yet: retrying", extra={"fields": {"reason": str(exc)}})
                failing = True
                self.set_serving(False)
                self._stop.wait(self.poll_s)
            except StoreError as exc:
                if self._stop.is_set():
                    return
                log.error("the log no longer continues this replica's state", extra={"fields": {
                    "reason": str(exc)}})
                self.on_fatal(exc)
                return

    def _follow_round(self) -> None:
        resp = self.store.client.range(self.election.key)
        if not resp.kvs and self.election.try_acquire():
            # Campaign first, catch up after: the key is free once, and _take_over applies the
            # tail before any write (the writes are fenced until accept_writes).
            self._take_over()
            return
        self.store.refresh()
        self.state.follow()
        if not resp.kvs:
            holder = self.election.holder
            self.leader_address = holder[0] if holder else None  # who won: clients are sent there
        elif resp.kvs[0].create_revision == self.election.revision and self.election.is_leader:
            self._take_over()  # it leads but must apply the log first (a late commit: store/etcd.py)
            return
        else:
            self.leader_address = resp.kvs[0].value.decode()
        self.set_serving(self.lag == 0)
        self._wait_for_change(resp.header.revision + 1)

    def _wait_for_change(self, revision: int) -> None:
        """Until a key under the prefix changes after `revision` (an event, the leader key), or poll_s."""
        prefix = (self.store.prefix + "/").encode()
        try:
            stream = self.store.client.watch(prefix, prefix_end(prefix), start_revision=revision,
                                             timeout_s=self.poll_s)
        except StoreError:
            self._stop.wait(self.poll_s)
            return
        try:
            for resp in stream:
                if resp.events or resp.canceled or resp.compact_revision:
                    return
        except grpc.RpcError:
            return  # the deadline (poll_s), or the member went away
        finally:
            stream.cancel()


class LeaderTrailers(grpc.ServerInterceptor):
    """On a follower, every unary reply carries the leader's address in the trailing
    metadata (`hci-leader`), so a client refused with UNAVAILABLE knows where to go."""

    def __init__(self, replica_ref):
        self._replica_ref = replica_ref  # a callable returning the Replica (built after the server)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        behavior = handler.unary_unary

        def wrapped(request, context):
            replica = self._replica_ref()
            if replica is not None and not replica.store.leading and replica.leader_address:
                context.set_trailing_metadata(((LEADER_METADATA, replica.leader_address),))
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
