"""The agent on real engines: Place-to-running latency, and reconcile after a restart.

    python -m hci_scheduler.bench.agent [--containers 200] [--reconcile 500] [--migrations 10]
                                        [--out DIR]

Starts three local Docker Engines (vfs, no bridge: hci_scheduler.agent.engines), builds the
offline busybox image on each, a server (`hci-scheduler serve`) and one agent per engine
(subprocesses, default flags). The three hosts are registered first, as an operator would,
with the engine's cpu and memory and a container cpu overcommit of 4 (500 containers of 10
millicores on one 2-core host); the agents find them registered and keep them.

1. Latency: `--containers` containers (busybox `sleep`, 10 millicores, 8 MiB), one Place call
   at a time, round-robin over the three hosts by a node selector, each placed after the
   previous one runs. Latency = the engine's `start` event time (docker events, timeNano) minus
   the time the Place reply arrived. Beside it, the engine's own cost for the same container:
   the `containers.run` call (create + start, the SDK's `docker run -d`), as many times, on the
   same three engines, before the agents run anything.
2. Reconcile: `--reconcile` containers placed on host h0 in calls of 100, all running; agent
   h0 is SIGKILLed and started again; its log line "reconciled N workloads in X s" gives the
   time from the agent's start to the end of its first full reconcile; every container id and
   StartedAt is compared before and after (a restart would change them).
3. Live migration: the agents of h0 and h1 run with --migration-listen; a diskless VM
   (`--vm-memory` MiB, 1 vCPU) on h0 is drained to h1, then back, `--migrations` times. Per
   move: the time from the Drain reply to the scheduler showing the VM RUNNING on the target
   (the target's report after the guest arrived), and qemu's own total-time and downtime
   (query-migrate on the source, from the source agent's log). A phase given 0 is skipped.

Figures go to stdout and OUT/agent.json, with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hci_scheduler.agent import images as images_mod
from hci_scheduler.agent import runtime
from hci_scheduler.agent.engines import LocalEngines, unavailable
from hci_scheduler.agent.processes import AgentProcess, ServeProcess
from hci_scheduler.client import SchedulerClient
from hci_scheduler.v1 import scheduler_pb2 as pb

CPU_M, MEMORY_MIB = 10, 8
CPU_RATIO = 4.0


def _pcts(values_ms: list[float]) -> dict:
    a = np.asarray(values_ms)
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "mean_ms": round(float(a.mean()), 1),
        "max_ms": round(float(a.max()), 1),
    }


class StartEvents:
    """Each engine's container `start` events (time in ns) by workload id, as they happen."""

    def __init__(self, engines):
        self.times: dict[str, int] = {}
        self.cv = threading.Condition()
        self.clients = [e.client(timeout=None) for e in engines]
        self.streams = []
        for c in self.clients:
            stream = c.events(
                decode=True,
                filters={"type": "container", "event": "start", "label": runtime.LABEL_WORKLOAD},
            )
            self.streams.append(stream)
            threading.Thread(target=self._follow, args=(stream,), daemon=True).start()

    def _follow(self, stream) -> None:
        try:
            for e in stream:
                wid = e.get("Actor", {}).get("Attributes", {}).get(runtime.LABEL_WORKLOAD)
                with self.cv:
                    self.times.setdefault(wid, e["timeNano"])
                    self.cv.notify_all()
        except Exception:  # closed at the end
            pass

    def wait(self, wid: str, timeout: float = 120.0) -> int:
        with self.cv:
            if not self.cv.wait_for(lambda: wid in self.times, timeout):
                raise RuntimeError(f"{wid} did not start within {timeout} s")
            return self.times[wid]

    def close(self) -> None:
        for s in self.streams:
            s.close()
        for c in self.clients:
            c.close()


def engine_run_ms(engines, image: str, n: int) -> list[float]:
    """The SDK's `docker run -d` (create + start) of the agent's container, n times."""
    out = []
    clients = [e.client() for e in engines]
    try:
        made = []
        for i in range(n):
            c = clients[i % len(clients)]
            t = time.perf_counter()
            made.append(
                c.containers.run(
                    image,
                    ["sleep", "100000"],
                    detach=True,
                    network_mode="none",
                    nano_cpus=CPU_M * 1_000_000,
                    mem_limit=f"{MEMORY_MIB}m",
                    memswap_limit=f"{MEMORY_MIB}m",
                    name=f"base-{i}",
                )
            )
            out.append((time.perf_counter() - t) * 1e3)
        for k in made:
            k.remove(force=True)
    finally:
        for c in clients:
            c.close()
    return out


def workload(wid: str, image: str, idx: int) -> pb.Workload:
    return pb.Workload(
        id=wid,
        requests={"cpu": CPU_M, "memory": MEMORY_MIB},
        node_selector={"idx": str(idx)},
        container=pb.ContainerSpec(image=image, args=["sleep", "100000"]),
    )


def wait_until(pred, what: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.2)
    return v


def migrations(sched, agents, n: int, vm_memory: int) -> dict:
    """Phase 3: a VM drained between h0 and h1 n times (see the module docstring)."""
    for h in ("h0", "h1"):
        labels = next(x for x in sched.hosts() if x.id == h).labels
        sched.update_host(h, labels={**labels, "mig": "yes"})
    sched.place([pb.Workload(id="mig-vm", kind=pb.WORKLOAD_KIND_VM, node_selector={"mig": "yes"},
                             requests={"cpu": 1000, "memory": vm_memory})])

    def state_on(host: str):
        p = next(p for p in sched.allocations() if p.workload_id == "mig-vm")
        return p.host_id == host and p.status.state == pb.WORKLOAD_STATE_RUNNING and p

    wait_until(lambda: state_on("h0"), "the VM running on h0", 120)
    to_running, totals, downtimes = [], [], []
    where = 0
    for k in range(n):
        src, dst = f"h{where}", f"h{1 - where}"
        logged = len(agents[where].log())
        sched.drain(src, time_limit_s=10)
        t = time.perf_counter()
        wait_until(lambda: state_on(dst), f"move {k}: the VM running on {dst}", 120)
        to_running.append((time.perf_counter() - t) * 1e3)
        m = wait_until(lambda: re.search(r"live migration of mig-vm to \S+ completed: total (\d+) ms, "
                                         r"downtime (\d+) ms", agents[where].log()[logged:]),
                       f"move {k}: the source's log", 60)
        totals.append(float(m.group(1)))
        downtimes.append(float(m.group(2)))
        sched.update_host(src, state="ready")
        where = 1 - where
    sched.release(["mig-vm"])
    return {"moves": n, "vm_memory_mib": vm_memory, "drain_to_running": _pcts(to_running),
            "qemu_total": _pcts(totals), "qemu_downtime": _pcts(downtimes)}


def run(n_containers: int, n_reconcile: int, out: Path, n_migrations: int = 0, vm_memory: int = 256) -> dict:
    from .report import machine

    why = unavailable()
    if why:
        raise SystemExit(f"bench.agent: {why}")
    base = tempfile.mkdtemp(prefix="hb", dir="/tmp")
    engines = LocalEngines(3, prefix="hbe").start()
    server = agents = events = None
    # The machine is shared: its load beside the figures says how quiet the run was.
    figures: dict = {"machine": machine(), "loadavg_start": os.getloadavg()}
    try:
        image = qemu_image = None
        for e in engines.engines:
            c = e.client(timeout=300)
            image, qemu_image = (i.name for i in images_mod.build_all(c))
            c.close()
        figures["image"] = image
        if n_containers:
            figures["engine_run"] = _pcts(engine_run_ms(engines.engines, image, n_containers))
            print(f"engine run: {figures['engine_run']}", flush=True)

        server = ServeProcess(
            os.path.join(base, "data"), extra=["--down-reschedule-after-s", "0"]
        ).start()
        sched = SchedulerClient(server.address, timeout=60)
        hosts = []
        for i, e in enumerate(engines.engines):
            c = e.client()
            info = c.info()
            c.close()
            hosts.append(
                pb.Host(
                    id=f"h{i}",
                    labels={"idx": str(i)},
                    allocation_ratios={"cpu": CPU_RATIO},
                    capacity={"cpu": info["NCPU"] * 1000, "memory": info["MemTotal"] >> 20},
                )
            )
        sched.register_hosts(hosts)
        live = ["--migration-listen", "127.0.0.1:0"] if n_migrations else []
        agents = [
            AgentProcess(
                server.address,
                e.url,
                f"h{i}",
                os.path.join(base, f"a{i}"),
                labels={"idx": str(i)},
                extra=["--vm-image", qemu_image] + (live if i < 2 else []),
            )
            for i, e in enumerate(engines.engines)
        ]
        for a in agents:
            a.start()
        wait_until(lambda: all("reconciled" in a.log() for a in agents), "agents up", 120)
        events = StartEvents(engines.engines)

        # 3. Live migration first: the machine is quietest before the containers come.
        if n_migrations:
            figures["live_migration"] = migrations(sched, agents, n_migrations, vm_memory)
            print(f"live migration: {figures['live_migration']}", flush=True)

        # 1. Place -> running, one at a time.
        lat = []
        for i in range(n_containers):
            wid = f"lat-{i}"
            resp = sched.place([workload(wid, image, i % 3)])
            acked = time.time_ns()
            assert resp.placements[0].host_id == f"h{i % 3}", resp
            lat.append((events.wait(wid) - acked) / 1e6)
        if n_containers:
            figures["place_to_running"] = _pcts(lat)
            sched.release([f"lat-{i}" for i in range(n_containers)])
        dcs = [e.client() for e in engines.engines]
        wait_until(
            lambda: all(
                not d.containers.list(
                    all=True, sparse=True, filters={"label": runtime.LABEL_WORKLOAD}
                )
                for d in dcs
            ),
            "latency containers removed",
        )
        for d in dcs:
            d.close()
        if n_containers:
            print(f"latency done: {figures['place_to_running']}", flush=True)

        # 2. Reconcile after an agent restart.
        if n_reconcile:
            t = time.perf_counter()
            for k in range(0, n_reconcile, 100):
                resp = sched.place(
                    [workload(f"rec-{j}", image, 0) for j in range(k, min(k + 100, n_reconcile))]
                )
                assert all(p.host_id == "h0" for p in resp.placements), resp
            dc = engines[0].client(timeout=120)

            def running() -> dict:
                listed = dc.containers.list(
                    sparse=False, filters={"label": runtime.LABEL_WORKLOAD, "status": "running"},
                    ignore_removed=True,
                )
                return {c.id: c.attrs["State"]["StartedAt"] for c in listed}

            wait_until(
                lambda: (
                    len(dc.containers.list(sparse=True, filters={"label": runtime.LABEL_WORKLOAD}))
                    == n_reconcile
                ),
                f"{n_reconcile} containers running",
                1800,
            )
            figures["reconcile_start_all_s"] = round(time.perf_counter() - t, 1)
            before = running()
            agents[0].kill()
            log_before = len(agents[0].log())
            t = time.perf_counter()
            agents[0].start()
            line = wait_until(
                lambda: re.search(
                    r"reconciled (\d+) workloads in ([0-9.]+) s after start: (.*)",
                    agents[0].log()[log_before:],
                ),
                "agent h0 reconciled",
                600,
            )
            wall = time.perf_counter() - t
            after = running()
            figures["reconcile"] = {
                "workloads": int(line.group(1)),
                "agent_s": float(line.group(2)),
                "process_start_to_done_s": round(wall, 2),
                "counts": line.group(3).strip(),
                "containers_before": len(before),
                "containers_after": len(after),
                "restarted_or_replaced": sum(1 for cid, s in before.items() if after.get(cid) != s),
            }
            dc.close()
    finally:
        if events is not None:
            events.close()
        for a in agents or []:
            a.terminate()
        if server is not None:
            server.kill()
        engines.close()
        shutil.rmtree(base, ignore_errors=True)
    figures["loadavg_end"] = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent.json").write_text(json.dumps(figures, indent=2))
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hci_scheduler.bench.agent", description=__doc__.splitlines()[0]
    )
    p.add_argument("--containers", type=int, default=200)
    p.add_argument("--reconcile", type=int, default=500)
    p.add_argument("--migrations", type=int, default=10)
    p.add_argument("--vm-memory", type=int, default=256, help="the migrated VM's memory, MiB")
    p.add_argument("--out", default="bench-out")
    a = p.parse_args(argv)
    figures = run(a.containers, a.reconcile, Path(a.out), a.migrations, a.vm_memory)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
