"""Order the moves from an initial to a final assignment into steps that are each feasible.

A step is a set of moves that run at the same time, so while it runs every moving workload
is charged on both its source and its target. Between steps the cluster is in a real state,
and every hard constraint of the Problem must hold there too:

- capacity per dimension, `fixed` load included, a VM charged by each host's ratio
  (`Problem.charge`); transient dimensions stay charged on the initial host;
- conflict (no two workloads of a service on one host), counting both copies;
- dedicated tenants: a host holding one runs nobody else's workload, counting both copies;
- spread: a service covers at least min(spread_min, the locations it covered at first);
- dependency: a neighbourhood holding service a holds service b.

Capacity, conflict and tenancy are checked on the state while the step runs (sources and
targets both charged); spread and dependency on the state after it (while it runs the
workload is in both places, which can only help those).

The greedy builds one step at a time from the pending moves, those that free room others
wait for first, then the cheapest. A move refused for room, conflict or tenancy on its target
waits until something leaves that host. When no pending move can start (a cycle: A must
leave before B arrives and the reverse), one workload of the cycle bounces through a host
with room (an extra move now, its own move later), as Entropy breaks migration cycles
through a pivot node (Hermenier et al., "Entropy: a consolidation manager for clusters",
VEE 2009); when no host has room, the ordering stops and `unordered` says which moves are
stuck and why.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..errors import ValidationError
from .problem import Problem

#: Bounces one workload may make before the ordering gives up on it (a bounce frees its
#: source; a workload stuck again after two bounces is in a cycle a bounce does not break).
MAX_BOUNCES_PER_WORKLOAD = 2

_HOST_BOUND = ("capacity", "conflict", "tenant")   # refusals that wait for a departure from the target


@dataclass
class OrderResult:
    """Steps of (workload, source, target) rows, or why the moves could not be ordered.

    steps : list of list of (int, int, int)
        workload index, source host, target host; a bounced workload appears twice.
    unordered : str
        empty, or which moves are stuck and why (then `steps` is what was ordered so far).
    bounces : int
        extra moves through a host with room that broke cycles.
    """

    steps: list[list[tuple[int, int, int]]] = field(default_factory=list)
    unordered: str = ""
    bounces: int = 0


def order_moves(problem: Problem, initial, final, *, max_steps: int | None = None) -> OrderResult:
    """Order the moves from `initial` to `final` (int host per workload) into feasible steps.

    Parameters
    ----------
    problem : Problem
        the hard constraints (capacity, charges, conflict, tenants, spread, dependencies).
    initial, final : int arrays (n,)
        host per workload before and after.
    max_steps : int, optional
        most steps the plan may take; beyond it the result says so in `unordered`.

    Raises
    ------
    ValidationError
        `final` moves a pinned workload, or puts one on a host that is closed or not allowed.
    """
    ordering = _Ordering(problem, initial, final)
    return ordering.run(max_steps)


class _Ordering:
    """The current state (hosts, usage, counters) and the greedy that steps through it."""

    def __init__(self, p: Problem, initial, final):
        n, m = p.n_workloads, p.n_hosts
        self.p = p
        self.initial = _hosts_of(initial, n, m, "initial")
        self.final = _hosts_of(final, n, m, "final")
        moving = np.flatnonzero(self.initial != self.final)
        stuck = moving[~p.movable[moving]]
        if len(stuck):
            raise ValidationError(f"final moves pinned {self._w(int(stuck[0]))}")
        bad = moving[~(p.allowed[p.allowed_class[moving], self.final[moving]] & p.open[self.final[moving]])]
        if len(bad):
            w = int(bad[0])
            raise ValidationError(f"final puts {self._w(w)} on {self._h(int(self.final[w]))}, "
                                  "which is closed or not allowed for it")
        self.host = self.initial.copy()
        self.transient = p.transient.copy() if p.transient.any() else None
        self.usage = p.fixed.copy()
        everyone = np.arange(n)
        home = p.charge(everyone, self.initial)
        np.add.at(self.usage, self.initial, home)
        # Charges on the two hosts nearly every move touches, computed once for all (a
        # charge per move and host was most of the ordering's time at 50k hosts): at home
        # the transient part never moves, on the final host a workload pays in full.
        self._at_home = np.where(self.transient, 0, home) if self.transient is not None else home
        self._at_final = p.charge(everyone, self.final)
        self.cap = p.capacity
        self.conflict_count: dict[tuple[int, int], int] = defaultdict(int)
        for w in everyone[(p.service >= 0)]:
            if p.conflict[p.service[w]]:
                self.conflict_count[(int(p.service[w]), int(self.initial[w]))] += 1
        self.any_dedicated = bool(p.dedicated.any())
        self.tenants: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        if self.any_dedicated:
            for w in range(n):
                self.tenants[int(self.initial[w])][int(p.tenant[w])] += 1
        # Spread and dependency counters, on the state after the step being built.
        self.loc_count: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.nb_count: dict[tuple[int, int], int] = defaultdict(int)
        for w in range(n):
            s = int(p.service[w])
            if s >= 0:
                self.loc_count[s][int(p.location[self.initial[w]])] += 1
                self.nb_count[(s, int(p.neighbourhood[self.initial[w]]))] += 1
        self.spread_need = {s: min(int(p.spread_min[s]), sum(1 for c in self.loc_count[s].values() if c))
                            for s in np.flatnonzero(p.spread_min > 0).tolist()}
        self.needs: dict[int, list[int]] = defaultdict(list)      # a -> the services a depends on
        self.needed_by: dict[int, list[int]] = defaultdict(list)  # b -> the services that depend on b
        for a, b in p.depends.tolist():
            self.needs[a].append(b)
            self.needed_by[b].append(a)

    # ------------------------------------------------------------------ names for messages

    def _w(self, w: int) -> str:
        ids = self.p.workload_ids
        return f"workload {ids[w] if ids is not None else w}"

    def _h(self, h: int) -> str:
        ids = self.p.host_ids
        return f"host {ids[h] if ids is not None else h}"

    # ------------------------------------------------------------------ charges and checks

    def _charge_on(self, w: int, h: int) -> np.ndarray:
        """What `w` counts for on `h` as a mover: at home without its transient part (which
        stays charged there whatever happens), elsewhere in full. Read-only."""
        if h == self.initial[w]:
            return self._at_home[w]
        if h == self.final[w]:
            return self._at_final[w]
        return self.p.charge(np.array([w]), np.array([h]))[0]  # a bounce host

    _arrival = _charge_on    # what `w` adds to a host when it arrives
    _departure = _charge_on  # what `w` gives back to a host when it leaves

    def _check(self, w: int, src: int, dst: int, during: np.ndarray) -> str:
        """Why `w` cannot move src -> dst in the step being built ('' when it can);
        `during` is the usage with the step's arrivals charged."""
        p = self.p
        if not (during[dst] + self._arrival(w, dst) <= self.cap[dst]).all():
            return "capacity"
        s = int(p.service[w])
        if s >= 0 and p.conflict[s] and self.conflict_count.get((s, dst), 0) > 0:
            return "conflict"
        if self.any_dedicated and not self._tenancy_ok(int(p.tenant[w]), dst):
            return "tenant"
        if s >= 0:
            ls, ld = int(p.location[src]), int(p.location[dst])
            if s in self.spread_need and ls != ld:
                counts = self.loc_count[s]
                covered = sum(1 for c in counts.values() if c) - (counts[ls] == 1) + (counts[ld] == 0)
                if covered < self.spread_need[s]:
                    return "spread"
            ns, nd = int(p.neighbourhood[src]), int(p.neighbourhood[dst])
            if ns != nd:
                if any(self.nb_count.get((b, nd), 0) == 0 for b in self.needs.get(s, ())):
                    return "dependency"
                if self.nb_count.get((s, ns), 0) == 1 and any(
                        self.nb_count.get((a, ns), 0) > 0 for a in self.needed_by.get(s, ())):
                    return "dependency"
        return ""

    def _tenancy_ok(self, tenant: int, h: int) -> bool:
        present = {t for t, c in self.tenants[h].items() if c > 0} | {tenant}
        dedicated = self.p.dedicated
        return all(len(present) == 1 for t in present if t >= 0 and dedicated[t])

    def _start(self, w: int, src: int, dst: int, during: np.ndarray) -> None:
        """Count `w` on dst in the running step (it still counts on src until the step ends)."""
        p = self.p
        during[dst] += self._arrival(w, dst)
        s = int(p.service[w])
        if s >= 0:
            if p.conflict[s]:
                self.conflict_count[(s, dst)] += 1
            self.loc_count[s][int(p.location[src])] -= 1
            self.loc_count[s][int(p.location[dst])] += 1
            self.nb_count[(s, int(p.neighbourhood[src]))] -= 1
            self.nb_count[(s, int(p.neighbourhood[dst]))] += 1
        if self.any_dedicated:
            self.tenants[dst][int(p.tenant[w])] += 1

    def _undo_start(self, w: int, src: int, dst: int, during: np.ndarray) -> None:
        p = self.p
        during[dst] -= self._arrival(w, dst)
        s = int(p.service[w])
        if s >= 0:
            if p.conflict[s]:
                self.conflict_count[(s, dst)] -= 1
            self.loc_count[s][int(p.location[src])] += 1
            self.loc_count[s][int(p.location[dst])] -= 1
            self.nb_count[(s, int(p.neighbourhood[src]))] += 1
            self.nb_count[(s, int(p.neighbourhood[dst]))] -= 1
        if self.any_dedicated:
            self.tenants[dst][int(p.tenant[w])] -= 1

    def _spread_only(self, w: int) -> bool:
        """A move refused for spread alone may join a step on credit when its service has
        no dependency (taking it back out cannot strand another move of the step)."""
        s = int(self.p.service[w])
        return s not in self.needs and s not in self.needed_by

    def _settle_spread(self, step: list, on_credit: list, during: np.ndarray) -> list:
        """Take moves of the services that joined on credit back out of `step`, last first,
        until each covers enough locations after the step (with none of them left in the
        step it is as before the step, which does); returns those taken out."""
        out = []
        for s in dict.fromkeys(int(self.p.service[w]) for w, _, _ in on_credit):
            for move in [m for m in reversed(step) if self.p.service[m[0]] == s]:
                if sum(1 for c in self.loc_count[s].values() if c) >= self.spread_need[s]:
                    break
                self._undo_start(*move, during)
                step.remove(move)
                out.append(move)
        return out

    def _finish(self, w: int, src: int, dst: int) -> None:
        """The step ended: `w` leaves src."""
        p = self.p
        self.usage[src] -= self._departure(w, src)
        self.host[w] = dst
        s = int(p.service[w])
        if s >= 0 and p.conflict[s]:
            self.conflict_count[(s, src)] -= 1
        if self.any_dedicated:
            self.tenants[src][int(p.tenant[w])] -= 1

    # ------------------------------------------------------------------ the greedy

    def run(self, max_steps: int | None) -> OrderResult:
        p = self.p
        result = OrderResult()
        pending = set(np.flatnonzero(self.initial != self.final).tolist())
        limit = max_steps if max_steps is not None else 4 * len(pending) + 16
        ready = set(pending)                                   # to try in the next step
        waiting: dict[int, set[int]] = defaultdict(set)        # target host -> moves waiting for a departure
        retry: set[int] = set()                                # refused for spread or dependency
        bounced: dict[int, int] = defaultdict(int)
        wanted = np.zeros(p.n_hosts, dtype=np.int64)           # pending arrivals per host
        np.add.at(wanted, self.final[list(pending)], 1)
        reasons: dict[int, str] = {}
        while pending:
            if len(result.steps) >= limit:
                result.unordered = (f"the moves need more than {limit} steps; "
                                    f"{len(pending)} moves left: {self._stuck(pending, reasons)}")
                return result
            candidates = sorted(ready | retry, key=lambda w: (-int(wanted[self.host[w]]),
                                                              int(p.move_cost[w]), w))
            ready.clear()
            retry.clear()
            during = self.usage.copy()
            step: list[tuple[int, int, int]] = []
            on_credit: list[tuple[int, int, int]] = []
            for w in candidates:
                src, dst = int(self.host[w]), int(self.final[w])
                why = self._check(w, src, dst, during)
                if why == "spread" and self._spread_only(w):
                    on_credit.append((w, src, dst))     # a later move of the step may cover for it
                elif why:
                    reasons[w] = why
                    (waiting[dst].add if why in _HOST_BOUND else retry.add)(w)
                    continue
                self._start(w, src, dst, during)
                step.append((w, src, dst))
            for move in self._settle_spread(step, on_credit, during):
                reasons[move[0]] = "spread"
                retry.add(move[0])
            if not step:
                step = self._bounces(pending, waiting, bounced, during)
                if not step:
                    result.unordered = ("no pending move can start and no host has room to take one of them "
                                        f"aside: {self._stuck(pending, reasons)}")
                    return result
                result.bounces += len(step)
                for w, _, _ in step:
                    bounced[w] += 1
                    for ws in waiting.values():
                        ws.discard(w)
                    ready.add(w)
            self.usage = during                                # the arrivals, and now the departures:
            for w, src, dst in step:
                self._finish(w, src, dst)
                if dst == self.final[w]:
                    pending.discard(w)
                    wanted[dst] -= 1
                ready |= waiting.pop(src, set())
            result.steps.append(step)
        return result

    def _bounces(self, pending: set[int], waiting, bounced, during: np.ndarray) -> list[tuple[int, int, int]]:
        """Break the cycles: in each group of hosts the stuck moves connect, workloads whose
        departure frees room others wait for go to the host with the most room left for
        them, so independent cycles unblock in the same step. A group of k stuck moves gets
        up to ceil(sqrt(k)) bounces: a long cycle unwinds one host per step from each
        bounce, so sqrt(k) extra moves cut its steps from about k to about 2 sqrt(k).
        Returns the bounces (charged in `during`), none when no host has room for any."""
        p = self.p
        parent: dict[int, int] = {}

        def find(h: int) -> int:
            while parent.setdefault(h, h) != h:
                parent[h] = parent[parent[h]]
                h = parent[h]
            return h

        for w in pending:
            parent[find(int(self.host[w]))] = find(int(self.final[w]))
        stuck_in: dict[int, int] = defaultdict(int)
        for w in pending:
            stuck_in[find(int(self.host[w]))] += 1
        budget = {g: math.isqrt(k - 1) + 1 for g, k in stuck_in.items()}      # ceil(sqrt(k))
        used_from: set[int] = set()
        # Ties broken by a fixed scramble of the index, not the lowest first: neighbouring
        # workloads sit on neighbouring hosts of a cycle, and bounces far apart unwind it faster.
        order = sorted(pending, key=lambda w: (-len(waiting.get(int(self.host[w]), ())), int(p.move_cost[w]),
                                               (w * 2654435761) % 2**32, w))
        scale = np.maximum(self.cap.max(axis=0), 1)
        everywhere = np.arange(p.n_hosts)
        out = []
        for w in order:
            src = int(self.host[w])
            group = find(src)
            if (budget[group] == 0 or src in used_from or bounced[w] >= MAX_BOUNCES_PER_WORKLOAD
                    or not waiting.get(src)):
                continue
            room = self.cap - during - p.charge(np.full(p.n_hosts, w), everywhere)
            ok = (room >= 0).all(axis=1) & p.open & p.allowed[p.allowed_class[w]]
            ok[[src, int(self.final[w])]] = False
            for h in sorted(np.flatnonzero(ok).tolist(), key=lambda h: (-float((room[h] / scale).min()), h)):
                if not self._check(w, src, h, during):
                    self._start(w, src, h, during)
                    out.append((w, src, h))
                    budget[group] -= 1
                    used_from.add(src)
                    break
        return out

    def _stuck(self, pending: set[int], reasons: dict[int, str], most: int = 10) -> str:
        rows = sorted(pending)
        text = "; ".join(f"{self._w(w)} from {self._h(int(self.host[w]))} to {self._h(int(self.final[w]))} "
                         f"(refused for {reasons.get(w, 'nothing yet')} there)" for w in rows[:most])
        return text + (f"; and {len(rows) - most} more" if len(rows) > most else "")


def _hosts_of(value, n: int, m: int, name: str) -> np.ndarray:
    a = np.asarray(value)
    if a.shape != (n,) or (n and not np.issubdtype(a.dtype, np.integer)):
        raise ValidationError(f"{name}: expected {n} integer hosts, got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64)
    if n and (a.min() < 0 or a.max() >= m):
        raise ValidationError(f"{name}: every workload must sit on a host 0..{m - 1}")
    return a
