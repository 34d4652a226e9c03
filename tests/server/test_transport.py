"""The transports (grpcio's own server, AioServer from hci_scheduler.server.aio and
LeanServer from hci_scheduler.server.transport) against grpcio's own client: the four call shapes,
status codes, metadata, cancellation, deadlines, interceptors and stop; LeanServer's
version guard, its start-up self-check and the fallback to grpcio's server."""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
import pytest

from hci_scheduler.server import transport
from hci_scheduler.server.aio import AioServer
from hci_scheduler.server.transport import LeanServer, LeanUnavailable

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


def lean_or_skip() -> None:
    try:
        transport.check_lean_supported()
    except LeanUnavailable as exc:  # the fallback's tests below still run
        pytest.skip(str(exc))


def make_server(kind: str, interceptors=(), options=()):
    """A transport with two threads for unary calls (few, so that calls queue up)."""
    if kind == "grpcio":
        return grpc.server(futures.ThreadPoolExecutor(6), interceptors=interceptors, options=options)
    if kind == "aio":
        return AioServer(workers=6, interceptors=interceptors, options=options)
    lean_or_skip()
    return LeanServer(pollers=2, stream_workers=4, interceptors=interceptors, options=options)


KINDS = ["grpcio", "aio", "lean"]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def served(kind):
    rec = Recorder()
    server = make_server(kind, interceptors=[DenyRefuseless()])
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


def test_status_codes(served, kind):
    _, channel, _ = served
    assert code_and_details(lambda: call(channel, "Missing")(b"x", timeout=5)) == \
        (grpc.StatusCode.NOT_FOUND, "no such thing")
    code, details = code_and_details(lambda: call(channel, "Boom")(b"x", timeout=5))
    assert code == grpc.StatusCode.UNKNOWN and "bad day" in details
    for _ in range(3 if kind == "lean" else 0):  # more than the two pollers: none of them may die of it
        assert code_and_details(lambda: call(channel, "Leave")(b"x", timeout=5))[0] == grpc.StatusCode.UNKNOWN
    assert code_and_details(lambda: call(channel, "Refuse")(b"x", timeout=5)) == \
        (grpc.StatusCode.FAILED_PRECONDITION, "not now")
    # grpc.aio's server answers a request it cannot deserialize with UNKNOWN, the others with INTERNAL.
    assert code_and_details(lambda: call(channel, "Strict")(b"x", timeout=5))[0] == \
        (grpc.StatusCode.UNKNOWN if kind == "aio" else grpc.StatusCode.INTERNAL)
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
    lean_or_skip()
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


def test_stop_cancels_open_streams_after_grace(kind):
    rec = Recorder()
    server = make_server(kind)
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
    lean_or_skip()
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


def test_a_message_over_the_size_limit_is_refused_and_the_server_goes_on(kind):
    rec = Recorder()
    server = make_server(kind, options=[("grpc.max_receive_message_length", 1024)])
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


# -- LeanServer's version guard, its self-check and the fallback ----------------


@pytest.mark.parametrize("version, accepted", [
    ("1.85.0", True),    # the tested minor
    ("1.85.3", True),    # the tested minor, any patch
    ("1.84.9", False),   # below the range
    ("1.86.0", False),   # a newer minor: internals may have changed
    ("2.0.0", False),    # a new major
    ("1.86.0rc1", False),
    ("banana", False),   # unreadable
], ids=["lowest", "highest-patch", "below", "newer-minor", "new-major", "rc", "unreadable"])
def test_lean_accepts_only_the_tested_grpcio_releases(version, accepted):
    if accepted:
        transport.check_lean_supported(version)
    else:
        with pytest.raises(LeanUnavailable, match="tested on grpcio"):
            transport.check_lean_supported(version)


def test_lean_refuses_an_untested_grpcio(monkeypatch):
    monkeypatch.setattr(grpc, "__version__", "1.99.0")
    with pytest.raises(LeanUnavailable, match="1.99.0"):
        LeanServer()
    with pytest.raises(LeanUnavailable, match="1.99.0"):
        transport.lean_self_check()


def break_lean_reply(monkeypatch) -> None:
    """As if grpcio had changed an internal LeanServer relies on to build a reply
    (LeanServer's view of grpcio's internals only: grpcio's client keeps working)."""
    real = transport.cygrpc

    class Changed:
        SendMessageOperation = None

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(transport, "cygrpc", Changed())


def test_lean_self_check_fails_when_a_call_through_it_fails(monkeypatch):
    lean_or_skip()
    transport.lean_self_check(timeout=10)  # passes as installed
    break_lean_reply(monkeypatch)
    with pytest.raises(LeanUnavailable, match="self-check"):
        transport.lean_self_check(timeout=2)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("breakage", ["untested-grpcio", "self-check-fails"])
def test_create_server_falls_back_to_grpcio_when_lean_is_unavailable(tmp_path, monkeypatch, breakage):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hci_scheduler.server import app

    if breakage == "untested-grpcio":
        monkeypatch.setattr(grpc, "__version__", "1.99.0")
    else:  # as if grpcio had changed an internal LeanServer relies on to build the reply
        lean_or_skip()
        break_lean_reply(monkeypatch)
    records = _Records()
    logger = logging.getLogger("hci_scheduler.server")
    logger.addHandler(records)
    try:
        srv, port = app.create_server("127.0.0.1:0", data_dir=str(tmp_path / "data"), transport="lean")
    finally:
        logger.removeHandler(records)
    assert isinstance(srv.grpc, grpc.Server)  # grpcio's own server
    [warning] = [r for r in records.records if "transport lean unavailable" in r.getMessage()]
    assert ("1.99.0" if breakage == "untested-grpcio" else "self-check failed") in warning.fields["reason"]
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop(0)


@pytest.mark.parametrize("kind", KINDS)
def test_create_server_builds_each_transport(tmp_path, kind):
    from hci_scheduler.server import app

    if kind == "lean":
        lean_or_skip()
    srv, port = app.create_server("127.0.0.1:0", data_dir=str(tmp_path / "data"), transport=kind)
    expected = {"grpcio": grpc.Server, "aio": AioServer, "lean": LeanServer}[kind]
    assert isinstance(srv.grpc, expected)
    srv.start()
    srv.stop(0)


def test_public_transports_do_not_import_grpc_internals():
    # grpcio's server and the aio transport must work where grpc._cython has moved or
    # changed: building either one imports nothing of it (only LeanServer does).
    import subprocess
    import sys

    code = ("import sys; from hci_scheduler.server import app; from hci_scheduler.server.aio import AioServer; "
            "app._grpc_server(app.ServerOptions(transport='grpcio'), []); "
            "print(any(m == 'hci_scheduler.server.transport' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
