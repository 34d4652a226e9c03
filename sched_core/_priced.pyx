# cython: language_level=3
"""Local search that prices the transient room a move spends, and sends moved workloads home.

A workload that leaves its initial host keeps its transient resources there until the
plan ends (ROADEF's transient resources), so every first move off a host spends room that
no later move can use. A descent on the objective alone spends it on whatever gains first,
and on set B nearly every host is out of transient room early, after which shifts and swaps
stall. Here the search descends on a potential instead:

    objective + sum over transient dimensions r of price[r] x (transient load held on initial hosts)

so a move that leaves home must gain more than the room it takes, one that returns home is
paid for the room it frees, and a move between two hosts neither of which is home is judged
on the objective alone. The caller lowers the prices towards zero as the work is spent
(cheap room early, spent only by the moves worth most per unit of it; all of it at the end).
With every price zero this is the plain descent of MoveState.local_search.

Moves: random shifts, random swaps, and "return home" (a moved workload back to its initial
host: no transient charge there, and its room on the host it leaves is freed). Every
evaluation goes through MoveState's shift_eval / swap_eval and every change through
apply_shift, so the state's invariants are MoveState's own.
"""
import numpy as np
cimport numpy as cnp

from ._moves cimport MoveState
from ._search_util cimport _below, _next, _now
from ._typedefs cimport int64_t, uint64_t, int32_t, intp_t, float64_t

cnp.import_array()


cdef inline double _held_price(MoveState st, intp_t w, intp_t a, intp_t b, const double* price) noexcept nogil:
    """Priced change of the transient load held on initial hosts when w goes from a to b:
    leaving home adds w's transient charge there, coming home removes it, else nothing."""
    cdef intp_t i = st.initial[w], r
    cdef double s = 0.0
    if a == b or (a != i and b != i):
        return 0.0
    for r in range(st.n_dims):
        if st.transient[r] and price[r] != 0.0:
            s += price[r] * st.charge(w, i, r)
    return s if a == i else -s


def held_load(MoveState st):
    """Transient load held on initial hosts by the workloads away from them, per dimension
    (int64 (d,)): what the prices multiply."""
    return np.asarray(st.hold).sum(axis=0)


cdef inline void _track(intp_t w, bint away, int32_t* lst, int32_t* pos, intp_t* n) noexcept nogil:
    """Keep w in (away) or out of the list of moved workloads, in O(1)."""
    cdef int32_t last
    if away and pos[w] < 0:
        pos[w] = <int32_t>n[0]
        lst[n[0]] = <int32_t>w
        n[0] += 1
    elif not away and pos[w] >= 0:
        n[0] -= 1
        last = lst[n[0]]
        lst[pos[w]] = last
        pos[last] = pos[w]
        pos[w] = -1


def priced_search(MoveState st, int64_t budget, double wall_s, price, int swap_percent=40,
                  int home_percent=10, bint plateau=True, int away_percent=0):
    """Random shifts, swaps and returns home, each kept when it lowers the potential
    (objective + price . held transient load); with `plateau`, also moves that change
    neither the objective nor the held load.

    Parameters
    ----------
    st : MoveState
    budget : int
        moves to evaluate (the deterministic work measure).
    wall_s : float
        safety cap in seconds (checked every 4096 evaluations).
    price : float64 (d,)
        objective units per unit of held load of each dimension (ignored where the
        dimension is not transient).
    swap_percent, home_percent : int
        shares of swap draws and return-home draws (the rest are shifts to a random host).
    away_percent : int
        share of draws whose workloads (both, for a swap) come from the moved ones: once
        transient room is spent, those are nearly the only ones that can still move (a
        workload at home that leaves holds its room there, so it fits almost nowhere).

    Returns
    -------
    (evaluated, accepted, improvement) : int, int, int
        improvement is the objective's decrease (it may be negative when the prices
        bought transient room with objective).
    """
    cdef double[::1] pr = np.ascontiguousarray(price, dtype=np.float64)
    if pr.shape[0] != st.n_dims:
        raise ValueError(f"price: expected {st.n_dims} values, got {pr.shape[0]}")
    cdef int64_t it = 0, accepted = 0, dl = 0, before = st.objective()
    cdef intp_t n_mov = st.movable_idx.shape[0], w, w2, a, b, k, span, draw, n_away = 0, j
    cdef double deadline = _now() + wall_s, pen
    cdef const double* p = &pr[0] if st.n_dims > 0 else NULL
    cdef int32_t[::1] away = np.zeros(max(st.n_workloads, 1), np.int32)
    cdef int32_t[::1] pos = np.full(max(st.n_workloads, 1), -1, np.int32)
    cdef bint focus
    if n_mov == 0:
        return 0, 0, 0
    with nogil:
        for j in range(n_mov):
            w = st.movable_idx[j]
            _track(w, st.cur[w] != st.initial[w], &away[0], &pos[0], &n_away)
        while it < budget:
            it += 1
            if (it & 4095) == 0 and _now() > deadline:
                break
            focus = n_away > 1 and <int>_below(&st.rng, 100) < away_percent
            w = away[_below(&st.rng, n_away)] if focus else st.movable_idx[_below(&st.rng, n_mov)]
            a = st.cur[w]
            draw = _below(&st.rng, 100)
            w2 = -1
            if draw < home_percent:
                b = st.initial[w]
                if b == a or not st.shift_eval(w, b, &dl):
                    continue
                pen = _held_price(st, w, a, b, p)
            elif draw < home_percent + swap_percent:
                w2 = away[_below(&st.rng, n_away)] if focus else st.movable_idx[_below(&st.rng, n_mov)]
                b = st.cur[w2]
                if not st.swap_eval(w, w2, &dl):
                    continue
                pen = _held_price(st, w, a, b, p) + _held_price(st, w2, b, a, p)
            else:
                k = st.allowed_class[w]
                span = st.class_ptr[k + 1] - st.class_ptr[k]
                if span == 0:
                    continue
                b = st.class_hosts[st.class_ptr[k] + _below(&st.rng, span)]
                if not st.shift_eval(w, b, &dl):
                    continue
                pen = _held_price(st, w, a, b, p)
            if not (dl + pen < 0.0 or (plateau and dl == 0 and pen == 0.0)):
                continue
            if w2 >= 0:
                st.apply_shift(w2, a)
                _track(w2, a != st.initial[w2], &away[0], &pos[0], &n_away)
            st.apply_shift(w, b)
            _track(w, b != st.initial[w], &away[0], &pos[0], &n_away)
            accepted += 1
    return it, accepted, before - st.objective()


def home_sweep(MoveState st, bint plateau=True):
    """Every moved workload, in index order, tried back on its initial host; kept when the
    objective does not rise (with `plateau`) or falls. Ends a search: a move whose gain has
    gone since it was made still pays its move cost and holds transient room.

    Returns (evaluated, accepted)."""
    cdef intp_t w, n = st.n_workloads
    cdef int64_t dl = 0, evaluated = 0, accepted = 0
    with nogil:
        for w in range(n):
            if st.cur[w] == st.initial[w] or not st.movable[w]:
                continue
            evaluated += 1
            if st.shift_eval(w, st.initial[w], &dl) and (dl < 0 or (plateau and dl == 0)):
                st.apply_shift(w, st.initial[w])
                accepted += 1
    return evaluated, accepted


def priced_shift(MoveState st, intp_t w, intp_t b, price):
    """(feasible, objective delta, held-load price change) of moving w to b, as
    priced_search judges it (nothing changes). Python wrapper for tests."""
    cdef double[::1] pr = np.ascontiguousarray(price, dtype=np.float64)
    cdef int64_t dl = 0
    ok = st.shift_eval(w, b, &dl)
    return bool(ok), int(dl), float(_held_price(st, w, st.cur[w], b, &pr[0]))


def priced_swap(MoveState st, intp_t w1, intp_t w2, price):
    """(feasible, objective delta, held-load price change) of exchanging the hosts of w1
    and w2 (nothing changes). Python wrapper for tests."""
    cdef double[::1] pr = np.ascontiguousarray(price, dtype=np.float64)
    cdef int64_t dl = 0
    cdef intp_t a = st.cur[w1], b = st.cur[w2]
    ok = st.swap_eval(w1, w2, &dl)
    return bool(ok), int(dl), float(_held_price(st, w1, a, b, &pr[0]) + _held_price(st, w2, b, a, &pr[0]))
