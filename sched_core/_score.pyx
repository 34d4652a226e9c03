# cython: language_level=3
"""Scoring strategies, one cdef function each, over one host row.

binpack and spread share one key, the host's normalised free capacity

    free_key(h) = sum_d w_d * free[h, d] / ref_d

where ref_d is the cluster's largest allocatable capacity in dimension d
(0 skips the dimension). Because ref_d does not depend on the request, the
remaining capacity after placing request r, free_key(h) - sum_d w_d r_d / ref_d,
orders hosts exactly as free_key(h) does: best fit (binpack) is the feasible
host with the smallest key, least allocated (spread) the one with the largest.
That is what lets _index.FitIndex answer both without scanning every host.

balanced is the variance of a host's used fractions over the requested
dimensions after placement (Kubernetes NodeResourcesBalancedAllocation);
smaller is better.

dot is the dot product of the request and the host's free capacity, both
normalised (Panigrahy et al., "Heuristics for Vector Bin Packing", MSR 2011);
larger is better.
"""
from ._typedefs cimport int64_t, intp_t, float64_t


cdef float64_t free_key(const int64_t* free_row, const float64_t* inv_ref, intp_t n_dims) noexcept nogil:
    """sum_d free[d] * inv_ref[d], with inv_ref[d] = w_d / ref_d (0 for skipped dims)."""
    cdef float64_t key = 0.0
    cdef intp_t d
    for d in range(n_dims):
        key += <float64_t>free_row[d] * inv_ref[d]
    return key


cdef float64_t imbalance(const int64_t* used_row, const int64_t* limit_row, const int64_t* request,
                         intp_t n_dims) noexcept nogil:
    """Variance of (used + request) / limit over the dimensions the request uses.

    Dimensions the request does not use, or the host lacks, are left out, as
    Kubernetes counts only the resources a pod asks for. Range [0, 0.25].
    """
    cdef float64_t s = 0.0, s2 = 0.0, u
    cdef intp_t d, n = 0
    for d in range(n_dims):
        if request[d] > 0 and limit_row[d] > 0:
            u = <float64_t>(used_row[d] + request[d]) / <float64_t>limit_row[d]
            s += u
            s2 += u * u
            n += 1
    if n == 0:
        return 0.0
    return s2 / n - (s / n) * (s / n)


cdef float64_t alignment(const int64_t* free_row, const int64_t* request, const float64_t* inv_ref,
                         intp_t n_dims) noexcept nogil:
    """sum_d (request[d] * inv_ref[d]) * (free[d] * inv_ref[d])."""
    cdef float64_t s = 0.0
    cdef intp_t d
    for d in range(n_dims):
        s += (<float64_t>request[d] * inv_ref[d]) * (<float64_t>free_row[d] * inv_ref[d])
    return s


def _py_free_key(const int64_t[::1] free_row, const float64_t[::1] inv_ref):
    """Python wrapper used for testing."""
    return free_key(&free_row[0], &inv_ref[0], free_row.shape[0])


def _py_imbalance(const int64_t[::1] used_row, const int64_t[::1] limit_row, const int64_t[::1] request):
    """Python wrapper used for testing."""
    return imbalance(&used_row[0], &limit_row[0], &request[0], used_row.shape[0])


def _py_alignment(const int64_t[::1] free_row, const int64_t[::1] request, const float64_t[::1] inv_ref):
    """Python wrapper used for testing."""
    return alignment(&free_row[0], &request[0], &inv_ref[0], free_row.shape[0])
