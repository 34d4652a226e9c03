"""order_moves: steps that are each feasible with every moving workload counted on both its
hosts, cycles broken through a host with room, or a reason when they cannot be."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hci_scheduler.errors import ValidationError
from hci_scheduler.rebalance.order import order_moves
from hci_scheduler.rebalance.problem import Problem


def charge(p: Problem, w: int, h: int) -> list[int]:
    """The placement core's rule, written out: a VM pays ceil(request x ratio), a container its request."""
    req = p.request[w].tolist()
    if not p.vm[w]:
        return req
    return [-(-r * int(q) // 1000) for r, q in zip(req, p.ratio_milli[h].tolist())]


def replay(p: Problem, initial, final, steps) -> list[str]:
    """Independent check of an ordering: every state while a step runs (movers on both hosts)
    and after it, in plain Python. Returns the violations."""
    n, m = p.n_workloads, p.n_hosts
    where = [int(h) for h in initial]
    bad = []

    def covered(s, hosts):
        return len({int(p.location[hosts[w]]) for w in range(n) if p.service[w] == s})

    first_cover = {s: covered(s, where) for s in range(p.n_services)}
    for k, step in enumerate(steps):
        movers = [w for w, _, _ in step]
        if len(set(movers)) != len(movers):
            bad.append(f"step {k}: a workload moves twice")
        on = [[w for w in range(n) if where[w] == h] for h in range(m)]
        for w, src, dst in step:
            if where[w] != src:
                bad.append(f"step {k}: {w} is on {where[w]}, not {src}")
            if not (p.open[dst] and p.allowed[p.allowed_class[w], dst]):
                bad.append(f"step {k}: {w} to closed or forbidden host {dst}")
            on[dst].append(w)
        for h in range(m):
            used = [int(x) for x in p.fixed[h]]
            for w in on[h]:
                used = [u + c for u, c in zip(used, charge(p, w, h))]
            if any(u > c for u, c in zip(used, p.capacity[h].tolist())):
                bad.append(f"step {k}: host {h} over capacity while the step runs: {used}")
            services = Counter(int(p.service[w]) for w in on[h] if p.service[w] >= 0)
            for s, c in services.items():
                if p.conflict[s] and c > 1:
                    bad.append(f"step {k}: service {s} twice on host {h}")
            tenants = {int(p.tenant[w]) for w in on[h]}
            if any(t >= 0 and p.dedicated[t] for t in tenants) and len(tenants) > 1:
                bad.append(f"step {k}: dedicated tenant shares host {h}: {tenants}")
        for w, _, dst in step:
            where[w] = dst
        for s in range(p.n_services):
            if p.spread_min[s] and covered(s, where) < min(int(p.spread_min[s]), first_cover[s]):
                bad.append(f"step {k}: service {s} covers too few locations")
        for a, b in p.depends.tolist():
            na = {int(p.neighbourhood[where[w]]) for w in range(n) if p.service[w] == a}
            nb = {int(p.neighbourhood[where[w]]) for w in range(n) if p.service[w] == b}
            if not na <= nb:
                bad.append(f"step {k}: service {a} without {b} in neighbourhoods {na - nb}")
    if where != [int(h) for h in final]:
        bad.append(f"the steps end at {where}, not at {list(final)}")
    return bad


def test_chain_goes_in_dependency_order():
    """a can only arrive on h1 after b left it, and b on h2 after c left it."""
    p = Problem(capacity=[[10]] * 4, request=[[8], [8], [8]], initial=[0, 1, 2])
    result = order_moves(p, [0, 1, 2], [1, 2, 3])
    assert result.unordered == ""
    assert result.steps == [[(2, 2, 3)], [(1, 1, 2)], [(0, 0, 1)]]
    assert replay(p, [0, 1, 2], [1, 2, 3], result.steps) == []


def test_independent_moves_share_a_step():
    p = Problem(capacity=[[10]] * 4, request=[[8], [8]], initial=[0, 1])
    result = order_moves(p, [0, 1], [2, 3])
    assert len(result.steps) == 1 and len(result.steps[0]) == 2


def test_swap_of_two_full_hosts_bounces_through_the_spare_host():
    p = Problem(capacity=[[10, 10]] * 3, request=[[8, 2], [7, 3]], initial=[0, 1])
    result = order_moves(p, [0, 1], [1, 0])
    assert result.unordered == ""
    assert result.bounces == 1
    assert sum(len(s) for s in result.steps) == 3
    assert any(dst == 2 for step in result.steps for _, _, dst in step)   # through the spare
    assert replay(p, [0, 1], [1, 0], result.steps) == []


def test_a_long_cycle_unwinds_from_several_bounces():
    """40 full hosts each pass 2 workloads to the next (a ring), 2 spare hosts: one bounce
    would unwind it one host per step; ceil(sqrt(80)) = 9 bounces far apart cut the steps."""
    m, per = 40, 4
    p = Problem(capacity=[[4]] * (m + 2), request=[[1]] * (m * per), initial=np.arange(m * per) // per)
    initial = p.initial.copy()
    final = initial.copy()
    for h in range(m):
        final[h * per: h * per + 2] = (h + 1) % m
    result = order_moves(p, initial, final)
    assert result.unordered == ""
    assert replay(p, initial, final, result.steps) == []
    assert 1 <= result.bounces <= 9
    assert len(result.steps) < 40


def test_swap_without_a_spare_host_says_why():
    p = Problem(capacity=[[10]] * 2, request=[[8], [8]], initial=[0, 1],
                workload_ids=["a", "b"], host_ids=["h0", "h1"])
    result = order_moves(p, [0, 1], [1, 0])
    assert result.steps == []
    assert "workload a from host h0 to host h1" in result.unordered
    assert "workload b from host h1 to host h0" in result.unordered
    assert "capacity" in result.unordered


def test_a_closed_or_forbidden_host_is_not_a_bounce_target():
    p = Problem(capacity=[[10]] * 4, request=[[8], [8]], initial=[0, 1], open=[True, True, False, True],
                allowed=[[True, True, True, False]], allowed_class=[0, 0])
    assert order_moves(p, [0, 1], [1, 0]).unordered != ""


def test_conflict_counts_the_mover_on_both_hosts():
    """x and y are one service with conflict: y may reach h1 only after x has left it."""
    p = Problem(capacity=[[10]] * 3, request=[[1], [1]], initial=[1, 0], service=[0, 0], conflict=[True])
    result = order_moves(p, [1, 0], [2, 1])
    assert result.steps == [[(0, 1, 2)], [(1, 0, 1)]]
    assert replay(p, [1, 0], [2, 1], result.steps) == []


def test_dedicated_tenant_does_not_share_a_host_even_while_moving():
    p = Problem(capacity=[[10]] * 3, request=[[1], [1]], initial=[1, 0], tenant=[0, -1], dedicated=[True])
    result = order_moves(p, [1, 0], [2, 1])
    assert result.steps == [[(0, 1, 2)], [(1, 0, 1)]]


def test_vm_is_charged_by_each_hosts_ratio():
    """A VM of 4 on a host with ratio 2 costs 8: it fits h1 only once the container left."""
    p = Problem(capacity=[[10]] * 3, request=[[4], [3]], initial=[0, 1], vm=[True, False],
                ratio_milli=[[1000], [2000], [1000]])
    result = order_moves(p, [0, 1], [1, 2])
    assert result.steps == [[(1, 1, 2)], [(0, 0, 1)]]
    assert replay(p, [0, 1], [1, 2], result.steps) == []


def test_spread_is_kept_between_steps():
    """Service 0 must cover 2 locations; its two members swap locations: only together in
    one step (one alone would leave a location uncovered after its step)."""
    p = Problem(capacity=[[10]] * 3, request=[[1], [1]], initial=[0, 1], service=[0, 0], spread_min=[2],
                location=[0, 1, 0])
    result = order_moves(p, [0, 1], [1, 2])
    assert result.unordered == ""
    assert len(result.steps) == 1
    assert replay(p, [0, 1], [1, 2], result.steps) == []
    # a third member that moves within its location may go any time; one leaving it may not alone
    p = Problem(capacity=[[10]] * 4, request=[[1], [1]], initial=[0, 1], service=[0, 0], spread_min=[2],
                location=[0, 1, 1, 2])
    result = order_moves(p, [0, 1], [3, 2])
    assert result.unordered == "" and replay(p, [0, 1], [3, 2], result.steps) == []


def test_pinned_workload_or_forbidden_target_is_refused():
    p = Problem(capacity=[[10]] * 2, request=[[1]], initial=[0], movable=[False])
    with pytest.raises(ValidationError, match="pinned"):
        order_moves(p, [0], [1])
    p = Problem(capacity=[[10]] * 2, request=[[1]], initial=[0], open=[True, False])
    with pytest.raises(ValidationError, match="closed"):
        order_moves(p, [0], [1])
    with pytest.raises(ValidationError):
        order_moves(p, [0], [5])


def test_max_steps_is_reported():
    p = Problem(capacity=[[10]] * 4, request=[[8], [8], [8]], initial=[0, 1, 2])
    result = order_moves(p, [0, 1, 2], [1, 2, 3], max_steps=2)
    assert "more than 2 steps" in result.unordered


def random_assignment(rng, p: Problem, spare: int) -> list[int] | None:
    """A random feasible assignment on hosts 0..m-spare-1 (random order, random host that fits)."""
    m = p.n_hosts - spare
    used = p.fixed.copy()
    where = [-1] * p.n_workloads
    for w in rng.permutation(p.n_workloads).tolist():
        for h in rng.permutation(m).tolist():
            ch = np.array(charge(p, w, h))
            s, t = int(p.service[w]), int(p.tenant[w])
            others = [v for v in range(p.n_workloads) if where[v] == h]
            if (used[h] + ch > p.capacity[h]).any():
                continue
            if s >= 0 and p.conflict[s] and any(p.service[v] == s for v in others):
                continue
            tenants = {int(p.tenant[v]) for v in others} | {t}
            if any(x >= 0 and p.dedicated[x] for x in tenants) and len(tenants) > 1:
                continue
            where[w] = h
            used[h] += ch
            break
        else:
            return None
    return where


@st.composite
def instances(draw, with_tenants: bool):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    m = draw(st.integers(2, 6))
    n = draw(st.integers(1, 10))
    d = 2
    spare = 1
    capacity = rng.integers(8, 20, size=(m + spare, d))
    capacity[m:] = 200          # the spare host takes anything
    request = rng.integers(1, 9, size=(n, d))
    services = draw(st.integers(0, 3))
    tenant = rng.integers(-1, 2, size=n) if with_tenants else None
    problem = Problem(
        capacity=capacity, request=request, initial=np.zeros(n, np.int32),
        vm=rng.random(n) < 0.3, ratio_milli=rng.choice([1000, 1500, 2000], size=(m + spare, d)),
        fixed=np.where(rng.random((m + spare, d)) < 0.2, 1, 0),
        service=rng.integers(-1, services, size=n) if services else None,
        conflict=rng.random(services) < 0.5 if services else None,
        tenant=tenant, dedicated=[True, False][: int(tenant.max()) + 1] if with_tenants else None,
        spread_min=rng.integers(0, 3, size=services) if services and with_tenants else None,
        location=rng.integers(0, 3, size=m + spare) if with_tenants else None,
    )
    initial = random_assignment(rng, problem, spare)
    final = random_assignment(rng, problem, spare)
    return problem, initial, final


@settings(max_examples=150, deadline=None)
@given(instances(with_tenants=False))
def test_random_pairs_order_into_feasible_steps(instance):
    problem, initial, final = instance
    if initial is None or final is None:
        return
    problem.initial = np.array(initial, np.int32)
    result = order_moves(problem, initial, final)
    assert result.unordered == ""        # the spare host takes any one workload aside
    assert replay(problem, initial, final, result.steps) == []
    moves = sum(len(s) for s in result.steps)
    assert moves == sum(a != b for a, b in zip(initial, final)) + result.bounces


@settings(max_examples=100, deadline=None)
@given(instances(with_tenants=True))
def test_random_pairs_with_tenants_and_spread_never_break_a_constraint(instance):
    problem, initial, final = instance
    if initial is None or final is None:
        return
    problem.initial = np.array(initial, np.int32)
    result = order_moves(problem, initial, final)
    if result.unordered:
        assert result.unordered.startswith(("no pending move", "the moves need"))
        return
    assert replay(problem, initial, final, result.steps) == []


def test_transient_dimensions_stay_charged_on_the_initial_host():
    """ROADEF transient resources: w0's disk (dimension 1) stays on h0 after it left, so w1
    cannot take its place; without the transient rule it can, one step after w0 left."""
    kwargs = {"capacity": [[10, 10]] * 3, "request": [[1, 6], [1, 6]], "initial": [0, 2]}
    result = order_moves(Problem(**kwargs), [0, 2], [1, 0])
    assert result.steps == [[(0, 0, 1)], [(1, 2, 0)]]
    result = order_moves(Problem(**kwargs, transient=[False, True]), [0, 2], [1, 0])
    assert result.unordered and "workload 1 from host 2 to host 0 (refused for capacity" in result.unordered
