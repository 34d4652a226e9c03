"""Batch placement: order, runs of workloads that share a spec, and gangs.

A batch is checked whole by the facade before anything is placed; this part then
places it: consecutive workloads with the same compiled terms go through the core in
one call (the ledger's `place_run`), the others one at a time as `place` does, and a
gang with a member left out is released again and its room offered to the rest.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import Unschedulable
from ..model import BatchResult, Placement, Workload
from ..policy import largest_first
from ._compile import Compiler
from ._explanations import explain_request
from ._hosts import HostTable
from ._ledger import Ledger


def batch_order(hosts: HostTable, requests: np.ndarray, order: str) -> np.ndarray | None:
    """intp (n,): the rows of `requests` in placement order ("largest_first": by dominant
    share of the schedulable hosts' total limit), or None for "arrival": the rows go
    online, each placed as it would be alone, so the packer does not choose hosts for
    the batch as a whole (`_arrays.open_by_cover`). One row is online either way."""
    if order == "arrival" or len(requests) < 2:  # one row has one order: skip the O(hosts) totals
        return None
    n = hosts.n_rows
    state = hosts.state
    total = state.limit_array[:n][state.schedulable_array()[:n]].sum(axis=0)
    return largest_first(requests, total)


class BatchPlacer:
    """Places checked batches. `place_checked(workload, request, code, preempt)` is the
    facade's single-workload path (per-host services, new volumes, preemption)."""

    def __init__(self, hosts: HostTable, ledger: Ledger, compiler: Compiler, place_checked):
        self._hosts = hosts
        self._ledger = ledger
        self._compiler = compiler
        self._place_checked = place_checked

    def place_one(self, workload: Workload, request: np.ndarray, code: int, preempt: bool,
                  result: BatchResult) -> bool:
        """Place one checked workload of a batch; record the outcome in `result`."""
        try:
            p = self._place_checked(workload, request, code, preempt)
        except Unschedulable as exc:
            result.unplaced[workload.id] = exc.explanation
            return False
        result.placements[workload.id] = p.host_id
        if p.evicted or p.replicas or p.volumes or workload.per_host or p.numa_node >= 0:
            result.details[workload.id] = p
        return True

    def place(self, workloads: list[Workload], requests: np.ndarray, terms: list, rows: np.ndarray | None,
              code: int, gang: bool, preempt: bool) -> BatchResult:
        """Place checked `workloads` in the order `rows` (None: arrival order); terms[i] is None
        for the ones that take their own path (per-host services, new volumes)."""
        result = BatchResult({}, {})
        if rows is None:  # arrival order
            rows = np.arange(len(workloads), dtype=np.intp)
        if preempt or (len(workloads) == 1 and terms[0] is not None):
            # One at a time, as `place` does (a lone workload skips the batch arrays).
            for i in rows.tolist():
                self.place_one(workloads[i], requests[i], code, preempt, result)
            return result
        placed_ids: list[str] = []
        self._place_rows(workloads, requests, terms, rows, code, result, placed_ids)
        doomed = self._enforce_gangs(workloads, requests, result, placed_ids, gang)
        if doomed:
            # Rolling a gang back frees room: give the others that missed out a second pass.
            retry = [i for i in rows if workloads[i].id in result.unplaced and workloads[i].id not in doomed]
            for i in retry:
                del result.unplaced[workloads[i].id]
            self._place_rows(workloads, requests, terms, retry, code, result, placed_ids)
        return result

    def _place_rows(self, workloads, requests, terms, rows, code, result, placed_ids) -> None:
        """Place workloads[rows] in that order; consecutive workloads that share compiled
        terms (replicas of one spec, plain workloads) go through the kernel in one call."""
        rows = list(rows)
        start = 0
        while start < len(rows):
            i = rows[start]
            if terms[i] is None:  # per-host services and inline volumes take their own path
                if self.place_one(workloads[i], requests[i], code, False, result):
                    placed_ids.append(workloads[i].id)
                start += 1
                continue
            end = start + 1
            while end < len(rows) and terms[rows[end]] is terms[i]:
                end += 1
            run = rows[start:end]
            t = self._compiler.current(terms[i], workloads[i])
            for k in self._ledger.place_run(workloads, requests, t, run, code, result.placements, placed_ids):
                w = workloads[k]
                result.unplaced[w.id] = explain_request(self._hosts, w, requests[k], t)
            if workloads[i].numa:
                self._numa_details(workloads, run, result)
            start = end

    def _numa_details(self, workloads, run, result: BatchResult) -> None:
        """A NUMA-fit VM's Placement names the node the core charged: the caller records
        that decision (the log, the agent that pins the VM to it)."""
        records = self._ledger.records
        for k in run:
            wid = workloads[k].id
            if wid in result.placements:
                result.details[wid] = Placement(wid, result.placements[wid], numa_node=records[wid].numa)

    def _enforce_gangs(self, workloads, requests, result: BatchResult, placed_ids: list[str],
                       gang: bool) -> set[str]:
        """Roll back every gang with a member left unplaced (in reverse placement order);
        returns the ids of the rolled-back gangs' members."""
        members: dict[str, list[int]] = {}
        for i, w in enumerate(workloads):
            name = "<batch>" if gang else w.gang
            if name is not None:
                members.setdefault(name, []).append(i)
        broken = {name for name, idx in members.items() if any(workloads[i].id in result.unplaced for i in idx)}
        if not broken:
            return set()
        doomed = {workloads[i].id for name in broken for i in members[name]}
        for wid in reversed(placed_ids):
            if wid in doomed:
                self._ledger.release(wid)
                del result.placements[wid]
                result.details.pop(wid, None)
        for name in broken:
            for i in members[name]:
                w = workloads[i]
                if w.id not in result.unplaced:
                    expl = explain_request(self._hosts, w, requests[i], self._compiler.terms(w))
                    result.unplaced[w.id] = replace(expl, note=f"gang {name} not placed: other members did not fit")
        return doomed
