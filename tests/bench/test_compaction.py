import numpy as np

from hci_scheduler import datasets
from hci_scheduler.bench import compaction


def test_compact_finds_smallest_passing_size():
    calls = []

    def probe(n):
        calls.append(n)
        return n >= 37

    assert compaction.compact(probe, 1, 100) == 37
    assert len(calls) <= 7  # bisection: ceil(log2(100))


def _tiny_replay():
    # three items of 6 on hosts of 10; item 0 leaves before item 2 arrives,
    # so two hosts suffice (three without the departure).
    reqs = datasets.Requests(
        requests=np.array([[6], [6], [6]], dtype=np.int64),
        arrival=np.array([0.0, 1.0, 3.0]),
        departure=np.array([2.0, np.inf, np.inf]),
    )
    pool = np.full((5, 1), 10, dtype=np.int64)
    return compaction.make_replay("tiny", reqs, pool)


def test_replay_orders_departures_before_arrivals_at_equal_time():
    reqs = datasets.Requests(np.array([[6], [6]], dtype=np.int64),
                             np.array([0.0, 2.0]), np.array([2.0, np.inf]))
    rep = compaction.make_replay("t", reqs, np.full((2, 1), 10, dtype=np.int64))
    assert rep.events.tolist() == [0, ~0, 1]  # the departure at t=2 precedes the arrival


def test_tiny_replay_compacts_to_two_hosts():
    rep = _tiny_replay()
    assert compaction.lower_bound(rep) == 2  # peak demand 12 > one host of 10
    ok, _ = compaction.replay_numpy(rep, 1)
    assert not ok
    res = compaction.run(rep, ("binpack",))
    assert res["policies"]["ours/binpack"]["hosts"] == 2
    assert res["policies"]["numpy best-fit"]["hosts"] == 2
    util, stranded = compaction.final_state(rep, 2)
    # after the replay: items 1 and 2 (6 each) on the two hosts; free 4 < 6 -> all stranded
    assert util.shape == (2, 1) and np.allclose(util[:, 0], 0.6)
    assert stranded == 0.4
