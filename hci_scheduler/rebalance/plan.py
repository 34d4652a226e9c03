"""What a rebalance returns: moves in ordered steps, and what they cost and gain.

A plan is data: nothing changes until `Cluster.apply(plan)`, which refuses a plan
made for another state of the cluster (`base_version`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Move:
    """One workload from one host to another; cost in the plan's cost model."""

    workload_id: str
    source: str
    target: str
    cost: int = 0


@dataclass
class Plan:
    """An ordered move plan.

    steps : list of list of Move
        the moves of one step may run at the same time (the cluster stays within every
        hard constraint with each moving workload counted on both its hosts); steps run
        in order. A workload appears at most once per step; it may appear in two steps
        when it bounces through a host with room to break a cycle.
    cost : int
        migration cost of the moves (the `moves` terms of `terms_after`).
    objective_before, objective_after : int
        the goal's objective (every term of the cost model) at planning time and after the plan.
    terms_before, terms_after : dict str -> int
        the objective by named term (`host_cost`, `load_cost`, `balance_cost`,
        `process_move_cost`, `service_move_cost`, `machine_move_cost`, `group_move_cost`).
    lower_bound : int or None
        for consolidate: the fewest hosts the workloads could use (hosts_used can't go
        below it); for other goals a bound on the objective when one is known.
    hosts_freed : int
        hosts running a workload before and none after.
    status : str
        "optimal" (proved), "feasible", or "unchanged" (no improving plan found).
    unordered : str
        empty, or why the moves could not be ordered into feasible steps (then steps is empty).
    base_version : int
        the cluster's version the plan was made for; apply refuses any other.
    """

    goal: str
    steps: list[list[Move]] = field(default_factory=list)
    cost: int = 0
    objective_before: int = 0
    objective_after: int = 0
    terms_before: dict[str, int] = field(default_factory=dict)
    terms_after: dict[str, int] = field(default_factory=dict)
    lower_bound: int | None = None
    hosts_used_before: int = 0
    hosts_used_after: int = 0
    hosts_freed: int = 0
    status: str = "feasible"
    unordered: str = ""
    base_version: int = 0
    id: str = ""
    search: dict = field(default_factory=dict)   # engine statistics: time, iterations, neighbourhoods solved

    @property
    def moves(self) -> list[Move]:
        """Every move, in step order."""
        return [m for step in self.steps for m in step]
