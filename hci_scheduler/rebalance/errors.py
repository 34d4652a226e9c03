"""Errors of the rebalancing engine (children of hci_scheduler.errors.SchedulerError)."""
from __future__ import annotations

from ..errors import SchedulerError


class RebalanceInfeasible(SchedulerError):
    """No assignment keeps every hard constraint that the search could find: the start
    breaks a constraint (a drained or over-full host) and some workloads fit nowhere else.

    Parameters
    ----------
    reasons : str or list of str
        one readable line per cause.
    workload_ids : list of str
        the workloads the repair could not place (empty when the cause is a host or a limit).
    """

    def __init__(self, reasons, workload_ids=()):
        self.reasons = [reasons] if isinstance(reasons, str) else list(reasons)
        self.workload_ids = list(workload_ids)
        shown = "; ".join(self.reasons[:10])
        if len(self.reasons) > 10:
            shown += f"; ... {len(self.reasons) - 10} more"
        super().__init__(f"no feasible rebalance: {shown}")
