# The clock and the seeded generator of the core's searches (_moves, _priced): one copy, so
# a seed draws the same moves in both.
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from ._typedefs cimport uint64_t, intp_t


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t _next(uint64_t* s) noexcept nogil:
    """xorshift64*: a seeded generator that never touches Python, advanced in place."""
    s[0] ^= s[0] >> 12
    s[0] ^= s[0] << 25
    s[0] ^= s[0] >> 27
    return s[0] * <uint64_t>2685821657736338717


cdef inline intp_t _below(uint64_t* s, intp_t n) noexcept nogil:
    """A draw in [0, n)."""
    return <intp_t>((_next(s) >> 11) % <uint64_t>n)
