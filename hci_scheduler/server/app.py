"""Build and run the gRPC server.

`create_server(address, ...)` builds a ready-to-start server bound to
`address` and returns it with the bound port (bind "127.0.0.1:0" in tests);
`serve(server)` starts it and blocks until SIGTERM/SIGINT, then stops
gracefully: health goes NOT_SERVING, in-flight calls get `grace` seconds, the
writer drains its queue and the store is closed.

Security: TLS (and mutual TLS with a client CA) by certificate files, and
optional bearer tokens read from a file (never logged). Without TLS the server
refuses a non-loopback address, for gRPC and for the metrics endpoint alike
(bearer tokens alone would cross the network in clear text, metrics have no
authentication), unless `allow_insecure_remote=True`, which it then logs as a
warning; it logs too that it listens on loopback only. With TLS, the metrics are
served over HTTPS with the server's certificate (and its client CA).
"""
from __future__ import annotations

import faulthandler
import gc
import hmac
import ipaddress
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..v1 import scheduler_pb2 as pb
from .limits import MAX_REQUEST_BYTES
from .metrics import Metrics
from .service import SchedulerServicer, method_handlers
from .snapshot import DEFAULT_EVERY as DEFAULT_SNAPSHOT_EVERY, DEFAULT_TAIL as DEFAULT_SNAPSHOT_TAIL
from .state import SchedulerState

log = logging.getLogger("hci_scheduler.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
TRANSPORTS = ("grpcio", "aio", "lean")


@dataclass
class TLSConfig:
    """Certificate files (PEM). client_ca set means mutual TLS: clients must
    present a certificate signed by it."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass
class ServerOptions:
    data_dir: str | None = None
    # High availability: etcd://HOST:PORT[,...] instead of data_dir (store/etcd.py). The replica
    # leads when <etcd_prefix>/leader is free (advertising `advertise`, default the listen
    # address), else follows the leader's log, serves reads and refuses mutations (ha/replica.py).
    store: str | None = None
    etcd_prefix: str = "/hci"
    etcd_ca_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_key_file: str | None = None
    advertise: str | None = None
    lease_ttl_s: int = 1
    fsync: str = "FULL"  # SQLite synchronous mode: FULL (durable on power loss) or NORMAL
    # With a data_dir: a snapshot every snapshot_every events (0: only at a clean stop), then the
    # log is compacted, keeping snapshot_tail events before the newest snapshot (server/snapshot.py).
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    snapshot_tail: int = DEFAULT_SNAPSHOT_TAIL
    dimensions: Sequence[str] | None = None
    tls: TLSConfig | None = None
    token_file: str | None = None
    allow_insecure_remote: bool = False
    metrics_address: str | None = None  # HOST:PORT of the Prometheus endpoint that serve() starts
    transport: str = "grpcio"  # or "aio", "lean": see _grpc_server
    pollers: int = 16  # unary calls handled at once (lean: threads polling gRPC's queue)
    max_workers: int = 128  # streaming calls handled at once (WatchEvents, health Watch, reflection)
    grace_s: float = 5.0
    # Agents (server/hosts_health.py): a host whose agent reported once goes DOWN after this
    # many seconds of silence; the containers of a host DOWN this long are re-placed (0: never).
    host_down_after_s: float = 15.0
    down_reschedule_after_s: float = 60.0
    metrics: Metrics | None = field(default=None, repr=False)


def _quiet_gc() -> None:
    """Keep the cyclic GC off the reply path: the replayed state (hosts, allocations)
    moves to the permanent generation, so collections never walk it, and young
    collections run far less often: a full collection over a large state stalled
    unary Place calls (bench/README.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1000)


def read_tokens(path: str) -> frozenset[str]:
    """Bearer tokens, one per line; blank lines and '#' comments are skipped."""
    with open(path, encoding="utf-8") as f:
        tokens = frozenset(ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#"))
    if not tokens:
        raise ValueError(f"token file {path} holds no token")
    return tokens


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` from the token file
    (health checks are exempt so that probes work without secrets)."""

    def __init__(self, tokens: frozenset[str]):
        self._tokens = tuple(t.encode() for t in tokens)

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                v = value.encode() if isinstance(value, str) else value
                if not v.startswith(b"Bearer "):
                    return False
                given = v[7:].strip()
                # Compare against every token so timing says nothing about which matched.
                ok = False
                for t in self._tokens:
                    ok |= hmac.compare_digest(given, t)
                return ok
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_HEALTH_PREFIX):
            return handler
        if self._ok(handler_call_details.invocation_metadata):
            return handler
        return _deny(handler)


def _deny(handler):
    def abort(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must look like HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Server:
    """A started-or-not gRPC server with its state, health and metrics."""

    def __init__(self, grpc_server, port, state, servicer, health_servicer, metrics):
        self.grpc = grpc_server
        self.port = port
        self.state = state
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.fatal: BaseException | None = None  # the store failure that stopped the server
        self.replica = None  # on an etcd store: ha.replica.Replica

    def start(self) -> None:
        self.grpc.start()
        self.state.health.start(self.state)  # hosts whose agent falls silent go DOWN
        self.writable_changed(self.state.unwritable_reason is None)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.replica is not None:  # follows or leads on etcd
            self.replica.start()

    def writable_changed(self, writable: bool, reason: str = "") -> None:
        """The scheduler service is NOT_SERVING while the store refuses writes (reads
        still work; the overall "" status stays SERVING, so a supervisor does not restart
        a server that a restart would not cure)."""
        status = health_pb2.HealthCheckResponse.SERVING if writable else health_pb2.HealthCheckResponse.NOT_SERVING
        self.health.set(SERVICE_NAME, status)

    def stop_fatally(self, exc: BaseException) -> None:
        """A store failure the server cannot serve through: stop, and make the exit code
        say so (see serve)."""
        self.fatal = exc
        log.error("store failed: stopping", extra={"fields": {"cause": str(exc)}})
        threading.Thread(target=self.stop, args=(0,), daemon=True).start()

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking calls, give in-flight calls `grace` seconds, drain the writer,
        close the store. Safe to call twice."""
        if self._stopping.is_set():
            self._stopped.wait()
            return
        self._stopping.set()
        try:
            self.health.enter_graceful_shutdown()
            self.servicer.stopping = True
            self.state.health.stop()
            self.grpc.stop(grace).wait()
            if self.replica is not None:
                self.replica.stop()
            self.state.close()
            log.info("server stopped", extra={"fields": {"sequence": self.state.sequence}})
        finally:
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def create_server(address: str, options: ServerOptions | None = None, **kwargs) -> tuple[Server, int]:
    """Build the server bound to `address`; returns (server, bound port). Not started.

    Keyword arguments override fields of `options` (see ServerOptions).
    """
    opts = options or ServerOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"create_server got an unknown option {k!r}")
        setattr(opts, k, v)
    host, _ = split_address(address)
    if opts.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {opts.transport!r}")
    if opts.pollers < 1 or opts.max_workers < 1:
        raise ValueError(f"pollers and max_workers must be at least 1, got {opts.pollers} and {opts.max_workers}")
    tokens = read_tokens(opts.token_file) if opts.token_file else None
    secured = opts.tls is not None or tokens is not None
    if not secured and not is_loopback(host) and not opts.allow_insecure_remote:
        raise ValueError(
            f"refusing to listen on {address} without TLS or tokens; use a loopback address, "
            "configure credentials, or allow_insecure_remote (--allow-insecure-remote)")
    if tokens is not None and opts.tls is None and not is_loopback(host) and not opts.allow_insecure_remote:
        raise ValueError(
            f"refusing to listen on {address} with bearer tokens but without TLS: the tokens would cross "
            "the network in clear text; use a loopback address, configure TLS, or allow_insecure_remote "
            "(--allow-insecure-remote)")
    if opts.metrics_address:
        check_metrics_address(opts.metrics_address, opts)
    if not opts.host_down_after_s > 0 or not opts.down_reschedule_after_s >= 0:  # NaN fails too
        raise ValueError(f"host_down_after_s must be > 0 and down_reschedule_after_s >= 0 (0: never), got "
                         f"{opts.host_down_after_s} and {opts.down_reschedule_after_s}")

    metrics = opts.metrics or Metrics()
    store = _open_configured_store(opts, address)
    try:
        snapshots = None
        storage = store.snapshots()  # None: a memory store keeps nothing to restart from
        if storage is not None:
            from .snapshot import Snapshots

            snapshots = Snapshots(storage, opts.snapshot_every, opts.snapshot_tail)
        state = SchedulerState(store, opts.dimensions, metrics=metrics, snapshots=snapshots)
    except BaseException:
        store.close()
        raise
    metrics.bind_state(state)
    state.health.down_after_s = opts.host_down_after_s
    state.health.reschedule_after_s = opts.down_reschedule_after_s
    _quiet_gc()

    interceptors = [TokenAuthInterceptor(tokens)] if tokens else []
    replicas: list = [None]  # the HA replica, made once the server exists (ha/replica.py)
    if opts.store:
        from ..ha.replica import LeaderTrailers

        interceptors.append(LeaderTrailers(lambda: replicas[0]))
    server = _grpc_server(opts, interceptors)
    servicer = SchedulerServicer(state, metrics)
    # Every method takes its request as wire bytes: undecodable ones are INVALID_ARGUMENT (see method_handlers).
    server.add_registered_method_handlers(SERVICE_NAME, method_handlers(servicer))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)

    try:
        if opts.tls is not None:
            creds = _server_credentials(opts.tls)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        state.close()
        raise ValueError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        state.close()
        raise ValueError(f"cannot listen on {address}")
    log.info("server created", extra={"fields": {
        "address": address, "port": port, "tls": opts.tls is not None,
        "mtls": bool(opts.tls and opts.tls.client_ca_file), "token_auth": tokens is not None,
        "data_dir": opts.data_dir, "store": opts.store,
        "durable": opts.data_dir is not None or bool(opts.store), "fsync": opts.fsync,
        "dimensions": list(state.dimensions)}})
    if tokens is not None and opts.tls is None and not is_loopback(host):
        log.warning("bearer tokens without TLS on a non-loopback address: tokens cross the network in "
                    "clear text because allow_insecure_remote is set", extra={"fields": {"address": address}})
    if not secured:
        if is_loopback(host):
            log.warning("no TLS and no tokens configured: listening on loopback only",
                        extra={"fields": {"address": address}})
        else:
            log.warning("no TLS and no tokens configured: listening on a non-loopback address "
                        "because allow_insecure_remote is set", extra={"fields": {"address": address}})
    if opts.data_dir is None and not opts.store:
        log.warning("no data dir: state lives in memory and is lost on exit")
    srv = Server(server, port, state, servicer, health_servicer, metrics)
    srv.options = opts
    state.on_fatal = srv.stop_fatally
    if opts.store:
        from ..ha.replica import Replica

        def set_serving(ok: bool) -> None:
            health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING if ok
                                else health_pb2.HealthCheckResponse.NOT_SERVING)

        srv.replica = replicas[0] = Replica(state, store, set_serving, srv.stop_fatally, registry=metrics.registry)
    state.on_writable_change = srv.writable_changed
    return srv, port


def _open_configured_store(opts: ServerOptions, address: str):
    """SQLite under data_dir (memory without one), or etcd when opts.store is set (as leader or
    follower: see store/etcd.open_etcd_store)."""
    from ..store import open_store

    if not opts.store:
        return open_store(opts.data_dir, opts.fsync)
    if opts.data_dir is not None:
        raise ValueError("--store etcd://... and --data-dir exclude each other: the etcd store keeps the log "
                         "and snapshots in etcd")
    if not opts.store.startswith("etcd://"):
        raise ValueError(f"store must look like etcd://HOST:PORT[,HOST:PORT...], got {opts.store!r}")
    from ..store.etcd import open_etcd_store

    return open_etcd_store(opts.store, opts.etcd_prefix, opts.advertise or address, opts.lease_ttl_s,
                           ca_file=opts.etcd_ca_file, cert_file=opts.etcd_cert_file, key_file=opts.etcd_key_file)


def _grpc_server(opts: ServerOptions, interceptors: list):
    """The transport. `grpcio` (the default) is grpcio's own server, `aio` grpc.aio's
    server with the handlers on a thread pool: both public API only. `lean` is
    LeanServer (transport.py), built on grpcio internals: when it refuses the
    installed grpcio or fails its start-up self-check, the server is grpcio's own
    and the log says why."""
    options = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.so_reuseport", 0)]
    if opts.transport == "lean":
        try:
            from .transport import LeanServer, lean_self_check  # here: a failing import falls back too

            lean_self_check(options=options)
            return LeanServer(pollers=opts.pollers, stream_workers=opts.max_workers, interceptors=interceptors,
                              options=options)
        except Exception as exc:  # noqa: BLE001 - whatever broke, grpcio's own server serves
            log.warning("transport lean unavailable: serving with grpcio's server instead",
                        extra={"fields": {"reason": str(exc)}})
    if opts.transport == "aio":
        from .aio import AioServer

        return AioServer(workers=opts.pollers + opts.max_workers, interceptors=interceptors, options=options)
    # A thread per call, unary or streaming, for as long as it runs; idle threads are reused.
    return grpc.server(futures.ThreadPoolExecutor(max_workers=opts.pollers + opts.max_workers,
                                                  thread_name_prefix="grpc"),
                       interceptors=interceptors, options=options)


def _server_credentials(tls: TLSConfig):
    with open(tls.key_file, "rb") as f:
        key = f.read()
    with open(tls.cert_file, "rb") as f:
        cert = f.read()
    ca = None
    if tls.client_ca_file:
        with open(tls.client_ca_file, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check_metrics_address(address: str, opts: ServerOptions) -> None:
    """The metrics endpoint has no authentication: a non-loopback address needs TLS
    (metrics then go over HTTPS) or allow_insecure_remote (logged). ValueError otherwise."""
    host, _ = split_address(address)
    if is_loopback(host) or opts.tls is not None:
        return
    if not opts.allow_insecure_remote:
        raise ValueError(
            f"refusing to serve metrics on {address} without TLS: the endpoint has no authentication; "
            "use a loopback address, configure TLS, or allow_insecure_remote (--allow-insecure-remote)")
    log.warning("metrics served without TLS on a non-loopback address because allow_insecure_remote is set",
                extra={"fields": {"address": address}})


def start_metrics_http(metrics: Metrics, address: str, tls: TLSConfig | None = None):
    """Serve /metrics for Prometheus on HOST:PORT, over HTTPS with `tls` (its client CA
    then required of scrapers); returns (http server, port). The caller has checked
    the address (check_metrics_address)."""
    from prometheus_client import start_http_server

    host, port = split_address(address)
    https = {} if tls is None else {"certfile": tls.cert_file, "keyfile": tls.key_file,
                                    "client_cafile": tls.client_ca_file,
                                    "client_auth_required": tls.client_ca_file is not None}
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry, **https)
    return httpd, httpd.server_address[1]


def serve(server: Server, *, metrics_address: str | None = None, port_file: str | None = None,
          grace: float = 5.0) -> int:
    """Start `server`, block until SIGTERM or SIGINT, then stop it gracefully. The metrics
    endpoint is `metrics_address` or the server's ServerOptions.metrics_address. Returns
    the process exit code: 0 after a signal, 1 when a store failure stopped the server."""
    # A fatal signal (SIGBUS from a store file's memory map, SIGSEGV) leaves a traceback on
    # stderr instead of nothing.
    faulthandler.enable(file=sys.stderr)
    httpd = None
    if metrics_address:
        check_metrics_address(metrics_address, server.options)
    metrics_address = metrics_address or server.options.metrics_address
    if metrics_address:
        httpd, mport = start_metrics_http(server.metrics, metrics_address, server.options.tls)
        log.info("metrics endpoint", extra={"fields": {"address": metrics_address, "port": mport}})
    server.start()
    log.info("serving", extra={"fields": {"port": server.port, "pid": os.getpid()}})
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{server.port}\n")
        os.replace(tmp, port_file)  # readers never see a half-written file

    def on_signal(signum, frame):
        log.info("signal received, stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        threading.Thread(target=server.stop, args=(grace,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not server.wait(1.0):
        pass
    if httpd is not None:
        httpd.shutdown()
    return 0 if server.fatal is None else 1
