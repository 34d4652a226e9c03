# cython: language_level=3
"""Select and commit: single, array and batch placement loops.

The stages, in the order they run for each request:
  1. filter  - only schedulable hosts are candidates (the FitIndex holds exactly
               those); then the resource fit, dimension by dimension. Cheap
               state test first, arithmetic second, as Nomad orders its checkers.
  2. score   - the strategy (see _score.pyx). binpack and spread read the
               index in key order, so filtering and scoring stop at the first
               host that fits; balanced and dot scan every schedulable host.
  3. select  - best score, ties to the lowest host row: the same input always
               gives the same placement.
  4. commit  - used/free/load updated in place and the host re-filed in the
               index, O(n_dims + log n_blocks + BLOCK).
"""
import numpy as np
cimport numpy as cnp

from ._typedefs cimport int64_t, intp_t, uint8_t, float64_t
from ._filter cimport fits
from ._score cimport imbalance, alignment
from ._state cimport HostState
from ._index cimport FitIndex

cnp.import_array()

# Strategy codes: hci_scheduler.policy maps names to these.
BINPACK = 0
SPREAD = 1
BALANCED = 2
DOT = 3


cdef intp_t scan_balanced(HostState s, const int64_t* request) noexcept nogil:
    """Feasible host whose used fractions are most even after placement."""
    cdef intp_t h, best = -1
    cdef float64_t v, best_v = 0.0
    cdef uint8_t[::1] member = s.index.member
    for h in range(s.n_rows):
        if not member[h] or not fits(&s.free[h, 0], request, s.n_dims):
            continue
        v = imbalance(&s.used[h, 0], &s.limit[h, 0], request, s.n_dims)
        if best < 0 or v < best_v:
            best = h
            best_v = v
    return best


cdef intp_t scan_dot(HostState s, const int64_t* request) noexcept nogil:
    """Feasible host with the largest request-free-capacity dot product.

    Hosts that already run work come first: an empty host is opened only when
    no used one fits, as in the item-centric heuristics of Panigrahy et al.
    (2011), which consider open bins before a new one.
    """
    cdef intp_t h, best = -1
    cdef bint best_open = False, is_open
    cdef float64_t v, best_v = 0.0
    cdef uint8_t[::1] member = s.index.member
    for h in range(s.n_rows):
        if not member[h] or not fits(&s.free[h, 0], request, s.n_dims):
            continue
        is_open = s.load[h] > 0
        if best_open and not is_open:
            continue
        v = alignment(&s.free[h, 0], request, &s.inv_ref[0], s.n_dims)
        if best < 0 or (is_open and not best_open) or v > best_v:
            best = h
            best_v = v
            best_open = is_open
    return best


cdef intp_t select(HostState s, const int64_t* request, int strategy) noexcept nogil:
    if strategy == 0:
        return s.index.first_fit(request)
    if strategy == 1:
        return s.index.last_fit(request)
    if strategy == 2:
        return scan_balanced(s, request)
    return scan_dot(s, request)


def select_host(HostState s, const int64_t[::1] request, int strategy):
    """The host row `strategy` would choose for `request`, or -1; commits nothing.

    Parameters
    ----------
    s : HostState
    request : int64 (n_dims,)
    strategy : int
        BINPACK, SPREAD, BALANCED or DOT.
    """
    if request.shape[0] != s.n_dims:
        raise ValueError(f"request has {request.shape[0]} dims, state has {s.n_dims}")
    cdef intp_t h
    with nogil:
        h = select(s, &request[0], strategy)
    return h


def place_one(HostState s, const int64_t[::1] request, int strategy):
    """Select a host for `request` and commit it there; return the row or -1."""
    if request.shape[0] != s.n_dims:
        raise ValueError(f"request has {request.shape[0]} dims, state has {s.n_dims}")
    cdef intp_t h
    with nogil:
        h = select(s, &request[0], strategy)
        if h >= 0:
            s.commit(h, &request[0])
    return h


def place_rows(HostState s, const int64_t[:, ::1] requests, const intp_t[::1] order,
               int strategy, int64_t[::1] host_out):
    """Place requests[order[i]] for i = 0.., committing each before the next.

    Parameters
    ----------
    s : HostState
    requests : int64 (n_workloads, n_dims), C-contiguous
    order : intp (n_order,)
        Rows of `requests` in the order to place them.
    strategy : int
    host_out : int64 (n_workloads,)
        Output: host row per placed request, -1 where nothing fit. Rows not in
        `order` are left untouched.

    Returns
    -------
    int
        Number of requests placed.
    """
    if requests.shape[1] != s.n_dims or host_out.shape[0] != requests.shape[0]:
        raise ValueError("place_rows: shapes of requests, host_out and state disagree")
    cdef intp_t i, r, h, n_placed = 0
    with nogil:
        for i in range(order.shape[0]):
            r = order[i]
            h = select(s, &requests[r, 0], strategy)
            host_out[r] = h
            if h >= 0:
                s.commit(h, &requests[r, 0])
                n_placed += 1
    return n_placed


def commit_rows(HostState s, const int64_t[:, ::1] requests, const int64_t[::1] hosts):
    """Charge requests[i] to hosts[i] for every i with hosts[i] >= 0, without checks.

    Used to apply an assignment computed elsewhere (the improver) after the
    caller verified it against `free`.
    """
    cdef intp_t i
    if requests.shape[0] != hosts.shape[0] or requests.shape[1] != s.n_dims:
        raise ValueError("commit_rows: shapes disagree")
    with nogil:
        for i in range(hosts.shape[0]):
            if hosts[i] >= 0:
                s.commit(hosts[i], &requests[i, 0])


def release_rows(HostState s, const int64_t[:, ::1] requests, const int64_t[::1] hosts,
                 const intp_t[::1] rows):
    """Give back requests[r] on hosts[r] for r in `rows` (hosts[r] must be >= 0)."""
    cdef intp_t i, r
    if requests.shape[0] != hosts.shape[0] or requests.shape[1] != s.n_dims:
        raise ValueError("release_rows: shapes disagree")
    with nogil:
        for i in range(rows.shape[0]):
            r = rows[i]
            s.uncommit(hosts[r], &requests[r, 0])
