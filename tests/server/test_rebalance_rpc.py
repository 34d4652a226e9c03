"""Rebalance, ApplyPlan, Drain and PlanCapacity through the service (issue 14, "Service and CLI").

The server runs in this process on port 0 over a data directory. What a plan did is
checked independently of the code under test: placements from ListAllocations, usage
recomputed per host from the workloads' requests against each host's capacity.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict

import grpc
import pytest

from hci_scheduler.server.app import create_server
from hci_scheduler.server.check import check_store
from hci_scheduler.store import StoreError, StoreUnwritable
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import in_process_server, make_host, make_workload, stub_for

SEARCH_S = 1.0  # small instances: the search needs far less


@contextlib.contextmanager
def in_process(data_dir):
    """A started server over `data_dir`: (server, stub)."""
    with in_process_server(data_dir) as (srv, _, stub):
        yield srv, stub


@pytest.fixture
def server(tmp_path):
    with in_process(tmp_path / "data") as (srv, stub):
        yield srv, stub


def allocations(stub) -> dict[str, str]:
    return {a.workload_id: a.host_id for a in stub.ListAllocations(pb.ListAllocationsRequest()).allocations}


def check_within_limits(stub) -> dict[str, dict[str, int]]:
    """Usage per host recomputed from the placed workloads' requests; every host within
    capacity - reserved (these tests set no allocation ratio). Returns the usage."""
    hosts = {h.id: h for h in stub.ListHosts(pb.ListHostsRequest()).hosts}
    used: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for a in stub.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations:
        for d, v in a.workload.requests.items():
            used[a.host_id][d] += v
    for hid, dims in used.items():
        h = hosts[hid]
        for d, v in dims.items():
            assert v <= h.capacity[d] - h.reserved.get(d, 0), f"{hid} {d}: {v} > {h.capacity[d]}"
    return used


def final_hosts(plan: pb.RebalancePlan) -> dict[str, str]:
    return {m.workload_id: m.target_host_id for s in plan.steps for m in s.moves}


def events_between(stub, after: int, until: int) -> list[pb.Event]:
    out = []
    stream = stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after), timeout=10)
    for resp in stream:
        out.append(resp.event)
        if resp.event.sequence >= until:
            break
    stream.cancel()
    return out


def spread_layout(stub, n: int = 4) -> None:
    """n hosts of 4,000 millicores, one 1,000-millicore workload on each: one host holds them all."""
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"h{i}") for i in range(n)]))
    placed = stub.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}") for i in range(n)],
                                        strategy=pb.STRATEGY_SPREAD)).placements
    assert sorted(p.host_id for p in placed) == [f"h{i}" for i in range(n)]


def two_step_layout(stub) -> None:
    """Hosts of 10,000 millicores: h1 {a 5000, b 3000}, h2 {c 6000}, h3 {z 5000}. Draining h3,
    z fits only on h1 and only once b left h1 for h2 (5000 + 3000 + 5000 > 10000), and b
    cannot leave in z's step (z is counted on h1 and h3 while it moves): two steps."""
    for hid, workloads in (("h1", [("a", 5000), ("b", 3000)]), ("h2", [("c", 6000)]), ("h3", [("z", 5000)])):
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(hid, cpu=10000, memory=10000)]))
        for wid, cpu in workloads:
            p = stub.Place(pb.PlaceRequest(workloads=[make_workload(wid, cpu=cpu, memory=100)])).placements[0]
            assert p.host_id == hid  # binpack: the one host with room


def keep_two_step_plan(srv) -> pb.RebalancePlan:
    """The drain of h3 in `two_step_layout`, made in the process (as a program embedding the
    server may) and kept for ApplyPlan: the restart tests need two steps whatever the search finds."""
    from hci_scheduler.rebalance import Move, Plan

    cluster = srv.state.cluster
    plan = Plan("drain", steps=[[Move("b", "h1", "h2", 256)], [Move("z", "h3", "h1", 256)]], cost=512,
                base_version=cluster.version, id="two-step-drain")
    return srv.state.plans.keep(srv.state, plan, cluster).proto


def rebalance(stub, goal=pb.REBALANCE_GOAL_CONSOLIDATE, **kw) -> pb.RebalancePlan:
    return stub.Rebalance(pb.RebalanceRequest(goal=goal, time_limit_s=SEARCH_S, **kw)).plan


def _has_bounds() -> bool:
    import importlib.util

    return importlib.util.find_spec("hci_scheduler.bounds") is not None


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


# -- the wire form of a plan ---------------------------------------------------------------


@pytest.mark.parametrize("lower_bound", [None, 0, 7], ids=["no bound", "bound 0", "bound 7"])
def test_a_plan_survives_its_wire_form(lower_bound):
    import numpy as np

    from hci_scheduler.rebalance import Move, Plan
    from hci_scheduler.server import convert

    plan = Plan("drain", steps=[[Move("w1", "h1", "h2", 5), Move("w2", "h1", "h3", 7)], [Move("w1", "h2", "h4", 5)]],
                cost=17, objective_before=30, objective_after=12, terms_before={"host_cost": 30},
                terms_after={"host_cost": 12}, lower_bound=lower_bound, hosts_used_before=3, hosts_used_after=2,
                hosts_freed=1, status="optimal", id="p1",
                search={"seconds": np.float64(0.5), "iterations": np.int64(12), "room_on": "h4",
                        "pinned_reasons": {"numa": 2}})
    wire = convert.plan_to_proto(plan, base_sequence=42)
    assert wire.HasField("lower_bound") == (lower_bound is not None)
    assert dict(wire.search_stats) == {"seconds": 0.5, "iterations": 12.0, "pinned_reasons.numa": 2.0}
    assert dict(wire.search_notes) == {"room_on": "h4"} and wire.base_sequence == 42
    back = convert.plan_from_proto(pb.RebalancePlan.FromString(wire.SerializeToString()))
    for name in ("goal", "steps", "cost", "objective_before", "objective_after", "terms_before", "terms_after",
                 "lower_bound", "hosts_used_before", "hosts_used_after", "hosts_freed", "status", "id"):
        assert getattr(back, name) == getattr(plan, name), name


def test_searches_take_turns_a_waiting_one_gives_up_at_its_deadline_and_the_queue_is_bounded():
    from hci_scheduler.rebalance import Plan
    from hci_scheduler.server import plans
    from hci_scheduler.server.writer import DeadlineExpired

    started, release = threading.Event(), threading.Event()

    class SlowCluster:  # its search holds the turn until released
        version = 0

        def rebalance(self, goal, **options):
            started.set()
            release.wait(10)
            return Plan(goal, id=f"plan-{options['seed']}")

    class State:
        lock, cluster, sequence = threading.RLock(), SlowCluster(), 0

    registry = plans.PlanRegistry()
    first = threading.Thread(target=registry.make, args=(State, "consolidate"), kwargs={"seed": 1})
    first.start()
    assert started.wait(10)
    with pytest.raises(DeadlineExpired):
        registry.make(State, "consolidate", time.monotonic() + 0.2, seed=2)
    waiters = [threading.Thread(target=registry.make, args=(State, "consolidate", time.monotonic() + 30),
                                kwargs={"seed": 10 + i}) for i in range(plans.MAX_SEARCH_WAITERS)]
    for t in waiters:
        t.start()
    for _ in range(200):  # until every waiter is queued
        if registry._calls == plans.MAX_SEARCHES + plans.MAX_SEARCH_WAITERS:
            break
        time.sleep(0.01)
    with pytest.raises(plans.SearchesBusy):
        registry.make(State, "consolidate", seed=3)
    release.set()
    for t in [first, *waiters]:
        t.join(10)
    assert [registry.get(f"plan-{s}").plan.id for s in (1, 10, 13)] == ["plan-1", "plan-10", "plan-13"]
    assert registry.make(State, "consolidate", time.monotonic() + 10, seed=4).plan.id == "plan-4"  # turns came back


def test_a_search_stops_when_its_caller_goes_away_and_frees_the_turn():
    from hci_scheduler.rebalance import Plan
    from hci_scheduler.server import plans

    rounds = []

    class Cluster:  # a search that reports progress every round until told to stop
        version = 0

        def rebalance(self, goal, progress=None, **options):
            for i in range(1000):
                rounds.append(i)
                if progress is not None:
                    progress(i / 1000, 0)
            return Plan(goal, id=f"plan-{options['seed']}")

    class State:
        lock, cluster, sequence = threading.RLock(), Cluster(), 0

    registry = plans.PlanRegistry()
    with pytest.raises(plans.SearchCancelled):
        registry.make(State, "consolidate", None, lambda: len(rounds) >= 3, seed=1)
    assert len(rounds) == 3  # stopped at the report after the caller left
    assert registry.make(State, "consolidate", time.monotonic() + 1, lambda: False, seed=2).plan.id == "plan-2"


# -- Rebalance and ApplyPlan ---------------------------------------------------------------


def test_rebalance_changes_nothing_and_apply_moves_as_planned(server):
    _, stub = server
    spread_layout(stub)
    before, seq = allocations(stub), stub.GetStatus(pb.GetStatusRequest()).last_sequence

    plan = rebalance(stub)
    assert allocations(stub) == before and stub.GetStatus(pb.GetStatusRequest()).last_sequence == seq
    # 4 x 1000 millicores fit one 4000-millicore host: 3 hosts freed, the bound is 1 host.
    assert (plan.hosts_used_before, plan.hosts_used_after, plan.hosts_freed) == (4, 1, 3)
    assert plan.status != pb.PLAN_STATUS_UNCHANGED and not plan.unordered
    # The bound comes with hci_scheduler.bounds (the covering bound); unset while it is absent.
    assert plan.lower_bound == 1 if plan.HasField("lower_bound") else not _has_bounds()
    assert plan.base_sequence == seq and plan.id
    assert plan.terms_before and plan.objective_before > plan.objective_after
    moves = [m for s in plan.steps for m in s.moves]
    assert moves and all(m.source_host_id == before[m.workload_id] for m in moves[:1])

    seen: list[pb.Event] = []
    watcher = threading.Thread(target=lambda: seen.extend(events_between(stub, seq, seq + len(moves) + 2)))
    watcher.start()
    applied = stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id))
    watcher.join(10)
    assert applied.steps_applied == len(plan.steps) and applied.sequence == seq + len(moves) + 2

    # Placements: the plan's final targets, every host within its limits, one host in use.
    expected = dict(before, **final_hosts(plan))
    assert allocations(stub) == expected
    assert {p.workload_id: p.host_id for p in applied.placements} == final_hosts(plan)
    assert len(check_within_limits(stub)) == 1
    assert stub.GetStatus(pb.GetStatusRequest()).hosts_used == 1

    # Watchers: PLAN_STARTED, every move in step order as MOVED (host_id = target), PLAN_APPLIED.
    assert [e.type for e in seen] == ([pb.EVENT_TYPE_PLAN_STARTED] + [pb.EVENT_TYPE_MOVED] * len(moves)
                                      + [pb.EVENT_TYPE_PLAN_APPLIED])
    assert seen[0].plan_id == plan.id and seen[0].plan.steps == plan.steps and seen[0].plan_step == 0
    got = [(e.workload_id, e.source_host_id, e.host_id, e.plan_step) for e in seen[1:-1]]
    assert got == [(m.workload_id, m.source_host_id, m.target_host_id, k)
                   for k, s in enumerate(plan.steps) for m in s.moves]
    assert all(e.plan_id == plan.id for e in seen)

    # Idempotent: a repeat answers the same and writes nothing.
    last = stub.GetStatus(pb.GetStatusRequest()).last_sequence
    assert stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)) == applied
    assert stub.GetStatus(pb.GetStatusRequest()).last_sequence == last


def test_balance_moves_load_under_its_target(server):
    _, stub = server
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("hot"), make_host("cold")]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload(f"b{i}") for i in range(3)]))  # binpack: all on "hot"
    assert set(allocations(stub).values()) == {"hot"}
    plan = rebalance(stub, pb.REBALANCE_GOAL_BALANCE, targets={"cpu": 0.5})
    # 3000 of 4000 millicores on "hot" is 1000 over the 2000 target: one workload moves.
    assert plan.terms_before["load_cost"] > 0 and plan.terms_after["load_cost"] == 0
    stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id))
    used = check_within_limits(stub)
    assert used["hot"]["cpu"] <= 2000 and used["cold"]["cpu"] <= 2000


def test_defragment_makes_room_for_a_workload_no_host_takes(server):
    _, stub = server
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("d0"), make_host("d1")]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("a", cpu=2000), make_workload("b", cpu=1000)],
                               strategy=pb.STRATEGY_SPREAD))
    big = make_workload("big", cpu=3500)
    refused = stub.Place(pb.PlaceRequest(workloads=[big])).placements[0]  # 2000 and 3000 free: fits nowhere
    assert not refused.host_id
    plan = rebalance(stub, pb.REBALANCE_GOAL_DEFRAGMENT, workload=big)
    room_on = plan.search_notes["room_on"]
    assert room_on in ("d0", "d1") and not allocations(stub).get("big")  # not placed by the plan
    stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id))
    used = check_within_limits(stub)
    assert 4000 - used.get(room_on, {}).get("cpu", 0) >= 3500
    assert stub.Place(pb.PlaceRequest(workloads=[big])).placements[0].host_id == room_on


def test_a_stale_plan_is_refused_and_changes_nothing(server):
    _, stub = server
    spread_layout(stub)
    plan = rebalance(stub)
    assert plan.steps
    stub.Place(pb.PlaceRequest(workloads=[make_workload("late")]))  # the state changes after planning
    before, seq = allocations(stub), stub.GetStatus(pb.GetStatusRequest()).last_sequence
    for _ in range(2):  # the repeat gets the same answer
        code, details = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and plan.id in details and "changed" in details
    assert allocations(stub) == before and stub.GetStatus(pb.GetStatusRequest()).last_sequence == seq


@pytest.mark.parametrize("method,request_,code,phrase", [
    ("Rebalance", pb.RebalanceRequest(), grpc.StatusCode.INVALID_ARGUMENT, "goal"),
    ("Rebalance", pb.RebalanceRequest(goal=9), grpc.StatusCode.INVALID_ARGUMENT, "goal"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, time_limit_s=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "time_limit_s"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, time_limit_s=601),
     grpc.StatusCode.INVALID_ARGUMENT, "time_limit_s"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, time_limit_s=float("nan")),
     grpc.StatusCode.INVALID_ARGUMENT, "time_limit_s"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, max_moves=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "max_moves"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, seed=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, seed=2**31),
     grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_CONSOLIDATE, host_ids=["h0"]),
     grpc.StatusCode.INVALID_ARGUMENT, "host_ids"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_DRAIN), grpc.StatusCode.INVALID_ARGUMENT, "drain"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_DRAIN, host_ids=["nope"]),
     grpc.StatusCode.NOT_FOUND, "nope"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_BALANCE, targets={"bogus": 0.5}),
     grpc.StatusCode.INVALID_ARGUMENT, "bogus"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_BALANCE, targets={"cpu": 1.5}),
     grpc.StatusCode.INVALID_ARGUMENT, "cpu"),
    ("Rebalance", pb.RebalanceRequest(goal=pb.REBALANCE_GOAL_DEFRAGMENT), grpc.StatusCode.INVALID_ARGUMENT,
     "defragment"),
    ("ApplyPlan", pb.ApplyPlanRequest(), grpc.StatusCode.INVALID_ARGUMENT, "plan_id"),
    ("ApplyPlan", pb.ApplyPlanRequest(plan_id="no-such-plan"), grpc.StatusCode.NOT_FOUND, "no-such-plan"),
    ("Drain", pb.DrainRequest(), grpc.StatusCode.INVALID_ARGUMENT, "host_id"),
    ("Drain", pb.DrainRequest(host_id="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ("PlanCapacity", pb.PlanCapacityRequest(workloads=[make_workload("p")]), grpc.StatusCode.INVALID_ARGUMENT,
     "host_types"),
    ("PlanCapacity", pb.PlanCapacityRequest(host_types=[pb.HostType(name="t", capacity={"cpu": 1}, price=-1)]),
     grpc.StatusCode.INVALID_ARGUMENT, "price"),
    ("PlanCapacity", pb.PlanCapacityRequest(host_types=[pb.HostType(name="t", capacity={"gpus": 1}, price=1)]),
     grpc.StatusCode.INVALID_ARGUMENT, "gpus"),
], ids=["no goal", "unknown goal", "negative time", "time over 600 s", "NaN time", "negative max_moves",
        "negative seed", "seed over 2^31-1", "hosts for consolidate", "drain without hosts", "drain unknown host", "unknown target dimension",
        "target above 1", "defragment without workload", "empty plan id", "unknown plan", "drain no host",
        "drain unknown host", "no host types", "negative price", "unknown capacity dimension"])
def test_bad_requests_change_nothing(server, method, request_, code, phrase):
    _, stub = server
    spread_layout(stub, 2)
    before, seq = allocations(stub), stub.GetStatus(pb.GetStatusRequest()).last_sequence
    got, details = code_of(lambda: getattr(stub, method)(request_))
    assert got == code and phrase in details
    assert allocations(stub) == before and stub.GetStatus(pb.GetStatusRequest()).last_sequence == seq


# -- Drain and PlanCapacity ------------------------------------------------------------------


def test_drain_empties_the_host(server):
    _, stub = server
    spread_layout(stub, 3)  # h0, h1, h2 of 4000 millicores, 1000 on each
    resp = stub.Drain(pb.DrainRequest(host_id="h1", time_limit_s=SEARCH_S))
    assert [(m.workload_id, m.source_host_id) for s in resp.plan.steps for m in s.moves] == [("w1", "h1")]
    assert resp.applied.steps_applied == len(resp.plan.steps) == 1
    placed = allocations(stub)
    assert placed["w1"] in ("h0", "h2") and placed["w0"] == "h0" and placed["w2"] == "h2"
    assert "h1" not in check_within_limits(stub)
    h1 = next(h for h in stub.ListHosts(pb.ListHostsRequest()).hosts if h.id == "h1")
    assert h1.state == pb.HOST_STATE_DRAINING and h1.workload_count == 0


def test_drain_makes_room_first_when_it_must(server):
    _, stub = server
    two_step_layout(stub)
    resp = stub.Drain(pb.DrainRequest(host_id="h3", time_limit_s=SEARCH_S))
    # The one way: b to h2 first, then z to h1.
    assert [[(m.workload_id, m.source_host_id, m.target_host_id) for m in s.moves] for s in resp.plan.steps] == \
        [[("b", "h1", "h2")], [("z", "h3", "h1")]]
    assert resp.applied.steps_applied == 2
    assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}
    used = check_within_limits(stub)
    assert "h3" not in used and used["h1"]["cpu"] == 10000 and used["h2"]["cpu"] == 9000
    h3 = next(h for h in stub.ListHosts(pb.ListHostsRequest()).hosts if h.id == "h3")
    assert h3.state == pb.HOST_STATE_DRAINING and h3.workload_count == 0


def test_drain_refused_when_the_workloads_fit_nowhere_changes_nothing(server):
    _, stub = server
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("full1"), make_host("full2")]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("big1", cpu=3000), make_workload("big2", cpu=3000)],
                               strategy=pb.STRATEGY_SPREAD))
    before, seq = allocations(stub), stub.GetStatus(pb.GetStatusRequest()).last_sequence
    code, details = code_of(lambda: stub.Drain(pb.DrainRequest(host_id="full1", time_limit_s=SEARCH_S)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and details
    assert allocations(stub) == before and stub.GetStatus(pb.GetStatusRequest()).last_sequence == seq
    assert {h.id: h.state for h in stub.ListHosts(pb.ListHostsRequest()).hosts}["full1"] == pb.HOST_STATE_READY


def test_plan_capacity_buys_the_cheapest_hosts(server):
    _, stub = server
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("now", cpu=4000, memory=8192)]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload("running", cpu=4000, memory=1024)]))
    pending = [make_workload(f"p{i}", cpu=3000, memory=1024) for i in range(3)]
    types = [pb.HostType(name="small", capacity={"cpu": 4000, "memory": 8192}, price=10),
             pb.HostType(name="big", capacity={"cpu": 12000, "memory": 32768}, price=25)]
    resp = stub.PlanCapacity(pb.PlanCapacityRequest(workloads=pending, host_types=types))
    # "now" is full; 3 x 3000 millicores: one big host (25) beats three small ones (3 x 10 = 30,
    # one 3000 each: two do not fit in 4000).
    assert dict(resp.hosts_to_add) == {"big": 1} and resp.cost == 25 and resp.fits_now == 0
    assert dict(resp.placements) == {f"p{i}": "big#0" for i in range(3)}
    assert resp.lower_bound <= resp.cost
    assert allocations(stub) == {"running": "now"}  # nothing placed


# -- a restart in the middle of ApplyPlan ------------------------------------------------------


class _Lines(logging.Handler):
    """Messages of the server's logger, whatever logging setup ran before."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _fail_step(srv, step: int, error: StoreError) -> None:
    """Make the store raise `error` on the commit of `step`'s MOVED events."""
    store = srv.state.store
    append = store.append

    def failing(records):
        if any(r.kind == pb.EVENT_TYPE_MOVED and pb.Event.FromString(r.body).plan_step == step for r in records):
            raise error
        append(records)

    store.append = failing


def _crash_before_step(srv, step: int) -> None:
    """As if the process died before `step` is durable: the store fails there, the writer
    stops, and no clean stop (no final snapshot) follows."""
    _fail_step(srv, step, StoreError(f"injected: the process dies before step {step} is durable"))
    srv.state.on_fatal = lambda exc: None


def _die(srv) -> None:
    srv.grpc.stop(0)
    srv.state.snapshots.close(srv.state, final=False)
    srv.state.store.close()


@contextlib.contextmanager
def _restarted(data_dir):
    lines = _Lines()
    logger = logging.getLogger("hci_scheduler.server")
    logger.addHandler(lines)
    try:
        with in_process(data_dir) as (srv, stub):
            yield srv, stub, lines.lines
    finally:
        logger.removeHandler(lines)


def _interrupted_after_step_1(tmp_path) -> pb.RebalancePlan:
    data = tmp_path / "data"
    srv, port = create_server("127.0.0.1:0", data_dir=str(data))
    srv.start()
    channel, stub = stub_for(f"127.0.0.1:{port}")
    try:
        two_step_layout(stub)
        plan = keep_two_step_plan(srv)
        _crash_before_step(srv, 1)
        code, _ = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)))
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        _die(srv)
    return plan


def test_restart_in_the_middle_of_apply_plan_reports_and_continues(tmp_path):
    plan = _interrupted_after_step_1(tmp_path)
    with _restarted(tmp_path / "data") as (_, stub, lines):
        # The log says step 0 is done and step 1 is not.
        assert f"plan {plan.id} interrupted after step 1 of 2" in lines
        status = stub.GetStatus(pb.GetStatusRequest())
        assert [(p.plan_id, p.steps_done, p.steps_total) for p in status.interrupted_plans] == [(plan.id, 1, 2)]
        assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h3"}
        check_within_limits(stub)

        seq = status.last_sequence
        applied = stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id))
        assert applied.steps_applied == 2 and applied.sequence == seq + 3
        assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}
        check_within_limits(stub)
        assert not stub.GetStatus(pb.GetStatusRequest()).interrupted_plans
        events = events_between(stub, seq, seq + 3)
        assert [(e.type, e.plan_step, e.workload_id) for e in events] == [
            (pb.EVENT_TYPE_PLAN_STARTED, 1, ""), (pb.EVENT_TYPE_MOVED, 1, "z"), (pb.EVENT_TYPE_PLAN_APPLIED, 0, "")]
        assert stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)) == applied
    assert check_store(str(tmp_path / "data")) == []  # the offline check replays the plan's events too
    # The next start replays the whole apply: the same placements, nothing interrupted.
    with _restarted(tmp_path / "data") as (_, stub, lines):
        assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}
        assert not stub.GetStatus(pb.GetStatusRequest()).interrupted_plans
        assert not [ln for ln in lines if "interrupted" in ln]


def test_an_interrupted_plan_whose_workload_left_its_source_is_refused_by_name(tmp_path):
    plan = _interrupted_after_step_1(tmp_path)
    with _restarted(tmp_path / "data") as (_, stub, _lines):
        stub.Release(pb.ReleaseRequest(workload_ids=["z"]))
        before, seq = allocations(stub), stub.GetStatus(pb.GetStatusRequest()).last_sequence
        code, details = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "z (step 1 moves it from h3; it is not placed)" in details
        assert allocations(stub) == before and stub.GetStatus(pb.GetStatusRequest()).last_sequence == seq
        assert [p.steps_done for p in stub.GetStatus(pb.GetStatusRequest()).interrupted_plans] == [1]


def test_an_interrupted_plan_outlives_the_snapshot_of_a_clean_stop(tmp_path):
    plan = _interrupted_after_step_1(tmp_path)
    with _restarted(tmp_path / "data") as (_, stub, lines):
        assert [p.steps_done for p in stub.GetStatus(pb.GetStatusRequest()).interrupted_plans] == [1]
    # The clean stop wrote a snapshot after the PLAN_STARTED event: the next start replays none of it.
    with _restarted(tmp_path / "data") as (_, stub, lines):
        status = stub.GetStatus(pb.GetStatusRequest())
        assert status.snapshot_sequence == status.last_sequence
        assert f"plan {plan.id} interrupted after step 1 of 2" in lines
        assert [(p.plan_id, p.steps_done, p.steps_total) for p in status.interrupted_plans] == [(plan.id, 1, 2)]
        assert stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)).steps_applied == 2
        assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}
    with _restarted(tmp_path / "data") as (_, stub, lines):
        assert not stub.GetStatus(pb.GetStatusRequest()).interrupted_plans
        assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}


def test_a_store_refusing_a_step_interrupts_the_plan_and_it_continues_once_writable(server):
    srv, stub = server
    two_step_layout(stub)
    plan = keep_two_step_plan(srv)
    append = srv.state.store.append
    srv.state.probe_interval_s = 0.05
    _fail_step(srv, 1, StoreUnwritable("injected: disk full"))
    code, details = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)))
    assert code == grpc.StatusCode.UNAVAILABLE and "disk full" in details
    # The state was rebuilt from the log: step 0 stays, step 1 is undone.
    status = stub.GetStatus(pb.GetStatusRequest())
    assert not status.writable
    assert [(p.plan_id, p.steps_done, p.steps_total) for p in status.interrupted_plans] == [(plan.id, 1, 2)]
    assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h3"}
    check_within_limits(stub)

    srv.state.store.append = append  # the disk has room again: the probe lets writes back
    for _ in range(200):
        if stub.GetStatus(pb.GetStatusRequest()).writable:
            break
        time.sleep(0.05)
    applied = stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id))
    assert applied.steps_applied == 2
    assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h1"}
    assert not stub.GetStatus(pb.GetStatusRequest()).interrupted_plans


def test_a_plan_made_before_the_state_was_rebuilt_is_refused(server):
    srv, stub = server
    spread_layout(stub)
    plan = rebalance(stub)
    srv.state.probe_interval_s = 0.05
    append = srv.state.store.append

    def refuse(records):
        raise StoreUnwritable("injected: disk full")

    srv.state.store.append = refuse  # the Place below is undone: the Cluster is rebuilt from the log
    code, _ = code_of(lambda: stub.Place(pb.PlaceRequest(workloads=[make_workload("lost")])))
    assert code == grpc.StatusCode.UNAVAILABLE
    srv.state.store.append = append
    for _ in range(200):
        if stub.GetStatus(pb.GetStatusRequest()).writable:
            break
        time.sleep(0.05)
    before = allocations(stub)
    code, details = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id=plan.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "rebuilt" in details
    assert allocations(stub) == before


def test_a_step_that_no_longer_fits_stops_the_plan_after_the_steps_before_it(server):
    from hci_scheduler.rebalance import Move, Plan

    srv, stub = server
    two_step_layout(stub)
    cluster = srv.state.cluster
    # Step 1 sends z where c (6000) and b (3000, moved there by step 0) leave 1000 of 10000.
    plan = Plan("drain", steps=[[Move("b", "h1", "h2", 256)], [Move("z", "h3", "h2", 256)]],
                base_version=cluster.version, id="too-full")
    srv.state.plans.keep(srv.state, plan, cluster)
    code, details = code_of(lambda: stub.ApplyPlan(pb.ApplyPlanRequest(plan_id="too-full")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "stopped after step 1 of 2" in details and "z" in details
    assert allocations(stub) == {"a": "h1", "b": "h2", "c": "h2", "z": "h3"}  # step 0 stays, durable
    check_within_limits(stub)
    progress = stub.GetStatus(pb.GetStatusRequest()).interrupted_plans
    assert [(p.plan_id, p.steps_done, p.steps_total) for p in progress] == [("too-full", 1, 2)]
    assert "step 1 was refused" in progress[0].reason

    stub.Release(pb.ReleaseRequest(workload_ids=["c"]))  # room on h2: the plan continues
    assert stub.ApplyPlan(pb.ApplyPlanRequest(plan_id="too-full")).steps_applied == 2
    assert allocations(stub) == {"a": "h1", "b": "h2", "z": "h2"}
    check_within_limits(stub)
    assert not stub.GetStatus(pb.GetStatusRequest()).interrupted_plans
