"""The NUMA node of a NUMA-fit VM is a decision of record: the node the core charged is
in the Place answer, the PLACED event and ListAllocations, and a restart (full replay,
snapshot, snapshot + tail) charges exactly that node again, where choosing again would
pick another (issue 15)."""
from __future__ import annotations

import numpy as np

from hci_scheduler.server import snapshot as snap_mod
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import SnapshotServer

NODE = {"cpu": 8000, "memory": 32768}


def _host(hid: str) -> pb.Host:
    return pb.Host(id=hid, capacity={"cpu": 16000, "memory": 65536}, labels={"kvm": "true"},
                   numa_nodes=[pb.NumaNode(resources=NODE), pb.NumaNode(resources=NODE)])


def _vm(wid: str, cpu: int, **kw) -> pb.Workload:
    return pb.Workload(id=wid, requests={"cpu": cpu, "memory": 1024}, kind=pb.WORKLOAD_KIND_VM, numa=True, **kw)


def _place(stub, *workloads) -> list:
    return list(stub.Place(pb.PlaceRequest(workloads=workloads)).placements)


def _allocations(stub) -> dict:
    """workload id -> (host, NUMA node or None, requests) as ListAllocations shows them."""
    resp = stub.ListAllocations(pb.ListAllocationsRequest(include_workloads=True))
    return {p.workload_id: (p.host_id, p.numa_node if p.HasField("numa_node") else None, dict(p.workload.requests))
            for p in resp.allocations}


def _recomputed_free(stub) -> dict:
    """host id -> free (cpu, memory) per NUMA node, from the hosts' nodes and the
    allocations' recorded nodes alone (VMs are charged their request: ratio 1)."""
    free = {h.id: np.array([[n.resources["cpu"], n.resources["memory"]] for n in h.numa_nodes], dtype=np.int64)
            for h in stub.ListHosts(pb.ListHostsRequest()).hosts}
    for host, node, req in _allocations(stub).values():
        if node is not None:
            free[host][node] -= [req.get("cpu", 0), req.get("memory", 0)]
    return free


def _core_free(server) -> dict:
    """host id -> the core's free (cpu, memory) per NUMA node (what the next VM is fitted against)."""
    c = server.state.cluster
    numa_free = c._hosts.cons.array("numa_free")
    return {hid: numa_free[row, :2].copy() for row, hid in enumerate(c.host_ids()) if hid is not None}


def _assert_core_matches_records(server) -> None:
    want, have = _recomputed_free(server.stub), _core_free(server)
    assert want.keys() == have.keys()
    for hid in want:
        assert np.array_equal(want[hid], have[hid]), hid


def _history(stub) -> dict:
    """Placements whose nodes a new choice would not repeat. On each host (2 nodes of 8000
    millicores): a (6000) -> node 0; b (4000) -> node 1 (node 0 has 2000 left); a leaves;
    c (2000) -> node 1, the tighter fit (4000 left against 8000). Restored without a, b
    and c would both go to node 0 (a tie goes to the first node). On h1 the VMs belong
    to a dedicated tenant (kept off h0, which runs tenant-less VMs), so their placements
    are replayed one by one, not in bulk."""
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[_host("h0"), _host("h1")]))
    answers = {}
    for hid, kw in (("h0", {}), ("h1", {"tenant": "t1", "isolation": pb.ISOLATION_DEDICATED})):
        for wid, cpu in ((f"{hid}-a", 6000), (f"{hid}-b", 4000)):
            answers.update({p.workload_id: p for p in _place(stub, _vm(wid, cpu, **kw))})
        stub.Release(pb.ReleaseRequest(workload_ids=[f"{hid}-a"]))
        answers.update({p.workload_id: p for p in _place(stub, _vm(f"{hid}-c", 2000, **kw))})
    return answers


def test_numa_node_is_answered_logged_and_listed(tmp_path):
    s = SnapshotServer(tmp_path / "data")
    try:
        answers = _history(s.stub)
        allocs = _allocations(s.stub)
        events = _placed_events(s.stub)
        for hid in ("h0", "h1"):
            # See _history for the arithmetic.
            assert answers[f"{hid}-b"].numa_node == 1 and answers[f"{hid}-c"].numa_node == 1
            assert allocs[f"{hid}-b"][:2] == (hid, 1) and allocs[f"{hid}-c"][:2] == (hid, 1)
            assert events[f"{hid}-a"] == 0 and events[f"{hid}-b"] == 1 and events[f"{hid}-c"] == 1
        _assert_core_matches_records(s)
        # A container asks for no NUMA fit: no node in its answer.
        p = _place(s.stub, pb.Workload(id="plain", requests={"cpu": 100}))[0]
        assert p.host_id and not p.HasField("numa_node")
    finally:
        s.stop()


def _placed_events(stub) -> dict:
    """workload id -> the numa_node of its PLACED event (None when absent), read with WatchEvents."""
    last = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    out = {}
    for resp in stub.WatchEvents(pb.WatchEventsRequest(after_sequence=0, types=[pb.EVENT_TYPE_PLACED]), timeout=10):
        ev = resp.event
        out[ev.workload_id] = ev.numa_node if ev.HasField("numa_node") else None
        if ev.sequence >= last or len(out) == 6:
            break
    return out


def _restart_kinds(tmp_path, kind: str):
    """A server with the history, restarted as `kind` says; returns (before, restarted server)."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _history(a.stub)
    if kind == "snapshot+tail":
        a.state.snapshots.take(a.state)
        # The tail: another round on h0 after the snapshot (node 0 has 8000 free: d -> 0).
        _place(a.stub, _vm("h0-d", 3000))
    before = (_allocations(a.stub), _core_free(a))
    a.stop(final_snapshot=(kind == "snapshot"))
    return before, SnapshotServer(data)


def test_restart_charges_the_recorded_nodes_again(tmp_path):
    for kind in ("replay", "snapshot", "snapshot+tail"):
        (allocs, free), b = _restart_kinds(tmp_path / kind, kind)
        try:
            assert (b.state.snapshots.sequence > 0) == (kind != "replay"), kind
            assert _allocations(b.stub) == allocs, kind
            have = _core_free(b)
            assert all(np.array_equal(have[h], free[h]) for h in free), kind
            _assert_core_matches_records(b)
            # The next VM is fitted against the recorded state: on h0 (h1 is the dedicated
            # tenant's), node 1 holds b and c (2000 of 8000 left), so a 3000-millicore VM
            # goes to node 0; nodes chosen again would have put b and c on node 0 and it on 1.
            nxt = _place(b.stub, _vm("next", 3000))[0]
            assert (nxt.host_id, nxt.numa_node) == ("h0", 0), kind
            _assert_core_matches_records(b)
        finally:
            b.stop(final_snapshot=False)


def test_a_snapshot_without_numa_sections_still_loads(tmp_path, monkeypatch):
    """A snapshot written before nodes were recorded (no numa sections, no field in its
    events) loads; its VMs get a node chosen again, and the core agrees with the
    listing."""
    data = tmp_path / "data"
    a = SnapshotServer(data)
    _history(a.stub)
    real_capture = snap_mod.capture
    monkeypatch.setattr(snap_mod, "capture", lambda state: real_capture(state)._replace(numa={}))
    a.state.snapshots.take(a.state)
    monkeypatch.setattr(snap_mod, "capture", real_capture)
    allocs = _allocations(a.stub)
    a.stop(final_snapshot=False)
    b = SnapshotServer(data)
    try:
        assert b.state.snapshots.sequence > 0
        again = _allocations(b.stub)
        assert {w: (h, r) for w, (h, _, r) in again.items()} == {w: (h, r) for w, (h, _, r) in allocs.items()}
        assert all(node in (0, 1) for _, node, _ in again.values())
        _assert_core_matches_records(b)
    finally:
        b.stop(final_snapshot=False)
