"""The service's metrics as Prometheus reads them: buckets, counts, sums and labels."""
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from hci_scheduler.server.metrics import Metrics


def _samples(m: Metrics) -> dict:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    # The durations are given, not measured: this checks the bookkeeping, not a speed.
    m = Metrics()
    for seconds in (0.0001, 0.0002, 0.001, 0.0011, 9.0):
        m.rpc("Place", "OK", seconds)
    s = _samples(m)

    def bucket(le):
        return s[("hci_scheduler_rpc_duration_seconds_bucket", (("le", le), ("method", "Place")))]

    assert bucket("0.0001") == 1  # le is inclusive: 0.0001 counts in it
    assert bucket("0.00025") == 2
    assert bucket("0.001") == 3
    assert bucket("0.002") == 4
    assert bucket("5.0") == 4
    assert bucket("+Inf") == 5
    assert s[("hci_scheduler_rpc_duration_seconds_count", (("method", "Place"),))] == 5
    assert abs(s[("hci_scheduler_rpc_duration_seconds_sum", (("method", "Place"),))] - 9.0024) < 1e-9


def test_counters_by_label():
    m = Metrics()
    m.rpc("Place", "OK", 0.001)
    m.rpc("Place", "INVALID_ARGUMENT", 0.001)
    m.rpc("Release", "OK", 0.001)
    m.placed(3)
    m.placed(2)
    m.refused("cpu")
    m.refused("cpu")
    m.refused("affinity")
    m.batch(0)  # an empty batch is not a batch
    m.batch(5)
    s = _samples(m)
    assert s[("hci_scheduler_rpc_total", (("code", "OK"), ("method", "Place")))] == 1
    assert s[("hci_scheduler_rpc_total", (("code", "INVALID_ARGUMENT"), ("method", "Place")))] == 1
    assert s[("hci_scheduler_rpc_total", (("code", "OK"), ("method", "Release")))] == 1
    assert s[("hci_scheduler_placements_total", ())] == 5
    assert s[("hci_scheduler_refusals_total", (("reason", "cpu"),))] == 2
    assert s[("hci_scheduler_refusals_total", (("reason", "affinity"),))] == 1
    assert s[("hci_scheduler_writer_batch_workloads_count", ())] == 1
    assert s[("hci_scheduler_writer_batch_workloads_bucket", (("le", "4.0"),))] == 0
    assert s[("hci_scheduler_writer_batch_workloads_bucket", (("le", "8.0"),))] == 1


def test_updates_from_many_threads_are_all_counted():
    import threading

    m = Metrics()

    def work():
        for _ in range(5000):
            m.rpc("Place", "OK", 0.0003)
            m.placed(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = _samples(m)
    assert s[("hci_scheduler_rpc_total", (("code", "OK"), ("method", "Place")))] == 20_000
    assert s[("hci_scheduler_rpc_duration_seconds_count", (("method", "Place"),))] == 20_000
    assert s[("hci_scheduler_placements_total", ())] == 20_000
