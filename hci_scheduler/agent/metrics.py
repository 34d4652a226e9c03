"""Prometheus metrics of one agent (`hci-scheduler agent --metrics HOST:PORT`).

Computed at scrape time from the agent's own fields by a collector, so the loops pay
nothing between scrapes. The age of the last relist is the agent's liveness signal (kubelet's
PLEG health): a relist that stops advancing means the engine hangs or the loop died.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        age = time.monotonic() - a.last_relist if a.last_relist else float("nan")
        yield GaugeMetricFamily(
            "hci_agent_relist_age_seconds", "Seconds since the last container relist", value=age
        )
        yield GaugeMetricFamily(
            "hci_agent_applied_sequence", "The last event sequence applied", value=a.sequence
        )
        yield GaugeMetricFamily(
            "hci_agent_workloads", "Workloads the log puts on this host", value=len(a.desired)
        )
        c = CounterMetricFamily(
            "hci_agent_container_actions",
            "Containers started, adopted, removed, restarted",
            labels=["action"],
        )
        for action, n in sorted(a.counts.items()):
            c.add_metric([action], n)
        yield c


def serve_metrics(agent, address: str) -> int:
    """Expose the agent's metrics on HOST:PORT; returns the bound port."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server.server_port
