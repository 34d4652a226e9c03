"""Loaders for the shared benchmark data and documented synthetic workloads.

Three sources, all returned as plain int64 numpy arrays in the cluster's
default dimensions ``("cpu", "memory", "ssd", "net", "gpu")``:

* vector bin packing instances with known optima (``shared/data/vbp``);
* real cluster trace rows (``shared/data/traces``): Google 2011 machines and
  tasks, Azure 2017 VM arrivals, Alibaba PAI 2020 machines;
* seeded synthetic distributions (uniform, bimodal, correlated).

The data directory is ``../shared/data`` relative to the repository root, or
the directory named by the ``HCI_DATA_DIR`` environment variable. Nothing is
read at import time; parsed files are cached in memory per process.

Units
-----
The Google 2011 trace normalises cpu and memory so that 1.0 is the largest
machine of the cell. We scale them back to absolute units with documented
constants: 1.0 cpu = ``GOOGLE_CPU_MILLICORES`` (64 cores = 64,000 millicores)
and 1.0 memory = ``GOOGLE_MEMORY_MIB`` (256 GiB = 262,144 MiB), rounding to the
nearest integer. Google's disk request is normalised against a disk capacity
the machine table does not give, so ssd stays 0 for Google hosts and tasks
(zeros mean "unknown" in every loader). Azure: vcpu * 1000 millicores,
memory_gb * 1024 MiB. Alibaba PAI: cores * 1000 millicores, GB * 1024 MiB,
gpu count.
"""
from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import SchedulerError, ValidationError

__all__ = [
    "DIMENSIONS",
    "GOOGLE_CPU_MILLICORES",
    "GOOGLE_MEMORY_MIB",
    "DatasetUnavailable",
    "VbpInstance",
    "Requests",
    "HostPool",
    "data_dir",
    "vbp_index",
    "load_vbp",
    "iter_vbp",
    "parse_vbp",
    "google_hosts",
    "google_submits",
    "google_lifetimes",
    "azure_vms",
    "alibaba_hosts",
    "synthetic",
    "SYNTHETIC_KINDS",
]

DIMENSIONS = ("cpu", "memory", "ssd", "net", "gpu")
N_DIMS = len(DIMENSIONS)
CPU, MEM, SSD, NET, GPU = range(N_DIMS)

# 1.0 normalised Google cpu/memory = the largest machine of the cell; we take
# that machine to be a 64-core, 256 GiB server (a typical 2011 Borg box was
# half of it in both: (0.5, 0.5) is the most common machine type).
GOOGLE_CPU_MILLICORES = 64_000
GOOGLE_MEMORY_MIB = 256 * 1024

_GOOGLE_DIR = "traces/google2011"
_AZURE_DIR = "traces/azure2017_vm_arrivals"
_ALIBABA_DIR = "traces/alibaba_pai2020"


class DatasetUnavailable(SchedulerError, FileNotFoundError):
    """The shared data directory or one of its files is missing."""


# ----------------------------------------------------------------------------
# locating the data


def data_dir() -> Path:
    """Return the shared data directory.

    ``HCI_DATA_DIR`` wins when set; otherwise ``<repo root>/../shared/data``.

    Raises
    ------
    DatasetUnavailable
        If the directory does not exist.
    """
    env = os.environ.get("HCI_DATA_DIR")
    if env:
        path = Path(env)
    else:
        repo_root = Path(__file__).resolve().parent.parent
        path = repo_root.parent / "shared" / "data"
    if not path.is_dir():
        raise DatasetUnavailable(
            f"shared data directory not found at {path} "
            "(set HCI_DATA_DIR to the folder holding vbp/ and traces/)"
        )
    return path


def _file(rel: str) -> Path:
    path = data_dir() / rel
    if not path.is_file():
        raise DatasetUnavailable(f"data file not found: {path}")
    return path


def _rows(path: Path) -> Iterator[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader, None)  # header row
        yield from reader


# ----------------------------------------------------------------------------
# vector bin packing instances


@dataclass(frozen=True)
class VbpInstance:
    """One vector bin packing instance and what is known about its optimum.

    Attributes
    ----------
    name : str
        ``<benchmark>/<file stem>``, e.g. ``"Panigrahy/class1_120_10_0"``.
    dims : int
        Number of dimensions ``d``.
    capacity : ndarray of int64, shape (d,)
        Capacity of every bin.
    items : ndarray of int64, shape (n, d)
        One row per item (demands expanded), negative sizes clipped to 0
        because a scheduler request cannot be negative.
    n_clipped : int
        How many item sizes were negative in the file. The source's
        generator wrote such sizes into 52 of the 84 Triplet/Caprara files;
        after clipping, the recorded optimum (n/3, exact triplets) can be
        unattainable, so reports list these instances separately.
    optimum : int or None
        Proven optimum number of bins, ``None`` when unknown.
    lower_bound : int
        Lower bound reported by the source.
    best_known_solution : int
        Fewest bins found by any heuristic of the source paper.
    """

    name: str
    dims: int
    capacity: np.ndarray
    items: np.ndarray
    n_clipped: int
    optimum: int | None
    lower_bound: int
    best_known_solution: int

    @property
    def n_items(self) -> int:
        return int(self.items.shape[0])

    @property
    def benchmark(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def family(self) -> str:
        """``<benchmark>/<class>``, e.g. ``"New/class4"``."""
        bench, stem = self.name.split("/", 1)
        return f"{bench}/{stem.split('_', 1)[0]}"

    @property
    def reference(self) -> int:
        """The optimum when known, else the best lower bound."""
        return self.optimum if self.optimum is not None else self.lower_bound

    def volume_bound(self) -> int:
        """max over dimensions of ceil(sum of sizes / capacity)."""
        totals = self.items.sum(axis=0)
        return int(np.max(-(-totals // self.capacity)))


def parse_vbp(text: str, name: str = "<text>") -> tuple[np.ndarray, np.ndarray]:
    """Parse the VPSolver ``.vbp`` format.

    Parameters
    ----------
    text : str
        File contents: ``d``, ``C_1..C_d``, ``m``, then ``m`` lines ``w_1..w_d q``.
    name : str
        Used in error messages.

    Returns
    -------
    capacity : ndarray of int64, shape (d,)
    items : ndarray of int64, shape (n, d)
        Item types repeated by their demand ``q``, as in the file. Some
        source files (Triplet/Caprara) hold small negative sizes; they are
        kept here and clipped by :func:`load_vbp`.

    Raises
    ------
    ValidationError
        If the text is not a well-formed instance.
    """
    try:
        tokens = np.array(text.split(), dtype=np.int64)
    except ValueError as exc:
        raise ValidationError(f"{name}: non-integer token in .vbp file ({exc})") from None
    if tokens.size < 2:
        raise ValidationError(f"{name}: empty .vbp file")
    d = int(tokens[0])
    if d <= 0 or tokens.size < 2 + d:
        raise ValidationError(f"{name}: bad dimension count {d}")
    capacity = tokens[1 : 1 + d].copy()
    m = int(tokens[1 + d])
    body = tokens[2 + d :]
    if m < 0 or body.size != m * (d + 1):
        raise ValidationError(
            f"{name}: expected {m} item lines of {d + 1} integers, got {body.size} integers"
        )
    table = body.reshape(m, d + 1)
    if (table[:, d] < 0).any() or (capacity <= 0).any():
        raise ValidationError(f"{name}: negative demand or non-positive capacity")
    items = np.repeat(table[:, :d], table[:, d], axis=0)
    return capacity, np.ascontiguousarray(items)


@functools.lru_cache(maxsize=1)
def _vbp_index_cached(root: str) -> tuple[dict, ...]:
    out = []
    with open(Path(root) / "vbp" / "index.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.append(
                {
                    "instance": row["instance"],
                    "dims": int(row["dims"]),
                    "items": int(row["items"]),
                    "capacity": tuple(int(c) for c in row["capacity"].split(";")),
                    "optimum": int(row["optimum"]) if row["optimum"] else None,
                    "lower_bound": int(row["lower_bound"]),
                    "best_known_solution": int(row["best_known_solution"]),
                    "bound_type": row["bound_type"],
                    "file": row["file"],
                }
            )
    return tuple(out)


def vbp_index() -> list[dict]:
    """Rows of ``vbp/index.csv`` with typed fields (``optimum`` is None when unknown)."""
    _file("vbp/index.csv")
    return list(_vbp_index_cached(str(data_dir())))


@functools.lru_cache(maxsize=4096)
def _load_vbp_cached(root: str, name: str) -> VbpInstance:
    rows = {r["instance"]: r for r in _vbp_index_cached(root)}
    if name not in rows:
        raise ValidationError(f"unknown vbp instance {name!r}")
    row = rows[name]
    path = Path(root) / "vbp" / row["file"]
    if not path.is_file():
        raise DatasetUnavailable(f"data file not found: {path}")
    capacity, items = parse_vbp(path.read_text(), name)
    n_clipped = int((items < 0).sum())
    items = np.maximum(items, 0)
    capacity.setflags(write=False)
    items.setflags(write=False)
    return VbpInstance(
        name=name,
        dims=int(capacity.size),
        capacity=capacity,
        items=items,
        n_clipped=n_clipped,
        optimum=row["optimum"],
        lower_bound=row["lower_bound"],
        best_known_solution=row["best_known_solution"],
    )


def load_vbp(name: str) -> VbpInstance:
    """Load one instance by its index name (cached; arrays are read-only).

    Raises
    ------
    ValidationError
        If ``name`` is not in the index.
    DatasetUnavailable
        If the data directory or the file is missing.
    """
    _file("vbp/index.csv")
    return _load_vbp_cached(str(data_dir()), name)


def iter_vbp(
    *, known_optimum: bool | None = None, max_items: int | None = None,
    benchmark: str | None = None, dims: int | None = None, stride: int = 1,
) -> Iterator[VbpInstance]:
    """Iterate instances in index order, optionally filtered.

    Parameters
    ----------
    known_optimum : bool or None
        True keeps instances with a proven optimum, False those without.
    max_items : int or None
        Keep instances with at most this many items.
    benchmark : str or None
        ``"Panigrahy"``, ``"New"`` or ``"Triplet"``.
    dims : int or None
        Keep instances with this many dimensions.
    stride : int
        Keep every ``stride``-th instance that passes the other filters
        (a deterministic subsample for quick runs).
    """
    kept = 0
    for row in vbp_index():
        if known_optimum is not None and (row["optimum"] is not None) != known_optimum:
            continue
        if max_items is not None and row["items"] > max_items:
            continue
        if benchmark is not None and not row["instance"].startswith(benchmark + "/"):
            continue
        if dims is not None and row["dims"] != dims:
            continue
        kept += 1
        if (kept - 1) % stride:
            continue
        yield load_vbp(row["instance"])


# ----------------------------------------------------------------------------
# trace-derived arrays


@dataclass(frozen=True)
class HostPool:
    """A heterogeneous host pool.

    Attributes
    ----------
    capacity : ndarray of int64, shape (n_hosts, 5)
        Capacity in the default dimensions; 0 where the source does not say.
    host_ids : tuple of str, length n_hosts
    """

    capacity: np.ndarray
    host_ids: tuple

    @property
    def n_hosts(self) -> int:
        return int(self.capacity.shape[0])


@dataclass(frozen=True)
class Requests:
    """A stream of resource requests with optional timing.

    Attributes
    ----------
    requests : ndarray of int64, shape (n, 5)
        Requested resources in the default dimensions.
    arrival : ndarray of float64, shape (n,)
        Arrival time in seconds (trace clock), non-decreasing.
    departure : ndarray of float64, shape (n,)
        Departure time in seconds; ``inf`` when the item outlives the data.
    """

    requests: np.ndarray
    arrival: np.ndarray
    departure: np.ndarray

    @property
    def n_requests(self) -> int:
        return int(self.requests.shape[0])

    def head(self, n: int) -> "Requests":
        return Requests(self.requests[:n], self.arrival[:n], self.departure[:n])


def _float(s: str) -> float:
    return float(s) if s else 0.0


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@functools.lru_cache(maxsize=8)
def _google_hosts_cached(path: str, at_us: int | None) -> HostPool:
    machines: dict[str, tuple[float, float]] = {}
    for row in _rows(Path(path)):
        ts = int(row[0])
        if at_us is not None and ts > at_us:
            break  # rows are in time order
        mid, ev = row[1], int(row[2])
        if ev == 1:  # REMOVE
            machines.pop(mid, None)
        elif row[4] and row[5]:  # ADD or UPDATE with known capacity
            machines[mid] = (float(row[4]), float(row[5]))
    ids = tuple(machines)
    cap = np.zeros((len(ids), N_DIMS), dtype=np.int64)
    if ids:
        norm = np.array([machines[m] for m in ids], dtype=np.float64)
        cap[:, CPU] = np.rint(norm[:, 0] * GOOGLE_CPU_MILLICORES)
        cap[:, MEM] = np.rint(norm[:, 1] * GOOGLE_MEMORY_MIB)
    _readonly(cap)
    return HostPool(cap, ids)


def google_hosts(at_us: int | None = 0) -> HostPool:
    """Google 2011 machines alive at ``at_us`` (µs; None = end of the trace).

    ADD and UPDATE rows with known cpu and memory set a machine's capacity,
    REMOVE rows drop it. ``at_us=0`` gives the 12,477 machines present when
    the trace begins.

    Returns
    -------
    HostPool
        ``capacity`` (n_hosts, 5) int64 in millicores and MiB (ssd, net, gpu 0).
    """
    return _google_hosts_cached(str(_file(f"{_GOOGLE_DIR}/machine_events.csv")), at_us)


def _google_task_path() -> Path:
    folder = data_dir() / _GOOGLE_DIR
    files = sorted(folder.glob("task_events*.csv"))
    if not files:
        raise DatasetUnavailable(f"no task_events*.csv in {folder}")
    return files[0]


@functools.lru_cache(maxsize=2)
def _google_events_cached(path: str) -> dict[str, np.ndarray]:
    ts, job, task, ev, cpu, mem = [], [], [], [], [], []
    for row in _rows(Path(path)):
        ts.append(int(row[0]))
        job.append(int(row[2]))
        task.append(int(row[3]))
        ev.append(int(row[5]))
        cpu.append(_float(row[8]))
        mem.append(_float(row[9]))
    out = {
        "ts_us": np.array(ts, dtype=np.int64),
        "job": np.array(job, dtype=np.int64),
        "task": np.array(task, dtype=np.int64),
        "event": np.array(ev, dtype=np.int64),
        "cpu": np.array(cpu, dtype=np.float64),
        "mem": np.array(mem, dtype=np.float64),
    }
    _readonly(*out.values())
    return out


def _google_request_matrix(cpu: np.ndarray, mem: np.ndarray) -> np.ndarray:
    req = np.zeros((cpu.size, N_DIMS), dtype=np.int64)
    req[:, CPU] = np.rint(cpu * GOOGLE_CPU_MILLICORES)
    req[:, MEM] = np.rint(mem * GOOGLE_MEMORY_MIB)
    return req


def google_submits() -> Requests:
    """Google 2011 task SUBMIT rows as a request stream, in trace order.

    Empty request fields count as 0. ``departure`` is ``inf`` (a plain
    arrival stream; use :func:`google_lifetimes` for churn).
    """
    ev = _google_events_cached(str(_google_task_path()))
    sel = ev["event"] == 0
    req = _google_request_matrix(ev["cpu"][sel], ev["mem"][sel])
    arrival = ev["ts_us"][sel] / 1e6
    departure = np.full(arrival.shape, np.inf)
    _readonly(req, arrival, departure)
    return Requests(req, arrival, departure)


_TERMINAL = (2, 3, 4, 5, 6)  # EVICT, FAIL, FINISH, KILL, LOST


def google_lifetimes() -> Requests:
    """Google 2011 tasks as (request, start, end) for churn replays.

    Each SCHEDULE row starts a lifetime that ends at the next EVICT, FAIL,
    FINISH, KILL or LOST row of the same (job_id, task_index); a task still
    running when the window ends has ``departure = inf``. The request is the
    one on the SCHEDULE row. Rows are in start order.
    """
    ev = _google_events_cached(str(_google_task_path()))
    open_rows: dict[tuple[int, int], int] = {}
    starts: list[int] = []
    ends: list[float] = []
    ts, job, task, kind = ev["ts_us"], ev["job"], ev["task"], ev["event"]
    for i in range(ts.size):
        k = int(kind[i])
        if k == 1:
            key = (int(job[i]), int(task[i]))
            if key in open_rows:  # a second SCHEDULE without an end: close the first here
                ends[open_rows[key]] = ts[i] / 1e6
            open_rows[key] = len(starts)
            starts.append(i)
            ends.append(np.inf)
        elif k in _TERMINAL:
            pos = open_rows.pop((int(job[i]), int(task[i])), None)
            if pos is not None:
                ends[pos] = ts[i] / 1e6
    idx = np.array(starts, dtype=np.int64)
    req = _google_request_matrix(ev["cpu"][idx], ev["mem"][idx])
    arrival = ts[idx] / 1e6
    departure = np.array(ends, dtype=np.float64)
    _readonly(req, arrival, departure)
    return Requests(req, arrival, departure)


@functools.lru_cache(maxsize=2)
def _azure_cached(path: str) -> tuple[Requests, np.ndarray]:
    t, vcpu, mem_gb, lo, hi, batch = [], [], [], [], [], []
    for row in _rows(Path(path)):
        t.append(float(row[0]))
        batch.append(int(row[1]))
        vcpu.append(float(row[4]))
        mem_gb.append(float(row[5]))
        lo.append(float(row[8]))
        hi.append(float(row[9]))
    req = np.zeros((len(t), N_DIMS), dtype=np.int64)
    req[:, CPU] = np.rint(np.array(vcpu) * 1000)
    req[:, MEM] = np.rint(np.array(mem_gb) * 1024)
    arrival = np.array(t, dtype=np.float64)
    # The lifetime lies in [lo, hi] on a 300 s grid: take the midpoint. A
    # censored duration is a lower bound; lo is what we know for sure.
    duration = (np.array(lo) + np.array(hi)) / 2.0
    departure = arrival + np.maximum(duration, 1.0)
    batch_id = np.array(batch, dtype=np.int64)
    _readonly(req, arrival, departure, batch_id)
    return Requests(req, arrival, departure), batch_id


def azure_vms(with_batches: bool = False):
    """Azure 2017 VM arrivals: requests, arrival time and departure time (s).

    cpu = vcpu * 1000 millicores, memory = memory_gb * 1024 MiB. The duration
    is the midpoint of the row's [duration_lo_s, duration_hi_s] bin (at least
    1 s); censored rows keep that estimate, which only shortens them.

    Parameters
    ----------
    with_batches : bool
        Also return ``batch_id`` (n,) int64: VMs of one tenant in one 300 s bin.

    Returns
    -------
    Requests or (Requests, ndarray)
    """
    files = sorted((data_dir() / _AZURE_DIR).glob("vm_arrivals*.csv"))
    if not files:
        raise DatasetUnavailable(f"no vm_arrivals*.csv in {data_dir() / _AZURE_DIR}")
    reqs, batch = _azure_cached(str(files[0]))
    return (reqs, batch) if with_batches else reqs


@functools.lru_cache(maxsize=2)
def _alibaba_cached(path: str) -> HostPool:
    ids, rows = [], []
    for row in _rows(Path(path)):
        ids.append(row[0])
        rows.append((_float(row[2]), _float(row[3]), _float(row[4])))
    cap = np.zeros((len(ids), N_DIMS), dtype=np.int64)
    if rows:
        arr = np.array(rows, dtype=np.float64)
        cap[:, CPU] = np.rint(arr[:, 0] * 1000)
        cap[:, MEM] = np.rint(arr[:, 1] * 1024)
        cap[:, GPU] = np.rint(arr[:, 2])
    _readonly(cap)
    return HostPool(cap, tuple(ids))


def alibaba_hosts() -> HostPool:
    """Alibaba PAI 2020 machines: cores * 1000 millicores, GB * 1024 MiB, gpus."""
    return _alibaba_cached(str(_file(f"{_ALIBABA_DIR}/pai_machine_spec.csv")))


# ----------------------------------------------------------------------------
# synthetic workloads

SYNTHETIC_KINDS = ("uniform", "bimodal", "correlated")

# Reference host for synthetic workloads: 64 cores, 256 GiB, 2 TB ssd, 25 Gbit/s.
SYNTHETIC_HOST = np.array([64_000, 262_144, 2_000, 25_000, 0], dtype=np.int64)


def synthetic(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """Draw ``n`` requests from a documented distribution.

    All sizes are fractions of :data:`SYNTHETIC_HOST` (64 cores, 256 GiB,
    2000 GiB ssd, 25,000 Mbit/s, no gpu), rounded to integers:

    * ``uniform``: cpu, memory, ssd and net independently U[1%, 25%].
    * ``bimodal``: 80% small items U[1%, 5%] and 20% large U[20%, 50%] per
      dimension (small and large drawn per item, dimensions independent).
    * ``correlated``: cpu share c ~ U[1%, 30%]; memory share = c * r with
      r ~ lognormal(0, 0.35) clipped to [0.25, 4], then capped at 60%;
      ssd and net U[0.5%, 10%].

    Parameters
    ----------
    kind : {"uniform", "bimodal", "correlated"}
    n : int
        Number of requests (>= 0).
    seed : int
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    ndarray of int64, shape (n, 5)

    Raises
    ------
    ValidationError
        On an unknown kind or a negative ``n``.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValidationError(f"kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValidationError(f"n must be a non-negative integer, got {n!r}")
    rng = np.random.default_rng(seed)
    share = np.zeros((int(n), N_DIMS), dtype=np.float64)
    if kind == "uniform":
        share[:, :4] = rng.uniform(0.01, 0.25, size=(n, 4))
    elif kind == "bimodal":
        large = rng.random(n) < 0.2
        small_sz = rng.uniform(0.01, 0.05, size=(n, 4))
        large_sz = rng.uniform(0.20, 0.50, size=(n, 4))
        share[:, :4] = np.where(large[:, None], large_sz, small_sz)
    else:
        c = rng.uniform(0.01, 0.30, size=n)
        ratio = np.clip(rng.lognormal(0.0, 0.35, size=n), 0.25, 4.0)
        share[:, CPU] = c
        share[:, MEM] = np.minimum(c * ratio, 0.60)
        share[:, SSD] = rng.uniform(0.005, 0.10, size=n)
        share[:, NET] = rng.uniform(0.005, 0.10, size=n)
    return np.maximum(np.rint(share * SYNTHETIC_HOST), 0).astype(np.int64)
