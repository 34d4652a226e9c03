"""SchedulerClient: the service from Python, connected as the CLI connects.

One place knows how to reach the service (TLS, mutual TLS, a bearer token, a deadline
per call) and how to follow a listing's pages, so that the CLI and programs importing
the library do it the same way. Methods are thin: they take and return the wire
messages of `hci_scheduler.v1.scheduler_pb2`; failures are `grpc.RpcError`.

    with SchedulerClient("127.0.0.1:50051", token="s3cret", tls_ca="ca.pem") as c:
        for host in c.hosts():
            print(host.id, dict(host.used))
"""
from __future__ import annotations

import os
import time
from typing import Callable, Generic, Iterable, Iterator, TypeVar

import grpc

from .v1 import scheduler_pb2 as pb
from .v1 import scheduler_pb2_grpc as pb_grpc

#: Host states by the names the CLI and configuration files use.
HOST_STATES = {"ready": pb.HOST_STATE_READY, "cordoned": pb.HOST_STATE_CORDONED,
               "draining": pb.HOST_STATE_DRAINING, "down": pb.HOST_STATE_DOWN}
#: Rebalance goals by name.
GOALS = {"consolidate": pb.REBALANCE_GOAL_CONSOLIDATE, "drain": pb.REBALANCE_GOAL_DRAIN,
         "defragment": pb.REBALANCE_GOAL_DEFRAGMENT, "balance": pb.REBALANCE_GOAL_BALANCE}
#: Time a plan's search may take on the server when a call gives no limit (its default).
DEFAULT_SEARCH_S = 30.0
#: Workload states (ReportStatus, Placement.status) by the names the CLI prints.
WORKLOAD_STATES = {"pending": pb.WORKLOAD_STATE_PENDING, "running": pb.WORKLOAD_STATE_RUNNING,
                   "exited": pb.WORKLOAD_STATE_EXITED, "failed": pb.WORKLOAD_STATE_FAILED,
                   "stopped": pb.WORKLOAD_STATE_STOPPED}
#: Restart policies of a ContainerSpec by name.
RESTART_POLICIES = {"always": pb.RESTART_POLICY_ALWAYS, "on-failure": pb.RESTART_POLICY_ON_FAILURE,
                    "never": pb.RESTART_POLICY_NEVER}
#: The wire types an agent builds its reports and reads its workloads' runtime specs with.
WorkloadStatus = pb.WorkloadStatus
ContainerSpec = pb.ContainerSpec
VmSpec = pb.VmSpec
VolumeMount = pb.VolumeMount
#: Placement strategies by name.
STRATEGIES = {"binpack": pb.STRATEGY_BINPACK, "spread": pb.STRATEGY_SPREAD,
              "balanced": pb.STRATEGY_BALANCED, "dot": pb.STRATEGY_DOT}

T = TypeVar("T")
#: Trailing metadata in which a follower names the leader's address (server: ha/replica.py).
LEADER_METADATA = "hci-leader"
#: Channel options of a client given several replicas. A replica that was down (the leader
#: killed before) leaves its channel in gRPC's reconnect backoff (1 s, growing by 1.6 each
#: failed attempt): calls to it fail at once until the backoff ends, even after it came back
#: and won the next election. Measured (bench/ha.py): 0.9 s of a 2.1 s failover went there.
#: Reconnecting at most 250 ms apart bounds that; a refused connect costs next to nothing.
FAILOVER_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                            ("grpc.max_reconnect_backoff_ms", 250))


def read_token_file(path: str | os.PathLike) -> str:
    """The first token of a token file (one per line, '#' starts a comment line)."""
    with open(path, encoding="utf-8") as f:
        return next((ln.strip() for ln in f if ln.strip() and not ln.startswith("#")), "")


def _pem(source) -> bytes | None:
    """PEM bytes given as bytes or as the path of a file holding them."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


class Listing(Iterator[T], Generic[T]):
    """The items of a paged listing, fetched a page at a time as iteration reaches them.

    Attributes
    ----------
    sequence : int or None
        The event sequence the first page reflects (None before it arrives): watching
        from it follows every change made after the listing began.
    pages : int
        Pages fetched so far.
    """

    def __init__(self, fetch: Callable[[str], object], field: str):
        self._fetch = fetch  # page token -> response
        self._field = field
        self._items: Iterator[T] = iter(())
        self._token: str | None = ""  # None once the last page has arrived
        self.sequence: int | None = None
        self.pages = 0

    def __next__(self) -> T:
        while True:
            for item in self._items:
                return item
            if self._token is None:
                raise StopIteration
            resp = self._fetch(self._token)
            self.pages += 1
            if self.sequence is None:
                self.sequence = resp.sequence
            self._token = resp.next_page_token or None
            self._items = iter(getattr(resp, self._field))


class SchedulerClient:
    """A connection to the scheduler service.

    Parameters
    ----------
    address : str
        HOST:PORT of the service; several replicas (high availability) as a comma-separated
        list, or in `addresses`.
    addresses : sequence of str, optional
        Every replica's HOST:PORT. A call refused with UNAVAILABLE goes to the address a
        follower names in its `hci-leader` trailer, else to the next replica, until
        `failover_s` has passed: across a failover the client follows the leader by
        itself. A retried Place is answered from the log (idempotent by workload id and
        spec); other mutations may find their first try applied (a release then says
        NotFound unless allow_missing).
    failover_s : float
        How long a call keeps trying other replicas.
    token : str, optional
        Bearer token sent with every call.
    tls_ca : path or PEM bytes, optional
        CA that signs the server's certificate; TLS is on when it or `tls_cert` is given
        (without it, the system's roots verify the server).
    tls_cert, tls_key : path or PEM bytes, optional
        Client certificate and key, for a server that asks for mutual TLS.
    tls_server_name : str, optional
        The name checked in the server's certificate, when it is not the address's host.
    timeout : float
        Deadline of each unary call, in seconds (a watch has none).
    options : iterable of (str, value)
        Extra gRPC channel options.
    """

    def __init__(self, address: str = "", *, token: str | None = None, tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None, timeout: float = 30.0, options: Iterable = (),
                 addresses: Iterable[str] | None = None, failover_s: float = 15.0):
        self.timeout = timeout
        self.failover_s = failover_s
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.addresses = list(addresses) if addresses else [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("SchedulerClient needs an address")
        self._options = list(options)
        if len(self.addresses) > 1:
            given = {k for k, _ in self._options}
            self._options += [kv for kv in FAILOVER_CHANNEL_OPTIONS if kv[0] not in given]
        self._creds = None
        if tls_ca is not None or tls_cert is not None:
            self._creds = grpc.ssl_channel_credentials(_pem(tls_ca), _pem(tls_key), _pem(tls_cert))
            if tls_server_name:
                self._options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channels: dict[str, grpc.Channel] = {}
        self._use(self.addresses[0])

    def _use(self, address: str) -> None:
        """Send the next calls to `address` (channels stay open for a later switch back)."""
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = (grpc.secure_channel(address, self._creds, options=self._options)
                                            if self._creds is not None else
                                            grpc.insecure_channel(address, options=self._options))
        self.address = address
        self.channel = ch
        self.stub = pb_grpc.SchedulerServiceStub(ch)

    def _next_replica(self, exc: grpc.RpcError) -> str:
        """Where a call refused with UNAVAILABLE goes next: the leader a follower named, else
        the replica after the current one."""
        for key, value in exc.trailing_metadata() or ():
            if key == LEADER_METADATA and value and value != self.address:
                return value
        i = self.addresses.index(self.address) if self.address in self.addresses else -1
        return self.addresses[(i + 1) % len(self.addresses)]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()

    def __enter__(self) -> "SchedulerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, request, timeout: float | None = None):
        """One unary call by its RPC name, with the deadline (`timeout`, else the client's)
        and the token; with several replicas, retried on the leader across a failover."""
        if len(self.addresses) == 1:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
        end = time.monotonic() + self.failover_s
        tried = 0
        while True:
            try:
                return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= end:
                    raise
                nxt = self._next_replica(exc)
                tried += 1
                if tried % len(self.addresses) == 0:
                    time.sleep(0.05)  # every replica refused: an election is under way
                self._use(nxt)

    def _search_timeout(self, time_limit_s: float) -> float:
        """A call that searches gets its search's time on top of the client's deadline."""
        return self.timeout + (time_limit_s or DEFAULT_SEARCH_S)

    def _listing(self, method: str, request, field: str) -> Listing:
        def fetch(token: str):
            request.page_token = token
            return self.call(method, request)

        return Listing(fetch, field)

    # -- listings: iterators that follow pages -------------------------------------------

    def hosts(self, state: str | int | None = None, *, page_size: int = 0) -> Listing[pb.Host]:
        """Every host (in `state`, a name of HOST_STATES or its number, when given), in row order."""
        state = HOST_STATES[state] if isinstance(state, str) else (state or 0)
        return self._listing("ListHosts", pb.ListHostsRequest(state=state, page_size=page_size), "hosts")

    def allocations(self, host_id: str | None = None, include_workloads: bool = False, *,
                    page_size: int = 0) -> Listing[pb.Placement]:
        """Every placement (on `host_id`, when given), in placement order."""
        request = pb.ListAllocationsRequest(host_id=host_id or "", include_workloads=include_workloads,
                                            page_size=page_size)
        return self._listing("ListAllocations", request, "allocations")

    def volumes(self, *, page_size: int = 0) -> Listing[pb.VolumeReplicas]:
        """Every volume with its replica hosts, in creation order."""
        return self._listing("ListVolumes", pb.ListVolumesRequest(page_size=page_size), "volumes")

    # -- the other calls ---------------------------------------------------------------

    def register_hosts(self, hosts: Iterable[pb.Host]) -> pb.RegisterHostsResponse:
        return self.call("RegisterHosts", pb.RegisterHostsRequest(hosts=hosts))

    def update_host(self, host_id: str, *, labels: dict | None = None, taints: Iterable[pb.Taint] | None = None,
                    state: str | int | None = None) -> pb.UpdateHostResponse:
        """Replace what is given (an empty dict or list clears labels or taints)."""
        req = pb.UpdateHostRequest(host_id=host_id)
        if labels is not None:
            req.labels.update(labels)
            req.update_mask.paths.append("labels")
        if taints is not None:
            req.taints.extend(taints)
            req.update_mask.paths.append("taints")
        if state is not None:
            req.state = HOST_STATES[state] if isinstance(state, str) else state
            req.update_mask.paths.append("state")
        return self.call("UpdateHost", req)

    def remove_host(self, host_id: str) -> pb.RemoveHostResponse:
        return self.call("RemoveHost", pb.RemoveHostRequest(host_id=host_id))

    def place(self, workloads: Iterable[pb.Workload], *, gang: bool = False, strategy: str | int = "binpack",
              preempt: bool = False) -> pb.PlaceResponse:
        strategy = STRATEGIES[strategy] if isinstance(strategy, str) else strategy
        return self.call("Place", pb.PlaceRequest(workloads=workloads, gang=gang, strategy=strategy,
                                                  preempt=preempt))

    def release(self, workload_ids: Iterable[str], *, allow_missing: bool = False) -> pb.ReleaseResponse:
        return self.call("Release", pb.ReleaseRequest(workload_ids=workload_ids, allow_missing=allow_missing))

    def explain(self, workload: pb.Workload) -> pb.ExplainResponse:
        return self.call("Explain", pb.ExplainRequest(workload=workload))

    def delete_volume(self, volume_id: str) -> pb.DeleteVolumeResponse:
        return self.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=volume_id))

    def rebalance(self, goal: str | int = "consolidate", *, hosts: Iterable[str] = (),
                  workload: pb.Workload | None = None, targets: dict[str, float] | None = None,
                  max_moves: int = 0, time_limit_s: float = 0.0, seed: int = 0) -> pb.RebalanceResponse:
        """A move plan for `goal` (a name of GOALS or its number); nothing changes until
        apply_plan. max_moves 0: no limit; time_limit_s 0: the server's default (30 s)."""
        goal = GOALS[goal] if isinstance(goal, str) else goal
        req = pb.RebalanceRequest(goal=goal, host_ids=hosts, targets=targets or {}, max_moves=max_moves,
                                  time_limit_s=time_limit_s, seed=seed)
        if workload is not None:
            req.workload.CopyFrom(workload)
        return self.call("Rebalance", req, timeout=self._search_timeout(time_limit_s))

    def apply_plan(self, plan_id: str) -> pb.ApplyPlanResponse:
        """Apply a plan step by step (idempotent: a repeat returns the first outcome)."""
        return self.call("ApplyPlan", pb.ApplyPlanRequest(plan_id=plan_id))

    def drain(self, host_id: str, *, max_moves: int = 0, time_limit_s: float = 0.0,
              seed: int = 0) -> pb.DrainResponse:
        """Set the host draining, plan its workloads' destinations and apply the plan."""
        req = pb.DrainRequest(host_id=host_id, max_moves=max_moves, time_limit_s=time_limit_s, seed=seed)
        # The server plans again, up to 3 times in all, when the cluster changes while it plans.
        return self.call("Drain", req, timeout=self.timeout + 3 * (time_limit_s or DEFAULT_SEARCH_S))

    def plan_capacity(self, workloads: Iterable[pb.Workload],
                      host_types: Iterable[pb.HostType]) -> pb.PlanCapacityResponse:
        """The cheapest new hosts on which `workloads` fit beside what runs now."""
        return self.call("PlanCapacity", pb.PlanCapacityRequest(workloads=workloads, host_types=host_types))

    def report_status(self, host_id: str, statuses: Iterable[pb.WorkloadStatus] = (),
                      applied_sequence: int = 0) -> pb.ReportStatusResponse:
        """An agent's report for its host: workload statuses (a state given by name is
        accepted in a dict: {"workload_id": ..., "state": "running", ...}); none is a
        heartbeat. applied_sequence: the last event sequence the agent applied."""
        req = pb.ReportStatusRequest(host_id=host_id, applied_sequence=applied_sequence)
        for st in statuses:
            if isinstance(st, dict):
                st = dict(st)
                if isinstance(st.get("state"), str):
                    st["state"] = WORKLOAD_STATES[st["state"]]
                st = pb.WorkloadStatus(**st)
            req.statuses.append(st)
        return self.call("ReportStatus", req)

    def status(self) -> pb.GetStatusResponse:
        return self.call("GetStatus", pb.GetStatusRequest())

    def watch(self, after: int = 0, types: Iterable[int] = ()) -> Iterator[pb.Event]:
        """Events after sequence `after` (of these types, when given), as they come, without
        a deadline. Closing the iterator cancels the stream (`contextlib.closing` closes it
        when a loop over it ends early)."""
        stream = self.stub.WatchEvents(pb.WatchEventsRequest(after_sequence=after, types=types),
                                       metadata=self.metadata)
        try:
            for resp in stream:
                yield resp.event
        finally:
            stream.cancel()
