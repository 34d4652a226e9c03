"""Consolidation from a packing by patterns: a start for the search that packs whole hosts.

The keep-set construction (keepset.py) and the search place one workload at a time,
and on mixed machine shapes they stop a few hosts above the optimum (the Google 2011
cell of the hetero bench: 568 hosts where 566 is proven). Packing by patterns
(`hci_scheduler.patterns`) chooses whole host contents and reaches the optimum there
in about 30 s. It applies to consolidation with no move budget where capacity is the
only hard constraint: every workload movable and allowed on every open host, no host
conflicts, spread, dependencies, dedicated tenants, transient dimensions, VMs charged
above their request, or hosts that must stay in use, and one host price.

The packing is then laid onto the hosts so that as much as possible stays: within a
shape, the largest host contents go to the hosts carrying the most workloads now, and
identical workloads trade places (`keepset.stay_home`). Matching each content to the
host it shares most with instead saved 1 % of the moves on the Google cell (8,452
against 8,540) and took 14 s at 50,000 hosts. The caller checks the result
independently, as it does the keep-set's.
"""
from __future__ import annotations

import numpy as np

from ..bounds import distinct_rows
from ..errors import ValidationError
from ..patterns import pack_by_patterns
from .keepset import stay_home
from .problem import Problem


def pattern_start(problem: Problem, fixed_use: np.ndarray, seed: np.ndarray | None,
                  time_limit_s: float) -> np.ndarray | None:
    """An assignment using fewer hosts than `seed` (or the initial one), or None when the
    patterns do not apply or find no better packing within `time_limit_s`."""
    hosts = np.flatnonzero(problem.open)
    if not _applies(problem, fixed_use, hosts):
        return None
    position = np.full(problem.n_hosts, -1, dtype=np.int64)
    position[hosts] = np.arange(len(hosts))
    start = problem.initial if seed is None else seed
    start = position[start]
    if (start < 0).any():
        return None
    room = problem.capacity[hosts] - problem.fixed[hosts]
    try:
        result = pack_by_patterns(room, problem.request, [start], time_limit_s=time_limit_s)
    except ValidationError:
        return None
    if result.used >= len(np.unique(start)):
        return None
    return stay_home(problem, _lay_out(problem, hosts, room, hosts[result.hosts]))


def _applies(problem: Problem, fixed_use: np.ndarray, hosts: np.ndarray) -> bool:
    if problem.n_workloads == 0 or len(hosts) == 0 or fixed_use.any() or not problem.movable.all():
        return False
    if not problem.allowed[np.unique(problem.allowed_class)][:, hosts].all():
        return False
    grouped = problem.service[problem.service >= 0]
    tenants = problem.tenant[problem.tenant >= 0]
    if problem.conflict[grouped].any() or problem.spread_min.any() or len(problem.depends) \
            or problem.dedicated[tenants].any() or problem.transient.any():
        return False
    if problem.vm.any() and (problem.ratio_milli[hosts] > 1000).any():
        return False
    return len(np.unique(problem.host_cost[hosts])) == 1 and (problem.fixed[hosts] <= problem.capacity[hosts]).all()


def _lay_out(problem: Problem, hosts: np.ndarray, room: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`target` (a host per workload) with its host contents moved, within each shape, onto
    the hosts that carry the most workloads now, the largest content onto the fullest."""
    _, shape = distinct_rows(room)
    carried = np.bincount(problem.initial, minlength=problem.n_hosts)
    wanted = np.bincount(target, minlength=problem.n_hosts)
    moved_to = np.arange(problem.n_hosts)
    for s in range(int(shape.max()) + 1):
        of_shape = hosts[shape == s]
        contents = of_shape[wanted[of_shape] > 0]
        contents = contents[np.argsort(-wanted[contents], kind="stable")]
        fullest = of_shape[np.argsort(-carried[of_shape], kind="stable")]
        moved_to[contents] = fullest[:len(contents)]
    return moved_to[target]
