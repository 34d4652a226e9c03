"""A restart replays the log exactly, even where the order of events alone would not
satisfy the constraints again."""
from __future__ import annotations

import pytest

from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import restart_after, snapshot


def web(id: str, cpu: int = 10, gang: str = "") -> pb.Workload:
    return pb.Workload(id=id, requests={"cpu": cpu, "memory": 10}, group="web", gang=gang,
                       spreads=[pb.SpreadConstraint(topology="zone", max_skew=1, hard=True)])


def test_restart_after_a_rolled_back_gang_that_held_the_spread(tmp_path):
    """The gang's members are placed, then rolled back when its last member fits nowhere;
    the others stay where they went while the members counted in the zone spread. The
    log replays them in that order, where the spread alone would refuse the last one:
    the restart must still rebuild the same state (not fail to start)."""
    def setup(s):
        s.RegisterHosts(pb.RegisterHostsRequest(hosts=[
            pb.Host(id=f"h{i}", capacity={"cpu": 1000, "memory": 1000}, labels={"zone": "ab"[i % 2]})
            for i in range(4)]))
        resp = s.Place(pb.PlaceRequest(workloads=[
            web("g1", gang="G"), web("o1"), web("o2"), web("o3"), web("g2", gang="G"), web("o4"),
            web("g3", cpu=5000, gang="G")], strategy=pb.STRATEGY_SPREAD))
        placed = {p.workload_id: p.host_id for p in resp.placements if p.host_id}
        assert set(placed) == {"o1", "o2", "o3", "o4"}
        return snapshot(s)

    with restart_after(tmp_path, setup) as (before, s):
        assert snapshot(s) == before


def test_hand_written_event_fields_match_protobuf_encoding():
    """Events are written as raw wire bytes; the varints must be exactly what protobuf
    writes (and reads back) at every length, sequence numbers included, and every kind
    of event byte for byte what protobuf serializes."""
    from google.protobuf.internal import encoder

    from hci_scheduler.server.wire import event, event_head, varint

    for n in [*range(300), *(1 << k for k in range(7, 64)), *((1 << k) - 1 for k in range(7, 65))]:
        assert varint(n) == encoder._VarintBytes(n), n
    ev = pb.Event.FromString(b"\x08" + varint(2**21 + 5) + b"\x22" + varint(3) + b"h17")
    assert (ev.sequence, ev.host_id) == (2**21 + 5, "h17")

    for ns in (1_764_000_000_123_456_789, 5 * 10**9, 7, 0):
        head = event_head(pb.EVENT_TYPE_PLACED, ns)
        for seq, host, wid, spec in [(1, "h1", "w1", pb.Workload(id="w1", requests={"cpu": 100})),
                                     (2**35 + 3, "hôte-é" * 30, "w" * 253, pb.Workload(id="w" * 253, priority=7)),
                                     (127, "h", "😀", pb.Workload(id="😀", requests={"memory": 2**40}))]:
            spec_bytes = spec.SerializeToString(deterministic=True)
            want = pb.Event(sequence=seq, type=pb.EVENT_TYPE_PLACED, host_id=host, workload_id=wid, workload=spec)
            want.time.FromNanoseconds(ns)
            assert event(seq, head, host, wid, spec_bytes, b"") == want.SerializeToString(deterministic=True)
    # The other kinds: empty ids are left out, the rare fields come encoded by protobuf.
    ns = 1_764_000_000_000_000_001
    host = pb.Host(id="h1", capacity={"cpu": 4000}, labels={"zone": "a"}, state=pb.HOST_STATE_READY)
    cases = [
        (pb.EVENT_TYPE_HOST_ADDED, "h1", "", {"host": host, "per_host_workload_ids": ["agent", "osd"]}),
        (pb.EVENT_TYPE_HOST_REMOVED, "h1", "", {}),
        (pb.EVENT_TYPE_RELEASED, "h1", "w1", {}),
        (pb.EVENT_TYPE_RELEASED, "", "agent", {}),
        (pb.EVENT_TYPE_VOLUME_DELETED, "", "", {"volume_id": "v1"}),
    ]
    for etype, hid, wid, fields in cases:
        extra = pb.Event(**fields).SerializeToString(deterministic=True) if fields else b""
        want = pb.Event(sequence=9, type=etype, host_id=hid, workload_id=wid, **fields)
        want.time.FromNanoseconds(ns)
        assert event(9, event_head(etype, ns), hid, wid, b"", extra) == want.SerializeToString(deterministic=True)
    # A PLACED event with replica hosts and volumes: the spec (7) comes before them (8, 9).
    spec = pb.Workload(id="db", requests={"cpu": 1})
    fields = {"replica_host_ids": ["h1", "h2"],
              "volumes": [pb.VolumeReplicas(volume_id="v", host_ids=["h1"], size_gib=5)]}
    want = pb.Event(sequence=3, type=pb.EVENT_TYPE_PLACED, host_id="h1", workload_id="db", workload=spec, **fields)
    want.time.FromNanoseconds(ns)
    got = event(3, event_head(pb.EVENT_TYPE_PLACED, ns), "h1", "db", spec.SerializeToString(deterministic=True),
                pb.Event(**fields).SerializeToString())
    assert got == want.SerializeToString(deterministic=True)
    # Written with bounds checks off: what it cannot encode is refused, never written.
    head = event_head(pb.EVENT_TYPE_PLACED, ns)
    for bad in [(1, None, "h", "w", b"", b""), (1, head, None, "w", b"", b""), (-1, head, "h", "w", b"", b""),
                (1, head, "h", "w", None, b""), (1, head, "h", "w", b"", None)]:
        with pytest.raises((TypeError, OverflowError)):
            event(*bad)
    with pytest.raises(UnicodeEncodeError):
        event(1, head, "h\udc80", "w", b"", b"")
    for bad in [(-1, ns), (pb.EVENT_TYPE_PLACED, -1)]:
        with pytest.raises((ValueError, OverflowError)):
            event_head(*bad)
