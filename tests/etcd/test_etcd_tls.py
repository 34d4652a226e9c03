"""`serve --store etcd://... --etcd-ca --etcd-cert --etcd-key` against a real etcd that serves
clients over TLS and asks for a client certificate (--client-cert-auth), with a CA made here:
the replica leads and its log is in etcd; a client without a certificate from that CA is
refused by etcd, and a replica given one waits for etcd instead of starting."""
from __future__ import annotations

import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.etcd_client import EtcdClient, EtcdUnavailable
from hci_scheduler.ha.local_etcd import EtcdTLS, LocalEtcd, etcd_binary, free_port
from hci_scheduler.store.etcd import EtcdStore
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

from .test_failover import leader_of, workload

pytestmark = pytest.mark.etcd
security = pytest.importorskip("tests.server.test_security")  # its certificate helpers need cryptography


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    if etcd_binary() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    tmp = tmp_path_factory.mktemp("etcd-pki")
    ca = security._cert("etcd-test-ca", ca=True)
    stranger_ca = security._cert("stranger-ca", ca=True)
    pki = {"ca": security._write(tmp, "ca", *ca)[0],
           "member": security._write(tmp, "member", *security._cert("localhost", ca)),
           "client": security._write(tmp, "client", *security._cert("hci-scheduler", ca)),
           "stranger": security._write(tmp, "stranger", *security._cert("stranger", stranger_ca))}
    member_cert, member_key = pki["member"]
    client_cert, client_key = pki["client"]
    etcd = LocalEtcd(str(tmp / "etcd"), tls=EtcdTLS(str(member_cert), str(member_key), str(pki["ca"])),
                     client_files=(str(pki["ca"]), str(client_cert), str(client_key)))
    with etcd:
        yield etcd, pki


def tls_flags(pki, who: str = "client") -> list[str]:
    cert, key = pki[who]
    return ["--etcd-ca", str(pki["ca"]), "--etcd-cert", str(cert), "--etcd-key", str(key)]


def test_replica_on_etcd_over_mutual_tls(tmp_path, tls_etcd):
    etcd, pki = tls_etcd
    srv = ServerProcess(tmp_path, extra=["--store", etcd.url, "--etcd-prefix", "/tls", "--snapshot-every", "0",
                                         *tls_flags(pki)], listen=f"127.0.0.1:{free_port()}").start()
    try:
        wait_for(lambda: leader_of([srv]), what="the replica to lead over TLS")
        with SchedulerClient(srv.address) as c:
            c.register_hosts([pb.Host(id="h0", capacity={"cpu": 8000, "memory": 32_768})])
            placed = c.place([workload("w0")]).placements[0]
        assert placed.host_id == "h0"
    finally:
        srv.kill()
    # The log is in etcd, read back over TLS with the client certificate.
    cert, key = pki["client"]
    reader = EtcdStore(EtcdClient(etcd.endpoints, 2.0, str(pki["ca"]), str(cert), str(key)), "/tls", own_client=True)
    try:
        events = [pb.Event.FromString(r.body) for r in reader.read()]
    finally:
        reader.close()
    assert [(e.type, e.workload_id, e.host_id) for e in events] == [
        (pb.EVENT_TYPE_HOST_ADDED, "", "h0"), (pb.EVENT_TYPE_PLACED, "w0", "h0")]


@pytest.mark.parametrize("who", ["plaintext", "no-certificate", "stranger"],
                         ids=["plaintext", "ca-only", "certificate-of-another-ca"])
def test_etcd_refuses_a_client_without_a_certificate_of_its_ca(tls_etcd, who):
    etcd, pki = tls_etcd
    if who == "plaintext":
        client = EtcdClient(etcd.endpoints, 2.0)
    elif who == "no-certificate":
        client = EtcdClient(etcd.endpoints, 2.0, str(pki["ca"]))
    else:
        cert, key = pki["stranger"]
        client = EtcdClient(etcd.endpoints, 2.0, str(pki["ca"]), str(cert), str(key))
    try:
        with pytest.raises(EtcdUnavailable):
            client.range(b"/tls/leader")
    finally:
        client.close()


def test_replica_with_a_certificate_of_another_ca_waits_for_etcd(tmp_path, tls_etcd):
    etcd, pki = tls_etcd
    srv = ServerProcess(tmp_path, extra=["--store", etcd.url, "--etcd-prefix", "/tls-stranger",
                                         *tls_flags(pki, "stranger")], listen=f"127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match="did not start"):
        srv.start(timeout=8)  # it never listens: it cannot open the store
    assert "etcd unavailable: waiting for it to open the store" in srv.log()
