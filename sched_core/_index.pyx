# cython: language_level=3
"""FitIndex: the schedulable hosts kept sorted by (free_key, row).

Best fit needs the feasible host with the smallest free_key (see _score.pyx);
a full scan costs n_hosts * n_dims per placement. The index keeps the hosts
in key order, split into blocks of at most BLOCK rows, and each block keeps an
upper bound of its rows' free capacity per dimension. A query walks the blocks
in key order, skips every block whose bound cannot hold the request, and stops
at the first row that fits: by construction that row is exactly what the full
scan would choose (smallest key, then lowest row), so results never differ.

Updates are O(log n_blocks + BLOCK): a placement removes the host with its
old key and inserts it with the new one. Blocks split when full and merge
with a neighbour when they fall below a quarter, so no two adjacent blocks
are both small and the number of blocks stays under 8 * n_rows / BLOCK + 1.
"""
import numpy as np
cimport numpy as cnp
from libc.string cimport memmove, memcpy

from ._typedefs cimport int64_t, intp_t, uint8_t, uint64_t, float64_t
from ._filter cimport fits
from ._score cimport free_key

cnp.import_array()


cdef inline bint before(float64_t ka, intp_t a, float64_t kb, intp_t b) noexcept nogil:
    """(ka, a) sorts strictly before (kb, b)."""
    return ka < kb or (ka == kb and a < b)


cdef class FitIndex:
    """Schedulable hosts ordered by (free_key, row).

    Parameters
    ----------
    free : int64 (n_rows, n_dims), C-contiguous
        The cluster's free-capacity matrix. The index keeps a view of it: the
        caller updates a row only between `remove` and `insert` of that row.
    inv_ref : float64 (n_dims,)
        Weight divided by the reference capacity of each dimension.
    """

    def __init__(self, int64_t[:, ::1] free, float64_t[::1] inv_ref):
        cdef intp_t n_rows = free.shape[0]
        cdef intp_t n_slots = 8 * (n_rows // BLOCK) + 16
        if inv_ref.shape[0] != free.shape[1]:
            raise ValueError("FitIndex: inv_ref must have one entry per column of free")
        self.free = free
        self.inv_ref = inv_ref
        self.n_dims = free.shape[1]
        self.key = np.zeros(n_rows, dtype=np.float64)
        self.member = np.zeros(n_rows, dtype=np.uint8)
        self.items = np.zeros((n_slots, BLOCK), dtype=np.intp)
        self.count = np.zeros(n_slots, dtype=np.intp)
        self.stale = np.zeros(n_slots, dtype=np.uint8)
        self.fail_req = np.zeros((n_slots, max(self.n_dims, 1)), dtype=np.int64)
        self.has_fail = np.zeros(n_slots, dtype=np.uint8)
        self.maxfree = np.zeros((n_slots, max(self.n_dims, 1)), dtype=np.int64)
        self.order = np.zeros(n_slots, dtype=np.intp)
        self.stamp = np.zeros(n_slots, dtype=np.uint64)
        self.clock = 0
        self.spare = np.arange(n_slots - 1, -1, -1, dtype=np.intp)
        self.n_spare = n_slots
        self.n_blocks = 0
        self.n_members = 0

    # -- Python-facing helpers (setup and tests; the hot paths are the cdef methods) --

    def add(self, intp_t h):
        """Insert host row `h` (no-op if it is already a member)."""
        if h < 0 or h >= self.member.shape[0]:
            raise IndexError(f"host row {h} out of range")
        if not self.member[h]:
            self.insert(h)

    def add_rows(self, const intp_t[::1] rows):
        """Insert every row of `rows` that is not a member yet (one call for many).

        Into an empty index the rows are sorted once and laid out in 3/4-full blocks,
        O(n log n) with no block splits, instead of n ordered inserts."""
        cdef intp_t i, h
        for i in range(rows.shape[0]):
            h = rows[i]
            if h < 0 or h >= self.member.shape[0]:
                raise IndexError(f"host row {h} out of range")
        if self.n_members == 0 and rows.shape[0] > 1:
            self._bulk_load(rows)
            return
        with nogil:
            for i in range(rows.shape[0]):
                if not self.member[rows[i]]:
                    self.insert(rows[i])

    def clear(self):
        """Remove every member (O(n_blocks + n_rows))."""
        cdef intp_t i
        for i in range(self.n_blocks):
            self.count[self.order[i]] = 0
            self.spare[self.n_spare] = self.order[i]
            self.n_spare += 1
        self.n_blocks = 0
        self.n_members = 0
        self.member[:] = 0

    def _bulk_load(self, const intp_t[::1] rows):
        """Fill the empty index with `rows` (in range; repeats are ignored)."""
        cdef intp_t n = 0, i, h
        distinct = np.empty(rows.shape[0], dtype=np.intp)
        keys = np.empty(rows.shape[0], dtype=np.float64)
        cdef intp_t[::1] r = distinct
        cdef float64_t[::1] k = keys
        with nogil:
            for i in range(rows.shape[0]):
                h = rows[i]
                if not self.member[h]:
                    self.member[h] = 1
                    r[n] = h
                    k[n] = free_key(&self.free[h, 0], &self.inv_ref[0], self.n_dims)
                    self.key[h] = k[n]
                    n += 1
        sorted_rows = distinct[:n][np.lexsort((distinct[:n], keys[:n]))]
        cdef intp_t[::1] by_key = sorted_rows
        with nogil:
            self._lay_out(&by_key[0] if n else NULL, n)

    def load_subset(self, FitIndex src, const uint8_t[::1] keep):
        """Fill the empty index with the members h of `src` that have keep[h] set.

        src shares this index's free matrix and is already in (key, row) order, so the
        rows are laid out in one pass, O(n_rows) and no sort: a large constrained batch
        whose static filters turn hosts away builds one (_place.SUB_INDEX_MIN_BATCH), and
        a sort would be a visible share of such a batch."""
        if self.n_members != 0 or keep.shape[0] != self.member.shape[0] or src.member.shape[0] != keep.shape[0]:
            raise ValueError("load_subset: needs an empty index and one keep flag per host row")
        rows = np.empty(src.n_members, dtype=np.intp)
        cdef intp_t[::1] r = rows
        cdef intp_t i, j, h, b, n = 0
        with nogil:
            for i in range(src.n_blocks):
                b = src.order[i]
                for j in range(src.count[b]):
                    h = src.items[b, j]
                    if keep[h]:
                        self.member[h] = 1
                        self.key[h] = src.key[h]
                        r[n] = h
                        n += 1
            self._lay_out(&r[0] if n else NULL, n)

    cdef void _lay_out(self, const intp_t* rows, intp_t n) noexcept nogil:
        """Fill the empty index with `rows`, members already marked and keyed, in (key, row)
        order: 3/4-full blocks, no splits."""
        cdef intp_t i = 0, j, b, m, fill = (3 * BLOCK) // 4
        while i < n:
            m = fill if n - i > fill else n - i
            self.n_spare -= 1
            b = self.spare[self.n_spare]
            for j in range(m):
                self.items[b, j] = rows[i + j]
            self.count[b] = m
            self.has_fail[b] = 0
            self._recompute_max(b)
            self._touch(b)
            self.order[self.n_blocks] = b
            self.n_blocks += 1
            i += m
        self.n_members = n

    def discard(self, intp_t h):
        """Remove host row `h` (no-op if it is not a member)."""
        if h < 0 or h >= self.member.shape[0]:
            raise IndexError(f"host row {h} out of range")
        if self.member[h]:
            self.remove(h)

    def is_member(self, intp_t h):
        return bool(self.member[h])

    def rows_in_order(self):
        """Member rows in (key, row) order. Used by tests."""
        out = []
        cdef intp_t i, j, b
        for i in range(self.n_blocks):
            b = self.order[i]
            for j in range(self.count[b]):
                out.append(self.items[b, j])
        return out

    def _py_first_fit(self, const int64_t[::1] request):
        """Python wrapper used for testing."""
        return self.first_fit(&request[0])

    def _py_last_fit(self, const int64_t[::1] request):
        """Python wrapper used for testing."""
        return self.last_fit(&request[0])

    def check(self):
        """Verify every invariant; raise AssertionError on the first broken one. Used by tests."""
        cdef intp_t i, j, b, h, d, n = 0, prev = -1
        cdef float64_t prev_key = 0.0
        for i in range(self.n_blocks):
            b = self.order[i]
            assert 0 < self.count[b] < BLOCK, f"block {b} has {self.count[b]} rows"
            for j in range(self.count[b]):
                h = self.items[b, j]
                assert self.member[h], f"row {h} indexed but not a member"
                assert self.key[h] == free_key(&self.free[h, 0], &self.inv_ref[0], self.n_dims), \
                    f"row {h} has a stale key"
                if prev >= 0:
                    assert before(prev_key, prev, self.key[h], h), f"rows {prev} and {h} out of order"
                for d in range(self.n_dims):
                    assert self.free[h, d] <= self.maxfree[b, d], f"block {b} bound below row {h}"
                prev, prev_key = h, self.key[h]
                n += 1
            if self.has_fail[b]:
                for j in range(self.count[b]):
                    h = self.items[b, j]
                    assert not fits(&self.free[h, 0], &self.fail_req[b, 0], self.n_dims), \
                        f"block {b} remembers a failed request that row {h} fits"
            if i > 0:
                assert self.count[b] >= BLOCK // 4 or self.count[self.order[i - 1]] >= BLOCK // 4, \
                    f"adjacent small blocks at {i - 1}, {i}"
        assert n == self.n_members == int(np.asarray(self.member).sum()), "member count mismatch"

    # -- the core --

    cdef intp_t _locate(self, float64_t k, intp_t h) noexcept nogil:
        """Position in `order` of the first block whose last row is not before (k, h);
        the last block when (k, h) sorts after everything."""
        cdef intp_t lo = 0, hi = self.n_blocks - 1, mid, b, last
        while lo < hi:
            mid = (lo + hi) >> 1
            b = self.order[mid]
            last = self.items[b, self.count[b] - 1]
            if before(self.key[last], last, k, h):
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef intp_t _position(self, intp_t b, float64_t k, intp_t h) noexcept nogil:
        """Index in block b of the first row not before (k, h)."""
        cdef intp_t lo = 0, hi = self.count[b], mid, r
        while lo < hi:
            mid = (lo + hi) >> 1
            r = self.items[b, mid]
            if before(self.key[r], r, k, h):
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef void note_fail(self, intp_t b, const int64_t* request) noexcept nogil:
        """Remember that no row of block b fits `request`. Rows only lose capacity while
        they stay in a block (a row that gains some is re-inserted, which forgets this),
        so every later request at least as large in every dimension fails there too.
        The smaller of two such requests rules out more, so it is the one kept."""
        cdef intp_t d
        if self.has_fail[b]:
            for d in range(self.n_dims):
                if request[d] > self.fail_req[b, d]:
                    return
        for d in range(self.n_dims):
            self.fail_req[b, d] = request[d]
        self.has_fail[b] = 1

    cdef bint known_to_fail(self, intp_t b, const int64_t* request) noexcept nogil:
        cdef intp_t d
        if not self.has_fail[b]:
            return False
        for d in range(self.n_dims):
            if request[d] < self.fail_req[b, d]:
                return False
        return True

    cdef void tighten(self, intp_t b) noexcept nogil:
        """Recompute block b's bound after a query scanned it in vain, if a row left or lost
        capacity since the last recompute: stale bounds let queries into blocks they could skip."""
        if self.stale[b]:
            self._recompute_max(b)

    cdef void _touch(self, intp_t b) noexcept nogil:
        """Block b's rows changed: a fact cached with an older stamp no longer holds."""
        self.clock += 1
        self.stamp[b] = self.clock

    cdef void _recompute_max(self, intp_t b) noexcept nogil:
        cdef intp_t j, d, h
        self.stale[b] = 0
        for d in range(self.n_dims):
            self.maxfree[b, d] = -1
        for j in range(self.count[b]):
            h = self.items[b, j]
            for d in range(self.n_dims):
                if self.free[h, d] > self.maxfree[b, d]:
                    self.maxfree[b, d] = self.free[h, d]

    cdef void insert(self, intp_t h) noexcept nogil:
        cdef intp_t pos, b, i, d, n
        cdef float64_t k = free_key(&self.free[h, 0], &self.inv_ref[0], self.n_dims)
        self.key[h] = k
        self.member[h] = 1
        self.n_members += 1
        if self.n_blocks == 0:
            self.n_spare -= 1
            b = self.spare[self.n_spare]
            self.order[0] = b
            self.n_blocks = 1
            self.items[b, 0] = h
            self.count[b] = 1
            self.has_fail[b] = 0
            self._touch(b)
            for d in range(self.n_dims):
                self.maxfree[b, d] = self.free[h, d]
            return
        pos = self._locate(k, h)
        b = self.order[pos]
        i = self._position(b, k, h)
        n = self.count[b]
        if i < n:
            memmove(&self.items[b, i + 1], &self.items[b, i], (n - i) * sizeof(intp_t))
        self.items[b, i] = h
        self.count[b] = n + 1
        self._touch(b)
        self.has_fail[b] = 0  # a new row may fit what failed before
        for d in range(self.n_dims):
            if self.free[h, d] > self.maxfree[b, d]:
                self.maxfree[b, d] = self.free[h, d]
        if self.count[b] == BLOCK:
            self._split(pos)

    cdef void _split(self, intp_t pos) noexcept nogil:
        cdef intp_t b = self.order[pos], s, half = BLOCK // 2, d
        self.n_spare -= 1
        s = self.spare[self.n_spare]
        memcpy(&self.items[s, 0], &self.items[b, half], (BLOCK - half) * sizeof(intp_t))
        self.count[s] = BLOCK - half
        self.count[b] = half
        self.has_fail[s] = self.has_fail[b]
        for d in range(self.n_dims):
            self.fail_req[s, d] = self.fail_req[b, d]
        self._recompute_max(b)
        self._recompute_max(s)
        self._touch(b)
        self._touch(s)
        memmove(&self.order[pos + 2], &self.order[pos + 1], (self.n_blocks - pos - 1) * sizeof(intp_t))
        self.order[pos + 1] = s
        self.n_blocks += 1

    cdef void _drop_block(self, intp_t pos) noexcept nogil:
        """Return the (now empty or merged) block at `pos` to the spare stack."""
        cdef intp_t b = self.order[pos]
        self.count[b] = 0
        memmove(&self.order[pos], &self.order[pos + 1], (self.n_blocks - pos - 1) * sizeof(intp_t))
        self.n_blocks -= 1
        self.spare[self.n_spare] = b
        self.n_spare += 1

    cdef void _merge_small(self, intp_t pos) noexcept nogil:
        """Merge the small block at `pos` into a neighbour when both fit in 3/4 of a block.

        The block just fell to BLOCK // 4 - 1 rows or below while its neighbours were not
        small (the invariant), so either merge leaves a block of at least BLOCK // 4 rows
        and no two adjacent blocks end up small.
        """
        cdef intp_t limit = (3 * BLOCK) // 4
        if pos > 0 and self.count[self.order[pos - 1]] + self.count[self.order[pos]] <= limit:
            self._absorb(pos - 1)
        elif pos + 1 < self.n_blocks and self.count[self.order[pos + 1]] + self.count[self.order[pos]] <= limit:
            self._absorb(pos)

    cdef void _absorb(self, intp_t pos) noexcept nogil:
        """Append the rows of the block after `pos` to the block at `pos`, then drop it."""
        cdef intp_t b = self.order[pos], other = self.order[pos + 1], d
        memcpy(&self.items[b, self.count[b]], &self.items[other, 0], self.count[other] * sizeof(intp_t))
        self.count[b] += self.count[other]
        self._touch(b)
        for d in range(self.n_dims):
            if self.maxfree[other, d] > self.maxfree[b, d]:
                self.maxfree[b, d] = self.maxfree[other, d]
        self.stale[b] |= self.stale[other]
        # Both halves failed a request only if each did; the larger of the two then fails both.
        self.has_fail[b] = self.has_fail[b] and self.has_fail[other]
        for d in range(self.n_dims):
            if self.fail_req[other, d] > self.fail_req[b, d]:
                self.fail_req[b, d] = self.fail_req[other, d]
        self._drop_block(pos + 1)

    cdef void remove(self, intp_t h) noexcept nogil:
        """Remove member h; its free row must still be the one it was inserted with."""
        cdef float64_t k = self.key[h]
        cdef intp_t pos = self._locate(k, h), b, i, n
        b = self.order[pos]
        i = self._position(b, k, h)
        n = self.count[b]
        memmove(&self.items[b, i], &self.items[b, i + 1], (n - i - 1) * sizeof(intp_t))
        self.count[b] = n - 1
        self._touch(b)
        self.member[h] = 0
        self.n_members -= 1
        if n == 1:
            self._drop_block(pos)
            return
        # The block's bound stays an upper bound without h, so it is not rescanned here
        # (that was the most expensive step of a commit); queries tighten it when they
        # scan the block without finding a fit (see tighten).
        self.stale[b] = 1
        if n - 1 < BLOCK // 4:
            self._merge_small(pos)

    cdef intp_t first_fit(self, const int64_t* request) noexcept nogil:
        """The member with the smallest (key, row) that fits `request`, or -1."""
        cdef intp_t i, j, b, h, d, n_dims = self.n_dims
        cdef const int64_t* free0 = &self.free[0, 0]
        cdef const intp_t* row
        cdef bint blocked
        for i in range(self.n_blocks):
            b = self.order[i]
            blocked = False
            for d in range(n_dims):
                if self.maxfree[b, d] < request[d]:
                    blocked = True
                    break
            if blocked or self.known_to_fail(b, request):
                continue
            row = &self.items[b, 0]
            for j in range(self.count[b]):
                h = row[j]
                if fits(free0 + h * n_dims, request, n_dims):
                    return h
            self.tighten(b)
            self.note_fail(b, request)
        return -1

    cdef intp_t last_fit(self, const int64_t* request) noexcept nogil:
        """The member with the largest key that fits `request` (lowest row among equal keys), or -1."""
        cdef intp_t i, j, b, h, d, best = -1
        cdef float64_t best_key = 0.0
        cdef bint blocked
        i = self.n_blocks - 1
        while i >= 0:
            b = self.order[i]
            i -= 1
            if best >= 0 and self.key[self.items[b, self.count[b] - 1]] < best_key:
                break
            blocked = False
            for d in range(self.n_dims):
                if self.maxfree[b, d] < request[d]:
                    blocked = True
                    break
            if blocked:
                continue
            j = self.count[b] - 1
            while j >= 0:
                h = self.items[b, j]
                j -= 1
                if best >= 0 and self.key[h] < best_key:
                    return best
                if fits(&self.free[h, 0], request, self.n_dims):
                    # Walking down, equal keys come in decreasing row order: keep the last.
                    best = h
                    best_key = self.key[h]
        return best
