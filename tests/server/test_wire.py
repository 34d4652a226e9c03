"""The wire decoder of plain PlaceRequests (hci_scheduler.server.wire) against the
protobuf path it stands in for: same ids, same canonical spec bytes, same models;
and None (the protobuf path decides) for everything it does not decode."""
from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from hci_scheduler.cluster import MAX_QUANTITY
from hci_scheduler.server import convert
from hci_scheduler.server.limits import MAX_ID_LENGTH, MAX_NAME_LENGTH
from hci_scheduler.server.wire import PlainDecoder
from hci_scheduler.v1 import scheduler_pb2 as pb

DIMS = ("cpu", "memory", "ssd", "net", "gpu")


def decoder(max_workloads: int = 1000) -> PlainDecoder:
    return PlainDecoder(DIMS, MAX_QUANTITY, MAX_ID_LENGTH, max_workloads, MAX_NAME_LENGTH)


def reference(data: bytes):
    """What the protobuf path makes of the same bytes."""
    req = pb.PlaceRequest.FromString(data)
    return [convert.place_item(w, w.id, DIMS) for w in req.workloads], req.gang, req.strategy, req.preempt


ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
plain_workloads = st.builds(
    dict,
    requests=st.dictionaries(st.sampled_from(DIMS), st.integers(0, MAX_QUANTITY - 1), max_size=5),
    kind=st.sampled_from([0, 1, 2]),
    isolation=st.sampled_from([0, 1, 2]),
    tenant=names,
    group=names,
    priority=st.integers(-2**63, 2**63 - 1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ids, plain_workloads), min_size=1, max_size=8, unique_by=lambda t: t[0]),
       st.booleans(), st.sampled_from([0, 1, 2, 3, 4, 9]), st.booleans(), st.randoms())
def test_plain_requests_decode_as_the_protobuf_path_converts_them(workloads, gang, strategy, preempt, rnd):
    req = pb.PlaceRequest(gang=gang, strategy=strategy, preempt=preempt)
    for wid, fields in workloads:
        req.workloads.add(id=wid, **fields)
    data = req.SerializeToString()
    if rnd.random() < 0.5:
        # Fields in any order, map entries too: protobuf accepts them, so must we.
        data = _shuffled(data, rnd)
    got = decoder().decode(data)
    if any(f["isolation"] == 2 and not f["tenant"] for _, f in workloads):
        assert got is None  # dedicated without a tenant: the protobuf path names the error
        return
    want_items, *want_flags = reference(data)
    assert got is not None
    items, *flags = got
    assert flags == want_flags
    assert [(i.wid, i.spec) for i in items] == [(i.wid, i.spec) for i in want_items]
    assert [i.model.__dict__ for i in items] == [i.model.__dict__ for i in want_items]
    assert not any(i.special for i in items)


def _shuffled(data: bytes, rnd: random.Random) -> bytes:
    """The same message with its top-level fields and each workload's fields permuted."""
    def fields(buf: bytes):
        out, pos = [], 0
        while pos < len(buf):
            start = pos
            key, pos = _read_varint(buf, pos)
            if key & 7 == 2:
                n, pos = _read_varint(buf, pos)
                body = buf[pos:pos + n]
                pos += n
                out.append((key, buf[start:pos], body))
            else:
                _, pos = _read_varint(buf, pos)
                out.append((key, buf[start:pos], None))
        return out

    top = fields(data)
    parts = []
    for key, raw, body in top:
        if key == 0x0A:  # a workload: permute its fields (the order of workloads stays)
            inner = [r for _, r, _ in fields(body)]
            rnd.shuffle(inner)
            body = b"".join(inner)
            raw = b"\x0a" + _varint(len(body)) + body
        parts.append((key, raw))
    others = [p for p in parts if p[0] != 0x0A]
    rnd.shuffle(others)
    return b"".join(r for _, r in others + [p for p in parts if p[0] == 0x0A])


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def test_repeated_map_keys_and_scalars_keep_the_last_value():
    w = pb.Workload(id="a", requests={"cpu": 5}, kind=1).SerializeToString()
    w += pb.Workload(requests={"cpu": 7, "memory": 0}, kind=2).SerializeToString()  # concatenation merges
    data = b"\x0a" + _varint(len(w)) + w
    (item,), *_ = decoder().decode(data)
    (ref,), *_ = reference(data)
    assert (item.wid, item.spec, item.model.__dict__) == (ref.wid, ref.spec, ref.model.__dict__)
    assert item.model.requests == {"cpu": 7} and item.model.kind == "vm"


@pytest.mark.parametrize("field", ["id", "tenant", "group"])
def test_a_repeated_string_field_goes_the_protobuf_way(field):
    # Protobuf checks the UTF-8 of every occurrence, the decoder would read only the
    # last one: an invalid first value must not slip through.
    first = pb.Workload(id="a", **({} if field == "id" else {field: "x"})).SerializeToString()
    tag = {"id": b"\x0a", "tenant": b"\x22", "group": b"\x32"}[field]
    w = first.replace(tag + b"\x01" + (b"a" if field == "id" else b"x"), tag + b"\x01\x80") \
        + pb.Workload(**{field: "b"}).SerializeToString()
    if field != "id":
        w = pb.Workload(id="a").SerializeToString() + w
    data = b"\x0a" + _varint(len(w)) + w
    assert decoder().decode(data) is None
    with pytest.raises(DecodeError):
        reference(data)


@pytest.mark.parametrize("workload", [
    pb.Workload(id="w", requests={"cpu": 1}, group="g", node_selector={"zone": "a"}),  # a constraint
    pb.Workload(id="w", requests={"cpu": 1}, gang="g1"),
    pb.Workload(id="w", requests={"cpu": 1}, per_host=True),
    pb.Workload(id="w", requests={"cpu": 1}, kind=7),  # unknown enum
    pb.Workload(id="w", requests={"cpu": 1}, isolation=2),  # dedicated without a tenant
    pb.Workload(id="w", requests={"tpu": 1}),  # unknown dimension
    pb.Workload(id="w", requests={"cpu": -1}),
    pb.Workload(id="w", requests={"cpu": MAX_QUANTITY}),
    pb.Workload(id="", requests={"cpu": 1}),
    pb.Workload(id="x" * (MAX_ID_LENGTH + 1), requests={"cpu": 1}),
])
def test_anything_but_a_valid_plain_workload_is_left_to_protobuf(workload):
    req = pb.PlaceRequest(workloads=[pb.Workload(id="fine", requests={"cpu": 1}), workload])
    assert decoder().decode(req.SerializeToString()) is None


def test_malformed_duplicate_unknown_and_oversized_requests_are_left_to_protobuf():
    good = pb.PlaceRequest(workloads=[pb.Workload(id="a", requests={"cpu": 1})]).SerializeToString()
    assert decoder().decode(good) is not None
    assert decoder().decode(good[:-1]) is None  # truncated
    assert decoder().decode(good + b"\xff") is None  # a dangling varint
    assert decoder().decode(good + b"\x28\x01") is None  # field 5: not in PlaceRequest
    assert decoder().decode(b"") is None  # no workloads
    twice = pb.PlaceRequest(workloads=[pb.Workload(id="a"), pb.Workload(id="a")]).SerializeToString()
    assert decoder().decode(twice) is None
    bad_utf8 = b"\x0a\x04\x0a\x02\xc3\x28"  # workload {id: invalid UTF-8}
    assert decoder().decode(bad_utf8) is None
    three = pb.PlaceRequest(workloads=[pb.Workload(id=str(i)) for i in range(3)]).SerializeToString()
    assert decoder(max_workloads=2).decode(three) is None
    assert decoder(max_workloads=3).decode(three) is not None


def test_a_cluster_with_more_dimensions_than_the_decoder_takes_goes_through_protobuf():
    many = tuple(f"d{i}" for i in range(40))
    data = pb.PlaceRequest(workloads=[pb.Workload(id="a", requests={"d0": 1})]).SerializeToString()
    assert PlainDecoder(many, MAX_QUANTITY, MAX_ID_LENGTH, 10, MAX_NAME_LENGTH).decode(data) is None
    assert PlainDecoder(many[:32], MAX_QUANTITY, MAX_ID_LENGTH, 10, MAX_NAME_LENGTH).decode(data) is not None


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(ids, plain_workloads), min_size=1, max_size=3, unique_by=lambda t: t[0]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       st.binary(max_size=8))
def test_corrupted_bytes_decode_as_protobuf_reads_them_or_not_at_all(workloads, flips, tail):
    """The decoder reads bytes with bounds checks off: on any corruption it must
    either give up (None) or agree with protobuf."""
    req = pb.PlaceRequest()
    for wid, fields in workloads:
        req.workloads.add(id=wid, **fields)
    data = bytearray(req.SerializeToString())
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data) + tail
    got = decoder().decode(data)
    if got is None:
        return
    want_items, *want_flags = reference(data)  # protobuf must read what we read
    items, *flags = got
    assert flags == want_flags
    assert [(i.wid, i.spec, i.model.__dict__) for i in items] == \
        [(i.wid, i.spec, i.model.__dict__) for i in want_items]


@pytest.mark.parametrize("field", ["tenant", "group"])
def test_a_tenant_or_group_over_its_length_is_left_to_protobuf(field):
    """The protobuf path counts characters and names the field; the decoder never
    accepts what it refuses (UTF-8 bytes are never fewer than characters)."""
    for value, decoded in (("t" * MAX_NAME_LENGTH, True), ("é" * (MAX_NAME_LENGTH // 2), True),
                           ("t" * (MAX_NAME_LENGTH + 1), False), ("é" * MAX_NAME_LENGTH, False)):
        data = pb.PlaceRequest(workloads=[pb.Workload(id="a", requests={"cpu": 1}, **{field: value})])
        assert (decoder().decode(data.SerializeToString()) is not None) == decoded, value


def test_a_workload_with_an_unknown_field_is_left_to_protobuf():
    known = pb.Workload(id="a", requests={"cpu": 1}).SerializeToString()
    for unknown in (b"\xa2\x06\x03abc", b"\xcb\x06\xcc\x06"):  # field 100: bytes; a group
        data = pb.PlaceRequest(workloads=[pb.Workload.FromString(known + unknown)]).SerializeToString()
        assert decoder().decode(data) is None


def test_status_and_policy_moved_events_are_byte_for_byte_protobuf():
    """The agent's event kinds go through `event` with their rare fields encoded by
    protobuf (status 17, reason 18, after the spec): the same bytes as protobuf's."""
    from hci_scheduler.server.wire import event, event_head

    ns = 1_764_000_000_000_000_777
    st = pb.WorkloadStatus(workload_id="w1", host_id="h1", state=pb.WORKLOAD_STATE_EXITED, exit_code=-9,
                           message="killed", container_id="c" * 64, restarts=3)
    st.since.FromNanoseconds(ns)
    cases = [
        (pb.EVENT_TYPE_STATUS, "h1", "w1", {"status": st}),
        (pb.EVENT_TYPE_MOVED, "h2", "w1", {"source_host_id": "h1", "reason": "host h1 down"}),
    ]
    for etype, hid, wid, fields in cases:
        want = pb.Event(sequence=2**40, type=etype, host_id=hid, workload_id=wid, **fields)
        want.time.FromNanoseconds(ns)
        got = event(2**40, event_head(etype, ns), hid, wid, b"", pb.Event(**fields).SerializeToString())
        assert got == want.SerializeToString(deterministic=True)


def test_a_workload_with_a_runtime_spec_is_left_to_protobuf():
    for w in (pb.Workload(id="c", requests={"cpu": 1}, container=pb.ContainerSpec(image="busybox")),
              pb.Workload(id="v", kind=2, vm=pb.VmSpec(disk_image="/d"))):
        assert decoder().decode(pb.PlaceRequest(workloads=[w]).SerializeToString()) is None
