import numpy as np
import pytest

from hci_scheduler import datasets
from hci_scheduler.errors import SchedulerError, ValidationError


def test_parse_vbp_expands_demands():
    # 2 dims, capacity (10, 8); item types (3, 4) x2 and (5, 1) x1 -> 3 items
    cap, items = datasets.parse_vbp("2\n10 8\n2\n3 4 2\n5 1 1\n")
    assert cap.tolist() == [10, 8]
    assert items.tolist() == [[3, 4], [3, 4], [5, 1]]
    assert items.dtype == np.int64


@pytest.mark.parametrize("text", ["", "2\n10\n", "2\n10 8\n2\n3 4 1\n", "2\n10 x\n1\n1 1 1\n",
                                  "1\n0\n1\n1 1\n", "1\n5\n1\n1 -1\n"])
def test_parse_vbp_rejects_malformed(text):
    with pytest.raises(ValidationError):
        datasets.parse_vbp(text)


def test_vbp_counts_match_index(shared_data):
    index = datasets.vbp_index()
    assert len(index) > 0
    for row in index:
        inst = datasets.load_vbp(row["instance"])
        assert inst.n_items == row["items"], row["instance"]
        assert inst.dims == row["dims"] == inst.items.shape[1]
        assert tuple(inst.capacity.tolist()) == row["capacity"]
        assert (inst.items >= 0).all()
        assert (inst.items <= inst.capacity).all()
        assert inst.lower_bound <= inst.best_known_solution
        if not inst.n_clipped:  # clipping negative sizes can push the volume above the optimum
            assert inst.volume_bound() <= inst.lower_bound
        if inst.optimum is not None:
            assert inst.lower_bound <= inst.optimum <= inst.best_known_solution


def test_known_instance_first_rows(shared_data):
    inst = datasets.load_vbp("Panigrahy/class1_120_10_0")
    text = (shared_data / "vbp/instances/Panigrahy/class1/class1_120_10_0.vbp").read_text().split()
    d = int(text[0])
    first = [int(t) for t in text[2 + d: 2 + 2 * d]]  # after d, capacities, item-type count
    assert inst.items[0].tolist() == first
    assert inst.optimum == 36 and inst.family == "Panigrahy/class1"


def test_clipped_triplets_are_flagged(shared_data):
    clipped = [i for i in datasets.iter_vbp(benchmark="Triplet") if i.n_clipped]
    assert clipped and all(i.family == "Triplet/classC" for i in clipped)


def test_iter_vbp_filters(shared_data):
    rows = list(datasets.iter_vbp(known_optimum=True, max_items=20, dims=3))
    assert rows and all(r.optimum is not None and r.n_items <= 20 and r.dims == 3 for r in rows)
    every_other = list(datasets.iter_vbp(known_optimum=True, max_items=20, dims=3, stride=2))
    assert [r.name for r in every_other] == [r.name for r in rows[::2]]


def test_unknown_instance_raises(shared_data):
    with pytest.raises(ValidationError):
        datasets.load_vbp("Nope/none_1_1_1")


def test_missing_data_dir_is_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("HCI_DATA_DIR", str(tmp_path / "absent"))
    with pytest.raises(datasets.DatasetUnavailable) as info:
        datasets.vbp_index()
    assert isinstance(info.value, SchedulerError)
    assert "HCI_DATA_DIR" in str(info.value)


def test_google_hosts_units(shared_data):
    pool = datasets.google_hosts()
    assert pool.capacity.shape == (12477, 5)
    # the most common machine: 0.5 cpu, 0.4995 memory -> 32 cores, 0.4995 * 256 GiB
    assert (pool.capacity[:, 0] == 32000).sum() > 10000
    assert ((pool.capacity[:, 1] == round(0.4995 * 262144))).sum() == 6672
    assert (pool.capacity[:, 2:] == 0).all()


def test_google_submits_and_lifetimes(shared_data):
    sub = datasets.google_submits()
    assert sub.n_requests == 38542
    assert np.median(sub.requests[:, 0]) == 800  # 0.0125 * 64000
    assert (np.diff(sub.arrival) >= 0).all()
    life = datasets.google_lifetimes()
    assert life.n_requests == 38539  # SCHEDULE rows
    ended = np.isfinite(life.departure)
    assert ended.any() and (life.departure[ended] >= life.arrival[ended]).all()


def test_azure_vms_units(shared_data):
    vms, batch = datasets.azure_vms(with_batches=True)
    assert vms.n_requests == 150759 == batch.size
    assert vms.requests[0, :2].tolist() == [8000, 14336]  # 8 vCPU, 14 GB
    assert (vms.departure > vms.arrival).all()


def test_alibaba_hosts(shared_data):
    pool = datasets.alibaba_hosts()
    assert pool.n_hosts == 1897
    assert pool.capacity[0].tolist() == [96000, 524288, 0, 0, 0]
    assert pool.capacity[:, 4].max() > 0


@pytest.mark.parametrize("kind", datasets.SYNTHETIC_KINDS)
def test_synthetic_is_seeded_and_bounded(kind):
    a = datasets.synthetic(kind, 500, seed=3)
    assert a.shape == (500, 5) and a.dtype == np.int64
    assert np.array_equal(a, datasets.synthetic(kind, 500, seed=3))
    assert not np.array_equal(a, datasets.synthetic(kind, 500, seed=4))
    assert (a >= 0).all() and (a <= datasets.SYNTHETIC_HOST).all()


def test_synthetic_rejects_bad_kind():
    with pytest.raises(ValidationError):
        datasets.synthetic("zipf", 3)
    with pytest.raises(ValidationError):
        datasets.synthetic("uniform", -1)
