"""Replay of a log written before tenant-less work counted against a dedicated tenant
(issue 13, item 1): the pair it holds was acknowledged, so the server starts with both
where the log put them and warns; new placements follow the rule."""
import logging

from hci_scheduler.server import convert
from hci_scheduler.server.state import SchedulerState
from hci_scheduler.store.base import Record
from hci_scheduler.store.memory import MemoryStore
from hci_scheduler.v1 import scheduler_pb2 as pb


def old_log() -> MemoryStore:
    """HOST_ADDED h0 and h1, then PLACED plain and secure (dedicated) both on h0."""
    events = [
        pb.Event(type=pb.EVENT_TYPE_HOST_ADDED, host_id=h,
                 host=convert.normalize_host(pb.Host(id=h, capacity={"cpu": 8000, "memory": 8000})))
        for h in ("h0", "h1")
    ] + [
        pb.Event(type=pb.EVENT_TYPE_PLACED, workload_id=w.id, host_id="h0", workload=w)
        for w in (pb.Workload(id="plain", requests={"cpu": 1000, "memory": 1000}),
                  pb.Workload(id="sec", requests={"cpu": 1000, "memory": 1000}, tenant="secure",
                              isolation=pb.ISOLATION_DEDICATED))
    ]
    store = MemoryStore()
    records = []
    for seq, ev in enumerate(events, 1):
        ev.sequence = seq
        records.append(Record(seq, ev.type, ev.SerializeToString()))
    store.append(records)
    return store


def test_replay_keeps_an_acknowledged_pair_that_breaks_isolation_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="hci_scheduler"):
        state = SchedulerState(old_log())
    try:
        assert state.cluster.assignments() == {"plain": "h0", "sec": "h0"}
        assert any("sec" in r.getMessage() and "tenant isolation" in r.getMessage() for r in caplog.records)
        # h0 is held dedicated now: a new tenant-less workload goes to h1.
        item = convert.place_item(pb.Workload(id="new", requests={"cpu": 100}), "new", state.dimensions)
        state.execute("place", ([item], False, "binpack", False))
        assert state.cluster.assignments()["new"] == "h1"
    finally:
        state.close()
