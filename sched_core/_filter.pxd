# Feasibility of one request against hosts, and the reason codes of every filter. See _filter.pyx.
from ._typedefs cimport int64_t, intp_t, uint8_t

cdef enum Reason:
    # The first filter a host fails, 0 when it passes them all. The codes are stable:
    # sched_core exports them as Python ints (REASON_*), hci_scheduler.explain turns them into text.
    REASON_OK = 0
    REASON_NOT_SCHEDULABLE = 1    # free row, cordoned, draining or down
    REASON_SELECTOR = 2           # node selector (label bits)
    REASON_KVM = 3                # a VM needs a host labelled kvm=true
    REASON_TAINT = 4              # an untolerated NoSchedule taint
    REASON_TENANT = 5             # tenant isolation
    REASON_VOLUME = 6             # volume locality: the host holds no replica
    REASON_NUMA = 7               # no NUMA node has room for the request
    REASON_DIM = 16               # + d: insufficient capacity in dimension d (the first that fails)
    REASON_AFFINITY = 64          # + i: hard affinity term i
    REASON_ANTI_AFFINITY = 96     # + i: hard anti-affinity term i
    REASON_SPREAD = 128           # + i: hard spread term i

cdef enum:
    MAX_TERMS = 32                # terms of each kind (affinity, anti-affinity, spread): the width of its
                                  # reason range above

cdef inline bint fits(const int64_t* free_row, const int64_t* request, intp_t n_dims) noexcept nogil:
    """True when every dimension of `request` fits in `free_row`."""
    cdef intp_t d
    for d in range(n_dims):
        if free_row[d] < request[d]:
            return False
    return True
