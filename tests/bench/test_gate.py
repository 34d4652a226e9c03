from bench import gate


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
