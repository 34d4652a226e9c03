# Per-host resource state and the commit/release of one request. See _state.pyx.
from ._typedefs cimport int64_t, intp_t, uint8_t, float64_t
from ._index cimport FitIndex

cdef class HostState:
    cdef readonly intp_t n_rows      # host rows allocated (live or free for reuse)
    cdef readonly intp_t n_dims      # resource dimensions
    cdef int64_t[:, ::1] limit       # (n_rows, n_dims) schedulable limit: allocatable x allocation ratio
    cdef int64_t[:, ::1] used        # (n_rows, n_dims) sum of requests placed on the host
    cdef int64_t[:, ::1] free        # (n_rows, n_dims) limit - used, kept in step with used
    cdef int64_t[::1] load           # (n_rows,) number of workloads on the host
    cdef float64_t[::1] inv_ref      # (n_dims,) weight / reference capacity per dimension
    cdef float64_t[::1] ref          # (n_dims,) reference capacity (largest host limit) per dimension
    cdef float64_t key_scale         # sum_d inv_ref[d] * ref[d]: free_key of an empty largest host
    cdef readonly FitIndex index     # schedulable hosts ordered by free_key

    cdef void commit(self, intp_t h, const int64_t* request) noexcept nogil
    cdef void uncommit(self, intp_t h, const int64_t* request) noexcept nogil
