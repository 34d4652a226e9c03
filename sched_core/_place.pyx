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

from ._typedefs cimport int64_t, intp_t, uint8_t, uint64_t, float64_t, int32_t
from . cimport _filter, _score
from ._filter cimport fits
from ._score cimport imbalance, alignment
from ._state cimport HostState
from ._index cimport FitIndex

cnp.import_array()

# The core's codes as Python ints, under the names sched_core exports: the reason codes
# (declared in _filter.pxd) and the strategy codes (declared in _score.pxd), whose values
# hci_scheduler reads. The bare names here are these Python objects, so the C code of this
# module names a code by its home module: _score.BINPACK, _filter.REASON_OK.
REASON_OK = _filter.REASON_OK
REASON_NOT_SCHEDULABLE = _filter.REASON_NOT_SCHEDULABLE
REASON_SELECTOR = _filter.REASON_SELECTOR
REASON_KVM = _filter.REASON_KVM
REASON_TAINT = _filter.REASON_TAINT
REASON_TENANT = _filter.REASON_TENANT
REASON_VOLUME = _filter.REASON_VOLUME
REASON_NUMA = _filter.REASON_NUMA
REASON_DIM = _filter.REASON_DIM
REASON_AFFINITY = _filter.REASON_AFFINITY
REASON_ANTI_AFFINITY = _filter.REASON_ANTI_AFFINITY
REASON_SPREAD = _filter.REASON_SPREAD
MAX_TERMS = _filter.MAX_TERMS
BINPACK = _score.BINPACK
SPREAD = _score.SPREAD
BALANCED = _score.BALANCED
DOT = _score.DOT


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
    if strategy == _score.BINPACK:
        return s.index.first_fit(request)
    if strategy == _score.SPREAD:
        return s.index.last_fit(request)
    if strategy == _score.BALANCED:
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


# ---------------------------------------------------------------------------
# Placement under constraints (see _constraint.pyx). The cost of a host is the
# strategy's base cost in [0, 100] (binpack: normalised free capacity; spread:
# 100 minus it; balanced: 400 x variance; dot: 100 x (1 - normalised alignment),
# plus 200 for a host not yet in use) plus the soft-term penalty. The lowest
# cost wins, then the key order, then the lowest row. binpack and spread walk
# the index in key order and stop as soon as no later host can cost less
# (penalties are never negative), so the result equals a full scan.

from libc.math cimport INFINITY
from libc.string cimport memcpy
from ._constraint cimport (ConstraintState, Terms, bind_counters, reject, reject_dynamic, reject_restored, penalty,
                          prepare, count_in, numa_node, penalty_floor, penalty_monotone, static_ok)


cdef float64_t block_penalty_lb(FitIndex ix, ConstraintState cs, Terms t, intp_t b, float64_t floor) noexcept nogil:
    """The smallest penalty of block b's rows (floor, the least any host pays, ends the scan)."""
    cdef intp_t j
    cdef float64_t p, lb = INFINITY
    for j in range(ix.count[b]):
        p = penalty(cs, t, ix.items[b, j])
        if p < lb:
            lb = p
            if lb <= floor:
                break
    return lb


cdef inline intp_t next_fit(const intp_t* row, intp_t n, intp_t j, bint ascending, const int64_t* free0,
                           const int64_t* request, intp_t n_dims) noexcept nogil:
    """The first walk position >= j whose row fits `request` (n when none does)."""
    if ascending:
        while j < n and not fits(free0 + row[j] * n_dims, request, n_dims):
            j += 1
    else:
        while j < n and not fits(free0 + row[n - 1 - j] * n_dims, request, n_dims):
            j += 1
    return j


cdef inline float64_t key_cost(float64_t k, float64_t scale, bint ascending) noexcept nogil:
    """The strategy's base cost of a host with key k: binpack (ascending) the normalised
    free capacity, spread 100 minus it."""
    return k * scale if ascending else 100.0 - k * scale


cdef inline bint beats(float64_t cost, float64_t k, intp_t h, float64_t best_cost, float64_t best_key,
                       intp_t best, bint ascending) noexcept nogil:
    """Host h (cost, key k) is preferred to the candidate: lower cost; on equal cost the
    walk order decides for binpack (the candidate came first), for spread the larger
    key, then the lower row."""
    return cost < best_cost or (not ascending and cost == best_cost
                                and (k > best_key or (k == best_key and h < best)))


cdef inline bint cannot_beat(float64_t cost_lb, float64_t k, float64_t best_cost, float64_t best_key,
                             bint ascending) noexcept nogil:
    """No host whose cost is at least cost_lb and whose key is k or further along the walk
    can be preferred to the candidate."""
    if ascending:
        return cost_lb >= best_cost
    return cost_lb > best_cost or (cost_lb == best_cost and k < best_key)


cdef intp_t walk_index(HostState s, FitIndex ix, ConstraintState cs, Terms t, const int64_t* request,
                       bint ascending, int64_t* charge, int64_t* tmp,
                       float64_t* block_lb, uint64_t* block_lb_stamp) noexcept nogil:
    """Branch and bound over the index in key order (see the comment above).

    block_lb / block_lb_stamp (one entry per block slot of ix, or NULL) cache each block's
    least penalty with the block's stamp; the caller passes them only while penalties
    cannot fall (penalty_monotone), so a cached bound stays a bound until the block's
    rows change. A block whose least penalty keeps every row from beating the
    candidate is skipped whole, instead of pricing its rows one by one.
    """
    # A sub-index holds only hosts that pass t's static filters: check the rest only.
    cdef bint static_done = ix is not s.index
    cdef intp_t i, j, n, b, h, d, best = -1, n_dims = s.n_dims
    cdef float64_t k, kfar, cost, best_cost = INFINITY, best_key = 0.0, scale = 100.0 / s.key_scale
    cdef float64_t floor = penalty_floor(t)
    cdef bint blocked, found
    cdef const int64_t* free0 = &s.free[0, 0]
    cdef const float64_t* keys = &ix.key[0]
    cdef const intp_t* row
    cdef const int64_t* bound
    i = 0 if ascending else ix.n_blocks - 1
    while 0 <= i < ix.n_blocks:
        b = ix.order[i]
        i = i + 1 if ascending else i - 1
        if best >= 0:
            # Stop before the bound test too: the block's nearest key bounds all its costs.
            k = keys[ix.items[b, 0 if ascending else ix.count[b] - 1]]
            if cannot_beat(key_cost(k, scale, ascending) + floor, k, best_cost, best_key, ascending):
                return best
        blocked = False
        bound = &ix.maxfree[b, 0]
        for d in range(n_dims):
            if bound[d] < request[d]:
                blocked = True
                break
        if blocked or ix.known_to_fail(b, request):
            continue
        if best >= 0 and block_lb != NULL:
            if block_lb_stamp[b] != ix.stamp[b]:
                # Price the whole block only when the walk would cross all of it anyway.
                kfar = keys[ix.items[b, ix.count[b] - 1 if ascending else 0]]
                if not cannot_beat(key_cost(kfar, scale, ascending) + floor, kfar, best_cost, best_key, ascending):
                    block_lb[b] = block_penalty_lb(ix, cs, t, b, floor)
                    block_lb_stamp[b] = ix.stamp[b]
            if block_lb_stamp[b] == ix.stamp[b] and block_lb[b] > floor and cannot_beat(
                    key_cost(k, scale, ascending) + block_lb[b], k, best_cost, best_key, ascending):
                continue
        found = False
        row = &ix.items[b, 0]
        n = ix.count[b]
        j = 0  # walk position in the block: row[j] ascending, row[n - 1 - j] descending
        while j < n:
            if best < 0:
                # No candidate yet: most hosts walked past are too full, so skip them in a
                # tight loop. The raw request is a necessary condition (VMs pay at least it).
                j = next_fit(row, n, j, ascending, free0, request, n_dims)
                if j == n:
                    break
                h = row[j] if ascending else row[n - 1 - j]
                j += 1
            else:
                h = row[j] if ascending else row[n - 1 - j]
                j += 1
                k = keys[h]
                if cannot_beat(key_cost(k, scale, ascending) + floor, k, best_cost, best_key, ascending):
                    return best
                if not fits(free0 + h * n_dims, request, n_dims):
                    continue
            found = True
            k = keys[h]
            if best >= 0:
                # Behind a candidate, a host matters only if its cost can beat it: the
                # penalty (a few counter reads) settles that before the hard filters run.
                cost = key_cost(k, scale, ascending) + penalty(cs, t, h)
                if not beats(cost, k, h, best_cost, best_key, best, ascending):
                    continue
            if (reject_dynamic(s, cs, t, h, request, tmp) if static_done
                    else reject(s, cs, t, h, request, tmp)) != _filter.REASON_OK:
                continue
            if ascending and t.penalty_fixed:
                memcpy(charge, tmp, n_dims * sizeof(int64_t))
                return h  # every host pays the same penalty: the first fit in key order is the best fit
            if best < 0:
                cost = key_cost(k, scale, ascending) + penalty(cs, t, h)
            if best < 0 or beats(cost, k, h, best_cost, best_key, best, ascending):
                best, best_cost, best_key = h, cost, k
                memcpy(charge, tmp, n_dims * sizeof(int64_t))
        if not found:
            ix.tighten(b)  # scanned in vain: its bound was stale
            ix.note_fail(b, request)
    return best


cdef intp_t scan_constrained(HostState s, ConstraintState cs, Terms t, const int64_t* request, int strategy,
                             int64_t* charge, int64_t* tmp) noexcept nogil:
    cdef intp_t h, d, best = -1, n_dims = s.n_dims
    cdef float64_t cost, best_cost = INFINITY, align_max = 0.0
    cdef uint8_t[::1] member = s.index.member
    for d in range(n_dims):
        align_max += (<float64_t>request[d] * s.inv_ref[d]) * (s.ref[d] * s.inv_ref[d])
    for h in range(s.n_rows):
        if not member[h] or reject(s, cs, t, h, request, tmp) != _filter.REASON_OK:
            continue
        if strategy == _score.BALANCED:
            cost = 400.0 * imbalance(&s.used[h, 0], &s.limit[h, 0], tmp, n_dims)
        else:
            cost = 0.0 if s.load[h] > 0 else 200.0
            if align_max > 0:
                cost += 100.0 * (1.0 - alignment(&s.free[h, 0], tmp, &s.inv_ref[0], n_dims) / align_max)
        cost += penalty(cs, t, h)
        if best < 0 or cost < best_cost:
            best, best_cost = h, cost
            memcpy(charge, tmp, n_dims * sizeof(int64_t))
    return best


cdef intp_t select_constrained(HostState s, FitIndex ix, ConstraintState cs, Terms t, const int64_t* request,
                               int strategy, int64_t* charge, int64_t* tmp,
                               float64_t* block_lb=NULL, uint64_t* block_lb_stamp=NULL) noexcept nogil:
    """ix is the index to walk: s.index, or a sub-index of the hosts that pass t's static filters;
    block_lb / block_lb_stamp: see walk_index."""
    prepare(cs, t)
    if strategy == _score.BINPACK or strategy == _score.SPREAD:
        return walk_index(s, ix, cs, t, request, strategy == _score.BINPACK, charge, tmp, block_lb,
                          block_lb_stamp)
    return scan_constrained(s, cs, t, request, strategy, charge, tmp)


# A batch whose static filters (labels, kvm, taints, volume locality) turn many hosts
# away would walk past those hosts on every placement. Above this batch size the
# batch first files the hosts that pass them in a private FitIndex (O(n_hosts log n)
# once) and walks that, keeping it in step on every commit.
SUB_INDEX_MIN_BATCH = 64


def _static_sub_index(HostState s, ConstraintState cs, Terms t):
    """A FitIndex of the schedulable hosts that pass t's static filters, or None when all do."""
    cdef intp_t h, n_in = 0
    cdef uint8_t[::1] member = s.index.member
    keep = np.zeros(s.n_rows, dtype=np.uint8)
    cdef uint8_t[::1] keep_v = keep
    with nogil:
        for h in range(s.n_rows):
            if member[h] and static_ok(cs, t, h):
                keep_v[h] = 1
                n_in += 1
    if n_in == s.index.n_members:
        return None
    sub = FitIndex(s.free, s.inv_ref)
    sub.load_subset(s.index, keep)
    return sub


cdef inline bint numa_room(ConstraintState cs, intp_t h, intp_t node, const int64_t* charge) noexcept nogil:
    """Whether `node` is one of host h's NUMA nodes with room for the charge's cpu and memory."""
    if node < 0 or node >= cs.numa_n[h]:
        return False
    if cs.cpu_dim >= 0 and cs.numa_free[h, node, 0] < charge[cs.cpu_dim]:
        return False
    return cs.mem_dim < 0 or cs.numa_free[h, node, 1] >= charge[cs.mem_dim]


cdef int64_t commit_constrained(HostState s, ConstraintState cs, Terms t, intp_t h,
                                const int64_t* charge, bint refile=True, intp_t node=-1) noexcept nogil:
    """Charge host h, count the workload in its group and tenant; return its NUMA node or -1.

    node >= 0 is a NUMA node decided earlier (a replayed placement; the caller checked its
    room with numa_room), else the tightest-fitting node is chosen here.
    refile=False leaves h filed in s.index under its old key (still a valid upper bound
    there); the caller must re-file it before anything else reads that index's order."""
    cdef intp_t d
    if refile:
        s.commit(h, charge)
    else:
        for d in range(s.n_dims):
            s.used[h, d] += charge[d]
            s.free[h, d] -= charge[d]
        s.load[h] += 1
    count_in(cs, t, h, 1)
    if not t.numa:
        return -1
    if node < 0:
        node = numa_node(cs, h, charge)
        if node < 0:
            return -1  # no node has room (only a restore that skipped the check): none is charged
    if cs.cpu_dim >= 0:
        cs.numa_free[h, node, 0] -= charge[cs.cpu_dim]
    if cs.mem_dim >= 0:
        cs.numa_free[h, node, 1] -= charge[cs.mem_dim]
    return node


def place_rows_constrained(HostState s, ConstraintState cs, Terms t, const int64_t[:, ::1] requests,
                           const intp_t[::1] order, int strategy, int64_t[::1] host_out,
                           int64_t[:, ::1] charge_out, int64_t[::1] numa_out):
    """Place requests[order[i]] under the constraints `t`, committing each before the next.

    Parameters
    ----------
    s, cs : HostState, ConstraintState
    t : Terms
        The constraints every request shares (one workload spec, many replicas).
    requests : int64 (n, n_dims)
    order : intp (n_order,)
    strategy : int
    host_out : int64 (n,)
        Output: host row or -1.
    charge_out : int64 (n, n_dims)
        Output: what each placed request costs its host (VMs: request x ratio).
    numa_out : int64 (n,)
        Output: NUMA node used, -1 when none.

    Returns
    -------
    int
        Requests placed.
    """
    cdef intp_t n_dims = s.n_dims, i, r, h, n_placed = 0
    if requests.shape[1] != n_dims or host_out.shape[0] != requests.shape[0] \
            or charge_out.shape[0] != requests.shape[0] or charge_out.shape[1] != n_dims \
            or numa_out.shape[0] != requests.shape[0]:
        raise ValueError("place_rows_constrained: shapes disagree")
    bind_counters(cs, t)
    tmp = np.zeros(n_dims, dtype=np.int64)
    cdef int64_t[::1] tmp_v = tmp
    cdef FitIndex ix = s.index
    cdef bint use_sub = False
    if (strategy == _score.BINPACK or strategy == _score.SPREAD) and order.shape[0] >= SUB_INDEX_MIN_BATCH:
        sub = _static_sub_index(s, cs, t)
        if sub is not None:
            ix = sub
            use_sub = True
    # With a sub-index the batch walks only that one, so the main index is re-filed once
    # per touched host at the end rather than at every commit.
    touched = np.zeros(s.n_rows if use_sub else 0, dtype=np.uint8)
    cdef uint8_t[::1] touched_v = touched
    # Within a batch counters only grow: when that cannot lower any penalty, blocks keep
    # their least penalty between placements (see walk_index).
    cdef bint cache_lb = (t.has_soft and (strategy == _score.BINPACK or strategy == _score.SPREAD)
                          and penalty_monotone(cs, t))
    block_lb = np.zeros(ix.count.shape[0] if cache_lb else 1, dtype=np.float64)
    block_lb_stamp = np.zeros(ix.count.shape[0] if cache_lb else 1, dtype=np.uint64)
    cdef float64_t[::1] block_lb_v = block_lb
    cdef uint64_t[::1] block_lb_stamp_v = block_lb_stamp
    cdef float64_t* lb_ptr = &block_lb_v[0] if cache_lb else NULL
    cdef uint64_t* lb_stamp_ptr = &block_lb_stamp_v[0] if cache_lb else NULL
    with nogil:
        for i in range(order.shape[0]):
            r = order[i]
            h = select_constrained(s, ix, cs, t, &requests[r, 0], strategy, &charge_out[r, 0], &tmp_v[0],
                                   lb_ptr, lb_stamp_ptr)
            host_out[r] = h
            numa_out[r] = -1
            if h >= 0:
                if use_sub:
                    ix.remove(h)  # filed under its old key: take it out before free changes
                    if not touched_v[h]:
                        touched_v[h] = 1
                        s.index.remove(h)
                numa_out[r] = commit_constrained(s, cs, t, h, &charge_out[r, 0], not use_sub)
                if use_sub:
                    ix.insert(h)
                n_placed += 1
        if use_sub:
            for h in range(s.n_rows):
                if touched_v[h]:
                    s.index.insert(h)
    return n_placed


def check_host(HostState s, ConstraintState cs, Terms t, const int64_t[::1] request, intp_t h,
               int64_t[::1] charge_out, bint counters=True, bint tenancy=True):
    """Reason code for placing `request` on host row h (REASON_OK: it may go there; charge_out filled).

    counters=False skips hard affinity, anti-affinity and spread, and with tenancy=False
    tenant isolation too (see reject_restored); tenancy applies only with counters=False."""
    cdef int32_t code
    bind_counters(cs, t)
    with nogil:
        prepare(cs, t)
        if counters:
            code = reject(s, cs, t, h, &request[0], &charge_out[0])
        else:
            code = reject_restored(s, cs, t, h, &request[0], &charge_out[0], tenancy)
    return code


def commit_host(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t[::1] charge,
                int64_t numa=-1):
    """Commit a checked placement (see check_host); returns the NUMA node or -1.

    numa >= 0 commits a NUMA-fit workload on that node of host h (a decision replayed
    from the log, so the node is the one recorded, not chosen again); when h has no such
    node or it lacks room for the charge, returns -2 and commits nothing."""
    cdef int64_t node = -2
    bind_counters(cs, t)
    with nogil:
        if numa < 0 or not t.numa or numa_room(cs, h, numa, &charge[0]):
            node = commit_constrained(s, cs, t, h, &charge[0], True, numa if t.numa else -1)
    return node


def release_constrained(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t[::1] charge,
                        int64_t numa):
    """Undo commit_constrained (tenant marks are recomputed by the Python layer)."""
    bind_counters(cs, t)
    with nogil:
        s.uncommit(h, &charge[0])
        count_in(cs, t, h, -1)
        if numa >= 0:
            if cs.cpu_dim >= 0:
                cs.numa_free[h, numa, 0] += charge[cs.cpu_dim]
            if cs.mem_dim >= 0:
                cs.numa_free[h, numa, 1] += charge[cs.mem_dim]


def filter_constrained(HostState s, ConstraintState cs, Terms t, const int64_t[::1] request,
                       int32_t[::1] reason_out):
    """First failing reason per host row under the constraints (REASON_OK: feasible); returns the
    feasible count."""
    cdef intp_t h, n = 0
    cdef int32_t code
    if reason_out.shape[0] != s.n_rows:
        raise ValueError("filter_constrained: reason_out must have one entry per host row")
    tmp = np.zeros(s.n_dims, dtype=np.int64)
    cdef int64_t[::1] tmp_v = tmp
    bind_counters(cs, t)
    with nogil:
        prepare(cs, t)
        for h in range(s.n_rows):
            code = reject(s, cs, t, h, &request[0], &tmp_v[0])
            reason_out[h] = code
            if code == _filter.REASON_OK:
                n += 1
    return n


def penalties(HostState s, ConstraintState cs, Terms t, float64_t[::1] out):
    """Soft-term penalty per host row (for explanations and tests)."""
    cdef intp_t h
    bind_counters(cs, t)
    with nogil:
        prepare(cs, t)
        for h in range(s.n_rows):
            out[h] = penalty(cs, t, h)


def place_single(HostState s, ConstraintState cs, Terms t, const int64_t[::1] request, int strategy,
                 int64_t[::1] charge_out):
    """Place one request under `t`; returns (host row or -1, NUMA node or -1).

    The per-workload entry point of hci_scheduler's `place`: no temporary
    matrices, one call. charge_out (n_dims,) receives what the host is charged.
    """
    if request.shape[0] != s.n_dims or charge_out.shape[0] != s.n_dims:
        raise ValueError("place_single: request and charge_out need one entry per dimension")
    cdef int64_t tmp[64]
    cdef intp_t h
    cdef int64_t node = -1
    if s.n_dims > 64:
        raise ValueError("place_single: at most 64 dimensions")
    bind_counters(cs, t)
    with nogil:
        h = select_constrained(s, s.index, cs, t, &request[0], strategy, &charge_out[0], tmp)
        if h >= 0:
            node = commit_constrained(s, cs, t, h, &charge_out[0])
    return h, node
