"""scan_events against protobuf: the bounds it finds are the fields protobuf decodes, and
anything it does not read whole is flagged, never misread."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hci_scheduler.v1 import scheduler_pb2 as pb
from sched_core import _wirescan as ws

COLUMNS = ("SEQUENCE", "TYPE", "HOST_START", "HOST_STOP", "WORKLOAD_ID_START", "WORKLOAD_ID_STOP", "WORKLOAD_START",
           "WORKLOAD_STOP", "SPEC_REST", "FLAGS")


def scan(bodies: list[bytes]) -> tuple[bytes, np.ndarray]:
    blob = b"".join(bodies)
    starts = np.zeros(len(bodies) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bodies], out=starts[1:])
    out = np.full((len(bodies), ws.N_COLUMNS), -7, dtype=np.int64)
    flagged = ws.scan_events(np.frombuffer(blob, dtype=np.uint8), starts, out)
    assert flagged == int((out[:, ws.FLAGS] != 0).sum())
    return blob, out


def test_columns_are_in_the_order_replay_unpacks_them():
    # state._scanned unpacks a row as (sequence, type, host, host end, id, id end, workload, workload end,
    # rest, flags).
    assert [getattr(ws, name) for name in COLUMNS] == list(range(ws.N_COLUMNS))


def placed(seq: int, wid: str, host: str, **workload) -> pb.Event:
    return pb.Event(sequence=seq, type=pb.EVENT_TYPE_PLACED, host_id=host, workload_id=wid, incarnation="inc1",
                    workload=pb.Workload(id=wid, **workload), time={"seconds": 1_700_000_000, "nanos": 5})


def test_plain_events_scan_to_the_fields_protobuf_decodes():
    events = [placed(1, "w1", "h1", requests={"cpu": 500, "memory": 64}),
              placed(300, "wé", "höst", requests={"cpu": 1}, tenant="blue", group="web"),
              pb.Event(sequence=301, type=pb.EVENT_TYPE_RELEASED, workload_id="w1", host_id="h1", incarnation="i"),
              pb.Event(sequence=2**40, type=pb.EVENT_TYPE_EVICTED, workload_id="x" * 300)]
    bodies = [e.SerializeToString() for e in events]
    blob, out = scan(bodies)
    for ev, row in zip(events, out):
        assert row[ws.FLAGS] == 0
        assert (row[ws.SEQUENCE], row[ws.TYPE]) == (ev.sequence, ev.type)
        assert blob[row[ws.HOST_START]:row[ws.HOST_STOP]].decode() == ev.host_id
        assert blob[row[ws.WORKLOAD_ID_START]:row[ws.WORKLOAD_ID_STOP]].decode() == ev.workload_id
        spec = blob[row[ws.WORKLOAD_START]:row[ws.WORKLOAD_STOP]]
        assert spec == (ev.workload.SerializeToString() if ev.HasField("workload") else b"")
        if spec:  # the rest after the id field: the workload without its id
            rest = blob[row[ws.SPEC_REST]:row[ws.WORKLOAD_STOP]]
            w = pb.Workload.FromString(rest)
            assert w.id == "" and (w.requests, w.tenant) == (ev.workload.requests, ev.workload.tenant)


@pytest.mark.parametrize("event,flag", [
    # a host, replica hosts, a status: fields replay needs protobuf for
    (pb.Event(sequence=1, type=pb.EVENT_TYPE_HOST_ADDED, host=pb.Host(id="h")), ws.FLAG_OTHER),
    (pb.Event(sequence=2, type=pb.EVENT_TYPE_PLACED, workload_id="s", replica_host_ids=["a", "b"],
              workload=pb.Workload(id="s", per_host=True)), ws.FLAG_OTHER),
    # the workload's id is not the event's workload_id
    (pb.Event(sequence=3, type=pb.EVENT_TYPE_PLACED, host_id="h", workload_id="a",
              workload=pb.Workload(id="b")), ws.FLAG_ID),
    # a workload without an id field first (empty id: protobuf omits it)
    (pb.Event(sequence=4, type=pb.EVENT_TYPE_PLACED, host_id="h", workload_id="a",
              workload=pb.Workload(requests={"cpu": 1})), ws.FLAG_ID),
], ids=["host", "replicas", "other-id", "no-id"])
def test_events_replay_cannot_read_from_bounds_are_flagged(event, flag):
    _, out = scan([event.SerializeToString()])
    assert out[0, ws.FLAGS] & flag


def test_a_field_given_twice_and_a_padded_id_length_are_flagged():
    ev = placed(7, "w", "h", requests={"cpu": 1})
    body = ev.SerializeToString()
    twice = body + pb.Event(workload_id="v").SerializeToString()  # protobuf keeps the last workload_id
    assert pb.Event.FromString(twice).workload_id == "v"
    spec = b"\x0a\x81\x00w" + pb.Workload(requests={"cpu": 1}).SerializeToString()  # length 1 as two bytes
    padded = pb.Event(sequence=8, type=pb.EVENT_TYPE_PLACED, host_id="h", workload_id="w").SerializeToString() \
        + b"\x3a" + bytes([len(spec)]) + spec
    assert pb.Event.FromString(padded).workload.id == "w"
    _, out = scan([twice, padded])
    assert out[0, ws.FLAGS] & ws.FLAG_OTHER and out[1, ws.FLAGS] & ws.FLAG_ID


def test_truncated_events_are_flagged_and_nothing_is_read_past_them():
    body = placed(9, "w9", "h9", requests={"cpu": 7}).SerializeToString()
    cuts = [body[:k] for k in range(1, len(body))]
    parses = []
    for cut in cuts:
        try:
            pb.Event.FromString(cut)
            parses.append(True)
        except Exception:
            parses.append(False)
    _, out = scan(cuts)
    assert_within(cuts, out)
    for cut, row, ok in zip(cuts, out, parses):
        if not ok:  # what protobuf refuses is never read as a plain event with a workload
            assert row[ws.FLAGS] != 0 or row[ws.WORKLOAD_STOP] == row[ws.WORKLOAD_START], cut


def assert_within(bodies: list[bytes], out: np.ndarray) -> None:
    """Every field found lies inside its own event's bytes."""
    starts = np.concatenate([[0], np.cumsum([len(b) for b in bodies])]).astype(np.int64)
    for i, row in enumerate(out):
        for a, b in ((ws.HOST_START, ws.HOST_STOP), (ws.WORKLOAD_ID_START, ws.WORKLOAD_ID_STOP),
                     (ws.WORKLOAD_START, ws.WORKLOAD_STOP)):
            if row[b] > row[a]:
                assert starts[i] <= row[a] < row[b] <= starts[i + 1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_never_scan_out_of_their_event(bodies):
    _, out = scan(bodies)
    assert_within(bodies, out)


def test_bad_arguments_raise():
    buf = np.zeros(4, dtype=np.uint8)
    out = np.zeros((1, ws.N_COLUMNS), dtype=np.int64)
    with pytest.raises(ValueError, match="starts"):
        ws.scan_events(buf, np.array([0], dtype=np.int64), out)
    with pytest.raises(ValueError, match="past"):
        ws.scan_events(buf, np.array([0, 9], dtype=np.int64), out)
    with pytest.raises(ValueError, match="decrease"):
        ws.scan_events(buf, np.array([3, 1], dtype=np.int64), out)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=12), st.text(max_size=6).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_utf8_check_agrees_with_python(data):
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert ws._py_utf8(np.frombuffer(data, dtype=np.uint8).copy()) == valid


def test_a_damaged_time_or_incarnation_is_left_to_protobuf():
    head = pb.Event(sequence=5, type=pb.EVENT_TYPE_RELEASED, workload_id="w").SerializeToString()
    bad_time = head + b"\x1a\x02\x18\x01"         # time {3: 1}: not a field of Timestamp (protobuf keeps it)
    bad_incarnation = head + b"\x62\x02\xc3\x28"  # incarnation: invalid UTF-8
    with pytest.raises(Exception):
        pb.Event.FromString(bad_incarnation)
    _, out = scan([bad_time, bad_incarnation, head + b"\x1a\x04\x08\x01\x10\x02" + b"\x62\x02ok"])
    assert out[0, ws.FLAGS] and out[1, ws.FLAGS] and not out[2, ws.FLAGS]
