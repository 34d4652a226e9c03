# cython: language_level=3
"""Feasibility of one request against every host, with the first failing reason.

The reason codes (enum Reason) are declared in _filter.pxd, their one home; this
module writes REASON_OK, REASON_NOT_SCHEDULABLE and REASON_DIM + d, and the
constraint filters (_constraint.pyx) write the rest.
"""
from ._typedefs cimport int64_t, intp_t, uint8_t, int32_t


def filter_hosts(const int64_t[:, ::1] free, const int64_t[::1] request,
                 const uint8_t[::1] schedulable, int32_t[::1] reason_out):
    """Write the first failing reason of every host and return the feasible count.

    Parameters
    ----------
    free : int64 (n_rows, n_dims), C-contiguous
        Free capacity per host row.
    request : int64 (n_dims,)
    schedulable : uint8 (n_rows,)
        1 where the host may take new work.
    reason_out : int32 (n_rows,)
        Output: REASON_OK (0) where feasible, else REASON_NOT_SCHEDULABLE or
        REASON_DIM + d for the first dimension d that does not fit.
    """
    cdef intp_t n_rows = free.shape[0], n_dims = free.shape[1], h, d
    cdef intp_t n_feasible = 0
    cdef int32_t reason
    if request.shape[0] != n_dims or schedulable.shape[0] != n_rows or reason_out.shape[0] != n_rows:
        raise ValueError("filter_hosts: shapes of free, request, schedulable and reason_out disagree")
    with nogil:
        for h in range(n_rows):
            reason = REASON_OK
            if not schedulable[h]:
                reason = REASON_NOT_SCHEDULABLE
            else:
                # Cheapest test first: the state bit, then the resource arithmetic.
                for d in range(n_dims):
                    if free[h, d] < request[d]:
                        reason = REASON_DIM + <int32_t>d
                        break
            reason_out[h] = reason
            if reason == REASON_OK:
                n_feasible += 1
    return n_feasible
