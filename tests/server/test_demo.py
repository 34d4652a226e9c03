"""The main job through gRPC, at a small size."""
from __future__ import annotations

import io

from rich.console import Console

from hci_scheduler import demo


def test_demo_places_through_grpc_and_restarts_to_the_same_state(tmp_path):
    out = io.StringIO()
    figures = demo.run(n_hosts=60, n_containers=400, n_vms=120, unary=20, batch=100,
                       data_dir=str(tmp_path / "data"), console=Console(file=out, width=200))
    text = out.getvalue()
    assert figures["restart_same_state"] is True
    assert figures["placed"] + figures["refused"] == 520
    assert 0 < figures["hosts_used"] <= 60
    assert "utilisation" in text and "unary Place p50 / p99" in text
    # Refusals, when there are any, come with a reason and an example explanation.
    for reason, n in figures["refusals"].items():
        assert n > 0 and reason in text
