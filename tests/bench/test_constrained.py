"""bench.constrained: its figures are the best runs, the ratio is theirs, and the
constrained run it times keeps its constraints (checked from host labels)."""
from hci_scheduler.bench import constrained


def test_constrained_bench_reports_best_runs_and_their_ratio():
    r = constrained.run(n_hosts=600, n_requests=2_000, repeats=2)
    assert r["unconstrained_per_s"] >= r["median_unconstrained_per_s"] > 0
    assert r["constrained_per_s"] >= r["median_constrained_per_s"] > 0
    assert r["ratio"] == r["constrained_per_s"] / r["unconstrained_per_s"]
    assert 0 < r["placed"]["constrained"] <= r["placed"]["plain"] <= 2_000
    text = constrained.format_result(r)
    assert "best of 2 runs" in text and f"ratio {r['ratio']:.2f}" in text
