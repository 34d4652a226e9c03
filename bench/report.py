"""results.json, report.md and the PNG plots."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np


def machine() -> dict:
    """Where the figures came from: CPU, cores, OS, Python and library versions."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": sys.version.split()[0]}
    for mod in ("numpy", "ortools", "matplotlib", "binpacking", "Cython"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:  # a missing optional peer is reported, not fatal
            versions[mod] = None
    try:
        from importlib.metadata import version

        versions["hci-scheduler"] = version("hci-scheduler")
    except Exception:
        versions["hci-scheduler"] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "machine": platform.machine(), "versions": versions}


def write_json(results: dict, out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _pattern_bound(cell: dict) -> str:
    if cell.get("pattern_bound") is None:
        return "-"
    return f"{cell['pattern_bound']}" + ("" if cell.get("pattern_converged") else " (not converged)")


def _f(x, fmt="{:.4f}"):
    return "—" if x is None else fmt.format(x)


def markdown(results: dict) -> str:
    lines = ["# hci-scheduler benchmark report", ""]
    m = results["machine"]
    lines += [f"Machine: {m['cpu']} ({m['cores']} cores), {m['platform']}",
              f"Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
              f"Mode: {'quick' if results['config']['quick'] else 'full'}", ""]
    d = results.get("density")
    if d:
        s, cfg = d["summary"], d["config"]
        o = s["overall"]
        lines += ["## Density (vector bin packing, hosts used / known optimum)", "",
                  f"{o['n_known']} instances with a known optimum; improvement (binpack, "
                  f"largest_first, improve_s={cfg['improve_s']}) on {o['n_improved']} of them.", "",
                  "| family | n | greedy binpack | greedy dot | ours best | paper best heuristic "
                  "| numpy best-fit | FFD (Python) | binpacking 1-D (relaxation) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for fam, v in s["families"].items():
            lines.append(f"| {fam} | {v['n']} | {_f(v['greedy_binpack'])} | {_f(v['greedy_dot'])} | "
                         f"{_f(v['best'])} | {_f(v['best_known_solution'])} | "
                         f"{_f(v['numpy_best_fit'])} | {_f(v['ffd_python'])} | {_f(v['binpacking_1d'])} |")
        lines.append(f"| **all** | {o['n_known']} | {_f(o['greedy_binpack'])} | {_f(o['greedy_dot'])} | "
                     f"**{_f(o['best'])}** | {_f(o['best_known_solution'])} | {_f(o['numpy_best_fit'])} | "
                     f"{_f(o['ffd_python'])} | {_f(o['binpacking_1d'])} |")
        lines += ["",
                  f"* Greedy vs improved on the {o['n_improved']} improved instances: "
                  f"{_f(o['greedy_binpack_on_improved_set'])} -> {_f(o['improved_on_improved_set'])} "
                  f"(greedy mean {_f(o['greedy_binpack_mean_s'], '{:.4f}')} s, improvement mean "
                  f"{_f(o['improved_mean_s'], '{:.3f}')} s, max {_f(o['improved_max_s'], '{:.3f}')} s).",
                  f"* Stranded capacity on used hosts (free space no item of the instance fits), same "
                  f"set: greedy {_f(o.get('stranded_greedy_binpack'))}, improved "
                  f"{_f(o.get('stranded_improved'))} of the used hosts' capacity.",
                  f"* Ours best excluding the 52 Triplet/Caprara files with negative sizes clipped: "
                  f"{_f(o['best_unclipped'])}.",
                  f"* Under 100 items: at most {o['small_max_over_opt']} hosts above the optimum; "
                  f"{o['small_over_by_more_than_one']} instances more than one above "
                  f"({o.get('small_over_packed_bound_by_more_than_one', '—')} against the bound that "
                  f"holds for clipped files: the index optimum is for the file with its negative sizes, "
                  f"and clipping can make it unattainable).",
                  *[f"  * {w['instance']}: {w['best']} hosts, optimum {w['optimum']}"
                    + (f" (clipped; its own bound is {w['packed_bound']})" if w["clipped"] else "")
                    for w in o.get("small_worst", [])[:10]],
                  f"* Lower-bound-only instances ({o['n_lower_bound_only']}): ours best / lower bound = "
                  f"{_f(o['best_vs_lower_bound'])}.",
                  f"* CP-SAT exact peer (one worker, {cfg['cpsat_time_s']} s): {o['cpsat_n']} instances, "
                  f"ratio {_f(o['cpsat_ratio'])}; ours best on the same set {_f(o['best_on_cpsat_set'])}.",
                  ""]
        cells = s.get("heterogeneous") or []
        if cells:
            lines += ["### Heterogeneous cells (hosts used / covering bound)", "",
                      "| cell | hosts | live | shapes | covering bound | split bound | pattern bound | greedy "
                      "| improved | packed by patterns | best / covering | FFD memory-rich first / covering |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {c['cell']} | {c['n_hosts']} | {c['n_live']} | {c['n_shapes']} | {c['covering_bound']} | "
                      f"{c['split_bound']} | {_pattern_bound(c)} | {c['greedy']} | {c['improved']} | "
                      f"{c.get('pattern_used') or '-'} | {_f(c['best_over_covering'])} | "
                      f"{_f(c['ffd_over_covering'])} |" for c in cells]
            lines += ["", "Pattern bound: fewest hosts any packing needs (column generation over host "
                      "patterns, hci_scheduler.patterns); the optimum itself where it meets a packing."]
            lines.append("")
        g = d.get("gate")
        if g:
            lines += [f"Density gate: **{g['status']}** ({len(g['regressions'])} regressions, "
                      f"{g['checked']} instances checked).", ""]
            lines += [f"* {r}" for r in g["regressions"][:20]]
            lines += [f"* note: {n}" for n in g["notes"][:5]]
            lines.append("")
    lat = results.get("latency")
    if lat:
        lines += ["## Latency (library, one core)", "",
                  f"Requests: {lat['requests']}; hosts: {lat['hosts']}; {lat['dims']} dims. "
                  "Throughput from one place_array call; p50/p99 from single-row calls on the filled "
                  "cluster; numpy best-fit on the same prefix of the stream, same hosts, same process.", "",
                  "| hosts | strategy | order | placements/s | p50 µs | p99 µs | numpy best-fit /s "
                  "| speed-up | hosts ours | hosts numpy (prefix) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            lines.append(
                f"| {r['n_hosts']} | {r['strategy']} | {r['order']} | {r['placements_per_s']:,.0f} | "
                f"{_f(r['p50_us'], '{:.1f}')} | {_f(r['p99_us'], '{:.1f}')} | "
                f"{r['prefix_rate_numpy']:,.0f} | {r['speedup_vs_numpy']:.1f}x | "
                f"{r['hosts_ours_prefix']} | {r['hosts_numpy_prefix']} |")
        lines.append("")
    comp = results.get("compaction")
    if comp:
        lines += ["## Cell compaction (trace replays with churn, bisection)", "",
                  "| replay | events | lower bound | policy | hosts | / lower bound |", "|---|---|---|---|---|---|"]
        for c in comp:
            for name, v in c["policies"].items():
                lines.append(f"| {c['replay']} | {c['events']} | {c['lower_bound']} | {name} | "
                             f"{_f(v['hosts'], '{}')} | {_f(v.get('ratio_to_lower_bound'))} |")
        lines.append("")
        lines += [f"* {c['replay']}: stranded capacity after the replay on the compacted cell "
                  f"(ours/binpack) {_f(c.get('stranded_binpack'))}." for c in comp]
        lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


def plots(results: dict, out: Path, heat: np.ndarray | None = None) -> list[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    d = results.get("density")
    if d:
        rows = [r for r in d["rows"] if r["optimum"] is not None]
        opt = np.array([r["optimum"] for r in rows])
        fig, ax = plt.subplots(figsize=(7, 6))
        ax.scatter(opt, [r["greedy"]["binpack"] for r in rows], s=6, alpha=0.5, label="greedy binpack")
        imp = [r for r in rows if "improved" in r]
        ax.scatter([r["optimum"] for r in imp], [r["improved"] for r in imp], s=6, alpha=0.7,
                   label=f"improved (improve_s={d['config']['improve_s']})")
        ax.scatter(opt, [r["best_known_solution"] for r in rows], s=4, alpha=0.3, marker="x",
                   label="paper's best heuristic")
        lim = [0, opt.max() * 1.25 if opt.size else 1]
        ax.plot(lim, [x for x in lim], "k--", lw=0.8, label="optimum")
        ax.set_xlabel("known optimum (hosts)")
        ax.set_ylabel("hosts used")
        ax.set_title("Vector bin packing: hosts used vs optimum, per instance")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "density_hosts_vs_optimum.png", dpi=110)
        plt.close(fig)
        names.append("density_hosts_vs_optimum.png")
    lat = results.get("latency")
    if lat:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for order, ax in zip(("arrival", "largest_first"), axes):
            for strategy in sorted({r["strategy"] for r in lat["rows"]}):
                pts = sorted((r["n_hosts"], r["p50_us"]) for r in lat["rows"]
                             if r["strategy"] == strategy and r["order"] == order)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=strategy)
            pts = sorted({(r["n_hosts"], 1e6 / r["prefix_rate_numpy"]) for r in lat["rows"]
                          if r["order"] == order})
            if pts:
                ax.plot(*zip(*pts), "k--", marker="s", label="numpy best-fit (mean)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("hosts")
            ax.set_ylabel("µs per placement (p50)")
            ax.set_title(f"order={order}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency_vs_hosts.png", dpi=110)
        plt.close(fig)
        names.append("latency_vs_hosts.png")
    if heat is not None and heat.size:
        fig, ax = plt.subplots(figsize=(10, 3))
        im = ax.imshow(heat[:, :2].T, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_yticks([0, 1], ["cpu", "memory"])
        ax.set_xlabel("host")
        ax.set_title("Utilisation per host after the Google replay (ours, binpack, compacted size)")
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(out / "utilisation_heatmap.png", dpi=110)
        plt.close(fig)
        names.append("utilisation_heatmap.png")
    return names
