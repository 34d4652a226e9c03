# The protobuf varint reader shared by the log's tail scan (_wirescan) and the Place
# request decoder (hci_scheduler/server/wire.pyx): one copy of the wire format's rule.
from libc.stdint cimport int64_t, uint64_t, uint8_t


cdef inline bint read_varint(const uint8_t* buf, int64_t end, int64_t* pos, uint64_t* out) noexcept nogil:
    """The varint at buf[pos[0]:end] into out, pos[0] moved past it; False when it runs
    past end or over 64 bits (the caller treats the bytes as malformed)."""
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t b
    while pos[0] < end and shift < 64:
        b = buf[pos[0]]
        pos[0] += 1
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = result
            return True
        shift += 7
    return False
