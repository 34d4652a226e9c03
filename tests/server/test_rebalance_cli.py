"""`hci-scheduler rebalance | drain | capacity` against the real server (a subprocess)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def cli(server, *args, check=True):
    env = {**os.environ, "COLUMNS": "200"}  # rich tables: one line per row
    proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", *args, "--server", server.address],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def allocations(server) -> dict[str, str]:
    listed = json.loads(cli(server, "allocations", "--json").stdout)
    return {a["workload_id"]: a["host_id"] for a in listed.get("allocations", [])}


def hosts(server) -> dict[str, dict]:
    return {h["id"]: h for h in json.loads(cli(server, "hosts", "list", "--json").stdout)["hosts"]}


def check_summary(out: str, before: dict[str, str]) -> None:
    """Three 1000-millicore workloads, one on each of three 4000-millicore hosts: two moves."""
    assert "consolidate" in out and "2 move(s) in 1 step(s)" in out
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines() if ln.count("│") >= 3]
    moves = [r for r in rows if len(r) == 5]
    assert len(moves) == 2 and all(before[w] == src and src != dst for _, w, src, dst, _ in moves)
    summary = {r[0]: r[1:] for r in rows if len(r) == 3}
    assert summary["hosts used"] == ["3", "1"]
    # cpu: 3 x 1000 over 3 hosts of 4000 = 25.0%, then over one host = 75.0%;
    # memory: 3 x 1024 over 3 x 8192 = 12.5%, then over 8192 = 37.5%.
    assert summary["cpu utilisation of hosts in use"] == ["25.0%", "75.0%"]
    assert summary["memory utilisation of hosts in use"] == ["12.5%", "37.5%"]
    assert "hosts freed: 2; lower bound: 1" in out


def test_rebalance_prints_moves_and_a_summary_then_applies(server, tmp_path):
    hf = tmp_path / "hosts.yaml"
    hf.write_text("hosts:\n" + "".join(f"  - {{id: rc{i}, capacity: {{cpu: 4000, memory: 8192}}}}\n" for i in range(3)))
    cli(server, "hosts", "add", "--file", str(hf))
    wf = tmp_path / "w.yaml"
    wf.write_text("".join(f"- {{id: rw{i}, requests: {{cpu: 1000, memory: 1024}}}}\n" for i in range(3)))
    cli(server, "place", "--file", str(wf), "--strategy", "spread")
    before = allocations(server)
    assert sorted(before.values()) == ["rc0", "rc1", "rc2"]

    out = cli(server, "rebalance", "--goal", "consolidate", "--time-limit", "1").stdout
    assert allocations(server) == before  # a plan changes nothing
    check_summary(out, before)

    applied = cli(server, "rebalance", "--goal", "consolidate", "--time-limit", "1", "--apply").stdout
    check_summary(applied, before)  # printed before it applies
    assert "applied 1 step(s)" in applied
    rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in applied.splitlines() if ln.count("│") >= 3]
    assert [r[:4] for r in rows if len(r) == 5] == [r for r in rows if len(r) == 4]  # the applied steps
    after = allocations(server)
    again = json.loads(cli(server, "rebalance", "--goal", "consolidate", "--time-limit", "1", "--apply",
                           "--json").stdout)
    assert again["plan"]["status"] == "PLAN_STATUS_UNCHANGED" and "steps" not in again["plan"]
    assert again["applied"]["plan_id"] == again["plan"]["id"] and allocations(server) == after
    assert len(set(after.values())) == 1 and set(after) == set(before)
    counts = {h: v.get("workload_count", "0") for h, v in hosts(server).items() if h.startswith("rc")}
    assert sorted(counts.values()) == ["0", "0", "3"]


def test_drain_moves_every_workload_off_the_host(server, tmp_path):
    hf = tmp_path / "hosts.yaml"
    hf.write_text("- {id: dr1, capacity: {cpu: 4000, memory: 8192}, labels: {pool: dr}}\n"
                  "- {id: dr2, capacity: {cpu: 4000, memory: 8192}, labels: {pool: dr}}\n")
    cli(server, "hosts", "add", "--file", str(hf))
    wf = tmp_path / "w.yaml"
    wf.write_text("- {id: dw1, requests: {cpu: 1000}, node_selector: {pool: dr}}\n"
                  "- {id: dw2, requests: {cpu: 1000}, node_selector: {pool: dr}}\n")
    cli(server, "place", "--file", str(wf), "--strategy", "spread")
    on = allocations(server)
    victim = on["dw1"]
    out = cli(server, "drain", victim, "--time-limit", "1").stdout
    assert f"drained {victim}" in out and "dw1" in out
    after = allocations(server)
    assert victim not in (after["dw1"], after["dw2"]) and after["dw2"] == on["dw2"]
    assert hosts(server)[victim]["state"] == "HOST_STATE_DRAINING"

    missing = cli(server, "drain", "no-such-host", "--time-limit", "1", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_capacity_reads_types_and_workloads_from_files(server, tmp_path):
    tf = tmp_path / "types.yaml"
    tf.write_text("host_types:\n"
                  "  - {name: cap-small, capacity: {cpu: 100000, memory: 4096}, price: 10, labels: {cap: 'yes'}}\n"
                  "  - {name: cap-big, capacity: {cpu: 100000, memory: 16384}, price: 30, labels: {cap: 'yes'}}\n")
    wf = tmp_path / "w.yaml"
    # Only the new hosts carry cap=yes: 2 x 4096 MiB = two small hosts (20) beat one big (30).
    wf.write_text("- {id: cw1, requests: {cpu: 1000, memory: 4096}, node_selector: {cap: 'yes'}}\n"
                  "- {id: cw2, requests: {cpu: 1000, memory: 4096}, node_selector: {cap: 'yes'}}\n")
    resp = json.loads(cli(server, "capacity", "--types", str(tf), "--workloads", str(wf), "--json").stdout)
    assert resp["hosts_to_add"] == {"cap-small": "2"} and resp["cost"] == "20"
    assert sorted(resp["placements"].values()) == ["cap-small#0", "cap-small#1"]
    table = cli(server, "capacity", "--types", str(tf), "--workloads", str(wf)).stdout
    assert "cap-small" in table and "cost: 20" in table
