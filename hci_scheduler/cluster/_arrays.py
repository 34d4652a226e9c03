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

from sched_core._keepset import keep_fill

from ..bounds import cover_by_shape
from ..constraints import CompiledTerms
from ..errors import NotFound, ValidationError
from ._hosts import HostTable

# Strategies that consolidate: for these, which empty hosts a batch opens is
# decided by the covering problem (`open_by_cover`), not by the score's key.
CONSOLIDATING = (sched_core.BINPACK, sched_core.DOT)


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

    def place(self, req: np.ndarray, order: np.ndarray | None, code: int, terms: CompiledTerms | None,
              improve_s: float, host_cost: np.ndarray | None = None) -> np.ndarray:
        """Place checked requests in `order` (`_batch.batch_order`; None: arrival order, online);
        returns the host row per request (-1: no fit).

        A reordered batch with a consolidating strategy chooses the empty hosts it opens
        as a whole (`open_by_cover`); host_cost: int64 (n_rows,) price per host row,
        optional, makes that choice the cheapest."""
        table = self._hosts
        online = order is None
        if online:
            order = np.arange(len(req), dtype=np.intp)
        table.version += 1
        hosts = np.full(len(req), -1, dtype=np.int64)
        numa = np.full(len(req), -1, dtype=np.int64)
        if terms is None:
            free_before = table.schedulable_free() if improve_s > 0 else None
            if code in CONSOLIDATING and not online:
                open_by_cover(table, req, order, code, hosts, host_cost)
            else:
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


def open_by_cover(table: HostTable, req: np.ndarray, order: np.ndarray, code: int, hosts: np.ndarray,
                  host_cost: np.ndarray | None = None) -> None:
    """Place `req[order]` on the table's state, choosing which empty hosts to open.

    A best-fit key reaches an empty cluster's smallest hosts first, so on mixed
    host sizes a batch fills the hosts whose shape suits its demand least (issue
    14: 869 hosts where 550 cover the demand). Here:

    1. the hosts already in use take what fits them; the empty hosts opened for the rest
       are the covering mix of its demand (`bounds.cover_by_shape`: fewest hosts, or
       least cost with `host_cost`, then the most room), lowest rows first within a shape;
    2. the rows go, largest first (`_largest_first`), to the open host whose room
       has the largest dot product with the row, both over the largest host's room
       (`sched_core._keepset.keep_fill`, the DotProduct rule of Panigrahy et al.,
       "Heuristics for Vector Bin Packing"): a memory-heavy row goes where memory is left,
       so no host strands its scarce dimension, and one scale for all hosts sends a large
       row to a host with room for it rather than to the smallest (Google 2011 cell: 598
       hosts by best fit into the same cover, 584 by the rule over each host's capacity,
       575 over one scale; bench/README.md);
    3. what did not fit opens the cover of its own demand among the hosts left empty,
       and so on until every row is placed or no empty host is left.

    On identical empty hosts every choice is the same, so the core places the batch by
    the strategy as it always did. Writes `hosts` (-1: no fit) and commits to the state.
    """
    state, n = table.state, table.n_rows
    schedulable = state.schedulable_array()[:n]
    free = state.free_array[:n]
    in_use = schedulable & (state.used_array[:n] != 0).any(axis=1)
    empty = np.flatnonzero(schedulable & ~in_use)
    shape_key = free[empty] if host_cost is None else np.column_stack([free[empty], host_cost[:n][empty]])
    if len(order) < 2 or len(empty) < 2 or (shape_key == shape_key[0]).all():
        sched_core.place_rows(state, req, order, code, hosts)
        return
    n_dims = req.shape[1]
    # Host rows 0..n-1 with their free room as capacity, and a closed row n where every
    # request starts (the fill's "initial host"); what is still there after it is unplaced.
    capacity = np.zeros((n + 1, n_dims), dtype=np.int64)
    capacity[:n] = np.maximum(free, 0)
    usage = np.zeros_like(capacity)
    kept = np.zeros(n + 1, dtype=np.uint8)
    kept[:n][in_use] = 1
    is_open = np.zeros(n + 1, dtype=np.uint8)
    is_open[:n][schedulable] = 1
    rows = np.ascontiguousarray(req, dtype=np.int64)
    n_rows = len(rows)
    at = np.full(n_rows, n, dtype=np.int32)
    scale = np.maximum(capacity[:n][schedulable].max(axis=0), 1).astype(np.float64)
    pending = _largest_first(rows, order, scale)
    closed = np.ones(n, dtype=bool)
    closed[in_use] = False
    if in_use.any():
        # The hosts in use take what fits them before any empty host opens.
        _fill(capacity, usage, rows, at, pending, kept, is_open, scale)
        pending = pending[at[pending] == n]
    while len(pending):
        candidates = empty[closed[empty]]
        opened = _cover_rows(free, candidates, rows[pending].sum(axis=0), host_cost)
        if len(opened) == 0:
            # No cover exists (or the rows ask for nothing): open every empty host left.
            opened = candidates
        closed[opened] = False
        kept[opened] = 1
        _fill(capacity, usage, rows, at, pending, kept, is_open, scale)
        left = pending[at[pending] == n]
        if len(left) == len(pending) and len(opened) == 0:
            break          # nothing placed and nothing left to open
        pending = left
    hosts[:] = np.where(at < n, at, -1)
    sched_core.commit_rows(state, req, hosts)


def _largest_first(req: np.ndarray, order: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The rows of `order`, largest first by their largest share of `scale` (the largest
    host's room per dimension: an item's size relative to a bin, as vector bin packing
    heuristics measure it; the caller's order weighs dimensions by the cluster's totals),
    identical rows together so the fill scores the hosts once per run of them."""
    rows = np.asarray(order, dtype=np.intp)
    sub = req[rows]
    size = (sub / scale).max(axis=1)
    keys = (rows,) + tuple(sub[:, r] for r in range(sub.shape[1] - 1, -1, -1)) + (-size,)
    return rows[np.lexsort(keys)]


def _fill(capacity, usage, rows, at, pending, kept, is_open, scale) -> None:
    """Rows `pending` into the kept hosts (the keep-set fill of the rebalancer, rows that
    fit nowhere left at the closed row)."""
    m, n_rows = capacity.shape[0], len(rows)
    n_dims = capacity.shape[1]
    home_ptr = np.zeros(m + 1, dtype=np.intp)
    home_ptr[m] = n_rows
    home_ptr[m - 1] = 0
    keep_fill(capacity, usage, np.full((m, n_dims), 1000, dtype=np.int64), rows, np.zeros(n_rows, dtype=np.uint8),
              np.full(n_rows, m - 1, dtype=np.int32), pending, home_ptr, np.arange(n_rows, dtype=np.intp),
              np.ones((1, m), dtype=np.uint8), np.zeros(n_rows, dtype=np.int32), is_open, kept,
              np.zeros(m, dtype=np.int32), np.full(n_rows, -1, dtype=np.int32), np.zeros(0, dtype=np.int32),
              np.zeros((1, m), dtype=np.int32), np.full(n_rows, -1, dtype=np.int32), np.zeros(n_rows, dtype=np.uint8),
              np.full(m, -1, dtype=np.int64), np.zeros(m, dtype=np.int64), scale, at, -1, True,
              over_scale=True, least_stranding=True)


def _cover_rows(free: np.ndarray, candidates: np.ndarray, need: np.ndarray,
                host_cost: np.ndarray | None) -> np.ndarray:
    """Rows among `candidates` (empty hosts) forming the best cover of `need`
    (lowest rows first within a shape); empty when nothing is needed or no cover exists."""
    if len(candidates) == 0 or not need.any():
        return np.zeros(0, dtype=np.int64)
    cost = None if host_cost is None else host_cost[candidates]
    try:
        cover = cover_by_shape(free[candidates], need, cost, prefer_room=True)
    except ValidationError:  # all of them together do not cover it: the caller opens them all
        return np.zeros(0, dtype=np.int64)
    rank = np.zeros(len(candidates), dtype=np.int64)  # position of each row within its shape
    by_shape = np.argsort(cover.shape_of, kind="stable")
    starts = np.searchsorted(cover.shape_of[by_shape], np.arange(len(cover.shapes)))
    rank[by_shape] = np.arange(len(candidates)) - starts[cover.shape_of[by_shape]]
    return candidates[rank < cover.counts[cover.shape_of]]


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
