"""Live migration between two agents' qemu processes (`agent --migration-listen`), on two
real Docker Engines, under TCG (`--accel tcg`: it needs no /dev/kvm, and the target's qemu
must use the source's accelerator): a VM on one host is drained to the other; the target's agent starts
qemu with `-incoming`, the source's agent migrates the running guest over QMP through the
agents' stream, and the guest runs on the target without booting again. qemu started with
`-incoming` runs only after a completed incoming migration, which is what the test checks,
beside the source's report "migrated live to ..." and the source container's removal."""

from __future__ import annotations

import os

import pytest

from hci_scheduler.agent import migration, runtime, vm
from hci_scheduler.agent.processes import AgentProcess
from hci_scheduler.agent.qmp import QmpClient
from hci_scheduler.client import SchedulerClient
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.agent.test_agent_e2e import AGENT_FLAGS
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.docker


@pytest.fixture
def two_hosts(engines, images, tmp_path):
    """A server and agents lm0, lm1 on engines 0 and 1, both listening for migrations."""
    server = ServerProcess(tmp_path, data_dir=tmp_path / "data").start()
    client = SchedulerClient(server.address, timeout=30)
    agents = [AgentProcess(server.address, engines[i].url, f"lm{i}", os.path.join(engines.base, f"lm-agent{i}"),
                           labels={"lm": "yes"},
                           extra=AGENT_FLAGS + ["--vm-image", images[1], "--migration-listen", "127.0.0.1:0",
                                                "--accel", "tcg"])
              for i in range(2)]
    dockers = [engines[i].client() for i in range(2)]
    try:
        for a in agents:
            a.start()
        wait_for(lambda: {h.id for h in client.hosts()} == {"lm0", "lm1"}, "both hosts registered")
        yield client, agents, dockers
    finally:
        try:
            left = [p.workload_id for p in client.allocations()]
            if left:
                client.release(left)
            for i, d in enumerate(dockers):
                wait_for(lambda d=d, i=i: not d.containers.list(
                    all=True, sparse=True, filters={"label": f"{runtime.LABEL_HOST}=lm{i}"}), f"lm{i}'s containers removed")
        finally:
            for a in agents:
                a.terminate()
            server.kill()
            client.close()
            for d in dockers:
                d.close()
            for a in agents:
                print(f"--- agent {a.host_id}\n{a.log()[-3000:]}")


def _vm_container(docker, wid: str):
    found = docker.containers.list(all=True, filters={"label": f"{runtime.LABEL_WORKLOAD}={wid}"},
                                   ignore_removed=True)
    return found[0] if len(found) == 1 else None


def _status(client, wid: str) -> pb.Placement | None:
    return next((p for p in client.allocations() if p.workload_id == wid), None)


def test_drained_vm_moves_live_to_the_other_agent(two_hosts):
    client, agents, dockers = two_hosts
    for h in client.hosts():
        assert migration.ADDRESS_LABEL in h.labels  # each agent publishes its listener
    client.place([pb.Workload(id="lv", kind=pb.WORKLOAD_KIND_VM, node_selector={"lm": "yes"},
                              requests={"cpu": 500, "memory": 64})])
    src = _status(client, "lv").host_id
    s, t = int(src[2:]), 1 - int(src[2:])
    first = wait_for(lambda: (p := _status(client, "lv")) and p.status.state == pb.WORKLOAD_STATE_RUNNING
                     and _vm_container(dockers[s], "lv"), "lv running on its first host")
    assert runtime.wait_running(first.labels[runtime.LABEL_QMP_DIR], timeout_s=60) == "running"
    last = client.status().last_sequence

    client.drain(src, time_limit_s=5)
    assert _status(client, "lv").host_id == f"lm{t}"
    c = wait_for(lambda: (p := _status(client, "lv")) and p.host_id == f"lm{t}"
                 and p.status.state == pb.WORKLOAD_STATE_RUNNING and _vm_container(dockers[t], "lv"),
                 "lv running on the target")
    # The target's qemu was started to receive a migration, and runs: the migration completed.
    assert c.labels[runtime.LABEL_INCOMING] == "1" and "-incoming" in c.attrs["Args"]
    with QmpClient(os.path.join(c.labels[runtime.LABEL_QMP_DIR], vm.QMP_SOCKET)) as q:
        assert q.status() == "running"
        assert q.execute("query-migrate").get("status") == "completed"
        assert q.execute("query-kvm")["enabled"] is False  # TCG on both sides
    assert vm.TCG_WARNING in _status(client, "lv").status.message
    wait_for(lambda: _vm_container(dockers[s], "lv") is None, "lv removed from the source")
    # The source said it migrated it, in a STATUS event.
    stopped = []
    end = client.status().last_sequence
    for e in client.watch(after=last):
        if e.type == pb.EVENT_TYPE_STATUS and e.status.host_id == src:
            stopped.append(e.status)
        if e.sequence >= end:
            break
    assert any(st.state == pb.WORKLOAD_STATE_STOPPED and st.message == f"migrated live to lm{t}" for st in stopped)
    assert "live migration of lv: receiving" in agents[t].log()
