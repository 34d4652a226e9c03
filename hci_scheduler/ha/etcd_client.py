"""A small etcd v3 client over the stubs generated from etcd's own protos (protos/etcd/).

Why not a wrapper package: the python-etcd3 package is unmaintained and breaks on protobuf >= 4
(python-etcd3 #1957); the API protos are etcd's public, versioned contract, and grpcio and
protobuf are already this project's dependencies. This module adds only what the store and
the election need: endpoint failover, TLS, a deadline per call, and typed errors.

Failover: calls go to the endpoint that answered last; one that cannot serve the call
(refused, reset, no route, no quorum, past the deadline) passes it to the next, each endpoint
once. When every endpoint fails,
or a call runs past its deadline (a member cut off from its quorum answers nothing),
EtcdUnavailable is raised: a StoreUnwritable, so the server keeps serving reads and refuses
mutations until etcd answers again. A write whose call failed may still have committed; the
store resolves that with its compares (see store/etcd.py).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import grpc

from ..errors import ValidationError
from ..etcd.etcdserverpb import rpc_pb2 as rpc
from ..etcd.etcdserverpb import rpc_pb2_grpc as rpc_grpc
from ..store.base import StoreError, StoreUnwritable

#: etcd's default --max-request-bytes (1.5 MiB): a larger request is refused.
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
_RECEIVE_LIMIT = 256 * 1024 * 1024  # a page of the log or a snapshot chunk, with room to spare
#: Answers that say the request itself is wrong: another member would say the same. Anything
#: else (UNAVAILABLE, DEADLINE_EXCEEDED, and UNKNOWN "context deadline exceeded", which a member
#: without a quorum returns) means this member cannot serve it now: the next one may.
_DEFINITIVE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNIMPLEMENTED)


class EtcdUnavailable(StoreUnwritable):
    """No etcd endpoint answered in time (all down, or cut off from their quorum)."""


class EtcdError(StoreError):
    """etcd answered with an error that waiting will not cure (bad request, auth, too large)."""


def parse_endpoints(spec: str) -> list[str]:
    """HOST:PORT list of `etcd://HOST:PORT[,HOST:PORT...]` (the scheme is optional)."""
    rest = spec.removeprefix("etcd://")
    endpoints = [e.strip() for e in rest.split(",") if e.strip()]
    if not endpoints:
        raise ValidationError(f"store must look like etcd://HOST:PORT[,HOST:PORT...], got {spec!r}")
    for e in endpoints:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValidationError(f"etcd endpoint must look like HOST:PORT, got {e!r} in {spec!r}")
    return endpoints


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a Range or DeleteRange cover every key starting with prefix."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"  # all keys


class EtcdClient:
    """Channels to the etcd endpoints, used one at a time.

    Parameters
    ----------
    endpoints : sequence of str
        HOST:PORT of the etcd members (see parse_endpoints).
    timeout_s : float
        Deadline of one call on one endpoint.
    ca_file, cert_file, key_file : str, optional
        PEM files: the CA that signed the members' certificates (TLS), and this client's
        certificate and key (mutual TLS).
    """

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 2.0, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None):
        if not endpoints:
            raise ValidationError("etcd endpoints must not be empty")
        if timeout_s <= 0:
            raise ValidationError(f"etcd timeout_s must be > 0, got {timeout_s}")
        if (cert_file is None) != (key_file is None):
            raise ValidationError("etcd client certificate and key go together (--etcd-cert with --etcd-key)")
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._creds = None
        if ca_file or cert_file:
            self._creds = grpc.ssl_channel_credentials(_read(ca_file), _read(key_file), _read(cert_file))
        self._lock = threading.Lock()
        self._current = 0
        self._channels: dict[int, grpc.Channel] = {}
        self._closed = False

    def _channel(self, i: int) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise StoreError("etcd client is closed")
            ch = self._channels.get(i)
            if ch is None:
                opts = [("grpc.max_receive_message_length", _RECEIVE_LIMIT),
                        ("grpc.max_send_message_length", _RECEIVE_LIMIT),
                        # Reconnect to a member that came back within a second, not gRPC's backoff of up to 2 min.
                        ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
                target = self.endpoints[i]
                ch = (grpc.secure_channel(target, self._creds, opts) if self._creds is not None
                      else grpc.insecure_channel(target, opts))
                self._channels[i] = ch
            return ch

    def stub(self, kind, i: int | None = None):
        """A stub of service `kind` (rpc_grpc.KVStub, ...) on endpoint i (default: the current one)."""
        return kind(self._channel(self._current if i is None else i))

    def call(self, kind, method: str, request, timeout_s: float | None = None):
        """One unary call, failing over to the next endpoint on UNAVAILABLE."""
        n = len(self.endpoints)
        start = self._current
        errors = []
        for k in range(n):
            i = (start + k) % n
            fn = getattr(kind(self._channel(i)), method)
            try:
                resp = fn(request, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                code = exc.code()
                errors.append(f"{self.endpoints[i]}: {code.name} {exc.details()}")
                if code in _DEFINITIVE:
                    raise EtcdError(f"etcd {method} failed: {code.name}: {exc.details()}") from None
                continue  # down, or cut off from its quorum: another member may answer
            self._current = i
            return resp
        raise EtcdUnavailable(f"etcd {method} failed on every endpoint: {'; '.join(errors)}")

    # -- KV ------------------------------------------------------------------

    def range(self, key: bytes, range_end: bytes = b"", limit: int = 0, keys_only: bool = False,
              revision: int = 0, timeout_s: float | None = None) -> rpc.RangeResponse:
        req = rpc.RangeRequest(key=key, range_end=range_end, limit=limit, keys_only=keys_only, revision=revision,
                               sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY)
        return self.call(rpc_grpc.KVStub, "Range", req, timeout_s)

    def range_prefix(self, prefix: bytes, page: int = 5000, keys_only: bool = False,
                     end: bytes | None = None, revision: int = 0) -> Iterator:
        """Every key-value under prefix (or in [prefix, end)) in key order, in pages, all at one
        revision (`revision`, else the first page's), so a concurrent writer cannot make a page
        skip or repeat a key."""
        end = end or prefix_end(prefix)
        key = prefix
        while True:
            resp = self.range(key, end, limit=page, keys_only=keys_only, revision=revision)
            revision = revision or resp.header.revision
            yield from resp.kvs
            if not resp.more or not resp.kvs:
                return
            key = resp.kvs[-1].key + b"\0"

    def txn(self, compare: list, success: list, failure: list = (),
            timeout_s: float | None = None) -> rpc.TxnResponse:
        return self.call(rpc_grpc.KVStub, "Txn", rpc.TxnRequest(compare=compare, success=success, failure=failure),
                         timeout_s)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> rpc.PutResponse:
        return self.call(rpc_grpc.KVStub, "Put", rpc.PutRequest(key=key, value=value, lease=lease))

    def delete_prefix(self, prefix: bytes) -> rpc.DeleteRangeResponse:
        return self.call(rpc_grpc.KVStub, "DeleteRange", rpc.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix)))

    def compact(self, revision: int) -> None:
        """Drop etcd's history of key versions up to revision (not the keys: etcd's MVCC compaction)."""
        self.call(rpc_grpc.KVStub, "Compact", rpc.CompactionRequest(revision=revision, physical=False))

    # -- Lease and Maintenance -----------------------------------------------

    def grant(self, ttl_s: int) -> rpc.LeaseGrantResponse:
        resp = self.call(rpc_grpc.LeaseStub, "LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl_s))
        if resp.error:
            raise EtcdError(f"etcd LeaseGrant failed: {resp.error}")
        return resp

    def revoke(self, lease: int) -> None:
        self.call(rpc_grpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease))

    def keep_alive_once(self, lease: int, timeout_s: float) -> int:
        """Renew the lease once; its remaining TTL (0: it expired). A stream per renewal keeps
        failover simple; at TTL/3 intervals that is a few calls a second."""
        n = len(self.endpoints)
        errors = []
        for k in range(n):
            i = (self._current + k) % n
            stub = rpc_grpc.LeaseStub(self._channel(i))
            try:
                for resp in stub.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]), timeout=timeout_s):
                    self._current = i
                    return int(resp.TTL)
                errors.append(f"{self.endpoints[i]}: stream ended without an answer")
            except grpc.RpcError as exc:
                errors.append(f"{self.endpoints[i]}: {exc.code().name} {exc.details()}")
        raise EtcdUnavailable(f"etcd LeaseKeepAlive failed on every endpoint: {'; '.join(errors)}")

    def status(self, endpoint: int | None = None) -> rpc.StatusResponse:
        """The status of one member (default: the current one): its version, its raft leader."""
        if endpoint is None:
            return self.call(rpc_grpc.MaintenanceStub, "Status", rpc.StatusRequest())
        return rpc_grpc.MaintenanceStub(self._channel(endpoint)).Status(rpc.StatusRequest(), timeout=self.timeout_s)

    def watch(self, key: bytes, range_end: bytes = b"", start_revision: int = 0,
              timeout_s: float | None = None):
        """A Watch stream over [key, range_end) from start_revision: an iterator of WatchResponse
        (cancel() on it ends the stream). Opened on the current endpoint."""
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision))
        done = threading.Event()

        def requests():
            yield create
            done.wait()  # keep the request side open: closing it ends the watch

        stub = rpc_grpc.WatchStub(self._channel(self._current))
        stream = stub.Watch(requests(), timeout=timeout_s)
        stream.add_callback(done.set)
        return stream

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()
