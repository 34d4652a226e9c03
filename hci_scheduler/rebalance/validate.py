"""An independent check of a move plan: replay it step by step on plain Python data.

Nothing here uses the engine, the Problem or the placement core: the state is read through
the cluster's public API (hosts, placements, workload specs, volumes, usage) and every
rule is recomputed from it, so a plan the rebalancer got wrong, or a Problem compiled
wrongly from the cluster, shows up as a violation. The benchmark and the tests call
`replay_plan` on every plan; it must return [].

Each state is checked twice per step: while the step runs (every moving workload on both
its source and its target) and after it. The rules, as the placement core applies them:

- capacity: per host and dimension, usage <= floor((capacity - reserved) x ratio); a
  container pays its request, a VM ceil(request x ratio), a volume replica its size in
  ssd, a per-host service replica like a workload; load the API does not name (array
  rows) is what the cluster reports beyond that, and stays where it is;
- at the target of a move: the host is ready, the selector matches its labels, a VM finds
  kvm=true, every NoSchedule taint is tolerated, every volume the workload mounts has a
  replica there;
- dedicated tenants: a host running a dedicated workload of tenant t runs only tenant t's
  workloads (per-host service replicas excepted) and no unnamed load;
- hard affinity (a workload of the group in the same topology domain), hard anti-affinity
  (none), hard spread (max skew across the domains of the key);
- workloads that never move: NUMA-pinned VMs, per-host services, workloads that created
  volumes.

A rule broken before the plan starts is reported only where the plan makes it worse (a
host over its limit that receives a workload, a skew that grows, a workload that moves).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..model import Host, Volume, Workload
from .plan import Plan


@dataclass
class Snapshot:
    """What the check reads from a cluster, as plain data.

    where : named workload id -> host id; services : per-host service id -> (spec, replica
    hosts); volumes : volume id -> (size in GiB, replica hosts); unnamed : host id -> load
    per dimension the named parts do not account for (array rows).
    """

    dimensions: tuple[str, ...]
    hosts: dict[str, Host]
    workloads: dict[str, Workload]
    where: dict[str, str]
    services: dict[str, tuple[Workload, tuple[str, ...]]] = field(default_factory=dict)
    volumes: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    unnamed: dict[str, list[int]] = field(default_factory=dict)
    version: int | None = None


def snapshot(cluster) -> Snapshot:
    """The cluster's state through its public API (a consistent read under its lock)."""
    with cluster._lock:
        dims = tuple(cluster.dimensions)
        hosts = {h.id: h for h in cluster.hosts()}
        workloads, where, services = {}, {}, {}
        for p in cluster.placements():
            w = cluster.workload(p.workload_id)
            if p.host_id is None:
                services[w.id] = (w, tuple(p.replicas))
            else:
                workloads[w.id] = w
                where[w.id] = p.host_id
        volumes = {vid: (cluster.volume(vid).size_gib, list(hs)) for vid, hs in cluster.volumes().items()}
        usage = cluster.usage()
        rows = {hid: cluster.host_index(hid) for hid in hosts}
        version = cluster.version
    snap = Snapshot(dims, hosts, workloads, where, services, volumes, {}, version)
    named = _named_usage(snap, where)
    snap.unnamed = {hid: [int(u) - n for u, n in zip(usage[rows[hid]].tolist(), named[hid])] for hid in hosts}
    return snap


def replay_plan(source: Snapshot | Callable | object, plan: Plan) -> list[str]:
    """Replay `plan` on `source` (a Snapshot, a Cluster, or a callable returning either, at
    the state the plan was made for); every violation, one line each naming the step,
    workload, host and rule. [] when the plan is feasible throughout."""
    if callable(source) and not isinstance(source, Snapshot) and not hasattr(source, "placements"):
        source = source()
    snap = source if isinstance(source, Snapshot) else snapshot(source)
    out: list[str] = []
    if plan.unordered:
        out.append(f"plan: could not be ordered ({plan.unordered})")
    if snap.version is not None and plan.base_version != snap.version:
        out.append(f"plan: made for cluster version {plan.base_version}, the state replayed is version {snap.version}")
    for hid, extra in snap.unnamed.items():
        if any(x < 0 for x in extra):
            out.append(f"initial state: host {hid}: the cluster reports less usage than its workloads, replicas "
                       f"and volumes are charged by the core's rule ({extra})")
    checker = _Checker(snap)
    where = dict(snap.where)
    baseline = checker.violations(_Present(where, {}), set(snap.hosts), set(where), set(checker.group_members))
    for k, step in enumerate(plan.steps):
        arrivals: dict[str, str] = {}
        sources: dict[str, str] = {}
        for move in step:
            w = move.workload_id
            label = f"step {k}: workload {w} from {move.source} to {move.target}"
            if w in snap.services:
                out.append(f"{label}: a per-host service never moves")
                continue
            if w not in where:
                out.append(f"{label}: no such placed workload")
                continue
            if w in arrivals:
                out.append(f"{label}: moves twice in one step")
                continue
            if where[w] != move.source:
                out.append(f"{label}: runs on {where[w]}, not on {move.source}")
                continue
            if move.target not in snap.hosts or move.target == move.source:
                out.append(f"{label}: not a host to move to")
                continue
            out += [f"{label}: {why}" for why in checker.arrival(snap.workloads[w], move.target)]
            arrivals[w] = move.target
            sources[w] = move.source
        # Only what the step can change is checked again: the hosts it touches, the movers
        # and the workloads whose rules point at a mover's group, the movers' groups.
        hosts = set(arrivals.values()) | set(sources.values())
        groups = {snap.workloads[w].group for w in arrivals} - {None}
        wids = set(arrivals).union(*(checker.rules_to.get(g, ()) for g in groups))
        for key, text in checker.violations(_Present(where, arrivals), hosts, wids, groups, arrivals).items():
            if key not in baseline:
                out.append(f"step {k} (while it runs): {text}")
        where.update(arrivals)
        checker.moved(arrivals, sources)
        for key, text in checker.violations(_Present(where, {}), hosts, wids, groups, arrivals).items():
            if key not in baseline:
                out.append(f"step {k} (after it): {text}")
    return out


class _Present:
    """Where each workload counts: its host, and its target too while its step runs."""

    def __init__(self, where: dict[str, str], arrivals: dict[str, str]):
        self.where = where
        self.arrivals = arrivals

    def hosts(self, wid: str) -> tuple[str, ...]:
        h = self.where.get(wid)
        if h is None:
            return ()
        t = self.arrivals.get(wid)
        return (h,) if t is None else (h, t)


# ---------------------------------------------------------------------- the rules


def _ratios(host: Host, dims) -> list[float]:
    return [float(host.allocation_ratio.get(d, 1.0)) for d in dims]


def _limit(host: Host, dims) -> list[int]:
    """floor((capacity - reserved) x ratio), the host's hard limit per dimension."""
    return [math.floor((host.capacity.get(d, 0) - host.reserved.get(d, 0)) * r)
            for d, r in zip(dims, _ratios(host, dims))]


def _charge(w: Workload, host: Host, dims) -> list[int]:
    """A container pays its request; a VM ceil(request x ratio), the ratio in thousandths."""
    req = [int(w.requests.get(d, 0)) for d in dims]
    if w.kind != "vm":
        return req
    return [(q * round(r * 1000) + 999) // 1000 for q, r in zip(req, _ratios(host, dims))]


def _named_usage(snap: Snapshot, placed: dict[str, tuple | str]) -> dict[str, list[int]]:
    dims = snap.dimensions
    used = {hid: [0] * len(dims) for hid in snap.hosts}

    def add(hid, amounts):
        used[hid] = [u + a for u, a in zip(used[hid], amounts)]

    for wid, hosts in placed.items():
        for hid in (hosts,) if isinstance(hosts, str) else hosts:
            add(hid, _charge(snap.workloads[wid], snap.hosts[hid], dims))
    for spec, replicas in snap.services.values():
        for hid in replicas:
            add(hid, _charge(spec, snap.hosts[hid], dims))
    if "ssd" in dims:
        ssd = dims.index("ssd")
        for size, replicas in snap.volumes.values():
            for hid in replicas:
                used[hid][ssd] += size
    return used


def _creates_volumes(w: Workload) -> bool:
    return any(isinstance(v, Volume) for v in w.volumes)


class _Checker:
    def __init__(self, snap: Snapshot):
        self.snap = snap
        self.dims = snap.dimensions
        self.limits = {hid: _limit(h, self.dims) for hid, h in snap.hosts.items()}
        self.volume_hosts = {vid: set(hs) for vid, (_, hs) in snap.volumes.items()}
        self.initial_skew: dict[tuple[str, str], int] = {}   # set by the first state checked
        self.group_members: dict[str, set[str]] = defaultdict(set)
        self.rules_to: dict[str, set[str]] = defaultdict(set)  # group -> workloads with a hard rule to it
        self.spread_rules: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for wid, w in snap.workloads.items():
            if w.group is not None:
                self.group_members[w.group].add(wid)
                self.spread_rules[w.group].update((r.topology, r.max_skew) for r in w.spread if r.hard)
            for a in (*w.affinity, *w.anti_affinity):
                if a.hard:
                    self.rules_to[a.group].add(wid)
        self.domains = {key: {self._domain(h, key) for h in snap.hosts} - {None}
                        for rules in self.spread_rules.values() for key, _ in rules}
        # Load that never moves per host: per-host replicas, volume replicas, unnamed load.
        fixed = _named_usage(snap, {})
        self.static_use = {h: [a + b for a, b in zip(fixed[h], snap.unnamed.get(h, [0] * len(self.dims)))]
                           for h in snap.hosts}
        self.any_dedicated = any(w.isolation == "dedicated" for w in snap.workloads.values())
        self.used: dict[str, list[int]] | None = None            # usage per host between steps
        self.on_host: dict[str, set[str]] = defaultdict(set)    # the workloads on each host, between steps
        for wid, h in snap.where.items():
            self.on_host[h].add(wid)

    def _domain(self, hid: str, key: str) -> str | None:
        return hid if key == "host" else self.snap.hosts[hid].labels.get(key)

    def arrival(self, w: Workload, hid: str) -> list[str]:
        """What the core checks of the host alone when a workload arrives (static rules)."""
        host = self.snap.hosts[hid]
        out = []
        if w.numa:
            out.append("a NUMA-pinned VM never moves")
        if w.per_host:
            out.append("a per-host service never moves")
        if _creates_volumes(w):
            out.append("a workload that created volumes never moves (its replicas stay)")
        if host.state != "ready":
            out.append(f"target is {host.state}, not ready")
        if not all(term.matches(host.labels) for term in w.selector):
            out.append("target does not match the selector " + ", ".join(map(str, w.selector)))
        if w.kind == "vm" and host.labels.get("kvm") != "true":
            out.append("a VM needs a host labelled kvm=true")
        for taint in host.taints:
            if taint.effect == "NoSchedule" and not any(t.tolerates(taint) for t in w.tolerations):
                out.append(f"taint {taint} is not tolerated")
        for v in w.volumes:
            if isinstance(v, str) and hid not in self.volume_hosts.get(v, ()):
                out.append(f"volume {v} has no replica on the target")
        return out

    def violations(self, present: _Present, hosts: set[str], wids: set[str], groups: set[str],
                   arrivals: dict[str, str] | None = None) -> dict[tuple, str]:
        """Broken dynamic rules in a state, on `hosts` (capacity, tenancy), for `wids`
        (affinity, anti-affinity) and `groups` (spread); keyed so that the same breach in
        the initial state is recognised."""
        snap, dims = self.snap, self.dims
        arrivals = arrivals or {}
        out: dict[tuple, str] = {}
        receiving = set(arrivals.values())
        used = self._usage(present, hosts)
        for hid in hosts:
            for d, (u, lim) in enumerate(zip(used[hid], self.limits[hid])):
                if u > lim:
                    key = ("capacity", hid, d) if hid not in receiving else ("capacity", hid, d, "arrival")
                    out[key] = f"host {hid}: {dims[d]} {u} over its limit {lim}"
        on_host: dict[str, list[str]] = {h: [] for h in hosts}
        if self.any_dedicated:
            for h, wid in self._on(present, hosts):
                on_host[h].append(wid)
        for hid in hosts:
            wl = on_host[hid]
            holders = {snap.workloads[w].tenant for w in wl if snap.workloads[w].isolation == "dedicated"}
            if not holders:
                continue
            tenants = {snap.workloads[w].tenant for w in wl}
            unnamed = any(x > 0 for x in snap.unnamed.get(hid, ()))
            if len(tenants) > 1 or unnamed:
                movers = sorted(w for w in wl if arrivals.get(w) == hid)
                key = ("tenant", hid) if not movers else ("tenant", hid, tuple(movers))
                out[key] = (f"host {hid}: dedicated tenant {', '.join(sorted(holders))} shares it with tenants "
                            f"{sorted(map(str, tenants - holders))}" + (" and unnamed load" if unnamed else "")
                            + (f" (workload {', '.join(movers)} arriving)" if movers else ""))
        counts: dict[tuple[str, str], dict[str, set[str]]] = {}

        def members(group: str, key: str) -> dict[str, set[str]]:
            """Workloads of `group` per domain of `key`, each counted on every host it is on."""
            table = counts.get((group, key))
            if table is None:
                table = counts[(group, key)] = defaultdict(set)
                for m in self.group_members.get(group, ()):
                    for hid in present.hosts(m):
                        dom = self._domain(hid, key)
                        if dom is not None:
                            table[dom].add(m)
            return table

        for wid in wids:
            w = snap.workloads[wid]
            for hid in present.hosts(wid):
                for a in w.affinity:
                    if not a.hard:
                        continue
                    dom = self._domain(hid, a.topology)
                    others = members(a.group, a.topology).get(dom, set()) - {wid} if dom is not None else set()
                    alone = w.group == a.group and not (self.group_members[a.group] - {wid})
                    if not others and not alone:
                        out[("affinity", wid, hid, a.group, a.topology)] = (
                            f"workload {wid} on host {hid}: hard affinity to group {a.group} by {a.topology}: "
                            "none of the group in its domain")
                for a in w.anti_affinity:
                    if not a.hard:
                        continue
                    dom = self._domain(hid, a.topology)
                    others = members(a.group, a.topology).get(dom, set()) - {wid} if dom is not None else set()
                    if others:
                        out[("anti_affinity", wid, hid, a.group, a.topology)] = (
                            f"workload {wid} on host {hid}: hard anti-affinity to group {a.group} by {a.topology}: "
                            f"shares its domain with {', '.join(sorted(others))}")
        for group in groups:
            for key, max_skew in self.spread_rules.get(group, ()):
                table = members(group, key)
                sizes = [sum(len(present.hosts(m)) for m in table.get(dom, ())) for dom in self.domains[key]]
                if sizes:
                    skew = max(sizes) - min(sizes)
                    allowed = self.initial_skew.setdefault((group, key), max(skew, max_skew))
                    if skew > allowed:
                        out[("spread", group, key, skew)] = (
                            f"group {group}: spread by {key} has skew {skew} above {max_skew}"
                            + (f" (and above {allowed} before the plan)" if allowed > max_skew else ""))
        return out

    def _on(self, present: _Present, hosts: set[str]):
        """(host, workload) for every workload counted on one of `hosts`."""
        for h in hosts:
            for wid in self.on_host.get(h, ()):
                yield h, wid
        for wid, t in present.arrivals.items():
            if t in hosts:
                yield t, wid

    def _usage(self, present: _Present, hosts: set[str]) -> dict[str, list[int]]:
        """Usage of `hosts`: between steps (kept in `used`) plus the copies arriving."""
        snap, dims = self.snap, self.dims
        if self.used is None:       # the first state: every host from its workloads
            self.used = {h: list(self.static_use[h]) for h in snap.hosts}
            for h, wid in self._on(present, set(snap.hosts)):
                self.used[h] = [u + c for u, c in zip(self.used[h], _charge(snap.workloads[wid], snap.hosts[h], dims))]
        out = {h: self.used[h] for h in hosts}
        for wid, t in present.arrivals.items():
            out[t] = [u + c for u, c in zip(out[t], _charge(snap.workloads[wid], snap.hosts[t], dims))]
        return out

    def moved(self, arrivals: dict[str, str], sources: dict[str, str]) -> None:
        """The step ended: its workloads left their sources."""
        snap, dims = self.snap, self.dims
        for wid, t in arrivals.items():
            s = sources[wid]
            w = snap.workloads[wid]
            self.on_host[s].discard(wid)
            self.on_host[t].add(wid)
            self.used[s] = [u - c for u, c in zip(self.used[s], _charge(w, snap.hosts[s], dims))]
            self.used[t] = [u + c for u, c in zip(self.used[t], _charge(w, snap.hosts[t], dims))]
