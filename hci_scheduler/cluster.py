"""Cluster: the public API over the compiled core.

The Cluster compiles hosts and workloads into integer arrays once (on
registration), keeps ids <-> rows, validates every input before it touches
the state, and calls sched_core for filter -> score -> select -> commit.
Any call that raises leaves the state exactly as it was.
"""
from __future__ import annotations

import heapq
import threading
from dataclasses import replace
from typing import Iterable, Mapping, Sequence

import numpy as np

import sched_core

from . import explain as _explain
from .errors import DuplicateId, NotFound, StateConflict, UnknownDimension, Unschedulable, ValidationError
from .model import DEFAULT_DIMENSIONS, HOST_STATES, BatchResult, Host, Placement, Workload, check_quantity
from .policy import Policy, check_order, largest_first, strategy_code

_INITIAL_ROWS = 64


def _as_request_matrix(requests, n_dims: int, name: str = "requests") -> np.ndarray:
    """Validate an integer matrix (n, n_dims) of non-negative requests; return it as C int64."""
    if not isinstance(requests, np.ndarray):
        raise ValidationError(f"{name} must be a numpy ndarray, got {type(requests).__name__}")
    if requests.ndim != 2 or requests.shape[1] != n_dims:
        raise ValidationError(f"{name} must have shape (n, {n_dims}), got {requests.shape}")
    if not np.issubdtype(requests.dtype, np.integer):
        raise ValidationError(f"{name} must have an integer dtype, got {requests.dtype}")
    out = np.ascontiguousarray(requests, dtype=np.int64)
    if out.size and out.min() < 0:
        row, col = np.argwhere(out < 0)[0]
        raise ValidationError(f"{name}[{row}, {col}] must be >= 0, got {out[row, col]}")
    return out


class Cluster:
    """A set of hosts and the workloads placed on them.

    Parameters
    ----------
    dimensions : sequence of str
        Resource dimensions, fixed for the cluster's life. Default: cpu
        (millicores), memory (MiB), ssd (GiB), net (Mbit/s), gpu (count).
    policy : Policy, optional
        Per-dimension weights of the scores.
    """

    def __init__(self, dimensions: Sequence[str] = DEFAULT_DIMENSIONS, policy: Policy | None = None):
        dims = tuple(dimensions)
        if not dims or not all(isinstance(d, str) and d for d in dims):
            raise ValidationError(f"dimensions must be non-empty strings, got {dimensions!r}")
        if len(set(dims)) != len(dims):
            raise ValidationError(f"dimensions must be unique, got {dims}")
        self.dimensions: tuple[str, ...] = dims
        self._dim_index = {d: i for i, d in enumerate(dims)}
        self.policy = policy or Policy()
        self._weights = self.policy.weight_vector(dims)
        self._lock = threading.RLock()
        n_dims = len(dims)
        self._ref = np.zeros(n_dims, dtype=np.int64)
        self._state = sched_core.HostState(_INITIAL_ROWS, self._inv_ref(self._ref))
        self._allocatable = np.zeros((_INITIAL_ROWS, n_dims), dtype=np.int64)
        self._capacity = np.zeros((_INITIAL_ROWS, n_dims), dtype=np.int64)
        self._live = np.zeros(_INITIAL_ROWS, dtype=bool)
        self._n_rows = 0                      # high-water mark of rows ever used
        self._spare_rows: list[int] = []      # removed rows, reused lowest first
        self._host_rows: dict[str, int] = {}
        self._row_hosts: list[Host | None] = []
        # Named workloads: id -> (workload, host row, request vector).
        self._workloads: dict[str, tuple[Workload, int, np.ndarray]] = {}
        # Array workloads (place_array): rows numbered across calls.
        self._arr_requests = np.zeros((0, n_dims), dtype=np.int64)
        self._arr_hosts = np.zeros(0, dtype=np.int64)
        self._arr_n = 0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_arrays(cls, capacity, dimensions: Sequence[str] | None = None,
                    host_ids: Sequence[str] | None = None, policy: Policy | None = None) -> "Cluster":
        """A cluster of `n_hosts` hosts from a capacity matrix.

        Parameters
        ----------
        capacity : int ndarray (n_hosts, n_dims)
        dimensions : sequence of str, optional
            Names of the columns; default the standard five when n_dims is 5,
            else "d0", "d1", ...
        host_ids : sequence of str, optional
            Default "h0", "h1", ...
        """
        if not isinstance(capacity, np.ndarray):
            raise ValidationError(f"capacity must be a numpy ndarray, got {type(capacity).__name__}")
        if capacity.ndim != 2 or capacity.shape[1] == 0:
            raise ValidationError(f"capacity must have shape (n_hosts, n_dims), got {capacity.shape}")
        n_hosts, n_dims = capacity.shape
        if dimensions is None:
            dimensions = DEFAULT_DIMENSIONS if n_dims == len(DEFAULT_DIMENSIONS) else [f"d{i}" for i in range(n_dims)]
        if len(dimensions) != n_dims:
            raise ValidationError(f"dimensions has {len(dimensions)} names for {n_dims} capacity columns")
        cap = _as_request_matrix(capacity, n_dims, "capacity")
        if host_ids is None:
            host_ids = [f"h{i}" for i in range(n_hosts)]
        host_ids = list(host_ids)
        if len(host_ids) != n_hosts:
            raise ValidationError(f"host_ids has {len(host_ids)} ids for {n_hosts} hosts")
        c = cls(dimensions, policy=policy)
        dims = c.dimensions
        c.add_hosts([Host(hid, dict(zip(dims, map(int, row)))) for hid, row in zip(host_ids, cap)])
        return c

    def _inv_ref(self, ref: np.ndarray) -> np.ndarray:
        return np.divide(self._weights, ref, out=np.zeros(len(ref)), where=ref > 0)

    def _grow(self, n_rows: int) -> None:
        old = self._state.n_rows
        if n_rows <= old:
            return
        new = max(n_rows, 2 * old)
        self._state = self._state.grown(new)
        for name in ("_allocatable", "_capacity"):
            arr = getattr(self, name)
            grown = np.zeros((new, arr.shape[1]), dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        live = np.zeros(new, dtype=bool)
        live[:old] = self._live
        self._live = live

    # ------------------------------------------------------------------ hosts

    def _compile_host(self, host: Host) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """capacity, allocatable, limit rows of `host` (validated)."""
        n = len(self.dimensions)
        cap = np.zeros(n, dtype=np.int64)
        reserved = np.zeros(n, dtype=np.int64)
        ratio = np.ones(n, dtype=np.float64)
        for field_name, source, target in (("capacity", host.capacity, cap), ("reserved", host.reserved, reserved)):
            for name, value in source.items():
                if name not in self._dim_index:
                    raise UnknownDimension(
                        f"host {host.id} {field_name} has unknown dimension {name!r}; dimensions are {self.dimensions}")
                target[self._dim_index[name]] = check_quantity(f"host {host.id} {field_name}[{name!r}]", value)
        for name, value in host.allocation_ratio.items():
            if name not in self._dim_index:
                raise UnknownDimension(
                    f"host {host.id} allocation_ratio has unknown dimension {name!r}; dimensions are {self.dimensions}")
            ratio[self._dim_index[name]] = float(value)
        if (reserved > cap).any():
            d = int(np.argmax(reserved > cap))
            raise ValidationError(
                f"host {host.id} reserved[{self.dimensions[d]!r}] = {reserved[d]} exceeds its capacity {cap[d]}")
        allocatable = cap - reserved
        limit = np.floor(allocatable * ratio).astype(np.int64)
        return cap, allocatable, limit

    def add_host(self, host: Host) -> int:
        """Register one host; returns its row index."""
        return self.add_hosts([host])[0]

    def add_hosts(self, hosts: Iterable[Host]) -> list[int]:
        """Register hosts, all or nothing; returns their row indices."""
        hosts = list(hosts)
        compiled = []
        seen = set()
        for host in hosts:
            if not isinstance(host, Host):
                raise ValidationError(f"add_hosts expects Host objects, got {type(host).__name__}")
            if host.id in self._host_rows or host.id in seen:
                raise DuplicateId(f"host id {host.id!r} is already registered")
            seen.add(host.id)
            compiled.append(self._compile_host(host))
        with self._lock:
            rows = []
            spare = list(self._spare_rows)
            next_row = self._n_rows
            for _ in hosts:
                if spare:
                    rows.append(heapq.heappop(spare))
                else:
                    rows.append(next_row)
                    next_row += 1
            self._grow(next_row)
            self._spare_rows = spare
            self._n_rows = next_row
            while len(self._row_hosts) < next_row:
                self._row_hosts.append(None)
            for host, row, (cap, alloc, limit) in zip(hosts, rows, compiled):
                self._capacity[row] = cap
                self._allocatable[row] = alloc
                self._live[row] = True
                self._host_rows[host.id] = row
                self._row_hosts[row] = host
                self._state.set_limit(row, limit)
            self._refresh_reference()
            for host, row in zip(hosts, rows):
                if host.state == "ready":
                    self._state.set_schedulable(row, True)
            return rows

    def _refresh_reference(self) -> None:
        """Re-sort the index when the largest host limit per dimension changed."""
        limits = self._state.limit_array[: self._n_rows][self._live[: self._n_rows]]
        ref = limits.max(axis=0) if len(limits) else np.zeros(len(self.dimensions), dtype=np.int64)
        if not np.array_equal(ref, self._ref):
            self._ref = ref
            self._state.set_inv_ref(self._inv_ref(ref))

    def _row(self, host_id: str) -> int:
        try:
            return self._host_rows[host_id]
        except (KeyError, TypeError):
            raise NotFound(f"unknown host id {host_id!r}") from None

    def remove_host(self, host_id: str) -> None:
        """Forget a host. Refused (StateConflict) while workloads remain on it."""
        with self._lock:
            row = self._row(host_id)
            load = int(self._state.load_array[row])
            if load:
                raise StateConflict(f"host {host_id!r} still runs {load} workloads; release or drain them first")
            self._state.clear_row(row)
            self._capacity[row] = 0
            self._allocatable[row] = 0
            self._live[row] = False
            del self._host_rows[host_id]
            self._row_hosts[row] = None
            heapq.heappush(self._spare_rows, row)
            self._refresh_reference()

    def set_host_state(self, host_id: str, state: str) -> None:
        """ready takes new work; cordoned, draining and down take nothing new."""
        if state not in HOST_STATES:
            raise ValidationError(f"host state must be one of {HOST_STATES}, got {state!r}")
        with self._lock:
            row = self._row(host_id)
            self._row_hosts[row] = replace(self._row_hosts[row], state=state)
            self._state.set_schedulable(row, state == "ready")

    def cordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "cordoned")

    def uncordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "ready")

    def host(self, host_id: str) -> Host:
        return self._row_hosts[self._row(host_id)]

    def hosts(self) -> list[Host]:
        return [h for h in self._row_hosts if h is not None]

    def host_ids(self) -> list[str | None]:
        """Host id per row (None for free rows), in row order."""
        return [h.id if h is not None else None for h in self._row_hosts]

    def host_index(self, host_id: str) -> int:
        return self._row(host_id)

    def host_id(self, row: int) -> str:
        if not 0 <= row < self._n_rows or self._row_hosts[row] is None:
            raise NotFound(f"no host at row {row}")
        return self._row_hosts[row].id

    @property
    def n_hosts(self) -> int:
        return len(self._host_rows)

    # ------------------------------------------------------------------ named workloads

    def _compile_request(self, workload: Workload) -> np.ndarray:
        vec = np.zeros(len(self.dimensions), dtype=np.int64)
        for name, value in workload.requests.items():
            if name not in self._dim_index:
                raise UnknownDimension(
                    f"workload {workload.id} requests unknown dimension {name!r}; dimensions are {self.dimensions}")
            vec[self._dim_index[name]] = check_quantity(f"workload {workload.id} requests[{name!r}]", value)
        return vec

    def _check_new_workload(self, workload: Workload) -> np.ndarray:
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        if workload.id in self._workloads:
            raise DuplicateId(f"workload id {workload.id!r} is already placed")
        return self._compile_request(workload)

    def place(self, workload: Workload, strategy: str = "binpack") -> Placement:
        """Place one workload; raises Unschedulable (with the explanation) when nothing fits."""
        code = strategy_code(strategy)
        with self._lock:
            request = self._check_new_workload(workload)
            row = sched_core.place_one(self._state, request, code)
            if row < 0:
                raise Unschedulable(workload.id, self._explain_request(workload.id, request))
            self._workloads[workload.id] = (workload, row, request)
            return Placement(workload.id, self._row_hosts[row].id)

    def place_batch(self, workloads: Iterable[Workload], strategy: str = "binpack",
                    order: str = "largest_first", gang: bool = False) -> BatchResult:
        """Place many workloads in one pass.

        order="largest_first" places by dominant share, largest first (denser);
        "arrival" keeps the given order. With gang=True either every workload is
        placed or none is and the state is unchanged.
        """
        code = strategy_code(strategy)
        check_order(order)
        workloads = list(workloads)
        with self._lock:
            requests = np.zeros((len(workloads), len(self.dimensions)), dtype=np.int64)
            seen = set()
            for i, w in enumerate(workloads):
                requests[i] = self._check_new_workload(w)
                if w.id in seen:
                    raise DuplicateId(f"workload id {w.id!r} appears twice in the batch")
                seen.add(w.id)
            rows = self._batch_order(requests, order)
            hosts = np.full(len(workloads), -1, dtype=np.int64)
            sched_core.place_rows(self._state, requests, rows, code, hosts)
            placed = hosts >= 0
            if gang and not placed.all():
                sched_core.release_rows(self._state, requests, hosts, np.flatnonzero(placed).astype(np.intp))
                unplaced = {}
                for i, w in enumerate(workloads):
                    reason = self._explain_request(w.id, requests[i])
                    if placed[i]:
                        reason = replace(reason, note="gang not placed: other members did not fit")
                    unplaced[w.id] = reason
                return BatchResult({}, unplaced)
            result = BatchResult({}, {})
            for i, w in enumerate(workloads):
                if placed[i]:
                    self._workloads[w.id] = (w, int(hosts[i]), requests[i].copy())
                    result.placements[w.id] = self._row_hosts[hosts[i]].id
            for i, w in enumerate(workloads):
                if not placed[i]:
                    result.unplaced[w.id] = self._explain_request(w.id, requests[i])
            return result

    def bind(self, workload: Workload, host_id: str) -> Placement:
        """Place a workload on a named host, after checking that it fits there.

        For callers that decided the host themselves (a store rebuilding its
        state, an operator pinning a workload). Raises Unschedulable when the
        host is not schedulable or lacks room.
        """
        with self._lock:
            request = self._check_new_workload(workload)
            row = self._row(host_id)
            free = self._state.free_array[row]
            schedulable = bool(self._state.schedulable_array()[row])
            if not schedulable or (free < request).any():
                raise Unschedulable(workload.id, self._explain_request(workload.id, request, only_row=row))
            self._state.commit_row(row, request)
            self._workloads[workload.id] = (workload, row, request)
            return Placement(workload.id, host_id)

    def release(self, workload_id: str) -> None:
        """Remove a placed workload and give its resources back."""
        with self._lock:
            try:
                _, row, request = self._workloads.pop(workload_id)
            except (KeyError, TypeError):
                raise NotFound(f"unknown workload id {workload_id!r}") from None
            self._state.release_row(row, request)

    def workload(self, workload_id: str) -> Workload:
        try:
            return self._workloads[workload_id][0]
        except (KeyError, TypeError):
            raise NotFound(f"unknown workload id {workload_id!r}") from None

    def assignments(self) -> dict[str, str]:
        """workload id -> host id for every named workload."""
        return {wid: self._row_hosts[row].id for wid, (_, row, _) in self._workloads.items()}

    def workloads_on(self, host_id: str) -> list[str]:
        row = self._row(host_id)
        return [wid for wid, (_, r, _) in self._workloads.items() if r == row]

    # ------------------------------------------------------------------ explanations

    def explain(self, workload: Workload) -> "_explain.Explanation":
        """Why `workload` would or would not fit now; places nothing."""
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        with self._lock:
            return self._explain_request(workload.id, self._compile_request(workload))

    def _explain_request(self, workload_id: str, request: np.ndarray, only_row: int | None = None):
        n = self._n_rows
        free = self._state.free_array[:n]
        schedulable = self._state.schedulable_array()[:n].astype(np.uint8)
        reasons = np.zeros(n, dtype=np.int32)
        sched_core.filter_hosts(np.ascontiguousarray(free), request, np.ascontiguousarray(schedulable), reasons)
        live = self._live[:n].copy()
        if only_row is not None:
            live[:] = False
            live[only_row] = True
        filters = _explain.count_reasons(reasons, live, self.dimensions)
        resource_only = np.flatnonzero(live & (reasons >= sched_core.REASON_DIM))
        miss = _explain.nearest_miss(free, request, resource_only, self._state.inv_ref_array,
                                     self.host_ids(), self.dimensions)
        alloc = self._state.limit_array[:n][self._live[:n]]
        unresolvable = bool(len(alloc)) and not (alloc >= request).all(axis=1).any()
        return _explain.Explanation(
            workload_id=workload_id, n_hosts=int(live.sum()), feasible=int(((reasons == 0) & live).sum()),
            filters=filters, nearest_miss=miss, unresolvable=unresolvable)

    # ------------------------------------------------------------------ array fast path

    def _batch_order(self, requests: np.ndarray, order: str) -> np.ndarray:
        if order == "arrival":
            return np.arange(len(requests), dtype=np.intp)
        n = self._n_rows
        total = self._state.limit_array[:n][self._state.schedulable_array()[:n]].sum(axis=0)
        return largest_first(requests, total)

    def place_array(self, requests, strategy: str = "binpack", order: str = "arrival",
                    improve_s: float = 0.0) -> np.ndarray:
        """Place a matrix of requests; the fast path for orchestrators and benchmarks.

        Parameters
        ----------
        requests : int ndarray (n_workloads, n_dims)
        strategy : {"binpack", "spread", "balanced", "dot"}
        order : {"arrival", "largest_first"}
        improve_s : float
            Seconds the batch may spend improving the greedy packing (0: greedy only).

        Returns
        -------
        int64 ndarray (n_workloads,)
            Host row per request, -1 where nothing fit. The requests get array
            rows numbered across calls (first call 0..n-1, the next continues),
            which `release_array` takes.
        """
        code = strategy_code(strategy)
        check_order(order)
        if not isinstance(improve_s, (int, float)) or isinstance(improve_s, bool) or not improve_s >= 0:
            raise ValidationError(f"improve_s must be a number >= 0, got {improve_s!r}")
        req = _as_request_matrix(requests, len(self.dimensions))
        with self._lock:
            rows = self._batch_order(req, order)
            hosts = np.full(len(req), -1, dtype=np.int64)
            free_before = self._schedulable_free() if improve_s > 0 else None
            sched_core.place_rows(self._state, req, rows, code, hosts)
            if improve_s > 0 and (hosts >= 0).any():
                hosts = self._apply_improvement(free_before, req, hosts, float(improve_s))
            self._append_array_rows(req, hosts)
            return hosts

    def _schedulable_free(self) -> np.ndarray:
        free = self._state.free_array.copy()
        free[~self._state.schedulable_array()] = 0
        return free

    def _apply_improvement(self, free_before: np.ndarray, req: np.ndarray, greedy: np.ndarray,
                           budget_s: float) -> np.ndarray:
        """Ask the improver for a better assignment; adopt it only if it checks out."""
        from .improve import improve_assignment

        better = np.asarray(improve_assignment(free_before, req, greedy.copy(), budget_s), dtype=np.int64)
        if not self._is_better_assignment(free_before, req, greedy, better):
            return greedy
        placed = np.flatnonzero(greedy >= 0).astype(np.intp)
        sched_core.release_rows(self._state, req, greedy, placed)
        sched_core.commit_rows(self._state, req, np.ascontiguousarray(better))
        return better

    @staticmethod
    def _is_better_assignment(free: np.ndarray, req: np.ndarray, greedy: np.ndarray, other: np.ndarray) -> bool:
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

    def _append_array_rows(self, req: np.ndarray, hosts: np.ndarray) -> None:
        n = len(req)
        need = self._arr_n + n
        if need > len(self._arr_hosts):
            size = max(need, 2 * len(self._arr_hosts), 1024)
            grown_req = np.zeros((size, req.shape[1]), dtype=np.int64)
            grown_req[: self._arr_n] = self._arr_requests[: self._arr_n]
            grown_hosts = np.full(size, -1, dtype=np.int64)
            grown_hosts[: self._arr_n] = self._arr_hosts[: self._arr_n]
            self._arr_requests, self._arr_hosts = grown_req, grown_hosts
        self._arr_requests[self._arr_n: need] = req
        self._arr_hosts[self._arr_n: need] = hosts
        self._arr_n = need

    def release_array(self, indices) -> None:
        """Release array workloads by their row numbers (see place_array)."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValidationError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        idx = idx.astype(np.intp)
        with self._lock:
            if idx.size:
                bad = (idx < 0) | (idx >= self._arr_n)
                if bad.any():
                    raise NotFound(f"array row {int(idx[bad][0])} was never placed (rows 0..{self._arr_n - 1})")
                if len(np.unique(idx)) != len(idx):
                    raise ValidationError("indices must not repeat a row")
                unplaced = self._arr_hosts[idx] < 0
                if unplaced.any():
                    raise NotFound(f"array row {int(idx[unplaced][0])} is not placed (never fit, or released)")
            view_hosts = self._arr_hosts[: self._arr_n]
            sched_core.release_rows(self._state, self._arr_requests[: self._arr_n], view_hosts, idx)
            self._arr_hosts[idx] = -1

    # ------------------------------------------------------------------ read-outs

    def usage(self) -> np.ndarray:
        """int64 (n_rows, n_dims): resources in use per host row (a copy)."""
        return self._state.used_array[: self._n_rows].copy()

    def allocatable(self) -> np.ndarray:
        """int64 (n_rows, n_dims): capacity minus reserved per host row (a copy)."""
        return self._allocatable[: self._n_rows].copy()

    def limits(self) -> np.ndarray:
        """int64 (n_rows, n_dims): allocatable times allocation ratio per host row (a copy)."""
        return self._state.limit_array[: self._n_rows].copy()

    def free(self) -> np.ndarray:
        """int64 (n_rows, n_dims): limit minus usage per host row (a copy)."""
        return self._state.free_array[: self._n_rows].copy()

    def hosts_used(self) -> int:
        """Hosts that run at least one workload."""
        return int((self._state.load_array[: self._n_rows] > 0).sum())

    def utilization(self) -> dict[str, float]:
        """Used / allocatable per dimension, over live hosts (0 where nothing is allocatable)."""
        n = self._n_rows
        live = self._live[:n]
        used = self._state.used_array[:n][live].sum(axis=0)
        alloc = self._allocatable[:n][live].sum(axis=0)
        return {d: (float(u) / float(a) if a else 0.0) for d, u, a in zip(self.dimensions, used, alloc)}

    def __repr__(self) -> str:
        return (f"Cluster({self.n_hosts} hosts, {len(self._workloads)} workloads, "
                f"{int((self._arr_hosts[: self._arr_n] >= 0).sum())} array workloads)")
