"""`hci-scheduler demo --ha` end to end, small: three replicas, the leader killed half-way."""
import pytest

from hci_scheduler.ha import demo
from hci_scheduler.ha.local_etcd import etcd_binary

pytestmark = pytest.mark.etcd


def test_demo_ha_kills_the_leader_and_loses_nothing():
    if etcd_binary() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    f = demo.run(n_hosts=30, n_containers=300, n_clients=3)
    assert f["acknowledged"] > 250  # a few may find no room: refused, never lost
    assert f["lost"] == 0 and f["gap_free"] and f["overcommitted_hosts"] == 0
    assert f["new_leader"] is not None and f["failover_s"] > 0
