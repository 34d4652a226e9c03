"""The `hci-scheduler` client commands against the real server."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import ROOT


def cli(server, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", *args, "--server", server.address],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_hosts_place_allocations_release_status(server, tmp_path):
    cli(server, "hosts", "add", "--id", "cli-h1", "-c", "cpu=9100000", "-c", "memory=65536", "--label", "zone=a", "--label", "kvm=true")
    listed = json.loads(cli(server, "hosts", "list", "--json").stdout)
    h = {x["id"]: x for x in listed["hosts"]}["cli-h1"]
    assert h["capacity"]["cpu"] == "9100000" and h["labels"] == {"zone": "a", "kvm": "true"}
    table = cli(server, "hosts", "list").stdout
    assert "cli-h1" in table

    wl = tmp_path / "w.yaml"
    wl.write_text("workloads:\n"
                  "  - {id: cli-w1, requests: {cpu: 9000000, memory: 512}}\n"
                  "  - {id: cli-vm, kind: vm, requests: {cpu: 1000, memory: 1024}}\n")
    placed = json.loads(cli(server, "place", "--file", str(wl), "--json").stdout)
    hosts = {p["workload_id"]: p["host_id"] for p in placed["placements"]}
    assert hosts["cli-w1"] == "cli-h1"  # only cli-h1 has 9,000,000 millicores

    allocs = json.loads(cli(server, "allocations", "--json", "--host", "cli-h1").stdout)
    assert "cli-w1" in [a["workload_id"] for a in allocs["allocations"]]

    refused = cli(server, "place", "--id", "cli-never", "-r", "cpu=1000000000000", check=False)
    assert refused.returncode == 3 and "cli-never" in refused.stdout

    explained = cli(server, "explain", "--id", "cli-x", "-r", "cpu=1000000000000").stdout
    assert "cli-x" in explained and "hosts" in explained

    cli(server, "release", "cli-w1")
    assert "cli-w1" not in cli(server, "allocations").stdout
    missing = cli(server, "release", "cli-w1", check=False)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    status = json.loads(cli(server, "status", "--json").stdout)
    assert status["dimensions"][:2] == ["cpu", "memory"]
    assert "utilisation" in cli(server, "status").stdout

    cli(server, "hosts", "update", "cli-h1", "--state", "cordoned")
    assert json.loads(cli(server, "hosts", "list", "--json", "--state", "cordoned").stdout)["hosts"][0]["id"] == "cli-h1"

    events = cli(server, "watch", "--count", "2", "--json").stdout.strip().splitlines()
    assert [json.loads(e)["sequence"] for e in events] == ["1", "2"]


def test_cli_volumes_list_and_delete(server, tmp_path):
    cli(server, "hosts", "add", "--id", "cli-ssd1", "-c", "cpu=1000", "-c", "memory=1024", "-c", "ssd=100")
    wl = tmp_path / "v.yaml"
    wl.write_text("- {id: cli-db, requests: {cpu: 10}, new_volumes: [{id: cli-vol, size_gib: 30}]}\n")
    cli(server, "place", "--file", str(wl))
    assert "cli-vol" in cli(server, "volumes", "list").stdout
    busy = cli(server, "volumes", "delete", "cli-vol", check=False)
    assert busy.returncode == 1 and "FAILED_PRECONDITION" in busy.stderr and "cli-db" in busy.stderr
    cli(server, "release", "cli-db")
    assert "deleted cli-vol" in cli(server, "volumes", "delete", "cli-vol").stdout
    listed = json.loads(cli(server, "volumes", "list", "--json").stdout)
    assert "cli-vol" not in [v["volume_id"] for v in listed.get("volumes", [])]


def test_cli_serve_rejects_unknown_config_keys(tmp_path):
    conf = tmp_path / "serve.yaml"
    conf.write_text("listen: 127.0.0.1:0\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "hci_scheduler.cli", "serve", "--config", str(conf)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "bogus" in proc.stderr


def test_cli_serve_sets_grpc_experiments_unless_the_user_did():
    # In a child: serve changes the process's environment and logging. The listen
    # address cannot be bound, so serve returns before it serves anything.
    code = ("import os, sys; from hci_scheduler import cli; "
            "rc = cli.main(['serve', '--listen', '256.0.0.1:1', '--log-level', 'warning']); "
            "print(rc, repr(os.environ['GRPC_EXPERIMENTS']), repr(cli.SERVE_GRPC_EXPERIMENTS))")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60).stdout.split()
    assert out[0] == "2" and out[1] == out[2] and "event_engine" in out[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "GRPC_EXPERIMENTS": ""},
                         capture_output=True, text=True, timeout=60).stdout.split()
    assert out[0] == "2" and out[1] == "''"
