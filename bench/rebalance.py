"""Consolidation on the Google 2011 trace: the rebalancer against two peers, same cell, same run.

A cell of `n_hosts` machines sampled from the Google 2011 machine table (seeded) receives the
trace's task lifetimes (SCHEDULE to FINISH/FAIL/KILL/EVICT/LOST), replicated so the load scales
with the cell (one copy per 1,165 hosts, the cell of the issue's example), through the
placement core (binpack, one task at a time, departures before arrivals at equal times).
The churn leaves holes. Then, on the state at the end of the window:

- ours: `Cluster.rebalance("consolidate")` with move budgets of 1 %, 5 % of the live tasks and
  none; every plan replayed step by step by the independent checker (violations must be 0),
  then applied and the usage recomputed from the placements;
- karpenter: single-host consolidation as Karpenter does it: take the least utilised host; if
  all its workloads fit elsewhere (best fit, the host cordoned), move them and repeat, else
  put them back and try the next;
- descheduler: HighNodeUtilization style: evict every workload of the hosts under 50 %
  utilisation (largest dimension) and re-place them with the greedy scheduler, hosts not
  cordoned, so some land back where they were; what fits nowhere stays evicted (reported).

Reported per cell: hosts used before, after, freed; the lower bound on hosts used
(`plan.lower_bound`: hosts that must stay plus the covering bound of the rest), so "freeable" =
used before - bound; moves, migration cost, plan time. With `--patterns S` also the pattern
bound (`pattern_bound`): the fewest hosts any packing of the live tasks needs, proven by
column generation, so "freeable (pattern bound)" is what any plan can free at most.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from hci_scheduler import Cluster, datasets
from hci_scheduler.errors import Unschedulable
from hci_scheduler.model import Host, Workload

HOSTS_PER_COPY = 1165
DIMS = ("cpu", "memory")


@dataclass
class RebalanceConfig:
    sizes: tuple = (1_000, 10_000)
    budgets: tuple = (0.01, 0.05, None)
    time_limit_s: float = 60.0
    seed: int = 0
    patterns_s: float = 0.0       # > 0: also the pattern bound of every cell (hci_scheduler.patterns)


def cell(n_hosts: int, seed: int = 0) -> tuple[Cluster, int]:
    """The cell after the replay, and how many tasks it placed."""
    pool = datasets.google_hosts().capacity[:, :2]
    rng = np.random.default_rng(seed)
    cap = pool[rng.integers(0, pool.shape[0], size=n_hosts)]
    c = Cluster(DIMS)
    c.add_hosts([Host(f"m{i}", {"cpu": int(a), "memory": int(b)}) for i, (a, b) in enumerate(cap)])
    life = datasets.google_lifetimes()
    req = life.requests[:, :2]
    n = req.shape[0]
    copies = max(1, round(n_hosts / HOSTS_PER_COPY))
    times = np.concatenate([life.arrival, life.departure])
    kind = np.concatenate([np.ones(n), np.zeros(n)])        # departures (0) first at equal times
    codes = np.concatenate([np.arange(n), ~np.arange(n)])
    finite = np.isfinite(times)
    order = np.lexsort((kind[finite], times[finite]))
    events = codes[finite][order]
    placed = set()
    for code in events.tolist():
        for k in range(copies):
            if code >= 0:
                wid = f"t{k}-{code}"
                r = req[code]
                try:
                    c.place(Workload(wid, {"cpu": int(r[0]), "memory": int(r[1])}))
                    placed.add(wid)
                except Unschedulable:
                    pass
            else:
                wid = f"t{k}-{~code}"
                if wid in placed:
                    c.release(wid)
                    placed.discard(wid)
    return c, len(placed)


def check_usage(c: Cluster) -> None:
    """Recompute each host's usage from the placements and compare it with its limit."""
    dims = c.dimensions
    used = {h.id: np.zeros(len(dims), np.int64) for h in c.hosts()}
    for wid, hid in c.assignments().items():
        w = c.workload(wid)
        used[hid] += np.array([w.requests.get(d, 0) for d in dims])
    limits = c.limits()
    for hid, u in used.items():
        if (u > limits[c.host_index(hid)]).any():
            raise AssertionError(f"host {hid} overcommitted: {u} > {limits[c.host_index(hid)]}")


def hosts_used(c: Cluster) -> int:
    return len(set(c.assignments().values()))


def ours(c: Cluster, budget: int | None, time_limit_s: float, seed: int) -> dict:
    from hci_scheduler.rebalance.validate import replay_plan

    before = hosts_used(c)
    t0 = time.perf_counter()
    plan = c.rebalance("consolidate", max_moves=budget, time_limit_s=time_limit_s, seed=seed)
    seconds = time.perf_counter() - t0
    violations = replay_plan(c, plan)
    c.apply(plan)
    check_usage(c)
    return {"used_before": before, "used_after": hosts_used(c), "moves": len(plan.moves),
            "steps": len(plan.steps), "migration_cost": plan.cost, "plan_s": round(seconds, 2),
            "lower_bound": plan.lower_bound, "violations": len(violations), "status": plan.status}


def pattern_bound(c: Cluster, time_limit_s: float) -> dict:
    """Fewest hosts any plan can leave in use, by column generation over host patterns
    (every live task counted movable, so it bounds every plan), seeded with the greedy
    repack; tighter than the covering bound, which pools capacity across hosts."""
    from hci_scheduler.patterns import pack_by_patterns

    dims = c.dimensions
    capacity = c.limits().astype(np.int64)
    live = np.array([[c.workload(w).requests.get(d, 0) for d in dims] for w in c.assignments()], dtype=np.int64)
    seed = Cluster.from_arrays(capacity, dimensions=dims).place_array(live, order="largest_first")
    result = pack_by_patterns(capacity, live, [seed], time_limit_s=time_limit_s, integer_share=0.1)
    return {"pattern_bound": result.bound, "pattern_converged": result.converged,
            "pattern_packing": result.used, "pattern_s": round(result.seconds, 1)}


def _utilisation(c: Cluster) -> np.ndarray:
    lim = np.maximum(c.limits(), 1)
    return (c.usage() / lim).max(axis=1)


def karpenter(c: Cluster) -> dict:
    """Remove one host at a time when everything on it fits on the other hosts in use (least
    utilised first), as Karpenter's single-node consolidation does; empty hosts stay out."""
    before = hosts_used(c)
    t0 = time.perf_counter()
    moves = 0
    on: dict[str, list[str]] = {}
    for wid, hid in c.assignments().items():
        on.setdefault(hid, []).append(wid)
    for h in c.hosts():
        if h.id not in on:
            c.cordon(h.id)          # an empty host is not a destination: consolidation adds no node
    util = _utilisation(c)
    for hid in sorted(on, key=lambda h: (util[c.host_index(h)], h)):
        specs = [c.workload(w) for w in on[hid]]
        c.cordon(hid)
        for w in specs:
            c.release(w.id)
        done = []
        for w in sorted(specs, key=lambda w: -max(w.requests.values())):
            try:
                c.place(w)
            except Unschedulable:
                break
            done.append(w)
        if len(done) == len(specs):
            moves += len(specs)     # the host is removed: it stays cordoned
            continue
        for w in done:
            c.release(w.id)
        c.uncordon(hid)
        for w in specs:
            c.bind(w, hid)
    check_usage(c)
    return {"used_before": before, "used_after": hosts_used(c), "moves": moves,
            "plan_s": round(time.perf_counter() - t0, 2)}


def descheduler(c: Cluster, threshold: float = 0.5) -> dict:
    """Evict from under-used hosts, re-place with the greedy scheduler, no guaranteed destination."""
    before = hosts_used(c)
    t0 = time.perf_counter()
    util = _utilisation(c)
    victims = [c.workload(w) for h in c.hosts() if util[c.host_index(h.id)] < threshold
               for w in c.workloads_on(h.id)]
    where = {w.id: c.placement(w.id).host_id for w in victims}
    for w in victims:
        c.release(w.id)
    result = c.place_batch(victims)
    moved = sum(1 for wid, hid in result.placements.items() if where.get(wid) != hid)
    check_usage(c)
    return {"used_before": before, "used_after": hosts_used(c), "moves": moved,
            "evicted_unplaced": len(result.unplaced), "plan_s": round(time.perf_counter() - t0, 2)}


def run(cfg: RebalanceConfig, progress=None) -> list[dict]:
    rows = []
    for n_hosts in cfg.sizes:
        exact = {}
        for budget in cfg.budgets:
            c, live = cell(n_hosts, cfg.seed)
            if cfg.patterns_s > 0 and not exact:
                exact = pattern_bound(c, cfg.patterns_s)
            limit = None if budget is None else max(1, int(budget * live))
            row = {"hosts": n_hosts, "live": live, "method": "ours", "budget": budget, "max_moves": limit}
            row.update(ours(c, limit, cfg.time_limit_s, cfg.seed))
            row["freed"] = row["used_before"] - row["used_after"]
            row["freeable"] = row["used_before"] - (row["lower_bound"] or 0)
            _exact(row, exact)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            bound = row["lower_bound"]
        for name, peer in (("karpenter", karpenter), ("descheduler", descheduler)):
            c, live = cell(n_hosts, cfg.seed)
            row = {"hosts": n_hosts, "live": live, "method": name, "budget": None}
            row.update(peer(c))
            row["freed"] = row["used_before"] - row["used_after"]
            row["lower_bound"] = bound
            row["freeable"] = row["used_before"] - (bound or 0)
            _exact(row, exact)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def _exact(row: dict, exact: dict) -> None:
    if exact:
        row.update(exact)
        row["freeable_exact"] = row["used_before"] - exact["pattern_bound"]


def markdown(rows: list[dict]) -> str:
    exact = any("freeable_exact" in r for r in rows)
    out = ["| hosts | live tasks | method | move budget | used before | used after | freed | freeable (bound) "
           "| freed / freeable | moves | migration cost | plan s | violations |"
           + (" freeable (pattern bound) | freed / that |" if exact else ""),
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if exact else "")]
    for r in rows:
        budget = "none" if r.get("budget") is None else f"{r['budget']:.0%} ({r['max_moves']})"
        ratio = f"{r['freed'] / r['freeable']:.1%}" if r.get("freeable") else "-"
        line = (f"| {r['hosts']:,} | {r['live']:,} | {r['method']} | {budget} | {r['used_before']:,} | "
                f"{r['used_after']:,} | {r['freed']:,} | {r['freeable']:,} | {ratio} | {r['moves']:,} | "
                f"{r.get('migration_cost', '-')} | {r['plan_s']} | {r.get('violations', '-')} |")
        if exact:
            f = r.get("freeable_exact")
            line += f" {f:,} | {r['freed'] / f:.1%} |" if f else " - | - |"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hci_scheduler.bench.rebalance", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000", help="cell sizes in hosts (comma separated)")
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patterns", type=float, default=0.0, metavar="S",
                   help="also prove the pattern bound of each cell within S seconds (about 120-160 s converge)")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    cfg = RebalanceConfig(sizes=tuple(int(s) for s in args.sizes.split(",")), time_limit_s=args.time_limit,
                          seed=args.seed, patterns_s=args.patterns)
    rows = run(cfg)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))
    return 1 if any(r.get("violations") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
