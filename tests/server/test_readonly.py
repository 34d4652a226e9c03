"""A store that cannot be written (issue 13, items 6 and 7): a restart on a read-only
remount or with immutable store files serves reads, refuses writes with UNAVAILABLE and
the reason, and takes writes again by itself once the files do; store files made
immutable under a running server are a refused write, not a SIGBUS. Root only (bind
mounts, chattr); skipped where the machine does not allow them."""
from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hci_scheduler.server.app import SERVICE_NAME
from hci_scheduler.v1 import scheduler_pb2 as pb

from tests.waiting import wait_for

from .conftest import ServerProcess, make_host, make_workload, stub_for

STORE_FILES = ("scheduler.db", "scheduler.db-wal")


def _run(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


@pytest.fixture
def bind_mount(tmp_path):
    """A bind mount of a directory, remounted read-only and back by the test."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    if not _run("mount", "--bind", str(src), str(mnt)):
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


def _chattr(data: Path, flag: str) -> bool:
    files = [str(data / f) for f in STORE_FILES if (data / f).exists()]
    return _run("chattr", flag, *files)


class Unwritable:
    """Make a data directory unwritable and writable again, one way or another."""

    def __init__(self, how: str, data: Path):
        self.how, self.data = how, data

    def on(self) -> None:
        if self.how == "read-only remount":
            if not _run("mount", "-o", "remount,bind,ro", str(self.data.parent)):
                pytest.skip("cannot remount read-only here")
        elif not _chattr(self.data, "+i"):
            pytest.skip("chattr +i is not supported here")

    def off(self) -> None:
        if self.how == "read-only remount":
            assert _run("mount", "-o", "remount,bind,rw", str(self.data.parent))
        else:
            assert _chattr(self.data, "-i")


def service_health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status


def wait_writable(s) -> pb.GetStatusResponse:
    return wait_for(lambda: (status := s.GetStatus(pb.GetStatusRequest())).writable and status,
                    "the store to take writes again")


def allocations(s) -> dict[str, str]:
    return {p.workload_id: p.host_id for p in s.ListAllocations(pb.ListAllocationsRequest()).allocations}


@pytest.mark.parametrize("stop", ["sigkill", "clean stop"])
@pytest.mark.parametrize("how", ["read-only remount", "immutable files"])
def test_restart_on_an_unwritable_store_serves_reads_and_resumes_writes(tmp_path, bind_mount, how, stop):
    data = bind_mount / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"h{i}") for i in range(3)]))
    s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}") for i in range(6)]))
    s.Release(pb.ReleaseRequest(workload_ids=["w2"]))
    before = s.GetStatus(pb.GetStatusRequest())
    acked = allocations(s)
    assert len(acked) == 5
    if stop == "sigkill":
        srv.kill()  # the WAL holds the last commits: reads must recover it without writing
        assert (data / "scheduler.db-wal").stat().st_size > 0
    else:
        assert srv.terminate() == 0
    unwritable = Unwritable(how, data)
    unwritable.on()
    try:
        srv = ServerProcess(tmp_path, data_dir=data).start()
        channel, s = stub_for(srv.address)
        status = s.GetStatus(pb.GetStatusRequest())
        assert not status.writable
        assert ("Read-only file system" if how == "read-only remount" else "Operation not permitted") \
            in status.unwritable_reason
        assert "scheduler.db" in status.unwritable_reason or "data" in status.unwritable_reason
        assert service_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status.last_sequence == before.last_sequence and status.incarnation == before.incarnation
        assert allocations(s) == acked
        with pytest.raises(grpc.RpcError) as err:
            s.Place(pb.PlaceRequest(workloads=[make_workload("refused")]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not writable" in err.value.details()
        assert srv.proc.poll() is None
    finally:
        unwritable.off()
    status = wait_writable(s)
    assert service_health(channel) == health_pb2.HealthCheckResponse.SERVING
    placed = s.Place(pb.PlaceRequest(workloads=[make_workload("after")])).placements[0]
    assert placed.host_id and placed.sequence == before.last_sequence + 1
    assert srv.terminate() == 0
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    assert allocations(s) == {**acked, "after": placed.host_id}
    assert s.GetStatus(pb.GetStatusRequest()).incarnation == before.incarnation
    srv.terminate()


def test_store_files_made_immutable_under_a_running_server_refuse_writes_not_sigbus(tmp_path):
    """The issue's case: the database and its companions made immutable while the server
    runs. SQLite keeps its WAL index in heap memory (no mapped -shm that a write would
    fault on), so the next commit fails with an error the server reports."""
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data).start()
    channel, s = stub_for(srv.address)
    s.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"h{i}") for i in range(3)]))
    s.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}") for i in range(4)]))
    acked = allocations(s)
    assert not (data / "scheduler.db-shm").exists()  # nothing mapped
    if not _chattr(data, "+i"):
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(grpc.RpcError) as err:
            s.Place(pb.PlaceRequest(workloads=[make_workload("refused")]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Operation not permitted (immutable? see lsattr)" in err.value.details(), err.value.details()
        status = s.GetStatus(pb.GetStatusRequest())
        assert not status.writable and "scheduler.db" in status.unwritable_reason
        assert service_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert allocations(s) == acked  # the refused batch left no trace
        assert srv.proc.poll() is None, srv.log()
    finally:
        _chattr(data, "-i")
    wait_writable(s)
    assert s.Place(pb.PlaceRequest(workloads=[make_workload("after")])).placements[0].host_id
    assert srv.terminate() == 0
    assert "store refuses writes" in srv.log() and "Bus error" not in srv.log()
    srv = ServerProcess(tmp_path, data_dir=data).start()
    _, s = stub_for(srv.address)
    assert set(allocations(s)) == set(acked) | {"after"}
    srv.terminate()
