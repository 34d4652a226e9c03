"""grpc.aio's server behind the synchronous interface this package uses
(`hci-scheduler serve --transport aio`): the synchronous handlers run on a
thread pool, public API only. Kept apart from transport.py (LeanServer) so that
this transport never imports grpcio's internals.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from concurrent import futures
from typing import Iterable, Sequence

import grpc

class _AioAbort(Exception):
    """Raised by _AioContext.abort on a worker thread; the call is aborted on the loop."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class _AioContext(grpc.ServicerContext):
    """grpc.ServicerContext of a synchronous handler running on a worker thread,
    over grpc.aio's context of its call (whose coroutines run on the loop)."""

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop):
        self._context = context
        self._loop = loop

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def is_active(self) -> bool:
        return not self._context.done()

    def time_remaining(self):
        return self._context.time_remaining()

    def cancel(self) -> None:
        self.abort(grpc.StatusCode.CANCELLED, "cancelled by the server")

    def add_callback(self, callback) -> bool:
        self._loop.call_soon_threadsafe(self._context.add_done_callback, lambda _: callback())
        return True

    def invocation_metadata(self):
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()

    def peer_identities(self):
        return self._context.peer_identities()

    def peer_identity_key(self):
        return self._context.peer_identity_key()

    def auth_context(self):
        return self._context.auth_context()

    def send_initial_metadata(self, initial_metadata) -> None:
        self._on_loop(self._context.send_initial_metadata(initial_metadata))

    def set_trailing_metadata(self, trailing_metadata) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def abort(self, code: grpc.StatusCode, details: str):
        raise _AioAbort(code, details)

    def abort_with_status(self, status):
        self.set_trailing_metadata(status.trailing_metadata)
        raise _AioAbort(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def set_compression(self, compression) -> None:
        self._context.set_compression(compression)

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()


_END = object()


def _off_loop(handler: grpc.RpcMethodHandler | None, loop: asyncio.AbstractEventLoop,
              pool: futures.Executor) -> grpc.RpcMethodHandler | None:
    """`handler` (synchronous) as a grpc.aio handler that runs it on `pool`: a
    thread per call, for as long as the handler runs, as grpcio's own server does."""
    if handler is None:
        return None
    shape = ("stream" if handler.request_streaming else "unary") + "_" + \
            ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, shape)
    if asyncio.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior):
        return handler

    def requests_of(request_iterator):
        """The call's request stream, read on the loop, as a synchronous iterator."""
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(request_iterator.__anext__(), loop).result()
            except StopAsyncIteration:
                return

    def start(request, context):
        first = requests_of(request) if handler.request_streaming else request
        return loop.run_in_executor(pool, behavior, first, _AioContext(context, loop))

    async def unary_response(request, context):
        try:
            return await start(request, context)
        except _AioAbort as exc:
            await context.abort(exc.code, exc.details)

    async def stream_response(request, context):
        responses = iter(await start(request, context))
        pending = None

        def close(_=None) -> None:
            # However the call ends (cancelled, the server stopped, ended), the handler's
            # generator is closed, so its cleanup runs: here on the loop when it is
            # suspended, else on its worker once the step it is taking ends.
            if pending is not None and not pending.done():
                pending.add_done_callback(close)
            elif hasattr(responses, "close"):
                responses.close()

        context.add_done_callback(close)
        try:
            while True:
                pending = pool.submit(next, responses, _END)
                response = await asyncio.wrap_future(pending)
                if response is _END:
                    return
                yield response
        except _AioAbort as exc:
            await context.abort(exc.code, exc.details)

    make = getattr(grpc, f"{shape}_rpc_method_handler")
    return make(stream_response if handler.response_streaming else unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class _AioOffLoop(grpc.aio.ServerInterceptor):
    """The outermost interceptor: whatever handler the others chose runs off the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: futures.Executor):
        self._loop, self._pool = loop, pool

    async def intercept_service(self, continuation, handler_call_details):
        return _off_loop(await continuation(handler_call_details), self._loop, self._pool)


class _AioInterceptor(grpc.aio.ServerInterceptor):
    """A synchronous grpc.ServerInterceptor run by grpc.aio's server: the handler is
    looked up first and handed to the interceptor as its continuation's answer."""

    def __init__(self, interceptor: grpc.ServerInterceptor):
        self._interceptor = interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self._interceptor.intercept_service(lambda details: handler, handler_call_details)


class AioServer:
    """grpc.aio's server with the methods of grpc.Server this package uses, through
    grpcio's public API only. Its event loop runs on a thread of its own and the
    synchronous handlers on a thread pool, with a full grpc.ServicerContext
    (grpc.aio's own way, `migration_thread_pool`, gives them a context without
    is_active, which WatchEvents polls).

    Registered method handlers become a generic handler placed before the others:
    grpc.aio ignored add_registered_method_handlers before it implemented it, and
    generic handlers answer in the order they were added.
    """

    def __init__(self, *, workers: int = 144, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 options: Sequence[tuple] = ()):
        self._loop = asyncio.new_event_loop()
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc")
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self._registered: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._stop_lock = threading.Lock()
        self._stopping: threading.Event | None = None

        async def build():  # grpc.aio's server belongs to the loop it is created on
            return grpc.aio.server(
                interceptors=[_AioOffLoop(self._loop, self._pool)] + [_AioInterceptor(i) for i in interceptors],
                options=list(options))

        self._server = self._run(build())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _on_loop(self, fn, *args):
        async def call():
            return fn(*args)

        return self._run(call())

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict) -> None:
        self._registered.setdefault(service_name, {}).update(method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._on_loop(self._server.add_insecure_port, address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._on_loop(self._server.add_secure_port, address, credentials)

    def start(self) -> None:
        handlers = [grpc.method_handlers_generic_handler(service, methods)
                    for service, methods in self._registered.items()] + self._generic
        self._on_loop(self._server.add_generic_rpc_handlers, handlers)
        self._run(self._server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls; cancel the ones still running after `grace` seconds (at
        once when None). The returned event is set once every call has ended."""
        with self._stop_lock:
            if self._stopping is not None:
                return self._stopping
            self._stopping = done = threading.Event()

        async def stop():
            try:
                await self._server.stop(grace)
                # The cancelled calls' tasks end, and their done callbacks run, before the loop stops.
                others = asyncio.all_tasks() - {asyncio.current_task()}
                if others:
                    await asyncio.wait(others, timeout=5)
                await asyncio.sleep(0)
            finally:
                self._pool.shutdown(wait=False)
                self._loop.stop()
                done.set()

        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        return done
