# Host-side constraint state and compiled workload terms. See _constraint.pyx.
from ._typedefs cimport int64_t, intp_t, uint8_t, uint64_t, int32_t, float64_t
from ._state cimport HostState

cdef enum:
    MAX_NUMA = 8         # NUMA nodes per host the core tracks

cdef struct Counter:
    # One (group, topology) pair's counters, as raw pointers into ConstraintState's arrays.
    const int32_t* dom                # (n_rows,) domain id of each host row in the topology, -1 without the label
    int32_t* count                    # (n_domains,) workloads of the group per domain
    int64_t* total                    # workloads of the group in all domains
    int64_t* nonzero                  # domains holding at least one workload of the group

cdef class ConstraintState:
    cdef readonly intp_t n_rows       # host rows (matches HostState)
    cdef uint64_t[:, ::1] labels      # (n_rows, n_label_words) bits of referenced label pairs/keys
    cdef uint64_t[:, ::1] taint_hard  # (n_rows, n_taint_words) NoSchedule taints
    cdef uint64_t[:, ::1] taint_soft  # (n_rows, n_taint_words) PreferNoSchedule taints
    cdef int32_t[:, ::1] domain       # (n_topologies, n_rows) domain id per topology key, -1 without the label
    cdef int64_t[:, ::1] ratio_milli  # (n_rows, n_dims) allocation ratio x 1000 (VMs are charged request x ratio)
    cdef int32_t[::1] host_tenant     # (n_rows,) -1 no tenant work, t the only tenant, -2 several tenants
    cdef int32_t[::1] ded_tenant      # (n_rows,) tenant that holds the host dedicated, -1 none
    cdef int64_t[::1] accounted_load  # (n_rows,) load that is not tenant-less work: workloads of named
                                      # tenants, per-host service replicas, volume replicas; so
                                      # HostState.load - accounted_load = tenant-less workloads on the host
    cdef int32_t[::1] pair_counts     # flat counters: workloads of a group per domain of a topology
    cdef int64_t[::1] pair_offset     # (n_pairs,) start of each (group, topology) pair in pair_counts
    cdef int32_t[::1] pair_topo       # (n_pairs,) topology of each pair
    cdef int32_t[::1] pair_ndom       # (n_pairs,) domains of each pair
    cdef int64_t[::1] pair_total      # (n_pairs,) workloads of the group in all domains
    cdef int64_t[::1] pair_nonzero    # (n_pairs,) domains holding at least one workload of the group
    cdef int64_t[::1] topo_live_doms  # (n_topologies,) domains that hold a live host
    cdef int64_t[::1] topo_missing    # (n_topologies,) live hosts without the topology label
    cdef int64_t[::1] group_ptr       # (n_groups + 1,) CSR: pairs counted for each group
    cdef int32_t[::1] group_pairs     # (group_ptr[-1],) pair ids
    cdef int64_t[:, :, ::1] numa_free # (n_rows, MAX_NUMA, 2) free cpu and memory per NUMA node
    cdef int32_t[::1] numa_n          # (n_rows,) NUMA nodes declared (0: none)
    cdef intp_t cpu_dim, mem_dim      # dimension indices of cpu and memory (-1 if absent)

cdef class Terms:
    cdef uint64_t[::1] all_mask       # (n_label_words,) bits a host must all have
    cdef uint64_t[::1] none_mask      # (n_label_words,) bits a host must not have
    cdef uint64_t[:, ::1] any_masks   # (n_any, n_label_words) each row: at least one bit
    cdef uint64_t[::1] kvm_mask       # (n_label_words,) the kvm=true bit for VMs (zeros otherwise)
    cdef uint64_t[::1] tol_hard       # (n_taint_words,) NoSchedule taints tolerated
    cdef uint64_t[::1] tol_soft       # (n_taint_words,) PreferNoSchedule taints tolerated
    cdef int32_t[::1] groups          # (n_groups,) groups the workload counts in: its own, and one
                                      # "holds anti-affinity against G" group per hard anti term
    cdef int32_t tenant               # tenant id, -1 none
    cdef bint dedicated               # isolation="dedicated"
    cdef bint per_host                # a per-host service replica: exempt from tenant isolation
    cdef bint is_vm                   # charged at ratio 1.0
    cdef bint numa                    # must fit one NUMA node
    cdef int32_t[::1] aff_pair        # (n_aff,) pair of each affinity term
    cdef uint8_t[::1] aff_hard
    cdef int64_t[::1] aff_weight
    cdef uint8_t[::1] aff_self        # the term's group is the workload's own group
    cdef int32_t[::1] anti_pair       # (n_anti,)
    cdef uint8_t[::1] anti_hard
    cdef int64_t[::1] anti_weight
    cdef int32_t[::1] spread_pair     # (n_spread,)
    cdef int64_t[::1] spread_skew
    cdef uint8_t[::1] spread_hard
    cdef int64_t[::1] spread_min      # (n_spread,) scratch: minimum count over domains, per placement
    cdef int64_t[::1] spread_dom_ptr  # (n_spread + 1,) CSR: domains eligible for each spread term
    cdef int32_t[::1] spread_doms     # domain ids of hosts that match the selector
    cdef uint8_t[::1] allowed         # (n_rows,) volume locality; empty when unrestricted
    cdef bint has_allowed
    cdef bint has_soft                # some term can add a penalty
    cdef int64_t prefer_weight        # penalty per untolerated PreferNoSchedule taint
    cdef float64_t penalty_lb         # scratch: a penalty every host pays, per placement (see prepare)
    cdef Counter* aff_ctr             # (n_aff,) each term's counters, bound per kernel call (see bind_counters)
    cdef Counter* anti_ctr            # (n_anti,)
    cdef Counter* spread_ctr          # (n_spread,)
    cdef Counter* own_ctr             # (n_own,) the counters a placement adds to: every pair of every group in `groups`
    cdef intp_t n_own, own_room       # own_ctr entries used and allocated
    cdef bint penalty_fixed           # scratch: every host pays exactly penalty_lb, per placement

cdef int32_t reject(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                    int64_t* charge) noexcept nogil
cdef int32_t reject_dynamic(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                            int64_t* charge) noexcept nogil
cdef int32_t reject_restored(HostState s, ConstraintState cs, Terms t, intp_t h, const int64_t* request,
                             int64_t* charge, bint tenancy) noexcept nogil
cdef float64_t penalty(ConstraintState cs, Terms t, intp_t h) noexcept nogil
cdef bint static_ok(ConstraintState cs, Terms t, intp_t h) noexcept nogil
cdef int bind_counters(ConstraintState cs, Terms t) except -1
cdef void prepare(ConstraintState cs, Terms t) noexcept nogil
cdef float64_t penalty_floor(Terms t) noexcept nogil
cdef bint penalty_monotone(ConstraintState cs, Terms t) noexcept nogil
cdef void count_in(ConstraintState cs, Terms t, intp_t h, int delta) noexcept nogil
cdef intp_t numa_node(ConstraintState cs, intp_t h, const int64_t* request) noexcept nogil
