"""A rebalancing problem in arrays: everything the search engine sees, nothing else.

The same engine serves a live cluster (`compile.py` builds a Problem from a
`Cluster`) and the ROADEF/EURO 2012 machine reassignment benchmark (`bench/roadef.py`
builds one from the challenge's files), so the problem is the ROADEF model extended
with what a cluster adds: VM charges scaled by the host's allocation ratio, tenant
isolation, a cost per host in use, and workloads that may not move. Integers only.

Shapes: m hosts, n workloads, d dimensions, s services (groups), t tenants.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ValidationError


@dataclass
class Problem:
    """Hard constraints and cost terms of one rebalancing problem.

    Hosts
    -----
    capacity : int64 (m, d)
        hard limit per host (a cluster's allocatable x allocation ratio). A host whose
        `open` is False takes no workload (cordoned, draining, down, or drained by the goal).
    target : int64 (m, d)
        soft utilisation target (ROADEF safety capacity); usage above it costs
        `load_weight[d]` per unit. Equal to `capacity` where there is no target.
    ratio_milli : int64 (m, d)
        allocation ratio x 1000: a VM is charged ceil(request x ratio / 1000), a container
        its request (the placement core's rule).
    fixed : int64 (m, d)
        load that never moves (per-host services, volume replicas, pinned workloads are NOT
        counted here: pinned workloads are rows of the workload arrays with movable False).
    open : bool (m,)
        hosts that may receive workloads.
    host_cost : int64 (m,)
        cost of a host while it runs at least one workload (consolidation frees the dear ones first).
    location : int32 (m,)
        spread domain (ROADEF location; a cluster's zone, else rack, else the host).
    neighbourhood : int32 (m,)
        dependency domain (ROADEF neighbourhood; a cluster's zone).
    move_cost_matrix : int64 (m, m) or None
        cost of moving a workload from host a to host b (ROADEF machine move cost); when
        None, the cost is `location_move_cost` if the locations differ, else 0.

    Workloads
    ---------
    request : int64 (n, d)
    vm : bool (n,)
    initial : int32 (n,)
        host at planning time (every workload is placed; a drain goal closes hosts, it
        does not unplace).
    movable : bool (n,)
        False pins a workload to its initial host (per-host services are not rows at all).
    allowed_class : int32 (n,) and allowed : bool (k, m)
        the hosts each workload may run on by its static filters (selector, taints, kvm,
        volume locality), one row per distinct class; the initial host is always allowed.
    service : int32 (n,)
        group (ROADEF service) or -1.
    tenant : int32 (n,)
        tenant index or -1; `dedicated[t]` tenants share a host with no other workload.
    move_cost : int64 (n,)
        cost of moving each workload (ROADEF process move cost; default a VM's memory, a
        container's restart).

    Services
    --------
    conflict : bool (s,)
        no two workloads of the service on one host (hard anti-affinity per host).
    spread_min : int32 (s,)
        the service's workloads must cover at least this many locations (0: none).
    depends : int32 (p, 2)
        (a, b): every neighbourhood holding a workload of service a holds one of service b.

    Cost weights (ROADEF names where they exist)
    ------------------------------------------
    load_weight : int64 (d,)
    balance : list of (dim_a, dim_b, target, weight)
        ROADEF balance cost: weight x max(0, target x avail_a - avail_b) per host, where
        avail = capacity - usage.
    transient : bool (d,)
        dimensions counted on both the initial and the current host (ROADEF transient
        resources; a cluster has none, since moves are ordered in steps instead).
    process_move_weight, service_move_weight, machine_move_weight : int
        ROADEF: weight x sum of move costs of moved workloads; weight x the largest number
        of moved workloads of one service; weight x sum of host-pair move costs.
    group_move_weight : int64 (s,)
        a cluster's weight per group on how many of its workloads move (0 default).
    location_move_cost : int
    """

    capacity: np.ndarray
    request: np.ndarray
    initial: np.ndarray
    target: np.ndarray | None = None
    ratio_milli: np.ndarray | None = None
    fixed: np.ndarray | None = None
    open: np.ndarray | None = None
    host_cost: np.ndarray | None = None
    location: np.ndarray | None = None
    neighbourhood: np.ndarray | None = None
    move_cost_matrix: np.ndarray | None = None
    vm: np.ndarray | None = None
    movable: np.ndarray | None = None
    allowed_class: np.ndarray | None = None
    allowed: np.ndarray | None = None
    service: np.ndarray | None = None
    tenant: np.ndarray | None = None
    dedicated: np.ndarray | None = None
    move_cost: np.ndarray | None = None
    conflict: np.ndarray | None = None
    spread_min: np.ndarray | None = None
    depends: np.ndarray | None = None
    load_weight: np.ndarray | None = None
    balance: list = field(default_factory=list)
    transient: np.ndarray | None = None
    process_move_weight: int = 0
    service_move_weight: int = 0
    machine_move_weight: int = 0
    group_move_weight: np.ndarray | None = None
    location_move_cost: int = 0
    host_ids: list | None = None          # names for reports (a cluster's host ids)
    workload_ids: list | None = None

    def __post_init__(self):
        """Fill defaults and check shapes once, so the engine never checks in a loop."""
        self.capacity = _i64(self.capacity, "capacity", 2)
        m, d = self.capacity.shape
        self.request = _i64(self.request, "request", 2)
        n = self.request.shape[0]
        if self.request.shape[1] != d:
            raise ValidationError(f"request has {self.request.shape[1]} dimensions, capacity {d}")
        self.initial = _arr(self.initial, np.int32, "initial", (n,))
        if n and (self.initial.min() < 0 or self.initial.max() >= m):
            raise ValidationError("initial: every workload must sit on a host 0..m-1")
        self.target = self.capacity.copy() if self.target is None else _arr(self.target, np.int64, "target", (m, d))
        self.ratio_milli = (np.full((m, d), 1000, np.int64) if self.ratio_milli is None
                            else _arr(self.ratio_milli, np.int64, "ratio_milli", (m, d)))
        self.fixed = np.zeros((m, d), np.int64) if self.fixed is None else _arr(self.fixed, np.int64, "fixed", (m, d))
        self.open = np.ones(m, bool) if self.open is None else _arr(self.open, bool, "open", (m,))
        self.host_cost = np.zeros(m, np.int64) if self.host_cost is None else _arr(self.host_cost, np.int64, "host_cost", (m,))
        self.location = (np.arange(m, dtype=np.int32) if self.location is None
                         else _arr(self.location, np.int32, "location", (m,)))
        self.neighbourhood = (np.zeros(m, np.int32) if self.neighbourhood is None
                              else _arr(self.neighbourhood, np.int32, "neighbourhood", (m,)))
        if self.move_cost_matrix is not None:
            self.move_cost_matrix = _arr(self.move_cost_matrix, np.int64, "move_cost_matrix", (m, m))
        self.vm = np.zeros(n, bool) if self.vm is None else _arr(self.vm, bool, "vm", (n,))
        self.movable = np.ones(n, bool) if self.movable is None else _arr(self.movable, bool, "movable", (n,))
        if self.allowed is None:
            self.allowed = np.ones((1, m), bool)
            self.allowed_class = np.zeros(n, np.int32)
        else:
            self.allowed = _arr(self.allowed, bool, "allowed", (None, m))
            self.allowed_class = _arr(self.allowed_class, np.int32, "allowed_class", (n,))
            if n and (self.allowed_class.min() < 0 or self.allowed_class.max() >= self.allowed.shape[0]):
                raise ValidationError("allowed_class: an index into the rows of allowed")
        self.service = np.full(n, -1, np.int32) if self.service is None else _arr(self.service, np.int32, "service", (n,))
        s = int(self.service.max()) + 1 if n else 0
        if self.conflict is not None:
            s = max(s, len(self.conflict))
        self.conflict = _pad(self.conflict, bool, s, "conflict")
        self.spread_min = _pad(self.spread_min, np.int32, s, "spread_min")
        self.group_move_weight = _pad(self.group_move_weight, np.int64, s, "group_move_weight")
        self.depends = (np.zeros((0, 2), np.int32) if self.depends is None
                        else _arr(self.depends, np.int32, "depends", (None, 2)))
        self.tenant = np.full(n, -1, np.int32) if self.tenant is None else _arr(self.tenant, np.int32, "tenant", (n,))
        t = int(self.tenant.max()) + 1 if n else 0
        self.dedicated = _pad(self.dedicated, bool, t, "dedicated")
        self.move_cost = np.ones(n, np.int64) if self.move_cost is None else _arr(self.move_cost, np.int64, "move_cost", (n,))
        self.load_weight = np.zeros(d, np.int64) if self.load_weight is None else _arr(self.load_weight, np.int64, "load_weight", (d,))
        self.transient = np.zeros(d, bool) if self.transient is None else _arr(self.transient, bool, "transient", (d,))

    @property
    def n_hosts(self) -> int:
        return self.capacity.shape[0]

    @property
    def n_workloads(self) -> int:
        return self.request.shape[0]

    @property
    def n_dims(self) -> int:
        return self.capacity.shape[1]

    @property
    def n_services(self) -> int:
        return len(self.conflict)

    def charge(self, workloads: np.ndarray, hosts: np.ndarray) -> np.ndarray:
        """What each workload costs its host, int64 (len, d): a VM pays request x ratio
        (rounded up), a container its request (the placement core's rule)."""
        req = self.request[workloads]
        scaled = (req * self.ratio_milli[hosts] + 999) // 1000
        return np.where(self.vm[workloads][:, None], scaled, req)


def _arr(value, dtype, name: str, shape: tuple) -> np.ndarray:
    a = np.ascontiguousarray(value, dtype=dtype)
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        raise ValidationError(f"{name}: expected shape {shape}, got {a.shape}")
    return a


def _i64(value, name: str, ndim: int) -> np.ndarray:
    a = np.ascontiguousarray(value, dtype=np.int64)
    if a.ndim != ndim:
        raise ValidationError(f"{name}: expected {ndim} dimensions, got {a.ndim}")
    if a.size and a.min() < 0:
        raise ValidationError(f"{name}: negative values")
    return a


def _pad(value, dtype, size: int, name: str) -> np.ndarray:
    if value is None:
        return np.zeros(size, dtype)
    a = np.ascontiguousarray(value, dtype=dtype)
    if a.ndim != 1 or len(a) > size:
        raise ValidationError(f"{name}: expected at most {size} entries, got shape {a.shape}")
    return np.concatenate([a, np.zeros(size - len(a), dtype)]) if len(a) < size else a
