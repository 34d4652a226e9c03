"""Array workloads: anonymous requests placed as matrix rows, numbered across calls.

The orchestrators' and benchmarks' fast path. These rows have no names and no
records, so they do not go through the ledger: the core's row loops select and
commit a whole matrix in one nogil call, and this part keeps, per array row, the
host, the charge, the NUMA node and the terms it was counted under, which is what
`release_array` gives back.
"""
from __future__ import annotations

import numpy as np

import sched_core

from ..constraints import CompiledTerms
from ..errors import NotFound, ValidationError
from ._hosts import HostTable


class ArrayRows:
    """Placed array rows: charge (n, n_dims), host (n,) (-1: unplaced or released),
    NUMA node (n,) and terms id (n,) (-1: plain), for rows 0..n-1."""

    def __init__(self, hosts: HostTable):
        self._hosts = hosts
        n_dims = len(hosts.dimensions)
        self.charge = np.zeros((0, n_dims), dtype=np.int64)
        self.host = np.zeros(0, dtype=np.int64)
        self.numa = np.zeros(0, dtype=np.int64)
        self.terms_id = np.zeros(0, dtype=np.int32)
        self.terms_list: list[CompiledTerms] = []
        self.n = 0

    def place(self, req: np.ndarray, order: np.ndarray, code: int, terms: CompiledTerms | None,
              improve_s: float) -> np.ndarray:
        """Place checked requests in `order`; returns the host row per request (-1: no fit)."""
        table = self._hosts
        table.version += 1
        hosts = np.full(len(req), -1, dtype=np.int64)
        numa = np.full(len(req), -1, dtype=np.int64)
        if terms is None:
            free_before = table.schedulable_free() if improve_s > 0 else None
            sched_core.place_rows(table.state, req, order, code, hosts)
            if improve_s > 0 and (hosts >= 0).any():
                hosts = self._apply_improvement(free_before, req, hosts, float(improve_s))
            charge = req
            terms_id = -1
        else:
            charge = np.zeros_like(req)
            sched_core.place_rows_constrained(table.state, table.cons.state, terms.core, req, order, code,
                                              hosts, charge, numa)
            table.cons.record(terms, hosts[hosts >= 0], +1)
            self.terms_list.append(terms)
            terms_id = len(self.terms_list) - 1
        self._append(charge, hosts, numa, terms_id)
        return hosts

    def _apply_improvement(self, free_before: np.ndarray, req: np.ndarray, greedy: np.ndarray,
                           budget_s: float) -> np.ndarray:
        """Ask the improver for a better assignment; adopt it only if it checks out."""
        from ..improve import improve_assignment

        better = np.asarray(improve_assignment(free_before, req, greedy.copy(), budget_s), dtype=np.int64)
        if not is_better_assignment(free_before, req, greedy, better):
            return greedy
        state = self._hosts.state
        placed = np.flatnonzero(greedy >= 0).astype(np.intp)
        sched_core.release_rows(state, req, greedy, placed)
        sched_core.commit_rows(state, req, np.ascontiguousarray(better))
        return better

    def _append(self, charge: np.ndarray, hosts: np.ndarray, numa: np.ndarray, terms_id: int) -> None:
        n = len(charge)
        need = self.n + n
        if need > len(self.host):
            size = max(need, 2 * len(self.host), 1024)

            def grow(arr, fill):
                out = np.full((size,) + arr.shape[1:], fill, dtype=arr.dtype)
                out[: self.n] = arr[: self.n]
                return out

            self.charge = grow(self.charge, 0)
            self.host = grow(self.host, -1)
            self.numa = grow(self.numa, -1)
            self.terms_id = grow(self.terms_id, -1)
        sl = slice(self.n, need)
        self.charge[sl] = charge
        self.host[sl] = hosts
        self.numa[sl] = numa
        self.terms_id[sl] = terms_id
        self.n = need

    def release(self, idx: np.ndarray) -> None:
        """Release array rows `idx` (intp, 1-D), all checked before any is released."""
        table = self._hosts
        if idx.size:
            bad = (idx < 0) | (idx >= self.n)
            if bad.any():
                raise NotFound(f"array row {int(idx[bad][0])} was never placed (rows 0..{self.n - 1})")
            if len(np.unique(idx)) != len(idx):
                raise ValidationError("indices must not repeat a row")
            unplaced = self.host[idx] < 0
            if unplaced.any():
                raise NotFound(f"array row {int(idx[unplaced][0])} is not placed (never fit, or released)")
        table.version += 1
        tid = self.terms_id[idx]
        plain = idx[tid < 0]
        sched_core.release_rows(table.state, self.charge[: self.n], self.host[: self.n], plain)
        for t in np.unique(tid[tid >= 0]).tolist():
            terms = self.terms_list[t]
            sel = idx[tid == t]
            for r in sel.tolist():
                sched_core.release_constrained(table.state, table.cons.state, terms.core,
                                               int(self.host[r]), self.charge[r], int(self.numa[r]))
            table.cons.record(terms, self.host[sel], -1)
        self.host[idx] = -1

    def n_placed(self) -> int:
        return int((self.host[: self.n] >= 0).sum())


def is_better_assignment(free: np.ndarray, req: np.ndarray, greedy: np.ndarray, other: np.ndarray) -> bool:
    """Independent check: same rows placed, no host over its free capacity, no more hosts opened."""
    if other.shape != greedy.shape or not np.array_equal(other >= 0, greedy >= 0):
        return False
    if (other >= len(free)).any():
        return False
    placed = other >= 0
    load = np.zeros_like(free)
    np.add.at(load, other[placed], req[placed])
    if (load > free).any():
        return False
    return len(np.unique(other[placed])) <= len(np.unique(greedy[greedy >= 0]))
