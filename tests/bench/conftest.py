import pytest

from hci_scheduler import datasets


@pytest.fixture(scope="session")
def shared_data():
    """The shared data directory; skips the test when it is absent."""
    try:
        return datasets.data_dir()
    except datasets.DatasetUnavailable as exc:
        pytest.skip(f"shared data not available: {exc}")
