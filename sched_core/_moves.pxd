# See _moves.pyx for details.
from ._typedefs cimport int64_t, uint64_t, uint8_t, int32_t, intp_t, float64_t


cdef class MoveState:
    # -- the problem (read-only copies of hci_scheduler.rebalance.Problem's arrays) --
    cdef readonly intp_t n_hosts, n_workloads, n_dims, n_services
    cdef const int64_t[:, ::1] cap          # capacity (m, d)
    cdef const int64_t[:, ::1] target       # soft target (m, d)
    cdef const int64_t[:, ::1] ratio        # allocation ratio x 1000 (m, d)
    cdef const int64_t[:, ::1] request      # (n, d)
    cdef const int64_t[:, ::1] mmc          # host-pair move cost (m, m), or (1, 1) when absent
    cdef const uint8_t[:, ::1] allowed      # (k, m)
    cdef const uint8_t[::1] is_open, vm, movable, conflict, transient, dedicated
    cdef const int32_t[::1] allowed_class, service, tenant, location, nbh, initial, spread_min
    cdef const int64_t[::1] host_cost, move_cost, load_weight, group_w
    cdef const int32_t[::1] bal_a, bal_b    # balance terms: dimensions a and b
    cdef const int64_t[::1] bal_t, bal_w    # balance terms: target and weight
    cdef const int32_t[::1] svc_ptr, svc_members    # CSR: workloads of each service
    cdef const int32_t[::1] needs_ptr, needs        # CSR: services each service depends on
    cdef const int32_t[::1] needed_ptr, needed_by   # CSR: services depending on each service
    cdef const int32_t[::1] class_ptr, class_hosts  # CSR: open allowed hosts of each class
    cdef const int32_t[::1] movable_idx     # workloads that may move
    cdef const int32_t[::1] spread_row      # (s,) row in loc_count, -1 when spread_min < 2
    cdef const float64_t[::1] size          # normalised size of each workload (ordering only)
    cdef bint has_mmc, has_dep
    cdef int64_t loc_move_cost, pmw, smw, mmw
    cdef intp_t n_bal
    # -- the state, updated by apply_shift only --
    cdef int32_t[::1] cur                   # host of each workload
    cdef int64_t[:, ::1] use                # fixed + charges of the workloads on each host
    cdef int64_t[:, ::1] hold               # transient load of moved workloads on their initial host
    cdef int32_t[::1] n_on                  # workloads on each host
    cdef int32_t[::1] ded_n                 # workloads of dedicated tenants on each host
    cdef int32_t[::1] ded_t                 # that tenant (-1 when ded_n is 0)
    cdef int64_t[::1] hostobj               # host_cost + load + balance cost of each host
    cdef int32_t[::1] moved_svc             # moved workloads of each service
    cdef int32_t[::1] hist                  # services by moved count (for the max in O(1))
    cdef int32_t[:, ::1] loc_count          # workloads of a spread service per location
    cdef int32_t[::1] covered               # locations covered by each spread service
    cdef int32_t[:, ::1] nbh_count          # workloads of each service per neighbourhood
    cdef int64_t[::1] scratch               # 4 x d work space
    cdef readonly int64_t host_sum, pm_sum, mm_sum, gm_sum
    cdef readonly int32_t max_moved
    cdef readonly intp_t n_moved
    cdef public intp_t max_moves            # cap on workloads off their initial host (-1: none)
    cdef uint64_t rng

    cdef int64_t charge(self, intp_t w, intp_t h, intp_t r) noexcept nogil
    cdef int64_t host_obj_with(self, intp_t h, const int64_t* u, int32_t n_on) noexcept nogil
    cdef int64_t objective(self) noexcept nogil
    cdef int64_t mm(self, intp_t a, intp_t b) noexcept nogil
    cdef bint shift_eval(self, intp_t w, intp_t b, int64_t* delta) noexcept nogil
    cdef bint swap_eval(self, intp_t w1, intp_t w2, int64_t* delta) noexcept nogil
    cdef void apply_shift(self, intp_t w, intp_t b) noexcept nogil
    cdef void _place_initial(self) noexcept
    cdef void _dedicated_owner(self) noexcept nogil
    cdef void _svc_moved(self, intp_t sv, int32_t step) noexcept nogil
    cdef bint _conflict_free(self, intp_t sv, intp_t h, intp_t skip1, intp_t skip2) noexcept nogil
    cdef bint _spread_ok(self, intp_t sv, intp_t a, intp_t b) noexcept nogil
    cdef int32_t _nb_count(self, intp_t sv, intp_t nb, const int32_t* cs, const int32_t* cn,
                           const int32_t* cd, int nc) noexcept nogil
    cdef bint _dep_ok(self, const int32_t* cs, const int32_t* cn, const int32_t* cd, int nc) noexcept nogil
    cdef bint _dedicated_ok(self, intp_t h, intp_t leaving, intp_t arriving) noexcept nogil
    cdef intp_t _best_target(self, intp_t w, intp_t avoid, bint used_only, intp_t limit,
                             int64_t* best_delta, int64_t* work) noexcept nogil
