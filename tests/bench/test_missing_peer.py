"""A peer whose package is not installed (binpacking: test extra only) is skipped with a
one-line note in the report, instead of ending `hci-scheduler bench` with an ImportError."""
import json
import sys

import numpy as np
import pytest

import hci_scheduler.bench as bench
from hci_scheduler import datasets
from hci_scheduler.bench import density, peers


@pytest.fixture
def no_binpacking(monkeypatch):
    """Imports of `binpacking` fail as on a plain install (a None entry makes `import` raise)."""
    monkeypatch.setitem(sys.modules, "binpacking", None)
    peers.clear_skipped()
    yield
    peers.clear_skipped()


def test_binpacking_peer_returns_none_and_notes_why(no_binpacking):
    cap = np.full((3, 2), 10, dtype=np.int64)
    items = np.array([[6, 1], [1, 6], [5, 5]], dtype=np.int64)
    assert peers.binpacking_1d(cap, items) is None
    (note,) = peers.skipped_notes()
    assert "binpacking" in note and "not installed" in note and "\n" not in note
    # The hosts are still checked first.
    with pytest.raises(ValueError):
        peers.binpacking_1d(np.array([[10, 10], [5, 5]], dtype=np.int64), items)
    peers.clear_skipped()
    assert peers.skipped_notes() == []


def test_density_row_without_binpacking(no_binpacking, shared_data):
    name = next(datasets.iter_vbp(known_optimum=True)).name
    cfg = density.DensityConfig(improve_s=0, cpsat_max_items=0, names=[name])
    (row,) = density.run(cfg)
    assert row["binpacking_1d"] is None and row["ffd_python"] >= row["optimum"]
    assert density.summarise([row])["overall"]["binpacking_1d"] is None
    assert len(peers.skipped_notes()) == 1


def test_report_prints_the_note(no_binpacking, monkeypatch, tmp_path, capsys):
    def fake_density(args, results, progress):
        cap = np.full((2, 1), 10, dtype=np.int64)
        assert peers.binpacking_1d(cap, np.array([[4], [4]], dtype=np.int64)) is None
        return 0

    monkeypatch.setattr(bench, "_density", fake_density)
    monkeypatch.setattr(datasets, "data_dir", lambda: tmp_path)
    assert bench.main(["--suite", "density", "--no-progress", "--out", str(tmp_path)]) == 0
    (note,) = peers.skipped_notes()
    assert f"Note: {note}." in capsys.readouterr().out
    assert f"Note: {note}." in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["notes"] == [note]
    # A run that skips nothing carries no note from the run before.
    monkeypatch.setattr(bench, "_density", lambda args, results, progress: 0)
    assert bench.main(["--suite", "density", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "Note:" not in (tmp_path / "report.md").read_text()
