"""LeanServer, the opt-in transport, behind the methods of grpc.Server this
package uses (grpcio's own `grpc.server`, the default, is built in app.py;
grpc.aio's is in aio.py).

LeanServer (`--transport lean`, opt-in) is grpc's completion queue polled by a
few threads, each of which runs the unary handler of the call whose message it
took. grpcio's own server hands every unary call from its polling thread to a
pool worker and back three times (the call, its message, the reply), each a
thread wake-up and a GIL hand-over; here the pollers follow each other
(leader/followers): the thread that receives a call's message runs the handler
and starts the reply itself, while the other pollers take the next events.
Streaming calls run on a thread pool of their own, since they block for as
long as the stream lives. bench/README.md has what that saves.

LeanServer serves what this package registers: generic and registered method
handlers (so the generated add_*Servicer_to_server functions work), server
interceptors, insecure and TLS ports, the four call shapes, the non-blocking
streaming handler of grpc_health, deadlines, cancellation and graceful stop.
It is built on grpc._cython.cygrpc, grpcio's internals, which carry no
compatibility promise, so it keeps the three rules of STYLE.md section 10 for a
private API: opt-in (nothing imports this module unless `--transport lean` is
asked for: app._grpc_server imports it there); version-guarded (it refuses
grpcio releases outside LEAN_TESTED_GRPCIO, and a missing internal makes it
refuse, never fail at import); with a fallback (app.py serves with grpcio's own
server when it refuses or when a call through a throwaway LeanServer fails at
start-up, lean_self_check, and logs a warning saying so). Its tests run on the
tested grpcio and are skipped, saying why, on any other.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent import futures
from typing import Callable, Iterable, Sequence

import grpc

try:
    from grpc._cython import cygrpc

    _QUEUE_SHUTDOWN = cygrpc.CompletionType.queue_shutdown
    _QUEUE_TIMEOUT = cygrpc.CompletionType.queue_timeout
except (ImportError, AttributeError):  # internals moved: LeanServer refuses to start
    cygrpc = None

log = logging.getLogger("hci_scheduler.server.transport")

# How many threads wait on the completion queue: a parked poller is woken when a
# handler would leave fewer than _POLLING_LOW of them, and a poller whose handler
# ended parks when _POLLING_HIGH already wait. Every waiting thread takes part in
# gRPC's wake-ups (futex calls per unary call grow with the threads waiting), and
# one client keeps two threads polling here.
_POLLING_LOW = 1
_POLLING_HIGH = 2


class _HandlerCallDetails(collections.namedtuple("_HandlerCallDetails", ("method", "invocation_metadata")),
                          grpc.HandlerCallDetails):
    pass


class _Aborted(Exception):
    """Raised by ServicerContext.abort: the status is already set on the call."""


_FAILED = object()  # what _Call._behave returns once it has sent an error status


def _ignore(event) -> None:
    """Tag of an operation nobody waits for (its completion only frees it)."""


class _Waiter:
    """Tag of an operation a stream thread waits for; a poller completes it."""

    __slots__ = ("_lock", "event")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self.event = None

    def __call__(self, event) -> None:
        self.event = event
        self._lock.release()

    def wait(self):
        self._lock.acquire()
        return self.event


class _Call(grpc.ServicerContext):
    """One call on the server, and the ServicerContext its handler sees."""

    def __init__(self, server: "LeanServer", event, handler: grpc.RpcMethodHandler):
        self._server = server
        self._call = event.call
        self._metadata = event.invocation_metadata
        self._deadline = event.call_details.deadline
        self._handler = handler
        self._lock = threading.Lock()
        self._cancelled = False
        self._closed = False  # the call is over (its close-on-server operation completed)
        self._statused = False  # the status was sent
        self._initial_sent = False
        self._unary = True  # unary request and response (set by start)
        self._callbacks: list[Callable[[], None]] = []
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailing = None

    # -- driving the call (server side) ----------------------------------------

    def start(self) -> None:
        """Read the request (unary) or hand the call to a stream thread (streaming
        request). A streaming call watches for its end from the start, so that
        is_active() turns false when the client goes away; a unary call asks with
        its status, which saves a completion event per call."""
        h = self._handler
        self._unary = not (h.request_streaming or h.response_streaming)
        if not self._unary:
            self._server._start_batch(self._call, (cygrpc.ReceiveCloseOnServerOperation(0),), self._on_close)
        if h.request_streaming:
            self._server._streams.submit(self._serve, None)
        else:
            self._server._start_batch(self._call, (cygrpc.ReceiveMessageOperation(0),), self._on_request)

    def _on_close(self, event) -> None:
        with self._lock:
            self._closed = True
            self._cancelled = event is None or not event.success or bool(event.batch_operations[0].cancelled())
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # noqa: BLE001 -- a callback's failure must not stop the poller
                log.exception("call termination callback failed")

    def _on_request(self, event) -> None:
        """A poller received the request: run a unary handler here, or stream elsewhere."""
        message = event.batch_operations[0].message() if event.success else None
        if message is None:
            if not self._cancelled:
                self._fail(grpc.StatusCode.UNIMPLEMENTED, "expected exactly one request message")
            return
        try:
            deserialize = self._handler.request_deserializer
            request = message if deserialize is None else deserialize(message)
        except Exception:  # noqa: BLE001 -- whatever the deserializer raises is the client's fault
            self._fail(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return
        if self._handler.response_streaming:
            self._server._streams.submit(self._serve, request)
            return
        server = self._server
        server._handler_starts()
        try:
            response = self._behave(self._handler.unary_unary, request)
            if response is not _FAILED:
                self._finish_with(response)
        finally:
            server._handler_ends()

    def _serve(self, request) -> None:
        """A stream thread runs a streaming handler to its end."""
        h = self._handler
        if h.request_streaming:
            request = self._requests()
        if not h.response_streaming:
            response = self._behave(h.stream_unary, request)
            if response is not _FAILED:
                self._finish_with(response)
            return
        behavior = h.stream_stream if h.request_streaming else h.unary_stream
        if getattr(behavior, "experimental_non_blocking", False):
            # The handler sends through the callback, from any thread; None ends the call.
            self._behave(behavior, request, self._send_or_finish)
            return
        responses = self._behave(behavior, request)
        if responses is _FAILED:
            return
        try:
            for response in responses:
                payload = self._serialize(response)
                if payload is None or not self._send(payload):
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()  # the client is gone: the handler's finally blocks run now
                    return
        except _Aborted:
            self._finish(None)
            return
        except BaseException as exc:  # noqa: BLE001 -- an application error becomes UNKNOWN, as in grpc.server
            self._application_error(exc)
            return
        self._finish(None)

    def _behave(self, behavior, request, *more):
        """Call the handler; on abort or error send the status and return _FAILED."""
        try:
            return behavior(request, self, *more)
        except _Aborted:
            self._finish(None)
        except BaseException as exc:  # noqa: BLE001 -- even SystemExit: the call gets a status, the thread lives
            self._application_error(exc)
        return _FAILED

    def _finish_with(self, response) -> None:
        payload = self._serialize(response)
        if payload is not None:
            self._finish(payload)

    def _application_error(self, exc: BaseException) -> None:
        log.exception("handler of %s failed", self._handler)
        if self._code is None or self._code is grpc.StatusCode.OK:
            self._code = grpc.StatusCode.UNKNOWN
            self._details = f"Exception calling application: {exc}"
        self._finish(None)

    def _serialize(self, response) -> bytes | None:
        serialize = self._handler.response_serializer
        try:
            return response if serialize is None else serialize(response)
        except Exception:  # noqa: BLE001
            log.exception("response of %s failed to serialize", self._handler)
            self._fail(grpc.StatusCode.INTERNAL, "Failed to serialize response!")
            return None

    def _fail(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details
        self._finish(None)

    def _finish(self, payload: bytes | None) -> None:
        """Send the status (with the initial metadata and the last message if due)."""
        with self._lock:
            if self._statused:
                return
            self._statused = True
            initial, self._initial_sent = not self._initial_sent, True
        code = self._code or grpc.StatusCode.OK
        status = cygrpc.SendStatusFromServerOperation(self._trailing, code.value[0],
                                                      (self._details or "").encode(), 0)
        if self._unary:
            ops, tag = [cygrpc.ReceiveCloseOnServerOperation(0), status], self._on_close
        else:
            ops, tag = [status], _ignore
        if initial:
            ops.append(cygrpc.SendInitialMetadataOperation(None, 0))
        if payload is not None:
            ops.append(cygrpc.SendMessageOperation(payload, 0))
        if not self._server._start_batch(self._call, ops, tag) and self._unary:
            self._on_close(None)  # the call is over all the same: run its callbacks

    def _wait(self, ops) -> object | None:
        """Start `ops` and wait for them (stream threads only); None if they failed."""
        waiter = _Waiter()
        if not self._server._start_batch(self._call, ops, waiter):
            return None  # not started: no completion will come
        event = waiter.wait()
        return event if event.success else None

    def _send(self, payload: bytes) -> bool:
        with self._lock:
            if self._statused:
                return False
            initial, self._initial_sent = not self._initial_sent, True
        ops = (cygrpc.SendInitialMetadataOperation(None, 0),) if initial else ()
        return self._wait(ops + (cygrpc.SendMessageOperation(payload, 0),)) is not None

    def _send_or_finish(self, response) -> None:
        if response is None:
            self._finish(None)
            return
        payload = self._serialize(response)
        if payload is not None:
            self._send(payload)

    def _requests(self):
        deserialize = self._handler.request_deserializer
        while True:
            event = self._wait((cygrpc.ReceiveMessageOperation(0),))
            message = None if event is None else event.batch_operations[0].message()
            if message is None:
                return
            yield message if deserialize is None else deserialize(message)

    # -- grpc.ServicerContext ----------------------------------------------------

    def is_active(self) -> bool:
        return not (self._cancelled or self._statused)

    def time_remaining(self) -> float:
        return max(self._deadline - time.time(), 0)

    def cancel(self) -> None:
        self._call.cancel()

    def add_callback(self, callback) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._callbacks.append(callback)
            return True

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._call.peer().decode("utf-8", "replace")

    def peer_identities(self):
        return cygrpc.peer_identities(self._call)

    def peer_identity_key(self):
        key = cygrpc.peer_identity_key(self._call)
        return None if key is None else key.decode("utf-8", "replace")

    def auth_context(self):
        ctx = cygrpc.auth_context(self._call) or {}
        return {k.decode("utf-8", "replace") if isinstance(k, bytes) else k: v for k, v in ctx.items()}

    def send_initial_metadata(self, initial_metadata) -> None:
        with self._lock:
            if self._initial_sent or self._statused:
                raise ValueError("initial metadata was already sent")
            self._initial_sent = True
        self._server._start_batch(self._call, (cygrpc.SendInitialMetadataOperation(tuple(initial_metadata), 0),),
                                      _ignore)

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self):
        return self._trailing

    def abort(self, code: grpc.StatusCode, details: str):
        if code is grpc.StatusCode.OK:
            log.error("abort() called with StatusCode.OK; sending UNKNOWN")
            code = grpc.StatusCode.UNKNOWN
        self._code, self._details = code, details
        raise _Aborted()

    def abort_with_status(self, status):
        self.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self):
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self):
        return self._details

    def set_compression(self, compression) -> None:
        raise NotImplementedError("this server does not compress responses")

    def disable_next_message_compression(self) -> None:
        pass  # nothing is compressed


class LeanServer:
    """A gRPC server with the methods of grpc.Server this package uses.

    pollers: threads taking events from the completion queue; each runs one
    unary handler at a time, so this is also how many unary calls run at once
    (and can share a group commit). Only a couple of them wait on the queue at
    any time; the others are parked until handlers keep the waiting ones busy.
    stream_workers: threads for streaming calls.
    """

    def __init__(self, *, pollers: int = 16, stream_workers: int = 64,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), options: Sequence[tuple] = ()):
        if pollers < 1 or stream_workers < 1:
            raise ValueError("pollers and stream_workers must be at least 1")
        check_lean_supported()
        if cygrpc is None:
            raise LeanUnavailable(f"LeanServer cannot find the grpcio internals it uses in grpcio {grpc.__version__}")
        self._cq = cygrpc.CompletionQueue()
        self._server = cygrpc.Server(tuple(options), False)
        self._server.register_completion_queue(self._cq)
        self._pollers = pollers
        self._streams = futures.ThreadPoolExecutor(stream_workers, thread_name_prefix="grpc-stream")
        self._interceptors = tuple(interceptors)
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._lock = threading.Lock()
        self._stage = "new"  # -> serving -> stopping -> stopped
        self._starting = 0  # operations being started right now, outside the lock
        self._none_starting = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()
        self._polling = 0  # pollers waiting on the queue or handling a quick event
        self._parked = 0  # pollers waiting on _unpark
        self._unpark = threading.Semaphore(0)

    # -- registration (before start) ---------------------------------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._check_new("add handlers")
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._check_new("add handlers")
        for method, handler in method_handlers.items():
            self._registered[f"/{service_name}/{method}"] = handler

    def add_insecure_port(self, address: str) -> int:
        return self._bind(address, None)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._bind(address, credentials._credentials)

    def _bind(self, address: str, credentials) -> int:
        self._check_new("add a port")
        port = self._server.add_http2_port(address.encode(), credentials)
        if port == 0:
            raise RuntimeError(f"Failed to bind to address {address}")
        return port

    def _check_new(self, what: str) -> None:
        if self._stage != "new":
            raise RuntimeError(f"cannot {what} once the server has started")

    # -- running -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._check_new("start the server again")
            self._server.start()
            self._stage = "serving"
            for _ in range(self._pollers):
                self._server.request_call(self._cq, self._cq, self._on_call)
        for i in range(self._pollers):
            t = threading.Thread(target=self._poll, name=f"grpc-poller-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _poll(self) -> None:
        cq = self._cq
        self._handler_ends()  # each thread starts as if a handler ended: all but _POLLING_HIGH park
        while True:
            event = cq.poll()
            kind = event.completion_type
            if kind == _QUEUE_SHUTDOWN:
                with self._lock:  # the parked ones find the shutdown too, and leave
                    parked, self._parked = self._parked, 0
                for _ in range(parked):
                    self._unpark.release()
                return
            if kind == _QUEUE_TIMEOUT:
                continue
            try:
                event.tag(event)
            except BaseException:  # noqa: BLE001 -- one bad event must not stop a poller
                log.exception("gRPC event handling failed")

    def _handler_starts(self) -> None:
        """This poller is about to run a unary handler, which may block (a commit's
        fsync): wake a parked one if too few would be left waiting on the queue."""
        with self._lock:
            self._polling -= 1
            if self._polling < _POLLING_LOW and self._parked:
                self._parked -= 1
                self._polling += 1
                self._unpark.release()

    def _handler_ends(self) -> None:
        """Back to the queue, or park when enough pollers wait on it already."""
        with self._lock:
            if self._polling < _POLLING_HIGH or self._stage == "stopped":
                self._polling += 1
                return
            self._parked += 1
        self._unpark.acquire()  # whoever releases counts this thread as polling

    def _on_call(self, event) -> None:
        try:
            if event.success and event.call is not None:  # else a request the shutdown cancelled
                self._begin(event)
        finally:
            # Ask for the next call once this one's message is on its way: the other
            # pollers' requests are still out, so no call waits for this one.
            with self._lock:
                if self._stage == "serving":
                    self._server.request_call(self._cq, self._cq, self._on_call)

    def _begin(self, event) -> None:
        method = event.call_details.method.decode("utf-8", "replace")
        handler = None if self._interceptors else self._registered.get(method)
        if handler is None:  # interceptors and generic handlers see the call's details
            handler = self._resolve(_HandlerCallDetails(method, event.invocation_metadata))
        if handler is None:
            self._start_batch(event.call, (
                cygrpc.SendInitialMetadataOperation(None, 0),
                cygrpc.ReceiveCloseOnServerOperation(0),
                cygrpc.SendStatusFromServerOperation(None, cygrpc.StatusCode.unimplemented,
                                                     b"Method not found!", 0)), _ignore)
            return
        _Call(self, event, handler).start()

    def _start_batch(self, call, ops, tag) -> bool:
        """Start operations on a call unless the queue is shut down (grpc's core
        aborts the process on an operation started after that)."""
        with self._lock:
            if self._stage == "stopped":
                return False
            self._starting += 1
        try:  # outside the lock: starting a send writes to the socket, other pollers go on
            return call.start_server_batch(ops, tag) == 0
        finally:
            with self._lock:
                self._starting -= 1
                if not self._starting and self._stage == "stopped":  # _on_shutdown waits
                    self._none_starting.notify_all()

    def _lookup(self, details: _HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        h = self._registered.get(details.method)
        if h is not None:
            return h
        for g in self._generic:
            h = g.service(details)
            if h is not None:
                return h
        return None

    def _resolve(self, details: _HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler of a call, through the interceptors (the first one outermost)."""
        def chain(index: int, d: _HandlerCallDetails):
            if index == len(self._interceptors):
                return self._lookup(d)
            return self._interceptors[index].intercept_service(lambda nd: chain(index + 1, nd), d)

        return chain(0, details) if self._interceptors else self._lookup(details)

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls; cancel the ones still running after `grace` seconds (at
        once when None). The returned event is set once every call has ended."""
        with self._lock:
            if self._stage == "new":
                self._stage = "stopped"
                self._stopped.set()
                return self._stopped
            if self._stage != "serving":
                return self._stopped
            self._stage = "stopping"
            self._server.shutdown(self._cq, self._on_shutdown)
        if grace is None or grace <= 0:
            self._cancel_all()
        else:
            def cancel_after_grace():
                if not self._stopped.wait(grace):
                    self._cancel_all()

            threading.Thread(target=cancel_after_grace, name="grpc-grace", daemon=True).start()
        return self._stopped

    def _cancel_all(self) -> None:
        with self._lock:  # never while _on_shutdown destroys the server
            if self._stage == "stopping":
                self._server.cancel_all_calls()

    def _on_shutdown(self, event) -> None:
        with self._lock:
            self._stage = "stopped"  # no operation starts from now on
            while self._starting:
                self._none_starting.wait()
            self._server.destroy()
            self._cq.shutdown()  # the pollers drain the queue and leave
        self._streams.shutdown(wait=False)
        self._stopped.set()



# -- the lean transport's guard and start-up check ------------------------------

#: The grpcio releases (major, minor), inclusive, LeanServer's tests ran on. It is
#: built on grpc._cython.cygrpc, which carries no compatibility promise, so it
#: refuses any other release; `hci-scheduler serve --transport lean` then serves
#: with grpcio's own server and says so in its log.
LEAN_TESTED_GRPCIO = ((1, 85), (1, 85))


class LeanUnavailable(RuntimeError):
    """LeanServer cannot serve with the installed grpcio."""


def check_lean_supported(version: str | None = None) -> None:
    """Raise LeanUnavailable unless grpcio `version` (default: the installed one)
    is a release LeanServer was tested on (LEAN_TESTED_GRPCIO)."""
    version = grpc.__version__ if version is None else version
    (lo_major, lo_minor), (hi_major, hi_minor) = LEAN_TESTED_GRPCIO
    tested = f"{lo_major}.{lo_minor}-{hi_major}.{hi_minor}"
    parts = version.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise LeanUnavailable(f"LeanServer cannot read grpcio's version {version!r}; it was tested "
                              f"on grpcio {tested}") from None
    if not LEAN_TESTED_GRPCIO[0] <= major_minor <= LEAN_TESTED_GRPCIO[1]:
        raise LeanUnavailable(f"LeanServer was tested on grpcio {tested}, not on {version}: "
                              "it relies on grpcio internals that may have changed")


_SELF_CHECK_METHOD = "/hci_scheduler.transport.SelfCheck/Echo"


def lean_self_check(timeout: float = 5.0, options: Sequence[tuple] = ()) -> None:
    """Raise LeanUnavailable unless LeanServer works with the installed grpcio: the
    version guard, then one unary call through grpcio's client to a throwaway
    LeanServer on a loopback port (the real server's ports may need credentials
    the check does not have)."""
    check_lean_supported()
    payload = b"lean-self-check"
    probe = None
    try:
        probe = LeanServer(pollers=1, stream_workers=1, options=options)
        service, method = _SELF_CHECK_METHOD[1:].split("/")
        probe.add_registered_method_handlers(service, {method: grpc.unary_unary_rpc_method_handler(
            lambda request, context: request)})
        port = probe.add_insecure_port("127.0.0.1:0")
        probe.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = channel.unary_unary(_SELF_CHECK_METHOD)(payload, timeout=timeout)
        if reply != payload:
            raise LeanUnavailable(f"LeanServer's self-check got {reply!r} back, not {payload!r}")
    except LeanUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means: do not serve with it
        raise LeanUnavailable(f"LeanServer's self-check failed on grpcio {grpc.__version__}: {exc!r}") from exc
    finally:
        if probe is not None:
            probe.stop(None).wait(timeout)
