"""Real Docker Engines for the agent's tests: three dockerd's side by side (one per host),
started once per session with the offline images built on each, and stopped at the end."""

from __future__ import annotations

import pytest

from hci_scheduler.agent import images as images_mod
from hci_scheduler.agent.engines import LocalEngines, unavailable


@pytest.fixture(scope="session")
def engines():
    why = unavailable()
    if why:
        pytest.skip(f"docker tests: {why}")
    es = LocalEngines(3).start()
    try:
        for e in es.engines:
            c = e.client(timeout=300)
            try:
                es.images = [i.name for i in images_mod.build_all(c)]
            finally:
                c.close()
        yield es
    finally:
        es.close()


@pytest.fixture(scope="session")
def images(engines):
    """(busybox image, qemu launcher image) names, present on every engine."""
    return tuple(engines.images)


@pytest.fixture
def docker_client(engines):
    c = engines[0].client()
    yield c
    c.close()
