"""Capacity planning: the cheapest new hosts on which pending workloads fit beside what runs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hci_scheduler import Cluster
from hci_scheduler.errors import ValidationError
from hci_scheduler.model import Affinity, Host, Taint, Toleration, Workload
from hci_scheduler.rebalance import HostType


def make_cluster(*free_cpu: int) -> Cluster:
    """Hosts of 8 cores / 16 GiB, each with a filler so that `free_cpu` millicores stay free."""
    c = Cluster()
    for i, free in enumerate(free_cpu):
        c.add_host(Host(f"h{i}", {"cpu": 8000, "memory": 16384, "ssd": 100}))
        if free < 8000:
            c.bind(Workload(f"fill{i}", {"cpu": 8000 - free, "memory": 1024}), f"h{i}")
    return c


SMALL = HostType("small", {"cpu": 4000, "memory": 16384, "ssd": 100}, price=10)
BIG = HostType("big", {"cpu": 16000, "memory": 65536, "ssd": 100}, price=30, labels={"kvm": "true"})


def check_fit(cluster: Cluster, plan, pending: list[Workload], types: list[HostType]) -> None:
    """Recompute each host's load from the plan's placements (containers pay their request)."""
    dims = cluster.dimensions
    free = {h.id: cluster.free()[cluster.host_index(h.id)] for h in cluster.hosts()}
    limit = {t.name: np.array([t.capacity.get(d, 0) for d in dims]) for t in types}
    load: dict[str, np.ndarray] = {}
    for w in pending:
        where = plan.placements[w.id]
        load[where] = load.get(where, 0) + np.array([w.requests.get(d, 0) for d in dims])
    for where, used in load.items():
        room = free[where] if where in free else limit[where.split("#")[0]]
        assert (used <= room).all(), f"{where} overcommitted: {used} > {room}"
    bought = {}
    for where in load:
        if where not in free:
            bought[where.split("#")[0]] = bought.get(where.split("#")[0], 0) + 1
    assert bought == plan.add
    assert plan.cost == sum(t.price * plan.add.get(t.name, 0) for t in types)


@pytest.mark.parametrize("pending, want_add, want_cost", [
    # 6 x 3000 cpu: h1 (8000 free) takes 2; 4 left = 12000 cpu: one big (16000, 30) beats 4 small (4 x 10 = 40)
    ([Workload(f"p{i}", {"cpu": 3000, "memory": 1024}) for i in range(6)], {"big": 1}, 30),
    # 3 x 3000: h1 takes 2, 1 left: one small (10) is cheaper than one big (30)
    ([Workload(f"p{i}", {"cpu": 3000, "memory": 1024}) for i in range(3)], {"small": 1}, 10),
    # everything fits in the room there is: nothing to buy
    ([Workload("p0", {"cpu": 2000, "memory": 1024})], {}, 0),
    # a VM needs kvm: only "big" has it
    ([Workload("v", {"cpu": 1000, "memory": 1024}, kind="vm")], {"big": 1}, 30),
], ids=["one-big-beats-four-small", "one-small", "fits-now", "vm-needs-kvm"])
def test_cheapest_hosts(pending, want_add, want_cost):
    c = make_cluster(1000, 8000)
    before = c.assignments()
    plan = c.plan_capacity(pending, [SMALL, BIG])
    assert plan.add == want_add and plan.cost == want_cost
    assert plan.lower_bound <= plan.cost
    check_fit(c, plan, pending, [SMALL, BIG])
    assert c.assignments() == before          # plans change nothing


def test_matches_brute_force_on_small_cases():
    """Every mix of up to 3 smalls and 2 bigs, cheapest that holds the leftovers (checked by
    trying each workload->host assignment), equals the plan's cost."""
    rng = np.random.default_rng(7)
    for case in range(6):
        pending = [Workload(f"p{i}", {"cpu": int(rng.integers(1, 9)) * 1000, "memory": 1024}) for i in range(4)]
        c = make_cluster(0)
        plan = c.plan_capacity(pending, [SMALL, BIG])
        best = None
        for n_small, n_big in itertools.product(range(4), range(3)):
            caps = [4000] * n_small + [16000] * n_big
            for where in itertools.product(range(len(caps)), repeat=len(pending)) if caps else []:
                used = [0] * len(caps)
                for w, b in zip(pending, where):
                    used[b] += w.requests["cpu"]
                if all(u <= cap for u, cap in zip(used, caps)):
                    cost = 10 * n_small + 30 * n_big
                    best = cost if best is None else min(best, cost)
                    break
        assert plan.cost == best, (case, [w.requests["cpu"] for w in pending], plan)


def test_host_anti_affinity_between_pending_workloads():
    # three replicas that may not share a host: three new hosts, although one would hold them all
    pending = [Workload(f"r{i}", {"cpu": 1000, "memory": 1024}, group="db", anti_affinity=[Affinity("db")])
               for i in range(3)]
    plan = make_cluster(0).plan_capacity(pending, [SMALL])
    assert plan.add == {"small": 3}
    assert len(set(plan.placements.values())) == 3


def test_taints_and_selectors():
    gpu = HostType("gpu", {"cpu": 8000, "memory": 16384}, price=50, labels={"gpu": "yes"},
                   taints=[Taint("gpu", "yes")])
    plain = Workload("a", {"cpu": 6000, "memory": 1024})
    wants_gpu = Workload("b", {"cpu": 1000, "memory": 1024}, selector={"gpu": "yes"},
                         tolerations=[Toleration("gpu", "yes")])
    # a (6000 cpu) fits no small (4000) and may not go to the tainted gpu type
    with pytest.raises(ValidationError, match="no host type can take a"):
        make_cluster(0).plan_capacity([plain], [SMALL, gpu])
    plan = make_cluster(0).plan_capacity([wants_gpu], [SMALL, gpu])
    assert plan.add == {"gpu": 1}


def test_bad_input():
    c = make_cluster(0)
    with pytest.raises(ValidationError, match="at least one host type"):
        c.plan_capacity([Workload("a", {"cpu": 1})], [])
    with pytest.raises(ValidationError, match="price"):
        HostType("x", {"cpu": 1}, price=-1)
    with pytest.raises(ValidationError, match="max_count"):
        c.plan_capacity([Workload(f"p{i}", {"cpu": 4000}) for i in range(3)],
                        [HostType("one", {"cpu": 4000, "memory": 4096}, price=1, max_count=2)])
