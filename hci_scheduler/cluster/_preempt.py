"""Preemption: which lower-priority workloads to evict so that one workload fits.

Only the choice of victims lives here; evicting them, committing the workload and
putting the victims back when the host still refuses go through the ledger. It runs
only after the ordinary placement failed, so it may scan every record.

A host is a candidate when it refused the workload for resources alone, or for
tenant isolation: there every workload that isolation keeps the newcomer from
sharing the host with (`tenant_conflicts`) must go, whatever room it frees, and
a host with a conflict that cannot be evicted (higher priority, or an anonymous
array row) is no candidate.
"""
from __future__ import annotations

import numpy as np

import sched_core

from ..constraints import CompiledTerms
from ..model import Placement, Workload
from ._compile import Compiler
from ._hosts import HostTable
from ._ledger import Ledger


def conflicts_with(workload: Workload, other: Workload) -> bool:
    """Tenant isolation keeps `workload` and `other` off one host: a dedicated tenant's
    workloads share a host with nobody else's, tenant-less ones included."""
    if workload.tenant == other.tenant:
        return False
    return workload.isolation == "dedicated" or other.isolation == "dedicated"


def choose_victims(hosts: HostTable, ledger: Ledger, workload: Workload, request: np.ndarray,
                   terms: CompiledTerms) -> tuple[int, list[str]] | None:
    """The host row and the victims to evict there: every tenant conflict, plus the fewest
    lower-priority workloads whose charge covers the deficit (then the lowest priorities,
    then the lowest row); None when no host can be freed that way. Per-host replicas are
    never victims (nor conflicts)."""
    state = hosts.state
    reasons = np.zeros(state.n_rows, dtype=np.int32)
    sched_core.filter_constrained(state, hosts.cons.state, terms.core, request, reasons)
    # Only hosts refused for resources alone, or for tenancy, can be helped by evicting.
    rows = np.flatnonzero(((reasons >= sched_core.REASON_DIM) & (reasons < sched_core.REASON_AFFINITY))
                          | (reasons == sched_core.REASON_TENANT))
    records = ledger.records
    by_row: dict[int, list[str]] = {}
    conflicts: dict[int, list[str]] = {}
    tenantless: dict[int, int] = {}  # named tenant-less workloads per row
    for wid, rec in records.items():
        if rec.workload.tenant is None:
            tenantless[rec.row] = tenantless.get(rec.row, 0) + 1
        if conflicts_with(workload, rec.workload):
            conflicts.setdefault(rec.row, []).append(wid)
        elif rec.workload.priority < workload.priority:
            by_row.setdefault(rec.row, []).append(wid)
    # Tenant-less load that no record holds: anonymous array rows, which cannot be evicted.
    n = hosts.n_rows
    anonymous = state.load_array[:n] - hosts.cons.array("accounted_load")[:n]
    best = None
    scale = state.inv_ref_array
    charge_est = np.maximum(request, 0)
    for row in rows.tolist():
        must = conflicts.get(row, [])
        if any(records[wid].workload.priority >= workload.priority for wid in must):
            continue
        if workload.isolation == "dedicated" and anonymous[row] > tenantless.get(row, 0):
            continue
        if reasons[row] == sched_core.REASON_TENANT and not must:
            continue  # refused for tenancy by nothing a record holds
        candidates = by_row.get(row, [])
        free = state.free_array[row].copy()
        for wid in must:
            free += records[wid].charge
        deficit = np.maximum(charge_est - free, 0)
        # Fewest victims: take the ones that cover most of the deficit first.
        ranked = sorted(candidates, key=lambda wid: (
            -float((np.minimum(records[wid].charge, deficit) * scale).sum()), records[wid].workload.priority, wid))
        victims = list(must)
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
    return Placement(workload.id, hosts.row_hosts[row].id, evicted=tuple(victims),
                     numa_node=ledger.records[workload.id].numa)
