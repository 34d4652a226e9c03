"""The placement ledger: the one path that commits and releases named workloads.

Every feature that puts a named workload on a host (place, place_batch, bind,
restore, preemption, per-host service replicas, workloads that create volumes)
commits here, and every release comes back here, so the core's used/free/load
rows, the constraint counters (`ConstraintIndex.record`), the per-host workload
counts and the records never disagree. Volume replicas charge their SSD through
here too. Array workloads (anonymous numbered rows, `_arrays.ArrayRows`) have no
record and are committed by the core's row loops there.

It sits between the host table (which it charges, never resizes) and the parts
that decide where things go (batch, preemption, services, volumes), which
decide and then call one of the commit methods below.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

import sched_core

from ..constraints import CompiledTerms
from ..model import Workload
from ._hosts import HostTable


@dataclass(slots=True)
class Record:
    """A placed named workload (or one replica of a per-host service): what it costs its
    host, and the terms it was counted under (released with the same terms). Slots: a
    restart makes one per live placement (200,000 and more)."""

    workload: Workload
    row: int
    charge: np.ndarray
    numa: int  # the NUMA node the core charged (a NUMA-fit VM), else -1
    terms: CompiledTerms


class RestoredRecord(Record):
    """A record `Cluster.restore_many` built: its workload (a template under its id) and
    its charge (a row of the restored block) are made on first use, from `_lazy`. A
    restart restores every live placement and reads few records before they are
    released; making both up front was the larger part of restoring 200,000 placements
    (bench/README.md, "Restart"). Once made they are ordinary attributes.
    """

    __slots__ = ("_lazy",)  # (template attributes, workload id, charge block, row in it)

    def __getattr__(self, name):
        # Called only when a slot is unset: `workload` and `charge` until first use.
        if name != "workload" and name != "charge":
            raise AttributeError(name)
        shape, wid, block, i = self._lazy
        w = object.__new__(Workload)  # the template, validated once as the template, under its id
        fields = shape.copy()
        fields["id"] = wid
        object.__setattr__(w, "__dict__", fields)
        self.workload = w
        self.charge = block[i]
        return w if name == "workload" else self.charge


class Ledger:
    """Records of placed named workloads, and the commit/release methods that keep them.

    Attributes
    ----------
    records : dict str -> Record
        named workloads by id, in placement order.
    replicas : dict str -> dict int -> Record
        per-host service id -> host row -> its replica there (the record's workload is
        the service itself: nothing is keyed by a composed id).
    counts : list of int (n_rows_allocated,)
        named workloads and replicas per host row, kept on every commit and release
        (a list: one increment per `place` costs less than on a numpy array).
    """

    def __init__(self, hosts: HostTable):
        self._hosts = hosts
        self._cons = hosts.cons
        self._n_dims = len(hosts.dimensions)
        self.records: dict[str, Record] = {}
        self.replicas: dict[str, dict[int, Record]] = {}
        self.counts = [0] * hosts.state.n_rows

    def fit_rows(self) -> None:
        """Follow the host table after it grew."""
        self.counts.extend([0] * (self._hosts.state.n_rows - len(self.counts)))

    # ------------------------------------------------------------------ commit

    def place_best(self, workload: Workload, request: np.ndarray, terms: CompiledTerms, code: int) -> int:
        """Select and commit one workload in the core (filter, score, select, commit);
        returns its row, or -1 with nothing changed."""
        cons = self._cons
        charge = np.empty(self._n_dims, dtype=np.int64)
        row, numa = sched_core.place_single(self._hosts.state, cons.state, terms.core, request, code, charge)
        if row >= 0:
            self._hosts.version += 1
            cons.record(terms, (row,), +1)
            self.counts[row] += 1
            self.records[workload.id] = Record(workload, row, charge, numa, terms)
        return row

    def place_run(self, workloads, requests: np.ndarray, terms: CompiledTerms, run: list[int], code: int,
                  placements: dict[str, str], placed_ids: list[str]) -> list[int]:
        """Select and commit workloads[run], in that order, that share `terms`, in one call
        of the core; adds each placed one to `placements` (id -> host id) and `placed_ids`.
        Returns the indices in `run` that did not fit."""
        hosts = self._hosts
        hosts.version += 1
        order = np.asarray(run, dtype=np.intp)
        n = len(workloads)
        host_out = np.full(n, -1, dtype=np.int64)
        charge = np.zeros((n, self._n_dims), dtype=np.int64)
        numa = np.full(n, -1, dtype=np.int64)
        sched_core.place_rows_constrained(hosts.state, hosts.cons.state, terms.core, requests, order, code,
                                          host_out, charge, numa)
        placed_rows = host_out[order]
        placed_rows = placed_rows[placed_rows >= 0]
        hosts.cons.record(terms, placed_rows, +1)
        counts = self.counts
        per_row = np.bincount(placed_rows)
        for r in np.flatnonzero(per_row).tolist():
            counts[r] += int(per_row[r])
        records, row_hosts = self.records, hosts.row_hosts
        host_of, numa_of = host_out.tolist(), numa.tolist()  # Python ints once, not a numpy scalar per row
        missed = []
        for i in run:
            w = workloads[i]
            h = host_of[i]
            if h >= 0:
                records[w.id] = Record(w, h, charge[i], numa_of[i], terms)
                placements[w.id] = row_hosts[h].id
                placed_ids.append(w.id)
            else:
                missed.append(i)
        return missed

    def place_at(self, workload: Workload, request: np.ndarray, terms: CompiledTerms, row: int, *,
                 counters: bool = True, tenancy: bool = True, service: str | None = None,
                 check_terms: CompiledTerms | None = None, numa: int = -1) -> int:
        """Check `row` for one workload (counters=False: skip affinity, anti-affinity and
        spread, for replayed decisions; with tenancy=False tenant isolation too) and commit
        it there if it passes. With `service`, the workload is that per-host service and
        the record is its replica on `row`. `check_terms` (default `terms`) are the terms
        checked, when they differ from those recorded (a replay checks no node selector).
        `numa` >= 0 is the NUMA node decided earlier for a NUMA-fit workload (a replay):
        it is charged there, not chosen again. Returns the core's reason code: 0
        committed, else nothing changed (REASON_NUMA when that node lacks room)."""
        hosts = self._hosts
        charge = np.zeros(self._n_dims, dtype=np.int64)
        code = sched_core.check_host(hosts.state, hosts.cons.state, (check_terms or terms).core, request, row,
                                     charge, counters, tenancy)
        if code == 0 and not self._commit_host(Record(workload, row, charge, numa, terms), service):
            code = sched_core.REASON_NUMA
        return code

    def recommit(self, rec: Record, terms: CompiledTerms) -> None:
        """Put a released record back as it was (its host was checked when it was placed),
        under `terms` compiled for the current host layout."""
        self._put_back(replace(rec, terms=terms))

    def _put_back(self, rec: Record) -> None:
        """Commit a record where it held before (its NUMA node included): it fits, since
        what it made room for was released first."""
        if not self._commit_host(rec, None):
            raise RuntimeError(f"workload {rec.workload.id}: its NUMA node {rec.numa} lacks room to put it back")

    def _commit_host(self, rec: Record, service: str | None) -> bool:
        if not self._charge(rec):
            return False
        if service is None:
            self.records[rec.workload.id] = rec
        else:
            self.replicas.setdefault(service, {})[rec.row] = rec
        return True

    def _charge(self, rec: Record) -> bool:
        """Charge a checked record to its host in the core, the counters and the counts.
        A record that names its NUMA node (rec.numa >= 0: replayed, or put back as it was)
        is charged on that node; else the core chooses one and the record keeps it. False,
        with nothing changed, when the named node lacks room."""
        hosts = self._hosts
        node = int(sched_core.commit_host(hosts.state, hosts.cons.state, rec.terms.core, rec.row, rec.charge,
                                          rec.numa))
        if node == -2:
            return False
        hosts.version += 1
        rec.numa = node
        hosts.cons.record(rec.terms, (rec.row,), +1)
        self.counts[rec.row] += 1
        return True

    # ------------------------------------------------------------------ moves

    def move_in(self, workload_id: str, request: np.ndarray, terms: CompiledTerms,
                row: int) -> tuple[int, Record | None]:
        """First half of a move: check `row` for a copy of a placed workload with every
        constraint (the workload still counts where it is, so it is counted on both hosts)
        and charge the copy there under `terms` (the workload's, compiled for the current
        host layout). Returns (reason code, the copy's record): code 0 and the
        copy, which `move_out` or `move_abort` must follow; else (code, None), nothing changed."""
        rec = self.records[workload_id]
        hosts = self._hosts
        charge = np.zeros(self._n_dims, dtype=np.int64)
        code = sched_core.check_host(hosts.state, hosts.cons.state, terms.core, request, row, charge, True, True)
        if code != 0:
            return code, None
        copy = Record(rec.workload, row, charge, -1, terms)
        self._charge(copy)
        return 0, copy

    def move_out(self, copy: Record) -> Record:
        """Second half of a move: release the workload where it was and record the copy;
        returns the released record (`move_back` undoes the move with it)."""
        old = self.records[copy.workload.id]
        self._uncommit(old)
        self.records[copy.workload.id] = copy
        return old

    def move_abort(self, copy: Record) -> None:
        """Release a copy charged by `move_in` whose move will not happen."""
        self._uncommit(copy)

    def move_back(self, old: Record, terms: CompiledTerms) -> None:
        """Undo a finished move: release the workload where it went and put `old` back
        as it was (it held there before the move), under `terms` for the current layout."""
        self._uncommit(self.records[old.workload.id])
        self._put_back(replace(old, terms=terms))

    def give_to_volumes(self, workload_id: str, workload: Workload, extra: np.ndarray) -> Record:
        """A workload placed with room for replicas of the volumes it creates: hand `extra`
        (their SSD on its host) over to the volumes, which charge it through
        `commit_volume`, and record the workload under its full spec."""
        rec = self.records.pop(workload_id)
        self._hosts.version += 1
        self._hosts.state.adjust_row(rec.row, -extra)
        rec = replace(rec, workload=workload, charge=rec.charge - extra)
        self.records[workload.id] = rec
        return rec

    def commit_volume(self, rows: list[int], charge: np.ndarray) -> None:
        """Charge one volume replica per row (SSD only; no workload record or count)."""
        self._hosts.version += 1
        state = self._hosts.state
        for r in rows:
            state.commit_row(r, charge)
        self._cons.count_volume_replicas(rows, +1)

    def release_volume(self, rows: list[int], charge: np.ndarray) -> None:
        self._hosts.version += 1
        state = self._hosts.state
        for r in rows:
            state.release_row(r, charge)
        self._cons.count_volume_replicas(rows, -1)

    # ------------------------------------------------------------------ release

    def release(self, workload_id: str) -> Record:
        """Release a named workload (KeyError if it is not placed); returns its record."""
        rec = self.records.pop(workload_id)
        self._uncommit(rec)
        return rec

    def release_replica(self, service_id: str, row: int) -> Record:
        reps = self.replicas[service_id]
        rec = reps.pop(row)
        if not reps:
            del self.replicas[service_id]
        self._uncommit(rec)
        return rec

    def _uncommit(self, rec: Record) -> None:
        hosts = self._hosts
        hosts.version += 1
        sched_core.release_constrained(hosts.state, hosts.cons.state, rec.terms.core, rec.row, rec.charge, rec.numa)
        hosts.cons.record(rec.terms, (rec.row,), -1)
        self.counts[rec.row] -= 1
