"""pytest-benchmark micro-benchmarks (run with `pytest bench`; not in the default testpaths).

Each benchmark checks its setup first, so a failed plan is never timed.
"""
import numpy as np
import pytest

from . import peers
from .workloads import host_pool, request_stream

pytest.importorskip("pytest_benchmark")
SIZES = (1_000, 10_000, 50_000)


@pytest.fixture(scope="module")
def stream():
    req, _ = request_stream(5_000)
    return req


@pytest.mark.parametrize("n_hosts", SIZES)
@pytest.mark.parametrize("strategy", ("binpack", "spread", "balanced", "dot"))
def test_place_array_online(benchmark, stream, n_hosts, strategy):
    from hci_scheduler import Cluster

    capacity, _ = host_pool(n_hosts)

    def setup():
        return (Cluster.from_arrays(capacity),), {}

    def place(cluster):
        hosts = cluster.place_array(stream, strategy=strategy, order="arrival")
        assert (hosts >= 0).all()

    benchmark.extra_info["placements"] = len(stream)
    benchmark.pedantic(place, setup=setup, rounds=5)


@pytest.mark.parametrize("n_hosts", SIZES)
def test_single_placement(benchmark, stream, n_hosts):
    from hci_scheduler import Cluster

    capacity, _ = host_pool(n_hosts)
    cluster = Cluster.from_arrays(capacity)
    assert (cluster.place_array(stream[:4000]) >= 0).all()
    row = stream[4000:4001]
    benchmark(lambda: cluster.place_array(row))


@pytest.mark.parametrize("n_hosts", (1_000, 10_000))
def test_numpy_best_fit_peer(benchmark, stream, n_hosts):
    capacity, _ = host_pool(n_hosts)
    req = stream[:200]
    out = benchmark.pedantic(peers.numpy_best_fit, args=(capacity, req), rounds=3)
    assert (out >= 0).all()


def test_improve_assignment_budget(benchmark):
    from hci_scheduler.improve import improve_assignment

    rng = np.random.default_rng(0)
    req = rng.integers(5, 45, size=(200, 5)).astype(np.int64)
    free = np.full((200, 5), 100, dtype=np.int64)
    greedy = peers.numpy_best_fit(free, req, order="largest_first")
    out = benchmark.pedantic(improve_assignment, args=(free, req, greedy, 0.2), rounds=3)
    assert peers.hosts_used(out) <= peers.hosts_used(greedy)
