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
    """Placement events are written as raw wire bytes; the varints must be exactly what
    protobuf writes (and reads back) at every length, sequence numbers included, and a
    PLACED event byte for byte what protobuf serializes."""
    from google.protobuf.internal import encoder

    from hci_scheduler.server.state import _EVENT_PLACED_TYPE, _event_time
    from hci_scheduler.server.wire import placed_event, varint

    for n in [*range(300), *(1 << k for k in range(7, 64)), *((1 << k) - 1 for k in range(7, 65))]:
        assert varint(n) == encoder._VarintBytes(n), n
    ev = pb.Event.FromString(b"\x08" + varint(2**21 + 5) + b"\x22" + varint(3) + b"h17")
    assert (ev.sequence, ev.host_id) == (2**21 + 5, "h17")

    ns = 1_764_000_000_123_456_789
    head = _EVENT_PLACED_TYPE + _event_time(ns)
    for seq, host, wid, spec in [(1, "h1", "w1", pb.Workload(id="w1", requests={"cpu": 100})),
                                 (2**35 + 3, "hôte-é" * 30, "w" * 253, pb.Workload(id="w" * 253, priority=7)),
                                 (127, "h", "😀", pb.Workload(id="😀", requests={"memory": 2**40}))]:
        spec_bytes = spec.SerializeToString(deterministic=True)
        want = pb.Event(sequence=seq, type=pb.EVENT_TYPE_PLACED, host_id=host, workload_id=wid, workload=spec)
        want.time.FromNanoseconds(ns)
        assert placed_event(seq, head, host, wid, spec_bytes) == want.SerializeToString(deterministic=True)
    # Written with bounds checks off: what it cannot encode is refused, never written.
    for bad in [(1, None, "h", "w", b""), (1, head, None, "w", b""), (-1, head, "h", "w", b"")]:
        with pytest.raises((TypeError, OverflowError)):
            placed_event(*bad)
    with pytest.raises(UnicodeEncodeError):
        placed_event(1, head, "h\udc80", "w", b"")
