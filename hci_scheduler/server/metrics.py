"""Prometheus metrics of the service (exposed by `serve --metrics HOST:PORT`).

Counters and histograms are updated on the hot path; gauges that need the
cluster (hosts by state, utilisation per dimension) are computed at scrape
time by a collector, so they cost nothing between scrapes.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """All metrics of one server, in their own registry (several servers may
    live in one process, as in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_seconds = Histogram("hci_scheduler_rpc_duration_seconds", "RPC latency by method.",
                                     ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_total = Counter("hci_scheduler_rpc", "RPCs by method and status code.",
                                 ["method", "code"], registry=r)
        self.placements = Counter("hci_scheduler_placements", "Workloads placed.", registry=r)
        self.refusals = Counter("hci_scheduler_refusals", "Workloads that fit nowhere, by the filter "
                                "that removed the most hosts.", ["reason"], registry=r)
        self.batch_size = Histogram("hci_scheduler_writer_batch_workloads",
                                    "Workloads carried by one writer batch (coalesced Place calls).",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self._state = None
        self._rpc_children: dict[tuple[str, str], tuple] = {}

    def bind_state(self, state) -> None:
        """Register the scrape-time collector over `state`."""
        self._state = state
        self.registry.register(_StateCollector(state))

    # hooks called by the state and the servicer
    def rpc(self, method: str, code: str, seconds: float) -> None:
        # labels() builds its key and takes a lock on every call: keep the children.
        children = self._rpc_children.get((method, code))
        if children is None:
            children = self._rpc_children[(method, code)] = (self.rpc_seconds.labels(method),
                                                              self.rpc_total.labels(method, code))
        children[0].observe(seconds)
        children[1].inc()

    def placed(self, n: int) -> None:
        self.placements.inc(n)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def batch(self, n: int) -> None:
        if n:
            self.batch_size.observe(n)


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        st = self.state.status()
        hosts = GaugeMetricFamily("hci_scheduler_hosts", "Hosts by state.", labels=["state"])
        for name, n in st.hosts_by_state.items():
            hosts.add_metric([name], n)
        yield hosts
        util = GaugeMetricFamily("hci_scheduler_utilization_ratio", "Used / allocatable per dimension.",
                                 labels=["dimension"])
        for d, v in st.utilization.items():
            util.add_metric([d], v)
        yield util
        yield GaugeMetricFamily("hci_scheduler_allocations", "Placed workloads.", value=st.allocations)
        yield GaugeMetricFamily("hci_scheduler_hosts_used", "Hosts running at least one workload.",
                                value=st.hosts_used)
        yield GaugeMetricFamily("hci_scheduler_last_sequence", "Sequence number of the last event.",
                                value=st.last_sequence)
