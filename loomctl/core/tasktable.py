"""The server's task table: numpy columns indexed by *row*, and the table of allowed
state changes (the segments that own the rows are in ``core.segments``, re-exported).

Inside the core a task is its row; the world outside knows it by its global id (64-bit,
never reused; ``core.segments`` maps one to the other, ``core.server`` at the edge).

Invariants:
- A segment holds the rows ``base .. base+n-1`` (contiguous); every row in use belongs
  to one live segment (``segment`` column); the other rows below ``n`` are free
  (``free``: [start, length] ranges in order, none touching another or the end).
- A row is handed out with every column zeroed (``owner`` and ``worker`` -1); a freed
  row keeps only its (final) state: it holds nothing, runs nowhere, is flagged nothing,
  so scans over ``0 .. n-1`` find nothing in it. Rows from ``clean`` up were never
  written since their columns were allocated (zeros): handing them out writes only
  ``owner`` and ``worker``, so the pages of a column no task has used yet (``size``,
  ``cpus``, ...) stay out of the process's memory.
- Per-task columns grow by doubling and shrink when most rows are free; no Python
  object exists per task (``length``, 0 for all but arrays, is a dict of the others;
  ``job`` is read through the segment).
- ``state`` changes only through ``core.transitions.transition``, which checks every
  move against ``ALLOWED`` (tests check that nothing else writes the column).
"""

from __future__ import annotations

import numpy as np

from loomctl.core.segments import Segment, SegmentIndex, distinct, ranges  # noqa: F401  (they live there)

# task states
WAITING, READY, ASSIGNED, FINISHED, FAILED, CANCELLED, ALIAS, SKIPPED = range(8)
STATE_NAMES = ("waiting", "ready", "assigned", "finished", "failed", "cancelled", "alias", "skipped")
N_STATES = len(STATE_NAMES)
# live tasks still need their inputs (each of their input slots holds its producer's data)
LIVE = np.zeros(N_STATES, dtype=bool)
LIVE[[WAITING, READY, ASSIGNED]] = True

# ALLOWED[to, from]: the moves of ``transition``. New rows are born WAITING, ALIAS or
# SKIPPED (core.graphstate.add_tasks); FAILED, CANCELLED, ALIAS and SKIPPED are final.
ALLOWED = np.zeros((N_STATES, N_STATES), dtype=bool)
for _to, _froms in {
    READY: (WAITING,),
    ASSIGNED: (READY,
               WAITING),     # ahead of its inputs, computed on that worker (core.speculation)
    WAITING: (READY,         # an input's data was lost: wait for it again
              ASSIGNED,      # its worker was lost, an input was stranded, it redirected, or
                             # its worker gave it back before it started (work stealing)
              FINISHED),     # its data was lost and is needed: compute it again
    FINISHED: (ASSIGNED,
               WAITING, READY),   # a worker that joins again still holds its data
    FAILED: (WAITING, READY, ASSIGNED),
    CANCELLED: (WAITING, READY, ASSIGNED),
    SKIPPED: (WAITING, READY),   # replaced at run time (dslice/dget expansion)
}.items():
    ALLOWED[_to, list(_froms)] = True

# task flags
FLAG_RESULT = 1          # the client wants this task's data (it holds it once)
FLAG_EXTRA = 2           # has consumers in extra_consumers
FLAG_CHECKPOINT = 4      # write the result to its checkpoint path
FLAG_LOADED = 8          # taken from its checkpoint file instead of computed
FLAG_OVERRIDE = 16       # symbol/config/inputs replaced at run time (see overrides)
FLAG_QUEUED = 32         # in the ready list (core.ready), once

_COLUMNS = {
    "state": np.uint8, "flags": np.uint8, "attempts": np.int8, "remaining": np.int32, "holds": np.int32,
    "owner": np.int32, "worker": np.int32, "size": np.int64, "cpus": np.int32, "segment": np.int32,
    "symbol": np.uint16, "blevel": np.int32, "priority": np.int32,   # (the last two: core.priority)
}
MIN_CAPACITY = 1024


BINCOUNT_SPAN = 1 << 17   # (its counts: 1 MB)


def add_at(column: np.ndarray, rows: np.ndarray, delta: int) -> None:
    """``column[rows] += delta`` once per occurrence of a row (``np.add.at``); many rows
    over a narrow span are counted with np.bincount (ufunc.at costs ~50 ns a row: 133 us
    for a 2^10 tree's 2,046 input slots, against 10 us). A span over BINCOUNT_SPAN rows
    (a huge submission's) goes through np.add.at: no temporaries at its memory peak."""
    n = len(rows)
    if n < 64:
        np.add.at(column, rows, delta)
        return
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if lo < 0 or hi - lo > 8 * n or hi - lo > BINCOUNT_SPAN:   # (sparse: mostly zeros; or huge)
        np.add.at(column, rows, delta)
        return
    counts = np.bincount(rows - lo, minlength=hi - lo)
    column[lo:hi] += (counts if delta == 1 else counts * delta).astype(column.dtype, copy=False)


class SparseColumn:
    """An int64 column that is 0 for most rows: ``col[rows]``, ``col[rows] = values``."""

    def __init__(self):
        self.values: dict[int, int] = {}

    def __getitem__(self, rows):
        if np.ndim(rows) == 0:
            return self.values.get(int(rows), 0)
        rows = np.asarray(rows)
        if not self.values:
            return np.zeros(rows.shape, dtype=np.int64)
        get = self.values.get
        return np.array([get(i, 0) for i in rows.tolist()], dtype=np.int64)

    def __setitem__(self, rows, values) -> None:
        if not (type(rows) is np.ndarray and type(values) is np.ndarray and rows.shape == values.shape):
            rows = np.atleast_1d(np.asarray(rows))
            values = np.broadcast_to(np.asarray(values, dtype=np.int64), rows.shape)
        if not values.any():   # (the usual write: all zero)
            if self.values:
                for i in rows.ravel().tolist():
                    self.values.pop(i, None)
            return
        nonzero = values != 0
        if self.values:
            for i in rows[~nonzero].tolist():
                self.values.pop(i, None)
        if nonzero.any():
            self.values.update(zip(rows[nonzero].tolist(), values[nonzero].tolist()))

    def clear(self, lo: int, hi: int) -> None:
        keys = [k for k in self.values if lo <= k < hi] if len(self.values) < hi - lo else \
            [k for k in range(lo, hi) if k in self.values]
        for k in keys:
            del self.values[k]


class _JobColumn:
    """``cols.job[rows]``: the job of each row, through its segment."""

    def __init__(self, cols: "TaskColumns"):
        self.cols = cols

    def __getitem__(self, rows):
        return self.cols.segment_job[self.cols.segment[rows]]


class TaskColumns:
    def __init__(self, capacity: int = MIN_CAPACITY):
        self.n = 0                 # rows below this are in use or free; none above
        self.used = 0              # rows in use
        self.capacity = capacity
        self.free: list[list[int]] = []   # [start, length] of free ranges, in order
        self.clean = 0             # rows from here up are as allocated: all zero
        for name, dtype in _COLUMNS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))
        self.length = SparseColumn()
        self.segment_job = np.zeros(64, dtype=np.int64)   # per segment slot (kept by core.segments)
        self.job = _JobColumn(self)

    def peek(self, count: int) -> int:
        """The first row ``allocate(count)`` would return."""
        for start, length in self.free:
            if length >= count:
                return start
        return self.n

    def allocate(self, count: int) -> int:
        """Hand out ``count`` contiguous rows (the first free range they fit in, else new
        rows at the end); returns the first. Their columns are zero, owner/worker -1."""
        for k, (start, length) in enumerate(self.free):
            if length >= count:
                if length == count:
                    del self.free[k]
                else:
                    self.free[k] = [start + count, length - count]
                self._reset(start, start + count)
                self.used += count
                return start
        base = self.n
        need = base + count
        if need > self.capacity:
            self._resize(max(need, 2 * self.capacity))
        if base >= self.clean:   # (zeros already: only owner and worker to set)
            self.owner[base:need] = -1
            self.worker[base:need] = -1
            self.clean = need
        else:
            self._reset(base, need)
        self.n = need
        self.used += count
        return base

    def release(self, base: int, count: int) -> None:
        """Rows ``base .. base+count-1`` are free again."""
        if count <= 0:
            return
        self.used -= count
        self._reset(base, base + count)
        self.length.clear(base, base + count)
        self.free.append([base, count])
        self.free.sort()
        merged: list[list[int]] = []
        for start, length in self.free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += length
            else:
                merged.append([start, length])
        if merged and merged[-1][0] + merged[-1][1] == self.n:   # the end is free: the table ends earlier
            self.n = merged.pop()[0]
        self.free = merged
        if self.capacity > MIN_CAPACITY and self.capacity >= 4 * self.n:
            self._resize(max(MIN_CAPACITY, 2 * self.n))

    def _reset(self, lo: int, hi: int) -> None:
        for name in _COLUMNS:
            if name != "state":   # (births set it: core.transitions.add_tasks)
                getattr(self, name)[lo:hi] = 0
        self.owner[lo:hi] = -1
        self.worker[lo:hi] = -1

    def _resize(self, capacity: int) -> None:
        keep = min(self.n, capacity)
        for name in _COLUMNS:
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[:keep] = old[:keep]
            setattr(self, name, new)
        self.capacity = capacity
        self.clean = keep

    def nbytes(self) -> int:
        """Bytes the columns take (allocated capacity), roughly."""
        return sum(getattr(self, name).nbytes for name in _COLUMNS) + 100 * len(self.length.values) \
            + self.segment_job.nbytes
