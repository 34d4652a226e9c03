"""Placement constraints, one behaviour per test, with the arithmetic in comments."""
import numpy as np
import pytest

from hci_scheduler import (
    Affinity, Cluster, DuplicateId, Host, LabelExpr, NotFound, Spread, StateConflict, Taint, Toleration,
    Unschedulable, ValidationError, Volume, Workload,
)


def host(id, cpu=8000, memory=16000, ssd=1000, **kw):
    return Host(id, capacity={"cpu": cpu, "memory": memory, "ssd": ssd}, **kw)


def wl(id, cpu=1000, memory=1000, **kw):
    return Workload(id, requests={"cpu": cpu, "memory": memory}, **kw)


@pytest.fixture
def racks():
    """Six hosts: zones a/b, racks r1..r3 (two hosts each), h5 labelled kvm=true."""
    c = Cluster()
    for i in range(6):
        labels = {"zone": "a" if i < 3 else "b", "rack": f"r{i // 2 + 1}"}
        if i == 5:
            labels["kvm"] = "true"
        c.add_host(host(f"h{i}", labels=labels))
    return c


@pytest.mark.parametrize(
    "selector,allowed",
    [
        ({"zone": "b"}, {"h3", "h4", "h5"}),
        ([LabelExpr("rack", "In", ("r1", "r3"))], {"h0", "h1", "h4", "h5"}),
        ([LabelExpr("zone", "NotIn", ("a",))], {"h3", "h4", "h5"}),
        ([LabelExpr("kvm", "Exists")], {"h5"}),
        ([LabelExpr("kvm", "DoesNotExist"), LabelExpr("rack", "In", ("r3",))], {"h4"}),
    ],
    ids=["equality", "In", "NotIn", "Exists", "DoesNotExist and In"],
)
def test_selector_limits_hosts(racks, selector, allowed):
    expl = racks.explain(wl("w", selector=selector))
    assert expl.feasible == len(allowed)
    got = {racks.place(wl(f"w{i}", cpu=8000, selector=selector)).host_id for i in range(len(allowed))}
    assert got == allowed
    with pytest.raises(Unschedulable, match="node selector"):
        racks.place(wl("extra", cpu=1, selector=selector))


def test_selector_text_counts_hosts(racks):
    expl = racks.explain(wl("w", selector={"zone": "b"}))
    assert expl.filters == {"node selector zone In (b)": 3}


def test_none_means_no_terms_and_a_bare_string_is_refused(racks):
    w = wl("w", selector=None, tolerations=None, anti_affinity=[Affinity("db", "rack")], spread=None)
    assert w.selector == () and w.spread == () and w.tolerations == ()
    assert racks.explain(w).feasible == 6
    with pytest.raises(ValidationError, match="selector must be a list"):
        wl("x", selector="zone=a", anti_affinity=[Affinity("db", "rack")])


def test_taints_need_tolerations(racks):
    racks.update_host("h0", taints=[Taint("gpu", "yes", "NoSchedule")])
    for i in range(1, 6):
        racks.cordon(f"h{i}")
    with pytest.raises(Unschedulable, match="untolerated taint"):
        racks.place(wl("w"))
    assert racks.place(wl("t", tolerations=[Toleration("gpu")])).host_id == "h0"           # any value
    assert racks.place(wl("u", tolerations=[Toleration("gpu", "yes", "NoSchedule")])).host_id == "h0"
    with pytest.raises(Unschedulable):
        racks.place(wl("v", tolerations=[Toleration("gpu", "no")]))                        # wrong value


def test_prefer_no_schedule_only_lowers_the_score():
    c = Cluster()
    c.add_hosts([host("a", taints=[Taint("old", "", "PreferNoSchedule")]), host("b", cpu=16000)])
    # binpack alone prefers the tighter host a; the PreferNoSchedule penalty (50) outweighs
    # the key difference (a: 8000/16000 + 16000/16000 + 1 = 2.5 of 3; b: 3 of 3 -> 16.7 points)
    assert c.place(wl("w")).host_id == "b"
    c.cordon("b")
    assert c.place(wl("x")).host_id == "a"  # still allowed


def test_vm_needs_kvm_host_and_is_never_overcommitted():
    c = Cluster()
    c.add_hosts([
        host("plain", cpu=8000, allocation_ratio={"cpu": 4.0}),
        host("kvm", cpu=8000, memory=16000, labels={"kvm": "true"}, allocation_ratio={"cpu": 4.0, "memory": 2.0}),
    ])
    # containers on the kvm host may use 4 x 8000 = 32000 millicores
    expl = c.explain(Workload("vm0", {"cpu": 1000}, kind="vm"))
    assert expl.filters == {"VM needs a host labelled kvm=true": 1}
    p = c.place(Workload("vm1", {"cpu": 6000, "memory": 12000}, kind="vm"))
    assert p.host_id == "kvm"
    # the VM is charged at ratio 1.0: 6000 real cores = 24000 of 32000 container millicores,
    # 12000 MiB real = 24000 of the 32000 overcommitted MiB
    assert c.usage()[c.host_index("kvm")][:2].tolist() == [24000, 24000]
    # a second VM asking 2001 millicores would need 8004 > 8000 remaining: refused
    with pytest.raises(Unschedulable):
        c.place(Workload("vm2", {"cpu": 2001}, kind="vm"))
    # ... but containers still fit in the overcommitted remainder (32000 - 24000 = 8000)
    c.place(Workload("c1", {"cpu": 8000}, selector={"kvm": "true"}))


def test_vm_numa_fit():
    c = Cluster()
    c.add_host(host("n", cpu=16000, memory=32000, labels={"kvm": "true"},
                    numa=[{"cpu": 8000, "memory": 16000}, {"cpu": 8000, "memory": 16000}]))
    c.add_host(host("flat", cpu=32000, memory=64000, labels={"kvm": "true"}))
    # 10 cores fit the host but not one NUMA node: refused on n, and flat declares no nodes
    with pytest.raises(Unschedulable, match="NUMA"):
        c.place(Workload("big", {"cpu": 10000, "memory": 1000}, kind="vm", numa=True))
    c.place(Workload("v1", {"cpu": 6000, "memory": 1000}, kind="vm", numa=True))
    c.place(Workload("v2", {"cpu": 6000, "memory": 1000}, kind="vm", numa=True))   # the other node
    with pytest.raises(Unschedulable):
        c.place(Workload("v3", {"cpu": 3000, "memory": 1000}, kind="vm", numa=True))  # 2000 left per node
    c.release("v1")
    c.place(Workload("v3", {"cpu": 3000, "memory": 1000}, kind="vm", numa=True))
    with pytest.raises(ValidationError):
        c.place(Workload("ct", {"cpu": 1}, numa=True))


def test_hard_anti_affinity_per_host_and_symmetric(racks):
    for i in range(6):
        racks.place(wl(f"db{i}", group="db", anti_affinity=[Affinity("db", "host")]))
    assert len(set(racks.assignments().values())) == 6
    with pytest.raises(Unschedulable, match="anti-affinity with group db on host: 6 hosts"):
        racks.place(wl("db6", group="db", anti_affinity=[Affinity("db", "host")]))
    # symmetric: a db workload without the term still keeps off the others' hosts
    with pytest.raises(Unschedulable, match="anti-affinity of placed workloads against group db"):
        racks.place(wl("db7", group="db"))


def test_anti_affinity_by_rack(racks):
    hosts = [racks.place(wl(f"w{i}", group="web", anti_affinity=[Affinity("web", "rack")])).host_id
             for i in range(3)]
    rack_of = {h.id: h.labels["rack"] for h in racks.hosts()}
    assert len({rack_of[h] for h in hosts}) == 3
    with pytest.raises(Unschedulable):
        racks.place(wl("w3", group="web", anti_affinity=[Affinity("web", "rack")]))


def test_soft_anti_affinity_spreads_then_packs(racks):
    hosts = [racks.place(wl(f"w{i}", group="web", anti_affinity=[Affinity("web", "host", hard=False, weight=100)])).host_id
             for i in range(7)]
    # weight 100 outweighs any packing gain: six distinct hosts first, the seventh shares
    assert len(set(hosts[:6])) == 6 and hosts[6] in hosts[:6]


def test_affinity_follows_the_group(racks):
    db = racks.place(wl("db", group="db", selector={"rack": "r2"})).host_id
    p = racks.place(wl("app", affinity=[Affinity("db", "rack")]))
    rack_of = {h.id: h.labels["rack"] for h in racks.hosts()}
    assert rack_of[p.host_id] == rack_of[db] == "r2"
    # without any db workload, a hard affinity to it cannot be met
    with pytest.raises(Unschedulable, match="affinity with group cache on zone"):
        racks.place(wl("x", affinity=[Affinity("cache", "zone")]))
    # ... unless the workload is the first of its own group
    racks.place(wl("c0", group="cache", affinity=[Affinity("cache", "zone")]))


def test_spread_max_skew(racks):
    zone = {h.id: h.labels["zone"] for h in racks.hosts()}
    counts = {"a": 0, "b": 0}
    for i in range(6):
        counts[zone[racks.place(wl(f"s{i}", group="s", spread=[Spread("zone", max_skew=1)])).host_id]] += 1
        assert abs(counts["a"] - counts["b"]) <= 1
    with pytest.raises(ValidationError, match="needs a group"):
        racks.place(wl("nogroup", spread=[Spread("zone")]))


def test_unknown_topology_key_is_a_validation_error_and_changes_nothing(racks):
    before = racks.usage()
    with pytest.raises(ValidationError, match="topology key 'row'"):
        racks.place(wl("w", group="g", anti_affinity=[Affinity("g", "row")]))
    np.testing.assert_array_equal(before, racks.usage())
    assert racks.assignments() == {}


def test_dedicated_tenant_isolation():
    c = Cluster()
    c.add_hosts([host("a"), host("b")])
    c.place(wl("t1-shared", tenant="t1"))
    d = c.place(wl("t2-ded", tenant="t2", isolation="dedicated"))
    # t2 needs a host without other tenants: not t1's host
    assert d.host_id != c.assignments()["t1-shared"]
    # no other tenant lands on t2's host while it runs, even when it is the tighter fit
    for i in range(3):
        assert c.place(wl(f"t1-{i}", tenant="t1")).host_id != d.host_id
    shared = "a" if d.host_id == "b" else "b"
    c.cordon(shared)
    with pytest.raises(Unschedulable, match="tenant isolation"):
        c.place(wl("t1-blocked", cpu=100, tenant="t1"))
    assert c.place(wl("t2-more", tenant="t2")).host_id == d.host_id   # its own tenant is welcome
    c.release("t2-ded")
    c.place(wl("t1-after", cpu=100, tenant="t1"))  # no dedicated workload left: open to anyone


def test_volumes_replicas_and_locality(racks):
    hosts = racks.add_volume(Volume("v1", size_gib=400, replicas=3, spread="rack"))
    rack_of = {h.id: h.labels["rack"] for h in racks.hosts()}
    assert len({rack_of[h] for h in hosts}) == 3
    p = racks.place(wl("db", volumes=["v1"]))
    assert p.host_id in hosts
    with pytest.raises(DuplicateId):
        racks.add_volume(Volume("v1", size_gib=1))
    with pytest.raises(NotFound, match="unknown volume 'v9'"):
        racks.place(wl("x", volumes=["v9"]))
    with pytest.raises(StateConflict):
        racks.remove_volume("v1")
    # 1000 GiB ssd per host, 400 taken on three: a 700 GiB volume fits only on the other three hosts
    with pytest.raises(Unschedulable):
        racks.add_volume(Volume("v2", size_gib=700, replicas=4))
    assert racks.volumes() == {"v1": hosts}


def test_inline_volume_is_placed_with_its_workload(racks):
    p = racks.place(wl("db", volumes=[Volume("data-7", size_gib=600, replicas=3, spread="rack")]))
    reps = p.volumes["data-7"]
    assert p.host_id == reps[0] and len(reps) == 3
    rack_of = {h.id: h.labels["rack"] for h in racks.hosts()}
    assert len({rack_of[h] for h in reps}) == 3
    ssd = racks.usage()[:, racks.dimensions.index("ssd")]
    assert sorted(ssd.tolist()) == [0, 0, 0, 600, 600, 600]
    # a second 600 GiB volume with 3 replicas across racks: only three hosts have 1000 GiB free,
    # one per rack, so it still fits; a third does not, and nothing is left behind
    racks.place(wl("db2", volumes=[Volume("data-8", size_gib=600, replicas=3, spread="rack")]))
    before = racks.usage()
    with pytest.raises(Unschedulable):
        racks.place(wl("db3", volumes=[Volume("data-9", size_gib=600, replicas=3, spread="rack")]))
    np.testing.assert_array_equal(before, racks.usage())
    assert "data-9" not in racks.volumes()


def test_per_host_services_follow_hosts(racks):
    p = racks.place(Workload("ceph-osd", {"cpu": 500, "memory": 2000}, per_host=True, selector={"zone": "a"}))
    assert set(p.replicas) == {"h0", "h1", "h2"}
    racks.add_host(host("h6", labels={"zone": "a", "rack": "r4"}))
    racks.add_host(host("h7", labels={"zone": "b", "rack": "r4"}))
    assert racks.assignments()["ceph-osd@h6"] == "h6"
    assert "ceph-osd@h7" not in racks.assignments()
    racks.release("ceph-osd")
    assert not any(k.startswith("ceph-osd") for k in racks.assignments())


def test_gang_by_id_all_or_nothing(racks):
    before = racks.usage()
    members = [wl(f"g{i}", cpu=8000, gang="job-7") for i in range(7)]  # 7 full hosts > 6
    result = racks.place_batch(members + [wl("solo", cpu=100)])
    assert set(result.unplaced) == {m.id for m in members}
    assert "gang job-7 not placed" in str(result.unplaced["g0"]) or result.unplaced["g0"].feasible == 0
    assert set(result.placements) == {"solo"}
    racks.release("solo")
    np.testing.assert_array_equal(before, racks.usage())


def test_preemption_evicts_fewest_lowest_priority(racks):
    for i in range(6):
        racks.place(wl(f"low{i}", cpu=4000, priority=0))
        racks.place(wl(f"mid{i}", cpu=4000, priority=5))
    with pytest.raises(Unschedulable):
        racks.place(wl("urgent", cpu=4000, priority=10))
    p = racks.place(wl("urgent", cpu=4000, priority=10), preempt=True)
    # one victim is enough, and the lowest priority one is chosen
    assert len(p.evicted) == 1 and p.evicted[0].startswith("low")
    assert p.evicted[0] not in racks.assignments()
    # a workload never preempts equal or higher priority
    with pytest.raises(Unschedulable):
        racks.place(wl("peer", cpu=8000, priority=0), preempt=True)


def test_volume_pinned_to_named_hosts(racks):
    assert racks.add_volume(Volume("v1", size_gib=100, replicas=2, spread="rack"), hosts=["h0", "h2"]) == ["h0", "h2"]
    with pytest.raises(ValidationError, match="distinct rack"):
        racks.add_volume(Volume("v2", size_gib=100, replicas=2, spread="rack"), hosts=["h0", "h1"])  # both r1
    with pytest.raises(ValidationError, match="1 given for 2 replicas"):
        racks.add_volume(Volume("v3", size_gib=100, replicas=2), hosts=["h0"])
    with pytest.raises(Unschedulable):
        racks.add_volume(Volume("v4", size_gib=950, replicas=1), hosts=["h0"])  # 900 GiB left on h0
    assert racks.volumes() == {"v1": ["h0", "h2"]}


def test_live_domain_counts_follow_hosts_added_one_at_a_time_and_removed():
    """The counts behind the soft-term penalty floor (live domains and unlabelled hosts per
    topology), kept incrementally as hosts arrive one call at a time, equal a recount."""
    c = Cluster()
    c.add_host(host("h0", labels={"rack": "r0", "zone": "a"}))
    c.place(wl("seed", anti_affinity=[Affinity("web", "rack", hard=False), Affinity("web", "zone", hard=False)]))
    for i in range(1, 60):
        labels = {"rack": f"r{i // 7}"} if i % 5 else {}
        if i % 3:
            labels["zone"] = "ab"[i % 2]
        c.add_host(host(f"h{i}", labels=labels))
        if i % 11 == 0:
            c.remove_host(f"h{i - 4}")
    cons = c._cons
    live = [h for h in c.hosts()]
    for key in ("rack", "zone"):
        t = cons.topologies[key]
        assert cons.array("topo_live_doms")[t] == len({h.labels[key] for h in live if key in h.labels})
        assert cons.array("topo_missing")[t] == sum(key not in h.labels for h in live)


def test_restore_replays_a_batch_whose_rolled_back_gang_held_the_spread():
    """Gang members placed and then rolled back in the same batch made room in the zone
    spread for the others: replaying the surviving placements in their order breaks the
    spread at the last one, so a plain bind refuses it. bind(restore=True), for a store
    replaying its log, rebuilds the exact state, and still refuses a host without room."""
    def zones():
        c = Cluster(dimensions=("cpu", "memory"))
        c.add_hosts([Host(f"h{i}", {"cpu": 1000, "memory": 1000}, labels={"zone": "ab"[i % 2]}) for i in range(4)])
        return c

    sp = [Spread("zone", max_skew=1)]
    ws = [Workload("g1", {"cpu": 10, "memory": 10}, group="web", spread=sp, gang="G")]
    ws += [Workload(f"o{i}", {"cpu": 10, "memory": 10}, group="web", spread=sp) for i in (1, 2, 3)]
    ws += [Workload("g2", {"cpu": 10, "memory": 10}, group="web", spread=sp, gang="G"),
           Workload("o4", {"cpu": 10, "memory": 10}, group="web", spread=sp),
           Workload("g3", {"cpu": 5000, "memory": 10}, group="web", spread=sp, gang="G")]  # never fits
    live = zones()
    result = live.place_batch(ws, order="arrival")
    assert set(result.placements) == {"o1", "o2", "o3", "o4"}
    by_id = {w.id: w for w in ws}
    strict = zones()
    with pytest.raises(Unschedulable, match="spread"):
        for wid, hid in result.placements.items():
            strict.bind(by_id[wid], hid)
    restored = zones()
    for wid, hid in result.placements.items():
        restored.bind(by_id[wid], hid, restore=True)
    assert restored.assignments() == live.assignments()
    np.testing.assert_array_equal(restored.usage(), live.usage())
    with pytest.raises(Unschedulable, match="cpu"):
        restored.bind(Workload("big", {"cpu": 995, "memory": 1}), "h1", restore=True)
    assert "big" not in restored.assignments()


def test_new_racks_arriving_one_host_at_a_time_are_counted_in_place():
    """Hosts bringing new racks one call at a time, between placements with rack terms:
    new domains are counted in the reserved counter slots (no rebuild) until those run
    out, and every hard term still holds when recomputed from the assignments."""
    c = Cluster()
    c.add_host(host("h0", labels={"rack": "r0"}))
    anti = [Affinity("db", "rack")]  # hard: one db per rack
    c.place(wl("db0", group="db", anti_affinity=anti))
    placed = 1
    for i in range(1, 120):
        c.add_host(host(f"h{i}", labels={"rack": f"r{i // 2}"}))
        if i % 2 == 0:
            c.place(wl(f"db{placed}", group="db", anti_affinity=anti))
            placed += 1
    with pytest.raises(Unschedulable, match="anti-affinity"):
        c.place(wl("one-too-many", group="db", anti_affinity=anti))
    hosts = {h.id: h for h in c.hosts()}
    racks = [hosts[h].labels["rack"] for w, h in c.assignments().items()]
    assert len(racks) == placed == len(set(racks)) == 60  # one per rack, every rack used
    t = c._cons.topologies["rack"]
    assert c._cons.array("topo_live_doms")[t] == 60
