"""One exception hierarchy for every failure the scheduler reports.

Every message names the field and the bad value. A call that raises leaves
the cluster exactly as it was.
"""
from __future__ import annotations


class SchedulerError(Exception):
    """Base of every error raised by hci_scheduler."""


class ValidationError(SchedulerError, ValueError):
    """An argument is malformed: wrong type, shape, dtype, sign or value."""


class UnknownDimension(ValidationError, KeyError):
    """A resource name is not one of the cluster's dimensions."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DuplicateId(SchedulerError):
    """A host, workload or volume id is already in use."""


class NotFound(SchedulerError, KeyError):
    """A host, workload or volume id is unknown."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StateConflict(SchedulerError):
    """The request is well formed but the current state forbids it
    (removing a host that still runs workloads, for example)."""


class Unschedulable(SchedulerError):
    """No host can take the workload; `explanation` says why, per filter."""

    def __init__(self, workload_id: str, explanation):
        self.workload_id = workload_id
        self.explanation = explanation
        super().__init__(f"workload {workload_id!r} is unschedulable: {explanation}")
