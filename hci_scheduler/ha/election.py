"""Leader election on an etcd lease, with the leader key's create revision as fencing token.

The shape of etcd's clientv3/concurrency election (STYLE.md 13): a replica grants a lease
and creates `<prefix>/leader` (its advertised address as value) bound to it in one Txn that
succeeds only if the key does not exist (`CreateRevision(key) == 0`). The winner's token is
the key's create revision: every write of the leader's store compares it (store/etcd.py), so a
replica that lost the key, even one paused past its lease that wakes up believing it leads,
writes nothing.

Keep-alive every TTL/3. Leadership is given up locally, before etcd can let the lease run
out: etcd counts a renewal's TTL from when it receives it, which is after the replica sent
it, so the lease lives at least until `sent + TTL`; the replica stops acting as leader at
`sent + TTL - margin` unless a later renewal came back (client-go's elector has no such
rule and no fencing: kubernetes #23731, cilium PR #42920). Losing it calls `on_lost`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ValidationError
from ..etcd.etcdserverpb import rpc_pb2 as rpc
from ..store.base import StoreError
from .etcd_client import EtcdClient, EtcdUnavailable

log = logging.getLogger("hci_scheduler.ha")


def leader_key(prefix: str) -> bytes:
    return (prefix.rstrip("/") + "/leader").encode()


class Election:
    """One replica's candidacy for `<prefix>/leader`.

    Parameters
    ----------
    client : EtcdClient
    prefix : str
        The scheduler's key prefix in etcd.
    address : str
        What the leader key holds while this replica leads: its advertised gRPC address.
    ttl_s : int
        The lease TTL asked for (etcd may grant more: its minimum is 1.5 election timeouts,
        rounded up; 1 s needs etcd's --election-timeout at most 666 ms).
    """

    def __init__(self, client: EtcdClient, prefix: str, address: str, ttl_s: int = 1):
        if ttl_s < 1:
            raise ValidationError(f"lease ttl_s must be at least 1 (etcd leases count whole seconds), got {ttl_s}")
        self.client = client
        self.key = leader_key(prefix)
        self.address = address
        self.ttl_s = ttl_s
        self.granted_ttl_s = ttl_s
        self.lease = 0
        self.revision: int | None = None  # the fencing token while leading, else None
        self.holder: tuple[str, int] | None = None  # (address, revision) of the winner of a lost attempt
        self.on_lost: Callable[[str], None] | None = None
        self.changes = 0  # times this replica won
        self._valid_until = 0.0  # monotonic time after which the lease may have run out at etcd
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- who leads -------------------------------------------------------------

    def leader(self) -> tuple[str, int] | None:
        """(address, create revision) of the current leader, or None."""
        resp = self.client.range(self.key)
        if not resp.kvs:
            return None
        return resp.kvs[0].value.decode(), resp.kvs[0].create_revision

    @property
    def is_leader(self) -> bool:
        return self.revision is not None and time.monotonic() < self._valid_until

    # -- winning -------------------------------------------------------------

    def try_acquire(self) -> bool:
        """One attempt: grant a lease and create the leader key with it; True when won. When
        lost, `holder` names the replica that holds the key (None: it went away meanwhile)."""
        sent = time.monotonic()
        grant = self.client.grant(self.ttl_s)
        lease, ttl = grant.ID, max(int(grant.TTL), 1)
        put = rpc.RequestOp(request_put=rpc.PutRequest(key=self.key, value=self.address.encode(), lease=lease))
        cmp = rpc.Compare(key=self.key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)
        holder = rpc.RequestOp(request_range=rpc.RangeRequest(key=self.key))
        try:
            resp = self.client.txn([cmp], [put], [holder])
        except StoreError:
            self._revoke(lease)
            raise
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            # Who won instead, from the same Txn: a follower names the new leader at once.
            self.holder = (kvs[0].value.decode(), kvs[0].create_revision) if kvs else None
            self._revoke(lease)
            return False
        with self._lock:
            self.lease, self.granted_ttl_s = lease, ttl
            self.revision = resp.header.revision  # the key's create revision: created by this txn
            self._valid_until = sent + ttl * 0.9
            self.changes += 1
            self._stop.clear()
        self._thread = threading.Thread(target=self._keep_alive, name="etcd-lease", daemon=True)
        self._thread.start()
        log.info("elected leader", extra={"fields": {"key": self.key.decode(), "address": self.address,
                                                     "revision": self.revision, "ttl_s": ttl}})
        return True

    def campaign(self, timeout_s: float | None = None, stop: threading.Event | None = None) -> bool:
        """Block until this replica leads (True), `timeout_s` passes or `stop` is set (False).
        Between attempts it watches the leader key and tries again as soon as it is deleted
        (the leader resigned or its lease ran out)."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if stop is not None and stop.is_set():
                return False
            try:
                if self.try_acquire():
                    return True
                current = self.client.range(self.key)
            except EtcdUnavailable as exc:
                log.warning("etcd unavailable while campaigning; retrying", extra={"fields": {"reason": str(exc)}})
                current = None
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            if current is not None and current.kvs:
                self._wait_deleted(current.header.revision + 1, 5.0 if left is None else min(left, 5.0))
            else:  # etcd unreachable, or the key went away between the txn and the range
                time.sleep(0.1 if left is None else min(0.1, left))

    def _wait_deleted(self, start_revision: int, timeout_s: float) -> None:
        """Return once the leader key is deleted after start_revision, or after timeout_s."""
        try:
            stream = self.client.watch(self.key, start_revision=start_revision, timeout_s=min(timeout_s, 5.0))
        except StoreError:
            time.sleep(0.1)
            return
        try:
            for resp in stream:
                if resp.canceled or any(ev.type == ev.DELETE for ev in resp.events):
                    return
        except Exception:  # noqa: BLE001 - deadline or a member gone: the caller tries again
            return
        finally:
            stream.cancel()

    # -- keeping it ------------------------------------------------------------

    def _keep_alive(self) -> None:
        interval = self.granted_ttl_s / 3
        while not self._stop.wait(max(0.0, min(interval, self._valid_until - time.monotonic()))):
            if time.monotonic() >= self._valid_until:
                self._lost("the lease was not renewed in time (etcd unreachable, or this process was paused)")
                return
            sent = time.monotonic()
            try:
                ttl = self.client.keep_alive_once(self.lease, timeout_s=max(self._valid_until - sent, 0.05))
            except StoreError as exc:
                log.warning("lease renewal failed", extra={"fields": {"reason": str(exc)}})
                continue
            if self._stop.is_set():
                return
            if ttl <= 0:
                self._lost("the lease expired at etcd")
                return
            with self._lock:
                if sent > self._valid_until:  # answered, but after this replica gave up already
                    continue
                self._valid_until = sent + self.granted_ttl_s * 0.9

    def _lost(self, why: str) -> None:
        with self._lock:
            if self.revision is None:
                return
            revision, self.revision = self.revision, None
            lease, self.lease = self.lease, 0
        self._stop.set()
        log.error("lost leadership: stepping down", extra={"fields": {"revision": revision, "reason": why}})
        if self.on_lost is not None:
            self.on_lost(why)
        # The lease may still be alive at etcd (renewals were slow, not lost): revoking it frees
        # the key now instead of after the TTL. Only this lease's keys go; best effort.
        if lease:
            threading.Thread(target=self._revoke, args=(lease,), name="etcd-revoke", daemon=True).start()

    def check(self) -> int:
        """The fencing token, or NotLeader when the lease may have run out (the store asks
        before every write; the write's compare on the token is what makes it safe)."""
        from ..store.etcd import NotLeader

        revision = self.revision
        if revision is None:
            raise NotLeader("this replica does not hold the leader key")
        if time.monotonic() >= self._valid_until:
            self._lost("the lease was not renewed in time")
            raise NotLeader("this replica's lease may have run out: stepped down")
        return revision

    def step_down(self, why: str) -> None:
        """Stop acting as leader now (a fenced write failed): on_lost runs once."""
        self._stop.set()
        self._lost(why)

    def resign(self) -> None:
        """Stop renewing and revoke the lease, which deletes the leader key at once: a
        standby takes over without waiting for the TTL."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            lease, self.revision = self.lease, None
            self.lease = 0
        if lease:
            self._revoke(lease)

    def _revoke(self, lease: int) -> None:
        try:
            self.client.revoke(lease)
        except StoreError as exc:  # it runs out by itself
            log.warning("lease revoke failed", extra={"fields": {"reason": str(exc)}})
