"""Solving a CP-SAT sub-model: parameters, and the status mapped to an outcome explicitly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from .model import SubModel


@dataclass
class Outcome:
    """status: "optimal", "feasible", "infeasible" or "unknown" (no solution in the limits);
    hosts: int (k,) the new host of each sub-model workload (None without a solution);
    objective: the sub-model's objective; det_time: CP-SAT's deterministic time used."""

    status: str
    hosts: np.ndarray | None
    objective: int | None
    det_time: float


def solve(sub: SubModel, *, time_limit_s: float, det_time: float, seed: int = 0,
          workers: int = 1, log: bool = False) -> Outcome:
    """Solve `sub` within both limits.

    One worker and a deterministic time limit make the result depend on the seed only
    (the wall limit is a safety cap). MODEL_INVALID is a bug in model.py: it raises.
    """
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(float(time_limit_s), 0.001)
    solver.parameters.max_deterministic_time = max(float(det_time), 0.001)
    solver.parameters.num_workers = int(workers)
    solver.parameters.random_seed = int(seed)
    solver.parameters.log_search_progress = bool(log)
    status = solver.solve(sub.model)
    used = float(solver.deterministic_time)
    if status == cp_model.MODEL_INVALID:
        raise RuntimeError("rebalance sub-model is invalid: " + sub.model.validate())
    if status == cp_model.INFEASIBLE:
        return Outcome("infeasible", None, None, used)
    if status == cp_model.UNKNOWN:
        return Outcome("unknown", None, None, used)
    # OPTIMAL or FEASIBLE: read each workload's host.
    hosts = np.full(len(sub.workloads), -1, dtype=np.int64)
    index = {int(w): i for i, w in enumerate(sub.workloads)}
    for (w, h), var in sub.x.items():
        if solver.boolean_value(var):
            hosts[index[w]] = h
    name = "optimal" if status == cp_model.OPTIMAL else "feasible"
    return Outcome(name, hosts, int(solver.objective_value), used)
