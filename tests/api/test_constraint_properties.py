"""Every hard constraint, recomputed independently from the placements, on random clusters.

The checker below knows only the hosts, the workloads and where they went; it
re-derives selectors, taints, VM charging, tenant isolation, affinity,
symmetric anti-affinity and spread skew at each placement, and capacity at
every step.
"""
import math

import numpy as np
from hypothesis import given, settings, strategies as st

from hci_scheduler import (
    Affinity, Cluster, Host, LabelExpr, Spread, Taint, Toleration, Unschedulable, Workload,
)

DIMS = ("cpu", "memory")


def labels_of(h: Host, key: str):
    return h.id if key == "host" else h.labels.get(key)


def selector_ok(w: Workload, h: Host) -> bool:
    if not all(e.matches(h.labels) for e in w.selector):
        return False
    return w.kind != "vm" or h.labels.get("kvm") == "true"


def charge(w: Workload, h: Host) -> np.ndarray:
    req = np.array([w.requests.get(d, 0) for d in DIMS], dtype=np.int64)
    if w.kind != "vm":
        return req
    ratio = [h.allocation_ratio.get(d, 1.0) for d in DIMS]
    return np.array([math.ceil(r * round(q * 1000) / 1000) for r, q in zip(req, ratio)], dtype=np.int64)


def check_placement(w: Workload, h: Host, hosts: dict, live: dict) -> None:
    """live: workload id -> (Workload, host id) before w was placed."""
    assert selector_ok(w, h), f"{w.id} on {h.id} breaks its selector"
    for t in h.taints:
        if t.effect == "NoSchedule":
            assert any(tol.tolerates(t) for tol in w.tolerations), f"{w.id} on {h.id} ignores taint {t}"
    others = [(ow, hosts[hid]) for ow, hid in live.values()]
    on_host = [ow for ow, oh in others if oh.id == h.id]
    if w.isolation == "dedicated":
        # nobody else's workloads, tenant-less ones included
        assert all(ow.tenant == w.tenant for ow in on_host), f"{w.id} dedicated on a shared host"
    for ow in on_host:
        if ow.isolation == "dedicated":
            assert w.tenant == ow.tenant, f"{w.id} on {h.id} held dedicated by {ow.tenant}"
    for a in w.anti_affinity:
        if a.hard:
            dom = labels_of(h, a.topology)
            if dom is not None:
                assert not any(ow.group == a.group and labels_of(oh, a.topology) == dom for ow, oh in others), \
                    f"{w.id} breaks anti-affinity {a}"
    for ow, oh in others:  # symmetric: their hard anti-affinity against w's group
        for a in ow.anti_affinity:
            if a.hard and w.group == a.group:
                dom = labels_of(h, a.topology)
                assert dom is None or labels_of(oh, a.topology) != dom, f"{w.id} next to {ow.id} that avoids it"
    for a in w.affinity:
        if a.hard:
            members = [(ow, oh) for ow, oh in others if ow.group == a.group]
            if not members and w.group == a.group:
                continue
            dom = labels_of(h, a.topology)
            assert dom is not None and any(labels_of(oh, a.topology) == dom for _, oh in members), \
                f"{w.id} breaks affinity {a}"
    for s in w.spread:
        if s.hard:
            eligible = {labels_of(x, s.topology) for x in hosts.values() if selector_ok(w, x)} - {None}
            counts = {d: 0 for d in eligible}
            for ow, oh in others:
                d = labels_of(oh, s.topology)
                if ow.group == w.group and d in counts:
                    counts[d] += 1
            dom = labels_of(h, s.topology)
            assert dom is not None
            assert counts.get(dom, 0) + 1 - min(counts.values()) <= s.max_skew, f"{w.id} breaks spread {s}"


def make_host(i: int, rng) -> Host:
    labels = {"zone": "ab"[i % 2], "rack": f"r{i % 4}"}
    if rng.random() < 0.5:
        labels["kvm"] = "true"
    taints = [Taint("dedicated", "x", "NoSchedule")] if rng.random() < 0.2 else []
    return Host(f"h{i}", {"cpu": int(rng.integers(2000, 9000)), "memory": int(rng.integers(2000, 9000))},
                labels=labels, taints=taints, allocation_ratio={"cpu": float(rng.choice([1.0, 2.0, 1.5]))})


def make_workload(i: int, rng) -> Workload:
    group = rng.choice([None, "g1", "g2"])
    tenant = rng.choice([None, "t1", "t2"])
    kw = {}
    if rng.random() < 0.3:
        kw["selector"] = [LabelExpr("zone", "In", ("a",))] if rng.random() < 0.5 else {"rack": f"r{rng.integers(4)}"}
    if rng.random() < 0.3:
        kw["tolerations"] = [Toleration("dedicated")]
    if rng.random() < 0.3:
        kw["anti_affinity"] = [Affinity(str(rng.choice(["g1", "g2"])), str(rng.choice(["host", "rack"])),
                                        hard=bool(rng.random() < 0.8))]
    if rng.random() < 0.15:
        kw["affinity"] = [Affinity(str(rng.choice(["g1", "g2"])), "zone")]
    if group and rng.random() < 0.3:
        kw["spread"] = [Spread("zone", max_skew=int(rng.integers(1, 3)))]
    return Workload(
        f"w{i}", {"cpu": int(rng.integers(0, 2500)), "memory": int(rng.integers(0, 2500))},
        kind="vm" if rng.random() < 0.25 else "container", tenant=tenant,
        isolation="dedicated" if tenant and rng.random() < 0.3 else "shared",
        group=group, **kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=st.sampled_from(["binpack", "spread", "balanced", "dot"]))
def test_random_constrained_placements_keep_every_hard_constraint(seed, strategy):
    rng = np.random.default_rng(seed)
    c = Cluster(dimensions=DIMS)
    hosts = {}
    for i in range(int(rng.integers(2, 12))):
        h = make_host(i, rng)
        c.add_host(h)
        hosts[h.id] = h
    live: dict[str, tuple[Workload, str]] = {}
    for i in range(int(rng.integers(5, 60))):
        if live and rng.random() < 0.25:
            wid = list(live)[int(rng.integers(len(live)))]
            c.release(wid)
            del live[wid]
        else:
            w = make_workload(i, rng)
            try:
                p = c.place(w, strategy=strategy)
            except Unschedulable as exc:
                assert exc.explanation.feasible == 0
                continue
            check_placement(w, hosts[p.host_id], hosts, live)
            live[w.id] = (w, p.host_id)
        # capacity, recomputed from scratch
        usage = {hid: np.zeros(2, dtype=np.int64) for hid in hosts}
        for w, hid in live.values():
            usage[hid] += charge(w, hosts[hid])
        for hid, h in hosts.items():
            limit = np.array([math.floor(h.capacity[d] * h.allocation_ratio.get(d, 1.0)) for d in DIMS])
            assert (usage[hid] <= limit).all(), f"{hid} overcommitted: {usage[hid]} > {limit}"
            np.testing.assert_array_equal(usage[hid], c.usage()[c.host_index(hid)])
        assert c.assignments() == {wid: hid for wid, (_, hid) in live.items()}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_volumes_keep_replica_spread_locality_and_ssd(seed):
    """Volumes (existing and created inline) on random racks: replicas on distinct domains,
    mounting workloads on a replica host, SSD never over capacity, release restores it."""
    from hci_scheduler import Volume

    rng = np.random.default_rng(seed)
    dims = ("cpu", "memory", "ssd")
    c = Cluster(dimensions=dims)
    hosts = {}
    for i in range(int(rng.integers(3, 10))):
        h = Host(f"h{i}", {"cpu": 8000, "memory": 8000, "ssd": int(rng.integers(100, 1000))},
                 labels={"rack": f"r{i % 3}"})
        c.add_host(h)
        hosts[h.id] = h
    volumes: dict[str, tuple[Volume, list[str]]] = {}
    mounts: dict[str, tuple[str, str]] = {}   # workload -> (volume, host)
    for i in range(int(rng.integers(3, 25))):
        spread = str(rng.choice(["host", "rack"]))
        v = Volume(f"v{i}", size_gib=int(rng.integers(10, 300)), replicas=int(rng.integers(1, 4)), spread=spread)
        try:
            if rng.random() < 0.5:
                reps = c.add_volume(v)
                host_id = None
            else:
                p = c.place(Workload(f"w{i}", {"cpu": 100}, volumes=[v]))
                reps, host_id = p.volumes[v.id], p.host_id
                assert host_id == reps[0]
                mounts[f"w{i}"] = (v.id, host_id)
        except Unschedulable:
            assert v.id not in c.volumes()
            continue
        volumes[v.id] = (v, reps)
        doms = [h if spread == "host" else hosts[h].labels["rack"] for h in reps]
        assert len(reps) == v.replicas and len(set(doms)) == len(doms)
        if host_id is None and rng.random() < 0.7:
            try:
                p = c.place(Workload(f"m{i}", {"cpu": 100}, volumes=[v.id]))
            except Unschedulable:
                continue
            assert p.host_id in reps
            mounts[f"m{i}"] = (v.id, p.host_id)
    ssd = {h: 0 for h in hosts}
    for v, reps in volumes.values():
        for h in reps:
            ssd[h] += v.size_gib
    for h, used in ssd.items():
        assert used <= hosts[h].capacity["ssd"]
        assert c.usage()[c.host_index(h), 2] == used
    for wid in mounts:
        c.release(wid)
    for vid in list(volumes):
        c.remove_volume(vid)
    assert c.usage().sum() == 0


def batch_and_one_by_one(hosts, requests, template, strategy):
    """Two clusters on `hosts`: one places `requests` as one template batch, the other as
    one `place` call per row; asserts both chose the same hosts and usage, returns both."""
    batch = Cluster(dimensions=DIMS)
    batch.add_hosts(hosts)
    got = batch.place_array(requests, strategy=strategy, template=template)
    single = Cluster(dimensions=DIMS)
    single.add_hosts(hosts)
    want = []
    for i, r in enumerate(requests):
        w = Workload(f"w{i}", dict(zip(DIMS, map(int, r))), group=template.group, selector=template.selector,
                     anti_affinity=template.anti_affinity, spread=template.spread)
        try:
            want.append(single.host_index(single.place(w, strategy=strategy).host_id))
        except Unschedulable:
            want.append(-1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(batch.usage(), single.usage())
    return batch, single


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=st.sampled_from(["binpack", "spread"]))
def test_template_batch_equals_one_by_one(seed, strategy):
    """A template batch (which walks a private index of the hosts its static filters admit,
    and re-files the shared index once at the end) places exactly as one call per row does."""
    rng = np.random.default_rng(seed)
    hosts = [make_host(i, rng) for i in range(int(rng.integers(2, 40)))]
    template = Workload("t", group="web", selector=[LabelExpr("zone", "In", ("a",))],
                        anti_affinity=[Affinity("web", "rack", hard=False, weight=int(rng.integers(1, 60)))],
                        spread=[Spread("rack", max_skew=int(rng.integers(1, 4)))] if rng.random() < 0.5 else [])
    requests = np.stack([rng.integers(0, 1500, 200), rng.integers(0, 1500, 200)], axis=1).astype(np.int64)
    batch, single = batch_and_one_by_one(hosts, requests, template, strategy)
    batch._state.index.check()
    assert batch._state.index.n_members == len(hosts)  # every host is filed again after the batch
    follow = Workload("after", {"cpu": 100, "memory": 100}, tolerations=[Toleration("dedicated")])

    def outcome(c):
        try:
            return c.place(follow, strategy=strategy).host_id
        except Unschedulable:
            return None

    assert outcome(batch) == outcome(single)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), strategy=st.sampled_from(["binpack", "spread"]))
def test_many_block_batch_with_soft_terms_equals_one_by_one(seed, strategy):
    """Hundreds of hosts with few distinct sizes (equal keys across many index blocks) and
    only soft terms that cannot fall within a batch (anti-affinity, PreferNoSchedule): the
    batch skips whole blocks by their cached least penalty, one-by-one calls price every
    host, and the two must choose the same hosts."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(300, 700))
    sizes = [(4000, 4000), (8000, 8000), (8000, 2000)]
    hosts = [Host(f"h{i}", dict(zip(DIMS, sizes[int(rng.integers(len(sizes)))])),
                  labels={"zone": "abc"[i % 3], "rack": f"r{i // int(rng.integers(5, 20))}"},
                  taints=[Taint("slow", "x", "PreferNoSchedule")] if rng.random() < 0.1 else [])
             for i in range(n)]
    anti = [Affinity("web", "rack", hard=False, weight=int(rng.integers(1, 40)))]
    if rng.random() < 0.5:
        anti.append(Affinity("web", "zone", hard=False, weight=int(rng.integers(1, 40))))
    template = Workload("t", group="web", anti_affinity=anti,
                        selector=[LabelExpr("zone", "In", ("a", "b"))] if rng.random() < 0.5 else None)
    requests = rng.integers(100, 2500, size=(int(rng.integers(100, 300)), 2)).astype(np.int64)
    batch, single = batch_and_one_by_one(hosts, requests, template, strategy)
    batch._state.index.check()
