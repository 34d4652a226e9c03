"""hci-scheduler: dense, constraint-aware placement of containers and KVM guests."""
from .cluster import Cluster
from .errors import (
    DuplicateId, NotFound, SchedulerError, StateConflict, UnknownDimension, Unschedulable, ValidationError,
)
from .explain import Explanation, NearestMiss
from .model import (
    Affinity, BatchResult, ContainerSpec, Host, LabelExpr, Placement, Spread, Taint, Toleration, VmSpec, Volume,
    VolumeMount, Workload,
)
from .policy import Policy

__all__ = [
    "Affinity", "BatchResult", "Cluster", "ContainerSpec", "DuplicateId", "Explanation", "Host", "LabelExpr", "NearestMiss",
    "NotFound", "Placement", "Policy", "SchedulerClient", "SchedulerError", "Spread", "StateConflict", "Taint",
    "Toleration", "UnknownDimension", "Unschedulable", "ValidationError", "VmSpec", "Volume", "VolumeMount",
    "Workload",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # SchedulerClient needs grpc, which `import hci_scheduler` does not load: imported on first use.
    if name == "SchedulerClient":
        from .client import SchedulerClient

        return SchedulerClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
