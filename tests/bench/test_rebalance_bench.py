"""The consolidation bench's pattern bound: what any plan can free at most."""
from __future__ import annotations

from hci_scheduler import Cluster
from hci_scheduler.bench.rebalance import markdown, pattern_bound
from hci_scheduler.model import Host, Workload


def test_pattern_bound_counts_what_no_host_can_share():
    # Six (5, 5) hosts, four (3, 3) tasks, one per host: pooled room says 3 hosts
    # (the covering bound), but no host holds two tasks, so no plan frees any host.
    c = Cluster(("cpu", "memory"))
    c.add_hosts([Host(f"m{i}", {"cpu": 5, "memory": 5}) for i in range(6)])
    for i in range(4):
        c.place(Workload(f"t{i}", {"cpu": 3, "memory": 3}))
    exact = pattern_bound(c, 10.0)
    assert exact["pattern_converged"] and exact["pattern_bound"] == 4 == exact["pattern_packing"]
    plan = c.rebalance("consolidate", time_limit_s=2.0)
    assert plan.lower_bound == 3
    assert plan.hosts_used_after == 4


def test_markdown_adds_the_pattern_bound_columns():
    row = {"hosts": 10, "live": 20, "method": "ours", "budget": None, "used_before": 9, "used_after": 6,
           "freed": 3, "freeable": 5, "moves": 7, "plan_s": 0.1, "pattern_bound": 5, "freeable_exact": 4}
    header, _, line = markdown([row]).splitlines()
    assert header.endswith("freeable (pattern bound) | freed / that |")
    assert line.endswith("| 4 | 75.0% |")
    assert "pattern bound" not in markdown([{k: v for k, v in row.items() if k != "freeable_exact"}])
