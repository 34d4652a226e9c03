"""The host table: which host sits in which row, and the per-row arrays the core reads.

It sits apart from the placement ledger because hosts change rarely (registration,
labels, state) while the ledger changes on every placement; nothing here charges or
releases a workload's resources. The core's `HostState` lives here because its limit,
schedulable and reference rows are host data; the ledger reaches it through
`HostTable.state`, never through a copy, because growing the table replaces it.
"""
from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Sequence

import numpy as np

import sched_core

from ..constraints import ConstraintIndex
from ..errors import DuplicateId, NotFound, UnknownDimension, ValidationError
from ..model import HOST_STATES, Host, check_quantity

_INITIAL_ROWS = 64
_MAX_NUMA = 8
#: The most a dimension may total over all live hosts (of each host's larger of capacity
#: and limit, which bounds its reserved, allocatable, used and free too). Every sum over
#: hosts then fits int64, exactly: numpy's column sums (utilization, batch order), the
#: improver's, and GetStatus's int64 totals. One host holds at most 2**46 - 1 at a
#: 64x allocation ratio (2**52), so 2,048 such hosts fit; hosts of real sizes, billions.
MAX_CLUSTER_TOTAL = 2**63 - 1


def _bound_sums(compiled: list, n_dims: int) -> list[int]:
    """Exact per-dimension sums, as Python ints, of max(capacity, limit) over hosts
    compiled by `HostTable._compile_host`. Each entry is below 2**53 (2**46 x 64), so
    it is summed as 26-bit halves: no int64 sum of up to 2**36 hosts can wrap."""
    if not compiled:
        return [0] * n_dims
    bound = np.maximum(np.stack([c[0] for c in compiled]), np.stack([c[2] for c in compiled]))
    high, low = (bound >> 26).sum(axis=0).tolist(), (bound & ((1 << 26) - 1)).sum(axis=0).tolist()
    return [(h << 26) + lo for h, lo in zip(high, low)]


class HostTable:
    """Rows <-> host ids and the per-row host arrays.

    Attributes
    ----------
    state : sched_core.HostState
        limit, used, free and load per row; replaced (grown) when rows run out.
    cons : ConstraintIndex
        label and taint bitmasks and topology domains per row (its counters are the ledger's).
    capacity, allocatable, ratio_milli : int64 (n_rows_allocated, n_dims)
        as registered; allocation ratios x 1000.
    live : bool (n_rows_allocated,)
        rows holding a host.
    n_rows : int
        high-water mark of rows ever used; rows at or above it are empty.
    row_hosts : list of Host or None
        the host per row (None for free rows).
    host_rows : dict str -> int
        row per host id.
    bound_total : list of int (n_dims,)
        sum over live hosts of max(capacity, limit), as Python ints: kept at most
        MAX_CLUSTER_TOTAL per dimension (see check_new).
    """

    def __init__(self, dimensions: tuple[str, ...], weights: np.ndarray):
        self.dimensions = dimensions
        self.dim_index = {d: i for i, d in enumerate(dimensions)}
        self._weights = weights
        n_dims = len(dimensions)
        self.ref = np.zeros(n_dims, dtype=np.int64)
        self.state = sched_core.HostState(_INITIAL_ROWS, self._inv_ref(self.ref))
        self.allocatable = np.zeros((_INITIAL_ROWS, n_dims), dtype=np.int64)
        self.capacity = np.zeros((_INITIAL_ROWS, n_dims), dtype=np.int64)
        self.ratio_milli = np.full((_INITIAL_ROWS, n_dims), 1000, dtype=np.int64)
        self.live = np.zeros(_INITIAL_ROWS, dtype=bool)
        self.n_rows = 0
        self.spare_rows: list[int] = []      # removed rows, reused lowest first (a heap)
        self.host_rows: dict[str, int] = {}
        self.row_hosts: list[Host | None] = []
        self.bound_total = [0] * n_dims
        self.cons = ConstraintIndex(dimensions)
        self.cons.rebuild(self.row_hosts, _INITIAL_ROWS, self.ratio_milli)
        self.version = 0                     # Cluster.version: +1 on every change of hosts or placements

    def _inv_ref(self, ref: np.ndarray) -> np.ndarray:
        return np.divide(self._weights, ref, out=np.zeros(len(ref)), where=ref > 0)

    def _grow(self, n_rows: int) -> None:
        old = self.state.n_rows
        if n_rows <= old:
            return
        new = max(n_rows, 2 * old)
        self.state = self.state.grown(new)
        for name, fill in (("allocatable", 0), ("capacity", 0), ("ratio_milli", 1000)):
            arr = getattr(self, name)
            grown = np.full((new, arr.shape[1]), fill, dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        live = np.zeros(new, dtype=bool)
        live[:old] = self.live
        self.live = live
        self.cons.rebuild(self.row_hosts, new, self.ratio_milli)

    # ------------------------------------------------------------------ lookups

    def row(self, host_id: str) -> int:
        try:
            return self.host_rows[host_id]
        except (KeyError, TypeError):
            raise NotFound(f"unknown host id {host_id!r}") from None

    def live_rows(self) -> list[int]:
        return np.flatnonzero(self.live[: self.n_rows]).tolist()

    def ids(self) -> list[str | None]:
        """Host id per row (None for free rows), in row order."""
        return [h.id if h is not None else None for h in self.row_hosts]

    # ------------------------------------------------------------------ registration

    def _compile_host(self, host: Host):
        """capacity, allocatable, limit, ratio x 1000 and NUMA rows of `host` (validated)."""
        n = len(self.dimensions)
        cap = np.zeros(n, dtype=np.int64)
        reserved = np.zeros(n, dtype=np.int64)
        ratio = np.ones(n, dtype=np.float64)
        for field_name, source, target in (("capacity", host.capacity, cap), ("reserved", host.reserved, reserved)):
            for name, value in source.items():
                if name not in self.dim_index:
                    raise UnknownDimension(
                        f"host {host.id} {field_name} has unknown dimension {name!r}; dimensions are {self.dimensions}")
                target[self.dim_index[name]] = check_quantity(f"host {host.id} {field_name}[{name!r}]", value)
        for name, value in host.allocation_ratio.items():
            if name not in self.dim_index:
                raise UnknownDimension(
                    f"host {host.id} allocation_ratio has unknown dimension {name!r}; dimensions are {self.dimensions}")
            ratio[self.dim_index[name]] = float(value)
        if (reserved > cap).any():
            d = int(np.argmax(reserved > cap))
            raise ValidationError(
                f"host {host.id} reserved[{self.dimensions[d]!r}] = {reserved[d]} exceeds its capacity {cap[d]}")
        if len(host.numa) > _MAX_NUMA:
            raise ValidationError(f"host {host.id} numa: at most {_MAX_NUMA} NUMA nodes, got {len(host.numa)}")
        numa = np.zeros((len(host.numa), 2), dtype=np.int64)
        for k, node in enumerate(host.numa):
            unknown = set(node) - {"cpu", "memory"}
            if unknown:
                raise ValidationError(f"host {host.id} numa[{k}] has unknown keys {sorted(unknown)} (cpu, memory)")
            numa[k] = [check_quantity(f"host {host.id} numa[{k}]['cpu']", node.get("cpu", 0)),
                       check_quantity(f"host {host.id} numa[{k}]['memory']", node.get("memory", 0))]
        allocatable = cap - reserved
        limit = np.floor(allocatable * ratio).astype(np.int64)
        ratio_milli = np.round(ratio * 1000).astype(np.int64)
        return cap, allocatable, limit, ratio_milli, numa

    def check_new(self, hosts: list) -> list:
        """Validate hosts to be added (type, unique new ids, dimensions, the cluster's
        totals within MAX_CLUSTER_TOTAL); returns their compiled rows for `add`.
        Changes nothing."""
        compiled = []
        seen = set()
        for host in hosts:
            if not isinstance(host, Host):
                raise ValidationError(f"add_hosts expects Host objects, got {type(host).__name__}")
            if host.id in self.host_rows or host.id in seen:
                raise DuplicateId(f"host id {host.id!r} is already registered")
            seen.add(host.id)
            compiled.append(self._compile_host(host))
        for d, added in enumerate(_bound_sums(compiled, len(self.dimensions))):
            if self.bound_total[d] + added > MAX_CLUSTER_TOTAL:
                total = self.bound_total[d]
                for host, row in zip(hosts, compiled):  # name the first host past the bound
                    total += max(int(row[0][d]), int(row[2][d]))
                    if total > MAX_CLUSTER_TOTAL:
                        raise ValidationError(
                            f"host {host.id} would bring the cluster's total {self.dimensions[d]} to {total:,}, "
                            f"past 2**63 - 1 (capacity, or capacity x allocation_ratio, summed over hosts)")
        return compiled

    def add(self, hosts: list[Host], compiled: list) -> list[int]:
        """Give checked hosts rows (spare rows first, lowest first); returns the rows."""
        self.version += 1
        rows = []
        spare = list(self.spare_rows)
        next_row = self.n_rows
        for _ in hosts:
            if spare:
                rows.append(heapq.heappop(spare))
            else:
                rows.append(next_row)
                next_row += 1
        while len(self.row_hosts) < next_row:
            self.row_hosts.append(None)
        self._grow(next_row)
        self.spare_rows = spare
        self.n_rows = next_row
        numa = {}
        self.bound_total = [t + added for t, added in zip(self.bound_total, _bound_sums(compiled, len(self.dimensions)))]
        for host, row, (cap, alloc, limit, ratio_milli, numa_nodes) in zip(hosts, rows, compiled):
            self.capacity[row] = cap
            self.allocatable[row] = alloc
            self.ratio_milli[row] = ratio_milli
            self.live[row] = True
            self.host_rows[host.id] = row
            self.row_hosts[row] = host
            self.state.set_limit(row, limit)
            numa[row] = numa_nodes
        self.cons.add_rows(rows, self.row_hosts, self.ratio_milli, numa)
        self.refresh_reference(added=rows)
        ready = [row for host, row in zip(hosts, rows) if host.state == "ready"]
        self.state.set_schedulable_rows(np.asarray(ready, dtype=np.intp))
        return rows

    def remove(self, row: int) -> None:
        """Free an empty row (the ledger has released everything on it)."""
        self.version += 1
        host_id = self.row_hosts[row].id
        bound = np.maximum(self.capacity[row], self.state.limit_array[row]).tolist()
        self.bound_total = [t - b for t, b in zip(self.bound_total, bound)]
        self.state.clear_row(row)
        self.capacity[row] = 0
        self.allocatable[row] = 0
        self.ratio_milli[row] = 1000
        self.live[row] = False
        del self.host_rows[host_id]
        self.row_hosts[row] = None
        self.cons.forget_row(row)
        heapq.heappush(self.spare_rows, row)
        self.cons.rebuild(self.row_hosts, self.state.n_rows, self.ratio_milli)
        self.refresh_reference()

    def update(self, row: int, labels=None, taints=None, state: str | None = None) -> Host:
        """Replace a row's labels, taints and/or state, all checked first; returns the host."""
        old = self.row_hosts[row]
        changes = {}
        if labels is not None:
            changes["labels"] = dict(labels)
        if taints is not None:
            changes["taints"] = tuple(taints)
        if state is not None:
            if state not in HOST_STATES:
                raise ValidationError(f"host state must be one of {HOST_STATES}, got {state!r}")
            changes["state"] = state
        updated = replace(old, **changes)  # validates
        self.version += 1
        self.row_hosts[row] = updated
        if updated.labels != old.labels or updated.taints != old.taints:
            self.cons.rebuild(self.row_hosts, self.state.n_rows, self.ratio_milli)
        if updated.state != old.state:
            self.state.set_schedulable(row, updated.state == "ready")
        return updated

    def refresh_reference(self, added: Sequence[int] | None = None) -> None:
        """Re-sort the index when the largest host limit per dimension changed.

        added: the only rows that changed are these new ones, so the largest limit can
        only grow by theirs (O(added), not O(hosts): hosts registered one at a time)."""
        if added is not None and len(added):
            ref = np.maximum(self.ref, self.state.limit_array[np.asarray(added)].max(axis=0))
        else:
            limits = self.state.limit_array[: self.n_rows][self.live[: self.n_rows]]
            ref = limits.max(axis=0) if len(limits) else np.zeros(len(self.dimensions), dtype=np.int64)
        if not np.array_equal(ref, self.ref):
            self.ref = ref
            self.state.set_reference(self._inv_ref(ref), ref.astype(np.float64))

    def schedulable_free(self) -> np.ndarray:
        """int64 (n_rows_allocated, n_dims): free capacity, 0 on rows that take no new work."""
        free = self.state.free_array.copy()
        free[~self.state.schedulable_array()] = 0
        return free
