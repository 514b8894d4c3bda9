"""The server's task table: numpy columns indexed by global task id, plus segments, and
the table of allowed state changes.

Invariants:
- Global ids are handed out in increasing order and never reused; each submission (or
  run-time expansion) appends one Segment covering ids ``base .. base+n-1``.
- A segment stores its inputs and consumers in CSR form with *global* ids. Consumers
  from a later segment (a future used by a later job, an expansion) are kept in
  ``extra_consumers``; tasks that have some carry FLAG_EXTRA. A consumer edge that was
  removed at run time (its consumer's inputs were replaced) is -1 in the CSR and is
  never returned by ``consumers_of``.
- Per-task columns grow by doubling; ``cols.n`` is the number of ids in use. No Python
  object exists per task.
- A retired segment (its job is done with, see core.jobs.retire) is None in
  ``segments``; its base stays, and none of its ids is looked up again.
- ``state`` changes only through ``core.transitions.transition``, which checks every
  move against ``ALLOWED`` (tests check that nothing else writes the column).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphfmt.graph import Graph, offsets_from_lengths

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
    "state": np.uint8, "flags": np.uint8, "remaining": np.int32, "holds": np.int32,
    "owner": np.int32, "worker": np.int32, "size": np.int64, "length": np.int64,
    "cpus": np.int32, "job": np.int32, "segment": np.int32, "symbol": np.int32,
    "attempts": np.int8, "blevel": np.int32, "priority": np.int32,   # (the last two: core.priority)
}


class TaskColumns:
    def __init__(self, capacity: int = 1024):
        self.n = 0
        self.capacity = capacity
        for name, dtype in _COLUMNS.items():
            setattr(self, name, np.zeros(capacity, dtype=dtype))

    def skip_to(self, n: int) -> None:
        """Ids below ``n`` are used (a restored server takes its jobs' ids back): rows up
        to there exist, unused ones holding nothing."""
        if n > self.n:
            self.allocate(n - self.n)

    def allocate(self, count: int) -> int:
        """Reserve ``count`` new ids; returns the first. New rows are zero (columns are
        made with zeros and ids are never reused) except owner/worker = -1."""
        base = self.n
        need = base + count
        if need > self.capacity:
            capacity = max(need, 2 * self.capacity)
            for name in _COLUMNS:
                old = getattr(self, name)
                new = np.zeros(capacity, dtype=old.dtype)
                new[:base] = old[:base]
                setattr(self, name, new)
            self.capacity = capacity
        self.owner[base:need] = -1
        self.worker[base:need] = -1
        self.n = need
        return base


@dataclass(eq=False)
class Segment:
    index: int
    base: int
    graph: Graph              # configs, labels, checkpoints, requests (local ids)
    input_offsets: np.ndarray  # local CSR, n+1
    inputs: np.ndarray         # global ids
    consumer_offsets: np.ndarray
    consumers: np.ndarray      # global ids, within this segment (-1: edge removed)
    pruned: bool = False       # some consumer edge was removed

    def drop_consumer(self, producer: int, consumer: int) -> bool:
        """Remove one edge producer -> consumer from the consumer CSR (True if found)."""
        local = producer - self.base
        lo, hi = self.consumer_offsets[local], self.consumer_offsets[local + 1]
        hit = np.flatnonzero(self.consumers[lo:hi] == consumer)
        if not len(hit):
            return False
        self.consumers[lo + hit[0]] = -1
        self.pruned = True
        return True

    @property
    def has_named_requests(self) -> bool:
        """Some task asks for a named resource besides cpus."""
        return any(set(r) - {"cpus"} for r in self.graph.requests)

    @property
    def n(self) -> int:
        return len(self.input_offsets) - 1

    @classmethod
    def build(cls, index: int, base: int, graph: Graph, global_inputs: np.ndarray,
              input_offsets: np.ndarray) -> "Segment":
        n = len(input_offsets) - 1
        if not len(global_inputs):   # no inputs at all (a job of sources): no consumers
            return cls(index, base, graph, input_offsets, global_inputs,
                       np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        owners = np.repeat(np.arange(base, base + n, dtype=np.int64), np.diff(input_offsets))
        local = global_inputs - base
        inside = (local >= 0) & (local < n)
        order = np.argsort(local[inside], kind="stable")
        counts = np.bincount(local[inside], minlength=n)[:n] if inside.any() else np.zeros(n, np.int64)
        return cls(index, base, graph, input_offsets, global_inputs,
                   offsets_from_lengths(counts), owners[inside][order])


def distinct(values: np.ndarray) -> np.ndarray:
    """np.unique of ids, by sorting: numpy 2's hashing np.unique takes seconds on a
    million ids where a sort takes milliseconds."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - offsets_from_lengths(lengths)[:-1], lengths)
    return np.arange(total, dtype=np.int64) + shift


class SegmentIndex:
    """Which segment holds a global id, and CSR gathers across segments."""

    def __init__(self):
        self.segments: list[Segment | None] = []
        self._bases = np.zeros(64, dtype=np.int64)   # grows by doubling: a job per submit

    @property
    def bases(self) -> np.ndarray:
        return self._bases[:len(self.segments)]

    def add(self, segment: Segment) -> None:
        k = len(self.segments)
        if k == len(self._bases):
            self._bases = np.concatenate([self._bases, np.zeros(k, dtype=np.int64)])
        self._bases[k] = segment.base
        self.segments.append(segment)

    def retire(self, index: int) -> None:
        """Forget a segment whose tasks are all done with (its base stays, so later
        lookups still find their own segments)."""
        self.segments[index] = None

    def of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bases, ids, side="right") - 1

    def _gather(self, ids: np.ndarray, offsets_name: str, values_name: str, per_slot: bool):
        if len(ids) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return (empty, empty) if per_slot else empty
        seg_ids = self.of(ids)
        first = seg_ids[0]
        present = (first,) if (seg_ids == first).all() else np.unique(seg_ids)
        values, owners = [], []
        for s in present:
            seg = self.segments[s]
            if not len(getattr(seg, values_name)):   # e.g. a segment of sources has no inputs
                continue
            mine = ids if len(present) == 1 else ids[seg_ids == s]
            offsets = getattr(seg, offsets_name)
            local = mine - seg.base
            starts, ends = offsets[local], offsets[local + 1]
            values.append(getattr(seg, values_name)[ranges(starts, ends)])
            if per_slot:
                owners.append(np.repeat(mine, ends - starts))
        empty = np.zeros(0, dtype=np.int64)
        values = values[0] if len(values) == 1 else np.concatenate(values) if values else empty
        if not per_slot:
            return values
        return values, owners[0] if len(owners) == 1 else np.concatenate(owners) if owners else empty

    def inputs_of(self, ids: np.ndarray, per_slot: bool = False):
        """Input ids (one per slot) of ``ids``; with per_slot also the consumer of each."""
        return self._gather(ids, "input_offsets", "inputs", per_slot)

    def consumers_of(self, ids: np.ndarray, per_slot: bool = False):
        """Consumer ids within the same segments (one per input slot; removed edges left
        out); with per_slot also the producer of each."""
        out = self._gather(ids, "consumer_offsets", "consumers", per_slot)
        consumers = out[0] if per_slot else out
        if len(consumers) and consumers.min() < 0:
            keep = consumers >= 0
            return (consumers[keep], out[1][keep]) if per_slot else consumers[keep]
        return out

    def task_inputs(self, task_id: int) -> np.ndarray:
        seg, local = self.locate(task_id)
        return seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]]

    def task_consumers(self, task_id: int) -> np.ndarray:
        seg, local = self.locate(task_id)
        out = seg.consumers[seg.consumer_offsets[local]:seg.consumer_offsets[local + 1]]
        return out[out >= 0] if seg.pruned else out

    def locate(self, task_id: int) -> tuple[Segment, int]:
        k = int(np.searchsorted(self.bases, task_id, side="right")) - 1
        seg = self.segments[k]
        return seg, task_id - seg.base
