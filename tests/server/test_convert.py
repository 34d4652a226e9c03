"""Conversions between wire messages and the model are exact inverses where the server
relies on it (ListHosts and HOST_UPDATED events are built from the Cluster's hosts)."""
import pytest

from hci_scheduler.server import convert
from hci_scheduler.v1 import scheduler_pb2 as pb


@pytest.mark.parametrize("host", [
    # a bare host: defaults (ready, onprem, NoSchedule) made explicit by normalize_host
    pb.Host(id="h0", capacity={"cpu": 4000}),
    # every field set
    pb.Host(id="h1", capacity={"cpu": 64000, "memory": 262144, "ssd": 0}, labels={"zone": "a", "kvm": "true"},
            taints=[pb.Taint(key="gpu", value="x", effect=pb.TAINT_EFFECT_PREFER_NO_SCHEDULE),
                    pb.Taint(key="dedicated")],
            reserved={"cpu": 1000}, allocation_ratios={"cpu": 4.0, "memory": 1.5},
            numa_nodes=[pb.NumaNode(resources={"cpu": 32000, "memory": 131072})] * 2,
            pool="cloud", state=pb.HOST_STATE_CORDONED),
], ids=["bare", "every-field"])
def test_host_round_trips_through_the_model(host):
    normalized = convert.normalize_host(host)
    assert convert.host_to_proto(convert.host_to_model(normalized)) == normalized
