# cython: language_level=3
"""Where the fields of many log events lie in their wire bytes (arrays in, arrays out).

Replaying a log's tail spent most of its time in protobuf: each event decoded into a
message, and each PLACED event's workload encoded again to get its spec bytes, which
the event already holds verbatim. `scan_events` finds, in one pass over the events'
bytes, each event's sequence and type and the bounds of its host id, workload id and
workload, so the caller slices what it needs and decodes with protobuf only the events
that carry anything else (hci_scheduler/server/state.py, the replay).

Event fields read (protos/hci_scheduler/v1/scheduler.proto, Event): 1 sequence, 2 type,
3 time and 12 incarnation (checked as protobuf checks them, not returned), 4 host_id,
5 workload_id, 7 workload. Any other field, a field given twice, or a workload that
does not open with its id (field 1, minimal length prefix) equal to workload_id sets a
flag: the caller decodes that event with protobuf, which decides what it is. The caller
checks the UTF-8 of the strings it slices (host and workload ids) and decodes each
distinct workload spec once with protobuf.
"""
from libc.stdint cimport int64_t, uint64_t, uint8_t
from libc.string cimport memcmp

from sched_core._varint cimport read_varint

cpdef enum:
    # Columns of `out`, one row per event.
    SEQUENCE = 0
    TYPE = 1
    HOST_START = 2
    HOST_STOP = 3
    WORKLOAD_ID_START = 4
    WORKLOAD_ID_STOP = 5
    WORKLOAD_START = 6   # the workload's bytes: [WORKLOAD_START, WORKLOAD_STOP)
    WORKLOAD_STOP = 7
    SPEC_REST = 8        # where the workload's bytes after its id field start
    FLAGS = 9
    N_COLUMNS = 10

cpdef enum:
    FLAG_OTHER = 1       # a field other than those read, or one given twice
    FLAG_MALFORMED = 2   # the bytes do not scan: protobuf decides what they are
    FLAG_ID = 4          # a workload that does not open with its id, or whose id is not workload_id


cdef inline int64_t _varint_size(uint64_t v) noexcept nogil:
    cdef int64_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef bint _utf8(const uint8_t* s, int64_t n) noexcept nogil:
    """Whether s[:n] is valid UTF-8 as protobuf checks a string (no overlong forms, no
    surrogates, nothing above U+10FFFF)."""
    cdef int64_t i = 0, k, need
    cdef uint8_t c
    cdef uint64_t cp
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need, cp = 1, c & 0x1F
        elif 0xE0 <= c <= 0xEF:
            need, cp = 2, c & 0x0F
        elif 0xF0 <= c <= 0xF4:
            need, cp = 3, c & 0x07
        else:
            return False
        if n - i - 1 < need:
            return False
        for k in range(1, need + 1):
            if s[i + k] & 0xC0 != 0x80:
                return False
            cp = (cp << 6) | (s[i + k] & 0x3F)
        if (need == 2 and (cp < 0x800 or 0xD800 <= cp <= 0xDFFF)) or (need == 3 and (cp < 0x10000 or cp > 0x10FFFF)):
            return False
        i += need + 1
    return True


cdef bint _timestamp(const uint8_t* buf, int64_t pos, int64_t end) noexcept nogil:
    """Whether buf[pos:end] is a Timestamp as protobuf reads it: varint fields 1 and 2 only."""
    cdef uint64_t key, v
    while pos < end:
        if not read_varint(buf, end, &pos, &key) or (key != 0x08 and key != 0x10) or not read_varint(buf, end, &pos, &v):
            return False
    return True


cdef int _scan_one(const uint8_t* buf, int64_t pos, int64_t end, int64_t* row) noexcept nogil:
    """Fill one event's row (zeroed); returns its flags. Reads buf[pos:end] only."""
    cdef uint64_t key, v, n
    cdef int flags = 0, seen = 0, bit
    cdef int64_t field, wtype, start, id_pos, id_len
    while pos < end:
        if not read_varint(buf, end, &pos, &key):
            return flags | FLAG_MALFORMED
        field = <int64_t>(key >> 3)
        wtype = <int64_t>(key & 7)
        if field == 0:
            return flags | FLAG_MALFORMED
        bit = <int>(1 << field) if field < 16 else 0
        if bit and (seen & bit) and field != 3:
            flags |= FLAG_OTHER  # given twice: protobuf merges or keeps the last, it decides
        seen |= bit
        if wtype == 0:
            if not read_varint(buf, end, &pos, &v):
                return flags | FLAG_MALFORMED
            if field == 1:
                row[SEQUENCE] = <int64_t>v
            elif field == 2:
                row[TYPE] = <int64_t>v
            else:
                flags |= FLAG_OTHER
        elif wtype == 2:
            if not read_varint(buf, end, &pos, &n) or n > <uint64_t>(end - pos):
                return flags | FLAG_MALFORMED
            start = pos
            pos += <int64_t>n
            if field == 4:
                row[HOST_START] = start
                row[HOST_STOP] = pos
            elif field == 5:
                row[WORKLOAD_ID_START] = start
                row[WORKLOAD_ID_STOP] = pos
            elif field == 7:
                row[WORKLOAD_START] = start
                row[WORKLOAD_STOP] = pos
            elif field == 3:  # time: skipped, but it must decode as protobuf would decode it
                if not _timestamp(buf, start, pos):
                    flags |= FLAG_OTHER
            elif field == 12:  # incarnation: skipped, but it must be a string protobuf accepts
                if not _utf8(buf + start, pos - start):
                    flags |= FLAG_OTHER
            else:
                flags |= FLAG_OTHER
        elif wtype == 1:
            if end - pos < 8:
                return flags | FLAG_MALFORMED
            pos += 8
            flags |= FLAG_OTHER
        elif wtype == 5:
            if end - pos < 4:
                return flags | FLAG_MALFORMED
            pos += 4
            flags |= FLAG_OTHER
        else:
            return flags | FLAG_MALFORMED
    if row[WORKLOAD_STOP] > row[WORKLOAD_START]:
        # The workload opens with its id (tag 0x0A, minimal length) equal to workload_id.
        id_pos = row[WORKLOAD_START]
        if buf[id_pos] != 0x0A:
            return flags | FLAG_ID
        id_pos += 1
        if not read_varint(buf, row[WORKLOAD_STOP], &id_pos, &n) or n > <uint64_t>(row[WORKLOAD_STOP] - id_pos):
            return flags | FLAG_ID
        id_len = <int64_t>n
        if (id_pos - row[WORKLOAD_START] != 1 + _varint_size(n)
                or id_len != row[WORKLOAD_ID_STOP] - row[WORKLOAD_ID_START]
                or memcmp(buf + id_pos, buf + row[WORKLOAD_ID_START], id_len) != 0):
            return flags | FLAG_ID
        row[SPEC_REST] = id_pos + id_len
    return flags


def scan_events(const uint8_t[::1] buf, const int64_t[::1] starts, int64_t[:, ::1] out):
    """Locate the fields of many Event messages laid end to end.

    Parameters
    ----------
    buf : (n_bytes,) uint8, C-contiguous
        The events' wire bytes, one after another.
    starts : (n_events + 1,) int64, C-contiguous
        Event i is buf[starts[i]:starts[i + 1]]; non-decreasing, starts[n_events] <= n_bytes.
    out : (n_events, N_COLUMNS) int64, C-contiguous
        Written: per event its SEQUENCE and TYPE (0 when absent), the [start, stop)
        offsets into buf of its host id, workload id and workload (equal when absent),
        SPEC_REST (where the workload's bytes after its id start) and FLAGS.

    Returns
    -------
    int
        How many events have any flag set.
    """
    cdef Py_ssize_t n = out.shape[0], i, k
    cdef int64_t flagged = 0
    cdef int64_t* row
    cdef const uint8_t* data = &buf[0] if buf.shape[0] else NULL
    if starts.shape[0] != n + 1 or out.shape[1] != N_COLUMNS:
        raise ValueError(f"scan_events: {starts.shape[0]} starts and out of shape "
                         f"({out.shape[0]}, {out.shape[1]}) for {n} events")
    if n and (starts[0] < 0 or starts[n] > buf.shape[0]):
        raise ValueError("scan_events: starts run past buf")
    for i in range(n):
        if starts[i + 1] < starts[i]:
            raise ValueError("scan_events: starts must not decrease")
    with nogil:
        for i in range(n):
            row = &out[i, 0]
            for k in range(N_COLUMNS):
                row[k] = 0
            row[FLAGS] = _scan_one(data, starts[i], starts[i + 1], row)
            if row[FLAGS]:
                flagged += 1
    return flagged


def _py_utf8(const uint8_t[::1] s):
    """Python wrapper used for testing: whether s is UTF-8 as protobuf checks a string."""
    return bool(_utf8(&s[0] if s.shape[0] else NULL, s.shape[0]))
