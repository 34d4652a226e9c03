"""TLS, mutual TLS and bearer tokens; loopback-only without credentials."""
from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
