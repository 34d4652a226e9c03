"""Prometheus metrics of the service (exposed by `serve --metrics HOST:PORT`).

The hot path only adds to plain counters under one lock; everything is turned
into Prometheus families at scrape time by a collector. prometheus_client's
own Counter and Histogram take a lock per value and walk the buckets in
Python, a visible share of a unary Place's server work for four updates
(bench/README.md has the count). Gauges that need the
cluster (hosts by state, utilisation per dimension) are computed at scrape
time too, so they cost nothing between scrapes.
"""
from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

RPC_SECONDS = "hci_scheduler_rpc_duration_seconds"
RPC_TOTAL = "hci_scheduler_rpc"  # exported as hci_scheduler_rpc_total
PLACEMENTS = "hci_scheduler_placements"
REFUSALS = "hci_scheduler_refusals"
BATCH_WORKLOADS = "hci_scheduler_writer_batch_workloads"
STATUS_REPORTS = "hci_scheduler_status_reports"  # exported as ..._total: ReportStatus calls applied
STATUSES_REPORTED = "hci_scheduler_statuses_reported"  # workload statuses those calls carried
HOSTS_MARKED_DOWN = "hci_scheduler_hosts_marked_down"  # hosts set DOWN for a silent agent
RESCHEDULED = "hci_scheduler_down_host_moves"  # containers re-placed off DOWN hosts

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class _Histogram:
    """Counts per bucket (upper bounds inclusive, as Prometheus's `le`) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class Metrics:
    """All metrics of one server, in their own registry (several servers may
    live in one process, as in tests). The hooks may be called from any thread."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._lock = threading.Lock()
        self._rpc_seconds: dict[str, _Histogram] = {}
        self._rpc_total: dict[tuple[str, str], int] = {}
        self._placements = 0
        self._refusals: dict[str, int] = {}
        self._batch = _Histogram(_BATCH_BUCKETS)
        self._reports = 0
        self._statuses = 0
        self._marked_down = 0
        self._rescheduled = 0
        self.registry.register(_Collector(self))

    def bind_state(self, state) -> None:
        """Register the scrape-time collector of the cluster gauges over `state`."""
        self.registry.register(_StateCollector(state))

    # hooks called by the state and the servicer
    def rpc(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            h = self._rpc_seconds.get(method)
            if h is None:
                h = self._rpc_seconds[method] = _Histogram(_LATENCY_BUCKETS)
            h.observe(seconds)
            key = (method, code)
            self._rpc_total[key] = self._rpc_total.get(key, 0) + 1

    def placed(self, n: int) -> None:
        with self._lock:
            self._placements += n

    def refused(self, reason: str) -> None:
        with self._lock:
            self._refusals[reason] = self._refusals.get(reason, 0) + 1

    def batch(self, n: int) -> None:
        if n:
            with self._lock:
                self._batch.observe(n)

    def status_report(self, n_statuses: int) -> None:
        with self._lock:
            self._reports += 1
            self._statuses += n_statuses

    def hosts_marked_down(self, n: int) -> None:
        with self._lock:
            self._marked_down += n

    def rescheduled(self, n: int) -> None:
        with self._lock:
            self._rescheduled += n

    def families(self) -> list:
        """The metrics as Prometheus families, read consistently under the lock."""
        with self._lock:
            seconds = HistogramMetricFamily(RPC_SECONDS, "RPC latency by method.", labels=["method"])
            for method, h in sorted(self._rpc_seconds.items()):
                seconds.add_metric([method], h.buckets(), h.sum)
            total = CounterMetricFamily(RPC_TOTAL, "RPCs by method and status code.", labels=["method", "code"])
            for (method, code), n in sorted(self._rpc_total.items()):
                total.add_metric([method, code], n)
            placements = CounterMetricFamily(PLACEMENTS, "Workloads placed.", value=self._placements)
            refusals = CounterMetricFamily(REFUSALS, "Workloads that fit nowhere, by the filter that "
                                           "removed the most hosts.", labels=["reason"])
            for reason, n in sorted(self._refusals.items()):
                refusals.add_metric([reason], n)
            batch = HistogramMetricFamily(BATCH_WORKLOADS, "Workloads carried by one writer batch "
                                          "(coalesced Place calls).",
                                          buckets=self._batch.buckets(), sum_value=self._batch.sum)
            agents = [
                CounterMetricFamily(STATUS_REPORTS, "ReportStatus calls applied (heartbeats included).",
                                    value=self._reports),
                CounterMetricFamily(STATUSES_REPORTED, "Workload statuses carried by ReportStatus calls.",
                                    value=self._statuses),
                CounterMetricFamily(HOSTS_MARKED_DOWN, "Hosts set DOWN because their agent fell silent.",
                                    value=self._marked_down),
                CounterMetricFamily(RESCHEDULED, "Containers re-placed off DOWN hosts by the down-host policy.",
                                    value=self._rescheduled),
            ]
        return [seconds, total, placements, refusals, batch, *agents]


class _Collector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        yield from self.metrics.families()


class _StateCollector:
    def __init__(self, state):
        self.state = state

    def collect(self):
        st = self.state.status()
        hosts = GaugeMetricFamily("hci_scheduler_hosts", "Hosts by state.", labels=["state"])
        for name, n in st.hosts_by_state.items():
            hosts.add_metric([name], n)
        yield hosts
        yield GaugeMetricFamily("hci_scheduler_hosts_down", "Hosts DOWN (their agent is silent).",
                                value=st.hosts_by_state.get("down", 0))
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
