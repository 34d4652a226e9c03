"""Constrained placement speed: the cost of constraints, against no constraints, in one run.

The check: on 10,000 hosts, with a node selector, a soft and a hard
anti-affinity term and a zone spread active on every workload, throughput
stays at least half of the unconstrained figure measured in the same run, so
that constraints never cost more than the placement itself.

Hosts come from `workloads.host_pool` (Google 2011 machines) and get labels
by row: zone a/b/c (row % 3), rack r<row // 40>. The workload is a web tier:
`selector zone In (a, b)`, hard anti-affinity against group db per host
(500 db workloads are placed first), soft anti-affinity against its own
group per rack, and a hard zone spread (max skew 1). The requests are the
same trace stream for both runs, `repeats` runs each on fresh clusters,
alternating. Each figure is the best run, as timeit reports it: on a shared
machine a run is only ever slowed down by other work, and a run this short
swings so much that even the median of adjacent-pair ratios moves far more
than the ratio of the best runs does (figures in bench/README.md, Measured).
The medians are reported as well.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from hci_scheduler import Affinity, Cluster, Host, LabelExpr, Spread, Workload

from .workloads import host_pool, request_stream

WEB = Workload("web", group="web", selector=[LabelExpr("zone", "In", ("a", "b"))],
               anti_affinity=[Affinity("db", "host"), Affinity("web", "rack", hard=False, weight=5)],
               spread=[Spread("zone", max_skew=1)])


def build(capacity: np.ndarray) -> Cluster:
    dims = ("cpu", "memory", "ssd", "net", "gpu")
    c = Cluster(dims)
    c.add_hosts([Host(f"h{i}", dict(zip(dims, map(int, row))),
                      labels={"zone": "abc"[i % 3], "rack": f"r{i // 40}"}) for i, row in enumerate(capacity)])
    db = np.tile(np.array([[1000, 2048, 0, 0, 0]], dtype=np.int64), (500, 1))
    c.place_array(db, template=Workload("db", group="db"))
    return c


def check(c: Cluster, hosts: np.ndarray) -> None:
    """Independent check of the constrained run from host labels and assignments."""
    live = c.hosts()
    zone = np.array([h.labels["zone"] for h in live])
    placed = hosts[hosts >= 0]
    assert set(zone[placed]) <= {"a", "b"}, "selector broken"
    per_zone = [(zone[placed] == z).sum() for z in ("a", "b")]
    assert abs(per_zone[0] - per_zone[1]) <= 1, f"spread broken: {per_zone}"


def run(n_hosts: int = 10_000, n_requests: int = 50_000, repeats: int = 3) -> dict:
    capacity, host_src = host_pool(n_hosts)
    req, req_src = request_stream(n_requests)
    plain, constrained = [], []
    placed = {}
    for _ in range(repeats):
        for name, kw, out in (("plain", {}, plain), ("constrained", {"template": WEB}, constrained)):
            c = build(capacity)
            c.place_array(req[:1], **kw)  # compile the template and warm caches outside the timing
            c.release_array([c._arr_n - 1])
            t0 = time.perf_counter()
            hosts = c.place_array(req, **kw)
            dt = time.perf_counter() - t0
            n = int((hosts >= 0).sum())
            assert n > 0, f"{name}: nothing placed, the timing would mean nothing"
            if name == "constrained":
                check(c, hosts)
            out.append(n / dt)
            placed[name] = (n, c.hosts_used())
    p, q = max(plain), max(constrained)
    return {
        "hosts": n_hosts, "requests": n_requests, "host_source": host_src, "request_source": req_src,
        "repeats": repeats, "unconstrained_per_s": p, "constrained_per_s": q, "ratio": q / p, "target_ratio": 0.5,
        "median_unconstrained_per_s": statistics.median(plain),
        "median_constrained_per_s": statistics.median(constrained),
        "placed": {k: v[0] for k, v in placed.items()}, "hosts_used": {k: v[1] for k, v in placed.items()},
    }


def format_result(r: dict) -> str:
    return (f"constrained placement at {r['hosts']:,} hosts ({r['request_source']}), "
            f"best of {r['repeats']} runs (median in brackets):\n"
            f"  unconstrained  {r['unconstrained_per_s']:>12,.0f} placements/s  "
            f"({r['median_unconstrained_per_s']:,.0f}; "
            f"{r['placed']['plain']:,} placed on {r['hosts_used']['plain']:,} hosts)\n"
            f"  constrained    {r['constrained_per_s']:>12,.0f} placements/s  "
            f"({r['median_constrained_per_s']:,.0f}; "
            f"{r['placed']['constrained']:,} placed on {r['hosts_used']['constrained']:,} hosts)\n"
            f"  ratio {r['ratio']:.2f} (target >= {r['target_ratio']})")


def main(argv=None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    # A quick repeat is short, so one disturbance spoils it: seven repeats give each
    # variant a good chance of one undisturbed run.
    r = run(n_requests=20_000 if quick else 50_000, repeats=7 if quick else 5)
    print(format_result(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
