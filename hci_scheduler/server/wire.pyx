# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Protobuf wire format by hand where the unary Place path spends its time: the
plain workloads of a PlaceRequest decoded straight from its bytes, and every
event of the log written straight into bytes (`event_head`, `event`). The one
module that writes wire bytes by hand; everything else goes through protobuf.

Why: converting a batch of 1,000 plain containers through the protobuf objects
(one attribute read per field, a dict from the map, a deterministic re-encode
for the idempotency key, the model object) was the largest part of a
batched Place call. Here one pass over the bytes yields, per workload, its id, its canonical
spec bytes (byte for byte what `normalize_workload(w).SerializeToString(
deterministic=True)` gives, tested against protobuf) and its model.

Only the common case is decoded: every workload plain (id, requests, kind,
tenant, isolation, group, priority), every value one the model and the bounds
of limits.py accept, no unknown field (none is ever copied into a spec).
Anything else -- a constraint, a bad enum, an unknown dimension, a duplicate or
empty id, a tenant or group over its length, malformed bytes -- returns None
and the caller parses the request with protobuf, whose path names the error.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp, memcpy

from sched_core._varint cimport read_varint

from hci_scheduler.model import Workload
from hci_scheduler.server.convert import _ISOLATION_NAMES, _KIND_NAMES, _PLAIN_TEMPLATE, PlaceItem

cdef enum:
    MAX_DIMS = 32  # dimensions a decoder handles (a cluster has 5 by default)

cdef object _new_object = object.__new__
cdef dict _TEMPLATE = _PLAIN_TEMPLATE


cdef inline bint _varint(const unsigned char* buf, Py_ssize_t end, Py_ssize_t* pos, uint64_t* out) noexcept nogil:
    return read_varint(buf, end, <int64_t*>pos, out)  # Py_ssize_t is int64_t on the 64-bit targets we build


cdef inline bint _length(const unsigned char* buf, Py_ssize_t end, Py_ssize_t* pos, Py_ssize_t* start,
                         Py_ssize_t* stop) noexcept nogil:
    """A length-delimited field's bounds; False when it runs past `end`."""
    cdef uint64_t n
    if not _varint(buf, end, pos, &n) or n > <uint64_t>(end - pos[0]):
        return False
    start[0] = pos[0]
    stop[0] = pos[0] + <Py_ssize_t>n
    pos[0] = stop[0]
    return True


cdef inline Py_ssize_t _put_varint(unsigned char* out, uint64_t v) noexcept nogil:
    cdef Py_ssize_t i = 0
    while v >= 0x80:
        out[i] = <unsigned char>((v & 0x7F) | 0x80)
        v >>= 7
        i += 1
    out[i] = <unsigned char>v
    return i + 1


cdef inline Py_ssize_t _varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline Py_ssize_t _put_bytes(unsigned char* out, unsigned char tag, const unsigned char* src,
                                  Py_ssize_t n) noexcept nogil:
    out[0] = tag
    cdef Py_ssize_t k = 1 + _put_varint(out + 1, <uint64_t>n)
    memcpy(out + k, src, n)
    return k + n


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object unicode, Py_ssize_t* size) except NULL


def varint(uint64_t n):
    """Protobuf base-128 varint of n >= 0."""
    cdef unsigned char out[10]
    return PyBytes_FromStringAndSize(<const char*>out, _put_varint(out, n))


def event_head(int event_type, int64_t time_ns):
    """The type (field 2) and time (field 3, a Timestamp) of an Event, encoded once
    and shared by every event of a writer batch."""
    if event_type < 0 or time_ns < 0:
        raise ValueError(f"event_type and time_ns must be >= 0, got {event_type}, {time_ns}")
    cdef unsigned char out[40]
    cdef uint64_t seconds = <uint64_t>(time_ns // 1_000_000_000)
    cdef uint64_t nanos = <uint64_t>(time_ns % 1_000_000_000)
    cdef Py_ssize_t n = 0, body
    out[n] = 0x10
    n += 1
    n += _put_varint(out + n, <uint64_t>event_type)
    out[n] = 0x1a
    body = ((1 + _varint_size(seconds)) if seconds else 0) + ((1 + _varint_size(nanos)) if nanos else 0)
    n += 1 + _put_varint(out + n + 1, <uint64_t>body)
    if seconds:
        out[n] = 0x08
        n += 1 + _put_varint(out + n + 1, seconds)
    if nanos:
        out[n] = 0x10
        n += 1 + _put_varint(out + n + 1, nanos)
    return PyBytes_FromStringAndSize(<const char*>out, n)


def event(uint64_t sequence, bytes head not None, str host_id not None, str workload_id not None,
          bytes spec not None, bytes extra not None):
    """An Event's wire bytes: sequence (field 1), `head` (type and time, see
    `event_head`), host_id (4) and workload_id (5) when not empty, the workload's
    canonical spec bytes (7) when not empty, then `extra`: the other fields,
    already encoded (by protobuf, for the rare events that carry a host, replica
    hosts, volumes or a volume id). Fields may come in any order and concatenate
    into one valid message, so this is byte for byte what protobuf writes for the
    same fields in field order. The writer calls it once per event."""
    cdef Py_ssize_t nh, nw
    cdef const char* h = PyUnicode_AsUTF8AndSize(host_id, &nh)
    cdef const char* w = PyUnicode_AsUTF8AndSize(workload_id, &nw)
    cdef Py_ssize_t nhead = PyBytes_GET_SIZE(head), nspec = PyBytes_GET_SIZE(spec)
    cdef Py_ssize_t nextra = PyBytes_GET_SIZE(extra)
    cdef Py_ssize_t size = 1 + _varint_size(sequence) + nhead + nextra
    if nh:
        size += 1 + _varint_size(nh) + nh
    if nw:
        size += 1 + _varint_size(nw) + nw
    if nspec:
        size += 1 + _varint_size(nspec) + nspec
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t n = 1
    o[0] = 0x08
    n += _put_varint(o + n, sequence)
    memcpy(o + n, PyBytes_AS_STRING(head), nhead)
    n += nhead
    if nh:
        n += _put_bytes(o + n, 0x22, <const unsigned char*>h, nh)
    if nw:
        n += _put_bytes(o + n, 0x2a, <const unsigned char*>w, nw)
    if nspec:
        n += _put_bytes(o + n, 0x3a, <const unsigned char*>PyBytes_AS_STRING(spec), nspec)
    memcpy(o + n, PyBytes_AS_STRING(extra), nextra)
    return out


cdef class PlainDecoder:
    """Decodes PlaceRequests for one cluster's dimensions (fixed for its life)."""

    cdef list _names  # dimension names (str), in cluster order
    cdef list _encoded  # their UTF-8 bytes
    cdef Py_ssize_t _n_dims
    cdef Py_ssize_t _order[MAX_DIMS]  # dimension indices sorted by encoded name (map order on the wire)
    cdef int64_t _max_quantity
    cdef Py_ssize_t _max_id
    cdef Py_ssize_t _max_workloads
    cdef Py_ssize_t _max_name  # tenant and group, in characters (checked here in bytes: never fewer)
    cdef unsigned char* _scratch
    cdef Py_ssize_t _scratch_size

    def __cinit__(self, dims, int64_t max_quantity, Py_ssize_t max_id_length, Py_ssize_t max_workloads,
                  Py_ssize_t max_name_length):
        self._names = [str(d) for d in dims]
        self._encoded = [d.encode("utf-8") for d in self._names]
        # More dimensions than MAX_DIMS (or none): decode nothing, protobuf takes every request.
        self._n_dims = len(self._names) if len(self._names) <= MAX_DIMS else 0
        order = sorted(range(self._n_dims), key=lambda i: self._encoded[i])
        for i in range(self._n_dims):
            self._order[i] = order[i]
        self._max_quantity = max_quantity
        self._max_id = max_id_length
        self._max_workloads = max_workloads
        self._max_name = max_name_length
        self._scratch = NULL
        self._scratch_size = 0

    def __dealloc__(self):
        PyMem_Free(self._scratch)

    cdef unsigned char* _room(self, Py_ssize_t n) except NULL:
        if n > self._scratch_size:
            PyMem_Free(self._scratch)
            self._scratch = <unsigned char*>PyMem_Malloc(n)
            self._scratch_size = n if self._scratch != NULL else 0
            if self._scratch == NULL:
                raise MemoryError()
        return self._scratch

    def decode(self, bytes data):
        """(items, gang, strategy, preempt) of a PlaceRequest whose workloads are all
        plain, items being PlaceItems without a proto; None for anything else."""
        cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t pos = 0, start, stop
        cdef uint64_t key, v
        cdef uint64_t gang = 0, strategy = 0, preempt = 0
        cdef list items = []
        cdef set seen = set()
        if not self._n_dims:
            return None
        while pos < end:
            if not _varint(buf, end, &pos, &key):
                return None
            if key == 0x0A:  # 1: workloads
                if not _length(buf, end, &pos, &start, &stop):
                    return None
                if len(items) >= self._max_workloads:
                    return None
                item = self._workload(buf, start, stop, seen)
                if item is None:
                    return None
                items.append(item)
            elif key == 0x10 or key == 0x18 or key == 0x20:  # 2: gang, 3: strategy, 4: preempt
                if not _varint(buf, end, &pos, &v):
                    return None
                if key == 0x10:
                    gang = v
                elif key == 0x18:
                    strategy = v
                else:
                    preempt = v
            else:
                return None
        if not items:
            return None
        return items, gang != 0, int(strategy), preempt != 0

    cdef object _workload(self, const unsigned char* buf, Py_ssize_t pos, Py_ssize_t end, set seen):
        cdef uint64_t key, v, kind = 0, isolation = 0
        cdef int64_t priority = 0
        cdef Py_ssize_t start, stop, k_start, k_stop, epos, i, d, n
        cdef Py_ssize_t id_start = 0, id_stop = 0, tenant_start = 0, tenant_stop = 0
        cdef Py_ssize_t group_start = 0, group_stop = 0
        cdef int64_t values[MAX_DIMS]
        cdef int64_t value
        cdef bytes name
        for i in range(self._n_dims):
            values[i] = 0
        while pos < end:
            if not _varint(buf, end, &pos, &key):
                return None
            if key == 0x0A:  # 1: id
                # A string field given twice: protobuf checks the UTF-8 of both, the
                # decoder only reads the last, so the protobuf path decides.
                if id_stop or not _length(buf, end, &pos, &id_start, &id_stop):
                    return None
            elif key == 0x12:  # 2: one requests entry {1: key, 2: value}
                if not _length(buf, end, &pos, &start, &stop):
                    return None
                epos = start
                k_start = k_stop = start
                value = 0
                while epos < stop:
                    if not _varint(buf, stop, &epos, &key):
                        return None
                    if key == 0x0A:
                        if not _length(buf, stop, &epos, &k_start, &k_stop):
                            return None
                    elif key == 0x10:
                        if not _varint(buf, stop, &epos, &v):
                            return None
                        value = <int64_t>v
                    else:
                        return None
                d = -1
                n = k_stop - k_start
                for i in range(self._n_dims):
                    name = <bytes>self._encoded[i]
                    if PyBytes_GET_SIZE(name) == n and memcmp(PyBytes_AS_STRING(name), buf + k_start, n) == 0:
                        d = i
                        break
                if d < 0 or value < 0 or value >= self._max_quantity:
                    return None  # unknown dimension or a quantity the model refuses
                values[d] = value  # a repeated key: the last one wins, as in protobuf
            elif key == 0x18 or key == 0x28:  # 3: kind, 5: isolation
                if not _varint(buf, end, &pos, &v) or v > 2:
                    return None
                if key == 0x18:
                    kind = v
                else:
                    isolation = v
            elif key == 0x22:  # 4: tenant
                if tenant_stop or not _length(buf, end, &pos, &tenant_start, &tenant_stop):
                    return None
            elif key == 0x32:  # 6: group
                if group_stop or not _length(buf, end, &pos, &group_start, &group_stop):
                    return None
            elif key == 0x80:  # 16: priority (tag 16 << 3, two bytes on the wire)
                if not _varint(buf, end, &pos, &v):
                    return None
                priority = <int64_t>v
            else:
                return None
        if isolation == 2 and tenant_stop == tenant_start:
            return None  # dedicated needs a tenant: protobuf's path says so
        if tenant_stop - tenant_start > self._max_name or group_stop - group_start > self._max_name:
            return None  # maybe too long (UTF-8 bytes >= characters): protobuf's path counts and says so
        try:
            wid = PyUnicode_DecodeUTF8(<const char*>buf + id_start, id_stop - id_start, NULL)
            tenant = PyUnicode_DecodeUTF8(<const char*>buf + tenant_start, tenant_stop - tenant_start, NULL)
            group = PyUnicode_DecodeUTF8(<const char*>buf + group_start, group_stop - group_start, NULL)
        except UnicodeDecodeError:
            return None
        if not wid or len(wid) > self._max_id or wid in seen:
            return None
        seen.add(wid)
        kind = kind or 1
        isolation = isolation or 1
        requests = {}
        for i in range(self._n_dims):
            if values[i]:
                requests[self._names[i]] = values[i]
        return PlaceItem(wid, None, self._spec(buf, id_start, id_stop, values, kind, tenant_start, tenant_stop,
                                               isolation, group_start, group_stop, priority),
                         self._model(wid, requests, kind, tenant, isolation, group, priority))

    cdef bytes _spec(self, const unsigned char* buf, Py_ssize_t id_start, Py_ssize_t id_stop, int64_t* values,
                     uint64_t kind, Py_ssize_t tenant_start, Py_ssize_t tenant_stop, uint64_t isolation,
                     Py_ssize_t group_start, Py_ssize_t group_stop, int64_t priority):
        """The workload's deterministic encoding: fields by number, map entries by key."""
        cdef Py_ssize_t i, d, n, klen, entry
        cdef bytes name
        n = 96 + (id_stop - id_start) + (tenant_stop - tenant_start) + (group_stop - group_start)
        for d in range(self._n_dims):
            n += 16 + PyBytes_GET_SIZE(<bytes>self._encoded[d]) + 10
        cdef unsigned char* out = self._room(n)
        n = _put_bytes(out, 0x0A, buf + id_start, id_stop - id_start)
        for i in range(self._n_dims):
            d = self._order[i]
            if not values[d]:
                continue
            name = <bytes>self._encoded[d]
            klen = PyBytes_GET_SIZE(name)
            entry = 1 + _varint_size(<uint64_t>klen) + klen + 1 + _varint_size(<uint64_t>values[d])
            out[n] = 0x12
            n += 1
            n += _put_varint(out + n, <uint64_t>entry)
            n += _put_bytes(out + n, 0x0A, <const unsigned char*>PyBytes_AS_STRING(name), klen)
            out[n] = 0x10
            n += 1
            n += _put_varint(out + n, <uint64_t>values[d])
        out[n] = 0x18
        n += 1 + _put_varint(out + n + 1, kind)
        if tenant_stop > tenant_start:
            n += _put_bytes(out + n, 0x22, buf + tenant_start, tenant_stop - tenant_start)
        out[n] = 0x28
        n += 1 + _put_varint(out + n + 1, isolation)
        if group_stop > group_start:
            n += _put_bytes(out + n, 0x32, buf + group_start, group_stop - group_start)
        if priority:
            out[n] = 0x80
            out[n + 1] = 0x01
            n += 2 + _put_varint(out + n + 2, <uint64_t>priority)
        return PyBytes_FromStringAndSize(<const char*>out, n)

    cdef object _model(self, str wid, dict requests, uint64_t kind, str tenant, uint64_t isolation, str group,
                       int64_t priority):
        """A Workload built as convert.place_item builds a plain one (no __post_init__:
        every value was checked above). Not shared with it: a Python call per workload
        cost 5% of a batched Place; tests/server/test_wire.py holds the two equal."""
        model = _new_object(Workload)
        d = model.__dict__
        d.update(_TEMPLATE)
        d["id"] = wid
        d["requests"] = requests
        d["kind"] = _KIND_NAMES[kind]
        d["tenant"] = tenant or None
        d["isolation"] = _ISOLATION_NAMES[isolation]
        d["group"] = group or None
        d["priority"] = priority
        return model
