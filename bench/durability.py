"""What durability under store faults costs.

    python -m hci_scheduler.bench.durability [--hosts 100] [--placements 100000] [--batch 1000]

Builds a store in-process (SQLite, synchronous=NORMAL to build it fast): `--hosts`
hosts, then `--placements` plain containers in calls of `--batch`. Then measures:

* the undo of a batch the store refused (disk full): the Cluster rebuilt from the log,
  as SchedulerState._restore_durable does, with no snapshot (the worst case);
* `hci-scheduler check` on the stopped store (the offline verification, replay included);
* one high-water mark write, without fsync (every 0.1 s) and with it (each checkpoint);
* the bytes the incarnation adds to each event;
* commits of one event (synchronous=FULL) alone and beside two threads reading 1,000
  events at a time, as catching-up watchers do: the store's one connection in EXCLUSIVE
  locking mode makes reads take turns with commits (store/sqlite.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import subprocess
import sys
import tempfile
import time

from hci_scheduler.server import convert
from hci_scheduler.server.check import check_store
from hci_scheduler.server.state import SchedulerState
from hci_scheduler.store import Record, SQLiteStore, StoreUnwritable
from hci_scheduler.store.mark import Mark, write_mark
from hci_scheduler.v1 import scheduler_pb2 as pb


def build(path: str, n_hosts: int, n_placements: int, batch: int) -> SchedulerState:
    state = SchedulerState(SQLiteStore(path, "NORMAL"))
    hosts = [pb.Host(id=f"h{i}", capacity={"cpu": 10**9, "memory": 10**9}) for i in range(n_hosts)]
    state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))
    for start in range(0, n_placements, batch):
        ws = [pb.Workload(id=f"w{i}", requests={"cpu": 10 + i % 7, "memory": 5 + i % 3})
              for i in range(start, min(start + batch, n_placements))]
        items = [convert.place_item(w, w.id, state.dimensions) for w in ws]
        state.execute("place", (items, False, "binpack", False), n=len(items))
    return state


def commit_latency(directory: str, commits: int = 1_000) -> None:
    """p50/p99 of one-event commits, alone and beside two reading threads."""
    store = SQLiteStore(os.path.join(directory, "commits.db"), "FULL")
    body = os.urandom(200)
    for start in range(0, 20_000, 1_000):  # something to read
        store.append([Record(start + k + 1, 4, body) for k in range(1_000)])

    def timed() -> str:
        lat = []
        for _ in range(commits):
            t0 = time.perf_counter()
            store.append([Record(store.last_sequence() + 1, 4, body)])
            lat.append(time.perf_counter() - t0)
        lat.sort()
        return f"p50/p99 {statistics.median(lat) * 1e3:.2f}/{lat[int(0.99 * len(lat))] * 1e3:.2f} ms"

    print(f"commit of one event, alone: {timed()}")
    stop, reads = threading.Event(), [0]

    def reader() -> None:
        while not stop.is_set():
            store.read(store.last_sequence() - 20_000, 1_000)
            reads[0] += 1

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    beside = timed()
    took = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    print(f"commit of one event, beside 2 readers: {beside}; {reads[0] / took:.0f} reads of 1,000 events/s")
    store.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--placements", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scheduler.db")
        state = build(path, args.hosts, args.placements, args.batch)
        print(f"store: {state.sequence} events, {state.status().allocations} placements, "
              f"{args.hosts} hosts ({sys.platform}, {os.cpu_count()} cpus)")

        t0 = time.perf_counter()
        state._restore_durable(StoreUnwritable("measured"))
        print(f"undo of a refused batch (rebuild from the log): {time.perf_counter() - t0:.3f} s")
        state.close()

        t0 = time.perf_counter()
        problems = check_store(tmp)
        print(f"check (in-process): {time.perf_counter() - t0:.3f} s, problems: {problems or 'none'}")
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", "check", "--data-dir", tmp],
                            capture_output=True).returncode
        print(f"hci-scheduler check: {time.perf_counter() - t0:.3f} s, exit {rc}")

        mark = Mark("0123456789abcdef", 10**6)
        for sync in (False, True):
            n = 200 if sync else 2_000
            t0 = time.perf_counter()
            for _ in range(n):
                write_mark(os.path.join(tmp, "bench.mark"), mark, sync)
            print(f"mark write, sync={sync}: {(time.perf_counter() - t0) / n * 1e6:.0f} us")
        commit_latency(tmp)
    print(f"incarnation bytes per event: {len(pb.Event(incarnation='0123456789abcdef').SerializeToString())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
