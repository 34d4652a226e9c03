"""Scoring strategies and batch orders, by name, mapped to the core's codes.

Strategies (see sched_core/_score.pyx for the formulas; their codes are the
enum Strategy of sched_core/_score.pxd, exported as sched_core.BINPACK etc.):

  binpack   best fit: the feasible host with the least normalised free capacity
            left after placement (packs densely; the default)
  spread    least allocated: the feasible host with the most free capacity
  balanced  the host whose used fractions stay most even across the requested
            dimensions (Kubernetes NodeResourcesBalancedAllocation)
  dot       largest dot product of request and free capacity among hosts already
            in use, opening an empty host only when none fits (Panigrahy et al. 2011)

Orders for batches:

  arrival        as given (online)
  largest_first  by dominant share of the cluster's schedulable capacity, largest
                 first; ties keep arrival order
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

import sched_core

from .errors import UnknownDimension, ValidationError

STRATEGIES = {
    "binpack": sched_core.BINPACK,
    "spread": sched_core.SPREAD,
    "balanced": sched_core.BALANCED,
    "dot": sched_core.DOT,
}
ORDERS = ("arrival", "largest_first")


def strategy_code(name: str) -> int:
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValidationError(f"strategy must be one of {tuple(STRATEGIES)}, got {name!r}") from None


def check_order(name: str) -> str:
    if name not in ORDERS:
        raise ValidationError(f"order must be one of {ORDERS}, got {name!r}")
    return name


@dataclass(frozen=True)
class Policy:
    """Per-dimension weights of the binpack/spread/dot scores (default 1 each).

    A weight of 0 leaves a dimension out of the score; feasibility still checks it.
    """

    weights: Mapping[str, float] = field(default_factory=dict)

    def weight_vector(self, dimensions: tuple[str, ...]) -> np.ndarray:
        w = np.ones(len(dimensions), dtype=np.float64)
        for name, value in self.weights.items():
            if name not in dimensions:
                raise UnknownDimension(f"policy weight for unknown dimension {name!r}; dimensions are {dimensions}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValidationError(f"policy weight[{name!r}] must be a finite number >= 0, got {value!r}")
            w[dimensions.index(name)] = float(value)
        return w


def largest_first(requests: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Row order by dominant share (max over dims of request / total), largest first.

    Parameters
    ----------
    requests : int64 (n, n_dims)
    total : int64 (n_dims,)
        Schedulable capacity of the cluster per dimension; 0 skips a dimension.

    Returns
    -------
    intp (n,)
        Stable: equal shares keep their arrival order.
    """
    scale = np.divide(1.0, total, out=np.zeros(len(total)), where=total > 0)
    share = (requests * scale).max(axis=1) if requests.shape[1] else np.zeros(len(requests))
    return np.argsort(-share, kind="stable").astype(np.intp)
