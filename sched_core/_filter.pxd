# Feasibility of one request against hosts. See _filter.pyx for the reason codes.
from ._typedefs cimport int64_t, intp_t, uint8_t

cdef inline bint fits(const int64_t* free_row, const int64_t* request, intp_t n_dims) noexcept nogil:
    """True when every dimension of `request` fits in `free_row`."""
    cdef intp_t d
    for d in range(n_dims):
        if free_row[d] < request[d]:
            return False
    return True
