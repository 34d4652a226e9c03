"""Density suite: hosts used on the vector bin packing instances, ours vs peers.

Every instance becomes a cluster of ``n_items`` identical hosts (enough for
any packing); we count the hosts a placement uses and divide by the known
optimum (or the best lower bound where none is known).

The suite also runs the heterogeneous cells of `bench/hetero.py` (real machine
shapes, a live set from a real trace, the covering bound beside every result):
their rows carry ``kind = "hetero"`` and ``optimum = None``, and `summarise`
reports them apart (``summary["heterogeneous"]``), never in the vbp averages.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from hci_scheduler import datasets

from . import peers

STRATEGIES = ("binpack", "spread", "balanced", "dot")
# Greedy configurations tried for "our best batch result" (all largest_first).
GREEDY_STRATEGIES = ("binpack", "dot", "balanced")


@dataclass
class DensityConfig:
    """What the suite runs.

    Attributes
    ----------
    improve_s : float
        ``improve_s`` handed to ``place_array`` for the improved run.
    improve_stride : int
        Run the improved configuration on every ``improve_stride``-th
        known-optimum instance (1 = all). Greedy runs cover every instance.
    known_only : bool
        Only instances with a proven optimum.
    cpsat_max_items, cpsat_time_s, cpsat_stride : CP-SAT peer scope.
    hetero : bool
        Also run the heterogeneous cells (bench/hetero.py).
    hetero_improve_s : float
        ``improve_s`` of the improved run on those cells.
    hetero_patterns_s : float
        Time limit of packing by patterns on those cells (its bound proves the optimum
        once converged: about 25 s on the Google cell); 0 skips it.
    peer_stride : int
        Run the numpy/FFD/binpacking peers on every ``peer_stride``-th instance.
    """

    improve_s: float = 0.5
    improve_stride: int = 1
    known_only: bool = False
    cpsat_max_items: int = 60
    cpsat_time_s: float = 5.0
    cpsat_stride: int = 1
    peer_stride: int = 1
    instance_stride: int = 1
    names: list = field(default_factory=list)
    hetero: bool = True
    hetero_improve_s: float = 5.0
    hetero_patterns_s: float = 60.0


def _ours(capacity, items, strategy, improve_s):
    from hci_scheduler import Cluster

    cluster = Cluster.from_arrays(capacity)
    t0 = time.perf_counter()
    hosts = cluster.place_array(items, strategy=strategy, order="largest_first", improve_s=improve_s)
    seconds = time.perf_counter() - t0
    if (hosts < 0).any():
        raise RuntimeError("a vbp item did not fit on an empty host: the cluster refused it")
    if not peers.check_feasible(capacity, items, hosts):
        raise RuntimeError(f"{strategy}: infeasible packing returned by place_array")
    return peers.hosts_used(hosts), seconds, peers.stranded_fraction(capacity, items, hosts)


def run_instance(inst: datasets.VbpInstance, cfg: DensityConfig, *, improve: bool,
                 run_peers: bool, run_cpsat: bool) -> dict:
    """Run every configuration on one instance; returns one result row."""
    capacity = np.repeat(inst.capacity[None, :], inst.n_items, axis=0)
    items = np.ascontiguousarray(inst.items)
    row = {
        "instance": inst.name, "family": inst.family, "n_items": inst.n_items, "dims": inst.dims,
        "optimum": inst.optimum, "lower_bound": inst.lower_bound, "reference": inst.reference,
        "best_known_solution": inst.best_known_solution, "volume_bound": inst.volume_bound(),
        "clipped": inst.n_clipped > 0, "greedy": {}, "greedy_s": {},
    }
    for strategy in STRATEGIES:
        hosts, seconds, stranded = _ours(capacity, items, strategy, 0.0)
        row["greedy"][strategy] = hosts
        row["greedy_s"][strategy] = seconds
        if strategy == "binpack":
            row["stranded_greedy_binpack"] = stranded
    if improve:
        hosts, seconds, stranded = _ours(capacity, items, "binpack", cfg.improve_s)
        row["improved"] = hosts
        row["improved_s"] = seconds
        row["stranded_improved"] = stranded
    row["best"] = min([row["greedy"][s] for s in GREEDY_STRATEGIES]
                      + ([row["improved"]] if improve else []))
    if run_peers:
        t0 = time.perf_counter()
        a = peers.numpy_best_fit(capacity, items, order="arrival")
        row["numpy_best_fit"], row["numpy_best_fit_s"] = peers.hosts_used(a), time.perf_counter() - t0
        t0 = time.perf_counter()
        a = peers.ffd_python(capacity, items)
        row["ffd_python"], row["ffd_python_s"] = peers.hosts_used(a), time.perf_counter() - t0
        t0 = time.perf_counter()
        row["binpacking_1d"] = peers.binpacking_1d(capacity, items)
        row["binpacking_1d_s"] = time.perf_counter() - t0
    if run_cpsat:
        res = peers.cpsat_exact(capacity, items, time_limit_s=cfg.cpsat_time_s)
        row["cpsat"] = {"hosts": res.hosts, "status": res.status, "bound": res.bound,
                        "seconds": res.seconds}
    return row


def run(cfg: DensityConfig, progress=None) -> list[dict]:
    """Run the suite; returns one row per instance (see `run_instance`)."""
    import hci_scheduler.improve  # noqa: F401  the one-time import (OR-Tools) stays out of the timings

    rows = []
    instances = list(datasets.iter_vbp(known_optimum=True if cfg.known_only else None,
                                       stride=cfg.instance_stride))
    if cfg.names:
        instances = [datasets.load_vbp(n) for n in cfg.names]
    bar = progress(total=len(instances), desc="density") if progress else None
    known_seen = 0
    for k, inst in enumerate(instances):
        improve = False
        if inst.optimum is not None:
            improve = known_seen % cfg.improve_stride == 0
            known_seen += 1
        rows.append(run_instance(
            inst, cfg, improve=improve and cfg.improve_s > 0,
            run_peers=k % cfg.peer_stride == 0,
            run_cpsat=inst.n_items <= cfg.cpsat_max_items and k % cfg.cpsat_stride == 0,
        ))
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    if cfg.hetero and not cfg.names:
        rows += hetero_rows(cfg.hetero_improve_s, cfg.hetero_patterns_s)
    return rows


def hetero_rows(improve_s: float, patterns_s: float = 0.0) -> list[dict]:
    """The heterogeneous cells as suite rows (skipped cells left out)."""
    from . import hetero

    return [suite_row(r) for r in hetero.run(hetero.HeteroConfig(improve_s=improve_s, patterns_s=patterns_s))
            if r.get("cell") is not None]


def suite_row(cell_row: dict) -> dict:
    """A heterogeneous cell's row as the suite keeps it (no known optimum)."""
    return {**cell_row, "kind": "hetero", "instance": cell_row["cell"], "optimum": None,
            "reference": cell_row["covering_bound"]}


def packed_bound(row: dict) -> int:
    """The lower bound that holds for the instance as packed.

    Without clipping this is the recorded optimum. Clipping a negative size
    to 0 only makes items larger, so the clipped instance needs at least the
    recorded optimum and at least its own volume bound; the recorded optimum
    (n/3 exact triplets) is for the file as written and can be unattainable
    once clipped (the volume bound then exceeds it).
    """
    if not row["clipped"]:
        return int(row["optimum"])
    return max(int(row["optimum"]), int(row["volume_bound"]))


def summarise(rows: list[dict]) -> dict:
    """Averages per family and overall: ratios to the optimum, greedy vs improved vs peers."""
    def mean(xs):
        return float(np.mean(xs)) if xs else None

    out: dict = {"families": {}, "overall": {}}
    hetero = [r for r in rows if r.get("kind") == "hetero"]
    rows = [r for r in rows if r.get("kind") != "hetero"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["optimum"] is not None:
            groups.setdefault(r["family"], []).append(r)
    keys = ["greedy_binpack", "greedy_dot", "best", "improved", "best_known_solution",
            "numpy_best_fit", "ffd_python", "binpacking_1d"]

    def ratios(rs, key):
        vals = []
        for r in rs:
            if key.startswith("greedy_"):
                v = r["greedy"][key[7:]]
            else:
                v = r.get(key)
            if v is not None:
                vals.append(v / r["optimum"])
        return vals

    for fam, rs in sorted(groups.items()):
        out["families"][fam] = {"n": len(rs), **{k: mean(ratios(rs, k)) for k in keys}}
    known = [r for rs in groups.values() for r in rs]
    unclipped = [r for r in known if not r["clipped"]]
    improved = [r for r in known if "improved" in r]
    out["overall"] = {
        "n_known": len(known),
        **{k: mean(ratios(known, k)) for k in keys},
        "best_unclipped": mean(ratios(unclipped, "best")),
        "n_improved": len(improved),
        "improved_on_improved_set": mean(ratios(improved, "improved")),
        "greedy_binpack_on_improved_set": mean(ratios(improved, "greedy_binpack")),
        "improved_mean_s": mean([r["improved_s"] for r in improved]),
        "improved_max_s": float(max([r["improved_s"] for r in improved])) if improved else None,
        "greedy_binpack_mean_s": mean([r["greedy_s"]["binpack"] for r in known]),
        "stranded_greedy_binpack": mean([r["stranded_greedy_binpack"] for r in improved]),
        "stranded_improved": mean([r["stranded_improved"] for r in improved]),
        "small_max_over_opt": max([r["best"] - r["optimum"] for r in known if r["n_items"] < 100],
                                  default=None),
        "small_over_by_more_than_one": sum(1 for r in known if r["n_items"] < 100
                                           and r["best"] - r["optimum"] > 1),
        # Per instance, the small ones more than one host above the optimum, and the
        # same against the bound that holds for what was packed (see `packed_bound`).
        "small_worst": sorted(
            ({"instance": r["instance"], "best": r["best"], "optimum": r["optimum"],
              "packed_bound": packed_bound(r), "clipped": r["clipped"]}
             for r in known if r["n_items"] < 100 and r["best"] - r["optimum"] > 1),
            key=lambda w: (w["optimum"] - w["best"], w["instance"])),
        "small_over_packed_bound_by_more_than_one": sum(
            1 for r in known if r["n_items"] < 100 and r["best"] - packed_bound(r) > 1),
    }
    lb = [r["best"] / r["reference"] for r in rows if r["optimum"] is None]
    out["overall"]["n_lower_bound_only"] = len(lb)
    out["overall"]["best_vs_lower_bound"] = mean(lb)
    cp = [r for r in rows if "cpsat" in r and r["cpsat"]["hosts"] is not None and r["optimum"]]
    out["overall"]["cpsat_n"] = len(cp)
    out["overall"]["cpsat_ratio"] = mean([r["cpsat"]["hosts"] / r["optimum"] for r in cp])
    out["overall"]["best_on_cpsat_set"] = mean([r["best"] / r["optimum"] for r in cp])
    out["heterogeneous"] = [
        {k: r.get(k) for k in ("cell", "n_hosts", "n_live", "n_shapes", "covering_bound", "split_bound",
                               "greedy", "improved", "best", "ffd_rich_first", "best_over_covering",
                               "ffd_over_covering", "pattern_bound", "pattern_converged", "pattern_used")}
        for r in hetero]
    return out
