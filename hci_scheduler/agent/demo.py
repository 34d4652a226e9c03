"""`hci-scheduler demo --docker`: the scheduler's decisions running on real Docker Engines.

1. Engines: the ones given with --docker-host (repeatable, each on this machine), or three
   local dockerd's started in a temporary directory (root and docker.io needed).
2. The offline images built on each engine (busybox, qemu launcher), a server
   (`hci-scheduler serve`, temporary store) and one agent per engine (`hci-scheduler agent`).
3. Containers and a VM placed through gRPC (binpack, spread across hosts by anti-affinity);
   the demo waits until each runs and prints where: host, engine, container, limits as the
   engine reports them, and the VM's state and vCPUs from QMP.
4. Everything released (the agents remove the containers) and stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Sequence


def _wait(pred, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return v


def run(docker_hosts: Sequence[str], n_containers: int = 6, console=None) -> int:
    from rich.console import Console
    from rich.table import Table

    import docker

    from ..client import SchedulerClient
    from ..v1 import scheduler_pb2 as pb
    from . import images, runtime, vm
    from .engines import LocalEngines, unavailable
    from .processes import AgentProcess, ServeProcess
    from .qmp import QmpClient

    con = console or Console(width=None if Console().is_terminal else 150)
    local = None
    if not docker_hosts:
        why = unavailable()
        if why:
            con.print(f"[red]demo --docker: {why}; or give engines with --docker-host[/]")
            return 2
        local = LocalEngines(3, prefix="hdemo").start()
        docker_hosts = [e.url for e in local.engines]
        con.print(f"started {len(docker_hosts)} local Docker Engines under {local.base}")
    for i, u in enumerate(docker_hosts):
        con.print(f"  engine #{i}: {u}")
    base = tempfile.mkdtemp(prefix="hdm", dir="/tmp")
    clients = [docker.DockerClient(base_url=u, timeout=300) for u in docker_hosts]
    server = None
    agents: list[AgentProcess] = []
    try:
        names = None
        for c in clients:
            names = [i.name for i in images.build_all(c)]
        con.print(f"images: {', '.join(names)}")
        server = ServeProcess(os.path.join(base, "data")).start()
        con.print(f"service on {server.address}")
        agents = [
            AgentProcess(
                server.address,
                u,
                f"host-{i}",
                os.path.join(base, f"a{i}"),
                extra=["--vm-image", names[1], "--stop-timeout-s", "2"],
            ).start()
            for i, u in enumerate(docker_hosts)
        ]
        sched = SchedulerClient(server.address)
        _wait(lambda: len(list(sched.hosts())) == len(agents), "the agents to register their hosts")
        for h in sched.hosts():
            con.print(
                f"  {h.id}: cpu {h.capacity['cpu']} m, memory {h.capacity['memory']} MiB, "
                f"ssd {h.capacity['ssd']} GiB, labels {dict(h.labels)}"
            )
        work = [
            pb.Workload(
                id=f"web-{i}",
                group="web",
                requests={"cpu": 100 * (1 + i % 3), "memory": 16 * (1 + i % 2)},
                anti_affinities=[pb.AffinityTerm(group="web", hard=False, weight=50)],
                container=pb.ContainerSpec(
                    image=names[0], args=["sleep", "100000"], env={"INDEX": str(i)}
                ),
            )
            for i in range(n_containers)
        ]
        work.append(
            pb.Workload(id="vm-0", kind=pb.WORKLOAD_KIND_VM, requests={"cpu": 1000, "memory": 64})
        )
        resp = sched.place(work, strategy="spread")
        placed = {p.workload_id: p.host_id for p in resp.placements if p.host_id}
        for p in resp.placements:
            if not p.host_id:
                con.print(f"[yellow]{p.workload_id} not placed: {p.explanation.message}[/]")

        def running():
            st = {p.workload_id: p.status for p in sched.allocations()}
            return (
                all(
                    st[w].state in (pb.WORKLOAD_STATE_RUNNING, pb.WORKLOAD_STATE_FAILED)
                    for w in placed
                )
                and st
            )

        statuses = _wait(running, "every workload to run")
        table = Table(title="where the workloads run")
        for col in (
            "workload",
            "host",
            "engine",
            "container",
            "state",
            "cpu (NanoCpus)",
            "memory limit",
            "note",
        ):
            table.add_column(col)
        for wid, host in placed.items():
            i = int(host.rsplit("-", 1)[1])
            st = statuses[wid]
            note = st.message
            cont = None
            if st.container_id:
                cont = clients[i].containers.get(st.container_id)
                qmp_dir = cont.labels.get(runtime.LABEL_QMP_DIR)
                if qmp_dir and runtime.wait_running(qmp_dir, 30):
                    with QmpClient(os.path.join(qmp_dir, vm.QMP_SOCKET)) as q:
                        kvm = q.execute("query-kvm")["enabled"]
                        note = f"qemu {q.status()}, {q.vcpus()} vCPUs, kvm {kvm}"
            hc = cont.attrs["HostConfig"] if cont is not None else {}
            table.add_row(
                wid,
                host,
                f"#{i}",
                st.container_id[:12],
                pb.WorkloadState.Name(st.state)[15:],
                f"{hc.get('NanoCpus', 0) / 1e9:g}",
                f"{hc.get('Memory', 0) >> 20} MiB",
                note,
            )
        con.print(table)
        sched.release(list(placed))
        _wait(
            lambda: all(
                not c.containers.list(all=True, filters={"label": runtime.LABEL_WORKLOAD}, ignore_removed=True)
                for c in clients
            ),
            "the agents to remove the released workloads",
        )
        con.print("released: the agents removed every container")
        sched.close()
        return 0
    finally:
        for a in agents:
            a.terminate()
        if server is not None:
            server.kill()
        for c in clients:
            c.close()
        if local is not None:
            local.close()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="hci-scheduler demo --docker", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--docker-host",
        action="append",
        default=[],
        metavar="URL",
        help="an engine on this machine, repeatable (default: start three local ones)",
    )
    p.add_argument("--containers", type=int, default=6)
    a = p.parse_args(argv)
    return run(a.docker_host, a.containers)
