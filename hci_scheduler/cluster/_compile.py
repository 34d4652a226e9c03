"""Compile: a Workload into the request vector and the Terms the core reads.

The first step of compile -> filter -> score -> select -> commit. Terms are cached
per spec (not per id) while the host layout is unchanged, so replicas of one service
and a stream of plain workloads compile once; every other part asks here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..constraints import CompiledTerms, spec_key
from ..errors import NotFound, UnknownDimension, ValidationError
from ..model import Workload, check_quantity
from ._hosts import HostTable

MAX_QUANTITY = 2**46  # every quantity is below this (model.check_quantity refuses the rest)


def as_request_matrix(requests, n_dims: int, name: str = "requests") -> np.ndarray:
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
    if out.size and out.max() >= MAX_QUANTITY:
        raise ValidationError(f"{name} holds a value >= 2**46: {out.max()}")
    return out


class Compiler:
    """Requests and cached Terms of workloads.

    `volume_rows` maps a volume id to the rows holding its replicas (the volumes
    part's records); a workload mounting volumes may only go where all of them are.
    """

    def __init__(self, hosts: HostTable, volume_rows):
        self._hosts = hosts
        self._dims = hosts.dimensions
        self._dim_index = hosts.dim_index
        self._cons = hosts.cons
        self._volume_rows = volume_rows
        self._cache: dict[tuple, CompiledTerms] = {}

    def request_values(self, workload: Workload) -> list[int]:
        """The request per dimension, checked (a batch turns all of them into one array)."""
        dims, dim_index = self._dims, self._dim_index
        req = workload.requests
        if req.keys() <= dim_index.keys():
            # Fast path for the common case (plain non-negative ints); anything else takes
            # the checked path below, which names the bad field.
            values = [req.get(d, 0) for d in dims]
            for v in values:
                if type(v) is not int or not 0 <= v < MAX_QUANTITY:
                    break
            else:
                return values
        values = [0] * len(dims)
        for name, value in workload.requests.items():
            if name not in dim_index:
                raise UnknownDimension(
                    f"workload {workload.id} requests unknown dimension {name!r}; dimensions are {dims}")
            values[dim_index[name]] = check_quantity(f"workload {workload.id} requests[{name!r}]", value)
        return values

    def request(self, workload: Workload) -> np.ndarray:
        return np.array(self.request_values(workload), dtype=np.int64)

    def volume_mask(self, workload: Workload) -> np.ndarray | None:
        """Rows holding a replica of every (existing) volume the workload mounts."""
        names = [v for v in workload.volumes if isinstance(v, str)]
        if not names:
            return None
        n = self._hosts.state.n_rows
        mask = np.ones(n, dtype=np.uint8)
        for name in names:
            rows = self._volume_rows(name)
            if rows is None:
                raise NotFound(f"workload {workload.id} volumes: unknown volume {name!r}")
            holds = np.zeros(n, dtype=np.uint8)
            holds[rows] = 1
            mask &= holds
        return mask

    def terms(self, workload: Workload, allowed: np.ndarray | None = None) -> CompiledTerms:
        """Compiled constraints of a workload, cached per spec while the host layout is unchanged."""
        cons = self._cons
        if allowed is None and workload.volumes:
            allowed = self.volume_mask(workload)
        if allowed is not None:
            return cons.compile(workload, allowed)
        key = spec_key(workload)
        cached = self._cache.get(key)
        if cached is not None and cached.version == cons.version:
            return cached
        terms = cons.compile(workload)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = terms
        return terms

    def replayed(self, workload: Workload, terms: CompiledTerms) -> CompiledTerms:
        """The terms a replayed placement is checked under: `terms` without the node
        selector, which held when the placement was decided (a host relabelled since keeps
        what it runs, and a snapshot knows only the labels of now)."""
        if not workload.selector:
            return terms
        return self.terms(dataclasses.replace(workload, selector={}))

    def current(self, terms: CompiledTerms, workload: Workload) -> CompiledTerms:
        """`terms` if the host layout has not changed since they were compiled, else fresh ones."""
        return terms if terms.version == self._cons.version else self.terms(workload)
