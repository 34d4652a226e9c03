"""The agent's pieces that need no engine: state file, flags, qemu's command line, hashes."""

from __future__ import annotations

import json
import os

import pytest

from hci_scheduler.agent import images, runtime, statefile, vm
from hci_scheduler.agent.agent import _restart_wanted
from hci_scheduler.cli import main
from hci_scheduler.v1 import scheduler_pb2 as pb


def test_state_file_round_trip_and_atomic(tmp_path):
    assert statefile.load(str(tmp_path)) is None  # first start: list, then watch
    st = statefile.AgentState(42, "inc-1", {"w1": b"\x0a\x02w1", "w2": b""}, {"w1": 1})
    statefile.save(str(tmp_path), st)
    assert statefile.load(str(tmp_path)) == st
    assert os.listdir(tmp_path) == [statefile.STATE_FILE]  # no temp file left behind
    raw = json.loads((tmp_path / statefile.STATE_FILE).read_text())
    assert raw["sequence"] == 42 and raw["incarnation"] == "inc-1"


@pytest.mark.parametrize(
    "policy,code,want",
    [
        (pb.RESTART_POLICY_UNSPECIFIED, 0, False),  # unspecified = ON_FAILURE
        (pb.RESTART_POLICY_UNSPECIFIED, 137, True),
        (pb.RESTART_POLICY_ON_FAILURE, 1, True),
        (pb.RESTART_POLICY_ON_FAILURE, 0, False),
        (pb.RESTART_POLICY_ALWAYS, 0, True),
        (pb.RESTART_POLICY_NEVER, 137, False),
    ],
)
def test_restart_policy(policy, code, want):
    w = pb.Workload(id="w", container=pb.ContainerSpec(image="x", restart_policy=policy))
    assert _restart_wanted(w, code) is want


def test_spec_hash_is_versioned_and_follows_the_spec():
    a = pb.Workload(id="w", requests={"cpu": 100}, container=pb.ContainerSpec(image="x"))
    b = pb.Workload(id="w", requests={"cpu": 100}, container=pb.ContainerSpec(image="y"))
    ha = runtime.spec_hash(a.SerializeToString(deterministic=True))
    assert ha.startswith(runtime.HASH_VERSION + "-")
    assert ha == runtime.spec_hash(a.SerializeToString(deterministic=True))
    assert ha != runtime.spec_hash(b.SerializeToString(deterministic=True))


def test_qemu_command_kvm_and_tcg():
    kvm = vm.qemu_command(3, 1024, True, "/d/disk.qcow2")
    assert kvm.argv[:6] == ["-machine", "q35,accel=kvm", "-smp", "3", "-m", "1024"]
    assert kvm.devices == ["/dev/kvm:/dev/kvm:rwm"] and kvm.warning == ""
    assert f"file={vm.DISK_INSIDE},if=virtio,format=qcow2" in kvm.argv
    tcg = vm.qemu_command(1, 64, False, None)
    assert "q35,accel=tcg" in tcg.argv and tcg.devices == [] and tcg.warning == vm.TCG_WARNING
    assert "-drive" not in tcg.argv  # diskless: the firmware boots and waits
    assert vm.disk_path("volume:v9", "/vols") == "/vols/v9/disk.img"
    assert vm.disk_path("/img/a.raw", "/vols") == "/img/a.raw"


def test_vm_spec_needs_memory_and_uses_the_default_launcher(tmp_path):
    facts = runtime.HostFacts(
        "h", False, "launcher:1", str(tmp_path / "v"), str(tmp_path / "q"), False
    )
    w = pb.Workload(id="v", kind=pb.WORKLOAD_KIND_VM, requests={"cpu": 1500, "memory": 256})
    spec = runtime.run_spec(w, b"", facts)
    assert spec.image == "launcher:1" and spec.command[3] == "2"  # 1500 millicores -> 2 vCPUs
    assert spec.mem_limit_mib == vm.memory_limit_mib(256, 2)
    w.vm.launcher_image = "mine:2"
    assert runtime.run_spec(w, b"", facts).image == "mine:2"
    from hci_scheduler.errors import ValidationError

    with pytest.raises(ValidationError, match="memory"):
        runtime.run_spec(
            pb.Workload(id="v", kind=pb.WORKLOAD_KIND_VM, requests={"cpu": 1000}), b"", facts
        )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--label", "novalue"], "--label must be KEY=VALUE"),
        (["--heartbeat-s", "0"], "--heartbeat-s must be positive"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_agent_flags_refused(flags, message, capsys):
    assert (
        main(["agent", "--scheduler", "127.0.0.1:1", "--host-id", "h", "--vm-image", "x"] + flags)
        == 2
    )
    assert message in capsys.readouterr().err


def test_rootfs_tar_is_deterministic(tmp_path):
    (tmp_path / "f").write_bytes(b"hello")
    fs = images.RootFs()
    fs.add_file("bin/f", str(tmp_path / "f"))
    fs.add_link("bin/g", "f")
    import io
    import tarfile

    a, b = io.BytesIO(), io.BytesIO()
    assert fs.write_tar(a) == fs.write_tar(b)
    with tarfile.open(fileobj=io.BytesIO(a.getvalue())) as tar:
        names = tar.getnames()
        assert tar.getmember("bin/g").issym() and tar.extractfile("bin/f").read() == b"hello"
    assert "bin" in names and "tmp" in names


def test_spec_match_across_hash_versions():
    import base64

    w = pb.Workload(id="w", requests={"cpu": 100}, container=pb.ContainerSpec(image="x"))
    b = w.SerializeToString(deterministic=True)
    facts = runtime.HostFacts("h", False, "", "/v", "/q", False)
    labels = runtime.run_spec(w, b, facts).labels
    assert runtime.matches(labels, runtime.spec_hash(b), w)
    other = pb.Workload(id="w", requests={"cpu": 200}, container=pb.ContainerSpec(image="x"))
    ob = other.SerializeToString(deterministic=True)
    assert not runtime.matches(labels, runtime.spec_hash(ob), other)  # same version, other hash
    # A container labelled by an older hash function: compared by its spec, not replaced.
    old = {**labels, runtime.LABEL_SPEC_HASH: "v0-abc"}
    assert runtime.matches(old, runtime.spec_hash(b), w)
    assert not runtime.matches(old, runtime.spec_hash(ob), other)
    assert not runtime.matches({runtime.LABEL_SPEC_HASH: "v0-abc"}, runtime.spec_hash(b), w)
    assert base64.b64decode(labels[runtime.LABEL_SPEC]) == b


def test_state_file_of_an_older_agent_has_no_numa_nodes(tmp_path):
    """A state file written before NUMA nodes were kept says so (numa None), and the agent
    then relists instead of resuming (its VMs would look pinned elsewhere); an empty one
    of this version is an empty dict."""
    statefile.save(str(tmp_path), statefile.AgentState(7, "i", {"w": b""}))
    path = tmp_path / statefile.STATE_FILE
    raw = json.loads(path.read_text())
    del raw["numa"]
    path.write_text(json.dumps(raw))
    assert statefile.load(str(tmp_path)) == statefile.AgentState(7, "i", {"w": b""}, None)
    statefile.save(str(tmp_path), statefile.AgentState(7, "i", {"w": b""}))
    assert statefile.load(str(tmp_path)).numa == {}


def _numa_vm(**kw) -> pb.Workload:
    return pb.Workload(id="v", kind=pb.WORKLOAD_KIND_VM, numa=True, requests={"cpu": 1000, "memory": 64}, **kw)


@pytest.mark.parametrize(
    "record,real,node,cpus,noted",
    [
        (1, {0: "0-3", 1: "4-7"}, 1, "4-7", False),  # the node of record exists: pinned there
        (0, {0: "0-3", 1: "4-7"}, 0, "0-3", False),
        (1, {0: "0-1"}, 0, "0-1", True),  # fewer real nodes: 1 mod 1 = 0
        (3, {0: "0", 2: "1"}, 2, "1", True),  # real nodes 0 and 2: 3 mod 2 = 1 -> the second, node 2
        (2, {0: "0", 2: "1"}, 2, "1", False),
        (1, {}, -1, "", True),  # no NUMA information: not pinned
    ],
)
def test_numa_pin_is_the_node_of_record_or_the_documented_rule(record, real, node, cpus, noted):
    pin = runtime.numa_pin(_numa_vm(), record, real)
    assert (pin.record, pin.node, pin.cpus, bool(pin.note)) == (record, node, cpus, noted)
    if noted:
        assert f"NUMA node {record} of record" in pin.note


def test_numa_pin_only_for_a_numa_fit_vm_with_a_recorded_node():
    real = {0: "0", 1: "1"}
    assert runtime.numa_pin(_numa_vm(), -1, real) is None
    assert runtime.numa_pin(pb.Workload(id="v", kind=pb.WORKLOAD_KIND_VM), 1, real) is None
    assert runtime.numa_pin(pb.Workload(id="c", container=pb.ContainerSpec(image="x")), 1, real) is None


def test_run_spec_pins_the_record_and_a_container_pinned_elsewhere_is_replaced(tmp_path):
    facts = runtime.HostFacts("h", True, "img", str(tmp_path / "v"), str(tmp_path / "q"), False,
                              {0: "0-3", 1: "4-7"})
    w = _numa_vm()
    pin = runtime.numa_pin(w, 1, facts.numa_cpus)
    spec = runtime.run_spec(w, w.SerializeToString(), facts, pin=pin)
    assert (spec.cpuset_cpus, spec.cpuset_mems) == ("4-7", "1")
    assert spec.labels[runtime.LABEL_NUMA_RECORD] == "1" and spec.labels[runtime.LABEL_NUMA_NODE] == "1"
    assert runtime.pin_matches(spec.labels, pin)
    # A container an older agent pinned to its own choice (node 0) is not the record's.
    assert not runtime.pin_matches({**spec.labels, runtime.LABEL_NUMA_NODE: "0"}, pin)
    # A container without a pin matches a workload without one.
    assert runtime.pin_matches({}, None) and not runtime.pin_matches({}, pin)
    # Fewer real nodes: pinned by the rule, and the status says so.
    few = runtime.numa_pin(w, 1, {0: "0-1"})
    spec = runtime.run_spec(w, w.SerializeToString(), facts, pin=few)
    assert (spec.cpuset_cpus, spec.cpuset_mems) == ("0-1", "0") and "not on this engine host" in spec.warning
