"""Conversions between wire messages and the model are exact inverses where the server
relies on it (ListHosts and HOST_UPDATED events are built from the Cluster's hosts); the
bounds of limits.py on what a request may carry."""
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet

from hci_scheduler.errors import ValidationError
from hci_scheduler.server import convert, limits
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


@pytest.mark.parametrize("key, ok", [
    ("zone", True), ("n" * 63, True), ("p" * 253 + "/" + "n" * 63, True), ("example.com/zone", True),
    ("n" * 64, False), ("p" * 254 + "/zone", False), ("p/" + "n" * 64, False), ("/zone", False),
    ("zone/", False), ("a/b/c", False),
])
def test_label_keys_are_bounded_as_kubernetes_bounds_them(key, ok):
    host = convert.normalize_host(pb.Host(id="h", capacity={"cpu": 1}, labels={key: "v"}))
    if ok:
        assert convert.host_to_model(host).labels == {key: "v"}
    else:
        with pytest.raises(ValidationError, match="labels key"):
            convert.host_to_model(host)


def test_decode_drops_unknown_fields_and_bounds_their_nesting():
    w = pb.Workload(id="w", requests={"cpu": 1})
    group = b"\x9b\x06"  # field 99, start group
    end = b"\x9c\x06"
    for depth, ok in ((1, True), (limits.MAX_NESTING - 1, True), (limits.MAX_NESTING, False), (40, False)):
        data = w.SerializeToString() + group * depth + end * depth + b"\xa2\x06\x03abc"
        if ok:
            got = limits.decode(pb.Workload, data)
            assert got.SerializeToString() == w.SerializeToString()
            assert not UnknownFieldSet(got)
        else:
            with pytest.raises(ValidationError, match="nests messages"):
                limits.decode(pb.Workload, data)
    with pytest.raises(ValidationError, match="malformed Workload"):
        limits.decode(pb.Workload, b"\x0a\x05ab")
