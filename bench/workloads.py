"""Workloads for the latency and compaction suites, from the traces when present.

When the shared traces are missing, the documented synthetic distributions
of :func:`hci_scheduler.datasets.synthetic` stand in (and results say so).
"""
from __future__ import annotations

import numpy as np

from hci_scheduler import datasets


def host_pool(n_hosts: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n_hosts`` hosts sampled (with replacement, seeded) from the Google 2011 machines.

    Returns
    -------
    capacity : ndarray of int64, shape (n_hosts, 5)
    source : str
    """
    rng = np.random.default_rng(seed)
    try:
        pool = datasets.google_hosts().capacity
        source = "google2011 machines (sampled)"
    except datasets.DatasetUnavailable:
        pool = np.repeat(datasets.SYNTHETIC_HOST[None, :], 16, axis=0)
        source = "synthetic 64-core hosts"
    return np.ascontiguousarray(pool[rng.integers(0, pool.shape[0], size=n_hosts)]), source


def request_stream(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` requests: Google 2011 SUBMIT rows in trace order, cycled if needed."""
    try:
        req = datasets.google_submits().requests
        req = req[(req[:, :2] > 0).any(axis=1)]  # rows with no known request say nothing
        source = "google2011 task SUBMIT rows"
    except datasets.DatasetUnavailable:
        req = datasets.synthetic("correlated", max(n, 1), seed=seed) // 8
        source = "synthetic correlated (1/8 scale)"
    reps = -(-n // req.shape[0])
    return np.ascontiguousarray(np.tile(req, (reps, 1))[:n]), source
