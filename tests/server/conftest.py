"""Fixtures: the real server in a subprocess on a free loopback port, and stubs."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from hci_scheduler.v1 import scheduler_pb2 as pb
from hci_scheduler.v1 import scheduler_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`hci-scheduler serve` in a subprocess; the port comes back through --port-file."""

    def __init__(self, tmp: Path, data_dir: Path | None = None, extra: list[str] | None = None,
                 listen: str = "127.0.0.1:0"):
        self.tmp = tmp
        self.data_dir = data_dir
        self.extra = list(extra or [])
        self.listen = listen
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = tmp / f"server-{time.monotonic_ns()}.log"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        port_file = self.tmp / f"port-{time.monotonic_ns()}"
        cmd = [sys.executable, "-m", "hci_scheduler.cli", "serve", "--listen", self.listen,
               "--port-file", str(port_file)] + self.extra
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@contextlib.contextmanager
def restart_after(tmp_path: Path, setup, kill: bool = False):
    """Run `setup(stub)` on a server over a fresh data dir, stop it (SIGTERM, which must
    exit 0; or SIGKILL with kill=True), start a new server on the same data, and yield
    (what setup returned, a stub of the new server)."""
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    try:
        result = setup(stub_for(srv.address)[1])
        if not kill:
            assert srv.terminate() == 0
    finally:
        srv.kill()
    srv = ServerProcess(tmp_path, data_dir=data).start()
    try:
        yield result, stub_for(srv.address)[1]
    finally:
        srv.kill()


def snapshot(s) -> tuple:
    """Everything a restart must rebuild: hosts with usage, allocations with specs,
    replicas and volumes, volumes, status, and the whole event log."""
    events = []
    if s.GetStatus(pb.GetStatusRequest()).last_sequence:
        last = s.GetStatus(pb.GetStatusRequest()).last_sequence
        stream = s.WatchEvents(pb.WatchEventsRequest(after_sequence=0))
        for resp in stream:
            events.append(resp.event)
            if resp.event.sequence == last:
                break
        stream.cancel()
    status = s.GetStatus(pb.GetStatusRequest())
    # The log's bounds, not the state: a clean stop writes a snapshot and may compact.
    status.ClearField("first_sequence")
    status.ClearField("snapshot_sequence")
    return (s.ListHosts(pb.ListHostsRequest()).hosts,
            s.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations,
            s.ListVolumes(pb.ListVolumesRequest()).volumes,
            status, events)


def stub_for(address: str, credentials=None, options=None):
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options or [])
    else:
        channel = grpc.secure_channel(address, credentials, options=options or [])
    grpc.channel_ready_future(channel).result(timeout=30) if credentials is None else None
    return channel, pb_grpc.SchedulerServiceStub(channel)


@contextlib.contextmanager
def in_process_server(data_dir, **options):
    """A started server over `data_dir` in this process, on a free port: (server, channel, stub)."""
    from hci_scheduler.server.app import create_server  # the service, not a subprocess

    srv, port = create_server("127.0.0.1:0", data_dir=str(data_dir), **options)
    srv.start()
    channel, stub = stub_for(f"127.0.0.1:{port}")
    try:
        yield srv, channel, stub
    finally:
        channel.close()
        srv.stop(0)


class SnapshotServer:
    """An in-process server over a data dir, with a stub, whose snapshots are taken only
    when a test asks (every=0), and which can stop as a crash would leave it."""

    def __init__(self, data, every: int = 0, tail: int = 0):
        from hci_scheduler.server.app import create_server

        self.srv, port = create_server("127.0.0.1:0", data_dir=str(data), snapshot_every=every, snapshot_tail=tail)
        self.srv.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SchedulerServiceStub(self.channel)
        self.state = self.srv.state

    def stop(self, final_snapshot: bool = True):
        if not final_snapshot:  # as after a crash: the log holds a tail after the last snapshot
            self.state.snapshots = None
        self.channel.close()
        self.srv.stop(grace=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    srv = ServerProcess(tmp, data_dir=tmp / "data").start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(server):
    channel, s = stub_for(server.address)
    yield s
    channel.close()


def make_host(id: str, cpu: int = 4000, memory: int = 8192, **kw) -> pb.Host:
    return pb.Host(id=id, capacity={"cpu": cpu, "memory": memory}, **kw)


def make_workload(id: str, cpu: int = 1000, memory: int = 1024, **kw) -> pb.Workload:
    return pb.Workload(id=id, requests={"cpu": cpu, "memory": memory}, **kw)
