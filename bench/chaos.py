"""Chaos: SIGKILL the server under concurrent clients, restart it, and check what it kept.

    python -m hci_scheduler.bench.chaos [--trials 40] [--clients 8] [--min-s 1] [--max-s 4]
                                        [--hosts 32] [--seed S] [--full-check-every 10]
                                        [--disk-faults all|full|read-only|none] [--serve-arg ARG ...]
                                        [--keep] [--no-progress]

Runs a real `hci-scheduler serve` (its SQLite store in a temp dir, fsync full) and, in each
trial, `--clients` threads (one gRPC channel each, the generated stubs) that place plain
workloads and gangs, release, and register hosts, plus one thread that watches the events.
At a random moment the server is SIGKILLed; it is restarted on the same, ever-growing store
and the restarted server is checked against what the clients were told, with no code of
the server's own:

* placement lost or moved: every acknowledged, not-since-released placement is listed on
  the host and at the sequence it was acknowledged with;
* release undone: no acknowledged release (nor any workload found absent after an earlier
  restart: refused, or in flight at a kill and not kept) is listed again;
* host lost: every acknowledged host registration is listed;
* overcommit: usage per host recomputed from the listed workloads' requests (a VM charged
  its request x the allocation ratio, rounded up, as the core does) stays within
  floor((capacity - reserved) x ratio), and equals the usage the server reports;
* sequence gap: WatchEvents runs gap-free up to GetStatus.last_sequence, which never goes
  back; every `--full-check-every` trials (and on the last) from the log's first available
  sequence (GetStatus.first_sequence, once snapshots compacted the start), otherwise from
  where the previous check ended;
* watched event changed: what a watcher saw live before the kill is unchanged after it;
* partial gang: every gang is listed with all its members or none (the gang id carries
  its size, so this needs no client record);
* log differs: on a full check from sequence 1, replaying the log's placements and releases
  gives exactly the listed allocations.

Then the disk faults (as root; each skipped with one line where it cannot run). On a small
tmpfs: the disk fills while clients run, and the server must keep serving reads (keeping
all that was acknowledged), refuse mutations with UNAVAILABLE naming the cause while
GetStatus says it is not writable (or accept them, having found room, and keep them), and
resume by itself once space is freed; the same after a restart on the full disk; a restart
on a read-only remount serves reads and refuses writes, or refuses to start with a
non-zero exit naming the cause. A remount is refused while the server holds its files open
for writing, so the file system turning read-only under load is an ext4 image on a loop
device mounted errors=remount-ro, told of an error through its sysfs trigger_fs_error: the
server must keep serving reads and refuse writes, and after fsck and a restart nothing
acknowledged may be missing.

One line per trial (events, acknowledged placements and releases, restart time), totals at
the end; the exit code is 1 when any check failed, and the failed checks are named. The
store and the server's log are kept (and their path printed) when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from hci_scheduler.v1 import scheduler_pb2 as pb
from hci_scheduler.v1 import scheduler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]

#: Status codes a call gets when the server died under it (or refused to write): its outcome
#: is in doubt until the next restart shows it. Any other failure is a finding.
_IN_DOUBT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Failures that should not happen, whose outcome is in doubt as well.
_BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
PAGE_SIZE = 5000


@dataclass
class ChaosConfig:
    trials: int = 40
    clients: int = 8
    # Each trial's clients run for a random time in [min_s, max_s] before the kill.
    min_s: float = 1.0
    max_s: float = 4.0
    hosts: int = 32
    seed: int | None = None
    full_check_every: int = 10
    disk_faults: str = "all"  # or full (tmpfs), read-only (ext4), none
    keep: bool = False
    # Passed to `serve`, e.g. ("--snapshot-every", "2000"): kills land in snapshots and compactions.
    serve_args: tuple[str, ...] = ()
    # Called with the data dir between each kill and restart: tests damage the store there
    # to show that the checks name the loss.
    before_restart: Callable[[Path], None] | None = None


@dataclass
class TrialResult:
    trial: int
    events: int  # events written during the trial
    last_sequence: int
    first_sequence: int  # the oldest the log still holds (above 1 once compacted)
    placed: int  # acknowledged during the trial
    released: int
    refused: int  # workloads answered "fits nowhere": the cluster was full, the limits were in play
    gangs: int
    hosts: int
    restart_s: float
    check_s: float  # reading the listings and the log back, and checking them
    failures: list[str] = field(default_factory=list)

    def line(self, n_trials: int) -> str:
        state = "ok" if not self.failures else "FAILED: " + "; ".join(self.failures[:5])
        return (
            f"trial {self.trial:>3}/{n_trials}: {self.events:>7,} events (log {self.first_sequence:,}-{self.last_sequence:,}), "
            f"{self.placed:>6,} placements, {self.released:>6,} releases, {self.refused:>5,} refused, "
            f"{self.gangs:>4,} gangs, "
            f"{self.hosts} hosts acknowledged; restart {self.restart_s:.2f} s, checks {self.check_s:.2f} s; {state}"
        )


# -- the server ---------------------------------------------------------------------------


class Server:
    """`hci-scheduler serve` on one data dir, restartable; its output goes to one log."""

    def __init__(self, data_dir: Path, log_path: Path, serve_args: tuple[str, ...] = ()):
        self.data_dir = data_dir
        self.log_path = log_path
        self.serve_args = list(serve_args)
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.channel: grpc.Channel | None = None
        self.stub: pb_grpc.SchedulerServiceStub | None = None

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until GetStatus answers; returns the seconds that took."""
        # Beside the log, off the data's file system, which a disk fault may have filled.
        port_file = self.log_path.parent / f"port-{time.monotonic_ns()}"
        t0 = time.perf_counter()
        with open(self.log_path, "a") as log:
            cmd = [sys.executable, "-m", "hci_scheduler.cli", "serve", "--fsync", "full"]
            cmd += ["--listen", "127.0.0.1:0", "--port-file", str(port_file)]
            self.proc = subprocess.Popen(
                cmd
                + ["--data-dir", str(self.data_dir), "--log-level", "warning"]
                + self.serve_args,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"server did not start (exit code {self.proc.returncode}): {self.log_tail()}"
                )
            time.sleep(0.01)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        port_file.unlink()
        self.channel, self.stub = channel(self.address)
        self.stub.GetStatus(pb.GetStatusRequest(), timeout=timeout)
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(60)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(60)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3) -> str:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return ""
        return " | ".join(
            line if len(line) < 400 else line[:200] + " ... " + line[-200:] for line in lines[-n:]
        )


def sh(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run a system command (mount, mkfs, fsck), its output captured as text; never raises
    on failure: the caller reports a non-zero return code in one line."""
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as exc:  # the command is missing
        return subprocess.CompletedProcess(cmd, 127, "", str(exc))


def channel(address: str):
    ch = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
        ],
    )
    grpc.channel_ready_future(ch).result(timeout=60)
    return ch, pb_grpc.SchedulerServiceStub(ch)


def paged(call, request, field_name: str) -> list:
    """Every item of a paged listing (a server without paging answers in one page)."""
    items = []
    request.page_size = PAGE_SIZE
    while True:
        resp = call(request, timeout=120)
        items.extend(getattr(resp, field_name))
        if not resp.next_page_token:
            return items
        request.page_token = resp.next_page_token


# -- what the clients were told -----------------------------------------------------------


def make_host(hid: str, i: int) -> pb.Host:
    """Hosts of a few sizes; every third runs VMs (kvm) and containers may overcommit cpu 2x
    on every other one, so the check covers ratios and VM charges."""
    labels = {"kvm": "true"} if i % 3 == 0 else {}
    ratios = {"cpu": 2.0} if i % 2 == 0 else {}
    return pb.Host(
        id=hid,
        capacity={"cpu": 8000 + 4000 * (i % 3), "memory": 16384 + 8192 * (i % 4)},
        reserved={"cpu": 500, "memory": 1024},
        allocation_ratios=ratios,
        labels=labels,
    )


def make_workload(wid: str, rng: random.Random, gang: str = "") -> pb.Workload:
    vm = rng.random() < 0.2
    return pb.Workload(
        id=wid,
        kind=pb.WORKLOAD_KIND_VM if vm else pb.WORKLOAD_KIND_CONTAINER,
        requests={
            "cpu": rng.choice((250, 500, 1000, 2000)),
            "memory": rng.choice((512, 1024, 2048, 4096)),
        },
        gang=gang,
    )


def gang_size(gang: str) -> int:
    """A gang id ends with -s<size>: the partial-gang check needs no client record."""
    return int(gang.rpartition("-s")[2])


class Ledger:
    """What the server acknowledged, over the whole campaign (ids are never reused).

    A call that got no answer (the server died under it) is in doubt until the next
    restart settles it: what the restarted server lists is then known durable."""

    def __init__(self):
        self.lock = threading.Lock()
        self.placed: dict[str, tuple[str, int]] = {}  # workload id -> (host id, sequence)
        self.gone: set[str] = set()  # released (acknowledged or settled), refused, or lost in doubt
        self.acked_releases: set[str] = set()
        self.hosts: set[str] = set()
        self.units: list[list[str]] = []  # releasable: one workload, or a whole gang
        self.doubt_place: set[str] = set()
        self.doubt_release: list[list[str]] = []
        self.doubt_hosts: set[str] = set()
        self.gang_of: dict[str, str] = {}  # gang id of each gang member in doubt
        self.failures: list[tuple[str, str]] = []  # (check, detail) seen by the clients
        self.trial = Counter()  # placed, released, gangs, hosts acknowledged this trial

    def fail(self, check: str, detail: str) -> None:
        with self.lock:
            self.failures.append((check, detail))

    def take_unit(self, rng: random.Random) -> list[str] | None:
        with self.lock:
            if not self.units:
                return None
            i = rng.randrange(len(self.units))
            self.units[i], self.units[-1] = self.units[-1], self.units[i]
            return self.units.pop()

    def settle(self, listed: dict[str, tuple[str, int]], hosts: set[str]) -> None:
        """After a restart's checks: calls in doubt take the outcome the server kept."""
        with self.lock:
            units: dict[str, list[str]] = {}  # a gang is released as one unit
            for wid in self.doubt_place:
                if wid in listed:
                    self.placed[wid] = listed[wid]
                    units.setdefault(self.gang_of.get(wid) or wid, []).append(wid)
                else:
                    self.gone.add(wid)
            self.units.extend(units.values())
            for unit in self.doubt_release:
                if any(w in listed for w in unit):
                    self.units.append(unit)
                else:
                    for w in unit:
                        self.placed.pop(w, None)
                        self.gone.add(w)
            self.hosts |= self.doubt_hosts & hosts
            self.doubt_place.clear()
            self.doubt_release.clear()
            self.doubt_hosts.clear()
            self.gang_of.clear()


class Client(threading.Thread):
    """One orchestrator: a random mix of calls until told to stop or the server dies."""

    def __init__(
        self, name: str, address: str, ledger: Ledger, rng: random.Random, stop: threading.Event
    ):
        super().__init__(daemon=True)
        self.prefix = name
        self.address = address
        self.ledger = ledger
        self.rng = rng
        self.stop_event = stop
        self.n = 0

    def run(self) -> None:
        try:
            ch, self.stub = channel(self.address)
        except grpc.FutureTimeoutError:
            return
        try:
            while not self.stop_event.is_set():
                r = self.rng.random()
                try:
                    if r < 0.45:
                        self.place(gang=False)
                    elif r < 0.60:
                        self.place(gang=True)
                    elif r < 0.995:
                        self.release()
                    else:
                        self.register()
                except grpc.RpcError as exc:
                    if exc.code() not in _IN_DOUBT:
                        self.ledger.fail("unexpected error", f"{exc.code().name}: {exc.details()}")
                    return  # in doubt: the server is gone (or going)
        finally:
            ch.close()

    def _id(self, kind: str) -> str:
        self.n += 1
        return f"{self.prefix}{kind}{self.n}"

    def place(self, gang: bool) -> None:
        rng, led = self.rng, self.ledger
        if gang:
            size = rng.randint(2, 4)
            gid = f"{self._id('g')}-s{size}"
            ws = [make_workload(f"{gid}-{k}", rng, gang=gid) for k in range(size)]
        else:
            ws = [make_workload(self._id("w"), rng) for _ in range(rng.randint(1, 3))]
        ids = [w.id for w in ws]
        with led.lock:
            led.doubt_place.update(ids)
            if gang:
                for wid in ids:
                    led.gang_of[wid] = gid
        try:
            resp = self.stub.Place(pb.PlaceRequest(workloads=ws, gang=gang), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() not in _IN_DOUBT | _BROKEN:  # refused: "a failed call changes nothing"
                with led.lock:
                    led.doubt_place.difference_update(ids)
                    led.gone.update(ids)
            raise
        got = {p.workload_id: (p.host_id, p.sequence) for p in resp.placements}
        placed = [w for w in ids if got.get(w, ("", 0))[0]]
        if gang and len(placed) not in (0, len(ids)):
            led.fail(
                "partial gang", f"Place answered {len(placed)} of gang {gid}'s {len(ids)} members"
            )
        with led.lock:
            led.doubt_place.difference_update(ids)
            for wid in ids:
                led.gang_of.pop(wid, None)
                if wid in placed:
                    led.placed[wid] = got[wid]
                else:
                    led.gone.add(wid)
                    led.trial["refused"] += 1
            if placed:
                led.units.extend([placed] if gang else [[w] for w in placed])
                led.trial["placed"] += len(placed)
                led.trial["gangs"] += gang

    def release(self) -> None:
        led = self.ledger
        unit = led.take_unit(self.rng)
        if unit is None:
            return
        with led.lock:
            led.doubt_release.append(unit)
        try:
            resp = self.stub.Release(pb.ReleaseRequest(workload_ids=unit), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                led.fail(
                    "placement lost or moved",
                    f"Release of acknowledged {unit} said NOT_FOUND: {exc.details()}",
                )
            raise
        with led.lock:
            led.doubt_release.remove(unit)
            if sorted(resp.released_workload_ids) != sorted(unit):
                led.failures.append(
                    (
                        "unexpected error",
                        f"Release {unit} answered {list(resp.released_workload_ids)}",
                    )
                )
            for w in unit:
                led.placed.pop(w, None)
                led.gone.add(w)
                led.acked_releases.add(w)
            led.trial["released"] += len(unit)

    def register(self) -> None:
        led = self.ledger
        hosts = [
            make_host(self._id("h"), self.rng.randrange(12)) for _ in range(self.rng.randint(1, 2))
        ]
        with led.lock:
            led.doubt_hosts.update(h.id for h in hosts)
        self.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts), timeout=30)
        with led.lock:
            led.doubt_hosts.difference_update(h.id for h in hosts)
            led.hosts.update(h.id for h in hosts)
            led.trial["hosts"] += len(hosts)


class Watcher(threading.Thread):
    """Follows WatchEvents live: what it saw must still be there, unchanged, after the kill."""

    def __init__(self, address: str, after: int):
        super().__init__(daemon=True)
        self.address = address
        self.after = after
        self.seen: dict[int, tuple] = {}

    def run(self) -> None:
        try:
            ch, stub = channel(self.address)
        except grpc.FutureTimeoutError:
            return
        try:
            for resp in stub.WatchEvents(pb.WatchEventsRequest(after_sequence=self.after)):
                self.seen[resp.event.sequence] = event_key(resp.event)
        except grpc.RpcError:
            pass
        finally:
            ch.close()


def event_key(e: pb.Event) -> tuple:
    return (e.type, e.workload_id, e.host_id or e.host.id)


# -- the checks -------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the restarted server lists."""

    status: pb.GetStatusResponse
    allocations: list
    hosts: list

    @classmethod
    def read(cls, stub) -> Snapshot:
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=60)
        allocs = paged(
            stub.ListAllocations, pb.ListAllocationsRequest(include_workloads=True), "allocations"
        )
        hosts = paged(stub.ListHosts, pb.ListHostsRequest(), "hosts")
        return cls(status, allocs, hosts)

    def listed(self) -> dict[str, tuple[str, int]]:
        return {p.workload_id: (p.host_id, p.sequence) for p in self.allocations}


def check_ledger(snap: Snapshot, led: Ledger) -> list[tuple[str, str]]:
    """Acknowledged placements, releases and hosts against the listing."""
    out = []
    listed = snap.listed()
    releasing = {w for unit in led.doubt_release for w in unit}  # may or may not have been applied
    lost = [
        (w, hs, listed.get(w))
        for w, hs in led.placed.items()
        if listed.get(w) != hs and not (w in releasing and w not in listed)
    ]
    if lost:
        w, hs, got = lost[0]
        out.append(
            (
                "placement lost or moved",
                (
                    f"{len(lost)} acknowledged placements, e.g. {w} acknowledged on {hs[0]} at "
                    f"sequence {hs[1]}, listed as {got}"
                ),
            )
        )
    back = sorted(w for w in led.gone if w in listed)
    if back:
        acked = [w for w in back if w in led.acked_releases]
        out.append(
            (
                "release undone",
                (
                    f"{len(back)} workloads listed again ({len(acked)} of them released with an "
                    f"acknowledgement), e.g. {back[0]} on {listed[back[0]][0]}"
                ),
            )
        )
    host_ids = {h.id for h in snap.hosts}
    missing = sorted(led.hosts - host_ids)
    if missing:
        out.append(
            ("host lost", f"{len(missing)} acknowledged hosts not listed, e.g. {missing[0]}")
        )
    return out


def check_capacity(snap: Snapshot) -> list[tuple[str, str]]:
    """Usage recomputed from the listed workloads against each host's limit and reported usage."""
    out = []
    hosts = {h.id: h for h in snap.hosts}
    used: dict[str, Counter] = defaultdict(Counter)
    for p in snap.allocations:
        h = hosts.get(p.host_id)
        if h is None:
            out.append(("overcommit", f"{p.workload_id} listed on unknown host {p.host_id!r}"))
            continue
        vm = p.workload.kind == pb.WORKLOAD_KIND_VM
        for dim, q in p.workload.requests.items():
            if (
                vm
            ):  # a VM never overcommits: it is charged its request x the ratio (the core rounds up)
                milli = round(h.allocation_ratios.get(dim, 1.0) * 1000)
                q = (q * milli + 999) // 1000
            used[h.id][dim] += q
    over, differ = [], []
    for hid, h in hosts.items():
        for dim in set(h.capacity) | set(used[hid]):
            allocatable = h.capacity.get(dim, 0) - h.reserved.get(dim, 0)
            limit = int(allocatable * h.allocation_ratios.get(dim, 1.0))
            if used[hid][dim] > limit:
                over.append(f"{hid} {dim} {used[hid][dim]} > {limit}")
            if used[hid][dim] != h.used.get(dim, 0):
                differ.append(
                    f"{hid} {dim}: recomputed {used[hid][dim]}, reported {h.used.get(dim, 0)}"
                )
    if over:
        out.append(("overcommit", f"{len(over)} host dimensions, e.g. {over[0]}"))
    if differ:
        out.append(("usage differs", f"{len(differ)} host dimensions, e.g. {differ[0]}"))
    return out


def check_gangs(snap: Snapshot) -> list[tuple[str, str]]:
    members = Counter(p.workload.gang for p in snap.allocations if p.workload.gang)
    partial = sorted(f"{g}: {n} of {gang_size(g)}" for g, n in members.items() if n != gang_size(g))
    return [("partial gang", f"{len(partial)} gangs, e.g. {partial[0]}")] if partial else []


def check_listing(snap: Snapshot, led: Ledger) -> list[tuple[str, str]]:
    """Every check that reads only the listings."""
    return check_ledger(snap, led) + check_capacity(snap) + check_gangs(snap)


def read_events(stub, after: int, last: int) -> tuple[list[pb.Event], str]:
    """The events after `after` up to `last`, and the incarnation the stream named."""
    events, incarnation = [], ""
    if last <= after:
        return events, incarnation
    call = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after), timeout=600)
    try:
        for resp in call:
            incarnation = incarnation or resp.incarnation
            events.append(resp.event)
            if resp.event.sequence >= last:
                break
    finally:
        call.cancel()
    return events, incarnation


def check_events(
    stub, snap: Snapshot, verified: int, full: bool, watched: dict[int, tuple]
) -> tuple[list[tuple[str, str]], int]:
    """Gap-free events to last_sequence; returns failures and the sequence checked up to."""
    out = []
    last = snap.status.last_sequence
    first = max(snap.status.first_sequence, 1)
    if last < verified:
        out.append(("sequence gap", f"last_sequence went back from {verified} to {last}"))
    start = first - 1 if full else max(min(verified, last), first - 1)
    try:
        events, incarnation = read_events(stub, start, last)
    except grpc.RpcError as exc:
        return out + [
            ("sequence gap", f"WatchEvents after {start}: {exc.code().name}: {exc.details()}")
        ], verified
    expect = start
    for e in events:
        if e.sequence != expect + 1:
            out.append(
                ("sequence gap", f"event {e.sequence} follows {expect} (reading after {start})")
            )
            break
        expect = e.sequence
        if incarnation and e.incarnation and e.incarnation != incarnation:
            out.append(
                (
                    "sequence gap",
                    f"event {e.sequence} has incarnation {e.incarnation}, the stream {incarnation}",
                )
            )
            break
    if not out and expect != last:
        out.append(("sequence gap", f"events end at {expect}, last_sequence is {last}"))
    by_seq = {e.sequence: event_key(e) for e in events}
    changed = [
        (s, k, by_seq.get(s))
        for s, k in sorted(watched.items())
        if s > start and by_seq.get(s) != k
    ]
    if changed:
        s, k, now = changed[0]
        out.append(
            ("watched event changed", f"{len(changed)} events seen live, e.g. {s}: {k} -> {now}")
        )
    if full and first == 1 and not out:
        live: dict[str, str] = {}
        for e in events:
            if e.type == pb.EVENT_TYPE_PLACED:
                live[e.workload_id] = e.host_id
            elif e.type in (pb.EVENT_TYPE_RELEASED, pb.EVENT_TYPE_EVICTED):
                live.pop(e.workload_id, None)
        listed = {w: h for w, (h, _) in snap.listed().items()}
        if live != listed:
            diff = sorted(set(live.items()) ^ set(listed.items()))
            out.append(
                (
                    "log differs",
                    (
                        f"replaying the log gives {len(live)} allocations, the "
                        f"listing {len(listed)}; {len(diff)} differ, e.g. {diff[0]}"
                    ),
                )
            )
    return out, last


# -- the campaign -----------------------------------------------------------------------


class Campaign:
    def __init__(self, cfg: ChaosConfig, out=sys.stdout):
        self.cfg = cfg
        self.out = out
        self.seed = cfg.seed if cfg.seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="hci-chaos-"))
        self.ledger = Ledger()
        self.server = Server(self.tmp / "data", self.tmp / "server.log", cfg.serve_args)
        self.verified = 0
        self.results: list[TrialResult] = []
        self.failed: Counter = Counter()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, progress=None) -> int:
        cfg = self.cfg
        self.say(
            f"chaos: {cfg.trials} trials, {cfg.clients} clients, kill after {cfg.min_s}-{cfg.max_s} s, "
            f"seed {self.seed}, store {self.tmp / 'data'} (fsync full)"
        )
        t0 = time.perf_counter()
        try:
            self.server.start()
            hosts = [make_host(f"base{i}", i) for i in range(cfg.hosts)]
            self.server.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts), timeout=60)
            self.ledger.hosts.update(h.id for h in hosts)
            bar = progress(total=cfg.trials, desc="chaos trials") if progress else None
            for k in range(1, cfg.trials + 1):
                res = self.trial(k)
                self.results.append(res)
                self.say(res.line(cfg.trials))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            code = self.server.stop()
            if code != 0:
                self.failed["server died"] += 1
                self.say(
                    f"FAILED (server died): a clean stop (SIGTERM) exited with code {code}: "
                    f"{self.server.log_tail()}"
                )
            if cfg.disk_faults != "none":
                self.disk_faults(cfg.disk_faults)
        except RuntimeError as exc:  # the server did not (re)start: nothing further can be checked
            self.failed["server died"] += 1
            self.say(f"FAILED (server died): {exc}")
        finally:
            self.server.kill()
        self.say(self.totals(time.perf_counter() - t0))
        if self.failed or cfg.keep:
            self.say(f"kept: {self.tmp} (store in data/, server output in server.log)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return 1 if self.failed else 0

    def trial(self, k: int) -> TrialResult:
        cfg, led, srv = self.cfg, self.ledger, self.server
        led.trial.clear()
        led.failures.clear()
        before = srv.stub.GetStatus(pb.GetStatusRequest(), timeout=60).last_sequence
        stop = threading.Event()
        watcher = Watcher(srv.address, before)
        clients = [
            Client(f"t{k}c{i}", srv.address, led, random.Random(self.rng.random()), stop)
            for i in range(cfg.clients)
        ]
        watcher.start()
        for c in clients:
            c.start()
        time.sleep(self.rng.uniform(cfg.min_s, cfg.max_s))
        failures: list[tuple[str, str]] = []
        if not srv.alive():
            failures.append(
                (
                    "server died",
                    f"exit code {srv.proc.returncode} before the kill: {srv.log_tail()}",
                )
            )
        srv.kill()
        stop.set()
        for c in clients:
            c.join(60)
        watcher.join(60)
        if cfg.before_restart is not None:
            cfg.before_restart(srv.data_dir)
        restart_s = srv.start()
        t_check = time.perf_counter()
        snap = Snapshot.read(srv.stub)
        full = k == cfg.trials or (cfg.full_check_every > 0 and k % cfg.full_check_every == 0)
        failures += led.failures
        failures += check_listing(snap, led)
        ev_failures, self.verified = check_events(srv.stub, snap, self.verified, full, watcher.seen)
        failures += ev_failures
        led.settle(snap.listed(), {h.id for h in snap.hosts})
        self.count(failures)
        n = led.trial
        return TrialResult(
            k,
            snap.status.last_sequence - before,
            snap.status.last_sequence,
            max(snap.status.first_sequence, 1),
            n["placed"],
            n["released"],
            n["refused"],
            n["gangs"],
            n["hosts"],
            restart_s,
            time.perf_counter() - t_check,
            [f"{c}: {d}" for c, d in failures],
        )

    def count(self, failures) -> None:
        for check, _ in failures:
            self.failed[check] += 1

    def totals(self, seconds: float) -> str:
        rs = self.results
        lines = []
        if rs:
            restarts = sorted(r.restart_s for r in rs)
            lines.append(
                f"totals: {len(rs)} trials in {seconds:.0f} s, {rs[-1].last_sequence:,} events, "
                f"{sum(r.placed for r in rs):,} placements, {sum(r.released for r in rs):,} releases, "
                f"{sum(r.refused for r in rs):,} refused, "
                f"{sum(r.gangs for r in rs):,} gangs, {sum(r.hosts for r in rs):,} hosts acknowledged; "
                f"{len(self.ledger.placed):,} live at the end; restart median {restarts[len(rs) // 2]:.2f} s, "
                f"max {restarts[-1]:.2f} s"
            )
        if self.failed:
            lines.append(
                "FAILED checks: " + ", ".join(f"{c} ({n}x)" for c, n in self.failed.items())
            )
        else:
            lines.append("all checks passed")
        return "\n".join(lines)

    # -- disk faults ------------------------------------------------------------------

    def disk_faults(self, which: str = "all") -> None:
        if os.geteuid() != 0:
            self.say("disk faults skipped: mounting a file system needs root")
            return
        if which in ("all", "full"):
            self.full_disk()
        if which in ("all", "read-only"):
            self.read_only_live()

    def full_disk(self) -> bool:
        """The tmpfs faults; False (and one line) when no tmpfs can be mounted here."""
        mnt = self.tmp / "tmpfs"
        mnt.mkdir(exist_ok=True)
        mount = ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)]
        r = sh(mount)
        if r.returncode:
            self.say(f"disk faults skipped: cannot mount a tmpfs ({r.stderr.strip()})")
            return False
        try:
            DiskFaults(self, mnt, "disk").run_tmpfs()
        finally:
            sh(["umount", "-l", str(mnt)])
        return True

    def read_only_live(self) -> bool:
        """A file system that turns read-only under the running server: a remount is refused
        while files are open for writing, but ext4 mounted errors=remount-ro goes read-only
        at once when told of an error (its sysfs trigger_fs_error), as it does on a real one."""
        image, mnt = self.tmp / "ext4.img", self.tmp / "ext4"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        steps = (
            ["mkfs.ext4", "-q", "-F", str(image)],
            ["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)],
        )
        for cmd in steps:
            r = sh(cmd)
            if r.returncode:
                self.say(f"live read-only fault skipped: {' '.join(cmd[:2])}: {r.stderr.strip()}")
                return False
        try:
            dev = sh(["findmnt", "-no", "SOURCE", str(mnt)]).stdout
            trigger = Path("/sys/fs/ext4") / Path(dev.strip()).name / "trigger_fs_error"
            if not trigger.exists():
                self.say(f"live read-only fault skipped: no {trigger}")
                return False
            DiskFaults(self, mnt, "ro").run_ext4(trigger, image)
            return True
        finally:
            sh(["umount", "-l", str(mnt)])


class DiskFaults:
    """A full disk under load and a restart on it, a restart on a read-only remount (tmpfs);
    a file system turning read-only under load (ext4)."""

    READ_ONLY = ("read-only", "readonly", "read only", "not writable")

    def __init__(self, campaign: Campaign, mnt: Path, name: str):
        self.c = campaign
        self.mnt = mnt
        self.ledger = Ledger()
        self.server = Server(
            mnt / "data", campaign.tmp / f"server-{name}.log", campaign.cfg.serve_args
        )
        self.filler = mnt / "filler"

    def note(self, check: str | None, text: str) -> None:
        self.c.say(("disk faults: " if check is None else f"disk faults FAILED ({check}): ") + text)
        if check is not None:
            self.c.failed[check] += 1

    def begin(self) -> None:
        self.server.start()
        hosts = [make_host(f"d{i}", i) for i in range(16)]
        self.server.stub.RegisterHosts(pb.RegisterHostsRequest(hosts=hosts), timeout=60)
        self.ledger.hosts.update(h.id for h in hosts)

    def run_tmpfs(self) -> None:
        self.begin()
        for check, scenario in (
            ("disk full", self.full_under_load),
            ("disk full", self.full_at_restart),
            ("read-only", self.read_only_restart),
        ):
            try:
                if not self.server.alive():  # an earlier scenario's failure: start afresh
                    self.server.start(timeout=60)
                scenario()
            except (RuntimeError, grpc.RpcError) as exc:
                self.note(check, f"{scenario.__name__}: {exc}")
            finally:
                with contextlib.suppress(OSError):
                    self.filler.unlink()
        self.final_restart("disk full")

    def final_restart(self, check: str) -> None:
        """Kill, restart on the freed disk: everything acknowledged in the faults is kept."""
        self.server.kill()
        self.server.start(timeout=60)
        snap = Snapshot.read(self.server.stub)
        bad = check_listing(snap, self.ledger)
        self.outcome(
            check,
            [f"final restart: {c}: {d}" for c, d in bad],
            f"final restart: all {len(self.ledger.placed):,} acknowledged placements kept",
        )
        self.server.kill()

    def run_ext4(self, trigger: Path, image: Path) -> None:
        try:
            self.begin()
            self.read_only_under_load(trigger, image)
        except (RuntimeError, grpc.RpcError) as exc:
            self.note("read-only", f"{exc}")
        finally:
            self.server.kill()

    def load(self, seconds: float) -> None:
        """Clients for `seconds` (they stop early when the disk refuses their writes)."""
        stop = threading.Event()
        clients = [
            Client(
                f"d{time.monotonic_ns()}c{i}",
                self.server.address,
                self.ledger,
                random.Random(self.c.rng.random()),
                stop,
            )
            for i in range(4)
        ]
        for cl in clients:
            cl.start()
        time.sleep(seconds)
        stop.set()
        for cl in clients:
            cl.join(60)

    def fill(self) -> int:
        """Write the filler until the disk is full; returns its size."""
        n = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (1 << 20, 1 << 14, 1 << 12, 1 << 9):
                while True:
                    try:
                        n += os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return n

    def outcome(self, check: str, problems: list[str], success: str) -> None:
        if problems:
            self.note(check, "; ".join(problems))
        else:
            self.note(None, success)

    def refusing(self, words: tuple[str, ...], when: str) -> list[str]:
        """Reads answer and keep what was acknowledged; a mutation gets UNAVAILABLE naming the
        cause while GetStatus says why, or is accepted (the store found room: SQLite reuses
        the WAL's space) and then must be kept. Returns what is not so."""
        srv = self.server
        if not srv.alive():
            return [f"{when}: the server exited with code {srv.proc.returncode}: {srv.log_tail()}"]
        try:
            snap = Snapshot.read(srv.stub)
        except grpc.RpcError as exc:
            return [f"{when}: reads fail: {exc.code().name}: {exc.details()}"]
        problems = [
            f"{when}: {c}: {d}" for c, d in self.ledger.failures + check_listing(snap, self.ledger)
        ]
        for attempt in range(2):
            try:
                self.probe_place()
                self.c.say(
                    f"disk faults: {when}: a Place was accepted; checked at the final restart"
                )
                return problems
            except grpc.RpcError as exc:
                details = (exc.details() or "").lower()
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not any(
                    w in details for w in words
                ):
                    got = f"{exc.code().name} {exc.details()!r}"
                    return problems + [
                        f"{when}: Place got {got}, expected UNAVAILABLE naming {words}"
                    ]
            # Refused: GetStatus says so, unless writes resumed in between (then retry once).
            status = srv.stub.GetStatus(pb.GetStatusRequest(), timeout=30)
            if not status.writable and status.unwritable_reason:
                return problems
        said = f"writable={status.writable} unwritable_reason={status.unwritable_reason!r}"
        return problems + [f"{when}: Place refused twice while GetStatus says {said}"]

    def probe_place(self) -> None:
        """One Place; when accepted, it joins what must be kept."""
        probe = make_workload(f"probe{time.monotonic_ns()}", random.Random(0))
        p = self.server.stub.Place(pb.PlaceRequest(workloads=[probe]), timeout=10).placements[0]
        if p.host_id:
            with self.ledger.lock:
                self.ledger.placed[p.workload_id] = (p.host_id, p.sequence)

    def resumes(self, when: str, timeout: float = 15.0) -> list[str]:
        """A Place succeeds again within `timeout`, without a restart; returns what is not so."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline and self.server.alive():
            try:
                self.probe_place()
                return []
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.2)
        srv = self.server
        state = (
            "alive" if srv.alive() else f"exited with code {srv.proc.returncode}: {srv.log_tail()}"
        )
        return [
            f"{when}: no Place succeeded within {timeout:.0f} s (server {state}; last answer {last})"
        ]

    def full_then_freed(self, when: str) -> list[str]:
        """The disk is full: what `refusing` checks; then space is freed: writes resume."""
        problems = self.refusing(("full", "no space"), when)
        self.filler.unlink()
        if self.server.alive():
            problems += self.resumes(f"{when}, space freed")
        return problems

    def full_under_load(self) -> None:
        self.load(1.0)
        worker = threading.Thread(target=self.load, args=(3.0,))
        worker.start()
        time.sleep(0.5)
        size = self.fill()
        worker.join()
        problems = self.full_then_freed(f"disk filled under load ({size >> 20} MiB filler)")
        self.outcome(
            "disk full",
            problems,
            "full disk under load: reads kept, writes refused with UNAVAILABLE (or accepted and kept), resumed once freed",
        )

    def full_at_restart(self) -> None:
        self.fill()
        self.server.kill()
        self.server.start(timeout=60)
        self.ledger.settle(Snapshot.read(self.server.stub).listed(), self.ledger.hosts)
        problems = self.full_then_freed("restarted on a full disk")
        self.outcome(
            "disk full",
            problems,
            "restart on a full disk: reads served, writes refused (or accepted and kept), resumed once freed",
        )

    def read_only_restart(self) -> None:
        """Restart on a read-only remount: serve reads and refuse writes, or refuse to start
        with a non-zero exit naming the cause (never start and fail at the first write)."""
        self.load(1.0)
        self.server.kill()
        r = sh(["mount", "-o", "remount,ro", str(self.mnt)])
        if r.returncode:
            self.note(None, f"read-only remount skipped: {r.stderr.strip()}")
            return
        when = "restarted on a read-only remount"
        try:
            try:
                self.server.start(timeout=60)
            except RuntimeError as exc:
                code, tail = self.server.proc.returncode, self.server.log_tail(5).lower()
                if code and any(w in tail for w in self.READ_ONLY):
                    self.note(
                        None,
                        f"restart on a read-only remount: refused to start (exit code {code}), "
                        f"naming the cause",
                    )
                else:
                    self.note("read-only", f"{when}: {exc}")
                return
            self.ledger.settle(Snapshot.read(self.server.stub).listed(), self.ledger.hosts)
            problems = self.refusing(self.READ_ONLY, when)
        finally:
            sh(["mount", "-o", "remount,rw", str(self.mnt)])
        if self.server.alive():
            problems += self.resumes("remounted read-write")
        self.outcome(
            "read-only",
            problems,
            "restart on a read-only remount: reads served, writes refused, resumed once writable",
        )

    def read_only_under_load(self, trigger: Path, image: Path) -> None:
        """The file system turns read-only under load: reads go on, writes are refused. ext4
        refuses a read-write remount after an error until fsck, so resuming is checked by a
        restart after fsck: everything acknowledged before the error is still there."""
        self.load(1.0)
        worker = threading.Thread(target=self.load, args=(2.0,))
        worker.start()
        time.sleep(0.5)
        trigger.write_text("hci-scheduler chaos: read-only fault\n")
        worker.join()
        # SQLite reports a write refused by a read-only file system as a disk I/O error.
        problems = self.refusing(
            self.READ_ONLY + ("i/o error",), "file system turned read-only under load"
        )
        self.outcome(
            "read-only",
            problems,
            "file system read-only under load: reads kept, writes refused with UNAVAILABLE",
        )
        self.server.kill()
        sh(["umount", str(self.mnt)])
        sh(["e2fsck", "-fy", str(image)])
        r = sh(["mount", "-o", "loop", str(image), str(self.mnt)])
        if r.returncode:
            self.note(None, f"no remount after fsck: {r.stderr.strip()}")
            return
        self.server.start(timeout=60)
        snap = Snapshot.read(self.server.stub)
        problems = [f"restarted after fsck: {c}: {d}" for c, d in check_listing(snap, self.ledger)]
        problems += self.resumes("restarted after fsck")
        self.outcome(
            "read-only",
            problems,
            f"restarted after fsck: all {len(self.ledger.placed):,} acknowledged "
            f"placements kept, acknowledged releases not undone, writes resumed",
        )


def _parser() -> argparse.ArgumentParser:
    d = ChaosConfig()
    p = argparse.ArgumentParser(
        prog="python -m hci_scheduler.bench.chaos", description=__doc__.splitlines()[0]
    )
    p.add_argument("--trials", type=int, default=d.trials)
    p.add_argument(
        "--clients", type=int, default=d.clients, help="concurrent client threads (default 8)"
    )
    p.add_argument(
        "--min-s", type=float, default=d.min_s, help="shortest run before a kill (seconds)"
    )
    p.add_argument(
        "--max-s", type=float, default=d.max_s, help="longest run before a kill (seconds)"
    )
    p.add_argument(
        "--hosts", type=int, default=d.hosts, help="hosts registered before the first trial"
    )
    p.add_argument("--seed", type=int, help="the random seed (printed; default random)")
    p.add_argument(
        "--full-check-every",
        type=int,
        default=d.full_check_every,
        help="read the whole log every N trials (and on the last); others read what is new",
    )
    p.add_argument(
        "--disk-faults",
        choices=("all", "full", "read-only", "none"),
        default="all",
        help="full: a full disk (tmpfs); read-only: a file system turning read-only (ext4)",
    )
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for `serve`, repeatable: --serve-arg=--snapshot-every --serve-arg=2000",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the store and logs even when every check passes"
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # gRPC's core logs every connection the kills cut at INFO; the campaign reports them itself.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    cfg = ChaosConfig(
        trials=args.trials,
        clients=args.clients,
        min_s=args.min_s,
        max_s=args.max_s,
        hosts=args.hosts,
        seed=args.seed,
        full_check_every=args.full_check_every,
        disk_faults=args.disk_faults,
        keep=args.keep,
        serve_args=tuple(args.serve_arg),
    )
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        progress = lambda **kw: tqdm(leave=False, file=sys.stderr, **kw)
    return Campaign(cfg).run(progress)


if __name__ == "__main__":
    sys.exit(main())
