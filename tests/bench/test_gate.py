import pytest

from hci_scheduler.bench import density, gate


def _row(name, best, opt=10):
    return {"instance": name, "best": best, "optimum": opt}


CFG = {"improve_s": 0.5, "improve_stride": 8}


def test_gate_passes_when_equal_or_better():
    base = {"config": CFG, "instances": {"a": 11, "b": 12}}
    regs, notes = gate.check([_row("a", 11), _row("b", 10)], base, CFG)
    assert regs == [] and notes == []


def test_gate_flags_one_host_worse():
    base = {"config": CFG, "instances": {"a": 11}}
    regs, _ = gate.check([_row("a", 12)], base, CFG)
    assert [r.instance for r in regs] == ["a"]
    assert str(regs[0]) == "a: 12 hosts (ratio 1.2000) > baseline 11 (ratio 1.1000)"


def test_gate_ignores_unknown_optimum_and_notes_new_instances():
    base = {"config": CFG, "instances": {}}
    regs, notes = gate.check([_row("a", 99), {"instance": "z", "best": 5, "optimum": None}], base, CFG)
    assert regs == [] and notes == ["a: not in baseline"]


def test_gate_skips_incomparable_config():
    base = {"config": CFG, "instances": {"a": 1}}
    regs, notes = gate.check([_row("a", 5)], base, {"improve_s": 0.1, "improve_stride": 8})
    assert regs == [] and "gate not applied" in notes[0]
    # a denser improvement schedule (every instance) is comparable with every 8th
    regs, _ = gate.check([_row("a", 5)], base, {"improve_s": 0.5, "improve_stride": 1})
    assert len(regs) == 1


def test_update_only_tightens(tmp_path):
    base = {"config": CFG, "instances": {"a": 11, "b": 12}}
    new = gate.updated([_row("a", 12), _row("b", 11), _row("c", 10)], base, CFG)
    assert new["instances"] == {"a": 11, "b": 11, "c": 10}
    path = tmp_path / "b.json"
    gate.save_baseline(new, path)
    assert gate.load_baseline(path) == new


@pytest.mark.parametrize("clipped, volume_bound, expected", [
    (False, 21, 20),  # unclipped: the recorded optimum is the bound
    (True, 21, 21),   # clipped sizes sum past 20 hosts: the volume bound 21 holds instead
    (True, 19, 20),   # clipped but the optimum still dominates
], ids=["unclipped", "clipped-volume", "clipped-optimum"])
def test_packed_bound_for_clipped_instances(clipped, volume_bound, expected):
    row = {"optimum": 20, "clipped": clipped, "volume_bound": volume_bound}
    assert density.packed_bound(row) == expected


def test_summary_lists_small_instances_over_by_more_than_one():
    def row(name, best, optimum, clipped=False, volume_bound=0):
        return {"instance": name, "family": "X/c", "n_items": 60, "optimum": optimum, "best": best,
                "clipped": clipped, "volume_bound": volume_bound, "reference": optimum,
                "greedy": {"binpack": best, "dot": best}, "greedy_s": {"binpack": 0.0},
                "stranded_greedy_binpack": 0.0}
    rows = [row("X/a", 22, 20, clipped=True, volume_bound=21),  # +2 over index, +1 over its bound
            row("X/b", 17, 16), row("X/c", 19, 16)]
    o = density.summarise(rows)["overall"]
    assert o["small_over_by_more_than_one"] == 2
    assert o["small_over_packed_bound_by_more_than_one"] == 1
    assert [w["instance"] for w in o["small_worst"]] == ["X/c", "X/a"]
