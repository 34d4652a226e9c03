"""hci-scheduler: dense, constraint-aware placement of containers and KVM guests."""
from .cluster import Cluster
from .errors import (
    DuplicateId, NotFound, SchedulerError, StateConflict, UnknownDimension, Unschedulable, ValidationError,
)
from .explain import Explanation, NearestMiss
from .model import (
    Affinity, BatchResult, Host, LabelExpr, Placement, Spread, Taint, Toleration, Volume, Workload,
)
from .policy import Policy

__all__ = [
    "Affinity", "BatchResult", "Cluster", "DuplicateId", "Explanation", "Host", "LabelExpr", "NearestMiss",
    "NotFound", "Placement", "Policy", "SchedulerError", "Spread", "StateConflict", "Taint", "Toleration",
    "UnknownDimension", "Unschedulable", "ValidationError", "Volume", "Workload",
]
__version__ = "0.1.0"
