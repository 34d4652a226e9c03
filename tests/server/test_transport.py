"""LeanServer (hci_scheduler.server.transport) against grpcio's own client: the four
call shapes, status codes, metadata, cancellation, deadlines, interceptors and stop."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from hci_scheduler.server.transport import LeanServer

SERVICE = "test.Echo"


class Recorder:
    """What the handlers saw, for the assertions."""

    def __init__(self):
        self.stream_ended = threading.Event()
        self.callback_ran = threading.Event()
        self.time_remaining: float | None = None


def handlers(rec: Recorder) -> dict[str, grpc.RpcMethodHandler]:
    def echo(req: bytes, ctx):
        md = dict(ctx.invocation_metadata())
        ctx.set_trailing_metadata((("seen", md.get("x-tag", "")),))
        rec.time_remaining = ctx.time_remaining()
        return req

    def missing(req, ctx):
        ctx.set_code(grpc.StatusCode.NOT_FOUND)
        ctx.set_details("no such thing")
        return b"partial"

    def boom(req, ctx):
        raise ValueError("bad day")

    def leave(req, ctx):
        raise SystemExit("a handler must not take a poller with it")

    def refuse(req, ctx):
        ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "not now")

    def slow(req, ctx):
        time.sleep(0.2)
        return req

    def upper_each(requests, ctx):
        for r in requests:
            yield r.upper()

    def total_length(requests, ctx):
        return str(sum(len(r) for r in requests)).encode()

    def forever(req, ctx):
        ctx.add_callback(rec.callback_ran.set)
        try:
            while ctx.is_active():
                yield b"tick"
                time.sleep(0.01)
        finally:
            rec.stream_ended.set()

    def bad_request(data: bytes):
        raise ValueError("cannot parse")

    return {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Boom": grpc.unary_unary_rpc_method_handler(boom),
        "Leave": grpc.unary_unary_rpc_method_handler(leave),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Strict": grpc.unary_unary_rpc_method_handler(echo, request_deserializer=bad_request),
        "Upper": grpc.stream_stream_rpc_method_handler(upper_each),
        "Total": grpc.stream_unary_rpc_method_handler(total_length),
        "Forever": grpc.unary_stream_rpc_method_handler(forever),
    }


class DenyRefuseless(grpc.ServerInterceptor):
    """Turns every call to Echo carrying `x-deny` into PERMISSION_DENIED."""

    def intercept_service(self, continuation, details):
        if details.method.endswith("/Echo") and any(k == "x-deny" for k, _ in details.invocation_metadata):
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "denied"))
        return continuation(details)


@pytest.fixture
def served():
    rec = Recorder()
    server = LeanServer(pollers=2, stream_workers=4, interceptors=[DenyRefuseless()])
    server.add_registered_method_handlers(SERVICE, handlers(rec))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, channel, rec
    channel.close()
    assert server.stop(None).wait(10)


def call(channel, method: str, shape: str = "unary_unary"):
    return getattr(channel, shape)(f"/{SERVICE}/{method}")


def code_and_details(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_unary_echo_with_metadata_and_deadline(served):
    _, channel, rec = served
    reply, c = call(channel, "Echo").with_call(b"hello", metadata=(("x-tag", "t1"),), timeout=5)
    assert reply == b"hello"
    assert dict(c.trailing_metadata())["seen"] == "t1"
    # The deadline the client set, seen through two clocks (the call's deadline is
    # converted to wall time, time_remaining reads time.time()): allow them to differ a little.
    assert 0 < rec.time_remaining <= 5.5


def test_status_codes(served):
    _, channel, _ = served
    assert code_and_details(lambda: call(channel, "Missing")(b"x", timeout=5)) == \
        (grpc.StatusCode.NOT_FOUND, "no such thing")
    code, details = code_and_details(lambda: call(channel, "Boom")(b"x", timeout=5))
    assert code == grpc.StatusCode.UNKNOWN and "bad day" in details
    for _ in range(3):  # more than the two pollers: none of them may die of it
        assert code_and_details(lambda: call(channel, "Leave")(b"x", timeout=5))[0] == grpc.StatusCode.UNKNOWN
    assert code_and_details(lambda: call(channel, "Refuse")(b"x", timeout=5)) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "not now")
    assert code_and_details(lambda: call(channel, "Strict")(b"x", timeout=5))[0] == grpc.StatusCode.INTERNAL
    assert code_and_details(lambda: call(channel, "Nope")(b"x", timeout=5))[0] == grpc.StatusCode.UNIMPLEMENTED
    assert code_and_details(lambda: call(channel, "Echo")(b"x", metadata=(("x-deny", "1"),), timeout=5)) == \
        (grpc.StatusCode.PERMISSION_DENIED, "denied")
    # The server keeps serving after all of that.
    assert call(channel, "Echo")(b"still", timeout=5) == b"still"


def test_streaming_shapes(served):
    _, channel, _ = served
    assert list(call(channel, "Upper", "stream_stream")(iter([b"a", b"bc", b"def"]), timeout=5)) == \
        [b"A", b"BC", b"DEF"]
    assert call(channel, "Total", "stream_unary")(iter([b"ab", b"cde"]), timeout=5) == b"5"
    assert call(channel, "Total", "stream_unary")(iter([]), timeout=5) == b"0"


def test_cancelled_stream_ends_on_the_server_and_runs_callbacks(served):
    _, channel, rec = served
    stream = call(channel, "Forever", "unary_stream")(b"go", timeout=30)
    assert next(stream) == b"tick"
    stream.cancel()
    assert rec.stream_ended.wait(10)
    assert rec.callback_ran.wait(10)


def test_more_concurrent_calls_than_pollers_all_complete(served):
    _, channel, _ = served  # two pollers
    with futures.ThreadPoolExecutor(6) as ex:
        replies = list(ex.map(lambda i: call(channel, "Slow")(bytes([i]), timeout=30), range(6)))
    assert replies == [bytes([i]) for i in range(6)]


def test_parked_pollers_wake_up_for_handlers_that_block_together():
    """Only two pollers wait on the queue when idle; the others must be woken as
    handlers block, up to `pollers` handlers at once, and all leave on stop."""
    meet = threading.Barrier(5, timeout=20)

    def together(req, ctx):
        meet.wait()  # returns only once five handlers run at the same time
        return req

    server = LeanServer(pollers=6, stream_workers=1)
    server.add_registered_method_handlers(SERVICE, {"Together": grpc.unary_unary_rpc_method_handler(together)})
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    for round_ in range(2):  # the second time, from pollers that parked after the first
        with futures.ThreadPoolExecutor(5) as ex:
            replies = list(ex.map(lambda i: call(channel, "Together")(bytes([i]), timeout=30), range(5)))
        assert replies == [bytes([i]) for i in range(5)], round_
        meet.reset()
    channel.close()
    assert server.stop(None).wait(10)
    for t in server._threads:
        t.join(10)
        assert not t.is_alive(), t.name


def test_stop_cancels_open_streams_after_grace():
    rec = Recorder()
    server = LeanServer(pollers=2, stream_workers=2)
    server.add_registered_method_handlers(SERVICE, handlers(rec))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stream = call(channel, "Forever", "unary_stream")(b"go", timeout=30)
    assert next(stream) == b"tick"
    t0 = time.monotonic()
    assert server.stop(0.3).wait(10)
    assert time.monotonic() - t0 >= 0.25  # the stream had its grace
    assert rec.stream_ended.wait(10)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    channel.close()
    assert server.stop(None).wait(1)  # stopping twice is harmless


def test_registration_after_start_and_bad_ports_are_refused():
    server = LeanServer(pollers=1, stream_workers=1)
    with pytest.raises(RuntimeError, match="bind"):
        server.add_insecure_port("256.0.0.1:1")
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    with pytest.raises(RuntimeError, match="started"):
        server.add_registered_method_handlers(SERVICE, {})
    assert server.stop(None).wait(10)
    with pytest.raises(ValueError):
        LeanServer(pollers=0)
    assert LeanServer().stop(None).wait(1)  # never started


def test_create_server_refuses_unknown_transport_and_no_pollers(tmp_path):
    from hci_scheduler.server import app

    with pytest.raises(ValueError, match="transport"):
        app.create_server("127.0.0.1:0", data_dir=str(tmp_path), transport="carrier-pigeon")
    with pytest.raises(ValueError, match="pollers"):
        app.create_server("127.0.0.1:0", data_dir=str(tmp_path), pollers=0)
    assert not any(tmp_path.iterdir())  # refused before the store was opened


def test_a_message_over_the_size_limit_is_refused_and_the_server_goes_on():
    rec = Recorder()
    server = LeanServer(pollers=1, stream_workers=1, options=[("grpc.max_receive_message_length", 1024)])
    server.add_registered_method_handlers(SERVICE, handlers(rec))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        assert code_and_details(lambda: call(channel, "Echo")(b"x" * 4096, timeout=10))[0] == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert call(channel, "Echo")(b"small", timeout=10) == b"small"
    finally:
        channel.close()
        assert server.stop(None).wait(10)
