"""The main job, through gRPC: `hci-scheduler demo`.

1. Start the scheduler service in this process on a free loopback port, on its
   embedded SQLite store in a temporary data dir (fsync on every commit).
2. Register a simulated cluster built from real machine rows: Google 2011
   machines (cpu, memory) plus a few Alibaba PAI GPU servers, with ssd/net
   capacities, zone and rack labels, and `kvm=true` on two hosts in three.
3. Place a realistic mix through gRPC: Google 2011 task requests as containers
   (the first ones one call each, to measure unary latency after a few
   untimed ones, the rest in batched calls) and Azure 2017 VM requests as KVM guests, one Place call per
   Azure deployment (VMs created by one tenant in one 5-minute bin).
4. Print hosts used, utilisation, refusals with their reasons and latency;
   stop the service cleanly, restart it on the same store and check that the
   state came back.

Without ../shared/data (or $HCI_SCHEDULER_DATA) the demo uses a documented
synthetic cluster instead: hosts of 64 cores / 256 GiB / 2 TB ssd / 25 Gbit/s,
and requests drawn by `datasets.synthetic("correlated", ...)`.
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import time
from typing import Sequence

import numpy as np

DIMS = ("cpu", "memory", "ssd", "net", "gpu")


def _hosts_from_traces(n_hosts: int):
    """(capacity (n, 5) int64, ids, source text) from the real machine rows."""
    from . import datasets

    google = datasets.google_hosts()
    n_gpu = max(1, n_hosts // 50)
    n_google = n_hosts - n_gpu
    # Every k-th machine keeps the trace's mix of machine types.
    pick = np.linspace(0, google.n_hosts - 1, n_google).astype(int)
    cap = google.capacity[pick].copy()
    ids = [f"g-{google.host_ids[i]}" for i in pick]
    ali = datasets.alibaba_hosts()
    gpu_pick = np.linspace(0, ali.n_hosts - 1, n_gpu).astype(int)
    cap = np.vstack([cap, ali.capacity[gpu_pick]])
    ids += [f"pai-{ali.host_ids[i]}" for i in gpu_pick]
    source = (f"{n_google} Google 2011 machines (of {google.n_hosts}) + "
              f"{n_gpu} Alibaba PAI 2020 GPU servers")
    return cap, ids, source


def _synthetic_hosts(n_hosts: int):
    from .datasets import SYNTHETIC_HOST

    cap = np.tile(SYNTHETIC_HOST, (n_hosts, 1))
    return cap, [f"s-{i}" for i in range(n_hosts)], f"{n_hosts} synthetic hosts (64 cores, 256 GiB)"


def _workloads_from_traces(n_containers: int, n_vms: int):
    """(container requests (n, 5), vm requests (m, 5), vm deployment ids (m,), source)."""
    from . import datasets

    containers = datasets.google_submits().requests[:n_containers]
    vms, batch = datasets.azure_vms(with_batches=True)
    return (containers, vms.requests[:n_vms], np.asarray(batch[:n_vms]),
            f"{len(containers)} Google 2011 task requests (containers), "
            f"{min(n_vms, vms.n_requests)} Azure 2017 VM requests (KVM guests)")


def _synthetic_workloads(n_containers: int, n_vms: int, seed: int):
    from .datasets import synthetic

    c = synthetic("correlated", n_containers, seed=seed) // 8
    v = synthetic("correlated", n_vms, seed=seed + 1) // 4
    return c, v, np.arange(n_vms) // 3, "synthetic correlated requests (containers and VMs)"


def _host_messages(cap: np.ndarray, ids: Sequence[str]):
    from .v1 import scheduler_pb2 as pb

    out = []
    for i, (row, hid) in enumerate(zip(cap.tolist(), ids)):
        capacity = {d: int(q) for d, q in zip(DIMS, row) if q}
        capacity.setdefault("ssd", 2000)      # GiB: the traces do not record disks or NICs
        capacity.setdefault("net", 25_000)    # Mbit/s
        labels = {"zone": f"z{i % 3}", "rack": f"r{i // 40}"}
        if i % 3 != 2:
            labels["kvm"] = "true"
        if capacity.get("gpu"):
            labels["gpu"] = "true"
        out.append(pb.Host(id=hid, capacity=capacity, labels=labels,
                           reserved={"cpu": min(500, capacity["cpu"] // 10)}))
    return out


def _workload(pb, wid: str, row, kind) -> object:
    req = {d: int(q) for d, q in zip(DIMS, row) if q}
    req.setdefault("ssd", 10 if kind == pb.WORKLOAD_KIND_CONTAINER else 40)
    return pb.Workload(id=wid, requests=req, kind=kind)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run(n_hosts: int = 400, n_containers: int = 8000, n_vms: int = 3000, unary: int = 300,
        batch: int = 1000, seed: int = 0, data_dir: str | None = None, console=None) -> dict:
    """Run the main job; returns the figures it printed."""
    import grpc
    from rich.console import Console
    from rich.table import Table

    from .datasets import DatasetUnavailable
    from .server.app import create_server
    from .v1 import scheduler_pb2 as pb
    from .v1 import scheduler_pb2_grpc as pb_grpc

    con = console or Console()
    try:
        cap, ids, host_src = _hosts_from_traces(n_hosts)
        creq, vreq, vbatch, wl_src = _workloads_from_traces(n_containers, n_vms)
    except DatasetUnavailable as exc:
        con.print(f"[yellow]{exc}: using the documented synthetic cluster[/]")
        cap, ids, host_src = _synthetic_hosts(n_hosts)
        creq, vreq, vbatch, wl_src = _synthetic_workloads(n_containers, n_vms, seed)

    tmp = None
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hci-demo-")
        data_dir = tmp.name
    server, port = create_server("127.0.0.1:0", data_dir=data_dir)
    server.start()
    con.print(f"service on 127.0.0.1:{port}, store {data_dir}/scheduler.db (SQLite WAL, synchronous=FULL)")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                    options=[("grpc.max_receive_message_length", 256 << 20),
                                             ("grpc.max_send_message_length", 256 << 20)])
    stub = pb_grpc.SchedulerServiceStub(channel)
    figures: dict = {"hosts_source": host_src, "workloads_source": wl_src}
    try:
        hosts = _host_messages(cap, ids)
        t0 = time.perf_counter()
        for i in range(0, len(hosts), 1000):
            stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts[i:i + 1000]), timeout=60)
        con.print(f"registered {len(hosts)} hosts in {time.perf_counter() - t0:.2f} s: {host_src}")
        con.print(f"placing {wl_src}")

        outcomes: list = []
        unary_s: list[float] = []
        containers = [_workload(pb, f"c{i}", r, pb.WORKLOAD_KIND_CONTAINER) for i, r in enumerate(creq.tolist())]
        warm = min(30, unary // 10)  # untimed first calls: code paths, the channel, the first checkpoint
        for k, w in enumerate(containers[:unary]):
            t = time.perf_counter()
            resp = stub.Place(pb.PlaceRequest(workloads=[w]), timeout=30)
            if k >= warm:
                unary_s.append(time.perf_counter() - t)
            outcomes.extend(resp.placements)
        rest = containers[unary:]
        t = time.perf_counter()
        for i in range(0, len(rest), batch):
            outcomes.extend(stub.Place(pb.PlaceRequest(workloads=rest[i:i + batch]), timeout=120).placements)
        batch_s = time.perf_counter() - t

        deployments = collections.defaultdict(list)
        for i, (row, b) in enumerate(zip(vreq.tolist(), vbatch.tolist())):
            deployments[b].append(_workload(pb, f"vm{i}", row, pb.WORKLOAD_KIND_VM))
        dep_s: list[float] = []
        for ws in deployments.values():
            t = time.perf_counter()
            outcomes.extend(stub.Place(pb.PlaceRequest(workloads=ws), timeout=60).placements)
            dep_s.append(time.perf_counter() - t)

        st = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        placed = [p for p in outcomes if p.host_id]
        refused = [p for p in outcomes if not p.host_id]
        by_reason = collections.Counter()
        example: dict[str, str] = {}
        for p in refused:
            top = max(p.explanation.filters, key=lambda f: f.hosts).reason if p.explanation.filters else "unknown"
            by_reason[top] += 1
            example.setdefault(top, f"{p.workload_id}: {p.explanation.message}")

        t = Table(title="the main job through gRPC")
        t.add_column("figure")
        t.add_column("value", justify="right")
        t.add_row("hosts registered", f"{len(hosts):,}")
        t.add_row("hosts used", f"{st.hosts_used:,}")
        t.add_row("workloads placed", f"{len(placed):,} of {len(outcomes):,}")
        t.add_row("refused", f"{len(refused):,}")
        t.add_row("unary Place p50 / p99 (1 client)",
                  f"{1e3 * _pct(unary_s, 50):.2f} / {1e3 * _pct(unary_s, 99):.2f} ms")
        t.add_row(f"batched Place ({batch} per call)", f"{len(rest) / batch_s:,.0f} placements/s")
        t.add_row("VM deployment calls p50 / p99",
                  f"{1e3 * _pct(dep_s, 50):.2f} / {1e3 * _pct(dep_s, 99):.2f} ms ({len(dep_s)} calls)")
        con.print(t)
        u = Table(title="utilisation (used / allocatable over live hosts)")
        for c in ("dimension", "used", "allocatable", "utilisation"):
            u.add_column(c, justify="right" if c != "dimension" else "left")
        for d in st.dimensions:
            u.add_row(d, f"{st.used[d]:,}", f"{st.allocatable[d]:,}", f"{100 * st.utilization[d]:.1f}%")
        con.print(u)
        if refused:
            r = Table(title="refusals by the filter that removed the most hosts")
            r.add_column("reason")
            r.add_column("workloads", justify="right")
            r.add_column("example")
            for reason, n in by_reason.most_common():
                r.add_row(reason, f"{n:,}", example[reason])
            con.print(r)
        figures.update(hosts=len(hosts), hosts_used=st.hosts_used, placed=len(placed), refused=len(refused),
                       refusals=dict(by_reason), utilization=dict(st.utilization),
                       unary_p50_ms=1e3 * _pct(unary_s, 50), unary_p99_ms=1e3 * _pct(unary_s, 99),
                       batched_per_s=len(rest) / batch_s if batch_s else 0.0,
                       last_sequence=st.last_sequence)
    finally:
        channel.close()
        t = time.perf_counter()
        server.stop(5)
        con.print(f"service stopped cleanly in {time.perf_counter() - t:.2f} s")

    # Durability check: a new server on the same store rebuilds the same state.
    t = time.perf_counter()
    server, port = create_server("127.0.0.1:0", data_dir=data_dir)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            st2 = pb_grpc.SchedulerServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=30)
        same = (st2.allocations, st2.hosts_used, st2.last_sequence) == (
            figures["placed"], figures["hosts_used"], figures["last_sequence"])
        con.print(f"restart on the same store: {st2.allocations:,} allocations, sequence {st2.last_sequence:,} "
                  f"rebuilt in {time.perf_counter() - t:.2f} s: {'same state' if same else 'STATE DIFFERS'}")
        figures["restart_same_state"] = same
    finally:
        server.stop(5)
        if tmp is not None:
            tmp.cleanup()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    if argv is not None and "--docker" in argv:  # the same on real Docker Engines (agent/demo.py)
        from .agent import demo as docker_demo

        return docker_demo.main([a for a in argv if a != "--docker"])
    p = argparse.ArgumentParser(prog="hci-scheduler demo", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=400)
    p.add_argument("--containers", type=int, default=8000)
    p.add_argument("--vms", type=int, default=3000)
    p.add_argument("--unary", type=int, default=300, help="containers placed one call each")
    p.add_argument("--batch", type=int, default=1000, help="workloads per batched call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="keep the store here instead of a temporary dir")
    a = p.parse_args(argv)
    from .server.logs import setup_logging

    setup_logging("error")
    figures = run(a.hosts, a.containers, a.vms, a.unary, a.batch, a.seed, a.data_dir)
    return 0 if figures.get("restart_same_state") else 1
