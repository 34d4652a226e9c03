"""The keep-set fill in the core (sched_core._keepset.keep_fill) against a plain-numpy loop of
the same rule, on small random problems with mixed hosts, VMs under allocation ratios, allowed
classes, a cordoned host, host conflicts, dedicated tenants and move budgets; identical
workloads staying home; the block search's sub-problems against the whole problem."""
from __future__ import annotations

import numpy as np
import pytest

from hci_scheduler.rebalance import objective
from hci_scheduler.rebalance import blocks
from hci_scheduler.rebalance.keepset import fill, keep_set, kept_hosts, leaving_order, stay_home
from hci_scheduler.rebalance.problem import Problem


def reference_fill(problem: Problem, kept: np.ndarray, max_moves: int | None = None,
                   repack: bool = False) -> np.ndarray | None:
    """The numpy loop: leaving workloads largest first, each to the kept host, in a repack, of
    least growth of its stranded room (room over the largest host's room, summed, minus the
    most of the shape of what is still to place that it takes; that shape taken when a run of
    identical workloads starts or a host opened), ties by the dot product of charge and room
    over the largest host's room; else of least room left after it (best fit); ties: the lower host; else open the allowed empty host (nothing on it, none of its own to place)
    with most room; else keep the home host with its own."""
    p = problem
    n, m = p.n_workloads, p.n_hosts
    initial = p.initial
    kept = kept.copy()
    room = np.maximum(p.capacity - p.fixed, 0)
    scale = np.maximum(room.max(axis=0), 1)
    charge_home = p.charge(np.arange(n), initial)
    leaving = p.movable.copy() if repack else ~kept[initial]
    assignment = initial.copy()
    usage = p.fixed.copy()
    np.add.at(usage, initial[~leaving], charge_home[~leaving])
    on = np.bincount(initial[~leaving], minlength=m)
    conflict_count = {s: np.bincount(initial[(p.service == s) & ~leaving], minlength=m)
                      for s in np.flatnonzero(p.conflict).tolist()}
    dedicated = np.zeros(n, dtype=bool)
    dedicated[p.tenant >= 0] = p.dedicated[p.tenant[p.tenant >= 0]]
    owner = np.full(m, -1)
    owned = np.zeros(m, dtype=np.int64)
    stay = ~leaving & dedicated
    np.add.at(owned, initial[stay], 1)
    owner[initial[stay]] = p.tenant[stay]

    def add(w, h):
        usage[h] += p.charge(np.array([w]), np.array([h]))[0]
        on[h] += 1
        if p.service[w] in conflict_count:
            conflict_count[p.service[w]][h] += 1
        if dedicated[w]:
            owner[h] = p.tenant[w]
            owned[h] += 1

    order = leaving_order(p, leaving, scale)
    done = np.zeros(n, dtype=bool)
    pending = np.bincount(initial[leaving], minlength=m)     # leaving, not yet placed, per home
    moves = 0
    hosts = np.arange(m)
    def same_run(a, b):
        return (a is not None and (p.request[a] == p.request[b]).all() and p.vm[a] == p.vm[b]
                and p.allowed_class[a] == p.allowed_class[b] and p.service[a] == p.service[b]
                and p.tenant[a] == p.tenant[b])

    prev, share, stale = None, None, True
    for w in order.tolist():
        if done[w]:
            continue
        home = initial[w]
        charge = p.charge(np.full(m, w), hosts)
        base = p.allowed[p.allowed_class[w]] & p.open & (usage + charge <= p.capacity).all(axis=1)
        ok = base & kept
        if p.service[w] in conflict_count:
            ok &= conflict_count[p.service[w]] == 0
        ok &= ((on == 0) | ((owner == p.tenant[w]) & (owned == on))) if dedicated[w] else owner < 0
        target = -1
        new_run = not same_run(prev, w)
        prev = w
        if ok.any() and repack:
            if stale or new_run:
                # The shape of what is still to place, taken at the start of each run.
                left = p.request[order[~done[order]]].sum(axis=0) / scale
                share = left / left.sum() if left.sum() > 0 else np.zeros_like(left)
            room_before = (p.capacity - usage) / scale
            room_after = (p.capacity - usage - charge) / scale
            dot = ((charge / scale) * room_before).sum(axis=1)
            asked = share > 0
            stranded_before = room_before[:, asked].sum(axis=1) - (room_before[:, asked] / share[asked]).min(axis=1)
            stranded_after = room_after[:, asked].sum(axis=1) - (room_after[:, asked] / share[asked]).min(axis=1)
            score = 1e-3 * dot - (stranded_after - stranded_before) if asked.any() else dot
            target = int(np.flatnonzero(ok)[np.argmax(score[ok])])
            stale = False
        elif ok.any():
            slack = ((p.capacity - usage - charge) / scale).sum(axis=1)
            target = int(np.flatnonzero(ok)[np.argmin(slack[ok])])
        else:
            stale = True
            spare = base & ~kept & (on == 0) & (pending == 0)
            if spare.any():
                free_room = ((p.capacity - usage) / scale).sum(axis=1)
                target = int(np.flatnonzero(spare)[np.argmax(free_room[spare])])
                kept[target] = True
        if target >= 0:
            if target != home:
                assignment[w] = target
                moves += 1
                if max_moves is not None and moves > max_moves:
                    return None
            add(w, target)
            done[w] = True
            pending[home] -= 1
        elif kept[home]:
            return None          # a repacked workload fits nowhere: the fill gives up
        else:
            kept[home] = True
            for u in np.flatnonzero((initial == home) & leaving & ~done).tolist():
                add(u, home)
                done[u] = True
            pending[home] = 0
    return assignment


def random_problem(rng: np.random.Generator, n_hosts: int = 14, n_workloads: int = 60) -> Problem:
    """Mixed host shapes, each workload placed where it fits (first fit from a random host), so
    the start is feasible; some VMs (memory ratio 1.0, cpu 2.0), two allowed classes, an empty
    cordoned host, a conflicting service and a dedicated tenant."""
    shapes = np.array([[8000, 16384], [16000, 65536], [4000, 8192], [32000, 32768]])
    capacity = shapes[rng.integers(0, len(shapes), n_hosts)]
    ratio = np.tile([2000, 1000], (n_hosts, 1))
    vm = rng.random(n_workloads) < 0.3
    request = np.column_stack([rng.integers(1, 12, n_workloads) * 250, rng.integers(1, 12, n_workloads) * 512])
    service = np.where(rng.random(n_workloads) < 0.2, 0, np.where(rng.random(n_workloads) < 0.3, 1, -1))
    tenant = np.where(rng.random(n_workloads) < 0.1, 0, -1)
    allowed = np.ones((2, n_hosts), dtype=bool)
    allowed[1, rng.choice(n_hosts, n_hosts // 2, replace=False)] = False
    allowed_class = (rng.random(n_workloads) < 0.25).astype(np.int32)
    usage = np.zeros_like(capacity)
    on = np.zeros(n_hosts, dtype=np.int64)
    svc0 = np.zeros(n_hosts, dtype=np.int64)
    ded = np.zeros(n_hosts, dtype=np.int64)
    initial = np.full(n_workloads, -1)
    for w in range(n_workloads):
        charge = np.where(vm[w], (request[w] * ratio + 999) // 1000, request[w])
        for h in np.roll(np.arange(n_hosts), int(rng.integers(n_hosts))):
            if not allowed[allowed_class[w], h] or (usage[h] + charge[h] > capacity[h]).any():
                continue
            if service[w] == 0 and svc0[h]:
                continue
            if (tenant[w] == 0) != (ded[h] == on[h]) and on[h] > 0:
                continue
            initial[w] = h
            usage[h] += charge[h]
            on[h] += 1
            svc0[h] += service[w] == 0
            ded[h] += tenant[w] == 0
            break
    placed = initial >= 0
    keep = np.flatnonzero(placed)
    remap = lambda a: a[keep]
    initial = initial[keep]
    is_open = np.ones(n_hosts, dtype=bool)
    is_open[np.setdiff1d(np.arange(n_hosts), initial)[:1]] = False    # an empty host is cordoned
    for w in range(len(initial)):                      # the initial host is always allowed
        allowed_class_w = allowed_class[keep][w]
        if not allowed[allowed_class_w, initial[w]]:
            raise AssertionError("placed on a host it may not use")
    return Problem(capacity=capacity, request=remap(request), initial=initial, ratio_milli=ratio,
                   vm=remap(vm), service=remap(service), tenant=remap(tenant),
                   dedicated=np.array([True]) if (tenant[keep] == 0).any() else None,
                   conflict=np.array([True, False]), allowed=allowed, allowed_class=remap(allowed_class),
                   open=is_open, host_cost=np.full(n_hosts, 1000))


@pytest.mark.parametrize("max_moves,repack", [(None, False), (None, True), (3, False), (12, False)],
                         ids=["no-budget", "repack", "budget-3", "budget-12"])
def test_keep_fill_matches_numpy_reference(max_moves, repack):
    rng = np.random.default_rng(14)
    compared = 0
    for trial in range(40):
        p = random_problem(rng)
        fixed_use = np.zeros(p.n_hosts, dtype=bool)
        kept = kept_hosts(p, fixed_use, max_moves)
        if kept is None or not (repack or (~kept[p.initial]).any()):
            continue
        expected = reference_fill(p, kept, max_moves, repack)
        got = fill(p, kept, max_moves, repack)
        if expected is None:
            assert got is None, trial
            continue
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")
        # Feasibility by the independent check, and no move beyond the budget.
        assert objective.violations(p, got) == [], trial
        assert max_moves is None or int((got != p.initial).sum()) <= max_moves
        compared += 1
    assert compared >= 5           # the cases exercised the fill, not only its early exits


def test_keep_set_frees_the_smaller_hosts_of_a_spread_cell():
    """Four small hosts each a quarter full and one big empty host: the cover keeps the big one
    (16000 cpu covers 4 x 2000 + 4 x 2000 = 8000... with one host), every workload moves there."""
    # hosts 0-3: 4000 cpu / 8192 MiB, each carrying 2 x (1000, 1024); host 4: 16000 / 32768, empty.
    capacity = np.array([[4000, 8192]] * 4 + [[16000, 32768]])
    request = np.array([[1000, 1024]] * 8)
    initial = np.repeat(np.arange(4), 2)
    p = Problem(capacity=capacity, request=request, initial=initial, host_cost=np.full(5, 10))
    a = keep_set(p, np.zeros(5, dtype=bool))
    # demand (8000, 8192): one 16000 host covers it; two 4000 hosts do not reach 8000 cpu... they
    # do exactly (2 x 4000 = 8000), so the cover is 1 host (the big one) -> all 8 land on host 4.
    assert a is not None and set(a.tolist()) == {4}
    assert objective.violations(p, a) == []


def test_stay_home_keeps_loads_and_moves_fewer():
    """Identical workloads swapped destinations: per host the same load and group counts,
    and no more moves than before (here strictly fewer: two identical workloads crossed)."""
    # w0, w1 identical on hosts 0 and 1; the assignment sends w0 -> 1 and w1 -> 0 (2 moves, 0 needed).
    capacity = np.array([[4000, 8192]] * 3)
    request = np.array([[1000, 1024], [1000, 1024], [500, 512]])
    p = Problem(capacity=capacity, request=request, initial=np.array([0, 1, 2]))
    out = stay_home(p, np.array([1, 0, 0], dtype=np.int32))
    np.testing.assert_array_equal(out, [0, 1, 0])
    rng = np.random.default_rng(5)
    for trial in range(20):
        p = random_problem(rng)
        a = keep_set(p, np.zeros(p.n_hosts, dtype=bool))
        if a is None:
            continue
        scrambled = a.copy()
        for _ in range(10):   # swap identical workloads at random: same loads, more moves
            i, j = rng.integers(0, p.n_workloads, 2)
            same = (p.request[i] == p.request[j]).all() and p.vm[i] == p.vm[j] and \
                p.service[i] == p.service[j] and p.tenant[i] == p.tenant[j] and p.allowed_class[i] == p.allowed_class[j]
            if same:
                scrambled[[i, j]] = scrambled[[j, i]]
        out = stay_home(p, scrambled)
        np.testing.assert_array_equal(objective.usage(p, out), objective.usage(p, scrambled))
        assert objective.violations(p, out) == [], trial
        assert (out != p.initial).sum() <= (scrambled != p.initial).sum()


def test_block_problem_gains_what_the_whole_gains():
    """Moving workloads within a block changes the block's objective by exactly what it changes
    the whole problem's (every term is a sum over hosts or workloads)."""
    rng = np.random.default_rng(8)
    p = random_problem(rng, n_hosts=16, n_workloads=70)
    p.conflict[:] = False          # any shuffle below must stay comparable, not necessarily feasible
    p.dedicated[:] = False
    start = keep_set(p, np.zeros(p.n_hosts, dtype=bool))
    assert start is not None
    hosts = np.sort(rng.choice(np.flatnonzero(p.open), 8, replace=False))
    workloads = np.flatnonzero(np.isin(start, hosts))
    sub, rows = blocks.block_problem(p, hosts, workloads)
    local = np.searchsorted(rows, start[workloads])
    np.testing.assert_array_equal(rows[local], start[workloads])
    for _ in range(10):
        moved = local.copy()
        pick = rng.random(len(moved)) < 0.3
        moved[pick] = np.searchsorted(rows, rng.choice(hosts, int(pick.sum())))
        whole = start.copy()
        whole[workloads] = rows[moved]
        assert objective.total(sub, moved) - objective.total(sub, local) == \
            objective.total(p, whole) - objective.total(p, start)


def test_block_search_is_feasible_and_never_worse(monkeypatch):
    """Blocks of a few workloads on a random cell: the result passes the independent check,
    costs no more than the start and keeps within a move budget."""
    monkeypatch.setattr(blocks, "BLOCK_WORKLOADS", 15)
    rng = np.random.default_rng(21)
    for trial, budget in enumerate([None, 40]):
        p = random_problem(rng, n_hosts=20, n_workloads=80)
        start = keep_set(p, np.zeros(p.n_hosts, dtype=bool), budget)
        assert start is not None and blocks.splittable(p)
        result = blocks.search_in_blocks(p, start, time_limit_s=2.0, seed=0, max_moves=budget)
        assert result.stats["blocks"] >= 4
        assert objective.violations(p, result.assignment) == [], trial
        assert objective.total(p, result.assignment) <= objective.total(p, start)
        assert budget is None or int((result.assignment != p.initial).sum()) <= budget
