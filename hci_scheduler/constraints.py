"""Compiles hosts' labels/taints/topology and workloads' constraints into integers.

The core never sees a string: this module gives every label pair or key that a
selector references a bit, every taint a bit, every topology key a domain id
per host, every group and tenant an integer, and every (group, topology) pair
that some term references a row of counters. It owns the arrays the core's
ConstraintState points at, and rebuilds them when hosts come and go.

Bits are handed out lazily: a label pair gets a bit the first time a selector
names it, so hosts may carry any number of labels (hostnames included) and
the masks stay a few words long.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

import sched_core

from .errors import ValidationError
from .model import Host, Taint, Workload

#: Penalty per untolerated PreferNoSchedule taint, on the 0..100 cost scale
#: (half a host's normalised capacity: avoided unless it saves a lot).
PREFER_NO_SCHEDULE_WEIGHT = 50
KVM_LABEL = ("kvm", "true")
#: Prefix of the hidden group of workloads that hold hard anti-affinity against a group.
ANTI_HOLDER = "\0anti:"


def _words(n_bits: int) -> int:
    return max(1, (n_bits + 63) // 64)


def _set_bit(mask: np.ndarray, bit: int) -> None:
    mask[..., bit // 64] |= np.uint64(1) << np.uint64(bit % 64)



def _domain_room(topology: int, n_domains: int) -> int:
    """Counter slots to reserve for a (group, topology) pair: the host topology has one
    per row (rows grow by a rebuild); a label topology keeps room to double, so hosts
    that bring new racks one at a time are counted in place, not by a rebuild each."""
    return n_domains if topology == 0 else n_domains + max(16, n_domains)

class ConstraintIndex:
    """The integer form of every host's labels, taints and topology domains, plus the
    group and tenant counters. One per Cluster; every method is called under its lock."""

    def __init__(self, dimensions: Sequence[str]):
        self.dimensions = tuple(dimensions)
        self.state = sched_core.ConstraintState()
        self.version = 0                       # bumped whenever compiled Terms may be stale
        self.label_bits: dict[tuple, int] = {}  # ("pair", key, value) | ("key", key) -> bit
        self.taint_bits: dict[Taint, int] = {}
        self.topologies: dict[str, int] = {"host": 0}
        self.domain_ids: list[dict[str, int]] = [{}]   # per topology: label value -> domain id
        self.groups: dict[str, int] = {}
        self.tenants: dict[str, int] = {}
        self.pairs: dict[tuple[int, int], int] = {}    # (group id, topology id) -> pair id
        self.group_rows: dict[int, Counter] = {}       # group id -> Counter(host row -> workloads)
        self._pending_groups: list[tuple] = []         # record() calls not folded into group_rows yet
        self._pending_rows = 0
        self.tenant_rows: dict[int, Counter] = {}      # host row -> Counter(tenant id -> workloads)
        self.dedicated_rows: dict[int, Counter] = {}   # host row -> Counter(tenant id -> dedicated workloads)
        self.hosts: list[Host | None] = []
        self.n_rows = 0
        self._arrays: dict[str, np.ndarray] = {}
        self._live_per_domain: list[dict[int, int]] = []  # per topology: domain id -> live hosts
        self._pair_room: list[int] = []                    # per pair: counter slots reserved
        self.has_hard_taints = False

    # ---------------------------------------------------------------- ids

    def group_id(self, name: str) -> int:
        if name not in self.groups:
            self.groups[name] = len(self.groups)
            if self._arrays:
                self._group_csr()
                self._bind()
        return self.groups[name]

    def tenant_id(self, name: str | None) -> int:
        if name is None:
            return -1
        if name not in self.tenants:
            self.tenants[name] = len(self.tenants)
        return self.tenants[name]

    def _topology_id(self, key: str, field: str) -> int:
        if key in self.topologies:
            return self.topologies[key]
        if not any(h is not None and key in h.labels for h in self.hosts):
            raise ValidationError(f"{field}: topology key {key!r} is not a label of any host")
        t = self.topologies[key] = len(self.topologies)
        ids: dict[str, int] = {}
        self.domain_ids.append(ids)
        a = self._arrays
        row_dom = np.full(a["domain"].shape[1], -1, dtype=np.int32)
        for row, host in enumerate(self.hosts):
            if host is not None and key in host.labels:
                row_dom[row] = ids.setdefault(host.labels[key], len(ids))
        a["domain"] = np.ascontiguousarray(np.vstack([a["domain"], row_dom[None, :]]))
        a["topo_live_doms"] = np.append(a["topo_live_doms"], 0)
        a["topo_missing"] = np.append(a["topo_missing"], 0)
        self._recount_live_domains()
        self._bind()
        return t

    def _label_bit(self, kind: str, key: str, value: str | None = None) -> int:
        token = (kind, key, value) if kind == "pair" else (kind, key)
        if token in self.label_bits:
            return self.label_bits[token]
        bit = self.label_bits[token] = len(self.label_bits)
        a = self._arrays
        if bit // 64 >= a["labels"].shape[1]:
            a["labels"] = np.ascontiguousarray(
                np.hstack([a["labels"], np.zeros((len(a["labels"]), 1), dtype=np.uint64)]))
        word, flag = bit // 64, np.uint64(1) << np.uint64(bit % 64)
        for row, host in enumerate(self.hosts):
            if host is not None and (host.labels.get(key) == value if kind == "pair" else key in host.labels):
                a["labels"][row, word] |= flag
        self._bind()
        return bit

    def _pair_id(self, group: int, topology: int) -> int:
        if (group, topology) in self.pairs:
            return self.pairs[(group, topology)]
        p = self.pairs[(group, topology)] = len(self.pairs)
        a = self._arrays
        n_dom = a["domain"].shape[1] if topology == 0 else len(self.domain_ids[topology])
        counts = np.zeros(_domain_room(topology, n_dom), dtype=np.int32)
        total = 0
        self._fold()
        for row, count in self.group_rows.get(group, {}).items():
            total += count
            d = a["domain"][topology, row]
            if d >= 0:
                counts[d] += count
        offset = int(a["pair_offset"][-1] + self._pair_room[-1]) if p else 0
        self._pair_room.append(len(counts))
        a["pair_counts"] = np.concatenate([a["pair_counts"][:offset], counts, np.zeros(1, dtype=np.int32)])
        a["pair_offset"] = np.append(a["pair_offset"], offset)
        a["pair_topo"] = np.append(a["pair_topo"], np.int32(topology)).astype(np.int32)
        a["pair_ndom"] = np.append(a["pair_ndom"], np.int32(n_dom)).astype(np.int32)
        a["pair_total"] = np.append(a["pair_total"], total)
        a["pair_nonzero"] = np.append(a["pair_nonzero"], int((counts > 0).sum()))
        self._group_csr()
        self._bind()
        return p

    def _group_csr(self) -> None:
        """group id -> the pairs that count it, as CSR."""
        by_group: dict[int, list[int]] = {}
        for (g, t), p in self.pairs.items():
            by_group.setdefault(g, []).append(p)
        group_ptr = np.zeros(len(self.groups) + 1, dtype=np.int64)
        group_pairs: list[int] = []
        for g in range(len(self.groups)):
            group_pairs.extend(sorted(by_group.get(g, [])))
            group_ptr[g + 1] = len(group_pairs)
        self._arrays["group_ptr"] = group_ptr
        self._arrays["group_pairs"] = np.array(group_pairs, dtype=np.int32)

    def _bind(self) -> None:
        self.state.bind(**self._arrays,
                        cpu_dim=self.dimensions.index("cpu") if "cpu" in self.dimensions else -1,
                        mem_dim=self.dimensions.index("memory") if "memory" in self.dimensions else -1)
        self.version += 1

    # ---------------------------------------------------------------- host arrays

    def _host_bits(self, row: int, host: Host, labels, taint_hard, taint_soft) -> None:
        lab = host.labels
        for tok, bit in self.label_bits.items():
            if (tok[0] == "pair" and lab.get(tok[1]) == tok[2]) or (tok[0] == "key" and tok[1] in lab):
                _set_bit(labels[row], bit)
        for taint in host.taints:
            target = taint_hard if taint.effect == "NoSchedule" else taint_soft
            _set_bit(target[row], self.taint_bits[taint])

    def add_rows(self, rows: Sequence[int], hosts: list[Host | None], ratio_milli: np.ndarray,
                 numa: dict[int, np.ndarray]) -> None:
        """Register newly added host rows: in place when nothing new must be laid out
        (no new taint, no new domain of a counted topology, no array growth), else a rebuild."""
        a = self._arrays
        fits = bool(a) and len(hosts) <= len(a["labels"])
        new_domains: dict[int, dict[str, None]] = {}  # topology -> label values not seen yet
        for row in rows:
            host = hosts[row]
            if any(t not in self.taint_bits for t in host.taints):
                fits = False
            for key, t in self.topologies.items():
                if t and key in host.labels and host.labels[key] not in self.domain_ids[t]:
                    new_domains.setdefault(t, {})[host.labels[key]] = None
        # A new domain (a new rack) fits in place while every pair counting its topology
        # has a free slot reserved after its counters (see _domain_room).
        for t, values in new_domains.items():
            if any(a["pair_ndom"][p] + len(values) > self._pair_room[p]
                   for (_, pt), p in self.pairs.items() if pt == t):
                fits = False
        if not fits:
            self.rebuild(hosts, len(ratio_milli), ratio_milli, numa)
            return
        for t, values in new_domains.items():
            ids = self.domain_ids[t]
            for value in values:
                ids[value] = len(ids)
            for (_, pt), p in self.pairs.items():
                if pt == t:
                    a["pair_ndom"][p] += len(values)
        self.hosts = hosts
        for row in rows:
            host = hosts[row]
            for name in ("labels", "taint_hard", "taint_soft"):
                a[name][row] = 0
            self._host_bits(row, host, a["labels"], a["taint_hard"], a["taint_soft"])
            self.has_hard_taints |= any(t.effect == "NoSchedule" for t in host.taints)
            a["domain"][:, row] = -1
            a["domain"][0, row] = row
            for key, t in self.topologies.items():
                if t and key in host.labels:
                    a["domain"][t, row] = self.domain_ids[t][host.labels[key]]
            a["ratio_milli"][row] = ratio_milli[row]
            nodes = numa.get(row, np.zeros((0, 2), dtype=np.int64))
            a["numa_free"][row] = 0
            a["numa_free"][row, : len(nodes)] = nodes
            a["numa_n"][row] = len(nodes)
            a["host_tenant"][row] = -1
            a["ded_tenant"][row] = -1
            a["accounted_load"][row] = 0
        self._count_live_rows(rows)
        self.version += 1

    def _count_live_rows(self, rows: Sequence[int]) -> None:
        """Add new live rows to the live-host count per domain, and so to topo_live_doms
        and topo_missing: O(rows x topologies), so hosts added one call at a time stay linear."""
        a = self._arrays
        domain, live_doms, missing = a["domain"], a["topo_live_doms"], a["topo_missing"]
        for t, per_domain in enumerate(self._live_per_domain):
            for row in rows:
                d = int(domain[t, row])
                if d < 0:
                    missing[t] += 1
                elif per_domain.get(d, 0) == 0:
                    per_domain[d] = 1
                    live_doms[t] += 1
                else:
                    per_domain[d] += 1

    def _recount_live_domains(self) -> None:
        a = self._arrays
        self._live_per_domain = [{} for _ in self.topologies]
        a["topo_live_doms"][:] = 0
        a["topo_missing"][:] = 0
        self._count_live_rows([r for r, h in enumerate(self.hosts) if h is not None])

    def rebuild(self, hosts: list[Host | None], n_rows: int | None = None, ratio_milli: np.ndarray | None = None,
                numa: dict[int, np.ndarray] | None = None) -> None:
        """Recompute every array from the host list and the counters (O(hosts + pairs x domains)).

        Called when a host brings a new taint or topology domain, when hosts are
        removed or relabelled, and when a new bit or pair appears: rare events
        next to placements.
        """
        self.hosts = hosts
        old = self._arrays
        if n_rows is None:
            n_rows = len(old["labels"]) if old else len(hosts)
        n = max(n_rows, len(hosts), 1)
        for host in hosts:
            for taint in host.taints if host is not None else ():
                self.taint_bits.setdefault(taint, len(self.taint_bits))
        lw, tw = _words(len(self.label_bits)), _words(len(self.taint_bits))
        labels = np.zeros((n, lw), dtype=np.uint64)
        taint_hard = np.zeros((n, tw), dtype=np.uint64)
        taint_soft = np.zeros((n, tw), dtype=np.uint64)
        domain = np.full((len(self.topologies), n), -1, dtype=np.int32)
        for t in range(1, len(self.topologies)):
            self.domain_ids[t] = {}
        self.has_hard_taints = False
        for row, host in enumerate(hosts):
            if host is None:
                continue
            self._host_bits(row, host, labels, taint_hard, taint_soft)
            self.has_hard_taints |= any(t.effect == "NoSchedule" for t in host.taints)
            domain[0, row] = row
            for key, t in self.topologies.items():
                if t and key in host.labels:
                    ids = self.domain_ids[t]
                    domain[t, row] = ids.setdefault(host.labels[key], len(ids))
        n_dom = [n] + [len(self.domain_ids[t]) for t in range(1, len(self.topologies))]
        # Pair counters, laid out flat; rebuilt from the per-group row counters.
        n_pairs = len(self.pairs)
        pair_topo = np.zeros(n_pairs, dtype=np.int32)
        pair_ndom = np.zeros(n_pairs, dtype=np.int32)
        pair_offset = np.zeros(n_pairs, dtype=np.int64)
        pair_total = np.zeros(n_pairs, dtype=np.int64)
        offset = 0
        self._pair_room = [0] * n_pairs
        for (g, t), p in sorted(self.pairs.items(), key=lambda kv: kv[1]):
            pair_topo[p], pair_ndom[p], pair_offset[p] = t, n_dom[t], offset
            self._pair_room[p] = _domain_room(t, n_dom[t])
            offset += self._pair_room[p]
        pair_counts = np.zeros(max(offset, 1), dtype=np.int32)
        pair_nonzero = np.zeros(n_pairs, dtype=np.int64)
        self._fold()
        for (g, t), p in self.pairs.items():
            for row, count in self.group_rows.get(g, {}).items():
                pair_total[p] += count
                if domain[t, row] >= 0:
                    pair_counts[pair_offset[p] + domain[t, row]] += count
            pair_nonzero[p] = int((pair_counts[pair_offset[p]: pair_offset[p] + n_dom[t]] > 0).sum())
        topo_live_doms = np.zeros(len(self.topologies), dtype=np.int64)  # filled by _recount_live_domains
        topo_missing = np.zeros(len(self.topologies), dtype=np.int64)
        host_tenant = np.full(n, -1, dtype=np.int32)
        ded_tenant = np.full(n, -1, dtype=np.int32)
        for row in set(self.tenant_rows) | set(self.dedicated_rows):
            if row < n:
                self._tenant_marks(row, host_tenant, ded_tenant)
        ratio = np.full((n, len(self.dimensions)), 1000, dtype=np.int64)
        source = ratio_milli if ratio_milli is not None else old.get("ratio_milli")
        if source is not None:
            m = min(n, len(source))
            ratio[:m] = source[:m]
        numa_free = np.zeros((n, 8, 2), dtype=np.int64)
        numa_n = np.zeros(n, dtype=np.int32)
        accounted_load = np.zeros(n, dtype=np.int64)  # kept by the core's count_in: carried over
        if old:
            m = min(n, len(old["numa_free"]))
            numa_free[:m] = old["numa_free"][:m]
            numa_n[:m] = old["numa_n"][:m]
            accounted_load[:m] = old["accounted_load"][:m]
        for row, nodes in (numa or {}).items():
            numa_free[row] = 0
            numa_free[row, : len(nodes)] = nodes
            numa_n[row] = len(nodes)
        self._arrays = dict(
            labels=labels, taint_hard=taint_hard, taint_soft=taint_soft, domain=domain, ratio_milli=ratio,
            host_tenant=host_tenant, ded_tenant=ded_tenant, accounted_load=accounted_load,
            pair_counts=pair_counts, pair_offset=pair_offset,
            pair_topo=pair_topo, pair_ndom=pair_ndom, pair_total=pair_total, pair_nonzero=pair_nonzero,
            topo_live_doms=topo_live_doms, topo_missing=topo_missing, numa_free=numa_free, numa_n=numa_n,
        )
        self._recount_live_domains()
        self._group_csr()
        self.n_rows = n
        self._bind()

    def array(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def _tenant_marks(self, row: int, host_tenant: np.ndarray, ded_tenant: np.ndarray) -> None:
        tenants = [t for t, c in self.tenant_rows.get(row, {}).items() if c > 0]
        host_tenant[row] = -1 if not tenants else (tenants[0] if len(tenants) == 1 else -2)
        dedicated = [t for t, c in self.dedicated_rows.get(row, {}).items() if c > 0]
        ded_tenant[row] = dedicated[0] if dedicated else -1

    # ---------------------------------------------------------------- bookkeeping

    def record(self, terms: "CompiledTerms", rows, delta: int) -> None:
        """Keep the Python-side counters in step after the core counted (delta=+1) or
        uncounted (delta=-1) workloads of `terms` on `rows`.

        The per-group row counts are only read when a new (group, topology) pair or a
        rebuild needs them, so they are queued here and folded in then (see _fold):
        that keeps this bookkeeping out of every batch's path."""
        if len(rows) == 0 or (not terms.groups and terms.tenant < 0):
            return
        if terms.groups:
            self._pending_groups.append((terms.groups, np.array(rows, dtype=np.int64), delta))
            self._pending_rows += len(rows)
            if self._pending_rows > 1 << 16:  # bound the queue on long-running clusters
                self._fold()
        if terms.tenant < 0:
            return
        if isinstance(rows, np.ndarray) and len(rows) > 64:
            uniq, n = np.unique(rows, return_counts=True)
            counts = dict(zip(uniq.tolist(), n.tolist()))
        else:
            counts = Counter(rows.tolist() if isinstance(rows, np.ndarray) else rows)
        if terms.tenant >= 0:
            host_tenant, ded_tenant = self._arrays["host_tenant"], self._arrays["ded_tenant"]
            for row, c in counts.items():
                tc = self.tenant_rows.setdefault(row, Counter())
                tc[terms.tenant] += delta * c
                if tc[terms.tenant] <= 0:
                    del tc[terms.tenant]
                if terms.dedicated:
                    dc = self.dedicated_rows.setdefault(row, Counter())
                    dc[terms.tenant] += delta * c
                    if dc[terms.tenant] <= 0:
                        del dc[terms.tenant]
                if delta < 0:
                    self._tenant_marks(row, host_tenant, ded_tenant)

    def _fold(self) -> None:
        """Apply the queued group bookkeeping to group_rows."""
        pending, self._pending_groups, self._pending_rows = self._pending_groups, [], 0
        for groups, rows, delta in pending:
            uniq, n = np.unique(rows, return_counts=True)
            for group in groups:
                gc = self.group_rows.setdefault(group, Counter())
                for row, c in zip(uniq.tolist(), n.tolist()):
                    gc[row] += delta * c
                    if gc[row] <= 0:
                        del gc[row]

    def forget_row(self, row: int) -> None:
        self.tenant_rows.pop(row, None)
        self.dedicated_rows.pop(row, None)
        if self._arrays:
            self._arrays["accounted_load"][row] = 0

    def count_volume_replicas(self, rows, delta: int) -> None:
        """Volume replicas add to a host's load but are storage, not a tenant's workload:
        account for them (delta=+1 when charged, -1 when released) so that they never
        count as tenant-less work against a dedicated tenant."""
        np.add.at(self._arrays["accounted_load"], np.asarray(rows, dtype=np.intp), delta)

    def has_dedicated_hosts(self) -> bool:
        """Some host is held by a dedicated tenant (plain array rows must then be filtered)."""
        return bool((self._arrays["ded_tenant"] >= 0).any())

    # ---------------------------------------------------------------- workloads

    def compile(self, w: Workload, allowed: np.ndarray | None = None) -> "CompiledTerms":
        """The Terms of workload `w` (raises ValidationError naming the bad field)."""
        all_bits: list[int] = []
        none_bits: list[int] = []
        any_sets: list[list[int]] = []
        for i, expr in enumerate(w.selector):
            if expr.op == "In":
                bits = [self._label_bit("pair", expr.key, v) for v in expr.values]
                (all_bits.extend(bits) if len(bits) == 1 else any_sets.append(bits))
            elif expr.op == "NotIn":
                none_bits.extend(self._label_bit("pair", expr.key, v) for v in expr.values)
            elif expr.op == "Exists":
                all_bits.append(self._label_bit("key", expr.key))
            else:
                none_bits.append(self._label_bit("key", expr.key))
        kvm_bit = self._label_bit("pair", *KVM_LABEL) if w.kind == "vm" else None
        if w.numa and w.kind != "vm":
            raise ValidationError(f"workload {w.id} numa: NUMA fit applies to kind='vm' only")
        group = self.group_id(w.group) if w.group else -1
        groups = [group] if group >= 0 else []
        terms = {"aff": [], "anti": [], "spread": []}
        for field, items in (("affinity", w.affinity), ("anti_affinity", w.anti_affinity)):
            if len(items) > sched_core.MAX_TERMS:
                raise ValidationError(f"workload {w.id} {field}: at most {sched_core.MAX_TERMS} terms")
            for a in items:
                t = self._topology_id(a.topology, f"workload {w.id} {field}")
                p = self._pair_id(self.group_id(a.group), t)
                terms["aff" if field == "affinity" else "anti"].append((p, a.hard, a.weight, a.group == w.group))
                if field == "anti_affinity" and a.hard:
                    # Hard anti-affinity is symmetric: the workload also counts in a group
                    # "holds anti-affinity against a.group", which that group's members avoid.
                    holder = self.group_id(ANTI_HOLDER + a.group)
                    self._pair_id(holder, t)
                    if holder not in groups:
                        groups.append(holder)
        if w.group and ANTI_HOLDER + w.group in self.groups:
            holder = self.groups[ANTI_HOLDER + w.group]
            for (g, t), p in sorted(self.pairs.items(), key=lambda kv: kv[1]):
                if g == holder:
                    terms["anti"].append((p, True, 1, False))
        if len(terms["anti"]) > sched_core.MAX_TERMS:
            raise ValidationError(f"workload {w.id} anti_affinity: at most {sched_core.MAX_TERMS} terms "
                                  f"including those of placed workloads against its group")
        if len(w.spread) > sched_core.MAX_TERMS:
            raise ValidationError(f"workload {w.id} spread: at most {sched_core.MAX_TERMS} terms")
        for s in w.spread:
            if group < 0:
                raise ValidationError(f"workload {w.id} spread: needs a group (spread counts the workloads of its group)")
            t = self._topology_id(s.topology, f"workload {w.id} spread")
            terms["spread"].append((self._pair_id(group, t), s.max_skew, s.hard))
        # Everything that may rebuild the arrays has run: the word counts are final now.
        lw, tw = _words(len(self.label_bits)), _words(len(self.taint_bits))
        all_mask = np.zeros(lw, dtype=np.uint64)
        none_mask = np.zeros(lw, dtype=np.uint64)
        kvm_mask = np.zeros(lw, dtype=np.uint64)
        any_masks = np.zeros((len(any_sets), lw), dtype=np.uint64)
        for b in all_bits:
            _set_bit(all_mask, b)
        for b in none_bits:
            _set_bit(none_mask, b)
        for i, bits in enumerate(any_sets):
            for b in bits:
                _set_bit(any_masks[i], b)
        if kvm_bit is not None:
            _set_bit(kvm_mask, kvm_bit)
        tol_hard = np.zeros(tw, dtype=np.uint64)
        tol_soft = np.zeros(tw, dtype=np.uint64)
        has_soft_taint = False
        for taint, bit in self.taint_bits.items():
            if any(t.tolerates(taint) for t in w.tolerations):
                _set_bit(tol_hard if taint.effect == "NoSchedule" else tol_soft, bit)
            elif taint.effect == "PreferNoSchedule":
                has_soft_taint = True

        # Spread counts only domains that hold a host the selector admits.
        labels = self._arrays["labels"][:, :lw] if self._arrays["labels"].shape[1] >= lw else None
        match = np.ones(len(self._arrays["labels"]), dtype=bool)
        if labels is not None:
            match &= ((labels & all_mask) == all_mask).all(axis=1) & ((labels & none_mask) == 0).all(axis=1)
            for row_mask in any_masks:
                match &= (labels & row_mask).any(axis=1)
            if kvm_bit is not None:
                match &= ((labels & kvm_mask) == kvm_mask).all(axis=1)
        dom_ptr = [0]
        doms: list[int] = []
        for p, _, _ in terms["spread"]:
            t = [tt for (g, tt), pp in self.pairs.items() if pp == p][0]
            d = self._arrays["domain"][t][match]
            doms.extend(np.unique(d[d >= 0]).tolist())
            dom_ptr.append(len(doms))

        def col(items, k, dtype):
            return np.array([it[k] for it in items], dtype=dtype)

        aff, anti, spread = terms["aff"], terms["anti"], terms["spread"]
        # Per-host services are exempt from tenant isolation (they run on every host and
        # hold none), so they count under no tenant.
        tenant = -1 if w.per_host else self.tenant_id(w.tenant)
        dedicated = w.isolation == "dedicated" and not w.per_host
        core = sched_core.Terms(
            all_mask=all_mask, none_mask=none_mask, any_masks=any_masks, kvm_mask=kvm_mask,
            tol_hard=tol_hard, tol_soft=tol_soft, groups=np.array(groups, dtype=np.int32),
            tenant=tenant, dedicated=dedicated, per_host=w.per_host, is_vm=w.kind == "vm", numa=bool(w.numa),
            aff_pair=col(aff, 0, np.int32), aff_hard=col(aff, 1, np.uint8), aff_weight=col(aff, 2, np.int64),
            aff_self=col(aff, 3, np.uint8), anti_pair=col(anti, 0, np.int32), anti_hard=col(anti, 1, np.uint8),
            anti_weight=col(anti, 2, np.int64), spread_pair=col(spread, 0, np.int32),
            spread_skew=col(spread, 1, np.int64), spread_hard=col(spread, 2, np.uint8),
            spread_dom_ptr=np.array(dom_ptr, dtype=np.int64), spread_doms=np.array(doms, dtype=np.int32),
            allowed=allowed, prefer_weight=PREFER_NO_SCHEDULE_WEIGHT if has_soft_taint else 0,
        )
        labels = describe_terms(w)
        topo_names = {t: k for k, t in self.topologies.items()}
        for i in range(len(w.anti_affinity), len(terms["anti"])):
            t = int(self._arrays["pair_topo"][terms["anti"][i][0]])
            labels[sched_core.REASON_ANTI_AFFINITY + i] = (
                f"anti-affinity of placed workloads against group {w.group} on {topo_names[t]}")
        return CompiledTerms(core, groups, tenant, dedicated, self.version, labels)


class CompiledTerms:
    """A workload spec's core Terms plus what the Python layer needs to account for it."""

    __slots__ = ("core", "groups", "tenant", "dedicated", "version", "labels")

    def __init__(self, core, groups: list[int], tenant: int, dedicated: bool, version: int,
                 labels: dict[int, str]):
        self.core = core
        self.groups = groups
        self.tenant = tenant
        self.dedicated = dedicated
        self.version = version
        self.labels = labels


def describe_terms(w: Workload) -> dict[int, str]:
    """Reason code -> text for the constraint filters of workload `w` (used by explanations)."""
    text = {
        sched_core.REASON_SELECTOR: "node selector " + ", ".join(str(e) for e in w.selector)
        if w.selector else "node selector",
        sched_core.REASON_KVM: "VM needs a host labelled kvm=true",
        sched_core.REASON_TAINT: "untolerated taint (NoSchedule)",
        # A dedicated workload is refused where anyone else's work runs; any other only
        # where another tenant holds the host dedicated.
        sched_core.REASON_TENANT: f"tenant isolation ({w.tenant}, dedicated: host runs other tenants' or "
                                   f"tenant-less workloads)" if w.isolation == "dedicated" and not w.per_host else
                                   f"tenant isolation ({w.tenant or 'no tenant'}: host held by a dedicated tenant)",
        sched_core.REASON_VOLUME: "volume locality: no replica of " + ", ".join(
            v if isinstance(v, str) else v.id for v in w.volumes) if w.volumes else "volume locality",
        sched_core.REASON_NUMA: "no NUMA node with room for all vCPUs and memory",
    }
    for i, a in enumerate(w.affinity):
        text[sched_core.REASON_AFFINITY + i] = f"affinity with group {a.group} on {a.topology}"
    for i, a in enumerate(w.anti_affinity):
        text[sched_core.REASON_ANTI_AFFINITY + i] = f"anti-affinity with group {a.group} on {a.topology}"
    for i, s in enumerate(w.spread):
        text[sched_core.REASON_SPREAD + i] = f"spread of group {w.group} over {s.topology} (max skew {s.max_skew})"
    return text


def spec_key(w: Workload) -> tuple:
    """Everything about a workload that shapes its Terms (not its id or requests)."""
    vols = tuple(v if isinstance(v, str) else v.id for v in w.volumes) if w.volumes else ()
    return (w.kind, w.tenant, w.isolation, w.group, w.selector, w.tolerations, w.affinity, w.anti_affinity,
            w.spread, vols, w.numa, w.per_host)
