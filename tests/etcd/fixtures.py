"""A real etcd for the tests (imported by the test modules that use it, so tests/server can
too): one member per test module on free loopback ports in a temporary directory, and an
EtcdStore per test under its own prefix. Skipped with one line when etcd is not installed."""
from __future__ import annotations

import uuid

import pytest

from hci_scheduler.ha.election import Election
from hci_scheduler.ha.etcd_client import EtcdClient
from hci_scheduler.ha.local_etcd import LocalEtcd, etcd_binary


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    if etcd_binary() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    with LocalEtcd(str(tmp_path_factory.mktemp("etcd"))) as etcd:
        yield etcd


def leading_store(endpoints, prefix: str, address: str = "replica-a:1"):
    """An EtcdStore under prefix whose election has won."""
    from hci_scheduler.store.etcd import EtcdStore

    client = EtcdClient(endpoints)
    election = Election(client, prefix, address, ttl_s=1)
    assert election.campaign(timeout_s=10), "could not win an uncontested election"
    return EtcdStore(client, prefix, election, own_client=True)


@pytest.fixture
def etcd_prefix():
    return f"/test-{uuid.uuid4().hex[:12]}"
