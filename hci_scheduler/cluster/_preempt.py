"""Preemption: which lower-priority workloads to evict so that one workload fits.

Only the choice of victims lives here; evicting them, committing the workload and
putting the victims back when the host still refuses go through the ledger. It runs
only after the ordinary placement failed, so it may scan every record.
"""
from __future__ import annotations

import numpy as np

import sched_core

from ..constraints import CompiledTerms
from ..model import Placement, Workload
from ._compile import Compiler
from ._hosts import HostTable
from ._ledger import Ledger


def choose_victims(hosts: HostTable, ledger: Ledger, workload: Workload, request: np.ndarray,
                   terms: CompiledTerms) -> tuple[int, list[str]] | None:
    """The host row and the victims to evict there: the fewest lower-priority workloads
    (then the lowest priorities, then the lowest row) whose charge covers the deficit;
    None when no host can be freed that way. Per-host replicas are never victims."""
    state = hosts.state
    reasons = np.zeros(state.n_rows, dtype=np.int32)
    sched_core.filter_constrained(state, hosts.cons.state, terms.core, request, reasons)
    # Only hosts refused for resources alone can be helped by evicting.
    rows = np.flatnonzero((reasons >= sched_core.REASON_DIM) & (reasons < sched_core.REASON_AFFINITY))
    records = ledger.records
    by_row: dict[int, list[str]] = {}
    for wid, rec in records.items():
        if rec.workload.priority < workload.priority:
            by_row.setdefault(rec.row, []).append(wid)
    best = None
    scale = state.inv_ref_array
    charge_est = np.maximum(request, 0)
    for row in rows.tolist():
        candidates = by_row.get(row, [])
        if not candidates:
            continue
        free = state.free_array[row].copy()
        deficit = np.maximum(charge_est - free, 0)
        # Fewest victims: take the ones that cover most of the deficit first.
        ranked = sorted(candidates, key=lambda wid: (
            -float((np.minimum(records[wid].charge, deficit) * scale).sum()), records[wid].workload.priority, wid))
        victims = []
        for wid in ranked:
            if (free >= charge_est).all():
                break
            free += records[wid].charge
            victims.append(wid)
        if not victims or not (free >= charge_est).all():
            continue
        rank = (len(victims), max(records[v].workload.priority for v in victims),
                sum(records[v].workload.priority for v in victims), row)
        if best is None or rank < best[0]:
            best = (rank, row, victims)
    return None if best is None else (best[1], best[2])


def preempt(hosts: HostTable, ledger: Ledger, compiler: Compiler, workload: Workload, request: np.ndarray,
            terms: CompiledTerms) -> Placement | None:
    """Evict the chosen victims and place `workload` on their host, or change nothing
    and return None."""
    choice = choose_victims(hosts, ledger, workload, request, terms)
    if choice is None:
        return None
    row, victims = choice
    saved = [ledger.release(v) for v in victims]
    if ledger.place_at(workload, request, terms, row) != 0:
        # e.g. a VM's ratio charge or NUMA fit still fails: put everything back
        for rec in saved:
            ledger.recommit(rec, compiler.current(rec.terms, rec.workload))
        return None
    return Placement(workload.id, hosts.row_hosts[row].id, evicted=tuple(victims))
