"""Latency suite: placements per second and per-placement latency at 1k/10k/50k hosts.

For each cluster size, strategy and order we place the same trace-derived
request stream on a fresh cluster:

* throughput: one ``place_array`` call over ``n_batch`` requests
  (placements/s = placed rows / wall time);
* latency: ``n_single`` single-row ``place_array`` calls on a cluster
  pre-filled by the batch, timing each (p50, p99 in microseconds);
* peer: the plain numpy best fit (`bench.peers.numpy_best_fit`) on the first
  ``n_peer`` requests of the same stream and the same hosts, in the same
  process. The speed ratio compares placements/s on that prefix; density
  compares hosts used by ours and by the peer on that same prefix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import peers
from .density import STRATEGIES
from .workloads import host_pool, request_stream

ORDERS = ("arrival", "largest_first")


@dataclass
class LatencyConfig:
    sizes: tuple = (1_000, 10_000, 50_000)
    n_batch: int = 100_000
    n_single: int = 2_000
    n_peer: int = 2_000
    strategies: tuple = STRATEGIES
    orders: tuple = ORDERS
    seed: int = 0


def _ours_prefix(capacity, req, strategy, order):
    from hci_scheduler import Cluster

    cluster = Cluster.from_arrays(capacity)
    t0 = time.perf_counter()
    hosts = cluster.place_array(req, strategy=strategy, order=order)
    return hosts, time.perf_counter() - t0


def run_one(capacity: np.ndarray, stream: np.ndarray, strategy: str, order: str,
            cfg: LatencyConfig, peer_cache: dict) -> dict:
    from hci_scheduler import Cluster

    n_hosts = capacity.shape[0]
    batch = stream[: cfg.n_batch]
    cluster = Cluster.from_arrays(capacity)
    t0 = time.perf_counter()
    hosts = cluster.place_array(batch, strategy=strategy, order=order)
    batch_s = time.perf_counter() - t0
    placed = int((hosts >= 0).sum())
    # Setup check: the run must have placed work, or the timing means nothing.
    if placed == 0:
        raise RuntimeError(f"{strategy}/{order} at {n_hosts} hosts placed nothing")
    singles = stream[cfg.n_batch: cfg.n_batch + cfg.n_single]
    lat = np.empty(singles.shape[0])
    for i in range(singles.shape[0]):
        row = singles[i: i + 1]
        t = time.perf_counter()
        cluster.place_array(row, strategy=strategy, order=order)
        lat[i] = time.perf_counter() - t
    # Same prefix, same hosts: ours vs the numpy best fit.
    prefix = stream[: cfg.n_peer]
    ours_hosts, ours_s = _ours_prefix(capacity, prefix, strategy, order)
    key = (n_hosts, order)
    if key not in peer_cache:
        t0 = time.perf_counter()
        a = peers.numpy_best_fit(capacity, prefix, order=order)
        peer_cache[key] = (a, time.perf_counter() - t0)
    peer_a, peer_s = peer_cache[key]
    ours_rate = (ours_hosts >= 0).sum() / ours_s
    peer_rate = (peer_a >= 0).sum() / peer_s
    return {
        "n_hosts": n_hosts, "strategy": strategy, "order": order,
        "n_batch": int(batch.shape[0]), "placed": placed, "batch_s": batch_s,
        "placements_per_s": placed / batch_s,
        "p50_us": float(np.percentile(lat, 50) * 1e6) if lat.size else None,
        "p99_us": float(np.percentile(lat, 99) * 1e6) if lat.size else None,
        "hosts_used_batch": cluster.hosts_used(),
        "prefix": int(prefix.shape[0]),
        "prefix_rate_ours": float(ours_rate), "prefix_rate_numpy": float(peer_rate),
        "speedup_vs_numpy": float(ours_rate / peer_rate),
        "hosts_ours_prefix": peers.hosts_used(ours_hosts),
        "hosts_numpy_prefix": peers.hosts_used(peer_a),
        "placed_ours_prefix": int((ours_hosts >= 0).sum()),
        "placed_numpy_prefix": int((peer_a >= 0).sum()),
    }


def run(cfg: LatencyConfig, progress=None) -> dict:
    """Run every (size, strategy, order); returns rows plus the workload sources."""
    stream, req_source = request_stream(cfg.n_batch + cfg.n_single, seed=cfg.seed)
    rows = []
    combos = [(n, s, o) for n in cfg.sizes for o in cfg.orders for s in cfg.strategies]
    bar = progress(total=len(combos), desc="latency") if progress else None
    pools = {}
    peer_cache: dict = {}
    for n_hosts, strategy, order in combos:
        if n_hosts not in pools:
            pools[n_hosts], host_source = host_pool(n_hosts, seed=cfg.seed)
        rows.append(run_one(pools[n_hosts], stream, strategy, order, cfg, peer_cache))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    _, host_source = host_pool(1, seed=cfg.seed)
    return {"rows": rows, "requests": req_source, "hosts": host_source, "dims": 5}
