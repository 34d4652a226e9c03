"""The service side of host agents (issue 15): ReportStatus, heartbeats and DOWN hosts,
the down-host policy, workload statuses in events and listings, replay of all of it,
and the runtime spec of a workload (ContainerSpec, VmSpec) on the wire.

Timing: servers run with a small --host-down-after-s; tests only wait for something to
happen "eventually" within a generous timeout, never assert how long it took."""
from __future__ import annotations

import contextlib
import threading
import time

import grpc
import pytest

from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.waiting import wait_for

from .conftest import ServerProcess, in_process_server, make_host, make_workload, stub_for

DOWN_AFTER_S = 0.5
RUNNING, EXITED, FAILED = pb.WORKLOAD_STATE_RUNNING, pb.WORKLOAD_STATE_EXITED, pb.WORKLOAD_STATE_FAILED


@contextlib.contextmanager
def running_server(tmp_path, down_after_s: float = DOWN_AFTER_S, reschedule_after_s: float = 0.0):
    """An in-process server on port 0 over a data dir, and a stub of it."""
    with in_process_server(tmp_path / "data", host_down_after_s=down_after_s,
                           down_reschedule_after_s=reschedule_after_s) as (srv, _, stub):
        yield srv, stub


def host_states(stub) -> dict[str, int]:
    return {h.id: h.state for h in stub.ListHosts(pb.ListHostsRequest()).hosts}


def allocations(stub, include_workloads: bool = False) -> dict[str, pb.Placement]:
    resp = stub.ListAllocations(pb.ListAllocationsRequest(include_workloads=include_workloads))
    return {p.workload_id: p for p in resp.allocations}


def events(stub, after: int = 0) -> list[pb.Event]:
    last = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    out = []
    if last <= after:
        return out
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after))
    for resp in stream:
        out.append(resp.event)
        if resp.event.sequence == last:
            break
    stream.cancel()
    return out


def report(stub, host_id: str, *statuses: pb.WorkloadStatus, applied: int = 0) -> pb.ReportStatusResponse:
    return stub.ReportStatus(pb.ReportStatusRequest(host_id=host_id, statuses=statuses, applied_sequence=applied))


def status(workload_id: str, state=RUNNING, **kw) -> pb.WorkloadStatus:
    return pb.WorkloadStatus(workload_id=workload_id, state=state, **kw)


class Heartbeat:
    """An agent that only heartbeats, every `every` seconds, until stopped."""

    def __init__(self, stub, host_id: str, every: float = 0.05):
        self.stub, self.host_id, self.every = stub, host_id, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                report(self.stub, self.host_id)
            except grpc.RpcError:
                return  # the server went away (a test killed it)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- heartbeats and DOWN --------------------------------------------------------------


def test_heartbeat_keeps_a_host_up_silence_marks_it_down_and_a_report_brings_it_back(tmp_path):
    with running_server(tmp_path, down_after_s=3.0) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("agent-h"), make_host("plain-h")]))
        with Heartbeat(stub, "agent-h"):
            # Heartbeats every 0.05 s against a 3 s silence, for 2 s and more: never down.
            for _ in range(40):
                assert host_states(stub)["agent-h"] == pb.HOST_STATE_READY
                time.sleep(0.05)
        seq = stub.GetStatus(pb.GetStatusRequest()).last_sequence
        wait_for(lambda: host_states(stub)["agent-h"] == pb.HOST_STATE_DOWN)
        # A host no agent ever reported for is never marked down.
        assert host_states(stub)["plain-h"] == pb.HOST_STATE_READY
        assert stub.GetStatus(pb.GetStatusRequest()).hosts_by_state["down"] == 1
        down_events = [e for e in events(stub, seq) if e.type == pb.EVENT_TYPE_HOST_UPDATED]
        assert [(e.host_id, e.host.state) for e in down_events] == [("agent-h", pb.HOST_STATE_DOWN)]
        seq = stub.GetStatus(pb.GetStatusRequest()).last_sequence
        # The next report brings it back at once, with an event.
        resp = report(stub, "agent-h")
        assert host_states(stub)["agent-h"] == pb.HOST_STATE_READY
        back = events(stub, seq)
        assert [(e.type, e.host.state) for e in back] == [(pb.EVENT_TYPE_HOST_UPDATED, pb.HOST_STATE_READY)]
        assert resp.sequence == back[-1].sequence


def test_a_down_host_returns_to_its_own_state_and_an_operator_state_given_meanwhile(tmp_path):
    with running_server(tmp_path) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("c-h", state=pb.HOST_STATE_CORDONED),
                                                          make_host("r-h")]))
        report(stub, "c-h")
        report(stub, "r-h")
        wait_for(lambda: set(host_states(stub).values()) == {pb.HOST_STATE_DOWN})
        assert report(stub, "c-h") and host_states(stub)["c-h"] == pb.HOST_STATE_CORDONED
        # An operator's state for a DOWN host is the one it comes back to; it stays DOWN.
        resp = stub.UpdateHost(pb.UpdateHostRequest(host_id="r-h", state=pb.HOST_STATE_DRAINING))
        assert resp.host.state == pb.HOST_STATE_DOWN
        report(stub, "r-h")
        assert host_states(stub)["r-h"] == pb.HOST_STATE_DRAINING


def test_down_hosts_take_no_new_workloads(tmp_path):
    with running_server(tmp_path) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("only", labels={"zone": "z"})]))
        report(stub, "only")
        wait_for(lambda: host_states(stub)["only"] == pb.HOST_STATE_DOWN)
        w = make_workload("wants-z", node_selector={"zone": "z"})
        refused = stub.Place(pb.PlaceRequest(workloads=[w])).placements[0]
        assert refused.host_id == "" and refused.sequence == 0
        assert "schedulable" in refused.explanation.message or refused.explanation.filters
        report(stub, "only")
        assert stub.Place(pb.PlaceRequest(workloads=[w])).placements[0].host_id == "only"


# -- the down-host policy ---------------------------------------------------------------


def _recomputed_usage(stub) -> dict[str, dict[str, int]]:
    """Usage per host from the allocations and their specs (independent of the server's sums)."""
    used: dict[str, dict[str, int]] = {}
    for p in allocations(stub, include_workloads=True).values():
        for d, v in p.workload.requests.items():
            used.setdefault(p.host_id, {}).setdefault(d, 0)
            used[p.host_id][d] += v
    return used


def test_containers_of_a_down_host_are_replaced_after_the_grace_vms_wait_nothing_overcommits(tmp_path):
    with running_server(tmp_path, reschedule_after_s=0.5) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
            make_host("src", cpu=8000, memory=16384, labels={"kvm": "true"})]))
        containers = [make_workload(f"c{i}", cpu=1500, memory=1024,
                                    container=pb.ContainerSpec(image="busybox")) for i in range(4)]
        vm = make_workload("vm1", cpu=1000, memory=1024, kind=pb.WORKLOAD_KIND_VM,
                           vm=pb.VmSpec(disk_image="/var/lib/images/vm1.qcow2"))
        placed = stub.Place(pb.PlaceRequest(workloads=containers + [vm])).placements
        assert {p.host_id for p in placed} == {"src"}
        # Room elsewhere for three of the four containers (3 x 1500 = 4500 <= 5000 < 6000),
        # and on a host without kvm, so the VM could not move even if it were allowed to.
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("dst", cpu=5000, memory=16384)]))
        seq = stub.GetStatus(pb.GetStatusRequest()).last_sequence
        report(stub, "src", *(status(p.workload_id) for p in placed))
        wait_for(lambda: sum(p.host_id == "dst" for p in allocations(stub).values()) == 3)
        where = {w: p.host_id for w, p in allocations(stub).items()}
        assert where["vm1"] == "src"
        assert sorted(h for w, h in where.items() if w != "vm1") == ["dst", "dst", "dst", "src"]
        caps = {h.id: dict(h.capacity) for h in stub.ListHosts(pb.ListHostsRequest()).hosts}
        for host_id, used in _recomputed_usage(stub).items():
            for d, v in used.items():
                assert v <= caps[host_id][d], (host_id, d, v)
        moved = [e for e in events(stub, seq) if e.type == pb.EVENT_TYPE_MOVED]
        assert len(moved) == 3 and all(e.plan_id == "" and e.source_host_id == "src" and e.host_id == "dst"
                                       and "down" in e.reason for e in moved)
        # The moved containers start over as PENDING on their new host.
        for e in moved:
            assert allocations(stub)[e.workload_id].status.state == pb.WORKLOAD_STATE_PENDING
        # The server's own usage agrees with the recomputed one.
        listed = {h.id: dict(h.used) for h in stub.ListHosts(pb.ListHostsRequest()).hosts}
        assert {h: {d: v for d, v in u.items() if v} for h, u in _recomputed_usage(stub).items()} == \
            {h: u for h, u in listed.items() if u}


def test_the_host_a_container_moved_away_from_may_report_it_stopped_and_nothing_else(tmp_path):
    """The source of a move reports its copy STOPPED (the target of a single-instance move waits
    for that); a host that never ran the workload, or any other state from the source, is refused."""
    with running_server(tmp_path, reschedule_after_s=0.5) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("src", cpu=4000, memory=8192)]))
        stub.Place(pb.PlaceRequest(workloads=[make_workload("c", cpu=1000, memory=1024,
                                                            container=pb.ContainerSpec(image="busybox"))]))
        report(stub, "src", status("c"))
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("dst", cpu=4000, memory=8192),
                                                          make_host("bystander", cpu=1, memory=1)]))
        wait_for(lambda: allocations(stub)["c"].host_id == "dst")  # src went silent: re-placed
        seq = stub.GetStatus(pb.GetStatusRequest()).last_sequence
        resp = report(stub, "src", status("c", pb.WORKLOAD_STATE_STOPPED, message="moved to dst"))
        stopped = [e for e in events(stub, seq) if e.type == pb.EVENT_TYPE_STATUS]
        assert [(e.workload_id, e.host_id, e.status.state) for e in stopped] == \
            [("c", "src", pb.WORKLOAD_STATE_STOPPED)]
        assert resp.sequence == stopped[0].sequence
        assert allocations(stub)["c"].host_id == "dst"  # the report moved nothing
        assert allocations(stub)["c"].status.state == pb.WORKLOAD_STATE_PENDING  # its status is dst's
        for host_id, st in (("src", status("c")), ("bystander", status("c", pb.WORKLOAD_STATE_STOPPED))):
            with pytest.raises(grpc.RpcError) as err:
                report(stub, host_id, st)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'c'" in err.value.details()


# -- statuses ---------------------------------------------------------------------------


def test_status_changes_are_events_listed_and_repeats_are_not_logged(tmp_path):
    with running_server(tmp_path, down_after_s=30.0) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h")]))
        stub.Place(pb.PlaceRequest(workloads=[make_workload("a", cpu=100), make_workload("b", cpu=100)]))
        assert {w: p.status.state for w, p in allocations(stub).items()} == \
            {"a": pb.WORKLOAD_STATE_PENDING, "b": pb.WORKLOAD_STATE_PENDING}
        seq = stub.GetStatus(pb.GetStatusRequest()).last_sequence
        resp = report(stub, "h", status("a", container_id="c-a"), applied=seq)
        ev = events(stub, seq)
        assert [(e.type, e.workload_id, e.host_id, e.status.state, e.status.container_id) for e in ev] == \
            [(pb.EVENT_TYPE_STATUS, "a", "h", RUNNING, "c-a")]
        assert resp.sequence == ev[0].sequence and ev[0].status.since.seconds > 0
        # The same status again (a heartbeat repeating it): nothing logged.
        assert report(stub, "h", status("a", container_id="c-a")).sequence == resp.sequence
        assert stub.GetStatus(pb.GetStatusRequest()).last_sequence == resp.sequence
        resp2 = report(stub, "h", status("a", EXITED, exit_code=3, container_id="c-a", message="boom"))
        assert resp2.sequence == resp.sequence + 1
        listed = allocations(stub)
        assert (listed["a"].status.state, listed["a"].status.exit_code, listed["a"].status.message) == \
            (EXITED, 3, "boom")
        assert listed["b"].status.state == pb.WORKLOAD_STATE_PENDING
        # Watchers that ask for STATUS events only get them.
        stream = stub.WatchEvents(pb.WatchEventsRequest(types=[pb.EVENT_TYPE_STATUS]))
        got = [next(stream).event, next(stream).event]
        stream.cancel()
        assert [e.status.state for e in got] == [RUNNING, EXITED]


@pytest.mark.parametrize("statuses, code, named", [
    ([status("elsewhere")], grpc.StatusCode.FAILED_PRECONDITION, "elsewhere"),  # placed on another host
    ([status("mine"), status("nobody")], grpc.StatusCode.FAILED_PRECONDITION, "nobody"),  # not placed
    ([status("elsewhere", pb.WORKLOAD_STATE_STOPPED)], grpc.StatusCode.FAILED_PRECONDITION, "elsewhere"),
    ([status("mine", state=0)], grpc.StatusCode.INVALID_ARGUMENT, "state"),
    ([status("mine", state=42)], grpc.StatusCode.INVALID_ARGUMENT, "state"),
    ([status("mine"), status("mine", EXITED)], grpc.StatusCode.INVALID_ARGUMENT, "twice"),
    ([status("")], grpc.StatusCode.INVALID_ARGUMENT, "workload_id"),
    ([status("mine", host_id="other")], grpc.StatusCode.INVALID_ARGUMENT, "host_id"),
    ([status("mine", message="x" * 5000)], grpc.StatusCode.INVALID_ARGUMENT, "message"),
    ([status("mine", restarts=-1)], grpc.StatusCode.INVALID_ARGUMENT, "restarts"),
], ids=["other-host", "not-placed", "stopped-never-ran-here", "unspecified", "unknown-state", "twice", "empty-id", "host-mismatch",
        "long-message", "negative-restarts"])
def test_bad_reports_are_refused_and_change_nothing(tmp_path_factory, statuses, code, named):
    with running_server(tmp_path_factory.mktemp("bad")) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("me", labels={"n": "me"}),
                                                          make_host("you", labels={"n": "you"})]))
        stub.Place(pb.PlaceRequest(workloads=[make_workload("mine", cpu=100, node_selector={"n": "me"}),
                                              make_workload("elsewhere", cpu=100, node_selector={"n": "you"})]))
        before = (stub.GetStatus(pb.GetStatusRequest()), allocations(stub), host_states(stub))
        with pytest.raises(grpc.RpcError) as err:
            report(stub, "me", *statuses)
        assert err.value.code() == code and named in err.value.details()
        assert (stub.GetStatus(pb.GetStatusRequest()), allocations(stub), host_states(stub)) == before
        # Nor does a refused report count as the host's agent: "me" never goes down.
        time.sleep(DOWN_AFTER_S * 3)
        assert host_states(stub)["me"] == pb.HOST_STATE_READY


def test_a_report_for_an_unknown_host_is_not_found(tmp_path):
    with running_server(tmp_path) as (srv, stub):
        with pytest.raises(grpc.RpcError) as err:
            report(stub, "ghost")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in err.value.details()


# -- replay -------------------------------------------------------------------------------


def test_statuses_down_hosts_and_policy_moves_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    flags = ["--host-down-after-s", "0.5", "--down-reschedule-after-s", "0.5"]
    srv = ServerProcess(tmp_path, data_dir=data, extra=flags).start()
    try:
        _, stub = stub_for(srv.address)
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h1", state=pb.HOST_STATE_CORDONED),
                                                          make_host("h2", state=pb.HOST_STATE_CORDONED)]))
        stub.UpdateHost(pb.UpdateHostRequest(host_id="h1", state=pb.HOST_STATE_READY))
        spec = pb.ContainerSpec(image="busybox", command=["sleep"], args=["3600"], env={"A": "1"},
                                restart_policy=pb.RESTART_POLICY_ALWAYS)
        stub.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}", cpu=100, container=spec) for i in range(3)]))
        stub.UpdateHost(pb.UpdateHostRequest(host_id="h2", state=pb.HOST_STATE_READY))
        stub.UpdateHost(pb.UpdateHostRequest(host_id="h1", state=pb.HOST_STATE_CORDONED))
        report(stub, "h1", status("w0"), status("w1", FAILED, message="pull failed"), status("w2"))
        report(stub, "h2")
        # h1 goes down and its containers move to h2; h2 stays up by heartbeats.
        with Heartbeat(stub, "h2"):
            wait_for(lambda: {p.host_id for p in allocations(stub).values()} == {"h2"})
            report(stub, "h2", status("w0"), status("w2", EXITED, exit_code=1))
            before = (allocations(stub, include_workloads=True), host_states(stub))
            assert before[1] == {"h1": pb.HOST_STATE_DOWN, "h2": pb.HOST_STATE_READY}
            srv.proc.kill()  # SIGKILL: nothing but the log survives
            srv.proc.wait(30)
    finally:
        srv.kill()
    srv = ServerProcess(tmp_path, data_dir=data, extra=["--host-down-after-s", "30"]).start()
    try:
        _, stub = stub_for(srv.address)
        after = (allocations(stub, include_workloads=True), host_states(stub))
        assert after == before
        assert after[0]["w0"].workload.container.restart_policy == pb.RESTART_POLICY_ALWAYS
        assert (after[0]["w2"].status.state, after[0]["w2"].status.exit_code) == (EXITED, 1)
        # h1 was cordoned when it went down: that is where it returns, after a restart too.
        report(stub, "h1")
        assert host_states(stub)["h1"] == pb.HOST_STATE_CORDONED
    finally:
        srv.kill()


def test_statuses_and_specs_survive_a_snapshot_and_a_clean_restart(tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(tmp_path, data_dir=data, extra=["--host-down-after-s", "30"]).start()
    try:
        _, stub = stub_for(srv.address)
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h", labels={"kvm": "true"})]))
        stub.Place(pb.PlaceRequest(workloads=[
            make_workload("c", cpu=100, container=pb.ContainerSpec(image="busybox", single_instance=True)),
            make_workload("v", cpu=100, kind=pb.WORKLOAD_KIND_VM, vm=pb.VmSpec(disk_image="/d.img"))]))
        report(stub, "h", status("c"))
        before = allocations(stub, include_workloads=True)
        assert srv.terminate() == 0  # a clean stop writes a snapshot
    finally:
        srv.kill()
    assert list((data / "snapshots").iterdir())
    srv = ServerProcess(tmp_path, data_dir=data).start()
    try:
        _, stub = stub_for(srv.address)
        after = allocations(stub, include_workloads=True)
        assert {w: (p.host_id, p.workload) for w, p in after.items()} == \
            {w: (p.host_id, p.workload) for w, p in before.items()}
        assert after["v"].workload.vm.disk_image == "/d.img" and after["c"].workload.container.single_instance
        # The snapshot holds placements; statuses logged before it come from the log's tail.
        assert after["c"].status.state == RUNNING and after["v"].status.state == pb.WORKLOAD_STATE_PENDING
    finally:
        srv.kill()


# -- the runtime spec ----------------------------------------------------------------------


def test_runtime_spec_is_part_of_the_spec_and_is_normalized(tmp_path):
    with running_server(tmp_path, down_after_s=30.0) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h")]))
        w = make_workload("svc", cpu=100, container=pb.ContainerSpec(image="busybox", env={"K": "V"}))
        first = stub.Place(pb.PlaceRequest(workloads=[w])).placements[0]
        # Unspecified restart policy reads ON_FAILURE: saying so explicitly is the same spec.
        same = pb.Workload()
        same.CopyFrom(w)
        same.container.restart_policy = pb.RESTART_POLICY_ON_FAILURE
        assert stub.Place(pb.PlaceRequest(workloads=[same])).placements[0].sequence == first.sequence
        listed = allocations(stub, include_workloads=True)["svc"].workload.container
        assert (listed.image, dict(listed.env), listed.restart_policy) == \
            ("busybox", {"K": "V"}, pb.RESTART_POLICY_ON_FAILURE)
        other = pb.Workload()
        other.CopyFrom(w)
        other.container.image = "busybox:2"
        with pytest.raises(grpc.RpcError) as err:
            stub.Place(pb.PlaceRequest(workloads=[other]))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("workload, named", [
    (make_workload("x", vm=pb.VmSpec(disk_image="/d")), "vm"),  # a VM spec on a container
    (make_workload("x", kind=pb.WORKLOAD_KIND_VM, container=pb.ContainerSpec(image="i")), "container"),
    (make_workload("x", container=pb.ContainerSpec(image="")), "image"),
    (make_workload("x", container=pb.ContainerSpec(image="i" * 256)), "image"),
    (make_workload("x", container=pb.ContainerSpec(image="i", args=["a"] * 257)), "args"),
    (make_workload("x", container=pb.ContainerSpec(image="i", command=["c" * 4097])), "command"),
    (make_workload("x", container=pb.ContainerSpec(image="i", env={f"k{i}": "" for i in range(257)})), "env"),
    (make_workload("x", container=pb.ContainerSpec(image="i", env={"k" * 256: ""})), "env key"),
    (make_workload("x", container=pb.ContainerSpec(image="i", env={"k": "v" * 32769})), "env"),
    (make_workload("x", container=pb.ContainerSpec(image="i", restart_policy=9)), "restart_policy"),
    (make_workload("x", container=pb.ContainerSpec(image="i", mounts=[pb.VolumeMount(volume_id="v", path="/d")])),
     "volume 'v'"),  # not one of the workload's volumes
    (make_workload("x", kind=pb.WORKLOAD_KIND_VM, vm=pb.VmSpec(disk_image="")), "disk_image"),
    (make_workload("x", kind=pb.WORKLOAD_KIND_VM, vm=pb.VmSpec(disk_image="volume:v9")), "volume 'v9'"),
], ids=["vm-on-container", "container-on-vm", "empty-image", "long-image", "many-args", "long-command",
        "many-env", "long-env-key", "long-env-value", "bad-policy", "foreign-mount", "no-disk", "foreign-disk"])
def test_bad_runtime_specs_are_invalid_argument_naming_the_field(tmp_path_factory, workload, named):
    with running_server(tmp_path_factory.mktemp("spec"), down_after_s=30.0) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("h", labels={"kvm": "true"})]))
        with pytest.raises(grpc.RpcError) as err:
            stub.Place(pb.PlaceRequest(workloads=[workload]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details(), \
            err.value.details()
        assert stub.GetStatus(pb.GetStatusRequest()).allocations == 0


def test_a_mount_of_the_workloads_own_volume_is_accepted(tmp_path):
    with running_server(tmp_path, down_after_s=30.0) as (srv, stub):
        host = make_host("ssd", cpu=4000, memory=8192)
        host.capacity["ssd"] = 100
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[host]))
        w = make_workload("db", cpu=100, new_volumes=[pb.Volume(id="data", size_gib=10)],
                          container=pb.ContainerSpec(image="i", mounts=[pb.VolumeMount(volume_id="data",
                                                                                       path="/var/lib/db")]))
        p = stub.Place(pb.PlaceRequest(workloads=[w])).placements[0]
        assert p.host_id == "ssd"
        mount = allocations(stub, include_workloads=True)["db"].workload.container.mounts[0]
        assert (mount.volume_id, mount.path, mount.read_only) == ("data", "/var/lib/db", False)


def test_metrics_count_reports_and_hosts_marked_down(tmp_path):
    with running_server(tmp_path) as (srv, stub):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("m")]))
        report(stub, "m")
        report(stub, "m")
        wait_for(lambda: host_states(stub)["m"] == pb.HOST_STATE_DOWN)
        families = {f.name: f for f in srv.metrics.registry.collect()}
        value = lambda name: families[name].samples[0].value  # noqa: E731
        assert value("hci_scheduler_status_reports") == 2
        assert value("hci_scheduler_hosts_marked_down") == 1
        assert value("hci_scheduler_hosts_down") == 1


def test_cli_shows_statuses_and_down_hosts(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    with running_server(tmp_path) as (srv, stub):
        address = f"127.0.0.1:{srv.port}"

        def cli(*args):
            proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", *args, "--server", address],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)
            return proc

        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("cli-h")]))
        stub.Place(pb.PlaceRequest(workloads=[make_workload("ok", cpu=100), make_workload("bad", cpu=100),
                                              make_workload("new", cpu=100)]))
        report(stub, "cli-h", status("ok"), status("bad", EXITED, exit_code=137, message="OOM killed"))
        rows = {}
        for line in cli("allocations").stdout.splitlines():  # a table: cells between box bars
            cells = [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
            if cells:
                rows[cells[0]] = cells
        status_column = rows["workload"].index("status")
        assert {w: rows[w][status_column] for w in ("ok", "bad", "new")} == \
            {"ok": "running", "bad": "exited(137): OOM killed", "new": "pending"}
        wait_for(lambda: host_states(stub)["cli-h"] == pb.HOST_STATE_DOWN)
        assert any("cli-h" in line and " down " in line for line in cli("hosts", "list").stdout.splitlines())
        refused = cli("hosts", "update", "cli-h", "--state", "down")
        assert refused.returncode != 0
