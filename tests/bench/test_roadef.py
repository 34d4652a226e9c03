"""The ROADEF/EURO 2012 benchmark's files, checker and engine run, on a tiny instance written
by hand in the challenge's format (the real data has no licence and is never committed)."""
import itertools
import json

import numpy as np
import pytest
from hci_scheduler.bench import main as bench_main
from hci_scheduler.bench import roadef

from hci_scheduler.errors import ValidationError

# 2 resources (cpu: weight 10; mem: transient, weight 1), 4 machines, 3 services, 5 processes,
# one balance cost, move weights 1 (process), 10 (service), 1 (machine).
#   machine  nb loc  capacity  safety   MMC to m0 m1 m2 m3
#   m0        0  0   (10, 12)  (4, 12)        0  2  5  4
#   m1        0  1   (10, 20)  (8, 3)         2  0  3  4
#   m2        1  2   (12, 14)  (6, 14)        5  3  0  1
#   m3        1  2   (6, 8)    (6, 8)         4  4  1  0
#   service s0: spreadMin 2; s1: spreadMin 0, depends on s0; s2: spreadMin 1
#   process  service  req     PMC
#   p0       s0       (4, 6)  3
#   p1       s0       (3, 5)  1
#   p2       s1       (2, 4)  2
#   p3       s2       (5, 3)  4
#   p4       s2       (1, 2)  1
#   balance: 3 x max(0, 2 x A(cpu) - A(mem)) per machine, A = capacity - usage
TINY_MODEL = """2
0 10
1 1
4
0 0 10 12 4 12 0 2 5 4
0 1 10 20 8 3 2 0 3 4
1 2 12 14 6 14 5 3 0 1
1 2 6 8 6 8 4 4 1 0
3
2 0
0 1 0
1 0
5
0 4 6 3
0 3 5 1
1 2 4 2
2 5 3 4
2 1 2 1
1
0 1 2
3
1 10 1
"""
TINY_INITIAL = "0 1 0 1 2\n"

# Initial usage m0 (6,10), m1 (8,8), m2 (1,2), m3 (0,0).
#   load: m0 cpu 10*(6-4)=20, m1 mem 1*(8-3)=5                            -> 25
#   balance: m0 A=(4,2): 3*(8-2)=18; m1 A=(2,12): 0; m2 A=(11,12): 3*(22-12)=30;
#            m3 A=(6,8): 3*(12-8)=12                                      -> 60
INITIAL_TERMS = {"load_cost": 25, "balance_cost": 60, "process_move_cost": 0,
                 "service_move_cost": 0, "machine_move_cost": 0}

# p1 m1->m2, p2 m0->m1, p3 m1->m2, p4 m2->m0; p0 stays on m0.
# Usage m0 (5,8), m1 (2,4), m2 (8,8), m3 (0,0). Transient mem held on the initial machines:
# m0 +4 (p2) = 12 <= 12 (exactly full), m1 +5+3 = 12 <= 20, m2 +2 = 10 <= 14: valid.
#   load: m0 cpu 10*(5-4)=10, m1 mem 1*(4-3)=1, m2 cpu 10*(8-6)=20        -> 31
#   balance: m0 A=(5,4): 3*(10-4)=18; m1 A=(8,16): 0; m2 A=(4,6): 3*(8-6)=6; m3 12 -> 36
#   process move: 1 x (PMC p1 1 + p2 2 + p3 4 + p4 1)                     -> 8
#   service move: moved per service s0 1, s1 1, s2 2; 10 x max            -> 20
#   machine move: 1 x (MMC[1,2] 3 + [0,1] 2 + [1,2] 3 + [2,0] 5)          -> 13
MOVED = [0, 2, 1, 2, 0]
MOVED_TERMS = {"load_cost": 31, "balance_cost": 36, "process_move_cost": 8,
               "service_move_cost": 20, "machine_move_cost": 13}


@pytest.fixture
def tiny():
    inst = roadef.parse_model(TINY_MODEL)
    return inst, roadef.parse_assignment(TINY_INITIAL, inst)


@pytest.fixture
def tiny_files(tmp_path):
    (tmp_path / "model_a0_1.txt").write_text(TINY_MODEL)
    (tmp_path / "assignment_a0_1.txt").write_text(TINY_INITIAL)
    (tmp_path / "lb_a0_1.txt").write_text("80")
    return tmp_path


def test_parse_reads_every_field(tiny):
    inst, init = tiny
    assert (inst.n_resources, inst.n_machines, inst.n_services, inst.n_processes) == (2, 4, 3, 5)
    assert inst.transient.tolist() == [False, True]
    assert inst.load_weight.tolist() == [10, 1]
    assert inst.capacity[2].tolist() == [12, 14] and inst.safety[1].tolist() == [8, 3]
    assert inst.machine_move_cost[3].tolist() == [4, 4, 1, 0]
    assert inst.location.tolist() == [0, 1, 2, 2] and inst.neighbourhood.tolist() == [0, 0, 1, 1]
    assert inst.spread_min.tolist() == [2, 0, 1]
    assert inst.dependencies == [(1, 0)]
    assert inst.service.tolist() == [0, 0, 1, 2, 2]
    assert inst.requirement[3].tolist() == [5, 3] and inst.process_move_cost.tolist() == [3, 1, 2, 4, 1]
    assert inst.balance == [(0, 1, 2, 3)]
    assert (inst.weight_process_move, inst.weight_service_move, inst.weight_machine_move) == (1, 10, 1)
    assert init.tolist() == [0, 1, 0, 1, 2]


def test_parse_format_round_trip(tiny):
    inst, _ = tiny
    text = roadef.format_model(inst)
    assert text.split() == TINY_MODEL.split()
    again = roadef.parse_model(text)
    for name in ("transient", "load_weight", "capacity", "safety", "machine_move_cost", "location",
                 "neighbourhood", "spread_min", "service", "requirement", "process_move_cost"):
        assert np.array_equal(getattr(again, name), getattr(inst, name)), name
    assert again.dependencies == inst.dependencies and again.balance == inst.balance


def test_assignment_write_read_round_trip(tiny, tmp_path):
    inst, _ = tiny
    roadef.write_assignment(tmp_path / "sol.txt", MOVED)
    assert (tmp_path / "sol.txt").read_text() == "0 2 1 2 0\n"
    assert roadef.read_assignment(tmp_path / "sol.txt", inst).tolist() == MOVED


@pytest.mark.parametrize("text, message", [
    (TINY_MODEL.rsplit("\n", 2)[0], "move cost weights"),                      # truncated
    (TINY_MODEL + "7\n", "tokens after"),                                       # trailing token
    (TINY_MODEL.replace("0 1 0\n", "0 1 5\n", 1), "depends on service 5"),      # bad dependency
    (TINY_MODEL.replace("1 1\n4\n", "1 x\n4\n", 1), "'x' is not an integer"),
    (TINY_MODEL.replace("2 1 2 1\n", "3 1 2 1\n", 1), "names a service"),
], ids=["truncated", "trailing", "dependency", "not-integer", "service"])
def test_parse_model_rejects_malformed(text, message):
    with pytest.raises(ValidationError, match=message):
        roadef.parse_model(text)


@pytest.mark.parametrize("text, message", [
    ("0 1 0 1", "4 machine indices for 5 processes"),
    ("0 1 0 1 4", "process 4 on machine 4"),
], ids=["short", "out-of-range"])
def test_parse_assignment_rejects_malformed(tiny, text, message):
    with pytest.raises(ValidationError, match=message):
        roadef.parse_assignment(text, tiny[0])


def test_objective_hand_computed(tiny):
    inst, init = tiny
    start = roadef.check(inst, init, init)
    assert start.terms == INITIAL_TERMS and start.total == 85 and start.valid
    moved = roadef.check(inst, init, MOVED)
    assert moved.terms == MOVED_TERMS and moved.total == 108
    assert moved.valid, moved.violations   # m0 exactly full on the transient mem


@pytest.mark.parametrize("assignment, kind", [
    ([0, 1, 0, 0, 2], "capacity: machine 0"),      # m0 holds p0+p2+p3 = (11, 13) > (10, 12)
    ([0, 1, 1, 0, 2], "transient: machine 0"),     # m0 (9, 9) fits, + p2's mem 4 held = 13 > 12
    ([0, 1, 0, 1, 1], "conflict: service 2"),      # p3 and p4 both on m1
    ([2, 3, 2, 1, 2], "spread: service 0"),        # p0 on m2, p1 on m3: one location
    ([0, 1, 3, 1, 2], "dependency: service 1"),    # s1 in neighbourhood 1, s0 only in 0
], ids=["capacity", "transient", "conflict", "spread", "dependency"])
def test_check_finds_each_violation(tiny, assignment, kind):
    inst, init = tiny
    found = roadef.check(inst, init, assignment).violations
    assert found and all(v.startswith(kind) for v in found), found


def test_check_rejects_bad_assignment(tiny):
    inst, init = tiny
    with pytest.raises(ValidationError, match="5 integer machine indices"):
        roadef.check(inst, init, [0, 1, 2])
    with pytest.raises(ValidationError, match="0..3"):
        roadef.check(inst, init, [0, 1, 2, 3, 4])


def test_check_agrees_with_project_objective_on_every_assignment(tiny):
    """All 4^5 assignments: the same terms and the same verdict as the engine's reference."""
    objective = pytest.importorskip("hci_scheduler.rebalance.objective")
    inst, init = tiny
    problem = roadef.to_problem(inst, init)
    n_valid = 0
    for a in itertools.product(range(inst.n_machines), repeat=inst.n_processes):
        ours = roadef.check(inst, init, np.array(a))
        theirs = objective.terms(problem, np.array(a))
        assert {t: theirs[t] for t in roadef.TERMS} == ours.terms, a
        assert theirs["host_cost"] == theirs["group_move_cost"] == 0
        assert ours.valid == (objective.violations(problem, np.array(a)) == []), a
        n_valid += ours.valid
    assert 1 < n_valid < 4 ** 5


def test_engine_solution_is_valid_and_not_worse(tiny):
    pytest.importorskip("hci_scheduler.rebalance.search")
    inst, init = tiny
    result = roadef.solve(inst, init, time_limit_s=2.0, seed=0)
    got = roadef.check(inst, init, np.asarray(result.assignment))
    assert got.valid, got.violations
    # The optimum by enumeration of the 1,024 assignments (72: p1 to m2, p2 to m1, p3 to
    # m3, below the initial 85); the engine re-solves a neighbourhood this small exactly.
    best = min(c.total for a in itertools.product(range(4), repeat=5)
               if (c := roadef.check(inst, init, np.array(a))).valid)
    assert best == 72 and got.total == best


def test_cli_single_instance_writes_solution(tiny_files, capsys):
    pytest.importorskip("hci_scheduler.rebalance.search")
    d = tiny_files
    code = bench_main(["--suite", "roadef", "--instance", str(d / "model_a0_1.txt"),
                       "--assignment", str(d / "assignment_a0_1.txt"), "--time-limit", "2",
                       "--seed", "0", "--solution", str(d / "out.txt"), "--no-progress"])
    out = capsys.readouterr().out
    inst = roadef.read_model(d / "model_a0_1.txt")
    sol = roadef.read_assignment(d / "out.txt", inst)
    got = roadef.check(inst, roadef.parse_assignment(TINY_INITIAL, inst), sol)
    assert code == 0 and got.valid
    assert "total" in out and f"{got.total:,}" in out and "85" in out and "; agrees)" in out


def test_cli_set_mode_writes_results(tiny_files, tmp_path):
    pytest.importorskip("hci_scheduler.rebalance.search")
    out = tmp_path / "out"
    code = bench_main(["--suite", "roadef", "--data-dir", str(tiny_files), "--time-limit", "1",
                       "--out", str(out), "--no-progress"])
    rows = json.loads((out / "results.json").read_text())["roadef"]["rows"]
    assert code == 0 and [r["instance"] for r in rows] == ["a0_1"]
    r = rows[0]
    assert r["initial"] == 85 and r["lower_bound"] == 80 and r["valid"] and r["checker_agrees"]
    assert r["gap_lower_bound_pct"] == pytest.approx(100 * (r["objective"] - 80) / 80, abs=1e-4)
    assert (out / "roadef_solutions" / "solution_a0_1.txt").exists()
    assert "a0_1" in (out / "report.md").read_text() and (out / "roadef_gaps.png").stat().st_size > 0


def test_cli_needs_files_or_a_folder():
    with pytest.raises(ValidationError, match="--instance MODEL"):
        bench_main(["--suite", "roadef", "--no-progress"])
