# cython: language_level=3
"""Hard and soft placement constraints, evaluated per host in a few integer operations.

The Python layer compiles everything with strings into integers once:
label pairs and keys that selectors reference become bits (ConstraintState.labels),
taints become bits, topology keys map each host to a domain id, groups and
tenants become small integers. A workload's constraints become a Terms object,
compiled once per workload spec and reused for every host and every replica.

Filter order in `reject`, cheapest first (each host reports the first failure):
  state bit -> label bits (selector, kvm) -> taint bits -> tenant ids and load ->
  resources (charge per host: VMs pay request x allocation ratio) -> volume
  locality -> affinity / anti-affinity / spread counters -> NUMA nodes.

Soft terms (soft affinity, soft anti-affinity, soft spread, PreferNoSchedule)
never remove a host; `penalty` adds their weights to the strategy's cost.
"""
import numpy as np
cimport numpy as cnp
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free

from ._typedefs cimport int64_t, intp_t, uint8_t, uint64_t, int32_t, float64_t
from ._filter cimport (REASON_OK, REASON_NOT_SCHEDULABLE, REASON_SELECTOR, REASON_KVM, REASON_TAINT, REASON_TENANT,
                       REASON_VOLUME, REASON_NUMA, REASON_DIM, REASON_AFFINITY, REASON_ANTI_AFFINITY, REASON_SPREAD)
from ._state cimport HostState

cnp.import_array()

cdef enum:
    SPREAD_SOFT_WEIGHT = 10   # penalty per unit of soft-spread skew above max_skew


cdef inline int popcount64(uint64_t x) noexcept nogil:
    cdef int n = 0
    while x:
        x &= x - 1
        n += 1
    return n


cdef class ConstraintState:
    """Per-host constraint arrays; the Python layer (hci_scheduler.constraints) owns and rebuilds them."""

    def __init__(self):
        self.n_rows = 0
        self.cpu_dim = -1
        self.mem_dim = -1

    def bind(self, *, labels, taint_hard, taint_soft, domain, ratio_milli, host_tenant, ded_tenant,
             accounted_load, pair_counts, pair_offset, pair_topo, pair_ndom, pair_total, pair_nonzero, topo_live_doms,
             topo_missing, group_ptr, group_pairs, numa_free, numa_n, cpu_dim, mem_dim):
        """Point the state at the Python layer's arrays (shapes documented in _constraint.pxd)."""
        n = labels.shape[0]
        for name, arr in (("taint_hard", taint_hard), ("taint_soft", taint_soft), ("ratio_milli", ratio_milli),
                          ("host_tenant", host_tenant), ("ded_tenant", ded_tenant),
                          ("accounted_load", accounted_load), ("numa_free", numa_free),
                          ("numa_n", numa_n)):
            if arr.shape[0] != n:
                raise ValueError(f"ConstraintState.bind: {name} has {arr.shape[0]} rows, labels has {n}")
        if domain.shape[1] != n:
            raise ValueError("ConstraintState.bind: domain must be (n_topologies, n_rows)")
        self.n_rows = n
        self.labels = labels
        self.taint_hard = taint_hard
        self.taint_soft = taint_soft
        self.domain = domain
        self.ratio_milli = ratio_milli
        self.host_tenant = host_tenant
        self.ded_tenant = ded_tenant
        self.accounted_load = accounted_load
        self.pair_counts = pair_counts
        self.pair_offset = pair_offset
        self.pair_topo = pair_topo
        self.pair_ndom = pair_ndom
        self.pair_total = pair_total
        self.pair_nonzero = pair_nonzero
        self.topo_live_doms = topo_live_doms
        self.topo_missing = topo_missing
        self.group_ptr = group_ptr
        self.group_pairs = group_pairs
        self.numa_free = numa_free
        self.numa_n = numa_n
        self.cpu_dim = cpu_dim
        self.mem_dim = mem_dim


cdef class Terms:
    """A workload's compiled constraints (see _constraint.pxd for the fields)."""

    def __init__(self, *, all_mask, none_mask, any_masks, kvm_mask, tol_hard, tol_soft, groups, tenant,
                 dedicated, per_host, is_vm, numa, aff_pair, aff_hard, aff_weight, aff_self, anti_pair, anti_hard,
                 anti_weight, spread_pair, spread_skew, spread_hard, spread_dom_ptr, spread_doms, allowed,
                 prefer_weight):
        self.all_mask = all_mask
        self.none_mask = none_mask
        self.any_masks = any_masks
        self.kvm_mask = kvm_mask
        self.tol_hard = tol_hard
        self.tol_soft = tol_soft
        self.groups = groups
        self.tenant = tenant
        self.dedicated = dedicated
        self.per_host = per_host
        self.is_vm = is_vm
        self.numa = numa
        self.aff_pair = aff_pair
        self.aff_hard = aff_hard
        self.aff_weight = aff_weight
        self.aff_self = aff_self
        self.anti_pair = anti_pair
        self.anti_hard = anti_hard
        self.anti_weight = anti_weight
        self.spread_pair = spread_pair
        self.spread_skew = spread_skew
        self.spread_hard = spread_hard
        self.spread_min = np.zeros(len(spread_pair), dtype=np.int64)
        self.spread_dom_ptr = spread_dom_ptr
        self.spread_doms = spread_doms
        self.has_allowed = allowed is not None
        self.allowed = allowed if allowed is not None else np.zeros(0, dtype=np.uint8)
        self.prefer_weight = prefer_weight
        self.penalty_lb = 0.0
        self.penalty_fixed = False
        self.has_soft = (
            bool(np.any(np.asarray(aff_hard) == 0)) or bool(np.any(np.asarray(anti_hard) == 0))
            or bool(np.any(np.asarray(spread_hard) == 0)) or prefer_weight > 0
        )
        self.aff_ctr = <Counter*> PyMem_Malloc(max(len(aff_pair), 1) * sizeof(Counter))
        self.anti_ctr = <Counter*> PyMem_Malloc(max(len(anti_pair), 1) * sizeof(Counter))
        self.spread_ctr = <Counter*> PyMem_Malloc(max(len(spread_pair), 1) * sizeof(Counter))
        if self.aff_ctr == NULL or self.anti_ctr == NULL or self.spread_ctr == NULL:
            raise MemoryError("Terms: counters")

    def __dealloc__(self):
        PyMem_Free(self.aff_ctr)
        PyMem_Free(self.anti_ctr)
        PyMem_Free(self.spread_ctr)
        PyMem_Free(self.own_ctr)


cdef inline Counter counter(ConstraintState cs, intp_t p) noexcept nogil:
    """Pair p's counters as raw pointers (pointer arithmetic: a pair may own no domain yet)."""
    cdef Counter c
    c.dom = &cs.domain[0, 0] + cs.pair_topo[p] * cs.domain.shape[1]
    c.count = &cs.pair_counts[0] + cs.pair_offset[p] if cs.pair_counts.shape[0] else NULL
    c.total = &cs.pair_total[p]
    c.nonzero = &cs.pair_nonzero[p]
    return c


cdef int bind_counters(ConstraintState cs, Terms t) except -1:
    """Point t's counters at cs's arrays. Every kernel entry point calls this before the
    filters, penalties or count_in read them: the Python layer replaces cs's arrays when
    hosts are added, and a raw pointer per term spares the memoryview arithmetic
    (strides, offsets, topology) on every host the walk tests."""
    cdef intp_t i, k, n = 0
    cdef int64_t j
    cdef int32_t g
    cdef Counter* grown
    for k in range(t.groups.shape[0]):
        g = t.groups[k]
        if g + 1 < cs.group_ptr.shape[0]:
            n += cs.group_ptr[g + 1] - cs.group_ptr[g]
    if n > t.own_room:
        grown = <Counter*> PyMem_Realloc(t.own_ctr, n * sizeof(Counter))
        if grown == NULL:
            raise MemoryError("Terms: counters")
        t.own_ctr, t.own_room = grown, n
    if n == 0 and t.aff_pair.shape[0] == 0 and t.anti_pair.shape[0] == 0 and t.spread_pair.shape[0] == 0:
        t.n_own = 0
        return 0  # no counter is read: cs may hold no pair at all
    t.n_own = 0
    for k in range(t.groups.shape[0]):
        g = t.groups[k]
        if g + 1 < cs.group_ptr.shape[0]:
            for j in range(cs.group_ptr[g], cs.group_ptr[g + 1]):
                t.own_ctr[t.n_own] = counter(cs, cs.group_pairs[j])
                t.n_own += 1
    for i in range(t.aff_pair.shape[0]):
        t.aff_ctr[i] = counter(cs, t.aff_pair[i])
    for i in range(t.anti_pair.shape[0]):
        t.anti_ctr[i] = counter(cs, t.anti_pair[i])
    for i in range(t.spread_pair.shape[0]):
        t.spread_ctr[i] = counter(cs, t.spread_pair[i])
    return 0


cdef void prepare(ConstraintState cs, Terms t) noexcept nogil:
    """Per placement: the least-loaded domain count of every spread term, over the
    domains that hold a host matching the workload's selector (as Kubernetes'
    topology spread does with nodeAffinityPolicy=Honor)."""
    cdef intp_t i, p
    cdef int64_t m, j, c
    for i in range(t.spread_pair.shape[0]):
        m = 0
        for j in range(t.spread_dom_ptr[i], t.spread_dom_ptr[i + 1]):
            c = t.spread_ctr[i].count[t.spread_doms[j]]
            if j == t.spread_dom_ptr[i] or c < m:
                m = c
        t.spread_min[i] = m
    # A soft anti-affinity term costs every host once its group sits in every live domain
    # (and every live host has the label); a soft affinity term costs every host while
    # its group sits nowhere. Their sum bounds every host's penalty from below, which
    # lets the index walk stop early (see _place.walk_index). When every soft term is
    # such a term, every host pays exactly that sum.
    cdef float64_t lb = 0.0
    cdef int32_t tp
    cdef bint fixed = t.prefer_weight == 0
    for i in range(t.anti_pair.shape[0]):
        if not t.anti_hard[i]:
            p = t.anti_pair[i]
            tp = cs.pair_topo[p]
            if cs.topo_missing[tp] == 0 and cs.pair_nonzero[p] >= cs.topo_live_doms[tp]:
                lb += t.anti_weight[i]
            else:
                fixed = False
    for i in range(t.aff_pair.shape[0]):
        if not t.aff_hard[i]:
            if t.aff_ctr[i].total[0] == 0 and not t.aff_self[i]:
                lb += t.aff_weight[i]
            else:
                fixed = False
    for i in range(t.spread_pair.shape[0]):
        if not t.spread_hard[i]:
            fixed = False
    t.penalty_lb = lb
    t.penalty_fixed = fixed


cdef float64_t penalty_floor(Terms t) noexcept nogil:
    return t.penalty_lb

cdef bint counts_in_pair(ConstraintState cs, Terms t, intp_t p) noexcept nogil:
    """Placing a workload with terms t adds to pair p's counters."""
    cdef intp_t k
    cdef int64_t j
    cdef int32_t g
    for k in range(t.groups.shape[0]):
        g = t.groups[k]
        if g + 1 < cs.group_ptr.shape[0]:
            for j in range(cs.group_ptr[g], cs.group_ptr[g + 1]):
                if cs.group_pairs[j] == p:
                    return True
    return False


cdef bint penalty_monotone(ConstraintState cs, Terms t) noexcept nogil:
    """No host's penalty can fall while workloads with terms t are added (and none
    removed), so a lower bound computed now still holds later in the batch.
    Soft anti-affinity only grows with its counters and PreferNoSchedule is fixed;
    soft affinity and soft spread fall when the batch adds to their own counters."""
    cdef intp_t i
    for i in range(t.aff_pair.shape[0]):
        if not t.aff_hard[i] and counts_in_pair(cs, t, t.aff_pair[i]):
            return False
    for i in range(t.spread_pair.shape[0]):
        if not t.spread_hard[i] and counts_in_pair(cs, t, t.spread_pair[i]):
            return False
    return True


cdef inline int32_t pair_count(const Counter* c, intp_t h) noexcept nogil:
    """Workloads of the counter's group in host h's domain; -1 when h lacks the topology label."""
    cdef int32_t dom = c.dom[h]
    if dom < 0:
        return -1
    return c.count[dom]


cdef intp_t numa_node(ConstraintState cs, intp_t h, const int64_t* request) noexcept nogil:
    """The NUMA node of host h that fits the request's cpu and memory most tightly, or -1."""
    cdef intp_t k, best = -1
    cdef int64_t need_cpu = request[cs.cpu_dim] if cs.cpu_dim >= 0 else 0
    cdef int64_t need_mem = request[cs.mem_dim] if cs.mem_dim >= 0 else 0
    for k in range(cs.numa_n[h]):
        if cs.numa_free[h, k, 0] >= need_cpu and cs.numa_free[h, k, 1] >= need_mem:
            if best < 0 or cs.numa_free[h, k, 0] < cs.numa_free[h, best, 0]:
                best = k
    return best


cdef int32_t static_reason(ConstraintState cs, Terms t, intp_t h) noexcept nogil:
    """The first static filter host h fails (REASON_SELECTOR, REASON_KVM, REASON_TAINT), or
    REASON_OK. Static filters are those no placement on another host can change."""
    cdef intp_t w, i, n_words = t.all_mask.shape[0]
    cdef uint64_t bits
    cdef bint any_hit
    for w in range(n_words):
        bits = cs.labels[h, w]
        if (bits & t.all_mask[w]) != t.all_mask[w] or (bits & t.none_mask[w]) != 0:
            return REASON_SELECTOR
    for i in range(t.any_masks.shape[0]):
        any_hit = False
        for w in range(n_words):
            if cs.labels[h, w] & t.any_masks[i, w]:
                any_hit = True
                break
        if not any_hit:
            return REASON_SELECTOR
    if t.is_vm:
        for w in range(n_words):
            if (cs.labels[h, w] & t.kvm_mask[w]) != t.kvm_mask[w]:
                return REASON_KVM
    for w in range(t.tol_hard.shape[0]):
        if cs.taint_hard[h, w] & ~t.tol_hard[w]:
            return REASON_TAINT
    return REASON_OK


cdef bint static_ok(ConstraintState cs, Terms t, intp_t h) noexcept nogil:
    """Host h passes t's static filters, volume locality included."""
    return static_reason(cs, t, h) == REASON_OK and not (t.has_allowed and not t.allowed[h])


cdef int32_t reject(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                    int64_t* charge) noexcept nogil:
    """REASON_OK when host h passes every hard constraint (charge then holds what h must
    give), else the reason code of the first filter it fails."""
    cdef int32_t code
    if not s.index.member[h]:
        return REASON_NOT_SCHEDULABLE
    code = static_reason(cs, t, h)
    if code != REASON_OK:
        return code
    return reject_dynamic(s, cs, t, h, request, charge)


cdef inline bint tenant_conflict(HostState s, ConstraintState cs, Terms t, intp_t h) noexcept nogil:
    """Workload t on host h would share it against tenant isolation: a dedicated tenant's
    workloads share a host with nobody else's, tenant-less ones included. Per-host service
    replicas are the one exception both ways (they run on every host and hold none)."""
    if t.per_host:
        return False
    # A host held dedicated takes only its own tenant's work (a tenant-less workload has
    # tenant -1, never the holder).
    if cs.ded_tenant[h] >= 0 and cs.ded_tenant[h] != t.tenant:
        return True
    # A dedicated workload needs a host whose work is all its tenant's: no other tenant
    # marked, and no tenant-less workload (load the tenant marks do not account for).
    return t.dedicated and ((cs.host_tenant[h] != -1 and cs.host_tenant[h] != t.tenant)
                            or s.load[h] > cs.accounted_load[h])


cdef inline int32_t reject_room(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                                int64_t* charge, bint tenancy=True) noexcept nogil:
    """Tenancy (unless tenancy=False), resources and volume locality of host h (charge
    filled when resources fit)."""
    cdef intp_t d
    if tenancy and tenant_conflict(s, cs, t, h):
        return REASON_TENANT
    # Resources: containers pay the request; VMs pay request x allocation ratio so
    # that they are never overcommitted.
    if t.is_vm:
        for d in range(s.n_dims):
            charge[d] = (request[d] * cs.ratio_milli[h, d] + 999) // 1000
            if s.free[h, d] < charge[d]:
                return REASON_DIM + <int32_t>d
    else:
        for d in range(s.n_dims):
            charge[d] = request[d]
            if s.free[h, d] < charge[d]:
                return REASON_DIM + <int32_t>d
    if t.has_allowed and not t.allowed[h]:
        return REASON_VOLUME
    return REASON_OK


cdef inline int32_t reject_counters(ConstraintState cs, Terms t, intp_t h) noexcept nogil:
    """Hard affinity, anti-affinity and spread on host h (the per-domain counters)."""
    cdef intp_t i
    cdef int32_t c
    for i in range(t.aff_pair.shape[0]):
        if t.aff_hard[i]:
            c = pair_count(&t.aff_ctr[i], h)
            if c == 0 and t.aff_self[i] and t.aff_ctr[i].total[0] == 0:
                continue  # the first of a self-affine group may go anywhere
            if c <= 0:
                return REASON_AFFINITY + <int32_t>i
    for i in range(t.anti_pair.shape[0]):
        if t.anti_hard[i] and pair_count(&t.anti_ctr[i], h) > 0:
            return REASON_ANTI_AFFINITY + <int32_t>i
    for i in range(t.spread_pair.shape[0]):
        if t.spread_hard[i]:
            c = pair_count(&t.spread_ctr[i], h)
            if c < 0 or c + 1 - t.spread_min[i] > t.spread_skew[i]:
                return REASON_SPREAD + <int32_t>i
    return REASON_OK


cdef int32_t reject_dynamic(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                            int64_t* charge) noexcept nogil:
    """The filters after the static ones (see static_ok), for hosts known to pass those."""
    cdef int32_t code = reject_room(s, cs, t, h, request, charge)
    if code == REASON_OK:
        code = reject_counters(cs, t, h)
    if code == REASON_OK and t.numa and numa_node(cs, h, charge) < 0:
        code = REASON_NUMA
    return code


cdef int32_t reject_restored(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                             int64_t* charge, bint tenancy) noexcept nogil:
    """`reject` without the per-domain counter terms, for a placement decided earlier and
    being restored from a log: whether affinity, anti-affinity or spread held depended on
    workloads present at decision time (a gang member rolled back since, a workload
    released since), and a restore must rebuild the state the log describes. Room,
    labels, taints, volume locality and NUMA are still checked, so a restore never
    overcommits a host; tenancy too unless tenancy=False (an acknowledged placement
    made before tenant-less work counted against a dedicated tenant)."""
    cdef int32_t code
    if not s.index.member[h]:
        return REASON_NOT_SCHEDULABLE
    code = static_reason(cs, t, h)
    if code == REASON_OK:
        code = reject_room(s, cs, t, h, request, charge, tenancy)
    if code == REASON_OK and t.numa and numa_node(cs, h, charge) < 0:
        code = REASON_NUMA
    return code


cdef float64_t penalty(ConstraintState cs, Terms t, intp_t h) noexcept nogil:
    """Sum of the weights of the soft terms host h would break (0 when none)."""
    cdef float64_t p = 0.0
    cdef intp_t i, w
    cdef int32_t c
    cdef int64_t excess
    if t.penalty_fixed:
        return t.penalty_lb  # the same for every host (see prepare)
    for i in range(t.aff_pair.shape[0]):
        if not t.aff_hard[i]:
            c = pair_count(&t.aff_ctr[i], h)
            if c <= 0 and not (c == 0 and t.aff_self[i] and t.aff_ctr[i].total[0] == 0):
                p += t.aff_weight[i]
    for i in range(t.anti_pair.shape[0]):
        if not t.anti_hard[i] and pair_count(&t.anti_ctr[i], h) > 0:
            p += t.anti_weight[i]
    for i in range(t.spread_pair.shape[0]):
        if not t.spread_hard[i]:
            c = pair_count(&t.spread_ctr[i], h)
            if c < 0:
                p += SPREAD_SOFT_WEIGHT * (t.spread_skew[i] + 1)
            else:
                excess = c + 1 - t.spread_min[i] - t.spread_skew[i]
                if excess > 0:
                    p += SPREAD_SOFT_WEIGHT * excess
    if t.prefer_weight > 0:
        for w in range(t.tol_soft.shape[0]):
            p += t.prefer_weight * popcount64(cs.taint_soft[h, w] & ~t.tol_soft[w])
    return p


cdef void count_in(ConstraintState cs, Terms t, intp_t h, int delta) noexcept nogil:
    """Add (delta=1) or remove (delta=-1) one workload of t's groups on host h in every
    counted topology; on add, record its tenant on the host. A named tenant's workload or a
    per-host replica is accounted load (see ConstraintState.accounted_load) both ways."""
    cdef intp_t k
    cdef int32_t dom
    cdef Counter* c
    for k in range(t.n_own):
        c = &t.own_ctr[k]
        dom = c.dom[h]
        if dom >= 0:
            c.count[dom] += delta
            if delta > 0 and c.count[dom] == 1:
                c.nonzero[0] += 1
            elif delta < 0 and c.count[dom] == 0:
                c.nonzero[0] -= 1
        c.total[0] += delta
    if t.per_host or t.tenant >= 0:
        cs.accounted_load[h] += delta
    if delta > 0 and t.tenant >= 0 and not t.per_host:
        if cs.host_tenant[h] == -1:
            cs.host_tenant[h] = t.tenant
        elif cs.host_tenant[h] != t.tenant:
            cs.host_tenant[h] = -2
        if t.dedicated:
            cs.ded_tenant[h] = t.tenant


def static_hosts(ConstraintState cs, Terms t, uint8_t[::1] out):
    """Which rows pass t's static filters (selector, kvm, taints, volume locality): the hosts a
    workload may ever run on whatever else is placed. out (n_rows,) receives 1 or 0; the caller
    masks rows without a live host. Used by the rebalancer, which decides the rest itself."""
    cdef intp_t h, n = out.shape[0]
    if n > cs.labels.shape[0]:
        raise ValueError("static_hosts: out has more rows than the constraint state")
    with nogil:
        for h in range(n):
            out[h] = static_ok(cs, t, h)
