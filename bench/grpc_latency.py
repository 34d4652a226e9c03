"""gRPC latency and throughput of the scheduler service.

    python -m bench.grpc_latency [--hosts 10000] [--fsync full|normal] [--transport grpcio|aio|lean[,...]]
                                 [--rounds N] [--quick] [--out DIR]

Starts `hci-scheduler serve` in a subprocess (its own interpreter, so client
and server do not share a GIL) on a free loopback port with a fresh SQLite
store, registers `--hosts` hosts (64 cores, 256 GiB, 2 TB ssd, 25 Gbit/s),
then measures:

* unary Place latency p50/p99 with 1, 8 and 64 concurrent clients (threads
  of this process, one channel each), every call durable before its reply;
* placements per second with batched Place calls of 1,000 workloads;
* the server's CPU time per unary call with one client (its own process, read
  from /proc), which a noisy machine disturbs less than latency.

Targets on the 2-core machine: unary p99 < 2 ms with one client; >= 50,000
placements/s in batches of 1,000. The figures are printed, with the machine
they came from, and written to OUT/grpc_latency_FSYNC_TRANSPORT.json.

Several transports (`--transport grpcio,aio,lean`) are measured in turn,
`--rounds` times, each round in a rotated order, and a table of the medians
over the rounds follows: compare transports within one such run, never across
runs, as the machine's speed drifts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _machine() -> dict:
    disk_fsync_ms = _fsync_probe()
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "fsync_p50_ms": disk_fsync_ms[0], "fsync_p99_ms": disk_fsync_ms[1]}


def _fsync_probe(n: int = 100) -> tuple[float, float]:
    """p50/p99 of write+fsync of 4 KiB on the temp dir's disk: the floor of a durable reply."""
    d = tempfile.mkdtemp()
    try:
        fd = os.open(os.path.join(d, "probe"), os.O_WRONLY | os.O_CREAT)
        ts = []
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fsync(fd)
            ts.append(time.perf_counter() - t)
        os.close(fd)
        return round(1e3 * float(np.percentile(ts, 50)), 3), round(1e3 * float(np.percentile(ts, 99)), 3)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Server:
    def __init__(self, fsync: str, transport: str = "grpcio"):
        self.tmp = tempfile.mkdtemp(prefix="hci-bench-")
        port_file = os.path.join(self.tmp, "port")
        self.log = open(os.path.join(self.tmp, "server.log"), "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", "127.0.0.1:0",
             "--data-dir", os.path.join(self.tmp, "data"), "--fsync", fsync, "--port-file", port_file,
             "--log-level", "warning", "--transport", transport],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not os.path.exists(port_file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start; see " + self.log.name)
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(open(port_file).read())}"
        # serve logs (at warning) when --transport lean fell back to grpcio's own server.
        with open(self.log.name) as f:
            self.fell_back = "transport lean unavailable" in f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _stub(address: str):
    import grpc

    from hci_scheduler.v1 import scheduler_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                 ("grpc.max_receive_message_length", 256 << 20)])
    grpc.channel_ready_future(ch).result(timeout=60)
    return ch, pb_grpc.SchedulerServiceStub(ch)


def _workload(pb, wid: str, i: int):
    # Small containers (0.1-1 core, 128-1024 MiB): 10,000 hosts never fill up,
    # so every call is a successful placement.
    return pb.Workload(id=wid, requests={"cpu": 100 + 90 * (i % 11), "memory": 128 * (1 + i % 8)})


def _drive(address: str, per_client: list[list], timeout: float, warm: int = 0) -> tuple[list[float], float]:
    """Send each client's PlaceRequests in order, one thread per client, all starting
    together; returns every timed call's latency and the wall time until the last
    reply. Each client first sends its `warm` first requests untimed: the first calls
    on a new channel set up the connection and grow HTTP/2 flow-control windows,
    which a long-lived orchestrator connection has done long before. Any failed call
    or unplaced workload raises, so a figure never hides a failed run."""
    lat: list[float] = []
    ends: list[float] = []
    errors = []
    start = threading.Barrier(len(per_client) + 1)

    def check(resp) -> None:
        if not all(p.host_id for p in resp.placements):
            errors.append("unplaced")

    def run(reqs: list) -> None:
        ch, stub = _stub(address)
        try:
            for r in reqs[:warm]:
                check(stub.Place(r, timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors.append(repr(exc))
        start.wait()
        try:
            for r in reqs[warm:]:
                t = time.perf_counter()
                resp = stub.Place(r, timeout=timeout)
                lat.append(time.perf_counter() - t)
                check(resp)
            ends.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            errors.append(repr(exc))
        finally:
            ch.close()

    threads = [threading.Thread(target=run, args=(reqs,)) for reqs in per_client]
    # As timeit does: the client's own garbage collections are not the server's latency.
    gc.collect()
    gc.disable()
    try:
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
    finally:
        gc.enable()
    if errors:
        raise RuntimeError(f"{len(errors)} failed calls, first: {errors[0]}")
    return lat, max(ends) - t0


def health(address: str, calls: int) -> dict:
    """p50/p99 of a bare health check with one client: the floor of any unary call
    on this machine (channel, HTTP/2, the server's transport), to read the
    Place figures against."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch, _ = _stub(address)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service="")
        for _ in range(20):
            stub.Check(req, timeout=30)
        lat = []
        for _ in range(calls):
            t = time.perf_counter()
            stub.Check(req, timeout=30)
            lat.append(time.perf_counter() - t)
    finally:
        ch.close()
    return {"calls": calls, "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3)}


def unary(address: str, clients: int, calls_per_client: int, tag: str, warm: int = 5) -> dict:
    from hci_scheduler.v1 import scheduler_pb2 as pb

    per = [[pb.PlaceRequest(workloads=[_workload(pb, f"{tag}-{c}-{i}", i)]) for i in range(warm + calls_per_client)]
           for c in range(clients)]
    lat, wall = _drive(address, per, timeout=30, warm=warm)
    return {"clients": clients, "calls": len(lat),
            "p50_ms": round(1e3 * float(np.percentile(lat, 50)), 3),
            "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
            "calls_per_s": round(len(lat) / wall, 1)}


def batched(address: str, calls: int, batch: int, tag: str, clients: int = 1, warm: int = 2) -> dict:
    from hci_scheduler.v1 import scheduler_pb2 as pb

    # Ids unique per run: a repeated id would be an idempotent retry, answered without placing.
    per = [[pb.PlaceRequest(workloads=[_workload(pb, f"{tag}-{c}-{k}-{i}", i) for i in range(batch)])
            for k in range(warm + calls)] for c in range(clients)]
    lat, wall = _drive(address, per, timeout=120, warm=warm)
    n = calls * batch * clients
    return {"batch": batch, "clients": clients, "placements": n, "seconds": round(wall, 3),
            "placements_per_s": round(n / wall, 1),
            "call_p50_ms": round(1e3 * float(np.percentile(lat, 50)), 2)}


def run(hosts: int = 10_000, fsync: str = "full", quick: bool = False, transport: str = "grpcio") -> dict:
    from hci_scheduler.v1 import scheduler_pb2 as pb

    server = _Server(fsync, transport)
    try:
        ch, stub = _stub(server.address)
        for i in range(0, hosts, 2000):
            stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
                pb.Host(id=f"h{j}", capacity={"cpu": 64_000, "memory": 262_144, "ssd": 2_000, "net": 25_000},
                        labels={"zone": f"z{j % 3}", "rack": f"r{j // 40}"})
                for j in range(i, min(hosts, i + 2000))]), timeout=120)
        # Setup succeeded: the cluster has every host before anything is timed.
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=60).hosts_by_state["ready"] == hosts
        ch.close()
        scale = 4 if quick else 1
        out = {"hosts": hosts, "fsync": fsync, "transport": transport, "fell_back_to_grpcio": server.fell_back,
               "machine": _machine(), "unary": [], "batched": None}
        unary(server.address, 1, 50, "warm")  # warm-up: connections, code paths
        out["health"] = health(server.address, max(100, 2000 // scale))
        for clients, calls in ((1, 2000), (8, 400), (64, 60)):
            cpu0 = _cpu_seconds(server.proc.pid)
            out["unary"].append(unary(server.address, clients, max(10, calls // scale), f"u{clients}"))
            cpu1 = _cpu_seconds(server.proc.pid)
            if cpu0 is not None and cpu1 is not None:
                out["unary"][-1]["server_cpu_us_per_call"] = round(1e6 * (cpu1 - cpu0) / out["unary"][-1]["calls"])
            if clients == 1:
                # The floor again, right after: a slow phase of the machine shows in both.
                out["health_after"] = health(server.address, max(100, 2000 // scale))
        out["batched"] = batched(server.address, calls=max(3, 20 // scale), batch=1000, tag="b1")
        out["batched_2_clients"] = batched(server.address, calls=max(2, 10 // scale), batch=1000, tag="b2",
                                           clients=2)
        return out
    finally:
        server.stop()


def report(res: dict) -> str:
    m = res["machine"]
    served_by = " (UNAVAILABLE: served by grpcio's server)" if res.get("fell_back_to_grpcio") else ""
    lines = [f"gRPC Place on {res['hosts']:,} hosts, store fsync={res['fsync']}, transport {res['transport']}{served_by} "
             f"(python {m['python']}, {m['cpus']} cpus, disk fsync p50 {m['fsync_p50_ms']} ms "
             f"p99 {m['fsync_p99_ms']} ms)",
             f"bare health check (1 client, the floor of a unary call): p50 {res['health']['p50_ms']} ms, "
             f"p99 {res['health']['p99_ms']} ms before the 1-client Place calls, "
             f"{res['health_after']['p50_ms']} / {res['health_after']['p99_ms']} ms after",
             "| clients | calls | p50 ms | p99 ms | calls/s | server CPU us/call |", "|---:|---:|---:|---:|---:|---:|"]
    for u in res["unary"]:
        lines.append(f"| {u['clients']} | {u['calls']} | {u['p50_ms']} | {u['p99_ms']} | {u['calls_per_s']} | "
                     f"{u.get('server_cpu_us_per_call', '-')} |")
    for key in ("batched", "batched_2_clients"):
        b = res[key]
        lines.append(f"batched ({b['batch']} per call, {b['clients']} client(s)): "
                     f"{b['placements_per_s']:,.0f} placements/s ({b['placements']:,} in {b['seconds']} s, "
                     f"call p50 {b['call_p50_ms']} ms)")
    one = res["unary"][0]
    lines.append(f"targets: unary p99 < 2 ms with 1 client: {'met' if one['p99_ms'] < 2 else 'NOT met'}; "
                 f">= 50,000 placements/s batched: "
                 f"{'met' if res['batched']['placements_per_s'] >= 50_000 else 'NOT met'}")
    return "\n".join(lines)


def _summary_row(res: dict) -> dict:
    one, eight = res["unary"][0], res["unary"][1]
    return {"health_p50_ms": res["health"]["p50_ms"], "health_p99_ms": res["health"]["p99_ms"],
            "p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"],
            "cpu_us_per_call": one.get("server_cpu_us_per_call"),
            "calls_per_s_8": eight["calls_per_s"], "p99_ms_8": eight["p99_ms"],
            "placements_per_s": res["batched"]["placements_per_s"],
            "placements_per_s_2": res["batched_2_clients"]["placements_per_s"]}


def compare(results: dict[str, list[dict]]) -> str:
    """Median (min-max) over the rounds, per transport: one line each, same run."""
    cols = [("health_p50_ms", "health p50"), ("health_p99_ms", "health p99"), ("p50_ms", "1c p50"),
            ("p99_ms", "1c p99"), ("cpu_us_per_call", "1c CPU us"), ("calls_per_s_8", "8c calls/s"),
            ("p99_ms_8", "8c p99"), ("placements_per_s", "batched/s"), ("placements_per_s_2", "batched 2c/s")]
    rounds = len(next(iter(results.values())))
    lines = [f"median (min-max) of {rounds} round(s), transports measured in turn:",
             "| transport | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, runs in results.items():
        rows = [_summary_row(r) for r in runs]
        cells = []
        for key, _ in cols:
            vals = [r[key] for r in rows if r[key] is not None]
            if not vals:
                cells.append("-")
                continue
            med = statistics.median(vals)
            fmt = (lambda v: f"{v:,.0f}") if med >= 100 else (lambda v: f"{v:.3g}")
            cells.append(fmt(med) if len(vals) == 1 else f"{fmt(med)} ({fmt(min(vals))}-{fmt(max(vals))})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpc_latency", description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--fsync", choices=["full", "normal"], default="full",
                   help="full: every reply survives power loss (default); normal: survives a crash")
    p.add_argument("--transport", default="grpcio",
                   help="the server's transport (hci-scheduler serve --transport: grpcio, aio or lean), "
                        "or several, comma-separated, measured in turn")
    p.add_argument("--rounds", type=int, default=1, help="measure every transport this many times")
    p.add_argument("--quick", action="store_true", help="a quarter of the calls")
    p.add_argument("--out", default="bench-out")
    a = p.parse_args(argv)
    transports = [t.strip() for t in a.transport.split(",") if t.strip()]
    unknown = sorted(set(transports) - {"grpcio", "aio", "lean"})
    if unknown or not transports or a.rounds < 1:
        p.error(f"--transport takes grpcio, aio or lean (comma-separated), --rounds at least 1; got "
                f"{a.transport!r}, {a.rounds}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {t: [] for t in transports}
    for r in range(a.rounds):
        for t in transports[r % len(transports):] + transports[:r % len(transports)]:
            res = run(a.hosts, a.fsync, a.quick, t)
            results[t].append(res)
            print(report(res), flush=True)
            print(flush=True)
    for t, runs in results.items():
        (out / f"grpc_latency_{a.fsync}_{t}.json").write_text(json.dumps(runs[0] if len(runs) == 1 else runs,
                                                                          indent=2))
    if len(transports) > 1 or a.rounds > 1:
        print(compare(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
