"""sched_core: the compiled placement kernels (arrays in, arrays out).

Only hci_scheduler calls these; they trust their inputs (hci_scheduler
validates dtype, shape and contiguity once).
"""
from ._filter import REASON_DIM, REASON_NOT_SCHEDULABLE, REASON_OK, filter_hosts
from ._index import FitIndex
from ._place import (
    BALANCED, BINPACK, DOT, SPREAD,
    commit_rows, place_one, place_rows, release_rows, select_host,
)
from ._state import HostState

__all__ = [
    "BALANCED", "BINPACK", "DOT", "SPREAD", "REASON_DIM", "REASON_NOT_SCHEDULABLE", "REASON_OK",
    "FitIndex", "HostState", "commit_rows", "filter_hosts", "place_one", "place_rows",
    "release_rows", "select_host",
]
