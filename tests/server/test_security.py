"""TLS, mutual TLS and bearer tokens; loopback-only without TLS (gRPC and metrics); hostile
input: oversized strings and lists, unknown fields."""
from __future__ import annotations

import datetime
import http.client
import ipaddress
import logging
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hci_scheduler import cli
from hci_scheduler.server import app, convert
from hci_scheduler.server.metrics import Metrics
from hci_scheduler.v1 import scheduler_pb2 as pb
from hci_scheduler.v1 import scheduler_pb2_grpc as pb_grpc

from .conftest import ROOT, ServerProcess

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = "s3cret-token-value-0123456789"


def _cert(name: str, issuer=None, ca: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _write(tmp, name, cert, key):
    c = tmp / f"{name}.crt"
    k = tmp / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pki")
    ca = _cert("test-ca", ca=True)
    other_ca = _cert("other-ca", ca=True)
    paths = {"ca": _write(tmp, "ca", *ca), "server": _write(tmp, "server", *_cert("localhost", ca)),
             "client": _write(tmp, "client", *_cert("client", ca)),
             "stranger": _write(tmp, "stranger", *_cert("stranger", other_ca))}
    return paths


def _status(channel, metadata=()):
    stub = pb_grpc.SchedulerServiceStub(channel)
    return stub.GetStatus(pb.GetStatusRequest(), timeout=10, metadata=metadata)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


def _tls_channel(address, pki, client: str | None = None):
    ca = pki["ca"][0].read_bytes()
    if client:
        cert, key = pki[client]
        creds = grpc.ssl_channel_credentials(ca, key.read_bytes(), cert.read_bytes())
    else:
        creds = grpc.ssl_channel_credentials(ca)
    return grpc.secure_channel(address, creds)


def test_tls_server_refuses_plaintext_and_serves_tls(tmp_path, pki):
    cert, key = pki["server"]
    srv = ServerProcess(tmp_path, extra=["--tls-cert", str(cert), "--tls-key", str(key)]).start()
    try:
        assert _code(lambda: _status(grpc.insecure_channel(srv.address))) == grpc.StatusCode.UNAVAILABLE
        assert list(_status(_tls_channel(srv.address, pki)).dimensions)
    finally:
        srv.kill()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path, pki):
    cert, key = pki["server"]
    srv = ServerProcess(tmp_path, extra=["--tls-cert", str(cert), "--tls-key", str(key),
                                         "--tls-client-ca", str(pki["ca"][0])]).start()
    try:
        assert _code(lambda: _status(_tls_channel(srv.address, pki))) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: _status(_tls_channel(srv.address, pki, "stranger"))) == grpc.StatusCode.UNAVAILABLE
        assert list(_status(_tls_channel(srv.address, pki, "client")).dimensions)
    finally:
        srv.kill()


def test_bearer_token_required_and_never_logged(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# operators\n{TOKEN}\nsecond-token\n")
    srv = ServerProcess(tmp_path, extra=["--token-file", str(tokens)]).start()
    try:
        ch = grpc.insecure_channel(srv.address)
        assert _code(lambda: _status(ch)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _status(ch, (("authorization", "Bearer wrong"),))) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _status(ch, (("authorization", TOKEN),))) == grpc.StatusCode.UNAUTHENTICATED
        assert list(_status(ch, (("authorization", f"Bearer {TOKEN}"),)).dimensions)
        assert list(_status(ch, (("authorization", "Bearer second-token"),)).dimensions)
        # Streams are guarded too.
        stub = pb_grpc.SchedulerServiceStub(ch)
        assert _code(lambda: next(stub.WatchEvents(pb.WatchEventsRequest(), timeout=10))) == \
            grpc.StatusCode.UNAUTHENTICATED
        # Health probes need no secret.
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.terminate()
    assert TOKEN not in srv.log() and "second-token" not in srv.log()


def test_without_credentials_only_loopback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", "0.0.0.0:0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0:0 without TLS or tokens" in proc.stderr


def test_loopback_without_credentials_says_so(server):
    assert "no TLS and no tokens configured: listening on loopback only" in server.log()


# -- listen rules: bearer tokens and metrics on a non-loopback address -----------


class _Logged(logging.Handler):
    """Records of the server's logger, whatever setup_logging did to propagation."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("hci_scheduler.server").addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        logging.getLogger("hci_scheduler.server").removeHandler(self)


@pytest.fixture
def cli_serve(monkeypatch, capsys):
    """`hci-scheduler serve ARGS` in this process: (exit code, stderr). A server it would
    start fails the test instead of serving; the logger setup it does is undone afterwards."""
    def serve(server, **kwargs):
        server.stop(0)
        pytest.fail("hci-scheduler serve started serving")

    monkeypatch.setattr(app, "serve", serve)
    logger = logging.getLogger("hci_scheduler")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)

    def run(*args):
        capsys.readouterr()
        rc = cli.main(["serve", *args])
        return rc, capsys.readouterr().err

    return run


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    return str(path)


def test_bearer_tokens_without_tls_are_refused_off_loopback(tmp_path, token_file, cli_serve, pki):
    data = tmp_path / "data"
    rc, err = cli_serve("--listen", "0.0.0.0:0", "--token-file", token_file, "--data-dir", str(data))
    assert rc == 2
    assert "refusing to listen on 0.0.0.0:0 with bearer tokens but without TLS" in err
    assert "clear text" in err and TOKEN not in err
    assert not data.exists()  # refused before the store was opened
    with pytest.raises(ValueError, match="bearer tokens but without TLS"):
        app.create_server("0.0.0.0:0", token_file=token_file)
    # Tokens on loopback, or tokens over TLS anywhere, are served as before.
    for address, tls in (("127.0.0.1:0", None), ("0.0.0.0:0", app.TLSConfig(*map(str, pki["server"])))):
        srv, _ = app.create_server(address, token_file=token_file, tls=tls)
        srv.stop(0)
    # The explicit escape serves, and says what it costs.
    with _Logged() as logged:
        srv, port = app.create_server("0.0.0.0:0", token_file=token_file, allow_insecure_remote=True)
    try:
        srv.start()
        ch = grpc.insecure_channel(f"127.0.0.1:{port}")
        assert list(_status(ch, (("authorization", f"Bearer {TOKEN}"),)).dimensions)
        ch.close()
    finally:
        srv.stop(0)
    assert any("clear text" in m and "allow_insecure_remote" in m for m in logged), logged


def test_metrics_off_loopback_need_tls_or_the_explicit_flag(tmp_path, cli_serve, pki):
    data = tmp_path / "data"
    rc, err = cli_serve("--listen", "127.0.0.1:0", "--metrics", "0.0.0.0:0", "--data-dir", str(data))
    assert rc == 2
    assert "refusing to serve metrics on 0.0.0.0:0 without TLS" in err
    assert not data.exists()
    with pytest.raises(ValueError, match="refusing to serve metrics on 0.0.0.0:0"):
        app.create_server("127.0.0.1:0", metrics_address="0.0.0.0:0")
    # Loopback metrics are served as before.
    srv, _ = app.create_server("127.0.0.1:0", metrics_address="127.0.0.1:0")
    srv.stop(0)
    with _Logged() as logged:
        srv, _ = app.create_server("127.0.0.1:0", metrics_address="0.0.0.0:0", allow_insecure_remote=True)
    srv.stop(0)
    assert any("metrics served without TLS" in m for m in logged), logged


def test_metrics_with_tls_are_served_over_https_only(pki):
    cert, key = map(str, pki["server"])
    tls = app.TLSConfig(cert, key)
    srv, _ = app.create_server("127.0.0.1:0", tls=tls, metrics_address="0.0.0.0:0")  # accepted: TLS
    httpd, port = app.start_metrics_http(srv.metrics, "0.0.0.0:0", tls)
    try:
        context = ssl.create_default_context(cafile=str(pki["ca"][0]))
        with urllib.request.urlopen(f"https://localhost:{port}/metrics", context=context, timeout=10) as resp:
            assert resp.status == 200 and b"hci_scheduler_placements_total" in resp.read()
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=10).read()
    finally:
        httpd.shutdown()
        srv.stop(0)


def test_metrics_with_mutual_tls_need_a_client_certificate_from_the_ca(pki):
    cert, key = map(str, pki["server"])
    httpd, port = app.start_metrics_http(Metrics(), "127.0.0.1:0", app.TLSConfig(cert, key, str(pki["ca"][0])))
    try:
        url = f"https://localhost:{port}/metrics"
        context = ssl.create_default_context(cafile=str(pki["ca"][0]))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            urllib.request.urlopen(url, context=context, timeout=10).read()
        context.load_cert_chain(*map(str, pki["client"]))
        with urllib.request.urlopen(url, context=context, timeout=10) as resp:
            assert resp.status == 200
    finally:
        httpd.shutdown()


# -- hostile input: oversized strings and lists, unknown fields ------------------

MB = "x" * (1 << 20)


def _host(id: str, **kw) -> pb.Host:
    return pb.Host(id=id, capacity={"cpu": 64000, "memory": 65536}, **kw)


def _workload(id: str, **kw) -> pb.Workload:
    return pb.Workload(id=id, requests={"cpu": 100}, **kw)


#: (method, request, what the refusal must name)
OVERSIZED = [
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", labels={"zone": MB})]), "labels['zone']"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", labels={MB: "a"})]), "labels key"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", labels={"a" * 254 + "/zone": "a"})]),
     "labels key"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", labels={"a/" + "z" * 64: "a"})]), "labels key"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", labels={f"k{i}": "v" for i in range(129)})]),
     "labels: at most 128"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", taints=[pb.Taint(key=MB)])]), "taint key"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", taints=[pb.Taint(key="t", value=MB)])]),
     "taint 't' value"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", taints=[pb.Taint(key=f"t{i}")
                                                                          for i in range(65)])]), "taints: at most 64"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", pool=MB)]), "pool"),
    ("RegisterHosts", pb.RegisterHostsRequest(hosts=[_host("big", allocation_ratios={MB: 2.0})]),
     "allocation_ratios: unknown dimension"),
    ("UpdateHost", pb.UpdateHostRequest(host_id="base", labels={"zone": MB}), "labels['zone']"),
    ("UpdateHost", pb.UpdateHostRequest(host_id="base", taints=[pb.Taint(key="t", value=MB)]), "taint 't' value"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", tenant=MB)]), "tenant"),  # the plain fast path
    ("Place", pb.PlaceRequest(workloads=[_workload("big", group=MB)]), "group"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", tenant="é" * 64)]), "tenant"),  # characters, not bytes
    ("Place", pb.PlaceRequest(workloads=[_workload("big", gang=MB)]), "gang"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", node_selector={"zone": MB})]), "node_selector['zone']"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", selector_expressions=[
        pb.LabelExpression(key="zone", operator=pb.LABEL_OPERATOR_IN, values=["a", MB])])]),
     "selector_expressions 'zone' value"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", tolerations=[pb.Toleration(key=MB)])]), "toleration key"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", anti_affinities=[pb.AffinityTerm(group=MB)])]),
     "anti_affinities group"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", affinities=[pb.AffinityTerm(group="g", topology=MB)])]),
     "affinities topology"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", spreads=[pb.SpreadConstraint(topology=MB)])]),
     "spreads topology"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", volume_ids=[MB])]), "volume_ids"),
    ("Place", pb.PlaceRequest(workloads=[_workload("big", node_selector={f"k{i}": "v" for i in range(65)})]),
     "at most 64"),
    ("Explain", pb.ExplainRequest(workload=_workload("big", tenant=MB)), "tenant"),
]


@pytest.fixture(scope="module")
def base(stub):
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host("base", labels={"zone": "a"})]), timeout=10)
    return stub


@pytest.mark.parametrize("method, request_, field", OVERSIZED,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(OVERSIZED)])
def test_oversized_strings_and_lists_are_refused_naming_the_field(base, method, request_, field):
    before = base.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    with pytest.raises(grpc.RpcError) as info:
        getattr(base, method)(request_, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert len(info.value.details()) < 1000  # the value is not echoed back
    assert base.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence == before
    assert [h.id for h in base.ListHosts(pb.ListHostsRequest(), timeout=10).hosts] == ["base"]


def test_strings_at_the_limits_are_accepted(base):
    label_key = "p" * 253 + "/" + "n" * 63
    base.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host("edge", labels={label_key: "v" * 63},
                                                            taints=[pb.Taint(key=label_key, value="v" * 63)])]))
    placed = base.Place(pb.PlaceRequest(workloads=[_workload("edge-w", tenant="t" * 63, group="é" * 63,
                                                             tolerations=[pb.Toleration(key=label_key)])]))
    assert placed.placements[0].host_id
    base.Release(pb.ReleaseRequest(workload_ids=["edge-w"]))
    base.RemoveHost(pb.RemoveHostRequest(host_id="edge"))


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def _groups(depth: int, field: int = 99) -> bytes:
    return _varint(field << 3 | 3) * depth + _varint(field << 3 | 4) * depth


def _with_unknown(message, unknown: bytes) -> bytes:
    return message.SerializeToString() + unknown


def _place_raw(channel, workload_bytes: bytes) -> pb.PlaceResponse:
    data = b"\x0a" + _varint(len(workload_bytes)) + workload_bytes  # PlaceRequest {workloads: ...}
    return pb.PlaceResponse.FromString(
        channel.unary_unary(f"/{pb.DESCRIPTOR.services_by_name['SchedulerService'].full_name}/Place")(
            data, timeout=60))


def test_unknown_fields_are_dropped_and_deep_nesting_is_refused(server, base):
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
    w = _workload("unknown-w", group="g")
    big = _varint(1000 << 3 | 2) + _varint(8 << 20) + b"u" * (8 << 20)  # an 8 MB unknown field
    placed = _place_raw(channel, _with_unknown(w, big + _groups(8)))
    host = placed.placements[0].host_id
    assert host
    # Stored without them: the workload reads back as what protobuf makes of the known fields.
    allocs = base.ListAllocations(pb.ListAllocationsRequest(include_workloads=True), timeout=30).allocations
    stored = next(a.workload for a in allocs if a.workload_id == "unknown-w")
    assert stored.SerializeToString() == convert.normalize_workload(w).SerializeToString(deterministic=True)
    last = base.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence
    events = []
    for resp in base.WatchEvents(pb.WatchEventsRequest(after_sequence=0), timeout=30):
        events.append(resp.event)
        if resp.event.sequence == last:
            break
    placed_event = next(e for e in events if e.workload_id == "unknown-w")
    assert placed_event.workload == stored and placed_event.ByteSize() < 1000
    # The same workload without the unknown fields is the same spec: a retry, same answer.
    again = base.Place(pb.PlaceRequest(workloads=[w]), timeout=10)
    assert again.placements[0].host_id == host and again.placements[0].sequence == placed.placements[0].sequence
    # Nested unknown groups past the bound are refused, and nothing is stored.
    for depth in (30, 99):
        with pytest.raises(grpc.RpcError) as info:
            _place_raw(channel, _with_unknown(_workload(f"deep-{depth}"), _groups(depth)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert base.GetStatus(pb.GetStatusRequest(), timeout=10).last_sequence == last
    # Hosts too: an unknown field in a Host is not kept.
    path = f"/{pb.DESCRIPTOR.services_by_name['SchedulerService'].full_name}/RegisterHosts"
    host_bytes = _with_unknown(_host("unknown-h"), _varint(1000 << 3 | 2) + _varint(500) + b"u" * 500 + _groups(3))
    channel.unary_unary(path)(b"\x0a" + _varint(len(host_bytes)) + host_bytes, timeout=30)
    listed = next(h for h in base.ListHosts(pb.ListHostsRequest(), timeout=10).hosts if h.id == "unknown-h")
    assert listed.ByteSize() < 200
    base.Release(pb.ReleaseRequest(workload_ids=["unknown-w"]), timeout=10)
    base.RemoveHost(pb.RemoveHostRequest(host_id="unknown-h"), timeout=10)
    channel.close()
