"""Paged listings on the server's state, in process (no gRPC): what a page costs.

    python3 -m hci_scheduler.bench.paging [--hosts 10000] [--allocations 200000] [--page-size 1000]

Builds a state over the memory store with `--hosts` hosts and `--allocations` placed
containers, then times:

* ListHosts: one page of `--page-size` hosts, against every host in one page (10,000 at most);
* ListAllocations: the whole listing in pages, with the time of the first and of the last
  pages (a listing that rescanned from its start would make the last pages the slowest:
  quadratic in the number of allocations), and with 1% of the allocations released and
  placed again between pages;
* ListVolumes is not timed here: volumes are listed whole by the Cluster (O(volumes) a page).

Only the placements are checked for the setup: the run stops if fewer were placed than asked.
"""
from __future__ import annotations

import argparse
import json
import time

from .report import machine


def _state(n_hosts: int, n_allocations: int):
    from hci_scheduler.server import convert
    from hci_scheduler.server.state import SchedulerState
    from hci_scheduler.store.memory import MemoryStore
    from hci_scheduler.v1 import scheduler_pb2 as pb

    state = SchedulerState(MemoryStore())
    hosts = [convert.normalize_host(pb.Host(id=f"host-{i:06d}", capacity={"cpu": 1 << 40, "memory": 1 << 40},
                                            labels={"zone": f"z{i % 3}", "rack": f"r{i % 40}"}))
             for i in range(n_hosts)]
    state.execute("register", (hosts, [convert.host_to_model(h) for h in hosts]))
    placed = 0
    for first in range(0, n_allocations, 10_000):
        ws = [pb.Workload(id=f"w-{i:07d}", requests={"cpu": 100, "memory": 128})
              for i in range(first, min(first + 10_000, n_allocations))]
        items = [convert.place_item(w, w.id, state.dimensions) for w in ws]
        placed += sum(1 for a in state.execute("place", (items, False, "spread", False)) if type(a) is tuple)
    if placed != n_allocations:
        raise SystemExit(f"setup: placed {placed} of {n_allocations}")
    return state, items


def _list_all(state, page_size: int, between=None) -> tuple[int, list[float]]:
    """Items listed and seconds per page, following tokens to the end."""
    token, n, times = "", 0, []
    while True:
        t0 = time.perf_counter()
        page = state.list_allocations(page_size=page_size, page_token=token)
        times.append(time.perf_counter() - t0)
        n += len(page.allocations)
        token = page.next_page_token
        if not token:
            return n, times
        if between is not None:
            between()


def run(n_hosts: int, n_allocations: int, page_size: int) -> dict:
    from hci_scheduler.server import convert

    state, last_items = _state(n_hosts, n_allocations)
    out: dict = {"machine": machine(), "hosts": n_hosts, "allocations": n_allocations, "page_size": page_size}

    def best(fn, repeat=5) -> float:
        return min(_timed(fn) for _ in range(repeat))

    out["list_hosts_page_ms"] = round(1e3 * best(lambda: state.list_hosts(page_size=page_size)), 2)
    out["list_hosts_all_ms"] = round(1e3 * best(lambda: state.list_hosts(page_size=10_000)), 2)

    n, times = _list_all(state, page_size)
    assert n == n_allocations, (n, n_allocations)
    k = max(1, len(times) // 10)
    out["list_allocations_total_s"] = round(sum(times), 3)
    out["list_allocations_first_pages_ms"] = round(1e3 * sum(times[:k]) / k, 2)
    out["list_allocations_last_pages_ms"] = round(1e3 * sum(times[-k:]) / k, 2)

    # Churn: between pages, release and place again 1% of the allocations (new sequences).
    churn = last_items[: max(1, n_allocations // 100 // max(1, len(times)))]
    ids = [it.wid for it in churn]

    def between():
        state.execute("release", (ids, False))
        items = [convert.place_item(it.proto, it.wid, state.dimensions) for it in churn]
        state.execute("place", (items, False, "spread", False))

    n, times = _list_all(state, page_size, between)
    out["list_allocations_churn_total_s"] = round(sum(times), 3)
    out["list_allocations_churn_last_pages_ms"] = round(1e3 * sum(times[-k:]) / k, 2)
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10_000)
    p.add_argument("--allocations", type=int, default=200_000)
    p.add_argument("--page-size", type=int, default=1_000)
    a = p.parse_args(argv)
    print(json.dumps(run(a.hosts, a.allocations, a.page_size), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
