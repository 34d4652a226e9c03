"""High availability on etcd: failover time, batched throughput and unary latency.

    python -m bench.ha [--kills 20] [--hosts 10000] [--placements 100000] [--batch 1000]
                       [--unary 2000] [--skip-sqlite] [--out DIR]

Starts one etcd member (ha/local_etcd.py: 50 ms heartbeats, 500 ms election timeout, so a
1 s lease is allowed) in a temporary directory, then, each server its own process:

* batched Place: one `serve --store etcd://...` replica, `--hosts` hosts, `--placements`
  plain containers in calls of `--batch` from 4 client threads; placements/s;
* unary Place p50/p99 with one client, `--unary` calls, every one durable before its
  reply; the same two figures on the SQLite store (`--data-dir`, synchronous=FULL) in the
  same run, for comparison;
* failover: three replicas, lease TTL 1 s; `--kills` times, SIGKILL the leader and time
  until a client given every replica's address has its next Place acknowledged by the new
  leader (the client follows `hci-leader`); the killed replica is started again as a
  follower before the next kill. p50 and max.

The figures are printed with the machine they came from and written to OUT/ha.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.election import leader_key
from hci_scheduler.ha.etcd_client import EtcdClient
from hci_scheduler.ha.local_etcd import LocalEtcd, free_port
from hci_scheduler.v1 import scheduler_pb2 as pb

HOST = {"cpu": 64_000, "memory": 262_144}


class Serve:
    """`hci-scheduler serve` in its own process on a fixed loopback port."""

    def __init__(self, work: Path, args: list[str], port: int | None = None):
        self.port = port or free_port()
        self.args = args
        self.work = work
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Serve:
        port_file = self.work / f"port-{self.port}-{time.monotonic_ns()}"
        with open(self.work / f"serve-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", self.address,
                                          "--port-file", str(port_file), "--log-level", "warning", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"serve did not start; see {self.work}/serve-{self.port}.log")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def register(address: str, n_hosts: int) -> None:
    with SchedulerClient(address, timeout=120) as c:
        for start in range(0, n_hosts, 2000):
            c.register_hosts([pb.Host(id=f"h{i}", capacity=HOST) for i in range(start, min(start + 2000, n_hosts))])


def batched(address: str, n: int, batch: int, threads: int = 4) -> float:
    """Placements per second: n workloads in calls of `batch`, from `threads` clients."""
    calls = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
    lock = threading.Lock()
    placed = [0]

    def worker() -> None:
        with SchedulerClient(address, timeout=120) as c:
            while True:
                with lock:
                    if not calls:
                        return
                    ids = calls.pop()
                resp = c.place([pb.Workload(id=f"b{i}", requests={"cpu": 100 + i % 7, "memory": 64}) for i in ids])
                with lock:
                    placed[0] += sum(1 for p in resp.placements if p.host_id)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    assert placed[0] == n, f"only {placed[0]} of {n} placed: the setup failed, not a figure"
    return n / elapsed


def unary(address: str, n: int) -> tuple[float, float]:
    """p50 and p99 (ms) of one-workload Place calls from one client."""
    lat = []
    with SchedulerClient(address) as c:
        for i in range(n):
            t0 = time.perf_counter()
            p = c.place([pb.Workload(id=f"u{i}", requests={"cpu": 100, "memory": 64})]).placements[0]
            lat.append(time.perf_counter() - t0)
            assert p.host_id
    lat.sort()
    return lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3


def leader_of(replicas: list[Serve]) -> Serve | None:
    for r in replicas:
        if r.proc.poll() is not None:
            continue
        try:
            with SchedulerClient(r.address, timeout=2) as c:
                if c.status().writable:
                    return r
        except grpc.RpcError:
            pass
    return None


def wait_for(fn, timeout_s: float = 30.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError("timed out")


class LeaderKeyWatch:
    """The leader key's changes as etcd reports them, timed in this process: where a
    failover's time goes (the old key deleted when its lease expired, the new one created
    by the winner), without asking the servers."""

    def __init__(self, etcd: LocalEtcd, prefix: str):
        self.client = EtcdClient(etcd.endpoints)
        self.key = leader_key(prefix)
        self.changes: list[tuple[float, str]] = []  # (perf_counter, "delete" | "put")
        self._stop = threading.Event()
        self._stream = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        revision = self.client.range(self.key).header.revision + 1
        while not self._stop.is_set():
            self._stream = self.client.watch(self.key, start_revision=revision)
            try:
                for resp in self._stream:
                    now = time.perf_counter()
                    for ev in resp.events:
                        self.changes.append((now, "delete" if ev.type == ev.DELETE else "put"))
                        revision = ev.kv.mod_revision + 1
            except grpc.RpcError:
                pass

    def first(self, kind: str, after: float) -> float | None:
        return next((t for t, k in list(self.changes) if k == kind and t >= after), None)

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()
        self._thread.join(5)
        self.client.close()


def failover(work: Path, etcd: LocalEtcd, kills: int) -> tuple[list[float], list[dict]]:
    """Seconds from SIGKILL of the leader to the first Place the new leader acknowledges,
    and per kill where they went (`phases`)."""
    prefix = "/bench-failover"
    args = ["--store", etcd.url, "--etcd-prefix", prefix, "--lease-ttl-s", "1", "--snapshot-every", "0"]
    replicas = [Serve(work, args)]
    watch = None
    times, phases = [], []
    try:  # the servers are stopped whatever happens: they would outlive the run otherwise
        replicas[0].start()
        wait_for(lambda: leader_of(replicas))
        for _ in range(2):
            replicas.append(Serve(work, args))
            replicas[-1].start()
        register(replicas[0].address, 100)
        watch = LeaderKeyWatch(etcd, prefix)
        with SchedulerClient(addresses=[r.address for r in replicas], timeout=5, failover_s=30) as c:
            c.place([pb.Workload(id="warm", requests={"cpu": 1, "memory": 1})])
            for k in range(kills):
                leader = wait_for(lambda: leader_of(replicas))
                time.sleep(0.5)  # followers caught up and watching
                t0 = time.perf_counter()
                leader.kill()
                c.place([pb.Workload(id=f"f{k}", requests={"cpu": 1, "memory": 1})])
                t1 = time.perf_counter()
                times.append(t1 - t0)
                phases.append(_phases(watch, t0, t1))
                leader.start()  # the same address, as a follower now
                print(f"  kill {k + 1}: {times[-1]:.3f} s  ({_describe(phases[-1])})", flush=True)
    finally:
        if watch is not None:
            watch.close()
        for r in replicas:
            r.stop()
    return times, phases


def _phases(watch: LeaderKeyWatch, killed: float, acked: float) -> dict:
    """A failover's time split at the leader key's changes: `expiry` from the kill to the old
    key's deletion (the lease running out: at most the TTL after the last renewal, then
    etcd's 500 ms revoke tick), `election` from there to the winner's key, `serve` from
    there to the acknowledged Place (take-over, the client's retry, the commit)."""
    deleted = watch.first("delete", killed)
    put = watch.first("put", deleted) if deleted is not None else None
    if deleted is None or put is None or put > acked:
        return {}
    return {"expiry": round(deleted - killed, 3), "election": round(put - deleted, 3), "serve": round(acked - put, 3)}


def _describe(phases: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in phases.items()) or "leader key changes not seen"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--placements", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--unary", type=int, default=2000)
    ap.add_argument("--skip-sqlite", action="store_true")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    print(f"machine: {machine}")
    out: dict = {"machine": machine, "hosts": args.hosts, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="bench-ha-") as tmp:
        work = Path(tmp)
        with LocalEtcd(str(work / "etcd")) as etcd:
            stores = [("etcd", ["--store", etcd.url, "--etcd-prefix", "/bench", "--snapshot-every", "0"])]
            if not args.skip_sqlite:
                stores.append(("sqlite", ["--data-dir", str(work / "sqlite"), "--snapshot-every", "0"]))
            for name, serve_args in stores:
                srv = Serve(work, serve_args)
                try:
                    srv.start()
                    register(srv.address, args.hosts)
                    rate = batched(srv.address, args.placements, args.batch)
                    p50, p99 = unary(srv.address, args.unary)
                finally:
                    srv.stop()
                out[name] = {"batched_placements_per_s": round(rate), "unary_p50_ms": round(p50, 3),
                             "unary_p99_ms": round(p99, 3)}
                print(f"{name}: batched Place {rate:,.0f} placements/s ({args.hosts} hosts, calls of {args.batch}); "
                      f"unary Place p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            if args.kills:
                times, phases = failover(work, etcd, args.kills)
                out["failover_s"] = {"kills": len(times), "p50": round(statistics.median(times), 3),
                                     "max": round(max(times), 3), "all": [round(t, 3) for t in times],
                                     "phases": phases}
                print(f"failover (lease TTL 1 s, {len(times)} kills): p50 {statistics.median(times):.3f} s, "
                      f"max {max(times):.3f} s")
                for name in ("expiry", "election", "serve"):
                    got = [p[name] for p in phases if p]
                    if got:
                        print(f"  {name}: p50 {statistics.median(got):.3f} s, max {max(got):.3f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ha.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
