"""The Cluster facade and the parts it delegates to (see _facade.Cluster)."""
from ._facade import MAX_QUANTITY, Cluster
from ._view import PlacementView

__all__ = ["Cluster", "MAX_QUANTITY", "PlacementView"]
