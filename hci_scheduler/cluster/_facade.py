"""Cluster: the public API over the compiled core.

The Cluster compiles hosts and workloads into integer arrays once (on
registration), keeps ids <-> rows, validates every input before it touches
the state, and calls sched_core for filter -> score -> select -> commit:

  compile   Workload -> request vector + Terms (cached per spec)     cluster/_compile.py, constraints.py
  filter    hard constraints, cheapest first, per host               sched_core/_constraint.pyx
  score     strategy cost + soft-term penalties                      sched_core/_place.pyx
  select    lowest cost, then key order, then lowest host row        sched_core/_place.pyx
  commit    used/free/load, group and tenant counters, records      cluster/_ledger.py -> sched_core/_state.pyx

The Cluster itself only validates, takes the lock and delegates to parts with one
job each:

  _hosts.HostTable      rows <-> host ids, capacity/allocatable/limit arrays, schedulable state
  _ledger.Ledger        the one commit and release path of named workloads, per-service
                        replicas and volume charges; records and per-host counts
  _arrays.ArrayRows     anonymous array rows (place_array), committed by the core's row loops
  _volumes.Volumes      volume replicas and workloads that create volumes
  _services.Services    per-host services: registration and where replicas go
  _preempt              which victims to evict
  _batch.BatchPlacer    batch order, runs of one spec, gangs
  _explanations         the core's reason codes -> explain.Explanation

Any call that raises leaves the state exactly as it was.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Mapping, Sequence

import numpy as np

import sched_core

from .. import explain as _explain
from ..errors import DuplicateId, NotFound, SchedulerError, StateConflict, Unschedulable, ValidationError
from ..model import DEFAULT_DIMENSIONS, AddedHosts, BatchResult, Host, Placement, Volume, Workload
from ..policy import Policy, check_order, strategy_code
from ._arrays import ArrayRows
from ._batch import BatchPlacer, batch_order
from ._compile import MAX_QUANTITY, Compiler, as_request_matrix
from ._explanations import explain_request
from ._hosts import HostTable
from ._ledger import Ledger
from ._preempt import preempt as _preempt
from ._services import Services, check_service
from ._view import PlacementView
from ._volumes import Volumes, creates_volumes, mounted_only

__all__ = ["Cluster", "MAX_QUANTITY"]

log = logging.getLogger("hci_scheduler.cluster")


class Cluster:
    """A set of hosts and the workloads placed on them.

    Parameters
    ----------
    dimensions : sequence of str
        Resource dimensions, fixed for the cluster's life. Default: cpu
        (millicores), memory (MiB), ssd (GiB), net (Mbit/s), gpu (count).
        Add e.g. "hugepages" for VMs that ask for them.
    policy : Policy, optional
        Per-dimension weights of the scores.
    """

    def __init__(self, dimensions: Sequence[str] = DEFAULT_DIMENSIONS, policy: Policy | None = None):
        dims = tuple(dimensions)
        if not dims or not all(isinstance(d, str) and d for d in dims):
            raise ValidationError(f"dimensions must be non-empty strings, got {dimensions!r}")
        if len(set(dims)) != len(dims):
            raise ValidationError(f"dimensions must be unique, got {dims}")
        self.dimensions: tuple[str, ...] = dims
        self.policy = policy or Policy()
        self._lock = threading.RLock()
        self._hosts = HostTable(dims, self.policy.weight_vector(dims))
        self._ledger = Ledger(self._hosts)
        self._volumes = Volumes(self._hosts, self._ledger)
        self._compiler = Compiler(self._hosts, self._volumes.rows_of)
        self._services = Services(self._hosts, self._ledger, self._compiler)
        self._arrays = ArrayRows(self._hosts)
        self._batch = BatchPlacer(self._hosts, self._ledger, self._compiler, self._place_checked)
        self._applying: tuple | None = None   # (plan, step, version after it) of the last apply_step

    # The core's state and the constraint index, for tests and benchmarks that check the
    # core directly (the host table replaces the state when it grows).
    @property
    def _state(self):
        return self._hosts.state

    @property
    def _cons(self):
        return self._hosts.cons

    @property
    def _arr_n(self) -> int:
        return self._arrays.n

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_arrays(cls, capacity, dimensions: Sequence[str] | None = None,
                    host_ids: Sequence[str] | None = None, policy: Policy | None = None) -> "Cluster":
        """A cluster of `n_hosts` hosts from a capacity matrix.

        Parameters
        ----------
        capacity : int ndarray (n_hosts, n_dims)
        dimensions : sequence of str, optional
            Names of the columns; default the standard five when n_dims is 5,
            else "d0", "d1", ...
        host_ids : sequence of str, optional
            Default "h0", "h1", ...
        """
        if not isinstance(capacity, np.ndarray):
            raise ValidationError(f"capacity must be a numpy ndarray, got {type(capacity).__name__}")
        if capacity.ndim != 2 or capacity.shape[1] == 0:
            raise ValidationError(f"capacity must have shape (n_hosts, n_dims), got {capacity.shape}")
        n_hosts, n_dims = capacity.shape
        if dimensions is None:
            dimensions = DEFAULT_DIMENSIONS if n_dims == len(DEFAULT_DIMENSIONS) else [f"d{i}" for i in range(n_dims)]
        if len(dimensions) != n_dims:
            raise ValidationError(f"dimensions has {len(dimensions)} names for {n_dims} capacity columns")
        cap = as_request_matrix(capacity, n_dims, "capacity")
        if host_ids is None:
            host_ids = [f"h{i}" for i in range(n_hosts)]
        host_ids = list(host_ids)
        if len(host_ids) != n_hosts:
            raise ValidationError(f"host_ids has {len(host_ids)} ids for {n_hosts} hosts")
        c = cls(dimensions, policy=policy)
        dims = c.dimensions
        c.add_hosts([Host(hid, dict(zip(dims, map(int, row)))) for hid, row in zip(host_ids, cap)])
        return c

    # ------------------------------------------------------------------ hosts

    def add_host(self, host: Host) -> int:
        """Register one host; returns its row index."""
        return self.add_hosts([host])[0]

    def add_hosts(self, hosts: Iterable[Host],
                  replicas: Mapping[str, Sequence[str]] | None = None) -> AddedHosts:
        """Register hosts, all or nothing; returns their row indices (an `AddedHosts`
        list whose `replicas` maps host id -> the per-host services started there).

        Per-host services already registered get a replica on every new host
        that matches them, before the host takes any other work. `replicas`
        (a store replaying its log) names exactly which services get one where,
        each checked as `bind` checks.

        A host that would bring a dimension's total over all hosts past 2**63 - 1
        is refused (ValidationError), so every cluster total is exact in int64.
        """
        hosts = list(hosts)
        with self._lock:
            daemons = self._services.daemons
            if replicas is not None:
                new_ids = {h.id for h in hosts if isinstance(h, Host)}
                for hid, services in replicas.items():
                    if hid not in new_ids:
                        raise ValidationError(f"replicas: host {hid!r} is not among the hosts added")
                    for sid in services:
                        if sid not in daemons:
                            raise NotFound(f"replicas: {sid!r} is not a registered per-host service")
            compiled = self._hosts.check_new(hosts)
            rows = self._hosts.add(hosts, compiled)
            self._ledger.fit_rows()
            started: dict[str, list[str]] = {}
            if replicas is None:
                for daemon in daemons.values():
                    for hid in self._services.place_on(daemon, rows)[0]:
                        started.setdefault(hid, []).append(daemon.id)
            else:
                for hid, services in replicas.items():
                    for sid in services:
                        self.bind_replicas(daemons[sid], [hid])
                    if services:
                        started[hid] = list(services)
            return AddedHosts(rows, started)

    def remove_host(self, host_id: str) -> list[str]:
        """Forget a host. Refused (StateConflict) while workloads or volume replicas remain on it.
        Returns the per-host services whose replica went with it."""
        with self._lock:
            row = self._hosts.row(host_id)
            # Per-host services follow their host out.
            load = int(self._hosts.state.load_array[row]) - self._services.replicas_on(row)
            if load:
                raise StateConflict(f"host {host_id!r} still runs {load} workloads or volume replicas; "
                                    f"release or drain them first")
            gone = self._services.host_leaving(row)
            self._hosts.remove(row)
            return gone

    def set_host_state(self, host_id: str, state: str) -> None:
        """ready takes new work; cordoned, draining and down take nothing new."""
        self.update_host(host_id, state=state)

    def cordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "cordoned")

    def uncordon(self, host_id: str) -> None:
        self.set_host_state(host_id, "ready")

    def update_host(self, host_id: str, labels=None, taints=None, state: str | None = None) -> Host:
        """Replace a host's labels, taints and/or state; returns the host as it now is.
        Placed workloads stay where they are; counters per topology domain follow the
        new labels. All checked before anything changes."""
        with self._lock:
            return self._hosts.update(self._hosts.row(host_id), labels, taints, state)

    def host(self, host_id: str) -> Host:
        return self._hosts.row_hosts[self._hosts.row(host_id)]

    def hosts(self) -> list[Host]:
        return [h for h in self._hosts.row_hosts if h is not None]

    def host_ids(self) -> list[str | None]:
        """Host id per row (None for free rows), in row order."""
        return self._hosts.ids()

    def host_index(self, host_id: str) -> int:
        return self._hosts.row(host_id)

    def host_id(self, row: int) -> str:
        table = self._hosts
        if not 0 <= row < table.n_rows or table.row_hosts[row] is None:
            raise NotFound(f"no host at row {row}")
        return table.row_hosts[row].id

    @property
    def n_hosts(self) -> int:
        return len(self._hosts.host_rows)

    # ------------------------------------------------------------------ named workloads

    def _check_new(self, workload: Workload) -> None:
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        if workload.id in self._ledger.records or workload.id in self._services.daemons:
            raise DuplicateId(f"workload id {workload.id!r} is already placed")

    def _check_new_workload(self, workload: Workload) -> np.ndarray:
        self._check_new(workload)
        return self._compiler.request(workload)

    def place(self, workload: Workload, strategy: str = "binpack", preempt: bool = False) -> Placement:
        """Place one workload; raises Unschedulable (with the explanation) when nothing fits.

        With preempt=True a workload that fits nowhere may evict lower-priority
        workloads from one host (fewest victims, then lowest priority); the
        Placement lists them in `evicted` so the caller can reschedule them.
        Per-host services (per_host=True) get a replica on every matching host.
        """
        code = strategy_code(strategy)
        with self._lock:
            self._check_new(workload)
            # request_values directly: the single-placement path is hot, one call layer less.
            request = np.array(self._compiler.request_values(workload), dtype=np.int64)
            return self._place_checked(workload, request, code, preempt)

    def _place_checked(self, workload: Workload, request: np.ndarray, code: int, preempt: bool) -> Placement:
        """Place one checked workload (the path `place` and a batch's special members take)."""
        if workload.per_host:
            return self._services.place(workload, request)
        if creates_volumes(workload):
            return self._volumes.place_with_new(workload, request, code, self._compiler)
        terms = self._compiler.terms(workload)
        row = self._ledger.place_best(workload, request, terms, code)
        if row >= 0:
            return Placement(workload.id, self._hosts.row_hosts[row].id,
                             numa_node=self._ledger.records[workload.id].numa)
        if preempt:
            placement = _preempt(self._hosts, self._ledger, self._compiler, workload, request, terms)
            if placement is not None:
                return placement
        raise Unschedulable(workload.id, explain_request(self._hosts, workload, request, terms))

    def _check_special(self, workloads: Sequence[Workload]) -> None:
        """What `place` would refuse of per-host services and workloads creating volumes,
        refused before a batch places anything."""
        new_volumes: set[str] = set()
        for w in workloads:
            if w.per_host:
                check_service(w)
                self._compiler.terms(w)
                continue
            if w.gang:
                # Rolling a gang back releases its members' records, not the volumes a
                # member created with it.
                raise ValidationError(f"workload {w.id}: a workload that creates volumes cannot be a gang member")
            self._volumes.check_new(w, new_volumes)
            self._compiler.terms(mounted_only(w))

    def place_batch(self, workloads: Iterable[Workload], strategy: str = "binpack",
                    order: str = "largest_first", gang: bool = False, preempt: bool = False) -> BatchResult:
        """Place many workloads in one pass.

        order="largest_first" places by dominant share, largest first (denser);
        "arrival" keeps the given order. gang=True makes the whole batch one
        gang; workloads with the same `gang` id form a gang too. A gang is
        placed whole or not at all (its members are then listed as unplaced).
        preempt=True places each workload as `place(..., preempt=True)` does, in
        the batch's order (not with gangs). Per-host services and workloads
        that create volumes may not be gang members.

        Every workload is checked before anything is placed, so a call that
        raises changes nothing. `result.placements` lists the placements in the
        order they were committed; `result.details` holds the full Placement of
        those that evicted workloads, started per-host replicas or created volumes.
        """
        code = strategy_code(strategy)
        check_order(order)
        workloads = list(workloads)
        if preempt and (gang or any(w.gang for w in workloads if isinstance(w, Workload))):
            raise ValidationError("gang and preempt cannot be combined")
        with self._lock:
            values = []
            seen = set()
            request_values = self._compiler.request_values
            for w in workloads:
                self._check_new(w)
                values.append(request_values(w))
                if w.id in seen:
                    raise DuplicateId(f"workload id {w.id!r} appears twice in the batch")
                seen.add(w.id)
            requests = np.array(values, dtype=np.int64).reshape(len(workloads), len(self.dimensions))
            special = [w.per_host or creates_volumes(w) for w in workloads]
            if gang and any(special):
                raise ValidationError("a gang may not hold per-host services or workloads that create volumes")
            # Compile every spec before placing anything, so a bad constraint changes nothing.
            terms = [None if sp else self._compiler.terms(w) for w, sp in zip(workloads, special)]
            self._check_special([w for w, sp in zip(workloads, special) if sp])
            rows = batch_order(self._hosts, requests, order)
            return self._batch.place(workloads, requests, terms, rows, code, gang, preempt)

    def bind(self, workload: Workload, host_id: str, *, restore: bool = False, numa_node: int = -1) -> Placement:
        """Place a workload on a named host, after checking every constraint there.

        For callers that decided the host themselves (a store rebuilding its
        state, an operator pinning a workload). Raises Unschedulable when the
        host is not schedulable, lacks room or breaks a hard constraint.

        restore=True is for a placement decided earlier and replayed from a log:
        hard affinity, anti-affinity and spread are not checked again, because
        they held against the workloads present when it was decided, and some
        may be gone by the time it is replayed (a gang member rolled back in the
        same batch, for one); nor is the node selector, which held against the
        host's labels then (a host relabelled since keeps what it runs). Room,
        taints, volume locality and NUMA are still checked, so a restore never
        overcommits a host. Tenancy is checked
        too, but a restored placement that breaks only tenant isolation is kept
        with a warning: it was acknowledged (logs written before tenant-less work
        counted against a dedicated tenant hold such pairs), and refusing it would
        stop the replay. Placements made after it follow the rule.

        numa_node >= 0 (a NUMA-fit VM's node recorded when it was decided) charges that
        node of the host instead of choosing one (with a warning, another node when it
        lacks room: only a log that recorded no node for earlier VMs can cause that).
        """
        with self._lock:
            request = self._check_new_workload(workload)
            if workload.per_host:
                raise ValidationError(f"workload {workload.id}: per-host services cannot be bound to one host")
            row = self._hosts.row(host_id)
            terms = self._compiler.terms(workload)
            checked = self._compiler.replayed(workload, terms) if restore else terms
            tenancy = True
            code = self._ledger.place_at(workload, request, terms, row, counters=not restore, check_terms=checked,
                                         numa=numa_node)
            if code == sched_core.REASON_TENANT and restore:
                tenancy = False
                code = self._ledger.place_at(workload, request, terms, row, counters=False, tenancy=False,
                                             check_terms=checked, numa=numa_node)
                if code == 0:
                    log.warning("restored workload %s on host %s breaks tenant isolation (%s); kept, as it "
                                "was acknowledged", workload.id, host_id, terms.labels[sched_core.REASON_TENANT])
            if code == sched_core.REASON_NUMA and numa_node >= 0:
                # Only a log that mixes nodes chosen again (written before they were recorded)
                # can get here: the node is chosen again, as that log's placements were.
                log.warning("restored workload %s: NUMA node %d of host %s lacks room; another node is "
                            "chosen", workload.id, numa_node, host_id)
                code = self._ledger.place_at(workload, request, terms, row, counters=not restore, tenancy=tenancy,
                                             check_terms=checked)
            if code != 0:
                raise Unschedulable(workload.id, explain_request(self._hosts, workload, request, terms, only_row=row))
            return Placement(workload.id, host_id, numa_node=self._ledger.records[workload.id].numa)

    def release(self, workload_id: str) -> Placement:
        """Remove a placed workload (or every replica of a per-host service) and give its
        resources back; returns where it was."""
        with self._lock:
            if workload_id in self._services.daemons:
                return self._services.release(workload_id)
            if workload_id not in self._ledger.records:
                raise NotFound(f"unknown workload id {workload_id!r}")
            rec = self._ledger.release(workload_id)
            return Placement(workload_id, self._hosts.row_hosts[rec.row].id)

    def restore(self, workload: Workload, placement: Placement) -> Placement:
        """Commit a placement decided earlier (a store replaying its log): the host, the
        per-host replicas, the new volumes' replica hosts or the NUMA node that
        `placement` records, each checked as `bind(restore=True)` checks. All or nothing."""
        with self._lock:
            if workload.per_host:
                return self.bind_replicas(workload, placement.replicas)
            created: list[str] = []
            try:
                for v in workload.volumes:
                    if isinstance(v, Volume):
                        if v.id not in placement.volumes:
                            raise ValidationError(f"workload {workload.id}: no replica hosts recorded for "
                                                  f"new volume {v.id!r}")
                        self.add_volume(v, hosts=placement.volumes[v.id])
                        created.append(v.id)
                p = self.bind(workload, placement.host_id, restore=True, numa_node=placement.numa_node)
            except SchedulerError:
                for vid in reversed(created):
                    self.remove_volume(vid)
                raise
            return Placement(p.workload_id, p.host_id, volumes={vid: placement.volumes[vid] for vid in created},
                             numa_node=p.numa_node)

    def restore_many(self, templates: Sequence[Workload], ids: Sequence[str], spec_of: Sequence[int],
                     host_ids: Sequence[str], numa_nodes: Mapping[int, int] | None = None) -> None:
        """Commit many plain placements decided earlier, in order (a snapshot being loaded):
        workload i is templates[spec_of[i]] under the id ids[i], on host host_ids[i]. Plain:
        no per-host service and no volume (`restore` takes those). `numa_nodes` maps i to
        the NUMA node recorded for a NUMA-fit VM: it is charged there, not chosen again.

        The state is the one `restore` called for each in turn gives, through the same
        ledger commit, but built in bulk: one compile per template, room checked for the
        whole set at once (nothing overcommits), and charges of workloads without group,
        tenant or NUMA terms committed in one core call. Labels, taints and state are not
        checked again: they held when the placement was decided, and a host relabelled
        or cordoned since keeps what it runs. All or nothing.
        """
        import sched_core

        from ._ledger import RestoredRecord

        with self._lock:
            table, ledger, n = self._hosts, self._ledger, len(ids)
            if len(spec_of) != n or len(host_ids) != n:
                raise ValidationError(f"restore_many: {n} ids, {len(spec_of)} spec_of, {len(host_ids)} host_ids")
            for t in templates:
                if not isinstance(t, Workload) or t.per_host or t.volumes:
                    raise ValidationError(f"restore_many takes plain workloads (no per-host service, no volume), "
                                          f"got {t!r}")
            if (len(set(ids)) != n or not self._ledger.records.keys().isdisjoint(ids)
                    or not self._services.daemons.keys().isdisjoint(ids)):
                raise DuplicateId("restore_many: a workload id repeats or is already placed")
            if n and (set(map(type, ids)) != {str} or "" in ids):
                raise ValidationError("restore_many: workload ids must be non-empty strings")
            try:
                rows = np.fromiter(map(table.host_rows.__getitem__, host_ids), dtype=np.int64, count=n)
            except KeyError as exc:
                raise NotFound(f"restore_many: host {exc.args[0]!r} is not registered") from None
            which = np.asarray(spec_of, dtype=np.intp)
            if n and (which.min() < 0 or which.max() >= len(templates)):
                raise ValidationError("restore_many: spec_of must index templates")
            compiled = [(self._compiler.request(t), self._compiler.terms(t)) for t in templates]
            requests = np.stack([r for r, _ in compiled]) if compiled else np.zeros((0, len(self.dimensions)))
            charge = np.ascontiguousarray(requests[which], dtype=np.int64)
            vm = np.array([t.kind == "vm" for t in templates], dtype=bool)[which]
            if vm.any():  # VMs pay request x allocation ratio, as the core charges them
                charge[vm] = (charge[vm] * table.ratio_milli[rows[vm]] + 999) // 1000
            need = np.zeros((table.n_rows, len(self.dimensions)), dtype=np.int64)
            np.add.at(need, rows, charge)
            short = np.flatnonzero((need > table.state.free_array[: table.n_rows]).any(axis=1))
            if len(short):
                raise StateConflict(f"restore_many: host {table.row_hosts[short[0]].id!r} lacks room for "
                                    f"the workloads restored there")
            # The ledger's commit (Ledger._commit_host) in bulk: workloads without group, tenant
            # or NUMA terms are charged in one core call (the core counts nothing else for
            # them), the others one by one; ConstraintIndex.record once per spec.
            bulk_spec = [not terms.groups and terms.tenant < 0 and not t.numa
                         for t, (_, terms) in zip(templates, compiled)]
            bulk = np.array(bulk_spec, dtype=bool)[which]
            table.version += 1
            sched_core.commit_rows(table.state, charge, np.where(bulk, rows, -1))
            per_row = np.bincount(rows, minlength=table.n_rows)
            counts = ledger.counts
            for r in np.flatnonzero(per_row).tolist():
                counts[r] += int(per_row[r])
            per_spec = [(t.__dict__, terms, plain) for t, (_, terms), plain in zip(templates, compiled, bulk_spec)]
            # Records whose workload and charge row are made on first use (RestoredRecord).
            records, new = ledger.records, object.__new__
            commit_host, host_state, cons = sched_core.commit_host, table.state, table.cons
            numa_of = numa_nodes or {}
            for i, (wid, k, row) in enumerate(zip(ids, which.tolist(), rows.tolist())):
                shape, terms, plain = per_spec[k]
                rec = new(RestoredRecord)
                rec.row, rec.terms, rec._lazy = row, terms, (shape, wid, charge, i)
                rec.numa = -1 if plain else _commit_restored(commit_host, host_state, cons.state, terms.core, row,
                                                             charge[i], numa_of.get(i, -1), wid)
                records[wid] = rec
            for k, (_, terms) in enumerate(compiled):
                if not bulk_spec[k]:
                    cons.record(terms, rows[which == k], +1)

    def bind_replicas(self, workload: Workload, host_ids: Sequence[str]) -> Placement:
        """Register a per-host service (unless it is registered) and put one replica on
        each named host, checking each like `bind(restore=True)`; all or nothing.

        For a store rebuilding its state: `place` and `add_hosts` choose the
        hosts themselves, this repeats a recorded choice exactly.
        """
        with self._lock:
            if not isinstance(workload, Workload) or not workload.per_host:
                raise ValidationError(f"bind_replicas expects a per-host service, got {workload!r}")
            if workload.id in self._services.daemons:
                request = self._compiler.request(workload)
            else:
                request = self._check_new_workload(workload)
            return self._services.bind(workload, host_ids, request)

    # ------------------------------------------------------------------ read-outs of named workloads

    def placements(self, host_id: str | None = None) -> list[Placement]:
        """Every placed named workload (a per-host service once, with its replica hosts;
        a workload that created volumes with their replica hosts), in placement order;
        with host_id, those that run there."""
        with self._lock:
            row = None if host_id is None else self._hosts.row(host_id)
            out = [self._placement_of(rec) for rec in self._ledger.records.values()
                   if row is None or rec.row == row]
            for sid in self._services.daemons:
                if row is None or row in self._ledger.replicas.get(sid, ()):
                    out.append(self._placement_of_service(sid))
            return out

    def placement(self, workload_id: str) -> Placement:
        """Where one placed named workload is, as `placements` lists it."""
        with self._lock:
            if workload_id in self._services.daemons:
                return self._placement_of_service(workload_id)
            rec = self._ledger.records.get(workload_id)
            if rec is None:
                raise NotFound(f"unknown workload id {workload_id!r}")
            return self._placement_of(rec)

    def _placement_of(self, rec) -> Placement:
        w = rec.workload
        host_id = self._hosts.row_hosts[rec.row].id
        if w.volumes and creates_volumes(w):
            records = self._volumes.records
            return Placement(w.id, host_id, volumes={v.id: self._volumes.host_ids(v.id) for v in w.volumes
                                                     if isinstance(v, Volume) and v.id in records},
                             numa_node=rec.numa)
        return Placement(w.id, host_id, numa_node=rec.numa)

    def _placement_of_service(self, service_id: str) -> Placement:
        return Placement(service_id, None, replicas=self._services.replica_hosts(service_id))

    def numa_nodes(self) -> dict[str, int]:
        """workload id -> the NUMA node its host is charged on, for every placed NUMA-fit VM
        (what a snapshot records beside `assignments`)."""
        return self.placement_view().numa_nodes()

    def placement_view(self) -> PlacementView:
        """A consistent copy of where every named workload runs, cheap to take under a
        caller's lock (a snapshot's); its maps are built later, outside it."""
        with self._lock:
            return PlacementView(self._ledger.records, self._hosts.row_hosts, self._services.assignments())

    def workload_counts(self) -> dict[str, int]:
        """host id -> named workloads placed there (per-host replicas included), for hosts
        that run any."""
        with self._lock:
            hosts = self._hosts.row_hosts
            return {hosts[r].id: n for r, n in enumerate(self._ledger.counts[: self._hosts.n_rows]) if n}

    def workload(self, workload_id: str) -> Workload:
        if workload_id in self._services.daemons:
            return self._services.daemons[workload_id]
        try:
            return self._ledger.records[workload_id].workload
        except (KeyError, TypeError):
            raise NotFound(f"unknown workload id {workload_id!r}") from None

    def assignments(self) -> dict[str, str]:
        """workload id -> host id for every named workload (per-host service replicas as "id@host")."""
        return self.placement_view().assignments()

    def workloads_on(self, host_id: str) -> list[str]:
        """Named workloads on a host (per-host service replicas as "id@host")."""
        with self._lock:
            row = self._hosts.row(host_id)
            out = [wid for wid, rec in self._ledger.records.items() if rec.row == row]
            out += [wid for wid, hid in self._services.assignments().items() if hid == host_id]
            return out

    # ------------------------------------------------------------------ volumes

    def add_volume(self, volume: Volume, hosts: Sequence[str] | None = None) -> list[str]:
        """Place a volume's replicas on distinct hosts (or distinct values of the `spread`
        label) with free SSD; returns the replica hosts. Unschedulable when too few fit.

        hosts pins the replicas to named hosts (a store rebuilding its state, an operator
        restoring a volume); they are checked like chosen ones.
        """
        if not isinstance(volume, Volume):
            raise ValidationError(f"add_volume expects a Volume, got {type(volume).__name__}")
        with self._lock:
            return self._volumes.add(volume, None if hosts is None else list(hosts))

    def remove_volume(self, volume_id: str) -> None:
        """Delete a volume's replicas. Refused while a placed workload mounts it."""
        with self._lock:
            self._volumes.remove(volume_id)

    def volumes(self) -> dict[str, list[str]]:
        """volume id -> replica host ids."""
        with self._lock:
            return {vid: self._volumes.host_ids(vid) for vid in self._volumes.records}

    def volume(self, volume_id: str) -> Volume:
        try:
            return self._volumes.records[volume_id].volume
        except (KeyError, TypeError):
            raise NotFound(f"unknown volume id {volume_id!r}") from None

    # ------------------------------------------------------------------ explanations

    def explain(self, workload: Workload) -> "_explain.Explanation":
        """Why `workload` would or would not fit now; places nothing."""
        if not isinstance(workload, Workload):
            raise ValidationError(f"expected a Workload, got {type(workload).__name__}")
        with self._lock:
            request = self._compiler.request(workload)
            plain = mounted_only(workload)
            return explain_request(self._hosts, plain, request, self._compiler.terms(plain))

    # ------------------------------------------------------------------ rebalancing

    def rebalance(self, goal: str = "consolidate", *, hosts: Sequence[str] | None = None,
                  workload: Workload | None = None, targets: Mapping[str, float] | None = None,
                  max_moves: int | None = None, time_limit_s: float = 30.0, seed: int = 0,
                  cost=None, progress=None):
        """A move plan for a goal; changes nothing (commit it with `apply`).

        Parameters
        ----------
        goal : "consolidate" | "drain" | "defragment" | "balance"
            consolidate frees hosts (dear pools first); drain empties `hosts` (destinations
            chosen up front, or `RebalanceInfeasible` naming what fits nowhere); defragment
            makes room for `workload` on one host (``plan.search["room_on"]``); balance moves
            load off hosts above `targets` (dimension -> utilisation of the limit).
        max_moves : int, optional
            most workloads the plan may move.
        time_limit_s, seed : the search's budget and seed (same seed, same plan on an idle machine).
        cost : rebalance.CostModel, optional
            move, host, zone and group costs shared by all goals.
        progress : callable(fraction, best_objective), optional

        Returns
        -------
        rebalance.Plan
            ordered steps of moves, each step feasible with its moving workloads counted on
            both hosts; named cost terms before and after; hosts freed and a lower bound.

        Raises
        ------
        ValidationError, NotFound, RebalanceInfeasible
        """
        from ..rebalance.goals import rebalance
        return rebalance(self, goal, hosts=hosts, workload=workload, targets=targets, max_moves=max_moves,
                         time_limit_s=time_limit_s, seed=seed, cost=cost, progress=progress)

    def plan_capacity(self, workloads: Iterable[Workload], host_types):
        """The cheapest new hosts from `host_types` (rebalance.HostType: capacity, labels,
        taints, price) on which `workloads` fit together with what runs now; changes nothing.
        Returns a rebalance.CapacityPlan (count per type, cost, where each workload would go,
        and the covering lower bound on the cost)."""
        from ..rebalance.capacity import plan_capacity
        return plan_capacity(self, workloads, host_types)

    # ------------------------------------------------------------------ plan versions and apply

    @property
    def version(self) -> int:
        """A counter that grows on every change of hosts, placements and volumes; a plan
        records the version it was made for (`Plan.base_version`) and `apply` refuses
        any other."""
        return self._hosts.version

    def apply(self, plan) -> list[Placement]:
        """Commit a rebalance plan step by step; all or nothing.

        Each step first places a copy of every moving workload on its target, checked there
        with every constraint while the workload still counts on its source, then releases
        the sources. A check that fails undoes every step applied so far.

        Returns
        -------
        list of Placement
            the new placement of every workload the plan moved (its last move's target),
            in the order of their first moves.

        Raises
        ------
        StateConflict
            the cluster changed since the plan was made (``plan.base_version``), the plan
            could not be ordered (``plan.unordered``), or a move no longer fits (named);
            nothing changed.
        ValidationError
            `plan` is not a rebalance Plan.
        """
        with self._lock:
            self._check_plan_start(plan)
            done: list[list] = []
            try:
                for step in plan.steps:
                    done.append(self._apply_moves(step))
            except BaseException:   # StateConflict, or anything unexpected: the cluster as it was
                for olds in reversed(done):
                    for old in reversed(olds):
                        self._ledger.move_back(old, self._compiler.current(old.terms, old.workload))
                raise
            self._applying = None
            final = {m.workload_id: m.target for step in plan.steps for m in step}
            return [Placement(wid, host) for wid, host in final.items()]   # in the order of first moves

    def apply_step(self, plan, index: int, *, resume: bool = False) -> list[Placement]:
        """Commit step `index` of a plan alone, for a caller that makes each step durable
        before the next (the server logs every move).

        Parameters
        ----------
        plan : rebalance.Plan
        index : int
            the step; step 0 needs the plan's base version, step k needs step k-1 of the
            same plan to be the cluster's last change.
        resume : bool
            skip that check: for a server that rebuilt the cluster from its log after a
            restart, which says steps 0..k-1 are done and nothing else changed since. Every
            move's source is still checked against where its workload runs.

        Returns
        -------
        list of Placement
            the new placements of the step's moves.

        Raises
        ------
        StateConflict
            the check above fails, or a move of the step does not fit (named); the step is
            undone, the steps before it stay applied.
        ValidationError
            not a Plan, or no such step.
        """
        with self._lock:
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValidationError(f"apply_step: index must be an integer, got {index!r}")
            if index == 0 and not resume:
                self._check_plan_start(plan)
            else:
                self._check_plan(plan)
                if not 0 <= index < len(plan.steps):
                    raise ValidationError(f"apply_step: plan has {len(plan.steps)} steps, no step {index}")
                if not resume and self._applying != (plan.id or id(plan), index - 1, self.version):
                    raise StateConflict(f"apply_step: step {index} of plan {plan.id or '(no id)'} must follow its "
                                        f"step {index - 1} with no other change of the cluster in between")
            if plan.steps:
                self._apply_moves(plan.steps[index])
            self._applying = (plan.id or id(plan), index, self.version)
            return [Placement(m.workload_id, m.target) for m in (plan.steps[index] if plan.steps else ())]

    def _check_plan(self, plan) -> None:
        from ..rebalance.plan import Plan

        if not isinstance(plan, Plan):
            raise ValidationError(f"apply expects a rebalance Plan, got {type(plan).__name__}")
        if plan.unordered:
            raise StateConflict(f"plan {plan.id or '(no id)'} cannot be applied: its moves could not be ordered "
                                f"({plan.unordered})")

    def _check_plan_start(self, plan) -> None:
        self._check_plan(plan)
        if plan.base_version != self.version:
            raise StateConflict(f"plan {plan.id or '(no id)'} was made for cluster version {plan.base_version}, "
                                f"the cluster is at version {self.version}: it changed since; plan again")

    def _apply_moves(self, step) -> list:
        """One step through the ledger: every copy on its target (checked, the workload
        counted on both hosts), then every source released. Returns the released records
        (for an undo); on a refusal undoes the copies and raises StateConflict."""
        ledger, table = self._ledger, self._hosts
        copies = []
        try:
            seen = set()
            for move in step:
                wid = move.workload_id
                rec = ledger.records.get(wid)
                where = None if rec is None else table.row_hosts[rec.row].id
                if wid in seen or where != move.source:
                    raise StateConflict(f"move of {wid} from {move.source} to {move.target}: the workload "
                                        + ("moves twice in one step" if wid in seen else
                                           "is not placed" if rec is None else f"runs on {where}"))
                seen.add(wid)
                if creates_volumes(rec.workload):
                    raise StateConflict(f"move of {wid}: a workload that created volumes does not move "
                                        "(its volumes' replicas stay where they are)")
                row = table.host_rows.get(move.target)
                if row is None or move.target == move.source:
                    raise StateConflict(f"move of {wid} from {move.source} to {move.target}: "
                                        + ("the target is its source" if row is not None else
                                           f"no host {move.target!r}"))
                request = self._compiler.request(rec.workload)
                terms = self._compiler.current(rec.terms, rec.workload)
                code, copy = ledger.move_in(wid, request, terms, row)
                if code != 0:
                    why = explain_request(table, rec.workload, request, terms, only_row=row)
                    raise StateConflict(f"move of {wid} from {move.source} to {move.target} does not fit with the "
                                        f"workload counted on both hosts: {why}")
                copies.append(copy)
        except BaseException:
            for copy in reversed(copies):
                ledger.move_abort(copy)
            raise
        return [ledger.move_out(copy) for copy in copies]

    # ------------------------------------------------------------------ array fast path

    def place_array(self, requests, strategy: str = "binpack", order: str = "arrival",
                    improve_s: float = 0.0, template: Workload | None = None) -> np.ndarray:
        """Place a matrix of requests; the fast path for orchestrators and benchmarks.

        Parameters
        ----------
        requests : int ndarray (n_workloads, n_dims)
        strategy : {"binpack", "spread", "balanced", "dot"}
        order : {"arrival", "largest_first"}
        improve_s : float
            Seconds the batch may spend improving the greedy packing (0: greedy
            only). Unconstrained batches only.
        template : Workload, optional
            Constraints every row shares, as the replicas of one service do
            (selector, tolerations, group, affinity, anti-affinity, spread,
            tenant, kind). Its id and requests are ignored.

        Returns
        -------
        int64 ndarray (n_workloads,)
            Host row per request, -1 where nothing fit. The requests get array
            rows numbered across calls (first call 0..n-1, the next continues),
            which `release_array` takes.
        """
        code = strategy_code(strategy)
        check_order(order)
        if not isinstance(improve_s, (int, float)) or isinstance(improve_s, bool) or not improve_s >= 0:
            raise ValidationError(f"improve_s must be a number >= 0, got {improve_s!r}")
        req = as_request_matrix(requests, len(self.dimensions))
        with self._lock:
            terms = None
            if template is not None:
                if not isinstance(template, Workload):
                    raise ValidationError(f"template must be a Workload, got {type(template).__name__}")
                if template.per_host or template.volumes or template.gang:
                    raise ValidationError("template: per-host services, volumes and gangs need named workloads")
                if improve_s > 0:
                    raise ValidationError("improve_s applies to batches without a template")
                terms = self._compiler.terms(template)
            elif self._hosts.cons.has_hard_taints or self._hosts.cons.has_dedicated_hosts():
                # Taints and dedicated tenants' hosts still apply to plain (tenant-less) rows;
                # such a batch takes the filtered path, without the improver.
                terms = self._compiler.terms(Workload("<array>"))
            return self._arrays.place(req, batch_order(self._hosts, req, order), code, terms, improve_s)

    def release_array(self, indices) -> None:
        """Release array workloads by their row numbers (see place_array)."""
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValidationError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        with self._lock:
            self._arrays.release(idx.astype(np.intp))

    # ------------------------------------------------------------------ read-outs

    def usage(self) -> np.ndarray:
        """int64 (n_rows, n_dims): resources charged per host row (a copy). VMs are
        charged request x allocation ratio; volume replicas their size in ssd."""
        return self._hosts.state.used_array[: self._hosts.n_rows].copy()

    def allocatable(self) -> np.ndarray:
        """int64 (n_rows, n_dims): capacity minus reserved per host row (a copy)."""
        return self._hosts.allocatable[: self._hosts.n_rows].copy()

    def limits(self) -> np.ndarray:
        """int64 (n_rows, n_dims): allocatable times allocation ratio per host row (a copy)."""
        return self._hosts.state.limit_array[: self._hosts.n_rows].copy()

    def free(self) -> np.ndarray:
        """int64 (n_rows, n_dims): limit minus usage per host row (a copy)."""
        return self._hosts.state.free_array[: self._hosts.n_rows].copy()

    def hosts_used(self) -> int:
        """Hosts that run at least one workload or volume replica."""
        return int((self._hosts.state.load_array[: self._hosts.n_rows] > 0).sum())

    def utilization(self) -> dict[str, float]:
        """Used / allocatable per dimension, over live hosts (0 where nothing is
        allocatable); above 1 where allocation ratios overcommit a dimension."""
        table = self._hosts
        n = table.n_rows
        live = table.live[:n]
        used = table.state.used_array[:n][live].sum(axis=0)
        alloc = table.allocatable[:n][live].sum(axis=0)
        return {d: (float(u) / float(a) if a else 0.0) for d, u, a in zip(self.dimensions, used, alloc)}

    def __repr__(self) -> str:
        return (f"Cluster({self.n_hosts} hosts, {len(self._ledger.records)} workloads, "
                f"{self._arrays.n_placed()} array workloads)")


def _commit_restored(commit_host, host_state, cons_state, core_terms, row: int, charge: np.ndarray, numa: int,
                     workload_id: str) -> int:
    """restore_many's commit of one workload with NUMA or counted terms: on its recorded
    NUMA node when it has one (see `Cluster.bind`'s numa_node for the fallback)."""
    node = int(commit_host(host_state, cons_state, core_terms, row, charge, numa))
    if node == -2:
        log.warning("restored workload %s: NUMA node %d lacks room; another node is chosen", workload_id, numa)
        node = int(commit_host(host_state, cons_state, core_terms, row, charge))
        if node < 0:
            log.warning("restored workload %s: no NUMA node of its host has room; charged to none", workload_id)
    return node
