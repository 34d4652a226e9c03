# cython: language_level=3
"""The keep-set construction's fill: the workloads of the hosts not kept move into the
kept hosts' room (hci_scheduler.rebalance.keepset).

One pass over the leaving workloads in the caller's order (largest first). Each goes to
the kept, open host it may use with the least normalised slack after it lands (best
fit), honouring capacity (a VM pays its request times the host's allocation ratio),
host conflicts of its service and dedicated tenants. One that fits no kept host opens
the allowed empty host with the most room (empty: nothing on it, none of its own still
to place); failing that its own host is kept, with every leaving workload still on it.

The numpy loop this replaces took 30-37 s on the 10,000-host Google cell (a Python round
trip per workload over every host); this nogil pass of O(leaving x hosts x dims) takes
about 2 s there. tests/rebalance/test_keepset.py keeps the numpy loop as the reference.
"""
import numpy as np
cimport numpy as cnp

from ._typedefs cimport int64_t, uint8_t, int32_t, intp_t, float64_t

cnp.import_array()


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


def keep_fill(const int64_t[:, ::1] capacity, int64_t[:, ::1] usage, const int64_t[:, ::1] ratio_milli,
              const int64_t[:, ::1] request, const uint8_t[::1] vm, const int32_t[::1] initial,
              const intp_t[::1] order, const intp_t[::1] home_ptr, const intp_t[::1] home_members,
              const uint8_t[:, ::1] allowed, const int32_t[::1] allowed_class, const uint8_t[::1] is_open,
              uint8_t[::1] kept, int32_t[::1] on, const int32_t[::1] service, const int32_t[::1] conflict_row,
              int32_t[:, ::1] conflict_count, const int32_t[::1] tenant, const uint8_t[::1] dedicated,
              int64_t[::1] owner, int64_t[::1] owned, const float64_t[::1] scale, int32_t[::1] assignment,
              int64_t max_moves=-1):
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
        per-dimension unit of the slack (the largest host's room).
    assignment : int32 (n,), in/out
        set to the target of every placed leaving workload.
    max_moves : int
        most workloads sent away from their host (-1: no cap).

    Returns
    -------
    int
        workloads moved, or -1 when `max_moves` would be exceeded (the arrays are then
        partly updated: the caller drops them).
    """
    cdef intp_t m = capacity.shape[0], d = capacity.shape[1], k = order.shape[0]
    cdef intp_t j, i, w, h, r, target, home, c, u
    cdef int64_t moves = 0, ch
    cdef double slack, best
    cdef bint ok
    cdef uint8_t[::1] done = np.zeros(request.shape[0], dtype=np.uint8)
    # Leaving workloads not yet placed, per home host: a host is opened only when truly
    # empty, since its own may still come back to it (kept after all).
    cdef int32_t[::1] pending = np.diff(np.asarray(home_ptr)).astype(np.int32)
    with nogil:
        for j in range(k):
            w = order[j]
            if done[w]:
                continue      # its host was kept after all: it stayed there
            home = initial[w]
            target = -1
            best = 0.0
            c = conflict_row[service[w]] if service[w] >= 0 else -1
            # Best fit among the kept hosts it may use: least slack left after it lands.
            for h in range(m):
                if not (kept[h] and is_open[h] and allowed[allowed_class[w], h]):
                    continue
                if c >= 0 and conflict_count[c, h] != 0:
                    continue
                if dedicated[w]:
                    if not (on[h] == 0 or (owner[h] == tenant[w] and owned[h] == on[h])):
                        continue
                elif owner[h] >= 0:
                    continue
                slack = 0.0
                ok = True
                for r in range(d):
                    ch = _charge(request, vm, ratio_milli, w, h, r)
                    if usage[h, r] + ch > capacity[h, r]:
                        ok = False
                        break
                    slack = slack + <double>(capacity[h, r] - usage[h, r] - ch) / scale[r]
                if ok and (target < 0 or slack < best):
                    target, best = h, slack
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
            if target >= 0:
                if target != home:
                    assignment[w] = <int32_t>target
                    moves += 1
                    if max_moves >= 0 and moves > max_moves:
                        break
                _add(w, target, request, vm, ratio_milli, usage, on, service, conflict_row, conflict_count,
                     tenant, dedicated, owner, owned)
                done[w] = 1
                pending[home] -= 1
            else:
                # Nowhere at all: its own host stays, with every leaving workload still on it.
                kept[home] = 1
                for i in range(home_ptr[home], home_ptr[home + 1]):
                    u = home_members[i]
                    if not done[u]:
                        _add(u, home, request, vm, ratio_milli, usage, on, service, conflict_row,
                             conflict_count, tenant, dedicated, owner, owned)
                        done[u] = 1
                pending[home] = 0
    return -1 if max_moves >= 0 and moves > max_moves else moves
