# cython: language_level=3
"""The keep-set construction's fill: the workloads that leave move into the kept hosts'
room (hci_scheduler.rebalance.keepset).

One pass over the leaving workloads in the caller's order (largest first, identical ones
together). Each goes to the kept, open host it may use whose remaining room has the
largest dot product with what it asks (the item-centric DotProduct rule of Panigrahy et
al., "Heuristics for Vector Bin Packing", 2011): a memory-heavy workload goes where memory
is left, so no dimension of a host is stranded while another fills (Google 1k cell
repacked into the covering keep-set: 614 hosts by best fit, 594 by this rule). Both
vectors are scaled by the host's capacity, or with `over_scale` by one unit for every
host (the largest host's room): over its own capacity a host of half the size scores a
request twice as high, so on mixed sizes the small hosts take the large requests first
and the large hosts' room is left to the small ones (Google 2011 cell: 584 hosts over
each capacity, 575 over one scale; keep-set of the Google 1k consolidation cell: 594,
588). With `least_stranding` (what the packer and the repack use) a host is scored by how
little the workload grows its stranded room, the room that load shaped like what is still
to place cannot use, so a memory-heavy workload goes where cpu runs out first, not where
the room is largest (Google 2011 cell: 568 hosts; 1k keep-set: 579). Capacity (a VM pays its request times the host's
allocation ratio), host conflicts of its service and dedicated tenants hold. One that
fits no kept host opens the allowed empty host with the most room (empty: nothing on it,
none of its own still to place); failing that its own host is kept, with every leaving
workload still on it (when that host is kept already, in a repack, the fill gives up).

The scores of a run of identical workloads live in a max-tree over the hosts: placing one
changes only its host's score, so a run costs O(hosts x dims) once and O(log hosts) per
workload (the 10,000-host cell: 187,272 workloads in about 2 s; the numpy loop this
replaces took 30-37 s for 73,000). tests/rebalance/test_keepset.py keeps a numpy
reference of the rule.
"""
import numpy as np
cimport numpy as cnp

from ._typedefs cimport int64_t, uint8_t, int32_t, intp_t, float64_t

cnp.import_array()

# Score of a host the workload may not use (below every real score).
cdef double NO_HOST = -1e300
# With `least_stranding`, the weight of the dot product beside the growth of the stranded
# room (both in units of the largest host): small, so that it mostly decides between hosts
# whose stranded room grows alike.
cdef double TIE_WEIGHT = 1e-3


cdef inline int64_t _charge(const int64_t[:, ::1] request, const uint8_t[::1] vm,
                            const int64_t[:, ::1] ratio_milli, intp_t w, intp_t h, intp_t r) noexcept nogil:
    """What workload w costs host h in dimension r: a VM its request x ratio (rounded
    up), a container its request (the placement core's rule)."""
    if vm[w]:
        return (request[w, r] * ratio_milli[h, r] + 999) // 1000
    return request[w, r]


cdef inline bint _fits(const int64_t[:, ::1] capacity, const int64_t[:, ::1] usage,
                       const int64_t[:, ::1] request, const uint8_t[::1] vm,
                       const int64_t[:, ::1] ratio_milli, intp_t w, intp_t h) noexcept nogil:
    cdef intp_t r
    for r in range(capacity.shape[1]):
        if usage[h, r] + _charge(request, vm, ratio_milli, w, h, r) > capacity[h, r]:
            return False
    return True


cdef inline void _tree_set(double[::1] val, intp_t[::1] idx, intp_t size, intp_t h, double score) noexcept nogil:
    """Set host h's score and restore the max (ties: the lower host) up to the root."""
    cdef intp_t i = size + h, a, b
    val[i] = score
    i //= 2
    while i >= 1:
        a, b = 2 * i, 2 * i + 1
        if val[b] > val[a] or (val[b] == val[a] and idx[b] < idx[a]):
            a = b
        val[i], idx[i] = val[a], idx[a]
        i //= 2


cdef inline bint _same(const int64_t[:, ::1] request, const uint8_t[::1] vm, const int32_t[::1] allowed_class,
                       const int32_t[::1] service, const int32_t[::1] tenant, intp_t a, intp_t b) noexcept nogil:
    """Whether workloads a and b score every host alike (one run)."""
    cdef intp_t r
    if vm[a] != vm[b] or allowed_class[a] != allowed_class[b] or service[a] != service[b] or tenant[a] != tenant[b]:
        return False
    for r in range(request.shape[1]):
        if request[a, r] != request[b, r]:
            return False
    return True


cdef void _add(intp_t w, intp_t h, const int64_t[:, ::1] request, const uint8_t[::1] vm,
               const int64_t[:, ::1] ratio_milli, int64_t[:, ::1] usage, int32_t[::1] on,
               const int32_t[::1] service, const int32_t[::1] conflict_row, int32_t[:, ::1] conflict_count,
               const int32_t[::1] tenant, const uint8_t[::1] dedicated, int64_t[::1] owner,
               int64_t[::1] owned) noexcept nogil:
    """Commit workload w on host h (usage, counts, conflicts, dedicated owner)."""
    cdef intp_t r, c
    for r in range(usage.shape[1]):
        usage[h, r] += _charge(request, vm, ratio_milli, w, h, r)
    on[h] += 1
    if service[w] >= 0:
        c = conflict_row[service[w]]
        if c >= 0:
            conflict_count[c, h] += 1
    if dedicated[w]:
        owner[h] = tenant[w]
        owned[h] += 1


cdef double _score(intp_t w, intp_t h, const int64_t[:, ::1] capacity, const int64_t[:, ::1] usage,
                   const int64_t[:, ::1] ratio_milli, const int64_t[:, ::1] request, const uint8_t[::1] vm,
                   const uint8_t[:, ::1] allowed, const int32_t[::1] allowed_class, const uint8_t[::1] is_open,
                   const uint8_t[::1] kept, const int32_t[::1] on, const int32_t[::1] service,
                   const int32_t[::1] conflict_row, const int32_t[:, ::1] conflict_count,
                   const int32_t[::1] tenant, const uint8_t[::1] dedicated, const int64_t[::1] owner,
                   const int64_t[::1] owned, const float64_t[::1] scale, bint best_fit,
                   bint over_scale, bint least_stranding, const double[::1] share) noexcept nogil:
    """Dot product of w's charge and h's room, each over h's capacity (with `over_scale`:
    each over `scale`; with `best_fit`: minus the room left after w, each dimension over
    `scale`; with `least_stranding`: minus the growth of h's stranded room, see
    `keep_fill`, the dot product over `scale` breaking ties); NO_HOST when w may not land
    on h (not kept, closed, not allowed, no room, conflict, dedicated tenant)."""
    cdef intp_t r, c
    cdef int64_t ch
    cdef double score = 0.0, before = 0.0, after = 0.0, least_before = 1e300, least_after = 1e300
    cdef double room_before, room_after
    if not (kept[h] and is_open[h] and allowed[allowed_class[w], h]):
        return NO_HOST
    c = conflict_row[service[w]] if service[w] >= 0 else -1
    if c >= 0 and conflict_count[c, h] != 0:
        return NO_HOST
    if dedicated[w]:
        if not (on[h] == 0 or (owner[h] == tenant[w] and owned[h] == on[h])):
            return NO_HOST
    elif owner[h] >= 0:
        return NO_HOST
    for r in range(capacity.shape[1]):
        ch = _charge(request, vm, ratio_milli, w, h, r)
        if usage[h, r] + ch > capacity[h, r]:
            return NO_HOST
        if best_fit:
            score = score - <double>(capacity[h, r] - usage[h, r] - ch) / scale[r]
        elif least_stranding:
            room_before = <double>(capacity[h, r] - usage[h, r]) / scale[r]
            room_after = <double>(capacity[h, r] - usage[h, r] - ch) / scale[r]
            score = score + (<double>ch / scale[r]) * room_before
            if share[r] > 0:
                before = before + room_before
                after = after + room_after
                least_before = min(least_before, room_before / share[r])
                least_after = min(least_after, room_after / share[r])
        elif over_scale:
            score = score + (<double>ch / scale[r]) * (<double>(capacity[h, r] - usage[h, r]) / scale[r])
        elif capacity[h, r] > 0:
            score = score + (<double>ch / capacity[h, r]) * (<double>(capacity[h, r] - usage[h, r]) / capacity[h, r])
    if least_stranding and least_before < 1e300:
        # Stranded room: what load shaped like the demand still to place cannot use.
        score = TIE_WEIGHT * score - ((after - least_after) - (before - least_before))
    return score


def keep_fill(const int64_t[:, ::1] capacity, int64_t[:, ::1] usage, const int64_t[:, ::1] ratio_milli,
              const int64_t[:, ::1] request, const uint8_t[::1] vm, const int32_t[::1] initial,
              const intp_t[::1] order, const intp_t[::1] home_ptr, const intp_t[::1] home_members,
              const uint8_t[:, ::1] allowed, const int32_t[::1] allowed_class, const uint8_t[::1] is_open,
              uint8_t[::1] kept, int32_t[::1] on, const int32_t[::1] service, const int32_t[::1] conflict_row,
              int32_t[:, ::1] conflict_count, const int32_t[::1] tenant, const uint8_t[::1] dedicated,
              int64_t[::1] owner, int64_t[::1] owned, const float64_t[::1] scale, int32_t[::1] assignment,
              int64_t max_moves=-1, bint leave_unfit=False, bint best_fit=False, bint over_scale=False,
              bint least_stranding=False):
    """Place the leaving workloads `order` into the kept hosts; the state arrays are updated.

    Parameters
    ----------
    capacity, ratio_milli : int64 (m, d) C-contiguous
        hard limit and allocation ratio x 1000 per host.
    usage : int64 (m, d), in/out
        load on each host (fixed load plus the workloads that stay).
    request : int64 (n, d); vm : uint8 (n,); initial : int32 (n,)
    order : intp (k,)
        the leaving workloads, in the order they are placed.
    home_ptr : intp (m + 1,); home_members : intp (k,)
        CSR of the leaving workloads by initial host (a host kept after all takes them back).
    allowed : uint8 (classes, m); allowed_class : int32 (n,); is_open : uint8 (m,)
    kept : uint8 (m,), in/out
        hosts kept; an opened or kept-after-all host is set.
    on : int32 (m,), in/out
        workloads per host.
    service : int32 (n,) (-1: none); conflict_row : int32 (s,)
        row of each conflicting service in `conflict_count` (-1: no conflict).
    conflict_count : int32 (c, m), in/out
    tenant : int32 (n,); dedicated : uint8 (n,)
        whether the workload's tenant is dedicated.
    owner, owned : int64 (m,), in/out
        dedicated tenant on each host (-1: none) and how many of its workloads are there.
    scale : float64 (d,)
        per-dimension unit of the room left (the largest host's room): best fit's score,
        and which empty host has the most room.
    assignment : int32 (n,), in/out
        set to the target of every placed leaving workload.
    max_moves : int
        most workloads sent away from their host (-1: no cap).
    over_scale : bool
        scale charge and room by `scale` in the dot product, not by each host's capacity.
    least_stranding : bool
        score hosts by how little the workload grows their stranded room (room, each
        dimension over `scale`, that load shaped like the leaving workloads still to place
        cannot use: the room summed over dimensions minus the most of that shape it takes),
        ties by the dot product over `scale`. The shape is that of the workloads still to
        place, taken at the start of each run of identical ones.
    best_fit : bool
        score hosts by the room left after the workload lands (least first: best fit),
        not by the dot product: the keep-set within a move budget, which fills the gaps of
        hosts already loaded (Google 10k cell, 5 % budget: 425 hosts freed by best fit, 407
        by the dot product).
    leave_unfit : bool
        a workload that fits nowhere, not even on an empty host, stays where it is (the
        batch packer's rows, which have no host yet: their `initial` is a closed row).

    Returns
    -------
    int
        workloads moved; -1 when `max_moves` would be exceeded, -2 when a workload fits
        nowhere and its own host already took others (the arrays are then partly
        updated: the caller drops them).
    """
    cdef intp_t m = capacity.shape[0], d = capacity.shape[1], k = order.shape[0]
    cdef intp_t j, i, w, h, r, target, home, u, prev = -1
    cdef int64_t moves = 0
    cdef double slack, best, total
    cdef bint stale = True, failed = False
    # Demand still to place per dimension (requests of the leaving workloads not yet placed),
    # and its shape over `scale`, summing to 1 (the stranding rule's reference).
    remaining_np = np.zeros(d, dtype=np.float64)
    if least_stranding and k:
        remaining_np = np.asarray(request, dtype=np.float64)[np.asarray(order)].sum(axis=0)
    cdef double[::1] remaining = remaining_np
    cdef double[::1] share = np.zeros(d, dtype=np.float64)
    cdef uint8_t[::1] done = np.zeros(request.shape[0], dtype=np.uint8)
    # Leaving workloads not yet placed, per home host: a host is opened only when truly
    # empty, since its own may still come back to it (kept after all).
    cdef int32_t[::1] pending = np.diff(np.asarray(home_ptr)).astype(np.int32)
    cdef intp_t size = 1
    while size < max(m, 1):
        size *= 2
    cdef double[::1] tree_val = np.full(2 * size, NO_HOST)
    # Leaves beyond the hosts rank last on ties (index m).
    leaf = np.full(2 * size, m, dtype=np.intp)
    leaf[size:size + m] = np.arange(m, dtype=np.intp)
    cdef intp_t[::1] tree_idx = leaf
    with nogil:
        for j in range(k):
            w = order[j]
            if done[w]:
                continue      # its host was kept after all: it stayed there
            home = initial[w]
            if stale or prev < 0 or not _same(request, vm, allowed_class, service, tenant, w, prev):
                # A new run: score every host for it.
                if least_stranding:
                    total = 0.0
                    for r in range(d):
                        total = total + max(remaining[r], 0.0) / scale[r]
                    for r in range(d):
                        share[r] = max(remaining[r], 0.0) / scale[r] / total if total > 0 else 0.0
                for h in range(m):
                    tree_val[size + h] = _score(w, h, capacity, usage, ratio_milli, request, vm, allowed,
                                                allowed_class, is_open, kept, on, service, conflict_row,
                                                conflict_count, tenant, dedicated, owner, owned, scale, best_fit, over_scale,
                                                least_stranding, share)
                for i in range(size - 1, 0, -1):
                    if tree_val[2 * i + 1] > tree_val[2 * i] or (
                            tree_val[2 * i + 1] == tree_val[2 * i] and tree_idx[2 * i + 1] < tree_idx[2 * i]):
                        tree_val[i], tree_idx[i] = tree_val[2 * i + 1], tree_idx[2 * i + 1]
                    else:
                        tree_val[i], tree_idx[i] = tree_val[2 * i], tree_idx[2 * i]
                stale = False
            prev = w
            target = tree_idx[1] if tree_val[1] > NO_HOST else -1
            if target < 0:
                # It fits nowhere kept: open the allowed empty host with the most room.
                for h in range(m):
                    if kept[h] or not is_open[h] or not allowed[allowed_class[w], h]:
                        continue
                    if on[h] != 0 or pending[h] != 0:
                        continue
                    if not _fits(capacity, usage, request, vm, ratio_milli, w, h):
                        continue
                    slack = 0.0
                    for r in range(d):
                        slack = slack + <double>(capacity[h, r] - usage[h, r]) / scale[r]
                    if target < 0 or slack > best:
                        target, best = h, slack
                if target >= 0:
                    kept[target] = 1
                stale = True      # a host opened or kept after all: score the hosts again
            if target >= 0:
                if target != home:
                    assignment[w] = <int32_t>target
                    moves += 1
                    if max_moves >= 0 and moves > max_moves:
                        break
                _add(w, target, request, vm, ratio_milli, usage, on, service, conflict_row, conflict_count,
                     tenant, dedicated, owner, owned)
                done[w] = 1
                for r in range(d):
                    remaining[r] -= request[w, r]
                pending[home] -= 1
                if not stale:
                    _tree_set(tree_val, tree_idx, size, target,
                              _score(w, target, capacity, usage, ratio_milli, request, vm, allowed, allowed_class,
                                     is_open, kept, on, service, conflict_row, conflict_count, tenant,
                                     dedicated, owner, owned, scale, best_fit, over_scale,
                                                least_stranding, share))
            elif leave_unfit:
                continue          # fits nowhere at all: it stays unplaced
            elif kept[home]:
                # Nowhere at all, and its own host already takes others (a repack): give up.
                failed = True
                break
            else:
                # Nowhere at all: its own host stays, with every leaving workload still on it.
                kept[home] = 1
                for i in range(home_ptr[home], home_ptr[home + 1]):
                    u = home_members[i]
                    if not done[u]:
                        _add(u, home, request, vm, ratio_milli, usage, on, service, conflict_row,
                             conflict_count, tenant, dedicated, owner, owned)
                        done[u] = 1
                        for r in range(d):
                            remaining[r] -= request[u, r]
                pending[home] = 0
    if failed:
        return -2
    return -1 if max_moves >= 0 and moves > max_moves else moves
