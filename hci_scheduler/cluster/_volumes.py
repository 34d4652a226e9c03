"""Volumes: replica selection, the volume records, and workloads that create volumes.

A volume's replicas go on distinct hosts (or distinct values of a label) with free
SSD; their charge goes through the ledger (`commit_volume`), and a workload that
creates volumes inline is committed by the ledger too, on a host chosen so that one
replica of each new volume fits beside it. This part decides rows; it commits nothing
itself.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import sched_core

from .. import explain as _explain
from ..errors import DuplicateId, NotFound, StateConflict, Unschedulable, ValidationError
from ..model import Placement, Volume, Workload
from ._compile import Compiler
from ._explanations import explain_request
from ._hosts import HostTable
from ._ledger import Ledger


@dataclass
class VolumeRecord:
    volume: Volume
    rows: list[int]
    charge: np.ndarray


def creates_volumes(workload: Workload) -> bool:
    """The workload asks for a new volume inline (placed with it in one decision)."""
    return bool(workload.volumes) and any(isinstance(v, Volume) for v in workload.volumes)


def mounted_only(workload: Workload) -> Workload:
    """The workload without the volumes it creates (those it mounts stay)."""
    return replace(workload, volumes=tuple(v for v in workload.volumes if isinstance(v, str)))


class Volumes:
    """Volume records by id and the choice of their replica rows."""

    def __init__(self, hosts: HostTable, ledger: Ledger):
        self._hosts = hosts
        self._ledger = ledger
        self.records: dict[str, VolumeRecord] = {}

    def rows_of(self, volume_id: str) -> list[int] | None:
        rec = self.records.get(volume_id)
        return None if rec is None else rec.rows

    def host_ids(self, volume_id: str) -> list[str]:
        row_hosts = self._hosts.row_hosts
        return [row_hosts[r].id for r in self.records[volume_id].rows]

    def _ssd(self, what: str) -> int:
        ssd = self._hosts.dim_index.get("ssd")
        if ssd is None:
            raise ValidationError(f"{what}: the cluster has no 'ssd' dimension")
        return ssd

    def add(self, volume: Volume, hosts: list[str] | None) -> list[str]:
        """Choose (or check the pinned) replica rows and commit them; returns the host ids."""
        rows = self.choose_rows(volume) if hosts is None else self.pinned_rows(volume, hosts)
        self.commit(volume, rows)
        return self.host_ids(volume.id)

    def pinned_rows(self, volume: Volume, hosts: list[str]) -> list[int]:
        if volume.id in self.records:
            raise DuplicateId(f"volume id {volume.id!r} already exists")
        ssd = self._ssd(f"volume {volume.id}")
        if len(hosts) != volume.replicas:
            raise ValidationError(f"volume {volume.id} hosts: {len(hosts)} given for {volume.replicas} replicas")
        table = self._hosts
        rows = [table.row(h) for h in hosts]
        key = volume.spread
        domains = [r if key == "host" else table.row_hosts[r].labels.get(key) for r in rows]
        if None in domains or len(set(domains)) != len(domains):
            raise ValidationError(f"volume {volume.id} hosts: replicas need distinct {key} domains, got {hosts}")
        free = table.state.free_array[:, ssd]
        schedulable = table.state.schedulable_array()
        short = [h for h, r in zip(hosts, rows) if not schedulable[r] or free[r] < volume.size_gib]
        if short:
            expl = _explain.Explanation(volume.id, len(rows), len(rows) - len(short), {
                f"not schedulable or under {volume.size_gib} GiB free ssd": len(short)})
            raise Unschedulable(volume.id, expl)
        return rows

    def choose_rows(self, volume: Volume, first_row: int | None = None) -> list[int]:
        """Replica rows for `volume` (with `first_row` taken already): tightest SSD first,
        lowest row on ties, one per spread domain. Unschedulable when too few fit."""
        if volume.id in self.records:
            raise DuplicateId(f"volume id {volume.id!r} already exists")
        ssd = self._ssd(f"volume {volume.id}")
        table = self._hosts
        key = volume.spread
        n = table.n_rows
        if key != "host" and not any(h is not None and key in h.labels for h in table.row_hosts):
            raise ValidationError(f"volume {volume.id} spread: topology key {key!r} is not a label of any host")
        free = table.state.free_array[:n, ssd]
        ok = table.state.schedulable_array()[:n] & (free >= volume.size_gib)
        domains = [(r if key == "host" else (h.labels.get(key) if h else None)) for r, h in
                   enumerate(table.row_hosts[:n])]
        chosen = [] if first_row is None else [first_row]
        used = {domains[first_row]} if first_row is not None else set()
        for r in sorted(np.flatnonzero(ok).tolist(), key=lambda r: (free[r], r)):
            if len(chosen) == volume.replicas:
                break
            if r in chosen or domains[r] is None or domains[r] in used:
                continue
            chosen.append(r)
            used.add(domains[r])
        if len(chosen) < volume.replicas:
            expl = _explain.Explanation(volume.id, int(table.live[:n].sum()), len(chosen), {
                f"volume needs {volume.replicas} replicas on distinct {key} domains with {volume.size_gib} GiB "
                f"free ssd; found": len(chosen)})
            raise Unschedulable(volume.id, expl)
        return chosen

    def commit(self, volume: Volume, rows: list[int]) -> None:
        charge = np.zeros(len(self._hosts.dimensions), dtype=np.int64)
        charge[self._hosts.dim_index["ssd"]] = volume.size_gib
        self._ledger.commit_volume(rows, charge)
        self.records[volume.id] = VolumeRecord(volume, rows, charge)

    def remove(self, volume_id: str) -> None:
        """Delete a volume's replicas. Refused while a placed workload mounts it."""
        if volume_id not in self.records:
            raise NotFound(f"unknown volume id {volume_id!r}")
        users = [wid for wid, rec in self._ledger.records.items()
                 if any((v if isinstance(v, str) else v.id) == volume_id for v in rec.workload.volumes)]
        if users:
            raise StateConflict(f"volume {volume_id!r} is mounted by {', '.join(sorted(users)[:5])}")
        rec = self.records.pop(volume_id)
        self._ledger.release_volume(rec.rows, rec.charge)

    def check_new(self, workload: Workload, taken: set[str]) -> None:
        """What placing `workload` would refuse of the volumes it creates (ids already in
        use here or in `taken`, which this adds to; no 'ssd' dimension)."""
        self._ssd(f"workload {workload.id} volumes")
        for v in workload.volumes:
            if isinstance(v, Volume):
                if v.id in self.records or v.id in taken:
                    raise DuplicateId(f"workload {workload.id} volumes: volume {v.id!r} already exists")
                taken.add(v.id)

    def place_with_new(self, workload: Workload, request: np.ndarray, code: int, compiler: Compiler) -> Placement:
        """A workload and the volumes it creates, in one decision: the workload goes on a
        host that also takes one replica of each new volume, and the other replicas
        must fit elsewhere, or nothing is placed."""
        new = [v for v in workload.volumes if isinstance(v, Volume)]
        for v in new:
            if v.id in self.records:
                raise DuplicateId(f"workload {workload.id} volumes: volume {v.id!r} already exists")
        if len({v.id for v in new}) != len(new):
            raise ValidationError(f"workload {workload.id} volumes: the same volume id appears twice")
        ssd = self._ssd(f"workload {workload.id} volumes")
        table = self._hosts
        existing = mounted_only(workload)
        combined = request.copy()
        combined[ssd] += sum(v.size_gib for v in new)
        terms = compiler.terms(existing)
        n = table.state.n_rows
        reasons = np.zeros(n, dtype=np.int32)
        sched_core.filter_constrained(table.state, table.cons.state, terms.core, combined, reasons)
        candidates = np.flatnonzero(reasons[: table.n_rows] == 0)
        # Keep the candidates whose other replicas would fit; the kernel then picks among them.
        allowed = np.zeros(n, dtype=np.uint8)
        for r in candidates.tolist():
            try:
                for v in new:
                    self.choose_rows(v, first_row=r)
                allowed[r] = 1
            except Unschedulable:
                continue
        if allowed.any():
            mask = compiler.volume_mask(existing)
            mask_terms = table.cons.compile(existing, allowed & (mask if mask is not None else 1))
            row = self._ledger.place_best(existing, combined, mask_terms, code)
            if row >= 0:
                # The host was chosen for workload + replicas together; now the volumes own
                # their replicas' SSD (on this host too) and the workload only its request.
                extra = np.zeros(len(table.dimensions), dtype=np.int64)
                extra[ssd] = sum(v.size_gib for v in new)
                self._ledger.give_to_volumes(existing.id, workload, extra)
                hosts = {}
                for v in new:
                    self.commit(v, self.choose_rows(v, first_row=row))
                    hosts[v.id] = self.host_ids(v.id)
                return Placement(workload.id, table.row_hosts[row].id, volumes=hosts)
        expl = explain_request(table, existing, combined, terms)
        raise Unschedulable(workload.id, replace(
            expl, note="no host takes the workload plus one replica of each new volume with the other replicas "
                       "fitting on distinct domains"))
