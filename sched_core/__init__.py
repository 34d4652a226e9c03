"""sched_core: the compiled placement kernels (arrays in, arrays out).

Only hci_scheduler calls these; they trust their inputs (hci_scheduler
validates dtype, shape and contiguity once). The reason codes (REASON_*,
MAX_TERMS) and strategy codes (BINPACK, SPREAD, BALANCED, DOT) are plain ints
with the values of the C enums declared in _filter.pxd and _score.pxd.
"""
from ._constraint import ConstraintState, Terms, static_hosts
from ._filter import filter_hosts
from ._index import FitIndex
from ._place import (
    BALANCED, BINPACK, DOT, MAX_TERMS, REASON_AFFINITY, REASON_ANTI_AFFINITY, REASON_DIM, REASON_KVM,
    REASON_NOT_SCHEDULABLE, REASON_NUMA, REASON_OK, REASON_SELECTOR, REASON_SPREAD, REASON_TAINT, REASON_TENANT,
    REASON_VOLUME, SPREAD,
    check_host, commit_host, commit_rows, filter_constrained, penalties, place_one, place_rows,
    place_rows_constrained, place_single, release_constrained, release_rows, select_host,
)
from ._state import HostState

__all__ = [
    "BALANCED", "BINPACK", "DOT", "SPREAD", "MAX_TERMS", "REASON_AFFINITY", "REASON_ANTI_AFFINITY", "REASON_DIM",
    "REASON_KVM", "REASON_NOT_SCHEDULABLE", "REASON_NUMA", "REASON_OK", "REASON_SELECTOR", "REASON_SPREAD",
    "REASON_TAINT", "REASON_TENANT", "REASON_VOLUME", "ConstraintState", "FitIndex", "HostState", "Terms",
    "check_host", "commit_host", "commit_rows", "filter_constrained", "filter_hosts", "penalties", "place_one",
    "place_rows", "place_rows_constrained", "place_single", "release_constrained", "release_rows", "select_host",
    "static_hosts",
]
