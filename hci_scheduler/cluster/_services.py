"""Per-host services: registration, and which hosts get a replica.

A per-host service (`Workload.per_host`) runs one replica on every host that
matches its selector and tolerations, including hosts added later. This part
decides where replicas go (every live host on `place`, the new ones on
`add_hosts`, recorded ones on `bind_replicas`) and commits each through the
ledger, which keeps them per service as host row -> record, so no id is ever
parsed. "service@host" ids exist only as output, built by `replica_id`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

import sched_core

from ..errors import DuplicateId, Unschedulable, ValidationError
from ..model import Placement, Workload
from ._compile import Compiler
from ._explanations import explain_request
from ._hosts import HostTable
from ._ledger import Ledger


def replica_id(service_id: str, host_id: str) -> str:
    """How a replica is named in assignments and errors: "service@host"."""
    return f"{service_id}@{host_id}"


def check_service(workload: Workload) -> None:
    if workload.volumes or workload.gang:
        raise ValidationError(f"workload {workload.id}: per-host services take no volumes and no gang")


class Services:
    """Registered per-host services by id (`daemons`, in registration order)."""

    def __init__(self, hosts: HostTable, ledger: Ledger, compiler: Compiler):
        self._hosts = hosts
        self._ledger = ledger
        self._compiler = compiler
        self.daemons: dict[str, Workload] = {}

    def replica_rows(self, service_id: str) -> list[int]:
        """Rows running a replica of the service, in the order they were placed."""
        return list(self._ledger.replicas.get(service_id, ()))

    def replica_hosts(self, service_id: str) -> tuple[str, ...]:
        row_hosts = self._hosts.row_hosts
        return tuple(row_hosts[r].id for r in self._ledger.replicas.get(service_id, ()))

    def place(self, workload: Workload, request: np.ndarray) -> Placement:
        """Register a checked new service and put a replica on every live host that takes it."""
        check_service(workload)
        self._compiler.terms(workload)  # validates the constraints before anything is placed
        self.daemons[workload.id] = workload
        placed, missed = self.place_on(workload, self._hosts.live_rows(), request)
        note = ""
        if missed:
            note = "no room on " + ", ".join(missed[:10]) + (" ..." if len(missed) > 10 else "")
        return Placement(workload.id, None, replicas=tuple(placed), explanation=note or None)

    def place_on(self, daemon: Workload, rows: Sequence[int], request: np.ndarray | None = None
                 ) -> tuple[list[str], list[str]]:
        """One replica on each row that matches the service's selector and tolerations;
        returns the hosts that got one and those that match but lack room."""
        if request is None:
            request = self._compiler.request(daemon)
        row_hosts = self._hosts.row_hosts
        placed, missed = [], []
        for row in rows:
            code = self._ledger.place_at(daemon, request, self._compiler.terms(daemon), row, service=daemon.id)
            if code == 0:
                placed.append(row_hosts[row].id)
            elif sched_core.REASON_DIM <= code < sched_core.REASON_AFFINITY:
                missed.append(row_hosts[row].id)
        return placed, missed

    def bind(self, workload: Workload, host_ids: Sequence[str], request: np.ndarray) -> Placement:
        """Register the service (unless it is) and put one replica on each named host,
        each checked as `bind(restore=True)` checks; all or nothing. `request` is checked already."""
        table, ledger = self._hosts, self._ledger
        known = workload.id in self.daemons
        if not known:
            check_service(workload)
        rows = [table.row(h) for h in host_ids]
        had = set(ledger.replicas.get(workload.id, ()))
        done: list[int] = []
        for row in rows:
            terms = self._compiler.terms(workload)
            if row in had or row in done:
                code = -1
            else:
                code = ledger.place_at(workload, request, terms, row, service=workload.id,
                                       check_terms=self._compiler.replayed(workload, terms))
            if code != 0:
                for r in reversed(done):
                    ledger.release_replica(workload.id, r)
                rid = replica_id(workload.id, table.row_hosts[row].id)
                if code < 0:
                    raise DuplicateId(f"workload id {rid!r} is already placed")
                expl = explain_request(table, replace(workload, id=rid), request, terms, only_row=row)
                raise Unschedulable(rid, expl)
            done.append(row)
        if not known:
            self.daemons[workload.id] = workload
        return Placement(workload.id, None, replicas=tuple(host_ids))

    def release(self, service_id: str) -> Placement:
        """Unregister a service and release every replica; returns where they ran."""
        hosts = self.replica_hosts(service_id)
        for row in self.replica_rows(service_id):
            self._ledger.release_replica(service_id, row)
        del self.daemons[service_id]
        return Placement(service_id, None, replicas=hosts)

    def host_leaving(self, row: int) -> list[str]:
        """Release the replicas on `row` (its host is being removed); returns their services."""
        gone = [sid for sid, reps in self._ledger.replicas.items() if row in reps]
        for sid in gone:
            self._ledger.release_replica(sid, row)
        return gone

    def replicas_on(self, row: int) -> int:
        return sum(1 for reps in self._ledger.replicas.values() if row in reps)

    def assignments(self) -> dict[str, str]:
        """"service@host" -> host for every replica."""
        row_hosts = self._hosts.row_hosts
        return {replica_id(sid, row_hosts[r].id): row_hosts[r].id
                for sid, reps in self._ledger.replicas.items() for r in reps}
