import numpy as np
import pytest

from hci_scheduler.bench import peers


def _cap(n_hosts, *cap):
    return np.repeat(np.array([cap], dtype=np.int64), n_hosts, axis=0)


def test_best_fit_prefers_tighter_host():
    # host0 free 10, host1 free 6; request 5 -> host1 leaves 1 (tighter than 5)
    cap = np.array([[10], [6]], dtype=np.int64)
    assert peers.numpy_best_fit(cap, np.array([[5]], dtype=np.int64)).tolist() == [1]


def test_best_fit_refuses_what_does_not_fit():
    cap = _cap(1, 4, 4)
    out = peers.numpy_best_fit(cap, np.array([[3, 3], [2, 2]], dtype=np.int64))
    assert out.tolist() == [0, -1]


def test_ffd_known_answer():
    # sizes 6,5,4,3,2 in bins of 10: FFD -> {6,4}, {5,3,2} = 2 bins (optimal)
    items = np.array([[5], [2], [6], [3], [4]], dtype=np.int64)
    out = peers.ffd_python(_cap(5, 10), items)
    assert peers.hosts_used(out) == 2 and peers.check_feasible(_cap(5, 10), items, out)


def test_cpsat_finds_optimum_where_ffd_does_not():
    # 1-D, capacity 10: sizes 4,4,3,3,3,3 -> optimum 2 ({4,3,3},{4,3,3}); FFD: {4,4},{3,3,3},{3} = 3
    items = np.array([[4], [4], [3], [3], [3], [3]], dtype=np.int64)
    cap = _cap(6, 10)
    assert peers.hosts_used(peers.ffd_python(cap, items)) == 3
    res = peers.cpsat_exact(cap, items, time_limit_s=10)
    assert res.status == "OPTIMAL" and res.hosts == 2 and res.bound == 2
    assert peers.check_feasible(cap, items, res.assignment)


def test_cpsat_respects_hint_host_cap():
    items = np.array([[4, 1], [4, 1], [3, 9]], dtype=np.int64)
    cap = _cap(3, 10, 10)
    hint = np.array([0, 1, 2], dtype=np.int64)
    res = peers.cpsat_exact(cap, items, time_limit_s=5, hint=hint)
    # {4,4} share a host on both dims (8, 2), [3, 9] alone -> 2
    assert res.hosts == 2 and set(res.assignment.tolist()) <= {0, 1, 2}


def test_binpacking_projection_is_a_relaxation():
    # vector: [6,1],[1,6],[5,5] cap 10 -> each pair conflicts on one dim; 1-D max projection = 2
    items = np.array([[6, 1], [1, 6], [5, 5]], dtype=np.int64)
    cap = _cap(3, 10, 10)
    assert peers.binpacking_1d(cap, items) == 2
    with pytest.raises(ValueError):
        peers.binpacking_1d(np.array([[10, 10], [5, 5]], dtype=np.int64), items)


def test_dominant_share_order_is_stable():
    cap = _cap(2, 10, 100)
    req = np.array([[1, 50], [5, 0], [1, 50], [2, 2]], dtype=np.int64)
    # shares (of total 20, 200): .25, .25, .25, .1 -> ties keep arrival order
    assert peers.dominant_share_order(cap, req).tolist() == [0, 1, 2, 3]


def test_stranded_fraction_counts_unusable_free_space():
    # host0 cap 10 holds 7 -> free 3; smallest request 4 -> stranded 3 of 10.
    # host1 cap 10 holds 4 -> free 6 >= 4 -> usable. Used capacity 20 -> 3/20 = 0.15
    cap = np.array([[10], [10], [10]], dtype=np.int64)
    req = np.array([[7], [4]], dtype=np.int64)
    assert peers.stranded_fraction(cap, req, np.array([0, 1])) == pytest.approx(0.15)
    assert peers.stranded_fraction(cap, req, np.array([-1, -1])) == 0.0
