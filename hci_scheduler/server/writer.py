"""One writer at a time: mutations queued in arrival order, applied and made
durable in batches (group commit), without a thread that exists only to write.

The calling thread that finds no batch in flight becomes the *leader*: it
takes the queued operations, its own and every one that arrived meanwhile,
hands them to `process` (which applies them and appends their events to the
store in one transaction, one fsync), wakes each caller it carried, and passes
the lead to the first operation still queued. A lone call is applied and
committed by its own handler thread, with no hand-off to a writer thread and
back.

The store is therefore only ever written by one thread at a time: this is the
one place where calls are grouped into a commit.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from ..errors import SchedulerError, StateConflict

log = logging.getLogger("hci_scheduler.server")

#: Upper bound on the workloads one batch carries (keeps reads waiting at most
#: one bounded batch).
MAX_BATCH_WORKLOADS = 4096


class DeadlineExpired(SchedulerError):
    """The caller's deadline passed before the writer reached its operation."""


class StoreFailed(SchedulerError):
    """The store could not commit; the server stops taking mutations."""


class Op:
    """One queued mutation. `wake` is held until the op is answered or made leader.

    `process` sets `result` or `error` on every op it is given.
    """

    __slots__ = ("kind", "args", "deadline", "n", "coalesce", "wake", "taken", "lead", "result", "error")

    def __init__(self, kind: str, args: tuple, deadline: float | None, n: int, coalesce: bool):
        self.kind = kind
        self.args = args
        self.deadline = deadline  # time.monotonic() value, or None
        self.n = n  # workloads carried, for batch sizing
        self.coalesce = coalesce  # may share one cluster call with the ops next to it
        self.wake = threading.Lock()
        self.wake.acquire()
        self.taken = False  # a leader took it into a batch
        self.lead = False  # the previous leader handed the lead to its thread
        self.result = None
        self.error: BaseException | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline < now


class Writer:
    """Runs `process(ops)` on batches of queued operations, one batch at a time.

    Parameters
    ----------
    process : callable
        Applies a batch and makes it durable; sets `result` or `error` on each op.
        An exception it raises is a store failure or a bug: the writer stops
        (fail-stop), every pending op fails with StoreFailed and `on_fatal` runs.
    max_batch : int
        Workloads one batch may carry.
    """

    def __init__(self, process: Callable[[list[Op]], None], max_batch: int = MAX_BATCH_WORKLOADS):
        self._process = process
        self.max_batch = max_batch
        self._queue: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._leading = False  # invariant: a non-empty queue has a leader
        self._stopping = False
        self.broken: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None

    def execute(self, kind: str, args: tuple, deadline: float | None = None, n: int = 1,
                coalesce: bool = False):
        """Apply a mutation and return its result once it is durable (or raise its error).

        deadline is a time.monotonic() value: an operation still queued then is
        dropped unapplied (DeadlineExpired); one already in a batch is answered.
        """
        op = Op(kind, args, deadline, n, coalesce)
        with self._cond:
            if self.broken is not None:
                raise StoreFailed(f"store failed earlier: {self.broken}")
            if self._stopping:
                raise StateConflict("server is stopping")
            self._queue.append(op)
            lead = not self._leading
            self._leading = True
        if not lead:
            self._await_turn(op)
            lead = op.lead
        if lead:
            self._lead(op)
        if op.error is not None:
            raise op.error
        return op.result

    def _await_turn(self, op: Op) -> None:
        """Sleep until a leader answered `op` or handed this thread the lead."""
        if op.deadline is None:
            op.wake.acquire()
            return
        if op.wake.acquire(timeout=max(op.deadline - time.monotonic(), 0.0)):
            return
        with self._cond:
            if not op.taken and not op.lead:
                self._queue.remove(op)
                op.error = DeadlineExpired("deadline passed while the operation waited for the writer")
                return
        op.wake.acquire()  # in a batch already (or leading): answered within one batch

    def _lead(self, mine: Op) -> None:
        """Run batches until `mine` is answered, then pass the lead on."""
        while True:
            with self._cond:
                ops = self._take_locked()
            try:
                self._process(ops)
            except BaseException as exc:  # a store failure or a bug: fail-stop
                log.exception("writer failed")
                for op in ops:
                    if op.error is None and op.result is None:
                        op.error = StoreFailed(str(exc))
                self.fail(exc)
                for op in ops:
                    if op is not mine:
                        op.wake.release()
                return
            for op in ops:
                if op is not mine:
                    op.wake.release()
            if mine.taken:
                with self._cond:
                    if self._queue:
                        nxt = self._queue[0]
                        nxt.lead = True
                        nxt.wake.release()
                    else:
                        self._leading = False
                        if self._stopping:  # close() waits for the last batch
                            self._cond.notify_all()
                return

    def _take_locked(self) -> list[Op]:
        q = self._queue
        op = q.popleft()
        op.taken = True
        ops = [op]
        n = op.n
        while q and n + q[0].n <= self.max_batch:
            op = q.popleft()
            op.taken = True
            ops.append(op)
            n += op.n
        return ops

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new mutations and wait (at most `timeout` s) for the queued ones."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            while self._leading or self._queue:
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)

    def fail(self, exc: BaseException) -> None:
        """Stop for good (fail-stop): pending and later operations fail with StoreFailed,
        and on_fatal runs once with the cause."""
        if self.broken is not None:
            return
        self.broken = exc
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._leading = False
            self._cond.notify_all()
        for op in pending:
            op.error = StoreFailed(f"store failed: {exc}")
            op.wake.release()
        if self.on_fatal is not None:
            self.on_fatal(exc)
