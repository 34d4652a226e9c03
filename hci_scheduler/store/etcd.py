"""The Store on etcd: the event log and snapshots as keys under a prefix, written only by the
replica that holds the leader key (fencing).

Keys (prefix "/hci" by default):

    <prefix>/leader                 the leading replica's address, bound to its lease (ha/election.py)
    <prefix>/log/<20-digit seq>     the events of one Txn, from seq on: per event its type (2 bytes)
                                    and body length (4 bytes, little-endian), then the body
    <prefix>/meta/<key>             a metadata value (dimensions, incarnation, compacted_seq)
    <prefix>/snap/<20-digit seq>/<6-digit n>   chunk n of a snapshot
    <prefix>/snap/<20-digit seq>/manifest      written last: chunk count, size, SHA-256

Fencing: every write is one etcd Txn whose compares include `CreateRevision(<prefix>/leader)
== token`, the revision at which this replica created the key when it won the election; an
append also compares `CreateRevision == 0` over the log keys from its first sequence on
(none may exist). A replica that lost the key
(its lease ran out while it was paused, say) fails the compare, writes nothing, raises
NotLeader and steps down. A log key that exists already while the token still matches
means the log moved on without this replica (a write whose answer was lost committed
after all): StoreError, fatal, so that a restart replays the log as etcd holds it.

Size: one key per Txn, not per event: etcd allows 128 operations in a Txn
(--max-txn-ops), and a key costs etcd far more than the bytes of an event. etcd refuses a
request over its --max-request-bytes (1.5 MiB by default). An append is one Txn (one key)
when its records fit (a batch of the writer usually does); a larger one (a Register of
10,000 hosts) is split into several Txns, each fenced and each continuing the log. Each Txn is atomic, so the log holds a prefix of the batch's events in order if the
replica dies (or loses the lead) between two of them: the events are complete facts in the
order they happened, replay applies the prefix and none of the batch's callers had an
answer (as after a crash between a commit and its replies; a retried Place is answered
from the log). A failed Txn after some succeeded raises as any failed append does; the
records of the Txns that succeeded are in the log and in the store's copy of it, which is
what the server rebuilds its state from.

Reads come from a copy of the log in memory (from the last compaction on: snapshots and
compaction bound it), loaded with a paged Range at open and extended by each append: reads
keep working while etcd is unreachable, and an append that could not reach it raises
EtcdUnavailable (a StoreUnwritable), so the server refuses mutations and probes until etcd
answers again.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence

from ..etcd.etcdserverpb import rpc_pb2 as rpc
from ..ha.election import Election, leader_key
from ..ha.etcd_client import DEFAULT_MAX_REQUEST_BYTES, EtcdClient, EtcdUnavailable, prefix_end
from .base import (
    COMPACTED_KEY,
    INCARNATION_KEY,
    Record,
    SnapshotStorage,
    Store,
    StoreError,
    StoreUnwritable,
    check_contiguous,
)

log = logging.getLogger("hci_scheduler.store")

#: Room a Txn keeps under the request limit for its compares and framing.
_TXN_OVERHEAD = 4096
#: Per event in a log value: its type and its body's length.
_FRAME = struct.Struct("<HI")
#: Snapshot chunk size: well under the request limit.
SNAPSHOT_CHUNK_BYTES = 1024 * 1024


class NotLeader(StoreUnwritable):
    """This replica does not hold the leader key (any more), or won it and has not applied
    the log's tail yet: the write was refused whole. A StoreUnwritable: the server goes on
    serving reads as a follower and refuses mutations until it leads (ha/replica.py)."""


def _seq(sequence: int) -> str:
    return f"{sequence:020d}"


def encode_group(records: Sequence[Record]) -> bytes:
    """The value of a log key: each record's type, body length and body."""
    pack = _FRAME.pack
    return b"".join(pack(r.kind, len(r.body)) + r.body for r in records)


def decode_group(first: int, value: bytes) -> list[Record]:
    """The records a log key holds, numbered from `first`; StoreError when garbled."""
    out, i, n, seq = [], 0, len(value), first
    unpack = _FRAME.unpack_from
    size = _FRAME.size
    while i < n:
        if i + size > n:
            raise StoreError(f"log key {first}: truncated at byte {i}")
        kind, length = unpack(value, i)
        i += size
        if i + length > n:
            raise StoreError(f"log key {first}: event {seq} overruns the value")
        out.append(Record(seq, kind, value[i:i + length]))
        i += length
        seq += 1
    if not out:
        raise StoreError(f"log key {first}: empty")
    return out


class EtcdStore(Store):
    """The event log under `prefix` in etcd, written while `election` leads.

    Parameters
    ----------
    client : EtcdClient
    prefix : str
        Every key of this scheduler starts with it (several schedulers may share one etcd).
    election : Election, optional
        The candidacy whose token fences every write; None: a read-only store (writes
        raise NotLeader).
    max_request_bytes : int
        etcd's --max-request-bytes: larger appends are split (see the module docstring).
    """

    def __init__(self, client: EtcdClient, prefix: str = "/hci", election: Election | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, own_client: bool = False):
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise StoreError(f"etcd prefix must start with '/' and not end with one, got {prefix!r}")
        self.client = client
        self.prefix = prefix
        self.election = election
        self.max_request_bytes = max_request_bytes
        self._own_client = own_client
        self._leader_key = leader_key(prefix)
        self._log_prefix = f"{prefix}/log/".encode()
        self._meta_prefix = f"{prefix}/meta/".encode()
        self._lock = threading.RLock()
        self._closed = False
        self.commits = 0  # Txns committed by append
        self.commit_seconds = 0.0  # their total time (etcd commit latency, for metrics)
        self.on_commit: Callable[[float], None] | None = None  # gets each Txn's seconds (a latency histogram)
        self._uncertain: int | None = None  # first sequence of an append whose outcome is unknown
        self._meta: dict[str, str] = {}
        # The token writes are accepted under: the election's, once this store holds the whole
        # log of that term (at open when it leads, else accept_writes after refresh).
        self._writable_token: int | None = None
        self._records: list[Record] = []
        self._groups: list[int] = []  # the first sequence of each log key, ascending
        # The newest snapshot this replica wrote or read, (sequence, bytes): with the log in memory
        # it rebuilds the state after a refused batch while etcd cannot be reached (EtcdSnapshots).
        self.snapshot_cache: tuple[int, bytes] | None = None
        self._load()
        if election is not None and election.revision is not None:
            self._writable_token = election.revision  # it led before the log was read: the log is whole

    # -- open ----------------------------------------------------------------

    def _load(self) -> None:
        """Read meta and the log into memory; finish a compaction a crash interrupted."""
        self._meta, revision = self._read_meta()
        self._read_log(int(self._meta.get(COMPACTED_KEY) or 0), revision)

    def _read_meta(self) -> tuple[dict[str, str], int]:
        """The meta keys as etcd holds them, and the revision they were read at."""
        resp = self.client.range(self._meta_prefix, prefix_end(self._meta_prefix))
        return {kv.key[len(self._meta_prefix):].decode(): kv.value.decode() for kv in resp.kvs}, resp.header.revision

    def _read_log(self, compacted: int, revision: int = 0) -> None:
        """Replace the log in memory with the one etcd holds after `compacted` (at `revision`,
        the one meta was read at, when given: a compaction between the two reads would
        otherwise look like a gap). Log keys whose events are all compacted are counted as
        stale: a compaction a crash interrupted, deleted by the next one."""
        n = len(self._log_prefix)
        expected = compacted + 1
        records: list[Record] = []
        groups: list[int] = []
        stale = 0
        for kv in self.client.range_prefix(self._log_prefix, revision=revision):
            first = int(kv.key[n:])
            group = decode_group(first, kv.value)
            if group[-1].sequence <= compacted:
                stale += 1
                continue
            # The first key kept may straddle compacted_seq; every later one continues the last.
            if first > expected or (first != expected and groups):
                raise StoreError(f"etcd log {self.prefix}: sequence {first} follows {expected - 1} (a gap)")
            groups.append(first)
            records.extend(r for r in group if r.sequence > compacted)
            expected = group[-1].sequence + 1
        self._compacted, self._records, self._groups = compacted, records, groups
        self._last = expected - 1
        self._stale = stale

    # -- fenced writes ---------------------------------------------------------

    def _token(self) -> int:
        if self.election is None:
            raise NotLeader(f"etcd store {self.prefix} is open read-only (no election)")
        token = self.election.check()
        if token != self._writable_token:
            raise NotLeader("this replica won the leader key and has not applied the log's tail yet")
        return token

    def accept_writes(self) -> None:
        """Write under the election's current token: call once this store and the state
        above it hold the whole log (refresh, then the state applied it)."""
        with self._lock:
            self._writable_token = self.election.check()

    @property
    def leading(self) -> bool:
        """Whether writes go through now (as far as this replica knows)."""
        e = self.election
        return e is not None and e.is_leader and e.revision == self._writable_token

    def refresh(self) -> int:
        """Read what other replicas wrote since this store last looked: meta, and the log keys
        after the last event it holds (a follower's view of the leader's log), both at one
        etcd revision. When the log was compacted past the last event held (this replica was
        paused or cut off while the leader wrote on), the log in memory is replaced by the
        one etcd holds: the state above then catches up from a snapshot (SchedulerState.follow).
        Returns how many events the log in memory moved on by; StoreError on a gap."""
        with self._lock:
            self._check_open()
            before = self._last
            self._meta, revision = self._read_meta()
            compacted = int(self._meta.get(COMPACTED_KEY) or 0)
            if compacted > self._last:
                log.warning("the log was compacted past this replica: reading it from the compaction on",
                            extra={"fields": {"prefix": self.prefix, "compacted": compacted, "last": self._last}})
                self._read_log(compacted, revision)
                self._uncertain = None  # what etcd holds is read: a late commit is in memory now
                return self._last - before
            if compacted > self._compacted:
                self._trim(compacted)
            n = len(self._log_prefix)
            start = self._log_prefix + _seq(self._last + 1).encode()
            for kv in self.client.range_prefix(start, end=prefix_end(self._log_prefix), revision=revision):
                first = int(kv.key[n:])
                if first != self._last + 1:
                    raise StoreError(f"etcd log {self.prefix}: sequence {first} follows {self._last} (a gap)")
                group = decode_group(first, kv.value)
                self._records.extend(group)
                self._groups.append(first)
                self._last = group[-1].sequence
            self._uncertain = None
            return self._last - before

    def _trim(self, upto: int) -> None:
        """Forget the events up to upto (compacted) from memory."""
        keep = len(self._groups) if upto == self._last else bisect.bisect_right(self._groups, upto + 1) - 1
        del self._groups[:max(keep, 0)]
        del self._records[:upto - self._compacted]
        self._compacted = upto

    def _fenced(self, ops: list, compares: Sequence = (), what: str = "write") -> rpc.TxnResponse:
        """One Txn of `ops` that commits only while this replica holds the leader key (and
        `compares` hold). NotLeader (and a step-down) when the key is not ours any more."""
        token = self._token()
        cmp = [rpc.Compare(key=self._leader_key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL,
                           create_revision=token), *compares]
        failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=self._leader_key))]
        resp = self.client.txn(cmp, ops, failure)
        if resp.succeeded:
            return resp
        kvs = resp.responses[0].response_range.kvs
        if not kvs or kvs[0].create_revision != token:
            holder = kvs[0].value.decode(errors="replace") if kvs else "nobody"
            why = f"fenced {what} refused: the leader key is held by {holder}, not this replica (token {token})"
            self.election.step_down(why)
            raise NotLeader(why)
        raise StoreError(f"etcd store {self.prefix}: {what} refused although this replica leads: the log "
                         "moved on without it (a write whose answer was lost committed); restart to replay")

    def _batches(self, records: Sequence[Record]):
        """records split so that each Txn stays under the request limit."""
        room = self.max_request_bytes - _TXN_OVERHEAD
        batch, size = [], 0
        for r in records:
            cost = len(r.body) + _FRAME.size
            if cost > room:
                raise StoreError(f"event {r.sequence} is {len(r.body)} bytes: over etcd's request limit "
                                 f"({self.max_request_bytes} bytes, --max-request-bytes)")
            if batch and size + cost > room:
                yield batch
                batch, size = [], 0
            batch.append(r)
            size += cost
        if batch:
            yield batch

    def append(self, records: Sequence[Record]) -> None:
        """One fenced Txn per call (several only past etcd's request limit: see the module
        docstring). NotLeader writes nothing; EtcdUnavailable may have written the Txn it
        was sending (resolved by probe_write and by the next append's compares)."""
        if not records:
            return
        with self._lock:
            self._check_open()
            check_contiguous(self._last, records)
            if self._uncertain is not None:
                self._resolve_uncertain()
            for batch in self._batches(records):
                first = self._log_prefix + _seq(batch[0].sequence).encode()
                ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=first, value=encode_group(batch)))]
                # No log key at or after `first` exists: over the range, so a key written by a Txn whose
                # answer was lost (or by anything else) is caught wherever it starts.
                absent = rpc.Compare(key=first, range_end=prefix_end(self._log_prefix), target=rpc.Compare.CREATE,
                                     result=rpc.Compare.EQUAL, create_revision=0)
                t0 = time.perf_counter()
                try:
                    self._fenced(ops, [absent], "append")
                except EtcdUnavailable:
                    self._uncertain = batch[0].sequence
                    raise
                seconds = time.perf_counter() - t0
                self.commit_seconds += seconds
                self.commits += 1
                if self.on_commit is not None:
                    self.on_commit(seconds)
                self._records.extend(batch)
                self._groups.append(batch[0].sequence)
                self._last = batch[-1].sequence

    def _resolve_uncertain(self) -> None:
        """An append whose answer was lost (etcd without a quorum holds a proposal and may
        commit it once a member returns). Committed after all: the state above undid it, so
        writes stop (NotLeader) until the replica has read and applied the log again
        (refresh, then accept_writes: ha/replica.py does both). Not committed: forgotten; a
        Txn still in flight would commit before the next append, whose compare then fails."""
        seq = self._uncertain
        resp = self.client.range(self._log_prefix + _seq(seq).encode(), keys_only=True)
        if resp.kvs:
            self._writable_token = None
            raise NotLeader(f"event {seq}, written while etcd did not answer, committed after all: "
                            "applying the log before writing again")
        self._uncertain = None

    def probe_write(self) -> None:
        """A fenced write of the meta key `probe`: StoreUnwritable while etcd cannot be
        reached, NotLeader once this replica lost the lead."""
        with self._lock:
            self._check_open()
            if self._uncertain is not None:
                self._resolve_uncertain()
            self._fenced([rpc.RequestOp(request_put=rpc.PutRequest(key=self._meta_prefix + b"probe", value=b"1"))],
                         what="probe")

    # -- meta ------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._check_open()
            self._fenced([rpc.RequestOp(request_put=rpc.PutRequest(key=self._meta_prefix + key.encode(),
                                                                   value=value.encode()))], what="meta")
            self._meta[key] = value

    # -- compaction ------------------------------------------------------------

    def compacted_sequence(self) -> int:
        return self._compacted

    def compact(self, upto: int) -> None:
        """Record compacted_seq and delete the log keys whose events are all at or before it,
        in one fenced Txn (a DeleteRange is one small request however many keys it covers;
        a key that straddles upto stays, and its first events are skipped); then compact
        etcd's own history up to the revision of the previous compaction, so watchers keep
        one snapshot interval of history and etcd's database does not grow without end."""
        with self._lock:
            self._check_open()
            upto = min(upto, self._last)
            if upto <= self._compacted:
                return
            # Keys [0, keep) hold only events <= upto: the one holding upto + 1 and later stay.
            keep = len(self._groups) if upto == self._last else bisect.bisect_right(self._groups, upto + 1) - 1
            ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=self._meta_prefix + COMPACTED_KEY.encode(),
                                                            value=str(upto).encode()))]
            if keep > 0 or self._stale:
                end = (self._log_prefix + _seq(self._groups[keep]).encode() if keep < len(self._groups)
                       else prefix_end(self._log_prefix))
                ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._log_prefix,
                                                                                      range_end=end)))
            resp = self._fenced(ops, what="compaction")
            self._meta[COMPACTED_KEY] = str(upto)
            self._trim(upto)
            self._stale = 0
            previous = int(self._meta.get("etcd_compacted_revision") or 0)
            if previous:
                try:
                    self.client.compact(previous)
                except StoreError as exc:  # compacted already (by etcd's auto-compaction, say)
                    log.info("etcd history compaction skipped", extra={"fields": {"reason": str(exc)}})
        self.set_meta("etcd_compacted_revision", str(resp.header.revision))

    # -- reading ---------------------------------------------------------------

    def read(self, after: int = 0, limit: int | None = None) -> list[Record]:
        with self._lock:
            self._check_open()
            start = max(after - self._compacted, 0)
            out = self._records[start:] if limit is None else self._records[start:start + limit]
            return list(out)

    def last_sequence(self) -> int:
        return self._last

    def snapshots(self) -> EtcdSnapshots:
        return EtcdSnapshots(self)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def close(self) -> None:
        """Stop writing: resign the election (a standby takes over at once) and close the client if owned."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.election is not None:
            self.election.resign()
        if self._own_client:
            self.client.close()


class EtcdSnapshots(SnapshotStorage):
    """Snapshots as chunked keys `<prefix>/snap/<seq>/<n>` plus a manifest written last (a
    snapshot without one is incomplete: never listed, removed by `clean`). Every write is
    fenced like the log's.

    The newest snapshot written or read stays in memory (the store's snapshot_cache): while
    etcd cannot be reached, `list` and `get` answer from it, so that a batch etcd did not
    take can still be undone by rebuilding the state (snapshot plus the log in memory)
    and reads go on. The price is one snapshot's bytes of memory."""

    def _remember(self, sequence: int, data: bytes) -> None:
        cached = self.store.snapshot_cache
        if cached is None or cached[0] <= sequence:
            self.store.snapshot_cache = (sequence, data)

    def __init__(self, store: EtcdStore):
        self.store = store
        self.client = store.client
        self._prefix = f"{store.prefix}/snap/".encode()

    def __repr__(self) -> str:
        return f"etcd {self._prefix.decode()}"

    def writable(self) -> bool:
        return self.store.leading

    def _key(self, sequence: int, part: str) -> bytes:
        return self._prefix + f"{_seq(sequence)}/{part}".encode()

    def name(self, sequence: int) -> str:
        return self._key(sequence, "").decode()

    def put(self, sequence: int, data: bytes) -> str:
        chunks = [data[i:i + SNAPSHOT_CHUNK_BYTES] for i in range(0, len(data), SNAPSHOT_CHUNK_BYTES)] or [b""]
        for n, chunk in enumerate(chunks):
            self.store._fenced([rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(sequence, f"{n:06d}"),
                                                                         value=chunk))], what="snapshot chunk")
        manifest = json.dumps({"chunks": len(chunks), "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}).encode()
        self.store._fenced([rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(sequence, "manifest"),
                                                                     value=manifest))], what="snapshot manifest")
        self._remember(sequence, data)
        return self.name(sequence)

    def _sequences(self, manifest: bool) -> set[int]:
        n = len(self._prefix)
        out = set()
        for kv in self.client.range_prefix(self._prefix, keys_only=True):
            seq, _, part = kv.key[n:].decode().partition("/")
            if not manifest or part == "manifest":
                out.add(int(seq))
        return out

    def list(self) -> list[int]:
        try:
            return sorted(self._sequences(manifest=True), reverse=True)
        except EtcdUnavailable:
            if self.store.snapshot_cache is not None:
                return [self.store.snapshot_cache[0]]
            if self.store.compacted_sequence() == 0:
                return []  # the whole log is in memory: a replay needs no snapshot
            raise

    def get(self, sequence: int) -> bytes:
        cached = self.store.snapshot_cache
        if cached is not None and cached[0] == sequence:
            return cached[1]
        data = self._get(sequence)
        self._remember(sequence, data)
        return data

    def _get(self, sequence: int) -> bytes:
        man = self.client.range(self._key(sequence, "manifest"))
        if not man.kvs:
            raise StoreError(f"snapshot {self.name(sequence)}: no manifest")
        try:
            meta = json.loads(man.kvs[0].value)
            n_chunks, size, digest = int(meta["chunks"]), int(meta["size"]), meta["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"snapshot {self.name(sequence)}: bad manifest: {exc}") from exc
        parts = [kv.value for kv in self.client.range_prefix(self._key(sequence, ""), page=8)
                 if not kv.key.endswith(b"/manifest")]
        data = b"".join(parts)
        if len(parts) != n_chunks or len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise StoreError(f"snapshot {self.name(sequence)}: chunks do not match the manifest "
                             f"({len(parts)} of {n_chunks} chunks, {len(data)} of {size} bytes)")
        return data

    def delete(self, sequence: int) -> None:
        if self.store.snapshot_cache is not None and self.store.snapshot_cache[0] == sequence:
            self.store.snapshot_cache = None
        # The manifest first: a crash half-way leaves an incomplete snapshot, never a listed broken one.
        manifest = self._key(sequence, "manifest")
        self.store._fenced([rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=manifest))],
                           what="snapshot delete")
        start = self._key(sequence, "")
        self.store._fenced([rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
            key=start, range_end=prefix_end(start)))], what="snapshot delete")

    def set_aside(self, sequence: int) -> str:
        """Rename its manifest to `manifest.beyond-log` (the chunks stay)."""
        old = self.client.range(self._key(sequence, "manifest"))
        if not old.kvs:
            return "gone already"
        try:
            self.store._fenced([rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._key(sequence, "manifest.beyond-log"), value=old.kvs[0].value)),
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key(sequence, "manifest")))],
                what="snapshot set aside")
        except StoreError as exc:
            return f"cannot set it aside: {exc}"
        return f"manifest renamed to {self._key(sequence, 'manifest.beyond-log').decode()}"

    def clean(self) -> None:
        """Remove snapshots that have chunks and no manifest (a leader that died writing one)."""
        if not self.store.leading:
            return  # only the leader writes (not even one that has not applied the log yet)
        for seq in self._sequences(manifest=False) - self._sequences(manifest=True):
            if not self.client.range(self._key(seq, "manifest.beyond-log"), keys_only=True).kvs:
                start = self._key(seq, "")
                self.store._fenced([rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                    key=start, range_end=prefix_end(start)))], what="snapshot clean")


def open_etcd_store(spec: str, prefix: str = "/hci", advertise: str = "", ttl_s: int = 1,
                    timeout_s: float = 2.0, ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None, stop: threading.Event | None = None,
                    campaign: bool = False) -> EtcdStore:
    """The store of `hci-scheduler serve --store etcd://...`: connect, try once to win the
    leader key, and open the log: as leader, or as follower (ha/replica.py follows the
    leader's log and takes over when the key is free). A follower of a log that has no
    incarnation yet waits for the leader to create it. With `campaign`, block until this
    replica leads instead. While no etcd member answers (EtcdUnavailable: down, no quorum,
    a TLS handshake refused) it waits and tries again, as a replica that lost etcd after
    opening does: a replica started during a brief etcd outage comes up when etcd does.
    StoreError when `stop` is set first."""
    from ..ha.etcd_client import parse_endpoints

    client = EtcdClient(parse_endpoints(spec), timeout_s, ca_file, cert_file, key_file)
    t0, delay = time.monotonic(), 0.1
    try:
        while True:
            try:
                store = _open(client, prefix, advertise, ttl_s, stop, campaign)
            except EtcdUnavailable as exc:
                if delay == 0.1:
                    log.warning("etcd unavailable: waiting for it to open the store", extra={"fields": {
                        "prefix": prefix, "reason": str(exc)}})
                if stop is not None and stop.wait(delay):
                    raise StoreError("stopped before etcd answered") from exc
                if stop is None:
                    time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            try:
                leader = store.election.leader()
            except StoreError:  # gone again: the replica's loop deals with it from here
                leader = None
            log.info("etcd store open", extra={"fields": {
                "prefix": prefix, "role": "leader" if store.election.revision is not None else "follower",
                "leader": leader[0] if leader else None, "last_sequence": store.last_sequence(),
                "waited_s": round(time.monotonic() - t0, 3)}})
            return store
    except BaseException:
        client.close()
        raise


def _open(client: EtcdClient, prefix: str, advertise: str, ttl_s: int, stop: threading.Event | None,
          campaign: bool) -> EtcdStore:
    """One attempt of open_etcd_store."""
    election = Election(client, prefix, advertise, ttl_s)
    if not campaign:
        _lead_or_follow(election, prefix, stop)
    elif not election.campaign(stop=stop):
        raise StoreError("stopped before this replica became leader")
    try:
        return EtcdStore(client, prefix, election, own_client=True)
    except BaseException:
        election.resign()
        raise


def _lead_or_follow(election: Election, prefix: str, stop: threading.Event | None) -> None:
    """Win the leader key, or return as a follower once the log has its incarnation (a
    leader started it: a follower can write nothing, not even the log's meta)."""
    key = f"{prefix}/meta/{INCARNATION_KEY}".encode()
    while not (stop and stop.is_set()):
        if election.try_acquire() or election.client.range(key, keys_only=True).kvs:
            return
        time.sleep(0.05)
    raise StoreError("stopped before the log was started")
