import os
from pathlib import Path

import pytest

from hci_scheduler import Host, Workload

DATA_DIR = Path(os.environ.get("HCI_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def make_host(id="h1", cpu=4000, memory=10000, ssd=0, net=0, gpu=0, **kwargs) -> Host:
    """A host with the given capacity (millicores, MiB, GiB, Mbit/s, count)."""
    return Host(id, capacity={"cpu": cpu, "memory": memory, "ssd": ssd, "net": net, "gpu": gpu}, **kwargs)


def make_workload(id="w1", cpu=0, memory=0, **kwargs) -> Workload:
    return Workload(id, requests={"cpu": cpu, "memory": memory}, **kwargs)


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR} (set HCI_DATA_DIR)")
    return DATA_DIR
