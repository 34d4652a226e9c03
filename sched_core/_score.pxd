# Scoring strategies over one host row, and their codes. See _score.pyx for the formulas.
from ._typedefs cimport int64_t, intp_t, float64_t

cdef enum Strategy:
    # The strategy codes _place.select dispatches on. sched_core exports them as Python ints
    # and hci_scheduler.policy maps the names to them.
    BINPACK = 0       # best fit: smallest free_key first (FitIndex.first_fit)
    SPREAD = 1        # least allocated: largest free_key first (FitIndex.last_fit)
    BALANCED = 2      # smallest imbalance, over every schedulable host
    DOT = 3           # largest alignment among hosts in use, over every schedulable host

cdef float64_t free_key(const int64_t* free_row, const float64_t* inv_ref, intp_t n_dims) noexcept nogil
cdef float64_t imbalance(const int64_t* used_row, const int64_t* limit_row, const int64_t* request,
                         intp_t n_dims) noexcept nogil
cdef float64_t alignment(const int64_t* free_row, const int64_t* request, const float64_t* inv_ref,
                         intp_t n_dims) noexcept nogil
