"""`hci-scheduler demo --ha`: three replicas on one etcd, the leader killed mid-run.

1. Start one etcd member (local_etcd.py) and three `hci-scheduler serve --store etcd://...`
   processes in a temporary directory; one wins the leader key, two follow its log.
2. Register the demo's cluster (real machine rows when the data is there, else the
   documented synthetic one: see hci_scheduler/demo.py) and place containers from 4
   clients, one Place call each, every client given the three addresses.
3. Half-way, SIGKILL the leader. The clients follow `hci-leader` to the new leader by
   themselves; the time from the kill to the first Place the new leader acknowledges is
   the failover time.
4. Check from the log etcd holds, independently of the servers: every acknowledged
   placement is there on the host and at the sequence it was answered with, the log is
   gap-free, and no host holds more than it can (usage recomputed from the log).
"""
from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def _serve(work: Path, url: str, port: int) -> subprocess.Popen:
    with open(work / f"replica-{port}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--store", url, "--lease-ttl-s", "1", "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT)


def _leader(addresses: list[str]) -> str | None:
    import grpc

    from ..client import SchedulerClient

    for a in addresses:
        try:
            with SchedulerClient(a, timeout=1) as c:
                if c.status().writable:
                    return a
        except grpc.RpcError:
            continue
    return None


def run(n_hosts: int = 200, n_containers: int = 4000, n_clients: int = 4, seed: int = 0, console=None) -> dict:
    import grpc
    from rich.console import Console

    from .. import demo
    from ..client import SchedulerClient
    from ..datasets import DatasetUnavailable
    from ..store.etcd import EtcdStore
    from ..v1 import scheduler_pb2 as pb
    from .etcd_client import EtcdClient
    from .local_etcd import LocalEtcd, free_port

    con = console or Console()
    try:
        cap, ids, host_src = demo._hosts_from_traces(n_hosts)
        creq, _, _, wl_src = demo._workloads_from_traces(n_containers, 0)
    except DatasetUnavailable as exc:
        con.print(f"[yellow]{exc}: using the documented synthetic cluster[/]")
        cap, ids, host_src = demo._synthetic_hosts(n_hosts)
        creq, _, _, wl_src = demo._synthetic_workloads(n_containers, 0, seed)
    hosts = demo._host_messages(cap, ids)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="hci-demo-ha-") as tmp:
        work = Path(tmp)
        with LocalEtcd(str(work / "etcd")) as etcd:
            ports = [free_port() for _ in range(3)]
            addresses = [f"127.0.0.1:{p}" for p in ports]
            procs = {}
            procs[addresses[0]] = _serve(work, etcd.url, ports[0])
            end = time.monotonic() + 60
            while _leader(addresses[:1]) is None:  # the first one leads: the story is easier to follow
                if time.monotonic() > end:
                    raise SystemExit(f"the first replica did not start; see {work}")
                time.sleep(0.05)
            for a, p in zip(addresses[1:], ports[1:]):
                procs[a] = _serve(work, etcd.url, p)
            con.print(f"etcd at {etcd.url}; replicas {', '.join(addresses)}; leader {addresses[0]}")
            con.print(f"cluster: {len(hosts)} hosts ({host_src}); workloads: {wl_src}")
            with SchedulerClient(addresses=addresses, timeout=30) as c:
                c.register_hosts(hosts)

            acked: dict[str, tuple[str, int, float]] = {}
            lock = threading.Lock()
            todo = collections.deque(range(len(creq)))
            killed_at = [None]

            def client() -> None:
                with SchedulerClient(addresses=addresses, timeout=10, failover_s=30) as cl:
                    while True:
                        with lock:
                            if not todo:
                                return
                            i = todo.popleft()
                        if i == len(creq) // 2 and killed_at[0] is None:
                            leader = _leader(addresses)
                            procs[leader].send_signal(signal.SIGKILL)
                            procs[leader].wait()
                            killed_at[0] = (time.perf_counter(), leader)
                        try:
                            p = cl.place([demo._workload(pb, f"c{i}", creq[i], pb.WORKLOAD_KIND_CONTAINER)]).placements[0]
                        except grpc.RpcError as exc:
                            con.print(f"[red]c{i}: {exc.code().name} {exc.details()}[/]")
                            continue
                        if p.host_id:
                            with lock:
                                acked[p.workload_id] = (p.host_id, p.sequence, time.perf_counter())

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(n_clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            kill_t, killed = killed_at[0]
            first_after = min(t for _, _, t in acked.values() if t > kill_t)
            new_leader = _leader(addresses)
            con.print(f"placed {len(acked)} of {len(creq)} containers in {elapsed:.1f} s with {n_clients} clients; "
                      f"SIGKILL of the leader {killed} half-way")
            con.print(f"failover: {first_after - kill_t:.3f} s from the kill to the first Place the new leader "
                      f"({new_leader}) acknowledged")

            reader = EtcdStore(EtcdClient(etcd.endpoints), "/hci", own_client=True)
            events = [pb.Event.FromString(r.body) for r in reader.read()]
            reader.close()
            placed = {e.workload_id: e for e in events if e.type == pb.EVENT_TYPE_PLACED}
            lost = [w for w, (h, s, _) in acked.items() if w not in placed or
                    (placed[w].host_id, placed[w].sequence) != (h, s)]
            gap_free = [e.sequence for e in events] == list(range(1, len(events) + 1))
            allocatable = {h.id: {d: q - h.reserved.get(d, 0) for d, q in h.capacity.items()} for h in hosts}
            used: dict = collections.defaultdict(collections.Counter)
            for e in placed.values():
                used[e.host_id].update(dict(e.workload.requests))
            over = [h for h, u in used.items() if any(q > allocatable[h].get(d, 0) for d, q in u.items())]
            con.print(f"log in etcd: {len(events)} events, gap-free: {gap_free}; acknowledged placements lost or "
                      f"moved: {len(lost)}; hosts over capacity: {len(over)}")
            figures = {"acknowledged": len(acked), "failover_s": first_after - kill_t, "lost": len(lost),
                       "gap_free": gap_free, "overcommitted_hosts": len(over), "new_leader": new_leader}
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hci-scheduler demo --ha", description=__doc__.splitlines()[0])
    p.add_argument("--ha", action="store_true", help="this demo (three replicas on etcd)")
    p.add_argument("--hosts", type=int, default=200)
    p.add_argument("--containers", type=int, default=4000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from .local_etcd import etcd_binary

    if etcd_binary() is None:
        print("hci-scheduler demo --ha: etcd is not installed (Debian: apt-get install etcd-server)", file=sys.stderr)
        return 2
    f = run(a.hosts, a.containers, a.clients, a.seed)
    ok = f.get("lost") == 0 and f.get("gap_free") and f.get("overcommitted_hosts") == 0
    return 0 if ok else 1
