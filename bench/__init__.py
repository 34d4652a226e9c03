"""hci-scheduler benchmarks: density and latency suites, peers, report, CI gate.

Installed as ``hci_scheduler.bench`` (the folder bench/ of the repository).
Run ``hci-scheduler bench [--suite density|latency|all] [--quick] [--out DIR]``,
which forwards its arguments to :func:`main`, or ``python -m hci_scheduler.bench``.
``--suite roadef`` runs the ROADEF/EURO 2012 machine reassignment benchmark (bench/roadef.py)
on one instance (``--instance MODEL --assignment ASSIGNMENT --solution OUT``) or on every
instance of a set (``--data-dir DIR [--sets A,B]``); it is not part of ``all``: the data has
no licence and lives where the user puts it.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hci-scheduler bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("density", "latency", "all", "roadef"), default="all")
    p.add_argument("--quick", action="store_true", help="a subset that finishes in a few minutes")
    p.add_argument("--out", default="bench-out", help="directory for results.json, report.md, plots")
    p.add_argument("--improve-s", type=float, default=0.5,
                   help="improve_s for the improved density run (default 0.5)")
    p.add_argument("--no-gate", action="store_true", help="report density without failing on regressions")
    p.add_argument("--update-baseline", action="store_true",
                   help="record improvements (and new instances) in bench/baseline_density.json")
    p.add_argument("--no-progress", action="store_true")
    r = p.add_argument_group("roadef", "ROADEF/EURO 2012 machine reassignment (--suite roadef)")
    r.add_argument("--instance", metavar="MODEL", help="a model_*.txt file")
    r.add_argument("--assignment", metavar="ASSIGNMENT", help="its initial assignment_*.txt file")
    r.add_argument("--solution", metavar="OUT", help="write the new assignment here (challenge format)")
    r.add_argument("--time-limit", type=float, default=60.0, help="seconds per instance, reading included (60)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data-dir", metavar="DIR", help="run every instance of --sets found under DIR")
    r.add_argument("--sets", default="A", help="with --data-dir: A, B or A,B (default A)")
    r.add_argument("--only", metavar="NAMES", help="with --data-dir: only these instances (a1_1,a2_3)")
    return p


def _progress(disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    return lambda **kw: tqdm(leave=False, file=sys.stderr, **kw)


def main(argv=None) -> int:
    """Run the selected suites; returns the exit code (1 when the density gate fails)."""
    args = _parser().parse_args(argv)
    if args.suite == "roadef":
        from . import roadef

        return roadef.main(args)
    from hci_scheduler import datasets

    from . import peers, report

    peers.clear_skipped()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _progress(args.no_progress)
    results: dict = {"machine": report.machine(),
                     "config": {"suite": args.suite, "quick": args.quick, "improve_s": args.improve_s}}
    status = 0
    heat = None
    t_start = time.perf_counter()
    try:
        datasets.data_dir()
        have_data = True
    except datasets.DatasetUnavailable as exc:
        have_data = False
        print(f"note: {exc}; density and compaction suites skipped, latency uses synthetic data",
              file=sys.stderr)
    if args.suite in ("density", "all") and have_data:
        status |= _density(args, results, progress)
    if args.suite in ("latency", "all"):
        heat = _latency(args, results, progress, have_data)
    results["seconds"] = time.perf_counter() - t_start
    results["plots"] = report.plots(results, out, heat)
    results["notes"] = peers.skipped_notes()
    report.write_json(results, out)
    text = report.markdown(results)
    if results["notes"]:
        text += "\n" + "\n".join(f"Note: {n}." for n in results["notes"]) + "\n"
    (out / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'} and {len(results['plots'])} plots "
          f"in {results['seconds']:.0f} s")
    return status


def _density(args, results, progress) -> int:
    from . import density, gate

    if args.quick:
        cfg = density.DensityConfig(improve_s=args.improve_s, improve_stride=8, peer_stride=8,
                                    cpsat_max_items=20, cpsat_time_s=2.0, cpsat_stride=12)
    else:
        cfg = density.DensityConfig(improve_s=args.improve_s, improve_stride=1, peer_stride=1,
                                    cpsat_max_items=40, cpsat_time_s=3.0, cpsat_stride=8)
    rows = density.run(cfg, progress)
    gate_cfg = {"improve_s": cfg.improve_s, "improve_stride": cfg.improve_stride}
    section = {"config": asdict(cfg), "rows": rows, "summary": density.summarise(rows)}
    baseline = gate.load_baseline()
    regressions, notes = gate.check(rows, baseline, gate_cfg)
    checked = sum(1 for r in rows if r["optimum"] is not None and r["instance"] in baseline["instances"])
    section["gate"] = {"status": "FAIL" if regressions else "pass", "checked": checked,
                       "regressions": [str(r) for r in regressions], "notes": notes}
    results["density"] = section
    if args.update_baseline:
        gate.save_baseline(gate.updated(rows, baseline, gate_cfg))
    if regressions and not args.no_gate:
        print(f"density gate FAILED: {len(regressions)} instances regressed", file=sys.stderr)
        return 1
    return 0


def _latency(args, results, progress, have_data):
    from . import compaction, latency

    if args.quick:
        cfg = latency.LatencyConfig(n_batch=10_000, n_single=500, n_peer=500)
        n_google, n_azure = 3_000, 3_000
    else:
        cfg = latency.LatencyConfig()
        n_google, n_azure = 20_000, 20_000
    results["latency"] = {"config": asdict(cfg), **latency.run(cfg, progress)}
    if not have_data:
        return None
    comps = []
    heat = None
    for replay in (compaction.google_replay(n_google), compaction.azure_replay(n_azure)):
        res = compaction.run(replay, ("binpack", "dot", "balanced", "spread"), progress=progress)
        comps.append(res)
        n_best = res["policies"]["ours/binpack"]["hosts"]
        if n_best:
            util, res["stranded_binpack"] = compaction.final_state(replay, n_best)
            if heat is None:
                heat = util
    results["compaction"] = comps
    return heat
