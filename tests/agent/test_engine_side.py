"""The engine side without a scheduler: offline images, containers with the placement's
limits, qemu VMs answering QMP. Each test checks what `docker inspect` or qemu says."""

from __future__ import annotations

import os
import time

import docker
import pytest

from hci_scheduler.agent import images as images_mod
from hci_scheduler.agent import runtime, vm
from hci_scheduler.agent.qmp import QmpClient
from hci_scheduler.errors import ValidationError
from hci_scheduler.v1 import scheduler_pb2 as pb

pytestmark = pytest.mark.docker


def make_facts(tmp, host_id="h-test", kvm=False, numa=None):
    return runtime.HostFacts(
        host_id=host_id,
        kvm=kvm,
        vm_image="",
        volumes_dir=os.path.join(tmp, "v"),
        qmp_root=os.path.join(tmp, "q"),
        storage_limit=False,
        numa_cpus=numa or {},
    )


@pytest.fixture
def short_tmp():
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="ha", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def container_workload(wid, image, cpu=250, memory=64, args=("sleep", "1000"), **container):
    return pb.Workload(
        id=wid,
        requests={"cpu": cpu, "memory": memory},
        container=pb.ContainerSpec(image=image, args=list(args), **container),
    )


def test_images_build_is_idempotent_and_runs(engines, images, docker_client):
    busybox, qemu = images
    assert busybox.startswith("hci-scheduler/busybox:") and qemu.startswith("hci-scheduler/qemu:")
    # A second build finds both tags with the same content hash and imports nothing.
    again = images_mod.build_all(docker_client)
    assert [i.name for i in again] == [busybox, qemu]
    assert not any(i.imported for i in again)
    assert (
        docker_client.images.get(busybox).labels[images_mod.CONTENT_HASH_LABEL]
        == again[0].content_hash
    )
    out = (
        docker_client.containers.run(
            busybox,
            ["sh", "-c", "echo $((6*7)); ls /bin | wc -l"],
            network_mode="none",
            remove=True,
        )
        .decode()
        .split()
    )
    assert out[0] == "42" and int(out[1]) > 100  # busybox applets are linked
    out = docker_client.containers.run(
        qemu, ["--version"], network_mode="none", remove=True
    ).decode()
    assert "QEMU emulator version" in out


def test_images_cli_prints_names(engines, images, capsys):
    from hci_scheduler.cli import main

    assert main(["images", "build", "--docker-host", engines[1].url]) == 0
    assert capsys.readouterr().out.split() == list(images)


@pytest.mark.parametrize("wid", ["web-1", "Tenant/App:web#1", "_x", "ä" * 3])
def test_container_name_safe_and_distinct(wid):
    name = runtime.container_name(wid)
    import re

    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name)
    assert name != runtime.container_name(wid + "x")


def test_container_limits_and_labels(engines, images, docker_client, short_tmp):
    # cpu 1500 millicores -> NanoCpus 1.5e9; memory 96 MiB -> 96 * 2**20 bytes, hard (no swap).
    w = container_workload("lim-1", images[0], cpu=1500, memory=96, env={"GREETING": "hi"})
    b = w.SerializeToString(deterministic=True)
    rt = runtime.Runtime(docker_client, "h-test")
    c = rt.start(runtime.run_spec(w, b, make_facts(short_tmp)))
    try:
        c.reload()
        hc = c.attrs["HostConfig"]
        assert hc["NanoCpus"] == 1_500_000_000
        assert hc["Memory"] == 96 * 2**20 and hc["MemorySwap"] == 96 * 2**20
        assert hc["RestartPolicy"]["Name"] in ("", "no")  # the agent restarts, not Docker
        assert hc["NetworkMode"] == "none"
        assert c.labels[runtime.LABEL_WORKLOAD] == "lim-1"
        assert c.labels[runtime.LABEL_HOST] == "h-test"
        assert c.labels[runtime.LABEL_SPEC_HASH] == runtime.spec_hash(b)
        assert c.name.startswith("lim-1-")
        assert "GREETING=hi" in c.attrs["Config"]["Env"]
        assert c.status == "running"
        # Another host id sees nothing of it (an agent reaps only its own containers).
        assert runtime.Runtime(docker_client, "h-other").list() == {}
        assert [x.id for x in rt.find("lim-1")] == [c.id]
        # A create whose name exists with the same spec adopts the container (Nomad #2084).
        assert rt.start(runtime.run_spec(w, b, make_facts(short_tmp))).id == c.id
    finally:
        rt.remove(c)
    assert rt.find("lim-1") == []


def test_missing_image_is_the_engines_reason(engines, docker_client, short_tmp):
    w = container_workload("noimg", "hci-scheduler/absent:0")
    rt = runtime.Runtime(docker_client, "h-test")
    with pytest.raises(docker.errors.ImageNotFound) as info:
        rt.start(runtime.run_spec(w, w.SerializeToString(), make_facts(short_tmp)))
    assert "hci-scheduler/absent" in str(info.value)
    with pytest.raises(ValidationError, match="no container image"):
        runtime.run_spec(pb.Workload(id="x"), b"", make_facts(short_tmp))


def test_volume_mounts_map_to_the_volumes_dir(engines, images, docker_client, short_tmp):
    w = container_workload(
        "vol-1",
        images[0],
        args=("sh", "-c", "echo data > /data/f; sleep 1000"),
        mounts=[pb.VolumeMount(volume_id="v1", path="/data")],
    )
    rt = runtime.Runtime(docker_client, "h-test")
    c = rt.start(runtime.run_spec(w, w.SerializeToString(), make_facts(short_tmp)))
    try:
        path = os.path.join(short_tmp, "v", "v1", "f")
        for _ in range(100):
            if os.path.exists(path):
                break
            time.sleep(0.05)
        assert open(path).read() == "data\n"
    finally:
        rt.remove(c)


@pytest.mark.parametrize(
    "cpu,memory,vcpus,limit",
    [
        (
            1000,
            512,
            1,
            512 + 1 + 8 + vm.OVERHEAD_FIXED_MIB,
        ),  # 512/512 = 1 MiB page tables, 8 per vCPU
        (2500, 4096, 3, 4096 + 8 + 24 + vm.OVERHEAD_FIXED_MIB),  # 2500 millicores -> 3 vCPUs
    ],
)
def test_vm_sizes(cpu, memory, vcpus, limit):
    assert vm.vcpus_of(cpu) == vcpus
    assert vm.memory_limit_mib(memory, vcpus) == limit


def test_kvm_check_matches_the_device():
    ok, why = vm.kvm_usable()
    if not os.path.exists("/dev/kvm"):
        assert not ok and "/dev/kvm" in why
    assert vm.kvm_usable("/dev/null") == (False, "/dev/null: Inappropriate ioctl for device")


@pytest.mark.parametrize("kvm", [False, True], ids=["tcg", "kvm"])
def test_vm_boots_and_answers_qmp(engines, images, docker_client, short_tmp, kvm):
    if kvm and not vm.kvm_usable()[0]:
        pytest.skip("no usable /dev/kvm here")
    facts = make_facts(short_tmp, kvm=kvm, numa={0: "0"})
    facts.vm_image = images[1]
    w = pb.Workload(
        id="vm-1", kind=pb.WORKLOAD_KIND_VM, numa=True, requests={"cpu": 2000, "memory": 64}
    )
    pin = runtime.numa_pin(w, 0, facts.numa_cpus)
    spec = runtime.run_spec(w, w.SerializeToString(), facts, pin=pin)
    assert spec.warning == ("" if kvm else vm.TCG_WARNING)
    rt = runtime.Runtime(docker_client, "h-test")
    c = rt.start(spec)
    try:
        assert runtime.wait_running(spec.qmp_dir) == "running"
        with QmpClient(os.path.join(spec.qmp_dir, vm.QMP_SOCKET)) as q:
            assert q.vcpus() == 2
            assert q.execute("query-kvm")["enabled"] is kvm
        c.reload()
        hc = c.attrs["HostConfig"]
        assert hc["Memory"] == vm.memory_limit_mib(64, 2) * 2**20
        assert hc["CpusetCpus"] == "0" and hc["CpusetMems"] == "0"
        assert bool(hc["Devices"]) is kvm
    finally:
        rt.remove(c)  # QMP quit first: qemu exits on its own
    assert rt.find("vm-1") == []
