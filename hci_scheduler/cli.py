"""`hci-scheduler`: run the service, talk to it, run the benchmarks and the demo.

    hci-scheduler serve --listen 127.0.0.1:50051 --data-dir ./data [--config serve.yaml]
    hci-scheduler hosts add --id h1 -r cpu=32000 -r memory=131072 --label zone=a
    hci-scheduler hosts list | update | remove
    hci-scheduler place --id web-1 -r cpu=500 -r memory=512 [--kind vm] | --file workloads.yaml
    hci-scheduler release web-1 ...
    hci-scheduler allocations | explain | watch | status
    hci-scheduler volumes list | delete VOLUME_ID
    hci-scheduler rebalance --goal consolidate|drain|defragment|balance [--max-moves 200] [--apply]
    hci-scheduler drain HOST
    hci-scheduler capacity --types types.yaml --workloads workloads.yaml
    hci-scheduler bench ...        (forwarded to bench.main)
    hci-scheduler demo             (the main job through gRPC; --ha: three replicas on etcd)

Client commands print tables for people and JSON with --json; listings print every
page (--page-size sets the items per call). The server address comes from --server or
$HCI_SCHEDULER_SERVER (default 127.0.0.1:50051).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

DEFAULT_SERVER = "127.0.0.1:50051"


# -- parsing helpers ------------------------------------------------------------


def _kv(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _quantity(text: str) -> tuple[str, int]:
    key, value = _kv(text)
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: expected an integer, got {value!r}") from None


def _pairs(items) -> dict:
    out = {}
    for item in items or ():
        if isinstance(item, tuple):
            out[item[0]] = item[1]
        else:
            for part in item.split(","):
                k, v = _kv(part)
                out[k] = v
    return out


def _quantities(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in items or ():
        out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hci-scheduler", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gRPC service")
    s.add_argument("--config", help="YAML file with any of the options below (flags win)")
    s.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:50051)")
    s.add_argument("--data-dir", help="directory of the SQLite store (omit: memory only, lost on exit)")
    s.add_argument("--store", help="etcd://HOST:PORT[,HOST:PORT...]: keep the log and snapshots in etcd instead of "
                   "--data-dir (high availability: replicas on one etcd elect a leader; the others wait as "
                   "standbys)")
    s.add_argument("--etcd-prefix", help="with --store: the prefix of every key (default /hci)")
    s.add_argument("--etcd-ca", help="with --store: CA of the etcd members' certificates (PEM; turns on TLS)")
    s.add_argument("--etcd-cert", help="with --store: client certificate for etcd (PEM)")
    s.add_argument("--etcd-key", help="with --store: client key for etcd (PEM)")
    s.add_argument("--advertise", help="with --store: the address clients reach this replica at, written into "
                   "the leader key (default: --listen)")
    s.add_argument("--lease-ttl-s", type=int, help="with --store: leader lease TTL in whole seconds (default 1); "
                   "a failover waits for it")
    s.add_argument("--fsync", choices=["full", "normal"], help="SQLite synchronous mode: full (default, "
                   "a reply survives power loss) or normal (survives a crash, not a power loss)")
    s.add_argument("--snapshot-every", type=int, help="write a snapshot of the state (in --data-dir or under --store's prefix) at most every "
                   "N events in the background (default 50000; sooner for a small state: after half as many "
                   "events as it has placements and hosts, at least 10000; 0: only at a clean stop); restart "
                   "reads the newest snapshot plus the events after it, so N bounds what a crash restart "
                   "replays: with the default, 200,000 live placements restart in about 0.8 s on a quiet 2-core machine "
                   "(0.7-1.2 s measured as the machine's load varied). A larger N "
                   "costs less CPU while writing (a snapshot of 200,000 placements is about 0.3 s) and "
                   "restarts slower (about 5 us per event of tail)")
    s.add_argument("--snapshot-tail", type=int, help="events kept in the log before the newest snapshot when "
                   "it is compacted (default 100000): a watcher that far behind still resumes; restart does "
                   "not read them (disk use is the live state plus this tail)")
    s.add_argument("--metrics", help="HOST:PORT of the Prometheus endpoint, e.g. 127.0.0.1:9464 (a non-loopback "
                   "address needs TLS, then HTTPS, or --allow-insecure-remote)")
    s.add_argument("--dimensions", help="comma-separated resource dimensions for a new store")
    s.add_argument("--tls-cert", help="server certificate (PEM)")
    s.add_argument("--tls-key", help="server private key (PEM)")
    s.add_argument("--tls-client-ca", help="CA that signs client certificates (turns on mutual TLS)")
    s.add_argument("--token-file", help="bearer tokens, one per line (never logged)")
    s.add_argument("--allow-insecure-remote", action="store_true", default=None,
                   help="listen on a non-loopback address without TLS (gRPC, even with tokens, or --metrics)")
    s.add_argument("--transport", choices=["grpcio", "aio", "lean"], help="grpcio (default): grpcio's own "
                   "server; aio: grpc.aio's server, handlers on a thread pool; lean: unary calls run on the threads "
                   "that poll gRPC's queue (grpcio internals, tested releases only: otherwise grpcio's server, "
                   "logged)")
    s.add_argument("--pollers", type=int, help="unary calls handled at once; lean: threads polling gRPC's queue "
                   "(default 16)")
    s.add_argument("--max-workers", type=int, help="streaming calls handled at once (default 128)")
    s.add_argument("--grace", type=float, help="seconds in-flight calls get on SIGTERM (default 5)")
    s.add_argument("--host-down-after-s", type=float, help="a host whose agent has reported goes DOWN after "
                   "this many seconds of silence (default 15)")
    s.add_argument("--down-reschedule-after-s", type=float, help="the containers of a host DOWN this long are "
                   "re-placed elsewhere; VMs wait for their host (default 60, 0: never)")
    s.add_argument("--port-file", help="write the bound port here once serving")
    s.add_argument("--log-level", default=None, help="debug, info, warning (default info)")

    def client(sp):
        sp.add_argument("--server", default=os.environ.get("HCI_SCHEDULER_SERVER", DEFAULT_SERVER),
                        help="HOST:PORT of the service, or of its replicas comma-separated: calls follow the "
                        "leader across a failover (env HCI_SCHEDULER_SERVER)")
        sp.add_argument("--tls-ca", help="CA certificate to verify the server (turns on TLS)")
        sp.add_argument("--tls-cert", help="client certificate for mutual TLS")
        sp.add_argument("--tls-key", help="client key for mutual TLS")
        sp.add_argument("--tls-server-name", help="override the name checked in the server certificate")
        sp.add_argument("--token-file", default=os.environ.get("HCI_SCHEDULER_TOKEN_FILE"),
                        help="file whose first token is sent as a bearer token")
        sp.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds")
        sp.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sp

    def page_size(sp):
        sp.add_argument("--page-size", type=int, default=0, metavar="N",
                        help="items per call; every page is printed (default: the server's, 1,000)")

    hosts = sub.add_parser("hosts", help="register, list, update, remove hosts")
    hsub = hosts.add_subparsers(dest="hosts_command", required=True, metavar="ACTION")
    ha = client(hsub.add_parser("add", help="register hosts from flags or a file"))
    ha.add_argument("--id", help="host id")
    ha.add_argument("-c", "--capacity", "-r", action="append", type=_quantity, metavar="DIM=N",
                    help="capacity per dimension, repeatable: -c cpu=32000 -c memory=131072")
    ha.add_argument("--reserved", action="append", type=_quantity, metavar="DIM=N")
    ha.add_argument("--label", action="append", metavar="KEY=VALUE")
    ha.add_argument("--taint", action="append", metavar="KEY=VALUE:EFFECT")
    ha.add_argument("--ratio", action="append", metavar="DIM=RATIO", help="container overcommit ratio")
    ha.add_argument("--pool", default="")
    ha.add_argument("--file", help="YAML or JSON list of hosts (or {hosts: [...]})")
    hl = client(hsub.add_parser("list", help="list hosts"))
    hl.add_argument("--state", choices=["ready", "cordoned", "draining", "down"])
    page_size(hl)
    hu = client(hsub.add_parser("update", help="change labels, taints or state"))
    hu.add_argument("host_id")
    hu.add_argument("--label", action="append", metavar="KEY=VALUE", help="replaces all labels")
    hu.add_argument("--clear-labels", action="store_true")
    hu.add_argument("--taint", action="append", metavar="KEY=VALUE:EFFECT", help="replaces all taints")
    hu.add_argument("--clear-taints", action="store_true")
    hu.add_argument("--state", choices=["ready", "cordoned", "draining"],
                    help="DOWN is set by the service only, when a host's agent falls silent")
    client(hsub.add_parser("remove", help="remove a host without workloads")).add_argument("host_id")

    def workload_flags(sp):
        sp.add_argument("--id", help="workload id")
        sp.add_argument("-r", "--request", action="append", type=_quantity, metavar="DIM=N",
                        help="request per dimension, repeatable: -r cpu=500 -r memory=512")
        sp.add_argument("--kind", choices=["container", "vm"], default="container")
        sp.add_argument("--group", default="")
        sp.add_argument("--tenant", default="")
        sp.add_argument("--selector", action="append", metavar="KEY=VALUE", help="label equality")
        sp.add_argument("--tolerate", action="append", metavar="KEY[=VALUE]")
        sp.add_argument("--anti-affinity", action="append", metavar="GROUP[@TOPOLOGY]")
        sp.add_argument("--priority", type=int, default=0)
        sp.add_argument("--file", help="YAML or JSON list of workloads (or {workloads: [...]})")
        return sp

    pl = workload_flags(client(sub.add_parser("place", help="place workloads")))
    pl.add_argument("--gang", action="store_true", help="all or nothing")
    pl.add_argument("--strategy", choices=["binpack", "spread", "balanced", "dot"], default="binpack")
    pl.add_argument("--preempt", action="store_true", help="may evict lower-priority workloads")
    rl = client(sub.add_parser("release", help="release workloads"))
    rl.add_argument("workload_ids", nargs="+")
    rl.add_argument("--allow-missing", action="store_true")
    al = client(sub.add_parser("allocations", help="list placed workloads"))
    al.add_argument("--host", default="")
    al.add_argument("--workloads", action="store_true", help="include each workload's spec")
    page_size(al)
    workload_flags(client(sub.add_parser("explain", help="why a workload would (not) fit")))
    wa = client(sub.add_parser("watch", help="stream events"))
    wa.add_argument("--after", type=int, default=0, help="start after this sequence number")
    wa.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    client(sub.add_parser("status", help="utilisation table"))
    vol = sub.add_parser("volumes", help="list or delete volumes created with workloads")
    vsub = vol.add_subparsers(dest="action", required=True)
    page_size(client(vsub.add_parser("list", help="volumes and their replica hosts")))
    client(vsub.add_parser("delete", help="free a volume no workload mounts")).add_argument("volume_id")

    rb = client(sub.add_parser("rebalance", help="plan moves towards a goal; --apply applies them"))
    rb.add_argument("--goal", choices=["consolidate", "drain", "defragment", "balance"], default="consolidate")
    rb.add_argument("--hosts", default="", metavar="H1,H2", help="drain: the hosts to empty")
    rb.add_argument("--target", action="append", metavar="DIM=FRACTION",
                    help="balance: target utilisation per dimension, repeatable: --target cpu=0.8")
    rb.add_argument("-r", "--request", action="append", type=_quantity, metavar="DIM=N",
                    help="defragment: the request of the workload to make room for, repeatable")
    rb.add_argument("--kind", choices=["container", "vm"], default="container",
                    help="defragment: the kind of that workload")

    def search(sp):
        sp.add_argument("--max-moves", type=int, default=0, help="most workloads to move (default 0: no limit)")
        sp.add_argument("--time-limit", type=float, default=30.0, help="seconds the search may take (default 30)")
        sp.add_argument("--seed", type=int, default=0, help="the search's seed (default 0)")
        return sp

    search(rb).add_argument("--apply", action="store_true", help="apply the plan and print the applied steps")
    dr = search(client(sub.add_parser("drain", help="set a host draining and move its workloads away")))
    dr.add_argument("host_id")
    cp = client(sub.add_parser("capacity", help="the cheapest new hosts on which pending workloads fit"))
    cp.add_argument("--types", required=True, metavar="FILE", help="YAML or JSON list of host types "
                    "(or {host_types: [...]}): name, capacity, price, labels, taints, reserved, pool, max_count")
    cp.add_argument("--workloads", required=True, metavar="FILE", help="YAML or JSON list of workloads "
                    "(or {workloads: [...]}), as place --file reads them")

    ck = sub.add_parser("check", help="verify a store offline without changing it (exit 0: sound, 1: not)")
    ck.add_argument("--data-dir", required=True, help="the data directory of the store (as given to serve)")
    from .agent import agent as _agent, images as _images

    _agent.add_arguments(sub.add_parser("agent", help="run the Docker Engine agent of one host"))
    _images.add_arguments(sub.add_parser("images", help="build the offline images (busybox, qemu launcher)"))
    b = sub.add_parser("bench", help="run the benchmark suite (arguments go to bench.main)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    d = sub.add_parser("demo", help="the main job through gRPC", add_help=False)
    d.add_argument("args", nargs=argparse.REMAINDER)
    return p


# -- building messages --------------------------------------------------------


def _enum_name(prefix: str, value):
    if isinstance(value, str) and not value.upper().startswith(prefix):
        return prefix + value.upper().replace("-", "_")
    return value


def host_from_dict(d: dict):
    """A pb.Host from a friendly dict (YAML/JSON): {id, capacity, labels, taints: ["k=v:NoSchedule"], state}."""
    from google.protobuf import json_format

    from .v1 import scheduler_pb2 as pb

    d = dict(d)
    if "state" in d:
        d["state"] = _enum_name("HOST_STATE_", d["state"])
    taints = d.pop("taints", [])
    h = json_format.ParseDict(d, pb.Host())
    for t in taints:
        h.taints.append(_taint(t) if isinstance(t, str) else json_format.ParseDict(t, pb.Taint()))
    return h


def workload_from_dict(d: dict):
    """A pb.Workload from a friendly dict: {id, requests, kind: vm, group, node_selector, ...}."""
    from google.protobuf import json_format

    from .v1 import scheduler_pb2 as pb

    d = dict(d)
    if "kind" in d:
        d["kind"] = _enum_name("WORKLOAD_KIND_", d["kind"])
    if "isolation" in d:
        d["isolation"] = _enum_name("ISOLATION_", d["isolation"])
    if "selector" in d and isinstance(d["selector"], dict):
        d["node_selector"] = d.pop("selector")
    return json_format.ParseDict(d, pb.Workload())


def host_type_from_dict(d: dict):
    """A pb.HostType from a friendly dict: {name, capacity, price, labels, taints: ["k=v:NoSchedule"], ...}."""
    from google.protobuf import json_format

    from .v1 import scheduler_pb2 as pb

    d = dict(d)
    taints = d.pop("taints", [])
    t = json_format.ParseDict(d, pb.HostType())
    for x in taints:
        t.taints.append(_taint(x) if isinstance(x, str) else json_format.ParseDict(x, pb.Taint()))
    return t


def _taint(text: str):
    from .v1 import scheduler_pb2 as pb

    kv, sep, effect = text.rpartition(":")
    if not sep:
        kv, effect = text, "NoSchedule"
    key, _, value = kv.partition("=")
    effects = {"NoSchedule": pb.TAINT_EFFECT_NO_SCHEDULE, "PreferNoSchedule": pb.TAINT_EFFECT_PREFER_NO_SCHEDULE}
    if effect not in effects:
        raise SystemExit(f"taint effect must be NoSchedule or PreferNoSchedule, got {effect!r}")
    return pb.Taint(key=key, value=value, effect=effects[effect])


def _load_file(path: str, key: str) -> list[dict]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if isinstance(data, dict):
        data = data.get(key, [])
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a list of {key} or a mapping with key {key!r}")
    return data


def _workloads_from_args(args) -> list:
    from .v1 import scheduler_pb2 as pb

    if args.file:
        return [workload_from_dict(d) for d in _load_file(args.file, "workloads")]
    if not args.id:
        raise SystemExit("give --id and --request flags, or --file")
    w = pb.Workload(id=args.id, requests=_quantities(args.request),
                    kind=pb.WORKLOAD_KIND_VM if args.kind == "vm" else pb.WORKLOAD_KIND_CONTAINER,
                    group=args.group, tenant=args.tenant, priority=args.priority,
                    node_selector=_pairs(args.selector))
    for t in args.tolerate or ():
        key, sep, value = t.partition("=")
        tol = w.tolerations.add(key=key)
        if sep:
            tol.value = value
    for a in args.anti_affinity or ():
        group, _, topo = a.partition("@")
        w.anti_affinities.add(group=group, topology=topo or "host", hard=True)
    return [w]


# -- client ---------------------------------------------------------------------


def connect(args):
    """The SchedulerClient of a client command's flags."""
    from .client import SchedulerClient, read_token_file

    return SchedulerClient(args.server, token=read_token_file(args.token_file) if args.token_file else None,
                           tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                           tls_server_name=args.tls_server_name, timeout=args.timeout)


def _print_json(msg) -> None:
    from google.protobuf import json_format

    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _fmt_map(m) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(m.items()))


def _console():
    from rich.console import Console

    return Console()


def _table(title: str, columns: Sequence[str], rows) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    _console().print(t)


def _where(p) -> str:
    """A placement's host, or a per-host service's replica hosts; plus new volumes' replicas."""
    text = p.host_id or ("per-host: " + (" ".join(p.replica_host_ids) or "no host yet") if p.sequence else "-")
    for v in p.volumes:
        text += f"; {v.volume_id} on {' '.join(v.host_ids)}"
    return text


def _print_placements(placements) -> None:
    rows = []
    for p in placements:
        reason = "" if p.sequence else (p.explanation.message or "unschedulable")
        rows.append((p.workload_id, _where(p), p.sequence or "", reason))
    _table("placements", ("workload", "host", "seq", "refusal"), rows)


def _print_listing(args, response_type, field: str, listing) -> list:
    """Every item of a paged listing; with --json, printed as one response holding them all
    (and the sequence of the first page)."""
    items = list(listing)
    if args.json:
        _print_json(response_type(**{field: items}, sequence=listing.sequence or 0))
    return items


def _searching(time_limit_s: float, call):
    """`call()` (a request that searches on the server) with a progress bar over the
    search's time limit on stderr, so stdout keeps only the answer."""
    import time
    from concurrent.futures import ThreadPoolExecutor, wait

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call)
        with Progress(TextColumn("searching"), BarColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("search", total=time_limit_s)
            t0 = time.monotonic()
            while not wait([answer], timeout=0.1).done:
                bar.update(task, completed=min(time.monotonic() - t0, time_limit_s))
        return answer.result()


def utilisation_in_use(hosts, moves, requests: dict, dims) -> tuple[dict, dict]:
    """Used / allocatable per dimension over the hosts that run something, before a plan
    and after it: each moved workload's requests go from
    its source to its target, and a host runs something after the plan while it keeps a
    workload (a host used only by volume replicas or array rows stays in use). An
    estimate where VMs move between hosts of different allocation ratios (a VM's charge
    is its request times the host's ratio)."""
    used = {h.id: {d: h.used.get(d, 0) for d in dims} for h in hosts}
    alloc = {h.id: {d: h.capacity.get(d, 0) - h.reserved.get(d, 0) for d in dims} for h in hosts}
    count = {h.id: h.workload_count for h in hosts}
    in_use = {h.id for h in hosts if h.workload_count or any(h.used.values())}
    by_load_only = {h for h in in_use if not count[h]}

    def ratio(ids, usage):
        return {d: (sum(usage[h][d] for h in ids) / a if (a := sum(alloc[h][d] for h in ids)) else 0.0) for d in dims}

    before = ratio(in_use, used)
    for m in moves:
        req = requests.get(m.workload_id, {})
        for h, sign in ((m.source_host_id, -1), (m.target_host_id, 1)):
            if h in used:
                for d in dims:
                    used[h][d] += sign * req.get(d, 0)
                count[h] += sign
    after_ids = {h for h in used if count[h] > 0} | by_load_only
    return before, ratio(after_ids, used)


def _print_plan(c, plan) -> None:
    """The moves of a plan and a before/after summary."""
    from .v1 import scheduler_pb2 as pb

    moves = [m for step in plan.steps for m in step.moves]
    goal = pb.RebalanceGoal.Name(plan.goal)[len("REBALANCE_GOAL_"):].lower()
    status = pb.PlanStatus.Name(plan.status)[len("PLAN_STATUS_"):].lower()
    print(f"plan {plan.id}: {goal}, {status}, {len(moves)} move(s) in {len(plan.steps)} step(s)")
    _table("moves", ("step", "workload", "source", "target", "cost"),
           [(k, m.workload_id, m.source_host_id, m.target_host_id, m.cost)
            for k, step in enumerate(plan.steps) for m in step.moves])
    dims = list(c.status().dimensions)
    requests = {}
    for source in dict.fromkeys(m.source_host_id for m in moves):
        for p in c.allocations(source, include_workloads=True):
            requests[p.workload_id] = dict(p.workload.requests)
    before, after = utilisation_in_use(list(c.hosts()), moves, requests, dims)
    rows = [("hosts used", plan.hosts_used_before, plan.hosts_used_after)]
    rows += [(f"{d} utilisation of hosts in use", f"{100 * before[d]:.1f}%", f"{100 * after[d]:.1f}%")
             for d in dims if before[d] or after[d]]
    rows.append(("objective", plan.objective_before, plan.objective_after))
    rows += [(f"  {t}", plan.terms_before.get(t, 0), plan.terms_after.get(t, 0))
             for t in sorted(set(plan.terms_before) | set(plan.terms_after))]
    _table("before and after", ("", "before", "after"), rows)
    bound = plan.lower_bound if plan.HasField("lower_bound") else "unknown"
    print(f"hosts freed: {plan.hosts_freed}; lower bound: {bound}; migration cost: {plan.cost}")
    if plan.unordered:
        print(f"the moves cannot be ordered into feasible steps: {plan.unordered}")


def _print_applied(plan, applied) -> None:
    """The steps of `plan` that `applied` (an ApplyPlanResponse) applied, move by move."""
    print(f"applied {applied.steps_applied} step(s) of plan {applied.plan_id}"
          + (f" (sequence {applied.sequence})" if applied.sequence else ""))
    _table("applied", ("step", "workload", "source", "target"),
           [(k, m.workload_id, m.source_host_id, m.target_host_id)
            for k, step in enumerate(plan.steps[:applied.steps_applied]) for m in step.moves])


def run_client(args) -> int:
    import contextlib

    from .client import HOST_STATES
    from .v1 import scheduler_pb2 as pb

    c = connect(args)
    state_names = {v: k for k, v in HOST_STATES.items()}
    cmd = args.command
    if cmd == "hosts":
        action = args.hosts_command
        if action == "add":
            if args.file:
                hosts = [host_from_dict(d) for d in _load_file(args.file, "hosts")]
            else:
                if not args.id:
                    raise SystemExit("give --id and --capacity flags, or --file")
                h = pb.Host(id=args.id, capacity=_quantities(args.capacity),
                            reserved=_quantities(args.reserved), labels=_pairs(args.label), pool=args.pool)
                h.taints.extend(_taint(t) for t in args.taint or ())
                for k, v in _pairs(args.ratio).items():
                    h.allocation_ratios[k] = float(v)
                hosts = [h]
            resp = c.register_hosts(hosts)
            if args.json:
                _print_json(resp)
            else:
                print(f"registered {len(resp.hosts)} host(s)")
        elif action == "list":
            hosts = _print_listing(args, pb.ListHostsResponse, "hosts",
                                   c.hosts(args.state, page_size=args.page_size))
            if not args.json:
                _table("hosts", ("id", "state", "capacity", "used", "workloads", "labels", "taints"),
                       [(h.id, state_names.get(h.state, "?"), _fmt_map(h.capacity), _fmt_map(h.used),
                         h.workload_count, _fmt_map(h.labels),
                         " ".join(f"{t.key}={t.value}" for t in h.taints)) for h in hosts])
        elif action == "update":
            labels = _pairs(args.label) if args.label or args.clear_labels else None
            taints = [_taint(t) for t in args.taint or ()] if args.taint or args.clear_taints else None
            resp = c.update_host(args.host_id, labels=labels, taints=taints, state=args.state)
            _print_json(resp) if args.json else print(f"updated {resp.host.id}")
        elif action == "remove":
            resp = c.remove_host(args.host_id)
            _print_json(resp) if args.json else print(f"removed {args.host_id}")
    elif cmd == "place":
        resp = c.place(_workloads_from_args(args), gang=args.gang, strategy=args.strategy, preempt=args.preempt)
        _print_json(resp) if args.json else _print_placements(resp.placements)
        return 0 if all(p.sequence for p in resp.placements) else 3
    elif cmd == "release":
        resp = c.release(args.workload_ids, allow_missing=args.allow_missing)
        _print_json(resp) if args.json else print(f"released {len(resp.released_workload_ids)} workload(s)")
    elif cmd == "allocations":
        allocations = _print_listing(args, pb.ListAllocationsResponse, "allocations",
                                     c.allocations(args.host, args.workloads, page_size=args.page_size))
        if not args.json:
            _table("allocations", ("workload", "host", "numa", "seq", "status", "requests"),
                   [(p.workload_id, _where(p), p.numa_node if p.HasField("numa_node") else "-", p.sequence,
                     _status_text(p.status), _fmt_map(p.workload.requests))
                    for p in allocations])
    elif cmd == "explain":
        ws = _workloads_from_args(args)
        for w in ws:
            resp = c.explain(w)
            if args.json:
                _print_json(resp)
            else:
                e = resp.explanation
                print(f"{w.id}: {e.message}")
                for f in e.filters:
                    print(f"  {f.reason}: {f.hosts} hosts")
                if e.nearest_miss:
                    print(f"  nearest miss: {e.nearest_miss}")
    elif cmd == "watch":
        from google.protobuf import json_format

        n = 0
        with contextlib.closing(c.watch(args.after)) as events:
            for e in events:
                if args.json:
                    print(json.dumps(json_format.MessageToDict(e, preserving_proto_field_name=True)), flush=True)
                else:
                    what = f"volume={e.volume_id}" if e.volume_id else f"host={e.host_id} workload={e.workload_id}"
                    print(f"{e.sequence:>8} {pb.EventType.Name(e.type)[11:].lower():<14} {what}", flush=True)
                n += 1
                if args.count and n >= args.count:
                    break
    elif cmd == "volumes":
        if args.action == "list":
            volumes = _print_listing(args, pb.ListVolumesResponse, "volumes", c.volumes(page_size=args.page_size))
            if not args.json:
                _table("volumes", ("volume", "GiB", "replica hosts"),
                       [(v.volume_id, v.size_gib, " ".join(v.host_ids)) for v in volumes])
        else:
            resp = c.delete_volume(args.volume_id)
            _print_json(resp) if args.json else print(f"deleted {args.volume_id}")
    elif cmd == "rebalance":
        workload = None
        if args.goal == "defragment":
            if not args.request:
                raise SystemExit("goal defragment needs the workload's request: -r cpu=... -r memory=...")
            workload = pb.Workload(id="defragment", requests=_quantities(args.request),
                                   kind=pb.WORKLOAD_KIND_VM if args.kind == "vm" else pb.WORKLOAD_KIND_CONTAINER)
        targets = {k: float(v) for k, v in _pairs(args.target).items()}
        hosts = [h for h in args.hosts.split(",") if h]
        resp = _searching(args.time_limit, lambda: c.rebalance(
            args.goal, hosts=hosts, workload=workload, targets=targets, max_moves=args.max_moves,
            time_limit_s=args.time_limit, seed=args.seed))
        if args.json:  # one document: {"plan": ...} and, with --apply, "applied"
            from google.protobuf import json_format

            out = {"plan": json_format.MessageToDict(resp.plan, preserving_proto_field_name=True)}
            if args.apply:
                out["applied"] = json_format.MessageToDict(c.apply_plan(resp.plan.id),
                                                           preserving_proto_field_name=True)
            print(json.dumps(out, indent=2))
        else:
            _print_plan(c, resp.plan)  # before applying: the summary's "before" is now
            if args.apply:
                _print_applied(resp.plan, c.apply_plan(resp.plan.id))
    elif cmd == "drain":
        resp = _searching(args.time_limit, lambda: c.drain(args.host_id, max_moves=args.max_moves,
                                                            time_limit_s=args.time_limit, seed=args.seed))
        if args.json:
            _print_json(resp)
        else:
            moves = [m for step in resp.plan.steps for m in step.moves]
            _table(f"drained {args.host_id}: {len(moves)} move(s) in {len(resp.plan.steps)} step(s)",
                   ("step", "workload", "source", "target", "cost"),
                   [(k, m.workload_id, m.source_host_id, m.target_host_id, m.cost)
                    for k, step in enumerate(resp.plan.steps) for m in step.moves])
    elif cmd == "capacity":
        types = [host_type_from_dict(d) for d in _load_file(args.types, "host_types")]
        workloads = [workload_from_dict(d) for d in _load_file(args.workloads, "workloads")]
        resp = c.plan_capacity(workloads, types)
        if args.json:
            _print_json(resp)
        else:
            _table("hosts to add", ("type", "count"), sorted(resp.hosts_to_add.items()))
            print(f"cost: {resp.cost}; lower bound: {resp.lower_bound}; "
                  f"fit on the hosts there are: {resp.fits_now} of {len(workloads)}")
            _table("where each workload would go", ("workload", "host"), sorted(resp.placements.items()))
    elif cmd == "status":
        st = c.status()
        if args.json:
            _print_json(st)
        else:
            _table("utilisation", ("dimension", "used", "allocatable", "utilisation"),
                   [(d, st.used[d], st.allocatable[d], f"{100 * st.utilization.get(d, 0.0):.1f}%")
                    for d in st.dimensions])
            print(f"hosts: {_fmt_map(st.hosts_by_state)}; used: {st.hosts_used}; "
                  f"allocations: {st.allocations}; last sequence: {st.last_sequence}")
            for p in st.interrupted_plans:
                print(f"plan {p.plan_id} interrupted after step {p.steps_done} of {p.steps_total}: {p.reason}")
    return 0


# -- serve ----------------------------------------------------------------------


#: gRPC core experiments the server turns off unless GRPC_EXPERIMENTS is set (set it
#: empty for gRPC's defaults). With EventEngine endpoints every call's bytes are read
#: on an EventEngine thread and handed to the thread polling the completion queue;
#: without them the polling thread reads them itself, which costs grpcio's server
#: and LeanServer less CPU per unary call (bench/README.md). It is a setting of gRPC core,
#: read from the environment, not an API: names gRPC no longer knows are reported
#: once in its log and ignored.
SERVE_GRPC_EXPERIMENTS = "-event_engine_listener,-event_engine_for_all_other_endpoints"


def _status_text(st) -> str:
    """A workload's reported status in a table cell: "running", "exited(1)", "failed: reason"."""
    from .v1 import scheduler_pb2 as pb

    name = pb.WorkloadState.Name(st.state)[len("WORKLOAD_STATE_"):].lower() if st.state else "pending"
    if st.state == pb.WORKLOAD_STATE_EXITED:
        name += f"({st.exit_code})"
    if st.restarts:
        name += f" restarts={st.restarts}"
    if st.message and st.state in (pb.WORKLOAD_STATE_FAILED, pb.WORKLOAD_STATE_EXITED):
        name += f": {st.message[:60]}"
    return name


def run_serve(args) -> int:
    # gRPC reads GRPC_EXPERIMENTS once, as it starts: before the server is imported.
    os.environ.setdefault("GRPC_EXPERIMENTS", SERVE_GRPC_EXPERIMENTS)
    import yaml

    from .server.app import ServerOptions, TLSConfig, create_server, serve
    from .server.logs import setup_logging
    from .server.snapshot import DEFAULT_EVERY as SNAPSHOT_EVERY, DEFAULT_TAIL as SNAPSHOT_TAIL
    from .store import StoreError

    conf: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            conf = yaml.safe_load(f) or {}
        if not isinstance(conf, dict):
            raise SystemExit(f"{args.config}: expected a mapping of options")
        conf = {k.replace("-", "_"): v for k, v in conf.items()}
        known = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
        unknown = set(conf) - known
        if unknown:
            raise SystemExit(f"{args.config}: unknown options {sorted(unknown)}")

    def opt(name, default=None):
        v = getattr(args, name)
        return v if v is not None else conf.get(name, default)

    setup_logging(opt("log_level", "info"))
    cert, key = opt("tls_cert"), opt("tls_key")
    if bool(cert) != bool(key):
        raise SystemExit("--tls-cert and --tls-key go together")
    tls = TLSConfig(cert, key, opt("tls_client_ca")) if cert else None
    if opt("tls_client_ca") and not tls:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    dims = opt("dimensions")
    if isinstance(dims, str):
        dims = tuple(d.strip() for d in dims.split(",") if d.strip())
    try:
        server, _ = create_server(
            opt("listen", DEFAULT_SERVER),
            ServerOptions(data_dir=opt("data_dir"), store=opt("store"), etcd_prefix=str(opt("etcd_prefix", "/hci")),
                          etcd_ca_file=opt("etcd_ca"), etcd_cert_file=opt("etcd_cert"), etcd_key_file=opt("etcd_key"),
                          advertise=opt("advertise"), lease_ttl_s=int(opt("lease_ttl_s", 1)),
                          fsync=str(opt("fsync", "full")).upper(), dimensions=dims, tls=tls, token_file=opt("token_file"),
                          allow_insecure_remote=bool(opt("allow_insecure_remote", False)),
                          metrics_address=opt("metrics"),
                          transport=str(opt("transport", "grpcio")), pollers=int(opt("pollers", 16)),
                          max_workers=int(opt("max_workers", 128)),
                          snapshot_every=int(opt("snapshot_every", SNAPSHOT_EVERY)),
                          snapshot_tail=int(opt("snapshot_tail", SNAPSHOT_TAIL)),
                          host_down_after_s=float(opt("host_down_after_s", 15.0)),
                          down_reschedule_after_s=float(opt("down_reschedule_after_s", 60.0))))
    except (ValueError, OSError) as exc:
        print(f"hci-scheduler serve: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:  # the store cannot be opened or replayed
        print(f"hci-scheduler serve: store failed: {exc}", file=sys.stderr)
        return 1
    code = serve(server, port_file=opt("port_file"), grace=float(opt("grace", 5.0)))
    if server.fatal is not None:
        print(f"hci-scheduler serve: stopped: store failed: {server.fatal}", file=sys.stderr)
    return code


def run_check(args) -> int:
    """One line per problem of the store on stdout; exit 0 when it is sound, 1 when not."""
    from .server.check import check_store

    problems = check_store(args.data_dir)
    for line in problems:
        print(line)
    if not problems:
        print(f"{args.data_dir}: store is sound")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench and demo take their own arguments verbatim.
    if argv and argv[0] == "bench":
        from . import bench

        return bench.main(argv[1:]) or 0
    if argv and argv[0] == "demo":
        if "--ha" in argv[1:]:  # three replicas on etcd, the leader killed mid-run (ha/demo.py)
            from .ha import demo as ha_demo

            return ha_demo.main(argv[1:]) or 0
        from . import demo

        return demo.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "check":
        return run_check(args)
    if args.command in ("agent", "images"):
        from .agent import agent, images

        return (agent if args.command == "agent" else images).run(args)
    import grpc

    try:
        return run_client(args)
    except grpc.RpcError as exc:
        print(f"hci-scheduler {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"hci-scheduler {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
