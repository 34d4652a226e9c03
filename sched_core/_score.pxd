# Scoring strategies over one host row. See _score.pyx for the formulas.
from ._typedefs cimport int64_t, intp_t, float64_t

cdef float64_t free_key(const int64_t* free_row, const float64_t* inv_ref, intp_t n_dims) noexcept nogil
cdef float64_t imbalance(const int64_t* used_row, const int64_t* limit_row, const int64_t* request,
                         intp_t n_dims) noexcept nogil
cdef float64_t alignment(const int64_t* free_row, const int64_t* request, const float64_t* inv_ref,
                         intp_t n_dims) noexcept nogil
