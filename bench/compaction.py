"""Cell compaction for trace replays with churn (Verma et al., "Large-scale
cluster management at Google with Borg", EuroSys 2015, section 5.1).

A replay interleaves arrivals and departures in time order on the first
``n`` hosts of a fixed pool. The compacted size of a policy is the smallest
``n`` on which the whole replay runs with nothing refused, found by
bisection (a replay that succeeds on ``n`` hosts is assumed to succeed on
more, as Borg's operators assume; each probe is a full replay).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hci_scheduler import datasets


@dataclass(frozen=True)
class Replay:
    """A churn replay.

    Attributes
    ----------
    requests : (n, n_dims) int64
    events : (2n,) int64, row index r >= 0 = arrival of r, ~r = departure of r,
        in time order (departures first at equal times, so freed room is reusable).
    pool : (n_pool, n_dims) int64 host capacities; a probe uses the first n rows.
    name : str
    """

    requests: np.ndarray
    events: np.ndarray
    pool: np.ndarray
    name: str


def make_replay(name: str, reqs: datasets.Requests, pool: np.ndarray) -> Replay:
    n = reqs.n_requests
    times = np.concatenate([reqs.arrival, reqs.departure])
    kind = np.concatenate([np.ones(n), np.zeros(n)])  # departures (0) sort first
    codes = np.concatenate([np.arange(n), ~np.arange(n)])
    finite = np.isfinite(times)
    order = np.lexsort((kind[finite], times[finite]))
    return Replay(np.ascontiguousarray(reqs.requests), codes[finite][order], pool, name)


def google_replay(n_tasks: int, seed: int = 0) -> Replay:
    """Google 2011 tasks (SCHEDULE..end) on Google machines shuffled with `seed`."""
    reqs = datasets.google_lifetimes().head(n_tasks)
    pool = datasets.google_hosts().capacity
    rng = np.random.default_rng(seed)
    return make_replay(f"google2011 {n_tasks} tasks", reqs, pool[rng.permutation(pool.shape[0])])


def azure_replay(n_vms: int) -> Replay:
    """Azure 2017 VMs on identical 32-vCPU / 224 GiB hosts (the size Azure's README suggests)."""
    reqs = datasets.azure_vms().head(n_vms)
    host = np.array([32_000, 224 * 1024, 0, 0, 0], dtype=np.int64)
    return make_replay(f"azure2017 {n_vms} VMs", reqs, np.repeat(host[None, :], n_vms, axis=0))


def lower_bound(replay: Replay) -> int:
    """Smallest pool prefix whose total capacity covers the peak total demand, per dimension."""
    req = replay.requests
    active = np.zeros(req.shape[1], dtype=np.int64)
    peak = active.copy()
    for code in replay.events:
        if code >= 0:
            active += req[code]
        else:
            active -= req[~code]
        np.maximum(peak, active, out=peak)
    cum = np.cumsum(replay.pool, axis=0)
    need = [np.searchsorted(cum[:, k], peak[k]) + 1 for k in range(req.shape[1]) if peak[k] > 0]
    return int(max(need, default=0))


def replay_ours(replay: Replay, n_hosts: int, strategy: str):
    """Run the replay on our cluster; returns (ok, cluster)."""
    from hci_scheduler import Cluster

    cluster = Cluster.from_arrays(np.ascontiguousarray(replay.pool[:n_hosts]))
    row_of = np.full(replay.requests.shape[0], -1, dtype=np.int64)
    next_row = 0
    # Consecutive arrivals go in one place_array call: same result as one by one
    # (order="arrival" is online), far less Python overhead.
    ev = replay.events
    i = 0
    while i < ev.size:
        if ev[i] >= 0:
            j = i
            while j < ev.size and ev[j] >= 0:
                j += 1
            rows = ev[i:j]
            hosts = cluster.place_array(replay.requests[rows], strategy=strategy, order="arrival")
            if (hosts < 0).any():
                return False, cluster
            row_of[rows] = np.arange(next_row, next_row + rows.size)
            next_row += rows.size
            i = j
        else:
            j = i
            while j < ev.size and ev[j] < 0:
                j += 1
            cluster.release_array(row_of[~ev[i:j]])
            i = j
    return True, cluster


def replay_numpy(replay: Replay, n_hosts: int, fit: str = "best"):
    """Run the replay with the plain numpy best fit (or first fit); returns (ok, used)."""
    cap = replay.pool[:n_hosts]
    free = cap.astype(np.int64, copy=True)
    scale = 1.0 / np.maximum(cap, 1)
    where = np.full(replay.requests.shape[0], -1, dtype=np.int64)
    for code in replay.events:
        if code < 0:
            r = ~code
            free[where[r]] += replay.requests[r]
            continue
        r = replay.requests[code]
        fits = (free >= r).all(axis=1)
        if not fits.any():
            return False, cap - free
        if fit == "first":
            h = int(np.argmax(fits))
        else:
            left = ((free - r) * scale).sum(axis=1)
            left[~fits] = np.inf
            h = int(np.argmin(left))
        free[h] -= r
        where[code] = h
    return True, cap - free


def compact(probe, lo: int, hi: int) -> int:
    """Smallest n in [lo, hi] with probe(n) true, by bisection; hi is returned if none smaller."""
    while lo < hi:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def run(replay: Replay, strategies, include_peers=True, progress=None) -> dict:
    lb = lower_bound(replay)
    hi = replay.pool.shape[0]
    out = {"replay": replay.name, "events": int(replay.events.size), "lower_bound": lb, "policies": {}}
    policies = [(f"ours/{s}", (lambda n, s=s: replay_ours(replay, n, s)[0])) for s in strategies]
    if include_peers:
        policies += [("numpy best-fit", lambda n: replay_numpy(replay, n, "best")[0]),
                     ("numpy first-fit", lambda n: replay_numpy(replay, n, "first")[0])]
    bar = progress(total=len(policies), desc=f"compaction {replay.name}") if progress else None
    for name, probe in policies:
        if not probe(hi):
            out["policies"][name] = {"hosts": None, "note": "does not fit the whole pool"}
        else:
            n = compact(probe, max(lb, 1), hi)
            out["policies"][name] = {"hosts": n, "ratio_to_lower_bound": n / lb if lb else None}
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out


def final_state(replay: Replay, n_hosts: int, strategy: str = "binpack") -> tuple[np.ndarray, float]:
    """Utilisation and stranded capacity after replaying on ``n_hosts`` hosts.

    Returns
    -------
    utilisation : ndarray of float64, shape (n_hosts, n_dims)
        used / allocatable per host and dimension.
    stranded : float
        Free capacity on used hosts into which no request of the replay fits,
        over the used hosts' capacity (mean over dimensions with capacity).
    """
    _ok, cluster = replay_ours(replay, n_hosts, strategy)
    alloc = cluster.allocatable()
    used = cluster.usage()
    with np.errstate(divide="ignore", invalid="ignore"):
        util = np.where(alloc > 0, used / alloc, 0.0)
    busy = used.any(axis=1)
    free = (alloc - used)[busy]
    probe = np.unique(replay.requests, axis=0)
    fits_any = np.zeros(free.shape[0], dtype=bool)
    for chunk in np.array_split(probe, max(1, probe.shape[0] // 256)):
        fits_any |= (free[:, None, :] >= chunk[None, :, :]).all(axis=2).any(axis=1)
    total = alloc[busy].sum(axis=0).astype(np.float64)
    dims = total > 0
    stranded = free[~fits_any].sum(axis=0)
    return util, float(np.mean(stranded[dims] / total[dims])) if dims.any() else 0.0
