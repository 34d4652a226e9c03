"""ROADEF/EURO Challenge 2012 (machine reassignment, Google's data) on the project's rebalancer.

The challenge is the standard public benchmark for rebalancing a cluster: move processes
between machines to lower load and balance costs, paying for every move, under capacity
(with transient resources held on both machines), conflict, spread and dependency rules.

- `read_model`, `read_assignment`, `write_assignment`, `format_model`: the challenge's
  integer formats (subject.pdf, section "Instance format").
- `Instance`: the model file as read, with the challenge's names.
- `to_problem`: the mapping onto the engine's `Problem` (conflict for every service, spread,
  dependency per neighbourhood, safety capacity as the soft target, transient dimensions).
- `check`: an independent checker and objective written from the problem statement on the
  `Instance` alone (it imports nothing from `hci_scheduler.rebalance`), so it can judge both
  the mapping and the engine; tests compare it with `rebalance.objective.terms`.
- `solve`, `run_instance`, `run_set`: the engine on one instance or a whole set, with the
  published lower bound and best known figure beside every result.

The data has no licence: nothing of it is in the repository, the user names a folder
(the layout of wjaskowski/roadef-challange-2012-public: data/A, data/B).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hci_scheduler.errors import ValidationError

__all__ = [
    "BEST_KNOWN",
    "TERMS",
    "Check",
    "Instance",
    "check",
    "format_model",
    "parse_assignment",
    "parse_model",
    "read_assignment",
    "read_model",
    "run_instance",
    "run_set",
    "solve",
    "to_problem",
    "write_assignment",
]

#: The objective terms of the challenge, in the statement's order (names as in
#: hci_scheduler.rebalance.objective, so the two can be compared term by term).
TERMS = ("load_cost", "balance_cost", "process_move_cost", "service_move_cost", "machine_move_cost")

#: Best known objectives published for set A (issue 14; the challenge's final results).
#: The repository's lb_*.txt files give the lower bounds of every instance.
BEST_KNOWN = {"a1_1": 44_306_501, "a1_2": 777_532_896, "a1_3": 583_005_717,
              "a1_4": 252_728_589, "a1_5": 727_578_309}


@dataclass
class Instance:
    """One model file of the challenge, with its own names.

    Shapes: R resources, M machines, S services, P processes.

    transient : bool (R,)
    load_weight : int64 (R,)
        weightLoadCost per resource.
    neighbourhood, location : int64 (M,)
    capacity, safety : int64 (M, R)
        hard capacity and safety capacity (load above it costs load_weight per unit).
    machine_move_cost : int64 (M, M)
        MMC[a, b]: cost of moving a process from machine a to machine b.
    spread_min : int64 (S,)
    dependencies : list of (s, s2)
        service s depends on service s2 (every neighbourhood running s runs s2).
    service : int64 (P,)
    requirement : int64 (P, R)
    process_move_cost : int64 (P,)
    balance : list of (r1, r2, target, weight)
        weight x max(0, target x A(m, r1) - A(m, r2)) per machine, A = capacity - usage.
    weight_process_move, weight_service_move, weight_machine_move : int
    """

    transient: np.ndarray
    load_weight: np.ndarray
    neighbourhood: np.ndarray
    location: np.ndarray
    capacity: np.ndarray
    safety: np.ndarray
    machine_move_cost: np.ndarray
    spread_min: np.ndarray
    dependencies: list
    service: np.ndarray
    requirement: np.ndarray
    process_move_cost: np.ndarray
    balance: list
    weight_process_move: int
    weight_service_move: int
    weight_machine_move: int

    @property
    def n_machines(self) -> int:
        return self.capacity.shape[0]

    @property
    def n_processes(self) -> int:
        return self.requirement.shape[0]

    @property
    def n_resources(self) -> int:
        return self.capacity.shape[1]

    @property
    def n_services(self) -> int:
        return len(self.spread_min)


# ---------------------------------------------------------------------------------------
# Files


class _Tokens:
    """The file's integers in order; every read names what it expected on failure."""

    def __init__(self, text: str, source: str):
        try:
            self.values = np.array(text.split(), dtype=np.int64)
        except ValueError:
            bad = next(t for t in text.split() if not t.lstrip("-").isdigit())
            raise ValidationError(f"{source}: {bad!r} is not an integer") from None
        self.pos = 0
        self.source = source

    def take(self, count: int, what: str) -> np.ndarray:
        if count < 0 or self.pos + count > len(self.values):
            raise ValidationError(f"{self.source}: file ends while reading {what} "
                                  f"(token {self.pos + 1}, {len(self.values)} in the file)")
        out = self.values[self.pos:self.pos + count]
        self.pos += count
        return out

    def one(self, what: str, low: int = 0, high: int | None = None) -> int:
        v = int(self.take(1, what)[0])
        if v < low or (high is not None and v > high):
            raise ValidationError(f"{self.source}: {what} = {v}, expected {low}..{high if high is not None else ''}")
        return v


def parse_model(text: str, source: str = "model") -> Instance:
    """Read a model file's text (the challenge's format) into an `Instance`.

    Raises
    ------
    ValidationError
        the file ends early, holds a non-integer or a trailing token, or an index
        (service, resource) is out of range; the message names the field.
    """
    tok = _Tokens(text, source)
    n_res = tok.one("number of resources", 1)
    res = tok.take(2 * n_res, "resources").reshape(n_res, 2)
    if not np.isin(res[:, 0], (0, 1)).all():
        raise ValidationError(f"{source}: transient flags must be 0 or 1, got {res[:, 0].tolist()}")
    n_mach = tok.one("number of machines", 1)
    row = 2 + 2 * n_res + n_mach
    mach = tok.take(n_mach * row, "machines").reshape(n_mach, row)
    n_serv = tok.one("number of services", 0)
    spread_min = np.zeros(n_serv, np.int64)
    deps = []
    for s in range(n_serv):
        spread_min[s] = tok.one(f"service {s} spreadMin")
        k = tok.one(f"service {s} number of dependencies", 0, n_serv)
        for d in tok.take(k, f"service {s} dependencies"):
            if not 0 <= d < n_serv:
                raise ValidationError(f"{source}: service {s} depends on service {d}, expected 0..{n_serv - 1}")
            deps.append((s, int(d)))
    n_proc = tok.one("number of processes", 0)
    proc = tok.take(n_proc * (n_res + 2), "processes").reshape(n_proc, n_res + 2)
    if n_proc and (proc[:, 0].min() < 0 or proc[:, 0].max() >= n_serv):
        raise ValidationError(f"{source}: a process names a service outside 0..{n_serv - 1}")
    n_bal = tok.one("number of balance costs", 0)
    balance = []
    for b in range(n_bal):
        r1, r2, target, weight = (int(v) for v in tok.take(4, f"balance cost {b}"))
        if not (0 <= r1 < n_res and 0 <= r2 < n_res):
            raise ValidationError(f"{source}: balance cost {b} names resources {r1}, {r2}, expected 0..{n_res - 1}")
        balance.append((r1, r2, target, weight))
    wpmc, wsmc, wmmc = (int(v) for v in tok.take(3, "move cost weights"))
    if tok.pos != len(tok.values):
        raise ValidationError(f"{source}: {len(tok.values) - tok.pos} tokens after the move cost weights")
    if (mach < 0).any() or (proc < 0).any():
        raise ValidationError(f"{source}: negative machine or process value")
    return Instance(
        transient=res[:, 0].astype(bool), load_weight=res[:, 1].copy(),
        neighbourhood=mach[:, 0].copy(), location=mach[:, 1].copy(),
        capacity=np.ascontiguousarray(mach[:, 2:2 + n_res]),
        safety=np.ascontiguousarray(mach[:, 2 + n_res:2 + 2 * n_res]),
        machine_move_cost=np.ascontiguousarray(mach[:, 2 + 2 * n_res:]),
        spread_min=spread_min, dependencies=deps,
        service=proc[:, 0].copy(), requirement=np.ascontiguousarray(proc[:, 1:1 + n_res]),
        process_move_cost=proc[:, 1 + n_res].copy(), balance=balance,
        weight_process_move=wpmc, weight_service_move=wsmc, weight_machine_move=wmmc)


def format_model(inst: Instance) -> str:
    """The model file of `inst` in the challenge's format (`parse_model` reads it back)."""
    lines = [str(inst.n_resources)]
    lines += [f"{int(t)} {w}" for t, w in zip(inst.transient, inst.load_weight)]
    lines.append(str(inst.n_machines))
    for m in range(inst.n_machines):
        vals = [inst.neighbourhood[m], inst.location[m], *inst.capacity[m], *inst.safety[m],
                *inst.machine_move_cost[m]]
        lines.append(" ".join(str(int(v)) for v in vals))
    lines.append(str(inst.n_services))
    deps: dict[int, list[int]] = {}
    for s, s2 in inst.dependencies:
        deps.setdefault(s, []).append(s2)
    for s in range(inst.n_services):
        lines.append(" ".join(str(v) for v in (int(inst.spread_min[s]), len(deps.get(s, [])), *deps.get(s, []))))
    lines.append(str(inst.n_processes))
    for p in range(inst.n_processes):
        vals = [inst.service[p], *inst.requirement[p], inst.process_move_cost[p]]
        lines.append(" ".join(str(int(v)) for v in vals))
    lines.append(str(len(inst.balance)))
    for r1, r2, target, weight in inst.balance:
        lines += [f"{r1} {r2} {target}", str(weight)]
    lines.append(f"{inst.weight_process_move} {inst.weight_service_move} {inst.weight_machine_move}")
    return "\n".join(lines) + "\n"


def read_model(path) -> Instance:
    """`parse_model` of a file."""
    return parse_model(Path(path).read_text(), source=str(path))


def parse_assignment(text: str, inst: Instance, source: str = "assignment") -> np.ndarray:
    """One machine index per process, whitespace separated -> int64 (P,).

    Raises
    ------
    ValidationError
        wrong count, a non-integer, or a machine outside 0..M-1.
    """
    tok = _Tokens(text, source)
    a = tok.values
    if len(a) != inst.n_processes:
        raise ValidationError(f"{source}: {len(a)} machine indices for {inst.n_processes} processes")
    if len(a) and (a.min() < 0 or a.max() >= inst.n_machines):
        p = int(np.flatnonzero((a < 0) | (a >= inst.n_machines))[0])
        raise ValidationError(f"{source}: process {p} on machine {a[p]}, expected 0..{inst.n_machines - 1}")
    return a.copy()


def read_assignment(path, inst: Instance) -> np.ndarray:
    """`parse_assignment` of a file."""
    return parse_assignment(Path(path).read_text(), inst, source=str(path))


def write_assignment(path, assignment) -> None:
    """Write a solution file: one machine index per process, space separated."""
    Path(path).write_text(" ".join(str(int(v)) for v in assignment) + "\n")


# ---------------------------------------------------------------------------------------
# The independent checker


@dataclass
class Check:
    """What `check` found: the objective by term, its total, and every broken rule."""

    terms: dict
    violations: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def valid(self) -> bool:
        return not self.violations


def check(inst: Instance, initial, assignment) -> Check:
    """Judge `assignment` against `initial` by the challenge's rules, from the statement.

    Hard constraints: capacity (usage <= capacity on every resource), transient capacity
    (a moved process still holds its transient resources on its initial machine),
    conflict (the processes of a service on distinct machines), spread (a service covers
    at least spreadMin locations), dependency (s depends on s2: every neighbourhood that
    runs a process of s runs one of s2). Objective: the weighted sum of load, balance,
    process move, service move (largest number of moved processes of one service) and
    machine move costs.

    Raises
    ------
    ValidationError
        an assignment of the wrong length or with a machine outside 0..M-1.
    """
    init = _as_assignment(inst, initial, "initial")
    new = _as_assignment(inst, assignment, "assignment")
    n_mach, n_res = inst.n_machines, inst.n_resources
    use = np.zeros((n_mach, n_res), np.int64)
    np.add.at(use, new, inst.requirement)
    moved = init != new
    held = np.zeros((n_mach, n_res), np.int64)
    np.add.at(held, init[moved], inst.requirement[moved])
    held[:, ~inst.transient] = 0
    bad: list[str] = []
    for m, r in zip(*np.nonzero(use > inst.capacity)):
        bad.append(f"capacity: machine {m} resource {r} uses {use[m, r]} > {inst.capacity[m, r]}")
    for m, r in zip(*np.nonzero((use <= inst.capacity) & (use + held > inst.capacity))):
        bad.append(f"transient: machine {m} resource {r} uses {use[m, r]} + {held[m, r]} held by "
                   f"processes moved away > {inst.capacity[m, r]}")
    # Conflict: a (service, machine) pair twice.
    pair, count = np.unique(inst.service * n_mach + new, return_counts=True)
    for key in pair[count > 1]:
        bad.append(f"conflict: service {key // n_mach} has {count[pair == key][0]} processes on machine {key % n_mach}")
    # Spread: distinct locations per service.
    n_loc = int(inst.location.max()) + 1
    svc_loc = np.unique(inst.service * n_loc + inst.location[new])
    covered = np.bincount(svc_loc // n_loc, minlength=inst.n_services)
    for s in np.flatnonzero(covered < inst.spread_min):
        bad.append(f"spread: service {s} covers {covered[s]} locations < spreadMin {inst.spread_min[s]}")
    # Dependency: neighbourhoods of s within the neighbourhoods of s2.
    n_nb = int(inst.neighbourhood.max()) + 1
    present = set(np.unique(inst.service * n_nb + inst.neighbourhood[new]).tolist())
    nbs: dict[int, list[int]] = {}
    for key in sorted(present):
        nbs.setdefault(key // n_nb, []).append(key % n_nb)
    for s, s2 in inst.dependencies:
        for nb in nbs.get(s, ()):
            if s2 * n_nb + nb not in present:
                bad.append(f"dependency: service {s} runs in neighbourhood {nb} without service {s2}")
    # Objective.
    load = int((np.maximum(0, use - inst.safety) * inst.load_weight).sum())
    avail = inst.capacity - use
    balance = sum(int(weight) * int(np.maximum(0, int(target) * avail[:, r1] - avail[:, r2]).sum())
                  for r1, r2, target, weight in inst.balance)
    moved_per_service = np.bincount(inst.service[moved], minlength=inst.n_services)
    terms = {
        "load_cost": load,
        "balance_cost": balance,
        "process_move_cost": inst.weight_process_move * int(inst.process_move_cost[moved].sum()),
        "service_move_cost": inst.weight_service_move * int(moved_per_service.max(initial=0)),
        "machine_move_cost": inst.weight_machine_move * int(inst.machine_move_cost[init, new].sum()),
    }
    return Check(terms=terms, violations=bad)


def _as_assignment(inst: Instance, a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != (inst.n_processes,) or not np.issubdtype(a.dtype, np.integer):
        raise ValidationError(f"{name}: expected {inst.n_processes} integer machine indices, got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= inst.n_machines):
        raise ValidationError(f"{name}: machine indices must be in 0..{inst.n_machines - 1}")
    return a.astype(np.int64)


# ---------------------------------------------------------------------------------------
# The engine


def to_problem(inst: Instance, initial):
    """The instance as the engine's `Problem`: every service a conflict group, safety
    capacity as the soft `target`, transient resources, balance triples, the three move
    weights, machine move costs as the host-pair matrix; no host cost."""
    from hci_scheduler.rebalance.problem import Problem

    init = _as_assignment(inst, initial, "initial")
    deps = np.array(inst.dependencies, np.int32).reshape(-1, 2)
    return Problem(
        capacity=inst.capacity, request=inst.requirement, initial=init.astype(np.int32),
        target=inst.safety, location=inst.location.astype(np.int32),
        neighbourhood=inst.neighbourhood.astype(np.int32), move_cost_matrix=inst.machine_move_cost,
        service=inst.service.astype(np.int32), move_cost=inst.process_move_cost,
        conflict=np.ones(inst.n_services, bool), spread_min=inst.spread_min.astype(np.int32),
        depends=deps, load_weight=inst.load_weight,
        balance=[tuple(int(v) for v in b) for b in inst.balance], transient=inst.transient,
        process_move_weight=inst.weight_process_move, service_move_weight=inst.weight_service_move,
        machine_move_weight=inst.weight_machine_move)


def solve(inst: Instance, initial, *, time_limit_s: float, seed: int = 0, progress=None):
    """Run the project's rebalancer (`hci_scheduler.rebalance.search.search`) on the
    instance; returns its result (`.assignment`, `.status`, `.stats`)."""
    from hci_scheduler.rebalance.search import search

    return search(to_problem(inst, initial), time_limit_s=time_limit_s, seed=seed, progress=progress)


def run_instance(model, assignment, *, time_limit_s: float = 60.0, seed: int = 0,
                 solution=None, progress=None) -> dict:
    """Solve one instance from its files; write the solution file when `solution` is given.

    The time limit covers reading the files and building the problem too, as in the
    challenge (wall clock from the call). Returns a row: sizes, initial and final
    objective by term (computed by `check`), validity, violations, engine status and stats.
    """
    t0 = time.perf_counter()
    inst = read_model(model)
    init = read_assignment(assignment, inst)
    before = check(inst, init, init)
    budget = max(0.1, time_limit_s - (time.perf_counter() - t0))
    try:
        result = solve(inst, init, time_limit_s=budget, seed=seed, progress=progress)
    finally:
        getattr(progress, "close", lambda: None)()
    seconds = time.perf_counter() - t0
    new = np.asarray(result.assignment, dtype=np.int64)
    after = check(inst, init, new)
    project = _project_objective(inst, init, new)
    if solution is not None:
        write_assignment(solution, new)
    return {
        "instance": _name(model), "machines": inst.n_machines, "processes": inst.n_processes,
        "services": inst.n_services, "resources": inst.n_resources,
        "initial": before.total, "initial_terms": before.terms, "initial_valid": before.valid,
        "objective": after.total, "terms": after.terms, "valid": after.valid,
        "project_objective": project, "checker_agrees": project == after.total,
        "violations": after.violations[:20], "n_violations": len(after.violations),
        "moved": int((new != init).sum()), "seconds": round(seconds, 2),
        "status": str(getattr(result, "status", "")), "stats": _plain(getattr(result, "stats", {})),
        "seed": seed, "time_limit_s": time_limit_s,
    }


def _project_objective(inst: Instance, initial, assignment) -> int:
    """The objective as the engine's reference computes it (rebalance.objective), beside
    the checker's, so every run cross-checks the mapping."""
    from hci_scheduler.rebalance import objective

    return objective.total(to_problem(inst, initial), assignment)


def _name(model) -> str:
    stem = Path(model).stem
    return stem.removeprefix("model_")


def _plain(value):
    """JSON-safe copy of the engine's stats (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{value.shape}"
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


# ---------------------------------------------------------------------------------------
# A whole set


def find_instances(data_dir, sets=("A",)) -> list[dict]:
    """Every instance of the named sets under `data_dir` (model_*.txt with its
    assignment_*.txt; lb_*.txt and original_cost_*.txt read when present), sorted by name.
    Accepts the data repository's root, its data/ folder, or one set's folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ValidationError(f"--data-dir {data_dir}: not a directory")
    prefixes = tuple(f"model_{s.lower()}" for s in sets)
    found = {}
    for model in sorted(root.rglob("model_*.txt")):
        if not model.name.startswith(prefixes):
            continue
        name = _name(model)
        assignment = model.with_name(f"assignment_{name}.txt")
        if not assignment.exists() or name in found:
            continue
        found[name] = {"name": name, "model": model, "assignment": assignment,
                       "lower_bound": _read_int(model.with_name(f"lb_{name}.txt")),
                       "original_cost": _read_int(model.with_name(f"original_cost_{name}.txt")),
                       "best_known": BEST_KNOWN.get(name)}
    if not found:
        raise ValidationError(f"--data-dir {data_dir}: no model_*.txt with its assignment_*.txt "
                              f"for sets {', '.join(sets)}")
    return [found[k] for k in sorted(found)]


def _commit():
    """The repository's HEAD (and whether the tree had changes), so a figure names its code."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               check=False, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+changes" if dirty else "")) or None


def _read_int(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _gap(value, reference):
    """Percentage above `reference` (None without one; a zero reference gives none either)."""
    if reference is None or reference <= 0:
        return None
    return round(100.0 * (value - reference) / reference, 4)


def run_set(data_dir, *, sets=("A",), time_limit_s=60.0, seed=0, out="bench-out", progress_factory=None,
            instances=None) -> dict:
    """Run every instance of `sets` (or only those named in `instances`); writes each
    solution in `out`/roadef_solutions and returns the section for results.json.
    `progress_factory()` makes a fresh progress callback per instance."""
    out = Path(out)
    (out / "roadef_solutions").mkdir(parents=True, exist_ok=True)
    rows = []
    for item in find_instances(data_dir, sets):
        if instances and item["name"] not in instances:
            continue
        row = run_instance(item["model"], item["assignment"], time_limit_s=time_limit_s, seed=seed,
                           solution=out / "roadef_solutions" / f"solution_{item['name']}.txt",
                           progress=progress_factory() if progress_factory else None)
        row["lower_bound"] = item["lower_bound"]
        row["best_known"] = item["best_known"]
        row["published_initial"] = item["original_cost"]
        row["gap_lower_bound_pct"] = _gap(row["objective"], item["lower_bound"])
        row["gap_best_known_pct"] = _gap(row["objective"], item["best_known"])
        rows.append(row)
        print(_row_line(row), file=sys.stderr)
    section = {"config": {"sets": list(sets), "time_limit_s": time_limit_s, "seed": seed},
               "rows": rows, "all_valid": all(r["valid"] for r in rows)}
    return section


def _row_line(r) -> str:
    gap = r["gap_best_known_pct"] if r["gap_best_known_pct"] is not None else r["gap_lower_bound_pct"]
    ref = "best" if r["gap_best_known_pct"] is not None else "lb"
    return (f"{r['instance']}: {r['objective']:,} (initial {r['initial']:,}, {ref} gap "
            f"{'-' if gap is None else f'{gap:.4f}%'}), {'valid' if r['valid'] else 'INVALID'}, "
            f"{r['moved']} moved, {r['seconds']} s")


def markdown(section: dict) -> str:
    """The set's table: objective beside the initial, lower bound and best known."""
    cfg = section["config"]
    lines = [f"## ROADEF/EURO 2012 (sets {', '.join(cfg['sets'])}, {cfg['time_limit_s']} s, seed {cfg['seed']})", "",
             "| instance | M | P | initial | ours | lower bound | best known | gap to LB | gap to best | valid | moved | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]

    def num(v):
        return "-" if v is None else f"{v:,}"

    def pct(v):
        return "-" if v is None else f"{v:.4f}%"

    for r in section["rows"]:
        lines.append(f"| {r['instance']} | {r['machines']} | {r['processes']} | {num(r['initial'])} | "
                     f"{num(r['objective'])} | {num(r['lower_bound'])} | {num(r['best_known'])} | "
                     f"{pct(r['gap_lower_bound_pct'])} | {pct(r['gap_best_known_pct'])} | "
                     f"{'yes' if r['valid'] else 'NO'} | {r['moved']} | {r['seconds']} |")
    agree = all(r["checker_agrees"] for r in section["rows"])
    verdict = "gives the same on every row" if agree else "DISAGREES on some row"
    lines += ["", f"Every objective above is the independent checker's; hci_scheduler.rebalance.objective {verdict}."]
    lines += ["", "Objective by term (ours):", "",
              "| instance | " + " | ".join(TERMS) + " |", "|---|" + "---:|" * len(TERMS)]
    for r in section["rows"]:
        lines.append(f"| {r['instance']} | " + " | ".join(f"{r['terms'][t]:,}" for t in TERMS) + " |")
    return "\n".join(lines) + "\n"


def plot(section: dict, out: Path) -> str:
    """Bar chart of each instance's gap (%, log scale) to its best known figure, else to its
    lower bound (none without either); returns the file name written in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section["rows"]
    names = [r["instance"] for r in rows]
    gaps, colours = [], []
    for r in rows:
        best = r["gap_best_known_pct"]
        gap = best if best is not None else r["gap_lower_bound_pct"]
        # No reference (a lower bound of 0): no bar. A gap of 0 sits at the floor of the scale.
        gaps.append(float("nan") if gap is None else max(gap, 1e-5))
        colours.append("tab:green" if best is not None else "tab:blue")
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows)), 4))
    ax.bar(names, gaps, color=colours)
    ax.set_yscale("log")
    ax.set_ylabel("gap, % (green: to best known, blue: to lower bound)")
    cfg = section["config"]
    ax.set_title(f"ROADEF/EURO 2012, {cfg['time_limit_s']:g} s per instance, seed {cfg['seed']}")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    name = "roadef_gaps.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def format_check(label: str, result: Check) -> str:
    """Terms, total and validity, one line each, for the command line."""
    lines = [f"{label}:"]
    lines += [f"  {t:<18} {result.terms[t]:>18,}" for t in TERMS]
    lines.append(f"  {'total':<18} {result.total:>18,}")
    lines.append(f"  valid              {'yes' if result.valid else 'NO'}")
    lines += [f"    {v}" for v in result.violations[:20]]
    if len(result.violations) > 20:
        lines.append(f"    ... {len(result.violations) - 20} more")
    return "\n".join(lines)


def main(args) -> int:
    """`hci-scheduler bench --suite roadef ...` (arguments parsed in bench/__init__.py).

    One instance (--instance, --assignment, --solution) prints the objective by term before
    and after; --data-dir runs every instance of --sets into OUT/results.json and report.md.
    Exit code 1 when a solution is invalid.
    """
    factory = None if args.no_progress else _ProgressBar
    if args.data_dir:
        commit = _commit()  # before the run: the code the engine was imported from
        section = run_set(args.data_dir, sets=tuple(s.strip().upper() for s in args.sets.split(",")),
                          time_limit_s=args.time_limit, seed=args.seed, out=args.out,
                          progress_factory=factory, instances=args.only.split(",") if args.only else None)
        out = Path(args.out)
        text = markdown(section)
        from .report import machine

        results = {"machine": machine(), "commit": commit, "roadef": section}
        results["plots"] = [plot(section, out)] if section["rows"] else []
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "report.md").write_text(text + "".join(f"\n![{p}]({p})\n" for p in results["plots"]))
        print(text)
        print(f"wrote {out / 'results.json'} and {out / 'report.md'}")
        return 0 if section["all_valid"] and all(r["checker_agrees"] for r in section["rows"]) else 1
    if not (args.instance and args.assignment):
        raise ValidationError("--suite roadef needs --instance MODEL and --assignment ASSIGNMENT, or --data-dir DIR")
    row = run_instance(args.instance, args.assignment, time_limit_s=args.time_limit, seed=args.seed,
                       solution=args.solution, progress=factory() if factory else None)
    inst = read_model(args.instance)
    init = read_assignment(args.assignment, inst)
    print(format_check("initial", Check(row["initial_terms"], [] if row["initial_valid"] else ["initial invalid"])))
    new = read_assignment(args.solution, inst) if args.solution else None
    after = check(inst, init, new) if new is not None else Check(row["terms"], row["violations"])
    print(format_check(f"after {row['seconds']} s (engine status {row['status']}, {row['moved']} moved)", after))
    agree = "agrees" if row["checker_agrees"] else "DISAGREES with the checker"
    print(f"  project objective  {row['project_objective']:>18,} (hci_scheduler.rebalance.objective; {agree})")
    if args.solution:
        print(f"wrote {args.solution}")
    return 0 if after.valid and row["checker_agrees"] else 1


class _ProgressBar:
    """tqdm bar fed by the engine's progress(fraction, best_objective) callback."""

    def __init__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, leave=False, file=sys.stderr, desc="search")

    def __call__(self, fraction, best_objective=None):
        self.bar.n = min(1000, int(1000 * fraction))
        if best_objective is not None:
            self.bar.set_postfix_str(f"best {int(best_objective):,}", refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()
