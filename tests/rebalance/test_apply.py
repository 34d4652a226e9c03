"""Cluster.version and Cluster.apply / apply_step: a plan commits step by step through the
ledger, each move checked on its target with the workload counted on both hosts, and a
stale or failing plan changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from hci_scheduler import Cluster
from hci_scheduler.errors import StateConflict, ValidationError
from hci_scheduler.model import Affinity, Host, Workload
from hci_scheduler.rebalance import Move, Plan


def cluster(n_hosts: int = 3, cpu: int = 8000) -> Cluster:
    c = Cluster()
    for i in range(n_hosts):
        c.add_host(Host(f"h{i}", {"cpu": cpu, "memory": 16384, "ssd": 100, "net": 1000}))
    return c


def state(c: Cluster) -> tuple:
    """Everything a failed apply must leave as it was."""
    return c.assignments(), c.usage().tolist(), c.workload_counts()


def recomputed_usage(c: Cluster) -> np.ndarray:
    """Usage per host recomputed from the assignments (containers pay their request)."""
    used = np.zeros((len(c.hosts()), len(c.dimensions)), dtype=np.int64)
    for wid, hid in c.assignments().items():
        w = c.workload(wid)
        used[c.host_index(hid)] += [w.requests.get(d, 0) for d in c.dimensions]
    return used


def plan(c: Cluster, *steps) -> Plan:
    return Plan("consolidate", steps=[[Move(*m) for m in step] for step in steps], base_version=c.version)


def test_version_grows_on_every_change():
    c = cluster(2)
    seen = [c.version]

    def changed():
        assert c.version > seen[-1]
        seen.append(c.version)

    c.add_host(Host("h9", {"cpu": 1000, "memory": 1024}))
    changed()
    c.place(Workload("a", {"cpu": 100}))
    changed()
    c.bind(Workload("b", {"cpu": 100}), "h1")
    changed()
    c.release("a")
    changed()
    c.place_array(np.array([[10, 0, 0, 0, 0]]))
    changed()
    c.release_array([0])
    changed()
    c.update_host("h9", state="cordoned")
    changed()
    c.remove_host("h9")
    changed()
    v = c.version
    c.placements(), c.usage(), c.explain(Workload("x", {"cpu": 1}))
    assert c.version == v  # reads change nothing


def test_apply_moves_and_refuses_a_second_time():
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 3000}), "h0")
    c.bind(Workload("b", {"cpu": 3000}), "h1")
    p = plan(c, [("a", "h0", "h2"), ("b", "h1", "h2")])
    placed = c.apply(p)
    assert {(pl.workload_id, pl.host_id) for pl in placed} == {("a", "h2"), ("b", "h2")}
    assert c.assignments() == {"a": "h2", "b": "h2"}
    np.testing.assert_array_equal(c.usage(), recomputed_usage(c))
    assert c.workload_counts() == {"h2": 2}
    assert c.version != p.base_version
    before = state(c)
    with pytest.raises(StateConflict, match="version"):
        c.apply(p)
    assert state(c) == before


def test_stale_plan_is_refused_and_changes_nothing():
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 3000}), "h0")
    p = plan(c, [("a", "h0", "h1")])
    c.place(Workload("other", {"cpu": 100}))
    before = state(c)
    with pytest.raises(StateConflict, match="changed since"):
        c.apply(p)
    assert state(c) == before


def test_unordered_plan_is_refused():
    c = cluster(2)
    c.bind(Workload("a", {"cpu": 3000}), "h0")
    p = plan(c, [("a", "h0", "h1")])
    p.unordered = "cycle between a and b with no room"
    with pytest.raises(StateConflict, match="could not be ordered"):
        c.apply(p)
    assert c.assignments() == {"a": "h0"}
    with pytest.raises(ValidationError):
        c.apply("not a plan")


def test_a_swap_in_one_step_is_refused_because_both_copies_count():
    """Two full hosts swapping in one step would need room for both copies: refused, and
    the first step, already applied, is undone."""
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    c.bind(Workload("c", {"cpu": 1000}), "h2")
    before = state(c)
    p = plan(c, [("c", "h2", "h0")], [("a", "h0", "h1"), ("b", "h1", "h0")])
    with pytest.raises(StateConflict, match="move of a from h0 to h1"):
        c.apply(p)
    assert state(c) == before
    np.testing.assert_array_equal(c.usage(), recomputed_usage(c))


def test_a_swap_through_a_spare_host_in_three_steps():
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    p = plan(c, [("a", "h0", "h2")], [("b", "h1", "h0")], [("a", "h2", "h1")])
    c.apply(p)
    assert c.assignments() == {"a": "h1", "b": "h0"}
    np.testing.assert_array_equal(c.usage(), recomputed_usage(c))


def test_anti_affinity_counts_the_moving_workload_on_both_hosts():
    """x must not share a host with group g; moving g's member off h1 while x arrives there
    in the same step is refused (both copies count), in two steps it passes."""
    c = cluster(3)
    c.bind(Workload("g1", {"cpu": 100}, group="g"), "h1")
    c.bind(Workload("x", {"cpu": 100}, anti_affinity=[Affinity("g")]), "h0")
    same_step = plan(c, [("g1", "h1", "h2"), ("x", "h0", "h1")])
    with pytest.raises(StateConflict, match="move of x"):
        c.apply(same_step)
    assert c.assignments() == {"g1": "h1", "x": "h0"}
    c.apply(plan(c, [("g1", "h1", "h2")], [("x", "h0", "h1")]))
    assert c.assignments() == {"g1": "h2", "x": "h1"}


def test_moves_that_do_not_match_the_cluster_are_refused():
    c = cluster(2)
    c.bind(Workload("a", {"cpu": 100}), "h0")
    for step, why in (([("a", "h1", "h0")], "runs on h0"), ([("zz", "h0", "h1")], "not placed"),
                      ([("a", "h0", "h7")], "no host"), ([("a", "h0", "h1"), ("a", "h0", "h1")], "twice")):
        with pytest.raises(StateConflict, match=why):
            c.apply(plan(c, step))
        assert c.assignments() == {"a": "h0"}


def test_apply_step_by_step_needs_each_step_to_follow_the_last():
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    p = plan(c, [("a", "h0", "h2")], [("b", "h1", "h0")], [("a", "h2", "h1")])
    with pytest.raises(StateConflict):
        c.apply_step(p, 1)                     # step 0 first
    assert [pl.host_id for pl in c.apply_step(p, 0)] == ["h2"]
    assert c.assignments() == {"a": "h2", "b": "h1"}
    c.apply_step(p, 1)
    with pytest.raises(StateConflict):
        c.apply_step(p, 1)                     # done already
    c.apply_step(p, 2)
    assert c.assignments() == {"a": "h1", "b": "h0"}
    with pytest.raises(ValidationError):
        c.apply_step(p, 3)


def test_apply_step_refuses_after_another_change():
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 100}), "h0")
    c.bind(Workload("b", {"cpu": 100}), "h1")
    p = plan(c, [("a", "h0", "h2")], [("b", "h1", "h2")])
    c.apply_step(p, 0)
    c.place(Workload("other", {"cpu": 1}))
    with pytest.raises(StateConflict, match="no other change"):
        c.apply_step(p, 1)
    assert c.assignments()["b"] == "h1"


def test_vm_charge_follows_the_target_hosts_ratio():
    c = Cluster()
    c.add_host(Host("h0", {"cpu": 8000, "memory": 8192}, labels={"kvm": "true"}))
    c.add_host(Host("h1", {"cpu": 8000, "memory": 8192}, labels={"kvm": "true"}, allocation_ratio={"cpu": 2.0}))
    c.bind(Workload("vm", {"cpu": 3001, "memory": 1024}, kind="vm"), "h0")
    c.apply(plan(c, [("vm", "h0", "h1")]))
    cpu = c.dimensions.index("cpu")
    assert c.usage()[c.host_index("h1")][cpu] == 6002   # ceil(3001 x 2.0)
    assert c.usage()[c.host_index("h0")][cpu] == 0


def test_apply_step_resumes_after_a_restart():
    """A server that rebuilt the cluster from its log continues at step 1 with resume=True;
    the sources are still checked."""
    c = cluster(3)
    c.bind(Workload("a", {"cpu": 6000}), "h0")
    c.bind(Workload("b", {"cpu": 6000}), "h1")
    p = plan(c, [("a", "h0", "h2")], [("b", "h1", "h0")], [("a", "h2", "h1")])
    c.apply_step(p, 0)
    rebuilt = cluster(3)                            # the log replayed: a on h2 after step 0
    rebuilt.bind(Workload("a", {"cpu": 6000}), "h2")
    rebuilt.bind(Workload("b", {"cpu": 6000}), "h1")
    with pytest.raises(StateConflict):
        rebuilt.apply_step(p, 1)
    with pytest.raises(StateConflict, match="does not fit"):
        rebuilt.apply_step(p, 2, resume=True)       # step 1 is not done: b still fills h1
    with pytest.raises(StateConflict, match="runs on h2"):
        rebuilt.apply_step(p, 0, resume=True)       # step 0 is done: a runs on h2
    rebuilt.apply_step(p, 1, resume=True)
    rebuilt.apply_step(p, 2)
    assert rebuilt.assignments() == {"a": "h1", "b": "h0"}


def test_a_move_to_its_own_host_is_refused():
    c = cluster(2)
    c.bind(Workload("a", {"cpu": 100}), "h0")
    with pytest.raises(StateConflict, match="target is its source"):
        c.apply(plan(c, [("a", "h0", "h0")]))


def test_an_unexpected_error_midway_undoes_everything(monkeypatch):
    c = cluster(3)
    for w, h in (("a", "h0"), ("b", "h1"), ("c", "h2")):
        c.bind(Workload(w, {"cpu": 1000}), h)
    before = state(c)
    real = c._ledger.move_in
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(c._ledger, "move_in", failing)
    with pytest.raises(RuntimeError):
        c.apply(plan(c, [("a", "h0", "h1")], [("b", "h1", "h2"), ("c", "h2", "h0")]))
    assert state(c) == before
    np.testing.assert_array_equal(c.usage(), recomputed_usage(c))
