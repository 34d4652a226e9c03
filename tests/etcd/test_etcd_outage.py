"""etcd members failing under the service (a three-member etcd on one machine): one down, the
service goes on; two down, mutations fail with UNAVAILABLE naming the cause and reads go on;
a member back, everything resumes without a restart."""
from __future__ import annotations

import grpc
import pytest

from hci_scheduler.client import SchedulerClient
from hci_scheduler.ha.local_etcd import LocalEtcd, etcd_binary, free_port
from hci_scheduler.v1 import scheduler_pb2 as pb
from tests.server.conftest import ServerProcess
from tests.waiting import wait_for

from .test_failover import logged_events

pytestmark = pytest.mark.etcd


def place(addresses, wid: str, **kw) -> pb.Placement:
    with SchedulerClient(addresses=addresses, **kw) as c:
        return c.place([pb.Workload(id=wid, requests={"cpu": 100, "memory": 64})]).placements[0]


def test_etcd_members_down_then_back(tmp_path):
    if etcd_binary() is None:
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    etcd = LocalEtcd(str(tmp_path / "etcd"), members=3).start()
    replicas = []
    try:
        for _ in range(2):
            replicas.append(ServerProcess(tmp_path, extra=["--store", etcd.url, "--snapshot-every", "0"],
                                          listen=f"127.0.0.1:{free_port()}").start())
        addresses = [r.address for r in replicas]
        with SchedulerClient(addresses=addresses) as c:
            c.register_hosts([pb.Host(id=f"h{i}", capacity={"cpu": 64_000, "memory": 262_144}) for i in range(4)])
        acked = {"w0": place(addresses, "w0")}

        etcd.members[0].kill()  # one of three: a quorum is left
        acked["w1"] = place(addresses, "w1")
        acked["w2"] = place(addresses, "w2")

        etcd.members[1].kill()  # two of three: no quorum, no writes anywhere
        with pytest.raises(grpc.RpcError) as refused:
            place(addresses, "lost-cause", timeout=10, failover_s=8)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "etcd" in refused.value.details() or "leader" in refused.value.details()
        for r in replicas:  # reads go on, from each replica's memory, at the sequence it reached
            with SchedulerClient(r.address, timeout=5) as c:
                st = c.status()
                assert st.allocations >= 1 and not st.writable  # a follower may not have applied w1, w2 yet
                assert len(list(c.hosts())) == 4

        etcd.restart(etcd.members[1])  # a quorum again: a replica leads again by itself
        acked["w3"] = wait_for(lambda: _try_place(addresses, "w3"), timeout_s=30, what="writes to resume")
        assert all(r.proc.poll() is None for r in replicas)  # no restart was needed
        events = logged_events(etcd, "/hci")
        placed = {e.workload_id: e for e in events if e.type == pb.EVENT_TYPE_PLACED}
        # The refused call's Txn may have waited in etcd and committed once the quorum was back
        # (an unanswered call is ambiguous): whichever, the leader's state is the log's.
        st = next(st for st in map(_status, replicas) if st.writable)
        assert (st.last_sequence, st.allocations) == (len(events), len(placed))
    finally:
        for r in replicas:
            r.kill()
        etcd.stop()
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    for wid, p in acked.items():
        assert (placed[wid].host_id, placed[wid].sequence) == (p.host_id, p.sequence)


def _try_place(addresses, wid):
    try:
        return place(addresses, wid, timeout=5, failover_s=2)
    except grpc.RpcError:
        return None


def _status(r) -> pb.GetStatusResponse:
    with SchedulerClient(r.address, timeout=5) as c:
        return c.status()
