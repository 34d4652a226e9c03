"""Global rebalancing: ordered, feasible move plans (consolidate, drain, defragment, balance).

`problem.Problem` is what the engine sees (arrays); `plan.Plan` what a caller gets back.
`Cluster.rebalance` compiles a live cluster into a Problem, searches, orders the moves into
steps and returns a Plan; `Cluster.apply` commits it.
"""
from .capacity import CapacityPlan, HostType
from .compile import CostModel
from .errors import RebalanceInfeasible
from .plan import Move, Plan
from .problem import Problem

__all__ = ["CapacityPlan", "CostModel", "HostType", "Move", "Plan", "Problem", "RebalanceInfeasible"]
