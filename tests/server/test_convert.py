"""Conversions between wire messages and the model are exact inverses where the server
relies on it (ListHosts and HOST_UPDATED events are built from the Cluster's hosts); the
bounds of limits.py on what a request may carry."""
import re

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


# -- the runtime spec (issue 15) ------------------------------------------------------

def test_container_spec_round_trips_through_the_model():
    spec = pb.ContainerSpec(image="busybox", command=["/bin/sh", "-c"], args=["echo hi"], env={"A": "1", "B": ""},
                            restart_policy=pb.RESTART_POLICY_NEVER, single_instance=True,
                            mounts=[pb.VolumeMount(volume_id="v", path="/data", read_only=True)])
    w = convert.normalize_workload(pb.Workload(id="w", volume_ids=["v"], container=spec))
    model = convert.workload_to_model(w)
    assert (model.container.image, model.container.command, model.container.args, dict(model.container.env),
            model.container.restart_policy, model.container.single_instance) == \
        ("busybox", ("/bin/sh", "-c"), ("echo hi",), {"A": "1", "B": ""}, "never", True)
    assert convert.container_to_proto(model.container) == spec
    # The VM side: its disk may be a volume of its own.
    vm = convert.normalize_workload(pb.Workload(id="v1", kind=pb.WORKLOAD_KIND_VM, volume_ids=["root"],
                                                vm=pb.VmSpec(disk_image="volume:root")))
    vm_model = convert.workload_to_model(vm)
    assert vm_model.vm.disk_volume == "root"
    assert convert.vm_to_proto(vm_model.vm) == vm.vm


def test_unspecified_restart_policy_is_on_failure_in_the_spec_bytes():
    """The idempotency key: leaving the policy out and saying ON_FAILURE are the same spec."""
    implicit = convert.normalize_workload(pb.Workload(id="w", container=pb.ContainerSpec(image="i")))
    explicit = convert.normalize_workload(pb.Workload(id="w", container=pb.ContainerSpec(
        image="i", restart_policy=pb.RESTART_POLICY_ON_FAILURE)))
    assert convert.spec_bytes(implicit) == convert.spec_bytes(explicit)
    assert convert.workload_to_model(implicit).container.restart_policy == "on-failure"
    other = convert.normalize_workload(pb.Workload(id="w", container=pb.ContainerSpec(image="j")))
    assert convert.spec_bytes(other) != convert.spec_bytes(implicit)


@pytest.mark.parametrize("kw, named", [
    ({"image": "i" * 255}, None),  # at the bound
    ({"image": "i" * 256}, "image"),
    ({"image": "i", "args": ["a"] * 256}, None),
    ({"image": "i", "args": ["a"] * 257}, "args"),
    ({"image": "i", "command": ["c" * 4096]}, None),
    ({"image": "i", "command": ["c" * 4097]}, "command"),
    ({"image": "i", "env": {f"k{i}": "v" for i in range(256)}}, None),
    ({"image": "i", "env": {f"k{i}": "v" for i in range(257)}}, "env"),
    ({"image": "i", "env": {"k" * 255: "v" * 32768}}, None),
    ({"image": "i", "env": {"k" * 256: "v"}}, "env key"),
    ({"image": "i", "env": {"k": "v" * 32769}}, "env['k']"),
    ({"image": "i", "env": {"": "v"}}, "env key"),
    ({"image": "i", "restart_policy": 7}, "restart_policy"),
    ({"image": "i", "mounts": [pb.VolumeMount(volume_id="v", path="rel")]}, "absolute"),
], ids=lambda v: str(v)[:30])
def test_container_spec_bounds_name_the_field(kw, named):
    w = pb.Workload(id="w", volume_ids=["v"], container=pb.ContainerSpec(**kw))
    if named is None:
        assert convert.workload_to_model(convert.normalize_workload(w)).container is not None
    else:
        with pytest.raises(ValidationError, match=f"workload .w.*{re.escape(named)}"):
            convert.workload_to_model(convert.normalize_workload(w))


def test_down_is_not_a_state_a_client_sets():
    assert convert.client_host_state(pb.HOST_STATE_CORDONED, "host 'h'") == "cordoned"
    with pytest.raises(ValidationError, match="set only by the service"):
        convert.client_host_state(pb.HOST_STATE_DOWN, "host 'h'")
