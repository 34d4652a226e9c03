"""Explanations glue: runs the core's filter for one request and hands the reason codes
to `explain.py`, which turns them into per-filter host counts and a nearest miss.

It reads the host table and changes nothing, so every part that refuses a workload
(the facade, batches, services, volumes) builds its explanation here.
"""
from __future__ import annotations

import numpy as np

import sched_core

from .. import explain as _explain
from ..constraints import CompiledTerms
from ..model import Workload
from ._hosts import HostTable


def explain_request(hosts: HostTable, workload: Workload, request: np.ndarray, terms: CompiledTerms,
                    only_row: int | None = None) -> _explain.Explanation:
    """Why `request` (of `workload`, compiled as `terms`) fits or does not, on every live
    host or on `only_row` alone."""
    state = hosts.state
    n = hosts.n_rows
    reasons = np.zeros(state.n_rows, dtype=np.int32)
    sched_core.filter_constrained(state, hosts.cons.state, terms.core, request, reasons)
    reasons = reasons[:n]
    free = state.free_array[:n]
    live = hosts.live[:n].copy()
    if only_row is not None:
        live[:] = False
        live[only_row] = True
    filters = _explain.count_reasons(reasons, live, hosts.dimensions, terms.labels)
    resource_only = np.flatnonzero(live & (reasons >= sched_core.REASON_DIM)
                                   & (reasons < sched_core.REASON_AFFINITY))
    miss = _explain.nearest_miss(free, request, resource_only, state.inv_ref_array, hosts.ids(), hosts.dimensions)
    alloc = state.limit_array[:n][hosts.live[:n]]
    unresolvable = bool(len(alloc)) and not (alloc >= request).all(axis=1).any()
    return _explain.Explanation(
        workload_id=workload.id, n_hosts=int(live.sum()), feasible=int(((reasons == 0) & live).sum()),
        filters=filters, nearest_miss=miss, unresolvable=unresolvable)
