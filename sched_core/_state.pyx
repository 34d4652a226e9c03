# cython: language_level=3
"""HostState: the resource matrices of every host row, and commit/release.

The Python layer (hci_scheduler.cluster) owns one HostState. It writes host
rows when hosts are added or removed and decides which hosts are schedulable;
the kernels in _place.pyx only read the matrices, select, and call commit.
Every commit and release is O(n_dims) plus one index update.
"""
import numpy as np
cimport numpy as cnp

from ._typedefs cimport int64_t, intp_t, uint8_t, float64_t
from ._index cimport FitIndex

cnp.import_array()


cdef inline void _charge(HostState s, intp_t h, const int64_t* amount, int64_t sign, int64_t workloads) noexcept nogil:
    """used[h] += sign * amount (free follows) and load[h] += workloads, re-filing h in the
    index under its new key: the one place a row's usage changes."""
    cdef intp_t d
    cdef bint indexed = s.index.member[h]
    if indexed:
        s.index.remove(h)
    for d in range(s.n_dims):
        s.used[h, d] += sign * amount[d]
        s.free[h, d] -= sign * amount[d]
    s.load[h] += workloads
    if indexed:
        s.index.insert(h)


cdef class HostState:
    """Capacity, usage and free matrices for `n_rows` host rows.

    Parameters
    ----------
    n_rows : int
        Host rows to allocate. Grow with `grown`, which copies into a larger state.
    inv_ref : float64 (n_dims,)
        Weight / reference capacity per dimension (see _score.free_key).
    """

    def __init__(self, intp_t n_rows, float64_t[::1] inv_ref):
        self.n_rows = n_rows
        self.n_dims = inv_ref.shape[0]
        self.inv_ref = np.array(inv_ref, dtype=np.float64)
        self.ref = np.zeros(self.n_dims, dtype=np.float64)
        self.key_scale = 1.0
        self.limit = np.zeros((n_rows, self.n_dims), dtype=np.int64)
        self.used = np.zeros((n_rows, self.n_dims), dtype=np.int64)
        self.free = np.zeros((n_rows, self.n_dims), dtype=np.int64)
        self.load = np.zeros(n_rows, dtype=np.int64)
        self.index = FitIndex(self.free, self.inv_ref)

    # -- views for the Python layer (read-only by convention; write through the methods) --

    @property
    def limit_array(self):
        return np.asarray(self.limit)

    @property
    def used_array(self):
        return np.asarray(self.used)

    @property
    def free_array(self):
        return np.asarray(self.free)

    @property
    def load_array(self):
        return np.asarray(self.load)

    @property
    def inv_ref_array(self):
        return np.asarray(self.inv_ref)

    def schedulable_array(self):
        return np.asarray(self.index.member).astype(bool)

    # -- host rows --

    def set_limit(self, intp_t h, const int64_t[::1] limit_row):
        """Set the limit of row h (free follows). The row must be out of the index."""
        cdef intp_t d
        if self.index.member[h]:
            raise RuntimeError(f"set_limit on schedulable row {h}")
        for d in range(self.n_dims):
            self.limit[h, d] = limit_row[d]
            self.free[h, d] = limit_row[d] - self.used[h, d]

    def clear_row(self, intp_t h):
        """Forget row h entirely (the host was removed; the row may be reused)."""
        if self.index.member[h]:
            self.index.discard(h)
        self.limit[h, :] = 0
        self.used[h, :] = 0
        self.free[h, :] = 0
        self.load[h] = 0

    def set_schedulable(self, intp_t h, bint flag):
        if flag:
            self.index.add(h)
        else:
            self.index.discard(h)

    def set_schedulable_rows(self, const intp_t[::1] rows):
        """Make many rows schedulable in one call (an empty index is bulk-loaded)."""
        self.index.add_rows(rows)

    def set_reference(self, float64_t[::1] inv_ref, float64_t[::1] ref):
        """Change the dimension weights/reference capacities; re-sorts every member."""
        members = np.flatnonzero(np.asarray(self.index.member)).astype(np.intp)
        self.index.clear()
        self.inv_ref[:] = inv_ref
        self.ref[:] = ref
        scale = float(np.dot(np.asarray(inv_ref), np.asarray(ref)))
        self.key_scale = scale if scale > 0 else 1.0
        self.index.add_rows(members)

    def grown(self, intp_t n_rows):
        """A copy of this state with room for `n_rows` rows (the index is rebuilt)."""
        if n_rows < self.n_rows:
            raise ValueError("grown: cannot shrink")
        other = HostState(n_rows, self.inv_ref)
        other.ref[:] = self.ref
        other.key_scale = self.key_scale
        cdef intp_t n = self.n_rows
        np.asarray(other.limit)[:n] = np.asarray(self.limit)
        np.asarray(other.used)[:n] = np.asarray(self.used)
        np.asarray(other.free)[:n] = np.asarray(self.free)
        np.asarray(other.load)[:n] = np.asarray(self.load)
        other.index.add_rows(np.flatnonzero(np.asarray(self.index.member)).astype(np.intp))
        return other

    # -- commit / release --

    cdef void commit(self, intp_t h, const int64_t* request) noexcept nogil:
        """Charge `request` to host h. The caller has checked that it fits."""
        _charge(self, h, request, 1, 1)

    cdef void uncommit(self, intp_t h, const int64_t* request) noexcept nogil:
        """Give back `request` on host h."""
        _charge(self, h, request, -1, -1)

    def adjust_row(self, intp_t h, const int64_t[::1] delta):
        """Add `delta` to row h's usage without counting a workload (moving a charge
        between two owners on the same host)."""
        _charge(self, h, &delta[0], 1, 0)

    def commit_row(self, intp_t h, const int64_t[::1] request):
        """Charge `request` to row h without any check (callers check first)."""
        self.commit(h, &request[0])

    def release_row(self, intp_t h, const int64_t[::1] request):
        """Give back `request` on row h."""
        self.uncommit(h, &request[0])
