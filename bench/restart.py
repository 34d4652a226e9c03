"""Restart time with a long history: full replay against snapshot + tail.

    python -m hci_scheduler.bench.restart [--live 200000] [--events 1000000] [--hosts 2000]
                                          [--shapes 1000] [--tail-events 0] [--repeat 3] [--quick] [--grpc] [--keep]
                                          [--profile] [--out DIR]

Builds a store in-process (SQLite, synchronous=NORMAL to build it fast; restart reads
the same either way): `--hosts` hosts, `--live` placements, then release-and-place
rounds of 5,000 until the log holds `--events` events, `--live` of them alive.
Workloads are plain containers whose requests come from `--shapes` distinct shapes,
one in ten in a group with a tenant (the per-workload restore path). Then measures:

* full replay: SchedulerState over the log with no snapshot (what restart cost before);
* the snapshot: the pause it holds the state's lock for, the time to encode and write
  it, its size; batched placements/s (1,000 per call, in-process) while snapshots
  are written back to back, against none;
* compaction: the database's size before and after (`--tail-events` kept);
* restart from the snapshot plus a tail of `--tail-events` events written after it
  (0: a clean stop, which writes a snapshot; a crash leaves at most snapshot_every),
  `--repeat` times over the same store: the median, and the median of each phase
  (open the store, read the snapshot, SHA-256, decode, hosts, placements, read the
  tail, replay it; see SchedulerState.replay_phases);
* with `--grpc`: batched Place through gRPC (grpc_latency's `batched`) on a served store
  of live/2 placements, with no background snapshot and with one every 2,000 events.

Every restart is checked against the state before it (allocations, usage, sequence).
Figures go to stdout and OUT/restart.json.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from hci_scheduler.server import convert
from hci_scheduler.server.snapshot import Snapshots
from hci_scheduler.server.state import SchedulerState
from hci_scheduler.store import SQLiteStore
from hci_scheduler.v1 import scheduler_pb2 as pb

ROUND = 5_000


def _size(path: str) -> int:
    return sum(os.path.getsize(path + ext) for ext in ("", "-wal") if os.path.exists(path + ext))


class _Builder:
    """Places and releases through SchedulerState.execute, as the service does."""

    def __init__(self, state: SchedulerState, shapes: int, seed: int = 7):
        rng = np.random.default_rng(seed)
        self.state = state
        self.shapes = list(zip(rng.integers(50, 1000, shapes).tolist(), rng.integers(64, 2048, shapes).tolist()))
        self.rng = rng
        self.next_id = 0
        self.live: list[str] = []

    def place(self, n: int) -> int:
        dims = self.state.dimensions
        items = []
        pick = self.rng.integers(0, len(self.shapes), n).tolist()
        for k in pick:
            wid = f"w{self.next_id}"
            self.next_id += 1
            cpu, mem = self.shapes[k]
            extra = {"group": "web", "tenant": "blue"} if k % 10 == 0 else {}
            items.append(convert.place_item(pb.Workload(id=wid, requests={"cpu": cpu, "memory": mem}, **extra),
                                            wid, dims))
        answers = self.state.execute("place", (items, False, "binpack", False), n=n)
        placed = [a[0] for a in answers if type(a) is tuple]
        self.live.extend(placed)
        return len(placed)

    def release(self, n: int) -> None:
        gone, self.live = self.live[:n], self.live[n:]
        self.state.execute("release", (gone, False))


def _register(state: SchedulerState, hosts: int) -> None:
    protos = [pb.Host(id=f"h{i}", capacity={"cpu": 128_000, "memory": 1_048_576, "ssd": 4000, "net": 25_000},
                      labels={"zone": f"z{i % 3}"}) for i in range(hosts)]
    state.execute("register", (protos, [convert.host_to_model(h) for h in protos]))


def _fingerprint(state: SchedulerState) -> tuple:
    c = state.cluster
    return (state.sequence, len(state._placed), c.usage().tobytes(), tuple(c.assignments().items())[:: 997])


def _open(db: str, snap_dir: str | None, profile: bool = False) -> tuple[SchedulerState, float, float]:
    """The state over the store (and its snapshots), the seconds it took and the CPU
    seconds this process spent (the machine is shared: CPU time drifts less); with
    `profile`, the functions that took the most time go to stdout (cProfile). The
    state's `replay_phases` get the time the store took to open as `open_store`."""
    prof = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if prof is not None:
        prof.enable()
    store = SQLiteStore(db, "NORMAL")
    opened = time.perf_counter() - t0
    state = SchedulerState(store, None, snapshots=Snapshots(snap_dir, 0) if snap_dir else None)
    if prof is not None:
        prof.disable()
    took = round(time.perf_counter() - t0, 3), round(time.process_time() - c0, 3)
    state.replay_phases = {"open_store": opened, **state.replay_phases}
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return state, *took


def _median_phases(runs: list[dict]) -> dict:
    """Per phase, the median over runs of its seconds (ms, rounded)."""
    names = list(dict.fromkeys(k for r in runs for k in r))
    return {k: round(1000 * float(np.median([r.get(k, 0.0) for r in runs])), 1) for k in names}


def _throughput(state: SchedulerState, builder: _Builder, seconds: float, during=None) -> float:
    """Placements/s in 1,000-workload calls (each followed by a release, so the state keeps
    its size) for `seconds`, while `during` runs in another thread, if given."""
    done = threading.Event()
    if during is not None:
        worker = threading.Thread(target=lambda: [during() for _ in iter(done.is_set, True)], daemon=True)
        worker.start()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += builder.place(1000)
        builder.release(1000)
    rate = n / (time.perf_counter() - t0)
    done.set()
    if during is not None:
        worker.join()
    return rate


def run(live: int, events: int, hosts: int, shapes: int, tail_events: int, out: str, keep: bool = False,
        profile: bool = False, repeat: int = 3) -> dict:
    tmp = tempfile.mkdtemp(prefix="restart-")
    db, snaps = os.path.join(tmp, "scheduler.db"), os.path.join(tmp, "snapshots")
    res: dict = {"live": live, "events_target": events, "hosts": hosts, "shapes": shapes}
    try:
        state, _, _ = _open(db, None)
        b = _Builder(state, shapes)
        t0 = time.perf_counter()
        _register(state, hosts)
        while len(b.live) < live:
            b.place(min(ROUND, live - len(b.live)))
        while state.sequence + 2 * ROUND <= events:
            b.release(ROUND)
            b.place(ROUND)
        res["build_s"] = round(time.perf_counter() - t0, 1)
        res["events"], res["allocations"] = state.sequence, len(state._placed)
        want = _fingerprint(state)
        state.close()
        res["db_bytes_full_log"] = _size(db)

        state, res["full_replay_s"], res["full_replay_cpu_s"] = _open(db, None)
        assert _fingerprint(state) == want, "full replay differs"
        b.state = state
        res["place_per_s_idle"] = round(_throughput(state, b, 3.0))
        shots = Snapshots(snaps, 0, tail=10**15)  # no compaction here: measured next
        state.snapshots = shots
        pauses = []

        def one_snapshot():
            shots.sequence = 0  # write one now, whatever was written before
            shots.take(state)
            pauses.append((shots.last_pause_s, shots.last_write_s))
        res["place_per_s_during_snapshots"] = round(_throughput(state, b, 3.0, during=one_snapshot))
        res["snapshots_during"] = len(pauses)
        state.snapshots = None
        one_snapshot()
        res["snapshot_pause_ms"] = round(1000 * pauses[-1][0], 1)
        res["snapshot_write_s"] = round(pauses[-1][1], 3)
        newest = max(os.listdir(snaps))
        res["snapshot_bytes"] = os.path.getsize(os.path.join(snaps, newest))
        for name in os.listdir(snaps):  # keep the newest only
            if name != newest:
                os.remove(os.path.join(snaps, name))
        # Compact as the server does (there, only up to the snapshot before the newest).
        res["db_bytes_before_compaction"] = _size(db)
        t0 = time.perf_counter()
        state.store.compact(shots.sequence - tail_events)
        res["compaction_s"] = round(time.perf_counter() - t0, 2)
        res["db_bytes_after_compaction"] = _size(db)
        for _ in range(tail_events // 1000):
            b.release(500)
            b.place(500)
        want = _fingerprint(state)
        res["tail_events"] = state.sequence - shots.sequence
        state.close()

        walls, cpus, phases = [], [], []
        for i in range(repeat):  # the same store each time: a restart writes no snapshot here
            state, wall, cpu = _open(db, snaps, profile and i == 0)
            assert _fingerprint(state) == want, "restart from the snapshot differs"
            walls.append(wall)
            cpus.append(cpu)
            phases.append(state.replay_phases)
            res["first_sequence"] = state.store.first_sequence()
            state.snapshots = None  # no final snapshot: --keep leaves the store this restart read
            state.close()
        res["restart_s"], res["restart_cpu_s"] = float(np.median(walls)), float(np.median(cpus))
        res["restart_runs_s"], res["restart_runs_cpu_s"] = walls, cpus
        res["restart_phases_ms"] = _median_phases(phases)
    finally:
        if keep:
            res["dir"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "restart.json").write_text(json.dumps(res, indent=2))
    return res


def grpc_during_snapshots(live: int = 100_000, hosts: int = 10_000, rounds: int = 3) -> dict:
    """Batched Place through gRPC (grpc_latency's `batched`: 1,000 per call, fsynced store)
    on a server holding `live` placements, with no background snapshot against one every
    2,000 events (each batch of 1,000 then runs beside a snapshot being written)."""
    import subprocess
    import sys

    from hci_scheduler.bench.grpc_latency import _stub, batched

    out = {}
    for every in (0, 2_000):
        tmp = tempfile.mkdtemp(prefix="restart-grpc-")
        port_file = os.path.join(tmp, "port")
        proc = subprocess.Popen([sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", "127.0.0.1:0",
                                 "--data-dir", os.path.join(tmp, "data"), "--port-file", port_file,
                                 "--log-level", "warning", "--snapshot-every", str(every),
                                 "--snapshot-tail", "10000000"])
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(port_file):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
            address = f"127.0.0.1:{int(Path(port_file).read_text())}"
            ch, stub = _stub(address)
            for i in range(0, hosts, 2000):
                stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
                    pb.Host(id=f"h{j}", capacity={"cpu": 64_000, "memory": 262_144, "ssd": 2_000, "net": 25_000})
                    for j in range(i, min(hosts, i + 2000))]), timeout=120)
            for i in range(0, live, 5000):
                stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"pre{k}", requests={"cpu": 100, "memory": 256})
                                                      for k in range(i, i + 5000)]), timeout=120)
            ch.close()
            rates = [batched(address, calls=20, batch=1000, tag=f"r{r}")["placements_per_s"] for r in range(rounds)]
            out[f"grpc_batched_per_s_snapshot_every_{every}"] = round(float(np.median(rates)))
        finally:
            proc.terminate()
            proc.wait(60)
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hci_scheduler.bench.restart", description=__doc__.splitlines()[0])
    p.add_argument("--live", type=int, default=200_000)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--hosts", type=int, default=2_000)
    p.add_argument("--shapes", type=int, default=1_000)
    p.add_argument("--tail-events", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="restarts from the snapshot to time (median reported)")
    p.add_argument("--quick", action="store_true", help="20,000 live of 100,000 events on 200 hosts")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--keep", action="store_true", help="keep the store and snapshots the restart read (the path "
                   "is printed)")
    p.add_argument("--profile", action="store_true", help="print where the restart from the snapshot spends its "
                   "time (cProfile)")
    p.add_argument("--grpc", action="store_true", help="also batched Place through gRPC (a served store of "
                   "live/2 placements) with and without snapshots written beside it")
    a = p.parse_args(argv)
    if a.quick:
        a.live, a.events, a.hosts = 20_000, 100_000, 200
    res = run(a.live, a.events, a.hosts, a.shapes, a.tail_events, a.out, a.keep, a.profile, a.repeat)
    if a.grpc:
        res.update(grpc_during_snapshots(live=a.live // 2))
        (Path(a.out) / "restart.json").write_text(json.dumps(res, indent=2))
    width = max(map(len, res))
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for name, ms in v.items():
                print(f"  {name:<{width - 2}}  {ms}")
        else:
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) else f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
