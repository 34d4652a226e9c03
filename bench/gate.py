"""The CI density gate: our best batch result may never get worse.

``bench/baseline_density.json`` records, for every shared instance with a
known optimum, the fewest hosts our best batch configuration used when the
baseline was last updated, together with the configuration (``improve_s``
and which instances ran the improvement). Density is deterministic (work
units, not seconds, bound the improver), so the gate is an exact integer
comparison: ``hosts_now <= hosts_baseline`` per instance, which is the same
as the ratio to the optimum not exceeding the recorded ratio.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BASELINE_PATH = Path(__file__).with_name("baseline_density.json")


@dataclass(frozen=True)
class Regression:
    """One instance whose best result got worse than the baseline."""

    instance: str
    hosts: int
    baseline_hosts: int
    optimum: int

    def __str__(self) -> str:
        return (f"{self.instance}: {self.hosts} hosts (ratio {self.hosts / self.optimum:.4f}) > "
                f"baseline {self.baseline_hosts} (ratio {self.baseline_hosts / self.optimum:.4f})")


def best_by_instance(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """{instance: (best hosts, optimum)} for rows with a known optimum."""
    return {r["instance"]: (int(r["best"]), int(r["optimum"]))
            for r in rows if r.get("optimum") is not None}


def load_baseline(path: Path = BASELINE_PATH) -> dict:
    if not path.is_file():
        return {"config": None, "instances": {}}
    return json.loads(path.read_text())


def check(rows: list[dict], baseline: dict, config: dict) -> tuple[list[Regression], list[str]]:
    """Compare a run with the baseline.

    Returns
    -------
    regressions : list of Regression
        Instances whose best host count exceeds the recorded one.
    skipped : list of str
        Reasons the comparison was not made (configuration mismatch, or an
        instance missing from the baseline), for the report.
    """
    skipped: list[str] = []
    recorded = baseline.get("instances", {})
    base_cfg = baseline.get("config")
    if base_cfg is not None and not _comparable(base_cfg, config):
        return [], [f"baseline config {base_cfg} differs from this run's {config}: gate not applied"]
    regressions = []
    for name, (hosts, optimum) in sorted(best_by_instance(rows).items()):
        if name not in recorded:
            skipped.append(f"{name}: not in baseline")
            continue
        if hosts > recorded[name]:
            regressions.append(Regression(name, hosts, recorded[name], optimum))
    return regressions, skipped


def _comparable(base_cfg: dict, config: dict) -> bool:
    """A run can be gated when it tries at least what the baseline tried."""
    if config.get("improve_s", 0) != base_cfg.get("improve_s", 0):
        return False
    return config.get("improve_stride", 1) <= base_cfg.get("improve_stride", 1) and \
        base_cfg.get("improve_stride", 1) % config.get("improve_stride", 1) == 0


def updated(rows: list[dict], baseline: dict, config: dict) -> dict:
    """The baseline after a run: new instances added, improvements recorded, nothing loosened."""
    recorded = dict(baseline.get("instances", {}))
    for name, (hosts, _opt) in best_by_instance(rows).items():
        if name not in recorded or hosts < recorded[name]:
            recorded[name] = hosts
    return {"config": baseline.get("config") or config,
            "instances": dict(sorted(recorded.items()))}


def save_baseline(data: dict, path: Path = BASELINE_PATH) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
