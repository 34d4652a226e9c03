"""End to end: a running server, three Docker Engines, three agents (subprocesses).

What a user would check: each workload runs on the engine of the host the scheduler chose,
with the placement's limits (`docker inspect`); a VM answers QMP; releasing removes; a killed
container is handled by its restart policy; a killed agent's host goes DOWN and, restarted,
the agent adopts its containers (same ids, no restarts); a SIGKILLed server loses nothing it
acknowledged and the agents catch up. Waits poll with a generous fail-safe deadline (no
wall-clock assertions); the tests of this module run in order on one cluster.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from hci_scheduler.agent import runtime, vm
from hci_scheduler.agent.hostinfo import numa_nodes
from hci_scheduler.agent.processes import AgentProcess
from hci_scheduler.agent.qmp import QmpClient
from hci_scheduler.client import SchedulerClient
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.docker

DEADLINE_S = 60.0
AGENT_FLAGS = [
    "--heartbeat-s",
    "0.5",
    "--relist-s",
    "0.5",
    "--restart-backoff-s",
    "0.2",
    "--stop-timeout-s",
    "1",
    "--move-timeout-s",
    "5",
    "--log-level",
    "info",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The server, the engines and one agent per engine (host h<i>, label idx=<i>)."""

    def __init__(self, tmp, engines, images):
        self.tmp, self.engines, self.images = tmp, engines, images
        self.port = free_port()
        self.server = self._server()
        self.client = SchedulerClient(self.server.address, timeout=30)
        self.docker = [e.client() for e in engines.engines]
        self.agents = [
            AgentProcess(
                self.server.address,
                e.url,
                f"h{i}",
                os.path.join(engines.base, f"a{i}"),
                labels={"idx": str(i)},
                extra=AGENT_FLAGS
                + ["--vm-image", images[1]]
                + (["--metrics", "127.0.0.1:0"] if i == 0 else []),
            )
            for i, e in enumerate(engines.engines)
        ]

    def _server(self) -> ServerProcess:
        return ServerProcess(
            self.tmp,
            data_dir=self.tmp / "data",
            listen=f"127.0.0.1:{self.port}",
            # --snapshot-tail 0: a clean stop compacts the whole log away.
            extra=[
                "--host-down-after-s",
                "2",
                "--down-reschedule-after-s",
                "0",
                "--snapshot-tail",
                "0",
            ],
        ).start()

    def restart_server(self, kill: bool = True) -> None:
        self.server.kill() if kill else self.server.terminate()
        self.server = self._server()

    def containers(self, i: int, wid: str, all: bool = True) -> list:
        return self.docker[i].containers.list(  # ignore_removed: one removed between list and inspect
            all=all, filters={"label": f"{runtime.LABEL_WORKLOAD}={wid}"}, ignore_removed=True
        )

    def status(self, wid: str) -> pb.WorkloadStatus | None:
        for p in self.client.allocations():
            if p.workload_id == wid:
                return p.status
        return None

    def host(self, host_id: str) -> pb.Host:
        return next(h for h in self.client.hosts() if h.id == host_id)

    def close(self) -> None:
        for a in self.agents:
            a.terminate()
        self.server.kill()
        for d in self.docker:
            d.close()


@pytest.fixture(scope="module")
def cluster(engines, images, tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("e2e"), engines, images)
    try:
        for a in c.agents:
            a.start()
        wait_for(lambda: len(list(c.client.hosts())) == 3, "three hosts registered")
        yield c
    finally:
        c.close()
        for a in c.agents:
            print(f"--- agent {a.host_id}\n{a.log()[-3000:]}")


def container(
    wid: str, image: str, idx: int, cpu=100, memory=16, args=("sleep", "100000"), **spec
) -> pb.Workload:
    return pb.Workload(
        id=wid,
        requests={"cpu": cpu, "memory": memory},
        node_selector={"idx": str(idx)},
        container=pb.ContainerSpec(image=image, args=list(args), **spec),
    )


def place(c: Cluster, *workloads) -> None:
    resp = c.client.place(list(workloads))
    assert all(p.host_id for p in resp.placements), resp


def running_on(c: Cluster, i: int, wid: str):
    """The one running container of wid on engine i, once the scheduler also says RUNNING."""
    found = c.containers(i, wid, all=False)
    st = c.status(wid)
    if (
        len(found) == 1
        and st is not None
        and st.state == pb.WORKLOAD_STATE_RUNNING
        and st.container_id == found[0].id
    ):
        return found[0]
    return None


def test_hosts_registered_from_engines(cluster):
    for i, d in enumerate(cluster.docker):
        info = d.info()
        h = cluster.host(f"h{i}")
        assert h.capacity["cpu"] == info["NCPU"] * 1000
        assert h.capacity["memory"] == info["MemTotal"] // 2**20
        assert h.labels["idx"] == str(i)
        assert h.labels["kvm"] == ("true" if vm.kvm_usable()[0] else "false")
        assert h.labels["storage-limit"] == "unsupported"  # vfs takes no per-container size


def test_containers_land_on_the_chosen_engine_with_limits(cluster):
    busybox = cluster.images[0]
    place(
        cluster,
        *(
            container(f"web-{i}", busybox, i, cpu=100 * (i + 1), memory=32 * (i + 1))
            for i in range(3)
        ),
    )
    for i in range(3):
        c = wait_for(lambda: running_on(cluster, i, f"web-{i}"), f"web-{i} running on engine {i}")
        hc = c.attrs["HostConfig"]
        assert hc["NanoCpus"] == 100 * (i + 1) * 1_000_000
        assert hc["Memory"] == 32 * (i + 1) * 2**20
        assert c.labels[runtime.LABEL_HOST] == f"h{i}"
        for j in range(3):  # nowhere else
            if j != i:
                assert cluster.containers(j, f"web-{i}") == []


def test_vm_runs_with_requested_vcpus(cluster):
    cpus, _ = numa_nodes()
    vm_w = pb.Workload(
        id="vm-a",
        kind=pb.WORKLOAD_KIND_VM,
        numa=bool(cpus),
        node_selector={"idx": "1"},
        requests={"cpu": 1500, "memory": 64},
    )  # 1500 millicores: 2 vCPUs
    place(cluster, vm_w)
    c = wait_for(lambda: running_on(cluster, 1, "vm-a"), "vm-a running on engine 1")
    qmp_dir = c.labels[runtime.LABEL_QMP_DIR]
    assert runtime.wait_running(qmp_dir, timeout_s=DEADLINE_S) == "running"
    with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET)) as q:
        assert q.status() == "running"
        assert q.vcpus() == 2
    hc = c.attrs["HostConfig"]
    assert hc["NanoCpus"] == 1500 * 1_000_000
    assert hc["Memory"] == vm.memory_limit_mib(64, 2) * 2**20
    if cpus:  # a NUMA-fit VM is pinned to one node's cpus and memory
        assert hc["CpusetCpus"] in cpus.values() and hc["CpusetMems"] in {str(n) for n in cpus}
    cluster.client.release(["vm-a"])
    wait_for(lambda: cluster.containers(1, "vm-a") == [], "vm-a removed")


def test_release_removes(cluster):
    place(cluster, container("tmp-1", cluster.images[0], 2))
    wait_for(lambda: running_on(cluster, 2, "tmp-1"), "tmp-1 running")
    cluster.client.release(["tmp-1"])
    wait_for(lambda: cluster.containers(2, "tmp-1") == [], "tmp-1 removed")


def test_missing_image_fails_once_without_retrying(cluster):
    place(cluster, container("noimg", "hci-scheduler/absent:0", 0))
    st = wait_for(
        lambda: (s := cluster.status("noimg")) and s.state == pb.WORKLOAD_STATE_FAILED and s,
        "noimg FAILED",
    )
    assert "hci-scheduler/absent" in st.message
    # Several relists later: still no container, still the same single report.
    seq = cluster.client.status().last_sequence
    place(cluster, container("marker-0", cluster.images[0], 0))
    wait_for(lambda: running_on(cluster, 0, "marker-0"), "marker-0 running")
    time.sleep(1.5)  # three relist periods of the agent; a retry loop would report again
    assert cluster.containers(0, "noimg") == []
    later = []
    last = cluster.client.status().last_sequence
    for e in cluster.client.watch(after=seq):
        later.append(e)
        if e.sequence >= last:
            break
    assert not [e for e in later if e.type == pb.EVENT_TYPE_STATUS and e.workload_id == "noimg"]


def _kill(c) -> None:
    c.kill()  # SIGKILL: exit code 137


def test_killed_container_follows_restart_policy(cluster):
    b = cluster.images[0]
    place(
        cluster,
        container("pol-onfail", b, 0),  # unspecified = ON_FAILURE
        container("pol-never", b, 0, restart_policy=pb.RESTART_POLICY_NEVER),
        container(
            "pol-always",
            b,
            0,
            args=("sh", "-c", "sleep 1; exit 0"),
            restart_policy=pb.RESTART_POLICY_ALWAYS,
        ),
    )
    first = {
        w: wait_for(lambda: running_on(cluster, 0, w), f"{w} running")
        for w in ("pol-onfail", "pol-never")
    }
    seq = cluster.client.status().last_sequence
    for c in first.values():
        _kill(c)
    # ON_FAILURE: a new container, restarts=1, running.
    c = wait_for(
        lambda: (
            (x := running_on(cluster, 0, "pol-onfail")) and x.id != first["pol-onfail"].id and x
        ),
        "pol-onfail restarted",
    )
    assert c.labels[runtime.LABEL_RESTARTS] == "1"
    assert cluster.status("pol-onfail").restarts == 1
    # NEVER: reported EXITED with the signal's exit code and left alone.
    st = wait_for(
        lambda: (s := cluster.status("pol-never")) and s.state == pb.WORKLOAD_STATE_EXITED and s,
        "pol-never EXITED",
    )
    assert st.exit_code == 137 and st.container_id == first["pol-never"].id
    assert [x.id for x in cluster.containers(0, "pol-never")] == [first["pol-never"].id]
    # The exit was an event before the restart: STATUS EXITED 137 for pol-onfail too.
    last = cluster.client.status().last_sequence
    exits = []
    for e in cluster.client.watch(after=seq):
        if e.type == pb.EVENT_TYPE_STATUS and e.status.state == pb.WORKLOAD_STATE_EXITED:
            exits.append((e.workload_id, e.status.exit_code))
        if e.sequence >= last:
            break
    assert ("pol-onfail", 137) in exits and ("pol-never", 137) in exits
    # ALWAYS: a clean exit is restarted too (restarts keep counting).
    wait_for(
        lambda: (s := cluster.status("pol-always")) and s.restarts >= 2,
        "pol-always restarted twice",
    )
    cluster.client.release(["pol-onfail", "pol-never", "pol-always"])


def test_killed_agent_marks_host_down_and_restart_adopts(cluster):
    a = cluster.agents[2]
    before = wait_for(lambda: running_on(cluster, 2, "web-2"), "web-2 running")
    place(cluster, container("gone-2", cluster.images[0], 2))
    wait_for(lambda: running_on(cluster, 2, "gone-2"), "gone-2 running")
    a.kill()
    wait_for(lambda: cluster.host("h2").state == pb.HOST_STATE_DOWN, "h2 DOWN")
    cluster.client.release(["gone-2"])  # released while the agent is away
    a.start()
    wait_for(lambda: cluster.host("h2").state == pb.HOST_STATE_READY, "h2 back to READY")
    wait_for(lambda: cluster.containers(2, "gone-2") == [], "gone-2 removed by the restarted agent")
    after = cluster.containers(2, "web-2")
    assert [c.id for c in after] == [before.id]  # adopted: same container, not restarted
    assert after[0].labels[runtime.LABEL_RESTARTS] == "0"
    assert after[0].attrs["State"]["StartedAt"] == before.attrs["State"]["StartedAt"]
    assert cluster.status("web-2").container_id == before.id


def test_server_sigkill_loses_nothing_acknowledged(cluster):
    b = cluster.images[0]
    acked = [f"ack-{i}" for i in range(6)]
    place(cluster, *(container(w, b, i % 3) for i, w in enumerate(acked)))
    cluster.restart_server(kill=True)  # SIGKILL right after the acknowledgement
    cluster.client.close()
    cluster.client = SchedulerClient(cluster.server.address, timeout=30)
    for i, w in enumerate(acked):
        wait_for(lambda: running_on(cluster, i % 3, w), f"{w} running after the server restart")
    # The agents follow the restarted server: a placement after the restart runs too.
    place(cluster, container("after-restart", b, 1))
    wait_for(lambda: running_on(cluster, 1, "after-restart"), "after-restart running")
    cluster.client.release(acked + ["after-restart"])
    for i, w in enumerate(acked):
        wait_for(lambda: cluster.containers(i % 3, w) == [], f"{w} removed")


def test_drain_moves_containers_and_cold_migrates_the_vm(cluster):
    # h0 and h1 take the movable pair; draining the one they land on moves them to the other.
    # Whatever earlier tests left is released first (nothing when the test runs alone), so
    # the pair alone decides where binpack puts them.
    left = [p.workload_id for p in cluster.client.allocations()]
    if left:
        cluster.client.release(left)
    for h in ("h0", "h1"):
        cluster.client.update_host(h, labels={**cluster.host(h).labels, "mv": "yes"})
    place(
        cluster,
        pb.Workload(
            id="mv-c",
            requests={"cpu": 100, "memory": 16},
            node_selector={"mv": "yes"},
            container=pb.ContainerSpec(image=cluster.images[0], args=["sleep", "100000"]),
        ),
        pb.Workload(
            id="mv-vm",
            kind=pb.WORKLOAD_KIND_VM,
            node_selector={"mv": "yes"},
            requests={"cpu": 1000, "memory": 64},
        ),
    )
    where = {p.workload_id: p.host_id for p in cluster.client.allocations()}
    src = where["mv-c"]
    assert where["mv-vm"] == src  # binpack: the same host
    s, t = int(src[1:]), 1 - int(src[1:])
    before = {
        w: wait_for(lambda: running_on(cluster, s, w), f"{w} running").id for w in ("mv-c", "mv-vm")
    }
    resp = cluster.client.drain(src, time_limit_s=5)
    where = {p.workload_id: p.host_id for p in cluster.client.allocations()}
    assert where["mv-c"] == where["mv-vm"] == f"h{t}", resp
    for w in ("mv-c", "mv-vm"):
        c = wait_for(lambda: running_on(cluster, t, w), f"{w} running on h{t}")
        assert c.id != before[w]
        wait_for(lambda: cluster.containers(s, w) == [], f"{w} stopped on {src}")
    qmp_dir = running_on(cluster, t, "mv-vm").labels[runtime.LABEL_QMP_DIR]
    assert runtime.wait_running(qmp_dir, timeout_s=DEADLINE_S) == "running"
    cluster.client.update_host(src, state="ready")  # the drained host takes workloads again (later tests)


def test_agent_behind_a_compacted_log_relists(cluster):
    b = cluster.images[0]
    place(cluster, container("keep-2", b, 2), container("drop-2", b, 2))
    keep = wait_for(lambda: running_on(cluster, 2, "keep-2"), "keep-2 running")
    wait_for(lambda: running_on(cluster, 2, "drop-2"), "drop-2 running")
    a = cluster.agents[2]
    a.kill()
    cluster.client.release(["drop-2"])
    # A clean stop writes a snapshot and compacts up to the snapshot before it: after two,
    # the agent's saved sequence is gone from the log, so its watch gets OUT_OF_RANGE and it
    # must rebuild its desired state from a listing.
    saved = cluster.client.status().last_sequence - 1
    for k in range(2):
        cluster.restart_server(kill=False)
        cluster.client.close()
        cluster.client = SchedulerClient(cluster.server.address, timeout=30)
        place(cluster, container(f"pad-{k}", b, 0))
    assert cluster.client.status().first_sequence > saved + 1
    a.start()
    wait_for(lambda: cluster.containers(2, "drop-2") == [], "drop-2 removed after the relist")
    assert [c.id for c in cluster.containers(2, "keep-2")] == [keep.id]
    assert "relisting" in a.log()


def test_agent_metrics(cluster):
    import re
    import urllib.request

    m = wait_for(
        lambda: re.search(r"metrics on 127\.0\.0\.1:(\d+)", cluster.agents[0].log()), "metrics"
    )
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=10).read().decode()
    )
    values = dict(re.findall(r"^(hci_agent_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    on_h0 = sum(1 for p in cluster.client.allocations() if p.host_id == "h0")

    def scraped_workloads() -> bool:  # the agent catches up with the last release of a test before
        text = urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/metrics", timeout=10).read().decode()
        return float(re.search(r"^hci_agent_workloads (\S+)$", text, re.M).group(1)) == on_h0

    wait_for(scraped_workloads, "the agent's workload gauge to match h0's allocations")
    assert 0 <= float(values["hci_agent_relist_age_seconds"]) < DEADLINE_S
    assert float(values["hci_agent_applied_sequence"]) > 0
    assert 'hci_agent_container_actions_total{action="started"}' in values
