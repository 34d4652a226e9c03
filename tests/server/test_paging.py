"""Paged listings (ListHosts, ListAllocations, ListVolumes), the client's iterators and the CLI.

What a user checks: the pages of a listing add up to the listing; under concurrent changes
no item comes twice and none that existed throughout is missing; bad sizes and tokens are
INVALID_ARGUMENT; a listing larger than gRPC's 4 MB message limit arrives in pages.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys

import grpc
import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.server import convert, paging
from hci_scheduler.server.state import SchedulerState
from hci_scheduler.store.memory import MemoryStore
from hci_scheduler.v1 import scheduler_pb2 as pb

from .conftest import ROOT, ServerProcess, make_host, make_workload, stub_for
from .test_security import TOKEN, pki  # noqa: F401 (pki is a fixture)

LISTINGS = {  # RPC -> (request type, repeated field, id of an item)
    "ListHosts": (pb.ListHostsRequest, "hosts", lambda h: h.id),
    "ListAllocations": (pb.ListAllocationsRequest, "allocations", lambda p: p.workload_id),
    "ListVolumes": (pb.ListVolumesRequest, "volumes", lambda v: v.volume_id),
}


def _pages(call, request) -> list:
    """Every page of a listing, following next_page_token."""
    pages = [call(request)]
    while pages[-1].next_page_token:
        request.page_token = pages[-1].next_page_token
        pages.append(call(request))
    return pages


def _items(pages, field: str) -> list:
    return [item for page in pages for item in getattr(page, field)]


def _code(fn) -> grpc.StatusCode | None:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return None


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("paging"), data_dir=None).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def filled(srv):
    """25 hosts (h0..h24, ssd on every one), 40 workloads, 12 volumes."""
    channel, stub = stub_for(srv.address)
    stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[
        pb.Host(id=f"h{i}", capacity={"cpu": 100_000, "memory": 100_000, "ssd": 1_000}) for i in range(25)]))
    stub.Place(pb.PlaceRequest(workloads=[make_workload(f"w{i}", cpu=10, memory=10) for i in range(40)],
                               strategy=pb.STRATEGY_SPREAD))
    for i in range(12):
        stub.Place(pb.PlaceRequest(workloads=[pb.Workload(id=f"db{i}", requests={"cpu": 1},
                                                          new_volumes=[pb.Volume(id=f"vol{i}", size_gib=1)])]))
    yield stub
    channel.close()


@pytest.mark.parametrize("rpc", sorted(LISTINGS))
@pytest.mark.parametrize("size", [1, 7, 0], ids=["size1", "size7", "default"])
def test_pages_concatenate_to_the_full_listing(filled, rpc, size):
    req_type, field, key = LISTINGS[rpc]
    call = getattr(filled, rpc)
    whole = call(req_type(page_size=10_000))
    assert not whole.next_page_token
    pages = _pages(call, req_type(page_size=size))
    assert [key(x) for x in _items(pages, field)] == [key(x) for x in getattr(whole, field)]
    n = len(getattr(whole, field))  # 25 hosts, 52 allocations, 12 volumes
    assert len(pages) == (-(-n // size) if size else 1)  # a full last page has no token after it
    assert all(p.sequence == whole.sequence for p in pages)


def test_allocations_come_in_placement_order_and_filters_page(filled):
    pages = _pages(filled.ListAllocations, pb.ListAllocationsRequest(page_size=5))
    seqs = [p.sequence for p in _items(pages, "allocations")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    on_h3 = filled.ListAllocations(pb.ListAllocationsRequest(host_id="h3")).allocations
    paged = _items(_pages(filled.ListAllocations, pb.ListAllocationsRequest(host_id="h3", page_size=1)),
                   "allocations")
    assert [p.workload_id for p in paged] == [p.workload_id for p in on_h3] and len(on_h3) >= 2
    assert {p.host_id for p in paged} == {"h3"}


def test_default_page_is_1000_and_size_is_capped_at_10000(tmp_path):
    server = ServerProcess(tmp_path).start()
    try:
        channel, stub = stub_for(server.address)
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host(f"n{i:05d}") for i in range(10_050)]))
        first = stub.ListHosts(pb.ListHostsRequest())
        assert len(first.hosts) == paging.DEFAULT_PAGE_SIZE == 1_000 and first.next_page_token
        capped = stub.ListHosts(pb.ListHostsRequest(page_size=1 << 30))
        assert len(capped.hosts) == paging.MAX_PAGE_SIZE == 10_000 and capped.next_page_token
        rest = stub.ListHosts(pb.ListHostsRequest(page_size=1 << 30, page_token=capped.next_page_token))
        assert [h.id for h in rest.hosts] == [f"n{i:05d}" for i in range(10_000, 10_050)]
        assert not rest.next_page_token
        channel.close()
    finally:
        server.kill()


def test_bad_page_sizes_and_tokens_are_invalid_argument(filled):
    hosts_token = filled.ListHosts(pb.ListHostsRequest(page_size=2)).next_page_token
    on_h1 = filled.ListAllocations(pb.ListAllocationsRequest(host_id="h1", page_size=1)).next_page_token
    assert hosts_token and on_h1
    bad = {
        "negative size": ("ListHosts", pb.ListHostsRequest(page_size=-1)),
        "not base64": ("ListHosts", pb.ListHostsRequest(page_token="not a token!")),
        "truncated": ("ListHosts", pb.ListHostsRequest(page_token=hosts_token[:-3])),
        "one char changed": ("ListHosts", pb.ListHostsRequest(page_token="B" + hosts_token[1:])),
        "a megabyte": ("ListHosts", pb.ListHostsRequest(page_token="A" * (1 << 20))),
        "another listing": ("ListVolumes", pb.ListVolumesRequest(page_token=hosts_token)),
        "another state": ("ListHosts", pb.ListHostsRequest(state=pb.HOST_STATE_READY, page_token=hosts_token)),
        "another host": ("ListAllocations", pb.ListAllocationsRequest(host_id="h2", page_token=on_h1)),
        "without the host filter": ("ListAllocations", pb.ListAllocationsRequest(page_token=on_h1)),
    }
    for what, (rpc, request) in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            getattr(filled, rpc)(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert "page_" in err.value.details(), what
    # The same tokens with their own listing and filter work.
    assert filled.ListHosts(pb.ListHostsRequest(page_token=hosts_token)).hosts
    assert filled.ListAllocations(pb.ListAllocationsRequest(host_id="h1", page_token=on_h1)).allocations


# -- concurrent changes ---------------------------------------------------------------


class _Churn:
    """A state in process and random mutations between pages, with fresh ids each time."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.state = SchedulerState(MemoryStore())
        self.n = 0
        self.register(30)
        self.place(60)

    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def register(self, k: int) -> None:
        hosts = [convert.normalize_host(pb.Host(id=self._id("h"), capacity={"cpu": 10_000, "memory": 10_000,
                                                                             "ssd": 100})) for _ in range(k)]
        self.state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))

    def place(self, k: int, volume: bool = False) -> None:
        ws = []
        for _ in range(k):
            w = pb.Workload(id=self._id("w"), requests={"cpu": 10, "memory": 10})
            if volume:
                w.new_volumes.add(id=self._id("v"), size_gib=1)
            ws.append(w)
        items = [convert.place_item(w, w.id, self.state.dimensions) for w in ws]
        self.state.execute("place", (items, False, self.rng.choice(["binpack", "spread"]), False))

    def ids(self, listing: str) -> list[str]:
        return [key(x) for x in self.whole(listing)]

    def whole(self, listing: str) -> list:
        method, field = {"hosts": ("list_hosts", "hosts"), "allocations": ("list_allocations", "allocations"),
                         "volumes": ("list_volumes", "volumes")}[listing]
        page = getattr(self.state, method)(page_size=paging.MAX_PAGE_SIZE)
        assert not page.next_page_token
        return list(getattr(page, field))

    def mutate(self) -> None:
        """A few random registrations, removals of empty hosts, placements, releases, volume deletions."""
        s, rng = self.state, self.rng
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(["register", "remove", "place", "volume", "release", "delete_volume"])
            if op == "register":
                self.register(rng.randint(1, 3))
            elif op == "place":
                self.place(rng.randint(1, 5))
            elif op == "volume":
                self.place(1, volume=True)
            elif op == "release":
                placed = [p.workload_id for p in self.whole("allocations")]
                if placed:
                    s.execute("release", (rng.sample(placed, min(len(placed), rng.randint(1, 6))), False))
            elif op == "remove":
                empty = [h.id for h in self.whole("hosts") if not h.workload_count and not h.used]
                if empty:
                    s.execute("remove", (rng.choice(empty),))
            elif op == "delete_volume":
                mounted = {v.volume_id for p in self.whole("allocations") for v in p.volumes}
                free = [v.volume_id for v in self.whole("volumes") if v.volume_id not in mounted]
                if free:
                    s.execute("delete_volume", (rng.choice(free),))


def key(item) -> str:
    return getattr(item, "id", "") or getattr(item, "workload_id", "") or item.volume_id


@pytest.mark.parametrize("listing", ["hosts", "allocations", "volumes"])
@pytest.mark.parametrize("seed", range(6))
def test_concurrent_changes_never_duplicate_or_skip(listing, seed):
    churn = _Churn(seed)
    for _ in range(8):
        churn.place(1, volume=True)
    method = {"hosts": "list_hosts", "allocations": "list_allocations", "volumes": "list_volumes"}[listing]
    size = churn.rng.choice([1, 3, 7])
    before = churn.ids(listing)
    listed, token, seen_each_page = [], "", []
    while True:
        page = getattr(churn.state, method)(page_size=size, page_token=token)
        listed += [key(x) for x in getattr(page, listing)]
        seen_each_page.append(set(churn.ids(listing)))
        token = page.next_page_token
        if not token:
            break
        if len(seen_each_page) <= 15:  # then let the listing catch up with the new items
            churn.mutate()
    assert len(listed) == len(set(listed)), "an item came twice"
    throughout = set(before).intersection(*seen_each_page)
    assert throughout <= set(listed), f"skipped {sorted(throughout - set(listed))}"
    # In order: items that exist now come in the order a fresh listing gives them.
    now = churn.ids(listing)
    position = {x: i for i, x in enumerate(now)}
    kept = [position[x] for x in listed if x in position]
    assert kept == sorted(kept)
    if listing == "allocations":
        assert len(now) > 20  # the churn kept the listing busy


def test_allocation_order_survives_heavy_release_and_replay():
    """Dead entries of the order are dropped once they outnumber the live ones, and a
    state rebuilt from the log lists the same pages."""
    churn = _Churn(99)
    churn.place(3000)
    placed = [p.workload_id for p in churn.whole("allocations")]
    first = churn.state.list_allocations(page_size=10)
    churn.state.execute("release", (placed[5:2900], False))  # leaves the order mostly dead
    rest = _items(_pages(lambda r: churn.state.list_allocations(page_size=50, page_token=r.page_token),
                         pb.ListAllocationsRequest(page_token=first.next_page_token)), "allocations")
    listed = [p.workload_id for p in first.allocations] + [p.workload_id for p in rest]
    assert listed == placed[:10] + placed[2900:]
    replayed = SchedulerState(churn.state.store)
    assert [p.workload_id for p in replayed.list_allocations(page_size=10_000).allocations] == placed[:5] + placed[2900:]


# -- larger than one message ---------------------------------------------------------------


def test_a_listing_beyond_the_message_limit_arrives_in_pages(tmp_path):
    # 200 workloads with 64 tolerations of 373 characters: ~24 KB each, ~5 MB in all,
    # over gRPC's 4 MiB default receive limit, which a one-message listing would break.
    server = ServerProcess(tmp_path).start()
    try:
        channel, stub = stub_for(server.address)
        stub.RegisterHosts(pb.RegisterHostsRequest(hosts=[make_host("big", cpu=10**9, memory=10**9)]))
        for first in range(0, 200, 20):
            ws = []
            for i in range(first, first + 20):
                w = make_workload(f"fat-{i:03d}", cpu=1, memory=1)
                for t in range(64):
                    w.tolerations.add(key=f"{'p' * 240}.example/{'k' * 59}{t:02d}", value="v" * 63)
                ws.append(w)
            assert all(p.host_id == "big" for p in stub.Place(pb.PlaceRequest(workloads=ws)).placements)
        pages = _pages(stub.ListAllocations, pb.ListAllocationsRequest(include_workloads=True,
                                                                       page_size=paging.MAX_PAGE_SIZE))
        sizes = [p.ByteSize() for p in pages]
        assert sum(sizes) > 4 << 20 and max(sizes) < 4 << 20 and len(pages) >= 2
        listed = _items(pages, "allocations")
        assert [p.workload_id for p in listed] == [f"fat-{i:03d}" for i in range(200)]
        assert all(len(p.workload.tolerations) == 64 for p in listed)
        channel.close()
    finally:
        server.kill()


# -- the client and the CLI ----------------------------------------------------------------


def test_client_iterators_follow_pages(filled, srv):
    with SchedulerClient(srv.address) as c:
        hosts = c.hosts(page_size=4)
        assert [h.id for h in hosts] == [f"h{i}" for i in range(25)]
        assert hosts.pages == 7 and hosts.sequence == c.status().last_sequence
        every = filled.ListAllocations(pb.ListAllocationsRequest(include_workloads=True)).allocations
        got = list(c.allocations(include_workloads=True, page_size=3))
        assert got == list(every)
        assert [p.workload_id for p in c.allocations("h0", page_size=1)] == \
            [p.workload_id for p in every if p.host_id == "h0"]
        assert [v.volume_id for v in c.volumes(page_size=5)] == [f"vol{i}" for i in range(12)]
        assert [h.id for h in c.hosts("down")] == []
        with pytest.raises(grpc.RpcError) as err:
            list(c.hosts(page_size=-2))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_thin_calls_and_watch(srv):
    with SchedulerClient(srv.address) as c:
        c.register_hosts([make_host("cl-h1", cpu=1000, memory=1000)])
        placed = c.place([make_workload("cl-w1", cpu=100, memory=100)], strategy="spread")
        assert placed.placements[0].host_id and placed.placements[0].sequence
        assert c.update_host("cl-h1", labels={"zone": "z"}).host.labels == {"zone": "z"}
        assert c.explain(make_workload("cl-x", cpu=10**9)).explanation.message
        assert list(c.release(["cl-w1"]).released_workload_ids) == ["cl-w1"]
        first = placed.placements[0].sequence
        events = c.watch(after=first - 1)
        assert next(events).workload_id == "cl-w1"
        events.close()
        assert c.status().hosts_by_state["ready"] >= 1
        assert c.remove_host("cl-h1").sequence


def _cli(address: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", *args, "--server", address],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_listings_print_every_page(filled, srv):
    hosts = json.loads(_cli(srv.address, "hosts", "list", "--json", "--page-size", "2"))
    assert [h["id"] for h in hosts["hosts"]][:25] == [f"h{i}" for i in range(25)]
    assert "next_page_token" not in hosts and int(hosts["sequence"]) > 0
    table = _cli(srv.address, "hosts", "list", "--page-size", "3")
    assert "h0" in table and "h24" in table
    allocs = json.loads(_cli(srv.address, "allocations", "--json", "--page-size", "4"))
    ids = [a["workload_id"] for a in allocs["allocations"]]
    assert {f"w{i}" for i in range(40)} <= set(ids) and len(ids) == len(set(ids))
    assert "w39" in _cli(srv.address, "allocations", "--page-size", "4")
    volumes = json.loads(_cli(srv.address, "volumes", "list", "--json", "--page-size", "5"))
    assert [v["volume_id"] for v in volumes["volumes"]] == [f"vol{i}" for i in range(12)]
    assert "vol11" in _cli(srv.address, "volumes", "list", "--page-size", "5")


def test_client_and_cli_connect_with_mutual_tls_and_a_token(tmp_path, pki):  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# operators\n{TOKEN}\n")
    (cert, key), (ca, _), (client_cert, client_key) = pki["server"], pki["ca"], pki["client"]
    server = ServerProcess(tmp_path, extra=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca",
                                            str(ca), "--token-file", str(tokens)]).start()
    address = f"localhost:{server.port}"
    try:
        tls = dict(tls_ca=ca, tls_cert=client_cert, tls_key=client_key.read_bytes())  # a path or PEM bytes
        with SchedulerClient(address, token=TOKEN, **tls) as c:
            c.register_hosts([make_host(f"t{i}") for i in range(3)])
            assert [h.id for h in c.hosts(page_size=2)] == ["t0", "t1", "t2"]
        with SchedulerClient(address, **tls) as c:
            assert _code(c.status) == grpc.StatusCode.UNAUTHENTICATED
        with SchedulerClient(address, token=TOKEN, tls_ca=ca) as c:  # no client certificate
            assert _code(c.status) == grpc.StatusCode.UNAVAILABLE
        listed = json.loads(_cli(address, "hosts", "list", "--json", "--page-size", "1", "--tls-ca", str(ca),
                                 "--tls-cert", str(client_cert), "--tls-key", str(client_key),
                                 "--token-file", str(tokens)))
        assert [h["id"] for h in listed["hosts"]] == ["t0", "t1", "t2"]
    finally:
        server.kill()
