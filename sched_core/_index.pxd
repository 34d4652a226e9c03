# An ordered index of schedulable hosts by free_key. See _index.pyx for details.
from ._typedefs cimport int64_t, intp_t, uint8_t, uint64_t, float64_t

cdef enum:
    BLOCK = 128          # host rows per block at most; blocks split when full

cdef class FitIndex:
    cdef int64_t[:, ::1] free       # (n_rows, n_dims) free capacity, shared with the cluster state
    cdef float64_t[::1] inv_ref     # (n_dims,) weight / reference capacity, 0 skips a dimension
    cdef float64_t[::1] key         # (n_rows,) free_key of each member, as inserted
    cdef uint8_t[::1] member        # (n_rows,) 1 when the host row is in the index (schedulable)
    cdef intp_t[:, ::1] items       # (n_slots, BLOCK) member rows per block, sorted by (key, row)
    cdef intp_t[::1] count          # (n_slots,) rows used in each block
    cdef int64_t[:, ::1] maxfree    # (n_slots, n_dims) upper bound of free over a block's rows
    cdef uint8_t[::1] stale         # (n_slots,) 1 when a row left or lost capacity since the bound was computed
    cdef int64_t[:, ::1] fail_req   # (n_slots, n_dims) a request no row of the block fits (see note_fail)
    cdef uint8_t[::1] has_fail      # (n_slots,) 1 when fail_req holds such a request
    cdef intp_t[::1] order          # (n_slots,) block slots in key order; the first n_blocks are live
    cdef uint64_t[::1] stamp        # (n_slots,) value of `clock` when the block's rows last changed
    cdef uint64_t clock             # counts row changes; lets callers cache facts about a block's rows
    cdef intp_t[::1] spare          # (n_slots,) stack of unused block slots
    cdef intp_t n_blocks            # live blocks
    cdef intp_t n_spare             # unused slots on the spare stack
    cdef intp_t n_dims              # resource dimensions
    cdef readonly intp_t n_members  # hosts in the index

    cdef void insert(self, intp_t h) noexcept nogil
    cdef void remove(self, intp_t h) noexcept nogil
    cdef intp_t first_fit(self, const int64_t* request) noexcept nogil
    cdef intp_t last_fit(self, const int64_t* request) noexcept nogil
    cdef intp_t _locate(self, float64_t k, intp_t h) noexcept nogil
    cdef intp_t _position(self, intp_t b, float64_t k, intp_t h) noexcept nogil
    cdef void tighten(self, intp_t b) noexcept nogil
    cdef void note_fail(self, intp_t b, const int64_t* request) noexcept nogil
    cdef bint known_to_fail(self, intp_t b, const int64_t* request) noexcept nogil
    cdef void _recompute_max(self, intp_t b) noexcept nogil
    cdef void _lay_out(self, const intp_t* rows, intp_t n) noexcept nogil
    cdef void _touch(self, intp_t b) noexcept nogil
    cdef void _split(self, intp_t pos) noexcept nogil
    cdef void _drop_block(self, intp_t pos) noexcept nogil
    cdef void _merge_small(self, intp_t pos) noexcept nogil
    cdef void _absorb(self, intp_t pos) noexcept nogil
