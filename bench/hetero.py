"""Heterogeneous cells: repacking a live set onto mixed machine shapes (issue 14).

Two cells, each a sample of real machines and the requests live on it at one
moment of a real trace:

- google2011: machines sampled (without replacement, seeded) from the Google 2011
  machine table at the trace's start; the task lifetimes of the shared window
  (SCHEDULE to FINISH/FAIL/KILL/EVICT/LOST) replayed onto them one by one with
  ``place_array`` (binpack, arrival order, departures first at equal times); the
  tasks live at the end are the live set. Seed 238 and 1,165 machines give the
  issue's cell (20,808 live tasks).
- alibaba_pai: machines sampled from the Alibaba PAI 2020 machine table (cpu,
  memory, gpu); the Azure 2017 VMs alive at ``azure_at_s`` (arrived, not yet
  departed) are the live set: real VM sizes on real machine shapes (the PAI
  task table is not in shared/data).

Each live set is then repacked from scratch on an empty copy of the cell with
``place_array(order="largest_first")`` (greedy, and with ``improve_s``), and by
the peer: first-fit decreasing opening the hosts richest in the demand's
bottleneck dimension first (for Google, memory). Reported beside each: the
covering bound (``bounds.covering_bound``: fewest machines of the cell whose
summed capacity covers the live demand) and the split bound
(``bounds.split_by_shape``: every request goes whole to one machine shape; at
least the covering bound), and hosts used / covering bound. Every packing is
checked feasible by recomputing usage from the assignment.

The rebalancer's consolidation on the same cell (``rebalance_s`` > 0): the live set placed
one by one as named workloads (binpack, arrival order), then
``Cluster.rebalance("consolidate")`` with no move limit; the plan is replayed step by
step by the independent checker (violations must be 0), applied, and the usage
recomputed from the placements.

Packing by patterns on the same cell (``patterns_s`` > 0, ``hci_scheduler.patterns``):
column generation over what one machine of each shape can hold, seeded with the
greedy packing; its Lagrangian bound is a lower bound on any packing, tighter than
the covering and split bounds, and its integer master's packing is checked feasible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hci_scheduler import Cluster, datasets
from hci_scheduler.bounds import covering_bound, split_by_shape
from hci_scheduler.model import Host, Workload
from hci_scheduler.patterns import pack_by_patterns

from . import peers


@dataclass
class HeteroConfig:
    google_hosts: int = 1165
    google_seed: int = 238
    alibaba_hosts: int = 600
    alibaba_seed: int = 238
    azure_at_s: float = 1_900_000.0
    improve_s: float = 5.0
    rebalance_s: float = 0.0          # the command line runs it (60 s); the density suite does not
    patterns_s: float = 0.0           # likewise (column generation, hetero.md figures with 300 s)


@dataclass(frozen=True)
class Cell:
    name: str
    capacity: np.ndarray      # (n_hosts, n_dims) int64
    live: np.ndarray          # (n_live, n_dims) int64
    dimensions: tuple


def google_cell(n_hosts: int = 1165, seed: int = 238) -> Cell:
    """The Google 2011 cell of issue 14: replay the window, keep what is live at its end."""
    pool = datasets.google_hosts().capacity[:, :2]
    rng = np.random.default_rng(seed)
    cap = np.ascontiguousarray(pool[rng.choice(pool.shape[0], size=n_hosts, replace=False)])
    cluster = Cluster.from_arrays(cap, dimensions=("cpu", "memory"))
    life = datasets.google_lifetimes()
    req = np.ascontiguousarray(life.requests[:, :2])
    n = req.shape[0]
    times = np.concatenate([life.arrival, life.departure])
    kind = np.concatenate([np.ones(n), np.zeros(n)])       # departures (0) first at equal times
    codes = np.concatenate([np.arange(n), ~np.arange(n)])
    finite = np.isfinite(times)
    events = codes[finite][np.lexsort((kind[finite], times[finite]))]
    array_row = np.full(n, -1, dtype=np.int64)             # the task's array row while it runs
    next_row = 0
    for code in events.tolist():
        if code >= 0:
            placed = cluster.place_array(req[code:code + 1])[0] >= 0
            array_row[code] = next_row if placed else -1
            next_row += 1
        elif array_row[~code] >= 0:
            cluster.release_array(np.array([array_row[~code]]))
            array_row[~code] = -1
    return Cell(f"google2011 {n_hosts} machines seed {seed}", cap,
                np.ascontiguousarray(req[array_row >= 0]), ("cpu", "memory"))


def alibaba_cell(n_hosts: int = 600, seed: int = 238, at_s: float = 1_900_000.0) -> Cell:
    """Alibaba PAI machines (cpu, memory, gpu) with the Azure 2017 VMs alive at `at_s`."""
    pool = datasets.alibaba_hosts().capacity[:, [0, 1, 4]]
    rng = np.random.default_rng(seed)
    cap = np.ascontiguousarray(pool[rng.choice(pool.shape[0], size=n_hosts, replace=False)])
    vms = datasets.azure_vms()
    alive = (vms.arrival <= at_s) & (vms.departure > at_s)
    live = np.zeros((int(alive.sum()), 3), dtype=np.int64)
    live[:, :2] = vms.requests[alive][:, :2]
    return Cell(f"alibaba_pai {n_hosts} machines seed {seed}, azure2017 VMs at {at_s:.0f} s", cap,
                np.ascontiguousarray(live), ("cpu", "memory", "gpu"))


def rich_first(capacity: np.ndarray, demand: np.ndarray) -> np.ndarray:
    """Host order for the peer: richest first in the demand's bottleneck dimension (the one
    the whole cell covers least), then in the others; stable."""
    share = demand / np.maximum(capacity.sum(axis=0), 1)
    dims = np.argsort(-share, kind="stable")
    return np.lexsort(tuple(-capacity[:, d] for d in dims[::-1]))


def ffd_rich_first(capacity: np.ndarray, requests: np.ndarray) -> np.ndarray:
    """The peer: first-fit decreasing over the hosts in `rich_first` order."""
    order = rich_first(capacity, requests.sum(axis=0))
    out = peers.ffd_python(capacity[order], requests)
    return np.where(out >= 0, order[np.maximum(out, 0)], -1)


def _ours(cell: Cell, improve_s: float, strategy: str = "binpack") -> tuple[np.ndarray, float]:
    cluster = Cluster.from_arrays(cell.capacity, dimensions=cell.dimensions)
    t0 = time.perf_counter()
    hosts = cluster.place_array(cell.live, strategy=strategy, order="largest_first", improve_s=improve_s)
    seconds = time.perf_counter() - t0
    if (hosts < 0).any() or not peers.check_feasible(cell.capacity, cell.live, hosts):
        raise RuntimeError(f"{cell.name}: place_array left rows out or overcommitted a host")
    return hosts, seconds


def _by_patterns(cell: Cell, seed: np.ndarray, time_limit_s: float) -> dict:
    """Column generation over host patterns, seeded with the greedy packing: its
    proven bound and the packing its integer master picks (checked feasible here)."""
    result = pack_by_patterns(cell.capacity, cell.live, [seed], time_limit_s=time_limit_s)
    if not peers.check_feasible(cell.capacity, cell.live, result.hosts):
        raise RuntimeError(f"{cell.name}: the pattern packing overcommitted a host")
    return {"pattern_bound": result.bound, "pattern_lp": result.lp, "pattern_converged": result.converged,
            "pattern_rounds": result.rounds, "patterns": result.patterns,
            "pattern_used": peers.hosts_used(result.hosts), "pattern_s": result.seconds}


def _rebalanced(cell: Cell, time_limit_s: float) -> dict:
    """The live set placed online as named workloads, then consolidated by the rebalancer
    with no move limit; hosts used before and after, moves, plan seconds, violations."""
    from hci_scheduler.rebalance.validate import replay_plan

    from .rebalance import check_usage, hosts_used

    dims = cell.dimensions
    cluster = Cluster(dims)
    cluster.add_hosts([Host(f"m{i}", dict(zip(dims, map(int, row)))) for i, row in enumerate(cell.capacity)])
    for i, row in enumerate(cell.live.tolist()):
        cluster.place(Workload(f"w{i}", {d: v for d, v in zip(dims, row) if v}))
    before = hosts_used(cluster)
    t0 = time.perf_counter()
    plan = cluster.rebalance("consolidate", time_limit_s=time_limit_s, seed=0)
    seconds = time.perf_counter() - t0
    violations = len(replay_plan(cluster, plan))
    cluster.apply(plan)
    check_usage(cluster)
    if violations:
        raise RuntimeError(f"{cell.name}: the consolidation plan replayed with {violations} violations")
    return {"rebalance_before": before, "rebalanced": hosts_used(cluster), "rebalance_moves": len(plan.moves),
            "rebalance_s": seconds, "rebalance_violations": violations}


def run_cell(cell: Cell, improve_s: float, rebalance_s: float = 0.0, patterns_s: float = 0.0) -> dict:
    """One result row: hosts used by ours (greedy, improved) and the peer, and the bounds."""
    demand = cell.live.sum(axis=0)
    bound = covering_bound(cell.capacity, demand, time_limit_s=10.0)
    shapes, available = np.unique(cell.capacity, axis=0, return_counts=True)
    kinds, kind_count = np.unique(cell.live, axis=0, return_counts=True)
    split = split_by_shape(shapes, available, kinds, kind_count, time_limit_s=30.0, det_time=20.0)
    row = {"cell": cell.name, "n_hosts": int(cell.capacity.shape[0]), "n_live": int(cell.live.shape[0]),
           "n_shapes": len(shapes), "covering_bound": bound,
           "split_bound": None if split is None else split.bound}
    greedy, row["greedy_s"] = _ours(cell, 0.0)
    row["greedy"] = peers.hosts_used(greedy)
    if improve_s > 0:
        improved, row["improved_s"] = _ours(cell, improve_s)
        row["improved"] = peers.hosts_used(improved)
    t0 = time.perf_counter()
    a = ffd_rich_first(cell.capacity, cell.live)
    row["ffd_rich_first_s"] = time.perf_counter() - t0
    if (a < 0).any() or not peers.check_feasible(cell.capacity, cell.live, a):
        raise RuntimeError(f"{cell.name}: the FFD peer left rows out or overcommitted a host")
    row["ffd_rich_first"] = peers.hosts_used(a)
    best = min(row["greedy"], row.get("improved", row["greedy"]))
    row["best"] = best
    row["best_over_covering"] = best / bound
    row["ffd_over_covering"] = row["ffd_rich_first"] / bound
    if rebalance_s > 0:
        row.update(_rebalanced(cell, rebalance_s))
        row["rebalanced_over_covering"] = row["rebalanced"] / bound
    if patterns_s > 0:
        row.update(_by_patterns(cell, greedy, patterns_s))
        row["pattern_used_over_covering"] = row["pattern_used"] / bound
    return row


def run(cfg: HeteroConfig | None = None) -> list[dict]:
    """Both cells; rows for results.json (a cell whose data is missing is skipped)."""
    cfg = cfg or HeteroConfig()
    rows = []
    builders = [lambda: google_cell(cfg.google_hosts, cfg.google_seed),
                lambda: alibaba_cell(cfg.alibaba_hosts, cfg.alibaba_seed, cfg.azure_at_s)]
    for build in builders:
        try:
            cell = build()
        except datasets.DatasetUnavailable as exc:
            rows.append({"cell": None, "skipped": str(exc)})
            continue
        rows.append(run_cell(cell, cfg.improve_s, cfg.rebalance_s, cfg.patterns_s))
    return rows


def report_lines(rows: list[dict]) -> list[str]:
    """Plain-text table for the suite's report."""
    out = [("cell | hosts | live | covering bound | split bound | ours greedy | ours improved | "
            "FFD rich-first | ours/bound | FFD/bound | rebalancer before -> after (moves, s) | rebalancer/bound | "
            "patterns: bound (LP) -> used (s)")]
    for r in rows:
        if r.get("cell") is None:
            out.append(f"skipped: {r['skipped']}")
            continue
        out.append(f"{r['cell']} | {r['n_hosts']} | {r['n_live']} | {r['covering_bound']} | {r['split_bound']} | "
                   f"{r['greedy']} | {r.get('improved', '-')} | {r['ffd_rich_first']} | "
                   f"{r['best_over_covering']:.3f} | {r['ffd_over_covering']:.3f} | "
                   + (f"{r['rebalance_before']} -> {r['rebalanced']} ({r['rebalance_moves']}, "
                      f"{r['rebalance_s']:.1f}) | {r['rebalanced_over_covering']:.3f}" if "rebalanced" in r else "- | -")
                   + (f" | {r['pattern_bound']} ({r['pattern_lp']:.2f}{'' if r['pattern_converged'] else ', not converged'})"
                      f" -> {r['pattern_used']} ({r['pattern_s']:.0f})" if "pattern_used" in r else " | -"))
    return out


if __name__ == "__main__":
    import json
    import sys

    args = [float(a) for a in sys.argv[1:]]
    result = run(HeteroConfig(improve_s=args[0] if len(args) > 0 else 5.0,
                              rebalance_s=args[1] if len(args) > 1 else 60.0,
                              patterns_s=args[2] if len(args) > 2 else 300.0))
    print("\n".join(report_lines(result)))
    json.dump(result, sys.stdout, indent=1)
