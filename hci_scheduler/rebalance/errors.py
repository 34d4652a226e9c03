"""Errors of the rebalancing engine (children of hci_scheduler.errors.SchedulerError)."""
from __future__ import annotations

from ..errors import SchedulerError


class RebalanceInfeasible(SchedulerError):
    """No assignment keeps every hard constraint that the search could find: the start
    breaks a constraint (a drained or over-full host) and some workloads fit nowhere else.

    Attributes
    ----------
    workload_ids : list of str
        the workloads the repair could not place (empty when the cause is a host).
    reasons : list of str
        one readable line per cause.
    """

    def __init__(self, workload_ids: list[str], reasons: list[str]):
        self.workload_ids = list(workload_ids)
        self.reasons = list(reasons)
        shown = "; ".join(self.reasons[:10]) + (f"; ... {len(self.reasons) - 10} more" if len(self.reasons) > 10 else "")
        super().__init__(f"no feasible rebalance: {shown}")
