"""Plain-numpy reference implementations, written independently of the core.

Tests compare the compiled kernels against these on random inputs.
"""
from __future__ import annotations

import numpy as np


def free_key(free: np.ndarray, inv_ref: np.ndarray) -> np.ndarray:
    """sum_d free[:, d] * inv_ref[d], summed left to right as the kernel does."""
    key = np.zeros(free.shape[0])
    for d in range(free.shape[1]):
        key = key + free[:, d] * inv_ref[d]
    return key


def select(strategy: str, free, used, limit, load, schedulable, request, inv_ref) -> int:
    """The host row a strategy picks for `request`, or -1 (ties to the lowest row)."""
    ok = schedulable & (free >= request).all(axis=1)
    if not ok.any():
        return -1
    if strategy in ("binpack", "spread"):
        key = free_key(free, inv_ref)
        if strategy == "binpack":
            return int(np.argmin(np.where(ok, key, np.inf)))
        return int(np.argmax(np.where(ok, key, -np.inf)))
    if strategy == "balanced":
        use = (request > 0)[None, :] & (limit > 0)
        frac = np.where(use, (used + request) / np.where(limit > 0, limit, 1), 0.0)
        n = use.sum(axis=1)
        s = frac.sum(axis=1)
        s2 = (frac * frac).sum(axis=1)
        var = np.where(n > 0, s2 / np.maximum(n, 1) - (s / np.maximum(n, 1)) ** 2, 0.0)
        return int(np.argmin(np.where(ok, var, np.inf)))
    if strategy == "dot":
        score = ((request * inv_ref)[None, :] * (free * inv_ref)).sum(axis=1)
        open_ok = ok & (load > 0)
        pool = open_ok if open_ok.any() else ok
        return int(np.argmax(np.where(pool, score, -np.inf)))
    raise ValueError(strategy)


def usage_from_assignments(n_hosts: int, n_dims: int, hosts: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """Recompute per-host usage from an assignment (host row per request, -1 unplaced)."""
    usage = np.zeros((n_hosts, n_dims), dtype=np.int64)
    placed = hosts >= 0
    np.add.at(usage, hosts[placed], requests[placed])
    return usage
