"""The agent follows the leader across a failover (issues 15 and 16): two `hci-scheduler
serve --store etcd://...` replicas on a real etcd, a real Docker Engine and one agent given
both addresses. The leader is SIGKILLed; a workload placed through the new leader runs on
the engine, the agent's reports reach the new leader, and a release through it removes the
container, while what ran before the kill is left running (adopted, not restarted)."""

from __future__ import annotations

import os

import pytest

from hci_scheduler.agent import runtime
from hci_scheduler.agent.processes import AgentProcess
from hci_scheduler.client import SchedulerClient
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.agent.test_agent_e2e import AGENT_FLAGS
from tests.etcd.fixtures import etcd_prefix, etcd_server  # noqa: F401 (fixtures)
from tests.etcd.test_failover import leader_of, replica
from tests.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.etcd]


def _container(wid: str, image: str) -> pb.Workload:
    return pb.Workload(id=wid, requests={"cpu": 100, "memory": 16},
                       container=pb.ContainerSpec(image=image, args=["sleep", "100000"]))


def _running(client, docker, wid: str):
    """wid's one running container, once the scheduler also has its RUNNING report for it."""
    found = docker.containers.list(filters={"label": f"{runtime.LABEL_WORKLOAD}={wid}"}, ignore_removed=True)
    st = next((p.status for p in client.allocations() if p.workload_id == wid), None)
    if len(found) == 1 and st is not None and st.state == pb.WORKLOAD_STATE_RUNNING \
            and st.container_id == found[0].id:
        return found[0]
    return None


def test_agent_follows_the_leader_across_a_failover(engines, images, tmp_path, etcd_server, etcd_prefix):  # noqa: F811
    a = replica(tmp_path, etcd_server, etcd_prefix).start()
    wait_for(lambda: leader_of([a]), "the first replica leads")
    b = replica(tmp_path, etcd_server, etcd_prefix).start()
    replicas = [a, b]
    addresses = ",".join(r.address for r in replicas)
    client = SchedulerClient(addresses, timeout=10)
    agent = AgentProcess(addresses, engines[2].url, "hf", os.path.join(engines.base, "failover-agent"),
                         extra=AGENT_FLAGS + ["--vm-image", images[1]])
    docker = engines[2].client()
    try:
        agent.start()
        wait_for(lambda: any(h.id == "hf" for h in client.hosts()), "the agent registered its host")
        client.place([_container("before", images[0])])
        before = wait_for(lambda: _running(client, docker, "before"), "before running")

        old = leader_of(replicas)
        old.kill()
        new = wait_for(lambda: leader_of(replicas), "a new leader")
        assert new is not old

        resp = client.place([_container("after", images[0])])  # the client follows the leader too
        assert resp.placements[0].host_id == "hf"
        wait_for(lambda: _running(client, docker, "after"), "after running, reported to the new leader")
        assert "watch moves from" in agent.log()
        # What ran before the failover runs on, in the same container.
        assert _running(client, docker, "before").id == before.id
        client.release(["before"])
        wait_for(lambda: not docker.containers.list(all=True, sparse=True, filters={
            "label": f"{runtime.LABEL_WORKLOAD}=before"}), "before removed after its release")
        client.release(["after"])
        wait_for(lambda: not docker.containers.list(all=True, sparse=True, filters={
            "label": f"{runtime.LABEL_WORKLOAD}=after"}), "after removed after its release")
    finally:
        agent.terminate()
        for r in replicas:
            r.kill()
        client.close()
        docker.close()
        print(f"--- agent hf\n{agent.log()[-4000:]}")
