"""replay_plan: the independent step-by-step check finds each kind of breach a plan can
make, and passes plans that order_moves builds and Cluster.apply accepts."""
from __future__ import annotations

import numpy as np
import pytest

from hci_scheduler import Cluster
from hci_scheduler.errors import StateConflict, Unschedulable
from hci_scheduler.model import Affinity, Host, Spread, Taint, Volume, Workload
from hci_scheduler.rebalance import Move, Plan
from hci_scheduler.rebalance.compile import CostModel, compile_cluster
from hci_scheduler.rebalance.order import order_moves
from hci_scheduler.rebalance.validate import replay_plan, snapshot


def host(hid: str, cpu: int = 8000, **kw) -> Host:
    return Host(hid, {"cpu": cpu, "memory": 16384, "ssd": 100}, **kw)


def cluster(*hosts: Host) -> Cluster:
    c = Cluster()
    for h in hosts or [host(f"h{i}") for i in range(3)]:
        c.add_host(h)
    return c


def plan(c: Cluster, *steps) -> Plan:
    return Plan("consolidate", steps=[[Move(*m) for m in step] for step in steps], base_version=c.version)


def one(violations: list[str], *words: str) -> None:
    assert len(violations) >= 1, violations
    assert any(all(w in v for w in words) for v in violations), violations


def test_a_feasible_plan_replays_clean_and_applies():
    c = cluster()
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    p = plan(c, [("a", "h0", "h2")], [("b", "h1", "h0")], [("a", "h2", "h1")])
    assert replay_plan(c, p) == []
    assert replay_plan(lambda: c, p) == []
    c.apply(p)


def test_swap_in_one_step_overflows_while_it_runs():
    c = cluster()
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    violations = replay_plan(c, plan(c, [("a", "h0", "h1"), ("b", "h1", "h0")]))
    one(violations, "step 0 (while it runs)", "host h1", "cpu 12000 over its limit 8000")
    one(violations, "host h0", "cpu 12000")
    assert not any("after it" in v for v in violations)   # the final state itself fits


def test_vm_pays_the_targets_ratio():
    c = cluster(host("h0", labels={"kvm": "true"}),
                host("h1", labels={"kvm": "true"}, allocation_ratio={"cpu": 2.0}))   # cpu limit 16000
    c.bind(Workload("vm", {"cpu": 4500}, kind="vm"), "h0")                           # 9000 on h1
    c.bind(Workload("c", {"cpu": 7001}), "h1")
    one(replay_plan(c, plan(c, [("vm", "h0", "h1")])), "host h1", "cpu 16001 over its limit 16000")
    c.release("c")
    c.bind(Workload("c", {"cpu": 7000}), "h1")
    assert replay_plan(c, plan(c, [("vm", "h0", "h1")])) == []


def test_array_rows_stay_as_unnamed_load():
    c = cluster(host("h0"), host("h1"))
    c.bind(Workload("d", {"cpu": 3001}), "h0")
    rows = c.place_array(np.array([[5000, 0, 0, 0, 0]]))
    assert rows[0] == c.host_index("h1")
    assert snapshot(c).unnamed["h1"][0] == 5000
    one(replay_plan(c, plan(c, [("d", "h0", "h1")])), "host h1", "cpu 8001 over its limit 8000")


def test_static_rules_at_the_target():
    c = cluster(host("h0", labels={"disk": "ssd", "kvm": "true"}), host("h1", taints=[Taint("gpu", "", "NoSchedule")]),
                host("h2", state="cordoned"), host("h3"))
    c.bind(Workload("sel", {"cpu": 1}, selector={"disk": "ssd"}), "h0")
    c.bind(Workload("vm", {"cpu": 1}, kind="vm"), "h0")
    c.bind(Workload("plain", {"cpu": 1}), "h0")
    one(replay_plan(c, plan(c, [("sel", "h0", "h3")])), "sel", "selector")
    one(replay_plan(c, plan(c, [("vm", "h0", "h3")])), "vm", "kvm=true")
    one(replay_plan(c, plan(c, [("plain", "h0", "h1")])), "plain", "taint gpu")
    one(replay_plan(c, plan(c, [("plain", "h0", "h2")])), "plain", "cordoned")
    assert replay_plan(c, plan(c, [("plain", "h0", "h3")])) == []


def test_dedicated_tenant_counts_both_copies():
    c = cluster()
    c.bind(Workload("t", {"cpu": 1}, tenant="acme", isolation="dedicated"), "h1")
    c.bind(Workload("x", {"cpu": 1}), "h0")
    one(replay_plan(c, plan(c, [("x", "h0", "h1")])), "host h1", "dedicated tenant acme")
    # t leaving h1 while x arrives: still both on h1 while the step runs
    one(replay_plan(c, plan(c, [("t", "h1", "h2"), ("x", "h0", "h1")])), "while it runs", "dedicated tenant acme")
    assert replay_plan(c, plan(c, [("t", "h1", "h2")], [("x", "h0", "h1")])) == []


def test_affinity_anti_affinity_and_spread():
    zone = {"h0": "a", "h1": "a", "h2": "b", "h3": "b"}
    c = cluster(*[host(h, labels={"zone": z}) for h, z in zone.items()])
    c.bind(Workload("db", {"cpu": 1}, group="db"), "h0")
    c.bind(Workload("app", {"cpu": 1}, affinity=[Affinity("db", "zone")]), "h1")
    # moving the anchor away breaks the dependant, which did not move
    one(replay_plan(c, plan(c, [("db", "h0", "h2")])), "after it", "workload app", "hard affinity to group db")
    assert replay_plan(c, plan(c, [("db", "h0", "h1")])) == []
    c.bind(Workload("lone", {"cpu": 1}, anti_affinity=[Affinity("db")]), "h3")
    one(replay_plan(c, plan(c, [("lone", "h3", "h0")])), "workload lone on host h0", "hard anti-affinity")
    for i, h in enumerate(["h0", "h2"]):
        c.bind(Workload(f"s{i}", {"cpu": 1}, group="web", spread=[Spread("zone", 1)]), h)
    one(replay_plan(c, plan(c, [("s1", "h2", "h1")])), "group web", "skew 2 above 1")
    assert replay_plan(c, plan(c, [("s1", "h2", "h3")])) == []


def test_things_that_never_move():
    c = cluster(host("h0", labels={"kvm": "true"}, numa=[{"cpu": 4000, "memory": 8192}] * 2),
                host("h1", labels={"kvm": "true"}, numa=[{"cpu": 4000, "memory": 8192}] * 2))
    c.bind(Workload("numa", {"cpu": 1000, "memory": 1024}, kind="vm", numa=True), "h0")
    c.place(Workload("daemon", {"cpu": 10}, per_host=True))
    c.add_volume(Volume("vol", 10), hosts=["h0"])
    c.bind(Workload("mounts", {"cpu": 1}, volumes=["vol"]), "h0")
    p = c.place(Workload("maker", {"cpu": 1}, volumes=[Volume("v2", 5)]))
    one(replay_plan(c, plan(c, [("numa", "h0", "h1")])), "NUMA-pinned")
    one(replay_plan(c, plan(c, [("daemon", "h0", "h1")])), "per-host service")
    one(replay_plan(c, plan(c, [("mounts", "h0", "h1")])), "volume vol has no replica")
    other = "h1" if p.host_id == "h0" else "h0"
    one(replay_plan(c, plan(c, [("maker", p.host_id, other)])), "created volumes")


def test_plan_that_does_not_match_the_state():
    c = cluster()
    c.bind(Workload("a", {"cpu": 1}), "h0")
    one(replay_plan(c, plan(c, [("a", "h1", "h2")])), "runs on h0")
    one(replay_plan(c, plan(c, [("zz", "h1", "h2")])), "no such placed workload")
    one(replay_plan(c, plan(c, [("a", "h0", "h1"), ("a", "h0", "h2")])), "twice")
    stale = plan(c, [("a", "h0", "h1")])
    c.bind(Workload("b", {"cpu": 1}), "h0")
    one(replay_plan(c, stale), "version")
    bad = plan(c, [("a", "h0", "h1")])
    bad.unordered = "stuck"
    one(replay_plan(c, bad), "could not be ordered")


@pytest.mark.parametrize("seed", range(12))
def test_ordered_random_plans_replay_clean_and_apply(seed):
    """compile -> a random feasible final assignment -> order_moves -> Plan: the replay finds
    nothing and Cluster.apply (the core's own checks, both copies counted) accepts it."""
    rng = np.random.default_rng(seed)
    c = Cluster()
    m = int(rng.integers(3, 7))
    for i in range(m):
        c.add_host(Host(f"h{i}", {"cpu": int(rng.integers(4, 12)) * 1000, "memory": 16384},
                        labels={"kvm": "true", "zone": "ab"[i % 2]}, allocation_ratio={"cpu": float(rng.choice([1, 1.5]))}))
    n = int(rng.integers(4, 14))
    for j in range(n):
        kind = "vm" if rng.random() < 0.3 else "container"
        extra = {}
        if rng.random() < 0.3:
            extra = {"group": "g", "anti_affinity": [Affinity("g")]}
        elif rng.random() < 0.2:
            extra = {"tenant": "t", "isolation": "dedicated"}
        try:
            c.place(Workload(f"w{j}", {"cpu": int(rng.integers(1, 4)) * 1000, "memory": 1024}, kind=kind, **extra))
        except Unschedulable:
            pass
    compiled = compile_cluster(c, CostModel())
    problem = compiled.problem
    final = problem.initial.copy()
    for _ in range(60):       # random feasible final: random single moves that keep the final state feasible
        w = int(rng.integers(problem.n_workloads))
        if not problem.movable[w]:
            continue
        h = int(rng.integers(problem.n_hosts))
        trial = final.copy()
        trial[w] = h
        if _feasible(problem, trial):
            final = trial
    result = order_moves(problem, problem.initial, final)
    assert result.unordered == ""
    p = Plan("consolidate", steps=[[Move(compiled.ids[w], compiled.host_ids[s], compiled.host_ids[t])
                                    for w, s, t in step] for step in result.steps], base_version=c.version)
    assert replay_plan(c, p) == []
    c.apply(p)
    assert c.assignments() == {compiled.ids[w]: compiled.host_ids[h] for w, h in enumerate(final.tolist())}


def _feasible(problem, where) -> bool:
    used = problem.fixed.copy()
    np.add.at(used, where, problem.charge(np.arange(problem.n_workloads), where))
    if (used > problem.capacity).any():
        return False
    if not problem.allowed[problem.allowed_class, where].all():
        return False
    for s in np.flatnonzero(problem.conflict):
        hosts = where[problem.service == s]
        if len(set(hosts.tolist())) < len(hosts):
            return False
    for t in np.flatnonzero(problem.dedicated):
        for h in set(where[problem.tenant == t].tolist()):
            if (problem.tenant[where == h] != t).any():
                return False
    return True


@pytest.mark.parametrize("seed", range(60))
def test_replay_and_apply_agree_on_random_plans(seed):
    """Random plans, feasible or not: Cluster.apply (the core's checks) accepts exactly those
    the independent replay finds nothing in, and a refused one changes nothing."""
    rng = np.random.default_rng(seed)
    c = Cluster()
    for i in range(5):
        labels = {"kvm": "true"} if i % 2 == 0 else {"disk": "ssd"}
        taints = [Taint("gpu", "", "NoSchedule")] if i == 4 else []
        c.add_host(Host(f"h{i}", {"cpu": 4000, "memory": 8192}, labels=labels, taints=taints,
                        allocation_ratio={"cpu": float(rng.choice([1.0, 2.0]))}))
    kinds = [{}, {"kind": "vm"}, {"group": "g", "anti_affinity": [Affinity("g")]},
             {"tenant": "t", "isolation": "dedicated"}, {"selector": {"disk": "ssd"}}]
    for j in range(10):
        spec = kinds[int(rng.integers(len(kinds)))]
        try:
            c.place(Workload(f"w{j}", {"cpu": int(rng.integers(1, 5)) * 300, "memory": 1024}, **spec))
        except Unschedulable:
            pass
    where = c.assignments()
    steps = []
    for _ in range(int(rng.integers(1, 3))):
        movers = rng.permutation(sorted(where))[: int(rng.integers(1, 3))]
        step = []
        for w in movers.tolist():
            spec = c.workload(w)
            fitting = [f"h{i}" for i in range(4) if (spec.kind != "vm" or i % 2 == 0) and (not spec.selector or i % 2)]
            # mostly hosts the static filters allow, so that plans pass as well as fail
            target = str(rng.choice(fitting)) if rng.random() < 0.8 else f"h{int(rng.integers(5))}"
            if target != where[w]:
                step.append((w, where[w], target))
        for w, _, t in step:
            where[w] = t
        if step:
            steps.append(step)
    p = plan(c, *steps)
    violations = replay_plan(c, p)
    before = c.assignments(), c.usage().tolist()
    try:
        c.apply(p)
    except StateConflict:
        assert violations, "the core refused a plan the replay found nothing wrong in"
        assert (c.assignments(), c.usage().tolist()) == before
    else:
        assert violations == [], "the core accepted a plan the replay finds broken"
        assert c.assignments() == where
