"""Cluster.rebalance, goal by goal, on small clusters: against exhaustive optima, replayed step
by step by the independent checker, applied, and usage recomputed from the assignments."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hci_scheduler import Cluster
from hci_scheduler.errors import NotFound, StateConflict, Unschedulable, ValidationError
from hci_scheduler.model import Affinity, Host, Workload
from hci_scheduler.rebalance import CostModel, RebalanceInfeasible, objective
from hci_scheduler.rebalance.compile import compile_cluster
from hci_scheduler.rebalance.keepset import keep_set
from hci_scheduler.rebalance.validate import replay_plan

FAST = {"time_limit_s": 5.0, "seed": 0}


def make_host(name: str, cpu: int = 8000, memory: int = 16384, **kw) -> Host:
    return Host(name, {"cpu": cpu, "memory": memory, "ssd": 100}, **kw)


def spread_cluster(cpus: list[int], n_hosts: int = 6, host_cpu: int = 8000) -> Cluster:
    """Workloads of the given cpu placed round robin (a spread-out, consolidatable state)."""
    c = Cluster()
    for i in range(n_hosts):
        c.add_host(make_host(f"h{i}", cpu=host_cpu))
    for k, cpu in enumerate(cpus):
        c.bind(Workload(f"w{k}", {"cpu": cpu, "memory": 512}), f"h{k % n_hosts}")
    return c


def recomputed_ok(c: Cluster) -> None:
    """No host above its limit, usage recomputed from the assignments (containers pay requests)."""
    used = np.zeros((len(c.hosts()), len(c.dimensions)), dtype=np.int64)
    for wid, hid in c.assignments().items():
        w = c.workload(wid)
        used[c.host_index(hid)] += [w.requests.get(d, 0) for d in c.dimensions]
    assert (used <= c.limits()).all()


def fewest_hosts(cpus: list[int], cap: int) -> int:
    """Exhaustive optimum of a one-dimensional packing (cpu binds; memory is slack)."""
    for k in range(1, len(cpus) + 1):
        for where in itertools.product(range(k), repeat=len(cpus)):
            load = [0] * k
            for cpu, b in zip(cpus, where):
                load[b] += cpu
            if max(load) <= cap:
                return k
    return len(cpus)


@pytest.mark.parametrize("cpus", [
    [3000, 3000, 2000, 5000, 1000, 2000, 4000, 4000],     # 24000 on 8000-cpu hosts: 3 hosts, exactly full
    [6000, 6000, 6000, 1000, 1000, 1000],                 # three big ones pin 3 hosts; the small ones join them
    [2500, 2500, 2500, 2500, 2500, 2500, 2500],           # 3 per host: ceil(7 / 3) = 3 hosts
], ids=["exact-fill", "big-and-small", "identical"])
def test_consolidate_reaches_the_optimum(cpus):
    c = spread_cluster(cpus)
    before = c.assignments()
    plan = c.rebalance("consolidate", **FAST)
    assert c.assignments() == before                      # planning changes nothing
    optimum = fewest_hosts(cpus, 8000)
    assert plan.hosts_used_after == optimum
    assert plan.lower_bound is not None and plan.lower_bound <= optimum
    assert plan.hosts_freed == plan.hosts_used_before - optimum
    assert replay_plan(c, plan) == []
    c.apply(plan)
    recomputed_ok(c)
    assert len(set(c.assignments().values())) == optimum
    assert {m.workload_id: m.target for m in plan.moves}.items() <= c.assignments().items()


def test_consolidate_respects_the_move_budget_and_host_conflicts():
    c = Cluster()
    for i in range(4):
        c.add_host(make_host(f"h{i}"))
    # two replicas that may not share a host, and fillers: at most 1 move
    for k in range(2):
        c.bind(Workload(f"db{k}", {"cpu": 1000}, group="db", anti_affinity=[Affinity("db")]), f"h{k}")
    for k in range(4):
        c.bind(Workload(f"f{k}", {"cpu": 1000}), f"h{k}")
    plan = c.rebalance("consolidate", max_moves=1, **FAST)
    assert len(plan.moves) <= 1
    plan = c.rebalance("consolidate", **FAST)
    assert replay_plan(c, plan) == []
    c.apply(plan)
    assert c.placement("db0").host_id != c.placement("db1").host_id
    assert len(set(c.assignments().values())) == 2        # the replicas keep two hosts


def test_consolidate_frees_cloud_hosts_first():
    c = Cluster()
    c.add_host(make_host("onprem", cpu=4000))
    c.add_host(make_host("cloud", cpu=4000, pool="cloud"))
    c.bind(Workload("a", {"cpu": 1000}), "onprem")
    c.bind(Workload("b", {"cpu": 1000}), "cloud")
    plan = c.rebalance("consolidate", **FAST)
    assert [(m.workload_id, m.target) for m in plan.moves] == [("b", "onprem")]
    assert plan.terms_after["host_cost"] < plan.terms_before["host_cost"]


def test_stale_plan_is_refused_and_changes_nothing():
    c = spread_cluster([1000, 1000, 1000])
    plan = c.rebalance("consolidate", **FAST)
    c.place(Workload("late", {"cpu": 100}))
    before = c.assignments()
    with pytest.raises(StateConflict):
        c.apply(plan)
    assert c.assignments() == before


def test_drain_moves_everything_with_destinations_up_front():
    c = spread_cluster([2000, 2000, 2000, 2000, 2000, 2000], n_hosts=3)
    plan = c.rebalance("drain", hosts=["h1"], **FAST)
    assert {m.source for m in plan.moves} == {"h1"}
    assert all(m.target != "h1" for m in plan.moves)
    assert replay_plan(c, plan) == []
    c.apply(plan)
    assert c.workloads_on("h1") == []
    recomputed_ok(c)


def test_drain_refusal_names_what_fits_nowhere():
    c = spread_cluster([6000, 6000], n_hosts=2)
    with pytest.raises(RebalanceInfeasible, match="w1|w0"):
        c.rebalance("drain", hosts=["h1"], **FAST)
    with pytest.raises(NotFound, match="nope"):
        c.rebalance("drain", hosts=["nope"], **FAST)


def test_drain_refuses_a_pinned_workload():
    c = Cluster()
    for i in range(2):
        c.add_host(make_host(f"h{i}", numa=[{"cpu": 4000, "memory": 8192}] * 2, labels={"kvm": "true"}))
    c.place(Workload("vm", {"cpu": 1000, "memory": 1024}, kind="vm", numa=True))
    host = c.placement("vm").host_id
    with pytest.raises(RebalanceInfeasible, match="NUMA"):
        c.rebalance("drain", hosts=[host], **FAST)


def test_defragment_makes_room_for_a_big_vm():
    c = Cluster()
    for i in range(3):
        c.add_host(make_host(f"h{i}", labels={"kvm": "true"}))
    for k in range(6):
        c.bind(Workload(f"w{k}", {"cpu": 2000, "memory": 1024}), f"h{k % 3}")
    big = Workload("big", {"cpu": 7000, "memory": 4096}, kind="vm")
    with pytest.raises(Unschedulable):
        c.place(big)
    plan = c.rebalance("defragment", workload=big, **FAST)
    room_on = plan.search["room_on"]
    assert replay_plan(c, plan) == []
    c.apply(plan)
    assert c.place(big).host_id == room_on
    recomputed_ok(c)


def test_balance_relieves_hot_spots():
    c = Cluster()
    for i in range(3):
        c.add_host(make_host(f"h{i}"))
    for k in range(6):
        c.bind(Workload(f"w{k}", {"cpu": 1200, "memory": 512}), "h0")   # h0 at 7200 / 8000 = 90 % cpu
    plan = c.rebalance("balance", targets={"cpu": 0.5}, **FAST)
    assert plan.terms_before["load_cost"] > 0
    assert plan.terms_after["load_cost"] == 0       # 3 x 1200 = 3600 <= 4000 on every host is reachable
    assert replay_plan(c, plan) == []
    c.apply(plan)
    cpu = c.usage()[:, 0]
    assert (cpu <= 4000).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"goal": "shrink"}, "goal must be one of"),
    ({"goal": "drain"}, "needs hosts"),
    ({"goal": "defragment"}, "needs workload"),
    ({"goal": "balance"}, "needs targets"),
    ({"goal": "balance", "targets": {"cpu": 1.5}}, "utilisation in"),
    ({"goal": "balance", "targets": {"gpuz": 0.5}}, "unknown dimension"),
    ({"goal": "consolidate", "max_moves": -1}, "max_moves"),
    ({"goal": "consolidate", "time_limit_s": 0}, "time_limit_s"),
    ({"goal": "consolidate", "seed": -1}, "seed"),
], ids=lambda v: str(v)[:30])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValidationError, match=match):
        spread_cluster([1000]).rebalance(**kwargs)


def test_pinned_workloads_are_counted_with_their_reason():
    c = spread_cluster([1000, 1000])
    c.bind(Workload("anchor", {"cpu": 100}, group="cache"), "h2")
    c.bind(Workload("follower", {"cpu": 100}, affinity=[Affinity("cache")]), "h2")
    compiled = compile_cluster(c, CostModel())
    assert compiled.pinned == {"follower": "hard affinity to group cache",
                               "anchor": "anchor of a hard affinity from follower"}
    plan = c.rebalance("consolidate", **FAST)
    assert not {m.workload_id for m in plan.moves} & {"anchor", "follower"}
    assert plan.search["pinned"] == 2


def test_keep_set_is_always_feasible_on_random_cells():
    """The keep-set construction on random mixed cells with conflicts and a dedicated tenant:
    the independent check finds nothing, and it never uses more hosts than it started with."""
    rng = np.random.default_rng(3)
    for trial in range(12):
        c = Cluster()
        shapes = [(8000, 16384), (16000, 65536), (4000, 8192)]
        for i in range(12):
            cpu, mem = shapes[int(rng.integers(0, 3))]
            c.add_host(make_host(f"h{i}", cpu=cpu, memory=mem))
        for k in range(40):
            kw = {}
            if k % 7 == 0:
                kw = {"group": "db", "anti_affinity": [Affinity("db")]}
            elif k % 11 == 0:
                kw = {"tenant": "secure", "isolation": "dedicated"}
            try:
                c.place(Workload(f"w{k}", {"cpu": int(rng.integers(1, 8)) * 250,
                                           "memory": int(rng.integers(1, 8)) * 512}, **kw), strategy="spread")
            except Unschedulable:
                pass
        compiled = compile_cluster(c, CostModel())
        p = compiled.problem
        a = keep_set(p, compiled.fixed_use)
        if a is None:
            continue
        assert objective.violations(p, a) == [], trial
        assert len(np.unique(a)) <= len(np.unique(p.initial))
