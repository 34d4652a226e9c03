# cython: language_level=3
"""MoveState: incremental evaluation of shift and swap moves on a rebalancing problem.

The state holds what the cost and the hard constraints of hci_scheduler.rebalance.Problem
depend on (usage per host with the transient load held on initial hosts, workloads per
host, dedicated-tenant counts, moved counts per service with a histogram so the largest
updates in O(1), per-location counts of spread services, per-neighbourhood counts of
services with dependencies), so a shift costs O(d + balance terms) plus the members of
its service (conflict) and the dependency lists; a swap twice that. apply_shift is the
one path that changes the state. The plain-numpy reference is
hci_scheduler.rebalance.objective; tests compare the two.

Feasibility of a move is judged on the state after it, at the places it changes: the
target's capacity (the source only gets lighter), open and allowed hosts, pins,
conflict on the target, the service's spread, dependencies in both neighbourhoods, and
dedicated tenants. A state that already breaks a constraint somewhere else (a drain's
start) still gets exact deltas; the repair moves workloads off the broken hosts.
"""
import numpy as np
cimport numpy as cnp

from ._search_util cimport _below, _next, _now
from ._typedefs cimport int64_t, uint64_t, uint8_t, int32_t, intp_t, float64_t

cnp.import_array()

cdef int64_t INF = 1 << 62


def _csr(keys, n_keys):
    """(ptr, members) int32: members of each key 0..n_keys-1 in index order."""
    keys = np.asarray(keys, dtype=np.int64)
    ok = keys >= 0
    order = np.flatnonzero(ok)[np.argsort(keys[ok], kind="stable")]
    counts = np.bincount(keys[ok], minlength=n_keys)
    ptr = np.zeros(n_keys + 1, np.int32)
    np.cumsum(counts, out=ptr[1:])
    return ptr, order.astype(np.int32)


cdef class MoveState:
    """Incremental cost and feasibility of moves from `assignment`.

    Parameters
    ----------
    p : hci_scheduler.rebalance.Problem
        the problem (its arrays are copied once, as contiguous typed arrays).
    assignment : int (n,)
        host of each workload to start from (may break hard constraints: a drain).
    max_moves : int
        most workloads away from their initial host a move may leave (-1: no cap).
    seed : int
        seed of the generator `local_search` draws moves from.
    """

    def __init__(self, p, assignment, intp_t max_moves=-1, uint64_t seed=0):
        m, d = p.capacity.shape
        n = p.request.shape[0]
        s = p.n_services
        self.n_hosts, self.n_dims, self.n_workloads, self.n_services = m, d, n, s
        u8 = lambda a: np.ascontiguousarray(a, dtype=np.uint8)
        i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)
        i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)
        self.cap, self.target, self.ratio = i64(p.capacity), i64(p.target), i64(p.ratio_milli)
        self.request = i64(p.request)
        self.has_mmc = p.move_cost_matrix is not None
        self.mmc = i64(p.move_cost_matrix) if self.has_mmc else np.zeros((1, 1), np.int64)
        self.loc_move_cost = p.location_move_cost
        self.allowed = u8(p.allowed)
        self.is_open, self.vm, self.movable = u8(p.open), u8(p.vm), u8(p.movable)
        self.conflict, self.transient, self.dedicated = u8(p.conflict), u8(p.transient), u8(p.dedicated)
        self.allowed_class, self.service, self.tenant = i32(p.allowed_class), i32(p.service), i32(p.tenant)
        self.location, self.nbh, self.initial = i32(p.location), i32(p.neighbourhood), i32(p.initial)
        self.spread_min = i32(p.spread_min)
        self.host_cost, self.move_cost = i64(p.host_cost), i64(p.move_cost)
        self.load_weight, self.group_w = i64(p.load_weight), i64(p.group_move_weight)
        bal = np.array([tuple(b) for b in p.balance], dtype=np.int64).reshape(-1, 4)
        self.n_bal = bal.shape[0]
        self.bal_a, self.bal_b = i32(bal[:, 0]), i32(bal[:, 1])
        self.bal_t, self.bal_w = i64(bal[:, 2]), i64(bal[:, 3])
        self.pmw, self.smw, self.mmw = p.process_move_weight, p.service_move_weight, p.machine_move_weight
        self.svc_ptr, self.svc_members = _csr(p.service, s)
        dep = np.asarray(p.depends, dtype=np.int64).reshape(-1, 2)
        dep = dep[dep[:, 0] != dep[:, 1]]
        self.has_dep = dep.shape[0] > 0
        ptr, order = _csr(dep[:, 0], s)
        self.needs_ptr, self.needs = ptr, i32(dep[order, 1])
        ptr, order = _csr(dep[:, 1], s)
        self.needed_ptr, self.needed_by = ptr, i32(dep[order, 0])
        # Open hosts each class may use, so a random shift never draws a forbidden host.
        ok = np.asarray(p.allowed, bool) & np.asarray(p.open, bool)[None, :]
        k_rows, hosts = np.nonzero(ok)
        ptr = np.zeros(ok.shape[0] + 1, np.int32)
        np.cumsum(ok.sum(axis=1), out=ptr[1:])
        self.class_ptr, self.class_hosts = ptr, i32(hosts)
        self.movable_idx = i32(np.flatnonzero(p.movable))
        spread = np.flatnonzero(np.asarray(p.spread_min) >= 2)
        row = np.full(s, -1, np.int32)
        row[spread] = np.arange(spread.size, dtype=np.int32)
        self.spread_row = row
        n_loc = int(p.location.max()) + 1 if m else 1
        n_nbh = int(p.neighbourhood.max()) + 1 if m else 1
        self.loc_count = np.zeros((max(spread.size, 1), n_loc), np.int32)
        self.covered = np.zeros(s, np.int32)
        self.nbh_count = np.zeros((s if self.has_dep else 1, n_nbh if self.has_dep else 1), np.int32)
        ref = np.maximum(np.asarray(p.capacity).max(axis=0), 1).astype(np.float64)
        self.size = np.ascontiguousarray((np.asarray(p.request) / ref).sum(axis=1), dtype=np.float64)
        self.scratch = np.zeros(4 * max(d, 1), np.int64)
        self.max_moves = max_moves
        self.rng = seed * <uint64_t>0x9E3779B97F4A7C15 + <uint64_t>0x2545F4914F6CDD1D
        # State: start from an empty cluster holding only `fixed`, then place each workload
        # on its initial host and shift it to its assigned one (the one update path).
        a = np.asarray(assignment, dtype=np.int64)
        if a.shape != (n,) or (n and (a.min() < 0 or a.max() >= m)):
            raise ValueError(f"assignment: expected {n} host indices in [0, {m})")
        self.cur = i32(p.initial).copy()
        self.use = i64(p.fixed).copy()
        self.hold = np.zeros((m, d), np.int64)
        self.n_on = np.zeros(m, np.int32)
        self.ded_n = np.zeros(m, np.int32)
        self.ded_t = np.full(m, -1, np.int32)
        self.hostobj = np.zeros(m, np.int64)
        self.moved_svc = np.zeros(max(s, 1), np.int32)
        self.hist = np.zeros(n + 2, np.int32)
        self.hist[0] = s
        self.host_sum = self.pm_sum = self.mm_sum = self.gm_sum = 0
        self.max_moved = 0
        self.n_moved = 0
        self._place_initial()
        cdef intp_t w
        for w in range(n):
            if a[w] != self.cur[w]:
                self.apply_shift(w, a[w])
        self._dedicated_owner()

    cdef void _dedicated_owner(self) noexcept nogil:
        """Re-derive each host's dedicated tenant from scratch: after a sequence of shifts
        through states that break isolation (a restore, the start) the last arrival's tenant
        need not be the one left."""
        cdef intp_t w, t
        for w in range(self.n_workloads):
            t = self.tenant[w]
            if t >= 0 and self.dedicated[t]:
                self.ded_t[self.cur[w]] = t

    cdef void _place_initial(self) noexcept:
        cdef intp_t w, h, r, sv, t
        for w in range(self.n_workloads):
            h = self.initial[w]
            for r in range(self.n_dims):
                self.use[h, r] += self.charge(w, h, r)
            self.n_on[h] += 1
            t = self.tenant[w]
            if t >= 0 and self.dedicated[t]:
                self.ded_n[h] += 1
                self.ded_t[h] = t
            sv = self.service[w]
            if sv >= 0:
                if self.spread_row[sv] >= 0:
                    self.loc_count[self.spread_row[sv], self.location[h]] += 1
                    if self.loc_count[self.spread_row[sv], self.location[h]] == 1:
                        self.covered[sv] += 1
                if self.has_dep:
                    self.nbh_count[sv, self.nbh[h]] += 1
        for h in range(self.n_hosts):
            self.hostobj[h] = self.host_obj_with(h, &self.use[h, 0], self.n_on[h])
            self.host_sum += self.hostobj[h]

    # -- costs ---------------------------------------------------------------------

    cdef int64_t charge(self, intp_t w, intp_t h, intp_t r) noexcept nogil:
        """A VM pays request x ratio / 1000 rounded up, a container its request."""
        cdef int64_t q = self.request[w, r]
        if self.vm[w]:
            return (q * self.ratio[h, r] + 999) // 1000
        return q

    cdef int64_t host_obj_with(self, intp_t h, const int64_t* u, int32_t n_on) noexcept nogil:
        """host_cost (when used) + load cost + balance cost of host h with usage u."""
        cdef int64_t c = self.host_cost[h] if n_on > 0 else 0
        cdef int64_t x
        cdef intp_t r, b
        for r in range(self.n_dims):
            x = u[r] - self.target[h, r]
            if x > 0:
                c += self.load_weight[r] * x
        for b in range(self.n_bal):
            x = (self.bal_t[b] * (self.cap[h, self.bal_a[b]] - u[self.bal_a[b]])
                 - (self.cap[h, self.bal_b[b]] - u[self.bal_b[b]]))
            if x > 0:
                c += self.bal_w[b] * x
        return c

    cdef int64_t mm(self, intp_t a, intp_t b) noexcept nogil:
        if self.has_mmc:
            return self.mmc[a, b]
        return self.loc_move_cost if self.location[a] != self.location[b] else 0

    cdef int64_t objective(self) noexcept nogil:
        return (self.host_sum + self.pmw * self.pm_sum + self.smw * self.max_moved
                + self.mmw * self.mm_sum + self.gm_sum)

    cdef void _svc_moved(self, intp_t sv, int32_t step) noexcept nogil:
        """moved_svc[sv] += step (+-1), keeping the histogram and its max."""
        cdef int32_t k = self.moved_svc[sv]
        self.hist[k] -= 1
        self.hist[k + step] += 1
        self.moved_svc[sv] = k + step
        if k + step > self.max_moved:
            self.max_moved = k + step
        elif self.hist[self.max_moved] == 0:
            self.max_moved -= 1

    # -- feasibility pieces ----------------------------------------------------------

    cdef bint _conflict_free(self, intp_t sv, intp_t h, intp_t skip1, intp_t skip2) noexcept nogil:
        """No workload of conflict service sv other than skip1/skip2 sits on h."""
        cdef intp_t i, v
        if sv < 0 or not self.conflict[sv]:
            return True
        for i in range(self.svc_ptr[sv], self.svc_ptr[sv + 1]):
            v = self.svc_members[i]
            if v != skip1 and v != skip2 and self.cur[v] == h:
                return False
        return True

    cdef bint _spread_ok(self, intp_t sv, intp_t a, intp_t b) noexcept nogil:
        """Moving one workload of sv from host a to host b keeps its spread (or does not
        lower an already short one)."""
        cdef intp_t row, la, lb
        cdef int32_t after
        if sv < 0 or self.spread_row[sv] < 0:
            return True
        la, lb = self.location[a], self.location[b]
        if la == lb:
            return True
        row = self.spread_row[sv]
        after = self.covered[sv] - (self.loc_count[row, la] == 1) + (self.loc_count[row, lb] == 0)
        return after >= self.spread_min[sv] or after >= self.covered[sv]

    cdef int32_t _nb_count(self, intp_t sv, intp_t nb, const int32_t* cs, const int32_t* cn,
                                  const int32_t* cd, int nc) noexcept nogil:
        cdef int32_t c = self.nbh_count[sv, nb]
        cdef int i
        for i in range(nc):
            if cs[i] == sv and cn[i] == nb:
                c += cd[i]
        return c

    cdef bint _dep_ok(self, const int32_t* cs, const int32_t* cn, const int32_t* cd, int nc) noexcept nogil:
        """Dependencies hold after the (service, neighbourhood, +-1) count changes given:
        a service entering a neighbourhood finds what it needs there; a service leaving one
        for good leaves behind no service that needs it."""
        cdef int i
        cdef intp_t j, sv, nb
        for i in range(nc):
            sv, nb = cs[i], cn[i]
            if cd[i] > 0:
                for j in range(self.needs_ptr[sv], self.needs_ptr[sv + 1]):
                    if self._nb_count(self.needs[j], nb, cs, cn, cd, nc) <= 0:
                        return False
            elif self._nb_count(sv, nb, cs, cn, cd, nc) == 0:
                for j in range(self.needed_ptr[sv], self.needed_ptr[sv + 1]):
                    if self._nb_count(self.needed_by[j], nb, cs, cn, cd, nc) > 0:
                        return False
        return True

    cdef bint _dedicated_ok(self, intp_t h, intp_t leaving, intp_t arriving) noexcept nogil:
        """Host h keeps tenant isolation when `leaving` (-1: none) leaves and `arriving` comes."""
        cdef int32_t t = self.tenant[arriving]
        cdef bint arr_d = t >= 0 and self.dedicated[t]
        cdef bint leave_d = leaving >= 0 and self.tenant[leaving] >= 0 and self.dedicated[self.tenant[leaving]]
        cdef int32_t n = self.n_on[h] - (leaving >= 0) + 1
        cdef int32_t rest_d = self.ded_n[h] - leave_d
        if rest_d > 0 and (not arr_d or self.ded_t[h] != t):
            return False
        if arr_d and rest_d + 1 != n:
            return False
        return True

    # -- moves -------------------------------------------------------------------------

    cdef bint shift_eval(self, intp_t w, intp_t b, int64_t* delta) noexcept nogil:
        """Whether moving w to host b keeps every hard constraint; delta of the objective."""
        cdef intp_t a = self.cur[w], i = self.initial[w], sv = self.service[w], r
        cdef int64_t* ua = &self.scratch[0]
        cdef int64_t* ub = &self.scratch[self.n_dims]
        cdef int64_t cb, dl = 0
        cdef int32_t k, newmax
        cdef int32_t cs[2]
        cdef int32_t cn[2]
        cdef int32_t cd[2]
        if a == b or not self.movable[w] or not self.is_open[b] or not self.allowed[self.allowed_class[w], b]:
            return False
        if a == i and self.max_moves >= 0 and self.n_moved >= self.max_moves:
            return False
        for r in range(self.n_dims):
            cb = self.charge(w, b, r)
            ub[r] = self.use[b, r] + cb
            # Back on its initial host, a transient dimension's load is already held there.
            if self.use[b, r] + self.hold[b, r] + (0 if (b == i and self.transient[r]) else cb) > self.cap[b, r]:
                return False
            ua[r] = self.use[a, r] - self.charge(w, a, r)
        if not self._conflict_free(sv, b, w, -1) or not self._dedicated_ok(b, -1, w):
            return False
        if not self._spread_ok(sv, a, b):
            return False
        if self.has_dep and sv >= 0 and self.nbh[a] != self.nbh[b]:
            cs[0], cn[0], cd[0] = sv, self.nbh[a], -1
            cs[1], cn[1], cd[1] = sv, self.nbh[b], 1
            if not self._dep_ok(cs, cn, cd, 2):
                return False
        dl = (self.host_obj_with(a, ua, self.n_on[a] - 1) - self.hostobj[a]
              + self.host_obj_with(b, ub, self.n_on[b] + 1) - self.hostobj[b])
        dl += self.mmw * (self.mm(i, b) - self.mm(i, a))
        if a == i:
            dl += self.pmw * self.move_cost[w]
            if sv >= 0:
                dl += self.group_w[sv]
                k = self.moved_svc[sv]
                if k + 1 > self.max_moved:
                    dl += self.smw
        elif b == i:
            dl -= self.pmw * self.move_cost[w]
            if sv >= 0:
                dl -= self.group_w[sv]
                k = self.moved_svc[sv]
                if k == self.max_moved and self.hist[k] == 1:
                    dl -= self.smw
        delta[0] = dl
        return True

    cdef bint swap_eval(self, intp_t w1, intp_t w2, int64_t* delta) noexcept nogil:
        """Whether exchanging the hosts of w1 and w2 keeps every hard constraint; delta."""
        cdef intp_t a = self.cur[w1], b = self.cur[w2], i1 = self.initial[w1], i2 = self.initial[w2]
        cdef intp_t s1 = self.service[w1], s2 = self.service[w2], r
        cdef int64_t* ua = &self.scratch[0]
        cdef int64_t* ub = &self.scratch[self.n_dims]
        cdef int64_t in_a, out_a, in_b, out_b, dl
        cdef intp_t dmoved
        cdef int32_t old_max
        cdef int32_t cs[4]
        cdef int32_t cn[4]
        cdef int32_t cd[4]
        if a == b or not self.movable[w1] or not self.movable[w2]:
            return False
        if not self.is_open[a] or not self.is_open[b]:
            return False
        if not self.allowed[self.allowed_class[w1], b] or not self.allowed[self.allowed_class[w2], a]:
            return False
        dmoved = (a == i1) + (b == i2) - (b == i1) - (a == i2)
        if dmoved > 0 and self.max_moves >= 0 and self.n_moved + dmoved > self.max_moves:
            return False
        for r in range(self.n_dims):
            out_a, in_a = self.charge(w1, a, r), self.charge(w2, a, r)
            out_b, in_b = self.charge(w2, b, r), self.charge(w1, b, r)
            ua[r] = self.use[a, r] - out_a + in_a
            ub[r] = self.use[b, r] - out_b + in_b
            if self.transient[r]:
                # What leaves its initial host stays held there; what returns is held already.
                if a == i1:
                    out_a = 0
                if a == i2:
                    in_a = 0
                if b == i2:
                    out_b = 0
                if b == i1:
                    in_b = 0
            if self.use[a, r] + self.hold[a, r] - out_a + in_a > self.cap[a, r]:
                return False
            if self.use[b, r] + self.hold[b, r] - out_b + in_b > self.cap[b, r]:
                return False
        if s1 != s2:
            if not self._conflict_free(s1, b, w1, w2) or not self._conflict_free(s2, a, w1, w2):
                return False
            if not self._spread_ok(s1, a, b) or not self._spread_ok(s2, b, a):
                return False
            if self.has_dep and self.nbh[a] != self.nbh[b]:
                cs[0], cn[0], cd[0] = s1, self.nbh[a], -1
                cs[1], cn[1], cd[1] = s1, self.nbh[b], 1
                cs[2], cn[2], cd[2] = s2, self.nbh[b], -1
                cs[3], cn[3], cd[3] = s2, self.nbh[a], 1
                if not self._dep_ok(cs + (0 if s1 >= 0 else 2), cn + (0 if s1 >= 0 else 2),
                                    cd + (0 if s1 >= 0 else 2), (2 if s1 >= 0 else 0) + (2 if s2 >= 0 else 0)):
                    return False
        if not self._dedicated_ok(a, w1, w2) or not self._dedicated_ok(b, w2, w1):
            return False
        dl = (self.host_obj_with(a, ua, self.n_on[a]) - self.hostobj[a]
              + self.host_obj_with(b, ub, self.n_on[b]) - self.hostobj[b])
        dl += self.mmw * (self.mm(i1, b) - self.mm(i1, a) + self.mm(i2, a) - self.mm(i2, b))
        dl += self.pmw * (self.move_cost[w1] * ((b != i1) - (a != i1))
                          + self.move_cost[w2] * ((a != i2) - (b != i2)))
        # The service term: try the moved-count changes on the histogram, then undo them.
        old_max = self.max_moved
        if s1 >= 0 and (b != i1) != (a != i1):
            dl += self.group_w[s1] * ((b != i1) - (a != i1))
            self._svc_moved(s1, (b != i1) - (a != i1))
        if s2 >= 0 and (a != i2) != (b != i2):
            dl += self.group_w[s2] * ((a != i2) - (b != i2))
            self._svc_moved(s2, (a != i2) - (b != i2))
        dl += self.smw * (self.max_moved - old_max)
        if s2 >= 0 and (a != i2) != (b != i2):
            self._svc_moved(s2, -((a != i2) - (b != i2)))
        if s1 >= 0 and (b != i1) != (a != i1):
            self._svc_moved(s1, -((b != i1) - (a != i1)))
        delta[0] = dl
        return True

    cdef void apply_shift(self, intp_t w, intp_t b) noexcept nogil:
        """Move w to host b, updating every counter (no checks: callers evaluate first)."""
        cdef intp_t a = self.cur[w], i = self.initial[w], sv = self.service[w], r, row
        cdef int32_t t = self.tenant[w]
        cdef int64_t ca, cb
        cdef int32_t step
        if a == b:
            return
        for r in range(self.n_dims):
            ca, cb = self.charge(w, a, r), self.charge(w, b, r)
            self.use[a, r] -= ca
            self.use[b, r] += cb
            if self.transient[r]:
                if a == i:
                    self.hold[a, r] += ca
                if b == i:
                    self.hold[b, r] -= cb
        self.n_on[a] -= 1
        self.n_on[b] += 1
        if t >= 0 and self.dedicated[t]:
            self.ded_n[a] -= 1
            if self.ded_n[a] == 0:
                self.ded_t[a] = -1
            self.ded_n[b] += 1
            self.ded_t[b] = t
        self.host_sum -= self.hostobj[a] + self.hostobj[b]
        self.hostobj[a] = self.host_obj_with(a, &self.use[a, 0], self.n_on[a])
        self.hostobj[b] = self.host_obj_with(b, &self.use[b, 0], self.n_on[b])
        self.host_sum += self.hostobj[a] + self.hostobj[b]
        self.mm_sum += self.mm(i, b) - self.mm(i, a)
        if a == i or b == i:
            step = 1 if a == i else -1
            self.n_moved += step
            self.pm_sum += step * self.move_cost[w]
            if sv >= 0:
                self.gm_sum += step * self.group_w[sv]
                self._svc_moved(sv, step)
        if sv >= 0:
            row = self.spread_row[sv]
            if row >= 0:
                self.loc_count[row, self.location[a]] -= 1
                if self.loc_count[row, self.location[a]] == 0:
                    self.covered[sv] -= 1
                self.loc_count[row, self.location[b]] += 1
                if self.loc_count[row, self.location[b]] == 1:
                    self.covered[sv] += 1
            if self.has_dep:
                self.nbh_count[sv, self.nbh[a]] -= 1
                self.nbh_count[sv, self.nbh[b]] += 1
        self.cur[w] = b

    # -- searches (nogil loops) -----------------------------------------------------------

    cdef intp_t _best_target(self, intp_t w, intp_t avoid, bint used_only, intp_t limit,
                             int64_t* best_delta, int64_t* work) noexcept nogil:
        """The feasible host of least delta for w (ties: the fullest, best fit), or -1.
        With limit > 0, only `limit` of the allowed hosts from a random start are scanned."""
        cdef intp_t k = self.allowed_class[w], j, h, best = -1, r
        cdef intp_t lo = self.class_ptr[k], span = self.class_ptr[k + 1] - self.class_ptr[k]
        cdef intp_t start = 0, count = span
        cdef int64_t dl
        cdef double fill, best_fill = -1.0
        best_delta[0] = INF
        if limit > 0 and span > limit:
            start, count = _below(&self.rng, span), limit
        for j in range(count):
            h = self.class_hosts[lo + (start + j) % span]
            if h == avoid or (used_only and self.n_on[h] == 0):
                continue
            work[0] += 1
            if not self.shift_eval(w, h, &dl):
                continue
            if dl > best_delta[0]:
                continue
            fill = 0.0
            for r in range(self.n_dims):
                if self.cap[h, r] > 0:
                    fill += <double>(self.use[h, r] + self.hold[h, r]) / self.cap[h, r]
            if dl < best_delta[0] or fill > best_fill:
                best, best_delta[0], best_fill = h, dl, fill
        return best

    def relocate(self, intp_t w, intp_t avoid=-1, bint used_only=False, intp_t limit=0):
        """Move w to its feasible host of least delta (not `avoid`); (host or -1, work)."""
        cdef int64_t dl, work = 0
        cdef intp_t h
        with nogil:
            h = self._best_target(w, avoid, used_only, limit, &dl, &work)
            if h >= 0:
                self.apply_shift(w, h)
        return h, work

    def empty_host(self, intp_t h, bint used_only=True, bint must=False, intp_t limit=0):
        """Move every workload off host h, each (largest first) to its host of least delta.

        Kept when the objective goes down (or, with `must`, whenever every workload found a
        host: a drain); otherwise every move is undone. Returns (done, work).
        """
        cdef int64_t before = self.objective(), dl, work = 0
        cdef intp_t[::1] on = np.flatnonzero(np.asarray(self.cur) == h).astype(np.intp)
        cdef intp_t[::1] order = np.asarray(on)[np.argsort(-np.asarray(self.size)[on], kind="stable")]
        cdef intp_t n = order.shape[0], j, w, t
        cdef bint ok = True, keep = False
        with nogil:
            for j in range(n):
                w = order[j]
                if not self.movable[w]:
                    ok = False
                    break
                t = self._best_target(w, h, used_only, limit, &dl, &work)
                if t < 0:
                    ok = False
                    break
                self.apply_shift(w, t)
            keep = ok and (must or self.objective() < before)
            if not keep:
                for j in range(n):
                    w = order[j]
                    if self.cur[w] != h:
                        self.apply_shift(w, h)
        return keep, work

    def local_search(self, int64_t budget, double wall_s, int swap_percent=50, bint plateau=True,
                     int64_t tolerance=0):
        """Random shifts and swaps, each kept when it does not raise the objective, or (with a
        tolerance: record-to-record travel, Dueck 1993) when it stays within `tolerance` of the
        best objective of the call; the call ends on its best state.

        Parameters
        ----------
        budget : int
            moves to evaluate (the deterministic work measure).
        wall_s : float
            safety cap in seconds (checked every 4096 evaluations).
        swap_percent : int
            share of swap moves among the draws.
        plateau : bool
            also keep moves of delta 0 (they let the search drift across plateaus).
        tolerance : int
            how far above the best objective an accepted move may lead (0: descent only).

        Returns
        -------
        (evaluated, accepted, improvement) : int, int, int
        """
        cdef int64_t it = 0, accepted = 0, dl, before = self.objective()
        cdef int64_t value = before, best = before
        cdef intp_t n_mov = self.movable_idx.shape[0], w, w2, k, h, span, i
        cdef double deadline = _now() + wall_s
        cdef int32_t[::1] best_cur = self.cur.copy() if tolerance > 0 else self.cur
        cdef bint saved = True, take
        if n_mov == 0:
            return 0, 0, 0
        with nogil:
            while it < budget:
                it += 1
                if (it & 4095) == 0 and _now() > deadline:
                    break
                w = self.movable_idx[_below(&self.rng, n_mov)]
                if <int>_below(&self.rng, 100) < swap_percent:
                    w2 = self.movable_idx[_below(&self.rng, n_mov)]
                    if not self.swap_eval(w, w2, &dl):
                        continue
                    h = self.cur[w2]
                else:
                    w2 = -1
                    k = self.allowed_class[w]
                    span = self.class_ptr[k + 1] - self.class_ptr[k]
                    if span == 0:
                        continue
                    h = self.class_hosts[self.class_ptr[k] + _below(&self.rng, span)]
                    if not self.shift_eval(w, h, &dl):
                        continue
                take = dl < 0 or (plateau and dl == 0) or (tolerance > 0 and value + dl <= best + tolerance)
                if not take:
                    continue
                if tolerance > 0 and dl > 0 and not saved:
                    # Leaving the best state uphill: remember it (the only O(n) step).
                    for i in range(self.n_workloads):
                        best_cur[i] = self.cur[i]
                    saved = True
                if w2 >= 0:
                    self.apply_shift(w2, self.cur[w])
                self.apply_shift(w, h)
                value += dl
                accepted += 1
                if value < best:
                    best = value
                    saved = False
                elif value == best and dl < 0:
                    saved = False
            if tolerance > 0 and value > best:
                for i in range(self.n_workloads):
                    if self.cur[i] != best_cur[i]:
                        self.apply_shift(i, best_cur[i])
                self._dedicated_owner()
        return it, accepted, before - self.objective()

    # -- views and test wrappers --------------------------------------------------------------

    @property
    def assignment(self):
        """Host of each workload, int32 (n,) (a copy)."""
        return np.array(self.cur, dtype=np.int32)

    @property
    def value(self):
        """The objective of the current state."""
        return self.objective()

    def terms(self):
        """The objective by named term, from the incremental counters (load and balance
        together: the state keeps one cost per host)."""
        used = np.asarray(self.n_on) > 0
        hosts = int(np.asarray(self.host_cost)[used].sum())
        return {
            "host_cost": hosts,
            "load_balance_cost": int(self.host_sum) - hosts,
            "process_move_cost": self.pmw * self.pm_sum,
            "service_move_cost": self.smw * self.max_moved,
            "machine_move_cost": self.mmw * self.mm_sum,
            "group_move_cost": self.gm_sum,
        }

    def usage(self):
        """(use, hold) int64 (m, d): load per host, and transient load held on initial hosts."""
        return np.array(self.use), np.array(self.hold)

    def _py_shift(self, intp_t w, intp_t b):
        """(feasible, delta) of moving w to b. Python wrapper used for testing."""
        cdef int64_t dl = 0
        ok = self.shift_eval(w, b, &dl)
        return bool(ok), int(dl)

    def _py_swap(self, intp_t w1, intp_t w2):
        """(feasible, delta) of exchanging the hosts of w1 and w2. Python wrapper used for testing."""
        cdef int64_t dl = 0
        ok = self.swap_eval(w1, w2, &dl)
        return bool(ok), int(dl)

    def apply(self, intp_t w, intp_t b):
        """Move w to b without checks (callers evaluate first)."""
        self.apply_shift(w, b)
