"""Cluster: the public API over the compiled core.

The Cluster compiles hosts and workloads into integer arrays once (on
registration), keeps ids <-> rows, validates every input before it touches
the state, and calls sched_core for filter -> score -> select -> commit:

  compile   Workload -> request vector + Terms (cached per spec)     constraints.py
  filter    hard constraints, cheapest first, per host               sched_core/_constraint.pyx
  score     strategy cost + soft-term penalties                      sched_core/_place.pyx
  select    lowest cost, then key order, then lowest host row        sched_core/_place.pyx
  commit    used/free/load, group and tenant counters                sched_core/_state.pyx

Any call that raises leaves the state exactly as it was.
"""
from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

import numpy as np

import sched_core

from . import explain as _explain
from .constraints import CompiledTerms, ConstraintIndex, spec_key
from .errors import (
    DuplicateId, NotFound, SchedulerError, StateConflict, UnknownDimension, Unschedulable, ValidationError,
)
from .model import (
    DEFAULT_DIMENSIONS, HOST_STATES, AddedHosts, BatchResult, Host, Placement, Volume, Workload, check_quantity,
)
from .policy import Policy, check_order, largest_first, strategy_code

_INITIAL_ROWS = 64
_MAX_NUMA = 8
MAX_QUANTITY = 2**46  # every quantity is below this (model.check_quantity refuses the rest)


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
    if out.size and out.max() >= 2**46:
        raise ValidationError(f"{name} holds a value >= 2**46: {out.max()}")
    return out


@dataclass
class _Record:
    """A placed named workload: what it costs its host, and the terms it was counted under."""

    workload: Workload
    row: int
    charge: np.ndarray
    numa: int
    terms: CompiledTerms


@dataclass
class _VolumeRecord:
    volume: Volume
    rows: list[int]
    charge: np.ndarray


def _creates_volumes(workload: Workload) -> bool:
    """The workload asks for a new volume inline (placed with it in one decision)."""
    return bool(workload.volumes) and any(isinstance(v, Volume) for v in workload.volumes)


class Cluster:
    """A set of hosts and the workloads placed on them.

    Parameters
    ----------
    dimensions : sequence of str
        Resource dimensions, fixed for the cluster's life. Default: cpu
        (millicores), memory (MiB), ssd (GiB), net (Mbit/s), gpu (count).
        Add e.g. "hugepages" for VMs that ask for them.
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
        self._ratio_milli = np.full((_INITIAL_ROWS, n_dims), 1000, dtype=np.int64)
        self._live = np.zeros(_INITIAL_ROWS, dtype=bool)
        self._n_rows = 0                      # high-water mark of rows ever used
        self._spare_rows: list[int] = []      # removed rows, reused lowest first
        self._host_rows: dict[str, int] = {}
        self._row_hosts: list[Host | None] = []
        self._cons = ConstraintIndex(dims)
        self._cons.rebuild(self._row_hosts, _INITIAL_ROWS, self._ratio_milli)
        self._terms_cache: dict[tuple, CompiledTerms] = {}
        self._workloads: dict[str, _Record] = {}
        self._daemons: dict[str, Workload] = {}          # per-host services by id
        self._volumes: dict[str, _VolumeRecord] = {}
        # Array workloads (place_array): rows numbered across calls.
        self._arr_charge = np.zeros((0, n_dims), dtype=np.int64)
        self._arr_hosts = np.zeros(0, dtype=np.int64)
        self._arr_numa = np.zeros(0, dtype=np.int64)
        self._arr_terms = np.zeros(0, dtype=np.int32)
        self._arr_terms_list: list[CompiledTerms] = []
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
        for name, fill in (("_allocatable", 0), ("_capacity", 0), ("_ratio_milli", 1000)):
            arr = getattr(self, name)
            grown = np.full((new, arr.shape[1]), fill, dtype=arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        live = np.zeros(new, dtype=bool)
        live[:old] = self._live
        self._live = live
        self._cons.rebuild(self._row_hosts, new, self._ratio_milli)

    # ------------------------------------------------------------------ hosts

    def _compile_host(self, host: Host):
        """capacity, allocatable, limit, ratio x 1000 and NUMA rows of `host` (validated)."""
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

    def add_host(self, host: Host) -> int:
        """Register one host; returns its row index."""
        return self.add_hosts([host])[0]

    def add_hosts(self, hosts: Iterable[Host],
                  replicas: Mapping[str, Sequence[str]] | None = None) -> AddedHosts:
        """Register hosts, all or nothing; returns their row indices (an `AddedHosts`
        list whose `replicas` maps host id -> the per-host services started there).

        Per-host services already registered get a replica on every new host
        that matches them, before the host takes any other work. `replicas`
        (a store replaying its log) names exactly which services get one where,
        each checked as `bind` checks.
        """
        hosts = list(hosts)
        if replicas is not None:
            new_ids = {h.id for h in hosts if isinstance(h, Host)}
            for hid, services in replicas.items():
                if hid not in new_ids:
                    raise ValidationError(f"replicas: host {hid!r} is not among the hosts added")
                for sid in services:
                    if sid not in self._daemons:
                        raise NotFound(f"replicas: {sid!r} is not a registered per-host service")
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
            while len(self._row_hosts) < next_row:
                self._row_hosts.append(None)
            self._grow(next_row)
            self._spare_rows = spare
            self._n_rows = next_row
            numa = {}
            for host, row, (cap, alloc, limit, ratio_milli, numa_nodes) in zip(hosts, rows, compiled):
                self._capacity[row] = cap
                self._allocatable[row] = alloc
                self._ratio_milli[row] = ratio_milli
                self._live[row] = True
                self._host_rows[host.id] = row
                self._row_hosts[row] = host
                self._state.set_limit(row, limit)
                numa[row] = numa_nodes
            self._cons.add_rows(rows, self._row_hosts, self._ratio_milli, numa)
            self._refresh_reference(added=rows)
            ready = [row for host, row in zip(hosts, rows) if host.state == "ready"]
            self._state.set_schedulable_rows(np.asarray(ready, dtype=np.intp))
            started: dict[str, list[str]] = {}
            if replicas is None:
                for daemon in self._daemons.values():
                    for hid in self._place_daemon_on(daemon, rows)[0]:
                        started.setdefault(hid, []).append(daemon.id)
            else:
                for hid, services in replicas.items():
                    for sid in services:
                        self.bind_replicas(self._daemons[sid], [hid])
                    if services:
                        started[hid] = list(services)
            return AddedHosts(rows, started)

    def _refresh_reference(self, added: Sequence[int] | None = None) -> None:
        """Re-sort the index when the largest host limit per dimension changed.

        added: the only rows that changed are these new ones, so the largest limit can
        only grow by theirs (O(added), not O(hosts): hosts registered one at a time)."""
        if added is not None and len(added):
            ref = np.maximum(self._ref, self._state.limit_array[np.asarray(added)].max(axis=0))
        else:
            limits = self._state.limit_array[: self._n_rows][self._live[: self._n_rows]]
            ref = limits.max(axis=0) if len(limits) else np.zeros(len(self.dimensions), dtype=np.int64)
        if not np.array_equal(ref, self._ref):
            self._ref = ref
            self._state.set_reference(self._inv_ref(ref), ref.astype(np.float64))

    def _row(self, host_id: str) -> int:
        try:
            return self._host_rows[host_id]
        except (KeyError, TypeError):
            raise NotFound(f"unknown host id {host_id!r}") from None

    def remove_host(self, host_id: str) -> list[str]:
        """Forget a host. Refused (StateConflict) while workloads or volume replicas remain on it.
        Returns the per-host services whose replica went with it."""
        with self._lock:
            row = self._row(host_id)
            # Per-host services follow their host out.
            daemon_ids = [wid for wid, rec in self._workloads.items()
                          if rec.row == row and rec.workload.per_host]
            load = int(self._state.load_array[row]) - len(daemon_ids)
            if load:
                raise StateConflict(f"host {host_id!r} still runs {load} workloads or volume replicas; "
                                    f"release or drain them first")
            gone = [self._release_record(wid).workload for wid in daemon_ids]
            self._state.clear_row(row)
            self._capacity[row] = 0
            self._allocatable[row] = 0
            self._ratio_milli[row] = 1000
            self._live[row] = False
            del self._host_rows[host_id]
            self._row_hosts[row] = None
            self._cons.forget_row(row)
            heapq.heappush(self._spare_rows, row)
            self._cons.rebuild(self._row_hosts, self._state.n_rows, self._ratio_milli)
            self._refresh_reference()
            return [w.id.rpartition("@")[0] for w in gone]

    def set_host_state(self, host_id: str, state: str) -> None:
        """ready takes new work; cordoned, draining and down take nothing new."""
        self.update_host(host_id, state=state)

    def cordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "cordoned")

    def uncordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "ready")

    def update_host(self, host_id: str, labels=None, taints=None, state: str | None = None) -> Host:
        """Replace a host's labels, taints and/or state; returns the host as it now is.
        Placed workloads stay where they are; counters per topology domain follow the
        new labels. All checked before anything changes."""
        with self._lock:
            row = self._row(host_id)
            old = self._row_hosts[row]
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
            self._row_hosts[row] = updated
            if updated.labels != old.labels or updated.taints != old.taints:
                self._cons.rebuild(self._row_hosts, self._state.n_rows, self._ratio_milli)
            if updated.state != old.state:
                self._state.set_schedulable(row, updated.state == "ready")
            return updated

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

    # ------------------------------------------------------------------ compiling workloads

    def _request_values(self, workload: Workload) -> list[int]:
        """The request per dimension, checked (a batch turns all of them into one array)."""
        req = workload.requests
        if req.keys() <= self._dim_index.keys():
            # Fast path for the common case (plain non-negative ints); anything else takes
            # the checked path below, which names the bad field.
            values = [req.get(d, 0) for d in self.dimensions]
            for v in values:
                if type(v) is not int or not 0 <= v < MAX_QUANTITY:
                    break
            else:
                return values
        values = [0] * len(self.dimensions)
        for name, value in workload.requests.items():
            if name not in self._dim_index:
                raise UnknownDimension(
                    f"workload {workload.id} requests unknown dimension {name!r}; dimensions are {self.dimensions}")
            values[self._dim_index[name]] = check_quantity(f"workload {workload.id} requests[{name!r}]", value)
        return values

    def _compile_request(self, workload: Workload) -> np.ndarray:
        return np.array(self._request_values(workload), dtype=np.int64)

    def _check_new(self, workload: Workload) -> None:
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        if workload.id in self._workloads or workload.id in self._daemons:
            raise DuplicateId(f"workload id {workload.id!r} is already placed")

    def _check_new_workload(self, workload: Workload) -> np.ndarray:
        self._check_new(workload)
        return self._compile_request(workload)

    def _volume_mask(self, workload: Workload) -> np.ndarray | None:
        """Rows holding a replica of every (existing) volume the workload mounts."""
        names = [v for v in workload.volumes if isinstance(v, str)]
        if not names:
            return None
        mask = np.ones(self._state.n_rows, dtype=np.uint8)
        for name in names:
            if name not in self._volumes:
                raise NotFound(f"workload {workload.id} volumes: unknown volume {name!r}")
            holds = np.zeros(self._state.n_rows, dtype=np.uint8)
            holds[self._volumes[name].rows] = 1
            mask &= holds
        return mask

    def _terms(self, workload: Workload, allowed: np.ndarray | None = None) -> CompiledTerms:
        """Compiled constraints of a workload, cached per spec while the host layout is unchanged."""
        if allowed is None and workload.volumes:
            allowed = self._volume_mask(workload)
        if allowed is not None:
            return self._cons.compile(workload, allowed)
        key = spec_key(workload)
        cached = self._terms_cache.get(key)
        if cached is not None and cached.version == self._cons.version:
            return cached
        terms = self._cons.compile(workload)
        if len(self._terms_cache) > 4096:
            self._terms_cache.clear()
        self._terms_cache[key] = terms
        return terms

    # ------------------------------------------------------------------ named workloads

    def _select_and_commit(self, workload: Workload, request: np.ndarray, terms: CompiledTerms,
                           code: int) -> int:
        """Run the constrained kernel for one workload; record it and return the row, or -1."""
        charge = np.empty(len(self.dimensions), dtype=np.int64)
        row, numa = sched_core.place_single(self._state, self._cons.state, terms.core, request, code, charge)
        if row >= 0:
            self._cons.record(terms, (row,), +1)
            self._workloads[workload.id] = _Record(workload, row, charge, numa, terms)
        return row

    def _place_one(self, workload: Workload, request: np.ndarray, code: int, preempt: bool,
                   result: BatchResult) -> bool:
        """Place one checked workload of a batch; record the outcome in `result`."""
        try:
            p = self._place_checked(workload, request, code, preempt)
        except Unschedulable as exc:
            result.unplaced[workload.id] = exc.explanation
            return False
        result.placements[workload.id] = p.host_id
        if p.evicted or p.replicas or p.volumes or workload.per_host:
            result.details[workload.id] = p
        return True

    def _check_special(self, workloads: Sequence[Workload]) -> None:
        """What `place` would refuse of per-host services and workloads creating volumes,
        refused before a batch places anything."""
        new_volumes: set[str] = set()
        for w in workloads:
            if w.per_host:
                if w.volumes or w.gang:
                    raise ValidationError(f"workload {w.id}: per-host services take no volumes and no gang")
                self._terms(w)
                continue
            if "ssd" not in self._dim_index:
                raise ValidationError(f"workload {w.id} volumes: the cluster has no 'ssd' dimension")
            for v in w.volumes:
                if isinstance(v, Volume):
                    if v.id in self._volumes or v.id in new_volumes:
                        raise DuplicateId(f"workload {w.id} volumes: volume {v.id!r} already exists")
                    new_volumes.add(v.id)
            self._terms(replace(w, volumes=tuple(v for v in w.volumes if isinstance(v, str))))

    def place(self, workload: Workload, strategy: str = "binpack", preempt: bool = False) -> Placement:
        """Place one workload; raises Unschedulable (with the explanation) when nothing fits.

        With preempt=True a workload that fits nowhere may evict lower-priority
        workloads from one host (fewest victims, then lowest priority); the
        Placement lists them in `evicted` so the caller can reschedule them.
        Per-host services (per_host=True) get a replica on every matching host.
        """
        code = strategy_code(strategy)
        with self._lock:
            return self._place_checked(workload, self._check_new_workload(workload), code, preempt)

    def _place_checked(self, workload: Workload, request: np.ndarray, code: int, preempt: bool) -> Placement:
        if workload.per_host:
            return self._place_daemon(workload, request)
        if _creates_volumes(workload):
            return self._place_with_new_volumes(workload, request, code)
        terms = self._terms(workload)
        row = self._select_and_commit(workload, request, terms, code)
        if row >= 0:
            return Placement(workload.id, self._row_hosts[row].id)
        if preempt:
            placement = self._preempt(workload, request, terms)
            if placement is not None:
                return placement
        raise Unschedulable(workload.id, self._explain_request(workload, request, terms))

    def place_batch(self, workloads: Iterable[Workload], strategy: str = "binpack",
                    order: str = "largest_first", gang: bool = False, preempt: bool = False) -> BatchResult:
        """Place many workloads in one pass.

        order="largest_first" places by dominant share, largest first (denser);
        "arrival" keeps the given order. gang=True makes the whole batch one
        gang; workloads with the same `gang` id form a gang too. A gang is
        placed whole or not at all (its members are then listed as unplaced).
        preempt=True places each workload as `place(..., preempt=True)` does, in
        the batch's order (not with gangs).

        Every workload is checked before anything is placed, so a call that
        raises changes nothing. `result.placements` lists the placements in the
        order they were committed; `result.details` holds the full Placement of
        those that evicted workloads, started per-host replicas or created volumes.
        """
        code = strategy_code(strategy)
        check_order(order)
        workloads = list(workloads)
        if preempt and (gang or any(w.gang for w in workloads if isinstance(w, Workload))):
            raise ValidationError("gang and preempt cannot be combined")
        with self._lock:
            values = []
            seen = set()
            for w in workloads:
                self._check_new(w)
                values.append(self._request_values(w))
                if w.id in seen:
                    raise DuplicateId(f"workload id {w.id!r} appears twice in the batch")
                seen.add(w.id)
            requests = np.array(values, dtype=np.int64).reshape(len(workloads), len(self.dimensions))
            special = [w.per_host or _creates_volumes(w) for w in workloads]
            if gang and any(special):
                raise ValidationError("a gang may not hold per-host services or workloads that create volumes")
            # Compile every spec before placing anything, so a bad constraint changes nothing.
            terms = [None if sp else self._terms(w) for w, sp in zip(workloads, special)]
            self._check_special([w for w, sp in zip(workloads, special) if sp])
            rows = self._batch_order(requests, order)
            result = BatchResult({}, {})
            if preempt or (len(workloads) == 1 and terms[0] is not None):
                # One at a time, as `place` does (a lone workload skips the batch arrays).
                for i in rows.tolist():
                    self._place_one(workloads[i], requests[i], code, preempt, result)
                return result
            placed_ids: list[str] = []
            self._place_rows_named(workloads, requests, terms, rows, code, strategy, result, placed_ids)
            doomed = self._enforce_gangs(workloads, requests, result, placed_ids, gang)
            if doomed:
                # Rolling a gang back frees room: give the others that missed out a second pass.
                retry = [i for i in rows if workloads[i].id in result.unplaced and workloads[i].id not in doomed]
                for i in retry:
                    del result.unplaced[workloads[i].id]
                self._place_rows_named(workloads, requests, terms, retry, code, strategy, result, placed_ids)
            return result

    def _place_rows_named(self, workloads, requests, terms, rows, code, strategy, result, placed_ids) -> None:
        """Place workloads[rows] in that order; consecutive workloads that share compiled
        terms (replicas of one spec, plain workloads) go through the kernel in one call."""
        rows = list(rows)
        start = 0
        while start < len(rows):
            i = rows[start]
            if terms[i] is None:  # per-host services and inline volumes take their own path
                if self._place_one(workloads[i], requests[i], code, False, result):
                    placed_ids.append(workloads[i].id)
                start += 1
                continue
            end = start + 1
            while end < len(rows) and terms[rows[end]] is terms[i]:
                end += 1
            self._place_run(workloads, requests, terms[i], rows[start:end], code, result, placed_ids)
            start = end

    def _place_run(self, workloads, requests, terms: CompiledTerms, run: list[int], code: int,
                   result: BatchResult, placed_ids: list[str]) -> None:
        if terms.version != self._cons.version:
            terms = self._terms(workloads[run[0]])
        order = np.asarray(run, dtype=np.intp)
        n = len(workloads)
        hosts = np.full(n, -1, dtype=np.int64)
        charge = np.zeros((n, len(self.dimensions)), dtype=np.int64)
        numa = np.full(n, -1, dtype=np.int64)
        sched_core.place_rows_constrained(self._state, self._cons.state, terms.core, requests, order, code,
                                          hosts, charge, numa)
        placed_rows = hosts[order]
        self._cons.record(terms, placed_rows[placed_rows >= 0], +1)
        row_hosts = self._row_hosts
        host_of, numa_of = hosts.tolist(), numa.tolist()  # Python ints once, not a numpy scalar per row
        for i in run:
            w = workloads[i]
            h = host_of[i]
            if h >= 0:
                self._workloads[w.id] = _Record(w, h, charge[i], numa_of[i], terms)
                result.placements[w.id] = row_hosts[h].id
                placed_ids.append(w.id)
            else:
                result.unplaced[w.id] = self._explain_request(w, requests[i], terms)

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
                self._release_record(wid)
                del result.placements[wid]
        for name in broken:
            for i in members[name]:
                w = workloads[i]
                if w.id not in result.unplaced:
                    expl = self._explain_request(w, requests[i], self._terms(w))
                    result.unplaced[w.id] = replace(expl, note=f"gang {name} not placed: other members did not fit")
        return doomed

    def bind(self, workload: Workload, host_id: str, *, restore: bool = False) -> Placement:
        """Place a workload on a named host, after checking every constraint there.

        For callers that decided the host themselves (a store rebuilding its
        state, an operator pinning a workload). Raises Unschedulable when the
        host is not schedulable, lacks room or breaks a hard constraint.

        restore=True is for a placement decided earlier and replayed from a log:
        hard affinity, anti-affinity and spread are not checked again, because
        they held against the workloads present when it was decided, and some
        may be gone by the time it is replayed (a gang member rolled back in the
        same batch, for one). Room, labels, taints, tenancy, volume locality and
        NUMA are still checked, so a restore never overcommits a host.
        """
        with self._lock:
            request = self._check_new_workload(workload)
            if workload.per_host:
                raise ValidationError(f"workload {workload.id}: per-host services cannot be bound to one host")
            row = self._row(host_id)
            terms = self._terms(workload)
            charge = np.zeros(len(self.dimensions), dtype=np.int64)
            code = sched_core.check_host(self._state, self._cons.state, terms.core, request, row, charge,
                                         not restore)
            if code != 0:
                raise Unschedulable(workload.id, self._explain_request(workload, request, terms, only_row=row))
            numa = sched_core.commit_host(self._state, self._cons.state, terms.core, row, charge)
            self._cons.record(terms, [row], +1)
            self._workloads[workload.id] = _Record(workload, row, charge, int(numa), terms)
            return Placement(workload.id, host_id)

    def _release_record(self, workload_id: str) -> _Record:
        rec = self._workloads.pop(workload_id)
        sched_core.release_constrained(self._state, self._cons.state, rec.terms.core, rec.row, rec.charge, rec.numa)
        self._cons.record(rec.terms, [rec.row], -1)
        return rec

    def release(self, workload_id: str) -> Placement:
        """Remove a placed workload (or every replica of a per-host service) and give its
        resources back; returns where it was."""
        with self._lock:
            if workload_id in self._daemons:
                hosts = tuple(self._row_hosts[self._release_record(wid).row].id
                              for wid in self._daemon_replicas(workload_id))
                del self._daemons[workload_id]
                return Placement(workload_id, None, replicas=hosts)
            if workload_id not in self._workloads:
                raise NotFound(f"unknown workload id {workload_id!r}")
            rec = self._release_record(workload_id)
            return Placement(workload_id, self._row_hosts[rec.row].id)

    def restore(self, workload: Workload, placement: Placement) -> Placement:
        """Commit a placement decided earlier (a store replaying its log): the host, the
        per-host replicas or the new volumes' replica hosts that `placement` records,
        each checked as `bind(restore=True)` checks. All or nothing."""
        with self._lock:
            if workload.per_host:
                return self.bind_replicas(workload, placement.replicas)
            created: list[str] = []
            try:
                for v in workload.volumes:
                    if isinstance(v, Volume):
                        if v.id not in placement.volumes:
                            raise ValidationError(f"workload {workload.id}: no replica hosts recorded for "
                                                  f"new volume {v.id!r}")
                        self.add_volume(v, hosts=placement.volumes[v.id])
                        created.append(v.id)
                p = self.bind(workload, placement.host_id, restore=True)
            except SchedulerError:
                for vid in reversed(created):
                    self.remove_volume(vid)
                raise
            return replace(p, volumes={vid: placement.volumes[vid] for vid in created})

    def placements(self, host_id: str | None = None) -> list[Placement]:
        """Every placed named workload (a per-host service once, with its replica hosts;
        a workload that created volumes with their replica hosts), in placement order;
        with host_id, those that run there."""
        with self._lock:
            row = None if host_id is None else self._row(host_id)
            out: list[Placement] = []
            hosts = self._row_hosts
            for wid, rec in self._workloads.items():
                w = rec.workload
                if w.per_host or (row is not None and rec.row != row):
                    continue
                if w.volumes and _creates_volumes(w):
                    vols = {v.id: [hosts[r].id for r in self._volumes[v.id].rows]
                            for v in w.volumes if isinstance(v, Volume) and v.id in self._volumes}
                    out.append(Placement(wid, hosts[rec.row].id, volumes=vols))
                else:
                    out.append(Placement(wid, hosts[rec.row].id))
            for sid in self._daemons:
                replicas = tuple(hosts[self._workloads[r].row].id for r in self._daemon_replicas(sid))
                if host_id is None or host_id in replicas:
                    out.append(Placement(sid, None, replicas=replicas))
            return out

    def workload_counts(self) -> dict[str, int]:
        """host id -> named workloads placed there (per-host replicas included), for hosts
        that run any."""
        with self._lock:
            counts: dict[str, int] = {}
            hosts = self._row_hosts
            for rec in self._workloads.values():
                hid = hosts[rec.row].id
                counts[hid] = counts.get(hid, 0) + 1
            return counts

    def volume(self, volume_id: str) -> Volume:
        try:
            return self._volumes[volume_id].volume
        except (KeyError, TypeError):
            raise NotFound(f"unknown volume id {volume_id!r}") from None

    def workload(self, workload_id: str) -> Workload:
        if workload_id in self._daemons:
            return self._daemons[workload_id]
        try:
            return self._workloads[workload_id].workload
        except (KeyError, TypeError):
            raise NotFound(f"unknown workload id {workload_id!r}") from None

    def assignments(self) -> dict[str, str]:
        """workload id -> host id for every named workload (per-host service replicas as "id@host")."""
        return {wid: self._row_hosts[rec.row].id for wid, rec in self._workloads.items()}

    def workloads_on(self, host_id: str) -> list[str]:
        row = self._row(host_id)
        return [wid for wid, rec in self._workloads.items() if rec.row == row]

    # ------------------------------------------------------------------ per-host services

    def _daemon_replicas(self, daemon_id: str) -> list[str]:
        prefix = daemon_id + "@"
        return [wid for wid, rec in self._workloads.items()
                if rec.workload.per_host and wid.startswith(prefix) and rec.workload.id == wid]

    def _place_daemon(self, workload: Workload, request: np.ndarray) -> Placement:
        if workload.volumes or workload.gang:
            raise ValidationError(f"workload {workload.id}: per-host services take no volumes and no gang")
        self._terms(workload)  # validates the constraints before anything is placed
        self._daemons[workload.id] = workload
        rows = [r for r in range(self._n_rows) if self._live[r]]
        placed, missed = self._place_daemon_on(workload, rows)
        note = ""
        if missed:
            note = "no room on " + ", ".join(missed[:10]) + (" ..." if len(missed) > 10 else "")
        return Placement(workload.id, None, replicas=tuple(placed), explanation=note or None)

    def _place_daemon_on(self, daemon: Workload, rows: Sequence[int]) -> tuple[list[str], list[str]]:
        """One replica on each row that matches the service's selector and tolerations."""
        request = self._compile_request(daemon)
        placed, missed = [], []
        for row in rows:
            host = self._row_hosts[row]
            replica = replace(daemon, id=f"{daemon.id}@{host.id}")
            terms = self._terms(replica)
            charge = np.zeros(len(self.dimensions), dtype=np.int64)
            code = sched_core.check_host(self._state, self._cons.state, terms.core, request, row, charge)
            if code == 0:
                numa = sched_core.commit_host(self._state, self._cons.state, terms.core, row, charge)
                self._cons.record(terms, [row], +1)
                self._workloads[replica.id] = _Record(replica, row, charge, int(numa), terms)
                placed.append(host.id)
            elif code >= sched_core.REASON_DIM and code < sched_core.REASON_AFFINITY:
                missed.append(host.id)
        return placed, missed

    def bind_replicas(self, workload: Workload, host_ids: Sequence[str]) -> Placement:
        """Register a per-host service (unless it is registered) and put one replica on
        each named host, checking each like `bind`; all or nothing.

        For a store rebuilding its state: `place` and `add_hosts` choose the
        hosts themselves, this repeats a recorded choice exactly.
        """
        with self._lock:
            if not isinstance(workload, Workload) or not workload.per_host:
                raise ValidationError(f"bind_replicas expects a per-host service, got {workload!r}")
            known = workload.id in self._daemons
            if known:
                request = self._compile_request(workload)
            else:
                request = self._check_new_workload(workload)
                if workload.volumes or workload.gang:
                    raise ValidationError(f"workload {workload.id}: per-host services take no volumes and no gang")
            rows = [self._row(h) for h in host_ids]
            done: list[str] = []
            for row in rows:
                replica = replace(workload, id=f"{workload.id}@{self._row_hosts[row].id}")
                terms = self._terms(replica)
                charge = np.zeros(len(self.dimensions), dtype=np.int64)
                code = 0 if replica.id in self._workloads else sched_core.check_host(
                    self._state, self._cons.state, terms.core, request, row, charge)
                if code != 0 or replica.id in self._workloads:
                    for wid in reversed(done):
                        self._release_record(wid)
                    if code == 0:
                        raise DuplicateId(f"workload id {replica.id!r} is already placed")
                    raise Unschedulable(replica.id, self._explain_request(replica, request, terms, only_row=row))
                numa = sched_core.commit_host(self._state, self._cons.state, terms.core, row, charge)
                self._cons.record(terms, [row], +1)
                self._workloads[replica.id] = _Record(replica, row, charge, int(numa), terms)
                done.append(replica.id)
            if not known:
                self._daemons[workload.id] = workload
            return Placement(workload.id, None, replicas=tuple(host_ids))

    # ------------------------------------------------------------------ volumes

    def add_volume(self, volume: Volume, hosts: Sequence[str] | None = None) -> list[str]:
        """Place a volume's replicas on distinct hosts (or distinct values of the `spread`
        label) with free SSD; returns the replica hosts. Unschedulable when too few fit.

        hosts pins the replicas to named hosts (a store rebuilding its state, an operator
        restoring a volume); they are checked like chosen ones.
        """
        if not isinstance(volume, Volume):
            raise ValidationError(f"add_volume expects a Volume, got {type(volume).__name__}")
        with self._lock:
            if hosts is None:
                rows = self._volume_rows(volume, exclude_domain=None)
            else:
                rows = self._pinned_volume_rows(volume, list(hosts))
            self._commit_volume(volume, rows)
            return [self._row_hosts[r].id for r in rows]

    def _pinned_volume_rows(self, volume: Volume, hosts: list[str]) -> list[int]:
        if volume.id in self._volumes:
            raise DuplicateId(f"volume id {volume.id!r} already exists")
        if "ssd" not in self._dim_index:
            raise ValidationError(f"volume {volume.id}: the cluster has no 'ssd' dimension")
        if len(hosts) != volume.replicas:
            raise ValidationError(f"volume {volume.id} hosts: {len(hosts)} given for {volume.replicas} replicas")
        rows = [self._row(h) for h in hosts]
        key = volume.spread
        domains = [r if key == "host" else self._row_hosts[r].labels.get(key) for r in rows]
        if None in domains or len(set(domains)) != len(domains):
            raise ValidationError(f"volume {volume.id} hosts: replicas need distinct {key} domains, got {hosts}")
        free = self._state.free_array[:, self._dim_index["ssd"]]
        schedulable = self._state.schedulable_array()
        short = [h for h, r in zip(hosts, rows) if not schedulable[r] or free[r] < volume.size_gib]
        if short:
            expl = _explain.Explanation(volume.id, len(rows), len(rows) - len(short), {
                f"not schedulable or under {volume.size_gib} GiB free ssd": len(short)})
            raise Unschedulable(volume.id, expl)
        return rows

    def _volume_rows(self, volume: Volume, exclude_domain, first_row: int | None = None) -> list[int]:
        if volume.id in self._volumes:
            raise DuplicateId(f"volume id {volume.id!r} already exists")
        if "ssd" not in self._dim_index:
            raise ValidationError(f"volume {volume.id}: the cluster has no 'ssd' dimension")
        key = volume.spread
        n = self._n_rows
        if key != "host" and not any(h is not None and key in h.labels for h in self._row_hosts):
            raise ValidationError(f"volume {volume.id} spread: topology key {key!r} is not a label of any host")
        ssd = self._dim_index["ssd"]
        free = self._state.free_array[:n, ssd]
        ok = self._state.schedulable_array()[:n] & (free >= volume.size_gib)
        domains = [(r if key == "host" else (h.labels.get(key) if h else None)) for r, h in
                   enumerate(self._row_hosts[:n])]
        chosen = [] if first_row is None else [first_row]
        used = {domains[first_row]} if first_row is not None else set()
        # Tightest SSD first (best fit), lowest row on ties.
        for r in sorted(np.flatnonzero(ok).tolist(), key=lambda r: (free[r], r)):
            if len(chosen) == volume.replicas:
                break
            if r in chosen or domains[r] is None or domains[r] in used:
                continue
            chosen.append(r)
            used.add(domains[r])
        if len(chosen) < volume.replicas:
            expl = _explain.Explanation(volume.id, int(self._live[:n].sum()), len(chosen), {
                f"volume needs {volume.replicas} replicas on distinct {key} domains with {volume.size_gib} GiB "
                f"free ssd; found": len(chosen)})
            raise Unschedulable(volume.id, expl)
        return chosen

    def _commit_volume(self, volume: Volume, rows: list[int]) -> None:
        charge = np.zeros(len(self.dimensions), dtype=np.int64)
        charge[self._dim_index["ssd"]] = volume.size_gib
        for r in rows:
            self._state.commit_row(r, charge)
        self._volumes[volume.id] = _VolumeRecord(volume, rows, charge)

    def remove_volume(self, volume_id: str) -> None:
        """Delete a volume's replicas. Refused while a placed workload mounts it."""
        with self._lock:
            if volume_id not in self._volumes:
                raise NotFound(f"unknown volume id {volume_id!r}")
            users = [wid for wid, rec in self._workloads.items()
                     if any((v if isinstance(v, str) else v.id) == volume_id for v in rec.workload.volumes)]
            if users:
                raise StateConflict(f"volume {volume_id!r} is mounted by {', '.join(sorted(users)[:5])}")
            rec = self._volumes.pop(volume_id)
            for r in rec.rows:
                self._state.release_row(r, rec.charge)

    def volumes(self) -> dict[str, list[str]]:
        """volume id -> replica host ids."""
        return {vid: [self._row_hosts[r].id for r in rec.rows] for vid, rec in self._volumes.items()}

    def _place_with_new_volumes(self, workload: Workload, request: np.ndarray, code: int) -> Placement:
        """A workload and the volumes it creates, in one decision: the workload goes on a
        host that also takes one replica of each new volume, and the other replicas
        must fit elsewhere, or nothing is placed."""
        new = [v for v in workload.volumes if isinstance(v, Volume)]
        for v in new:
            if v.id in self._volumes:
                raise DuplicateId(f"workload {workload.id} volumes: volume {v.id!r} already exists")
        if len({v.id for v in new}) != len(new):
            raise ValidationError(f"workload {workload.id} volumes: the same volume id appears twice")
        if "ssd" not in self._dim_index:
            raise ValidationError(f"workload {workload.id} volumes: the cluster has no 'ssd' dimension")
        existing = replace(workload, volumes=tuple(v for v in workload.volumes if isinstance(v, str)))
        combined = request.copy()
        combined[self._dim_index["ssd"]] += sum(v.size_gib for v in new)
        terms = self._terms(existing)
        n = self._state.n_rows
        reasons = np.zeros(n, dtype=np.int32)
        sched_core.filter_constrained(self._state, self._cons.state, terms.core, combined, reasons)
        candidates = np.flatnonzero(reasons[: self._n_rows] == 0)
        # Keep the candidates whose other replicas would fit; the kernel then picks among them.
        allowed = np.zeros(n, dtype=np.uint8)
        for r in candidates.tolist():
            try:
                for v in new:
                    self._volume_rows(v, None, first_row=r)
                allowed[r] = 1
            except Unschedulable:
                continue
        if allowed.any():
            mask_terms = self._cons.compile(existing, allowed & (self._volume_mask(existing)
                                                                if existing.volumes else 1))
            row = self._select_and_commit(existing, combined, mask_terms, code)
            if row >= 0:
                rec = self._workloads.pop(existing.id)
                # The host was chosen for workload + replicas together; now the volumes own
                # their replicas' SSD (on this host too) and the workload only its request.
                ssd = self._dim_index["ssd"]
                extra = np.zeros(len(self.dimensions), dtype=np.int64)
                extra[ssd] = sum(v.size_gib for v in new)
                self._state.adjust_row(row, -extra)
                self._workloads[workload.id] = replace(rec, workload=workload, charge=rec.charge - extra)
                hosts = {}
                for v in new:
                    replicas = self._volume_rows(v, None, first_row=row)
                    self._commit_volume(v, replicas)
                    hosts[v.id] = [self._row_hosts[r].id for r in replicas]
                return Placement(workload.id, self._row_hosts[row].id, volumes=hosts)
        expl = self._explain_request(existing, combined, terms)
        raise Unschedulable(workload.id, replace(
            expl, note="no host takes the workload plus one replica of each new volume with the other replicas "
                       "fitting on distinct domains"))

    # ------------------------------------------------------------------ preemption

    def _preempt(self, workload: Workload, request: np.ndarray, terms: CompiledTerms) -> Placement | None:
        """Evict the fewest lower-priority workloads (then the lowest priorities) from one host
        so that `workload` fits there; None when no host can be freed that way."""
        n = self._state.n_rows
        reasons = np.zeros(n, dtype=np.int32)
        sched_core.filter_constrained(self._state, self._cons.state, terms.core, request, reasons)
        # Only hosts refused for resources alone can be helped by evicting.
        rows = np.flatnonzero((reasons >= sched_core.REASON_DIM) & (reasons < sched_core.REASON_AFFINITY))
        by_row: dict[int, list[str]] = {}
        for wid, rec in self._workloads.items():
            if rec.workload.priority < workload.priority and not rec.workload.per_host:
                by_row.setdefault(rec.row, []).append(wid)
        best = None
        scale = self._state.inv_ref_array
        for row in rows.tolist():
            candidates = by_row.get(row, [])
            if not candidates:
                continue
            free = self._state.free_array[row].copy()
            charge_est = np.maximum(request, 0)
            deficit = np.maximum(charge_est - free, 0)
            # Fewest victims: take the ones that cover most of the deficit first.
            ranked = sorted(candidates, key=lambda wid: (
                -float((np.minimum(self._workloads[wid].charge, deficit) * scale).sum()),
                self._workloads[wid].workload.priority, wid))
            victims = []
            for wid in ranked:
                if (free >= charge_est).all():
                    break
                free += self._workloads[wid].charge
                victims.append(wid)
            if not victims or not (free >= charge_est).all():
                continue
            rank = (len(victims), max(self._workloads[v].workload.priority for v in victims),
                    sum(self._workloads[v].workload.priority for v in victims), row)
            if best is None or rank < best[0]:
                best = (rank, row, victims)
        if best is None:
            return None
        _, row, victims = best
        saved = [self._release_record(v) for v in victims]
        charge = np.zeros(len(self.dimensions), dtype=np.int64)
        code = sched_core.check_host(self._state, self._cons.state, terms.core, request, row, charge)
        if code != 0:  # e.g. a VM's ratio charge or NUMA fit still fails: put everything back
            for rec in saved:
                self._restore(rec)
            return None
        numa = sched_core.commit_host(self._state, self._cons.state, terms.core, row, charge)
        self._cons.record(terms, [row], +1)
        self._workloads[workload.id] = _Record(workload, row, charge, int(numa), terms)
        return Placement(workload.id, self._row_hosts[row].id, evicted=tuple(victims))

    def _restore(self, rec: _Record) -> None:
        terms = self._terms(rec.workload) if rec.terms.version != self._cons.version else rec.terms
        sched_core.commit_host(self._state, self._cons.state, terms.core, rec.row, rec.charge)
        self._cons.record(terms, [rec.row], +1)
        self._workloads[rec.workload.id] = replace(rec, terms=terms)

    # ------------------------------------------------------------------ explanations

    def explain(self, workload: Workload) -> "_explain.Explanation":
        """Why `workload` would or would not fit now; places nothing."""
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        with self._lock:
            request = self._compile_request(workload)
            plain = replace(workload, volumes=tuple(v for v in workload.volumes if isinstance(v, str)))
            return self._explain_request(plain, request, self._terms(plain))

    def _explain_request(self, workload: Workload, request: np.ndarray, terms: CompiledTerms,
                         only_row: int | None = None):
        n = self._n_rows
        reasons = np.zeros(self._state.n_rows, dtype=np.int32)
        sched_core.filter_constrained(self._state, self._cons.state, terms.core, request, reasons)
        reasons = reasons[:n]
        free = self._state.free_array[:n]
        live = self._live[:n].copy()
        if only_row is not None:
            live[:] = False
            live[only_row] = True
        filters = _explain.count_reasons(reasons, live, self.dimensions, terms.labels)
        resource_only = np.flatnonzero(live & (reasons >= sched_core.REASON_DIM)
                                       & (reasons < sched_core.REASON_AFFINITY))
        miss = _explain.nearest_miss(free, request, resource_only, self._state.inv_ref_array,
                                     self.host_ids(), self.dimensions)
        alloc = self._state.limit_array[:n][self._live[:n]]
        unresolvable = bool(len(alloc)) and not (alloc >= request).all(axis=1).any()
        return _explain.Explanation(
            workload_id=workload.id, n_hosts=int(live.sum()), feasible=int(((reasons == 0) & live).sum()),
            filters=filters, nearest_miss=miss, unresolvable=unresolvable)

    # ------------------------------------------------------------------ array fast path

    def _batch_order(self, requests: np.ndarray, order: str) -> np.ndarray:
        if order == "arrival" or len(requests) < 2:  # one row has one order: skip the O(hosts) totals
            return np.arange(len(requests), dtype=np.intp)
        n = self._n_rows
        total = self._state.limit_array[:n][self._state.schedulable_array()[:n]].sum(axis=0)
        return largest_first(requests, total)

    def place_array(self, requests, strategy: str = "binpack", order: str = "arrival",
                    improve_s: float = 0.0, template: Workload | None = None) -> np.ndarray:
        """Place a matrix of requests; the fast path for orchestrators and benchmarks.

        Parameters
        ----------
        requests : int ndarray (n_workloads, n_dims)
        strategy : {"binpack", "spread", "balanced", "dot"}
        order : {"arrival", "largest_first"}
        improve_s : float
            Seconds the batch may spend improving the greedy packing (0: greedy
            only). Unconstrained batches only.
        template : Workload, optional
            Constraints every row shares, as the replicas of one service do
            (selector, tolerations, group, affinity, anti-affinity, spread,
            tenant, kind). Its id and requests are ignored.

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
            terms = None
            if template is not None:
                if not isinstance(template, Workload):
                    raise ValidationError(f"template must be a Workload, got {type(template).__name__}")
                if template.per_host or template.volumes or template.gang:
                    raise ValidationError("template: per-host services, volumes and gangs need named workloads")
                if improve_s > 0:
                    raise ValidationError("improve_s applies to batches without a template")
                terms = self._terms(template)
            elif self._cons.has_hard_taints:
                terms = self._terms(Workload("<array>"))  # taints still apply to plain rows
            rows = self._batch_order(req, order)
            hosts = np.full(len(req), -1, dtype=np.int64)
            numa = np.full(len(req), -1, dtype=np.int64)
            if terms is None:
                free_before = self._schedulable_free() if improve_s > 0 else None
                sched_core.place_rows(self._state, req, rows, code, hosts)
                if improve_s > 0 and (hosts >= 0).any():
                    hosts = self._apply_improvement(free_before, req, hosts, float(improve_s))
                charge = req
                terms_id = -1
            else:
                charge = np.zeros_like(req)
                sched_core.place_rows_constrained(self._state, self._cons.state, terms.core, req, rows, code,
                                                  hosts, charge, numa)
                self._cons.record(terms, hosts[hosts >= 0], +1)
                self._arr_terms_list.append(terms)
                terms_id = len(self._arr_terms_list) - 1
            self._append_array_rows(charge, hosts, numa, terms_id)
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

    def _append_array_rows(self, charge: np.ndarray, hosts: np.ndarray, numa: np.ndarray, terms_id: int) -> None:
        n = len(charge)
        need = self._arr_n + n
        if need > len(self._arr_hosts):
            size = max(need, 2 * len(self._arr_hosts), 1024)

            def grow(arr, fill):
                out = np.full((size,) + arr.shape[1:], fill, dtype=arr.dtype)
                out[: self._arr_n] = arr[: self._arr_n]
                return out

            self._arr_charge = grow(self._arr_charge, 0)
            self._arr_hosts = grow(self._arr_hosts, -1)
            self._arr_numa = grow(self._arr_numa, -1)
            self._arr_terms = grow(self._arr_terms, -1)
        sl = slice(self._arr_n, need)
        self._arr_charge[sl] = charge
        self._arr_hosts[sl] = hosts
        self._arr_numa[sl] = numa
        self._arr_terms[sl] = terms_id
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
            tid = self._arr_terms[idx]
            plain = idx[tid < 0]
            sched_core.release_rows(self._state, self._arr_charge[: self._arr_n], self._arr_hosts[: self._arr_n],
                                    plain)
            for t in np.unique(tid[tid >= 0]).tolist():
                terms = self._arr_terms_list[t]
                sel = idx[tid == t]
                for r in sel.tolist():
                    sched_core.release_constrained(self._state, self._cons.state, terms.core,
                                                   int(self._arr_hosts[r]), self._arr_charge[r],
                                                   int(self._arr_numa[r]))
                self._cons.record(terms, self._arr_hosts[sel], -1)
            self._arr_hosts[idx] = -1

    # ------------------------------------------------------------------ read-outs

    def usage(self) -> np.ndarray:
        """int64 (n_rows, n_dims): resources charged per host row (a copy). VMs are
        charged request x allocation ratio; volume replicas their size in ssd."""
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
        """Hosts that run at least one workload or volume replica."""
        return int((self._state.load_array[: self._n_rows] > 0).sum())

    def utilization(self) -> dict[str, float]:
        """Used / allocatable per dimension, over live hosts (0 where nothing is
        allocatable); above 1 where allocation ratios overcommit a dimension."""
        n = self._n_rows
        live = self._live[:n]
        used = self._state.used_array[:n][live].sum(axis=0)
        alloc = self._allocatable[:n][live].sum(axis=0)
        return {d: (float(u) / float(a) if a else 0.0) for d, u, a in zip(self.dimensions, used, alloc)}

    def __repr__(self) -> str:
        return (f"Cluster({self.n_hosts} hosts, {len(self._workloads)} workloads, "
                f"{int((self._arr_hosts[: self._arr_n] >= 0).sum())} array workloads)")
