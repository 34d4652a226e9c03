"""PlacementView: who runs where, copied in a few C-speed container copies.

A snapshot must read every placement at one sequence, under the server's lock, while
placements wait. Building `assignments()` there cost a Python step per workload (80 ms
at 200,000, several hundred under load). The view copies the records dict and the row
list instead (a record is never changed once it is placed: a move makes a new one), and
derives the maps later, outside any lock.
"""
from __future__ import annotations


class PlacementView:
    """A frozen copy of the ledger's records, the host per row and the per-host replicas."""

    __slots__ = ("_records", "_row_hosts", "_replicas")

    def __init__(self, records: dict, row_hosts: list, replicas: dict[str, str]):
        self._records = dict(records)
        self._row_hosts = list(row_hosts)
        self._replicas = replicas

    def assignments(self) -> dict[str, str]:
        """workload id -> host id (per-host service replicas as "id@host")."""
        hosts = self._row_hosts
        out = {wid: hosts[rec.row].id for wid, rec in self._records.items()}
        out.update(self._replicas)
        return out

    def numa_nodes(self) -> dict[str, int]:
        """workload id -> the NUMA node its host is charged on, for NUMA-fit VMs."""
        return {wid: rec.numa for wid, rec in self._records.items() if rec.numa >= 0}
