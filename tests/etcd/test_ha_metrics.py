"""The HA metrics as Prometheus scrapes them from `serve --store etcd://... --metrics`: leader
changes, whether a replica leads, each follower's lag, and the etcd commit latency histogram
(one observation per fenced Txn the log's appends committed), on a leader, on its follower,
and on the follower once it took over."""
from __future__ import annotations

import urllib.request

import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.local_etcd import free_port
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

from .test_failover import leader_of, status, workload

pytestmark = pytest.mark.etcd


def replica(tmp_path, etcd, prefix: str) -> tuple[ServerProcess, int]:
    port = free_port()
    srv = ServerProcess(tmp_path, extra=["--store", etcd.url, "--etcd-prefix", prefix, "--lease-ttl-s", "1",
                                         "--snapshot-every", "0", "--metrics", f"127.0.0.1:{port}"],
                        listen=f"127.0.0.1:{free_port()}")
    return srv, port


def scrape(port: int) -> dict[str, float]:
    """Sample name (with its labels) -> value, from the text exposition format."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def ha(samples: dict) -> dict:
    """The HA figures a dashboard would show, from one scrape."""
    return {"leading": samples["hci_ha_is_leader"], "changes": samples["hci_ha_leader_changes_total"],
            "lag": samples["hci_ha_follower_lag_events"], "commits": samples["hci_ha_etcd_commits"],
            "latency_count": samples["hci_ha_etcd_commit_seconds_count"],
            "latency_in_buckets": samples['hci_ha_etcd_commit_seconds_bucket{le="+Inf"}']}


def test_ha_metrics_on_leader_follower_and_after_a_takeover(tmp_path, etcd_server, etcd_prefix):
    a, a_metrics = replica(tmp_path, etcd_server, etcd_prefix)
    a.start()
    wait_for(lambda: leader_of([a]), what="a to lead")
    b, b_metrics = replica(tmp_path, etcd_server, etcd_prefix)
    b.start()
    try:
        # One call at a time: each is one writer batch, one fenced Txn (register, then 5 Place).
        with SchedulerClient(a.address) as c:
            c.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": 8000, "memory": 32_768}) for i in range(2)])
            for i in range(5):
                c.place([workload(f"w{i}")])
        wait_for(lambda: (s := status(b.address)) and s.last_sequence == 7, what="b to follow")

        on_a = ha(scrape(a_metrics))
        assert on_a == {"leading": 1, "changes": 1, "lag": 0, "commits": 6, "latency_count": 6,
                        "latency_in_buckets": 6}
        assert scrape(a_metrics)["hci_ha_etcd_commit_seconds_sum"] > 0
        assert ha(scrape(b_metrics)) == {"leading": 0, "changes": 0, "lag": 0, "commits": 0, "latency_count": 0,
                                         "latency_in_buckets": 0}

        a.kill()
        wait_for(lambda: leader_of([b]), timeout_s=30, what="b to take over")
        with SchedulerClient(b.address) as c:
            c.place([workload("after")])
        assert ha(scrape(b_metrics)) == {"leading": 1, "changes": 1, "lag": 0, "commits": 1, "latency_count": 1,
                                         "latency_in_buckets": 1}
    finally:
        a.kill()
        b.kill()
