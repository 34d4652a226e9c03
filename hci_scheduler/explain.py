"""Why a workload is unschedulable: per-filter host counts and the nearest miss.

The core writes one reason code per host (the first filter that removed it,
cheapest filter first; the codes are the enum Reason of sched_core/_filter.pxd,
exported as sched_core.REASON_*); this module counts them and turns them into
text an operator can act on, as Nomad's AllocMetric.ConstraintFiltered does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import sched_core


@dataclass(frozen=True)
class NearestMiss:
    """The host that came closest, and what it lacked (dimension -> shortfall)."""

    host_id: str
    lacking: dict[str, int]

    def __str__(self) -> str:
        parts = ", ".join(f"{dim} short by {amount:,}" for dim, amount in self.lacking.items())
        return f"nearest miss: host {self.host_id} ({parts})" if parts else f"nearest miss: host {self.host_id}"


@dataclass(frozen=True)
class Explanation:
    """Outcome of the filters for one workload.

    filters maps a reason to the number of hosts it removed (each host is
    counted once, under the first filter it failed). feasible is the number
    of hosts that passed every filter.
    """

    workload_id: str
    n_hosts: int
    feasible: int
    filters: dict[str, int] = field(default_factory=dict)
    nearest_miss: NearestMiss | None = None
    unresolvable: bool = False
    note: str = ""

    @property
    def schedulable(self) -> bool:
        return self.feasible > 0

    def __str__(self) -> str:
        head = f"{self.feasible:,} of {self.n_hosts:,} hosts fit"
        parts = [f"{reason}: {count:,} hosts" for reason, count in self.filters.items()]
        text = head + (": " + "; ".join(parts) if parts else "")
        if self.nearest_miss is not None:
            text += f"; {self.nearest_miss}"
        if self.unresolvable:
            text += " (no host could ever fit it: the request exceeds every host's capacity)"
        if self.note:
            text += f"; {self.note}"
        return text


def reason_text(code: int, dimensions: tuple[str, ...], extra: dict[int, str] | None = None) -> str:
    if code == sched_core.REASON_NOT_SCHEDULABLE:
        return "host not schedulable (cordoned, draining or down)"
    if code >= sched_core.REASON_DIM and code - sched_core.REASON_DIM < len(dimensions):
        return f"insufficient {dimensions[code - sched_core.REASON_DIM]}"
    if extra and code in extra:
        return extra[code]
    return f"filter {code}"


def count_reasons(reasons: np.ndarray, live: np.ndarray, dimensions: tuple[str, ...],
                  extra: dict[int, str] | None = None) -> dict[str, int]:
    """Reason text -> hosts removed, over live rows, most frequent first."""
    codes, counts = np.unique(reasons[live], return_counts=True)
    pairs = [(reason_text(int(c), dimensions, extra), int(n)) for c, n in zip(codes, counts) if c != 0]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return dict(pairs)


def nearest_miss(free: np.ndarray, request: np.ndarray, candidates: np.ndarray, inv_ref: np.ndarray,
                 host_ids: list, dimensions: tuple[str, ...]) -> NearestMiss | None:
    """Among `candidates` (rows that failed only on resources), the smallest normalised shortfall."""
    if len(candidates) == 0:
        return None
    short = np.maximum(request[None, :] - free[candidates], 0)
    scale = np.where(inv_ref > 0, inv_ref, 1.0)
    cost = (short * scale).sum(axis=1)
    row = int(candidates[int(np.argmin(cost))])
    lacking = {dimensions[d]: int(v) for d, v in enumerate(np.maximum(request - free[row], 0)) if v > 0}
    return NearestMiss(host_ids[row], lacking)
