"""Segments: the rows of one submission (or one run-time growth) of a job, their inputs
and consumers in CSR form, and the map between rows and global ids.

Inside the core a task is its *row* in the task table (``core.tasktable``); outside it
is its *global id*: 64-bit, handed out in increasing order (``next_gid``), never reused.
Rows are reused: a retired segment gives its rows back and a later segment takes them.

Invariants:
- A live segment holds rows ``base .. base+n-1`` and global ids ``gid .. gid+n-1``; the
  global id of a row is ``row - base + gid`` of its segment (``ids_of``, through the
  ``segment`` column and ``offset``), and ``rows_of`` is its inverse on the ids of live
  segments: -1 for any other id (retired, never handed out, negative), so a late
  message naming a retired task never reaches the row a newer task took.
- ``segments[k]`` is the live segment of slot k, or None (a retired segment's slot, until
  a new segment takes it); ``cols.segment[row]`` is the slot of each row in use.
- Inputs and consumers are stored in CSR form as rows. Consumers from another segment
  (a future used by a later job, an expansion) are kept in ``extra_consumers``
  (core.graphstate); a consumer edge removed at run time is -1 in the CSR and never
  returned.
- ``_gid``/``_row``/``_n``/``_slot`` list the live segments in increasing global id
  (retired ones with n 0 until they are compacted away).
- A segment keeps of its graph what tasks need when they are sent and what a journal
  snapshot needs (``SegmentInfo``: configs, flags, labels, requests, checkpoints); task
  types are the ``symbol`` column, inputs the segment's CSR (``SegmentInfo.graph``
  rebuilds the graph from them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph, VarBytes, distinct, offsets_from_lengths  # noqa: F401  (distinct: tasktable's)

EMPTY = np.zeros(0, dtype=np.int64)


def ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every pair, vectorised."""
    lengths = ends - starts
    if len(lengths) > 1:   # (all of one length: a chain's or a tree's CSR rows, no repeat)
        shortest = int(lengths.min())
        if shortest == int(lengths.max()) and shortest <= 2:
            starts = starts.astype(np.int64)
            return starts if shortest == 1 else starts[:0] if not shortest else \
                np.stack([starts, starts + 1], axis=1).ravel()
    total = int(lengths.sum())
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - offsets_from_lengths(lengths)[:-1], lengths)
    return np.arange(total, dtype=np.int64) + shift


def narrow(values: np.ndarray) -> np.ndarray:
    """An index array as int32 when its values fit (rows and local offsets mostly do); an
    int32 array as it is (the graph reader's columns are shared, not copied)."""
    if values.dtype == np.int32 or not len(values):
        return values.astype(np.int32, copy=False)
    return values.astype(np.int32) if -1 <= values.min() and values.max() < (1 << 31) else values


class SegmentInfo:
    """What the server keeps of a segment's graph after it was added: per task its
    config, label, request, checkpoint path, flags and priority (``Graph``'s accessors)."""

    __slots__ = ("configs", "flags", "label_codes", "labels", "request_codes", "requests", "checkpoints",
                 "metadata", "priorities")

    def __init__(self, graph: Graph):
        self.configs = VarBytes(narrow(graph.configs.offsets), graph.configs.data)
        self.flags = graph.flags if graph.flags.any() else None
        codes = graph.label_codes
        self.label_codes = codes if codes is not None and len(codes) and codes.any() else None
        self.labels = graph.labels
        codes = graph.request_codes
        self.request_codes = codes if len(codes) and codes.any() else None
        self.requests = graph.requests
        self.checkpoints = graph.checkpoints
        self.metadata = graph.metadata
        self.priorities = graph.priorities

    def label(self, i: int) -> str | None:
        code = 0 if self.label_codes is None else int(self.label_codes[i])
        return self.labels[code - 1] if code else None

    def request(self, i: int) -> dict | None:
        code = 0 if self.request_codes is None else int(self.request_codes[i])
        return self.requests[code - 1] if code else None

    def checkpoint(self, i: int) -> str | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints[i].decode() or None

    def nbytes(self) -> int:
        return self.configs.offsets.nbytes + len(self.configs.data) + sum(
            x.nbytes for x in (self.flags, self.label_codes, self.request_codes, self.priorities) if x is not None)

    def graph(self, seg: "Segment", symbols: list[str], symbol_codes: np.ndarray, rows_of) -> Graph:
        """The segment's graph as it was submitted (for a journal snapshot): types from
        the ``symbol`` column (``symbol_codes``: its segment's part), inputs from the
        CSR; an input in another segment is the FUTURE task (of this segment) naming it."""
        n = seg.n
        codes, types = np.unique(symbol_codes, return_inverse=True)
        names = [symbols[k] for k in codes.tolist()]
        inputs = seg.inputs.astype(np.int64) - seg.base
        outside = np.flatnonzero((inputs < 0) | (inputs >= n))
        if len(outside):
            futures = np.flatnonzero(types == names.index(S.FUTURE)) if S.FUTURE in names else np.zeros(0, np.int64)
            targets = rows_of(np.array([S.decode_u64(self.configs[int(i)]) for i in futures], dtype=np.int64))
            alias = dict(zip(targets.tolist()[::-1], futures.tolist()[::-1]))   # (the first, if several)
            inputs[outside] = [alias[r] for r in (inputs[outside] + seg.base).tolist()]
        return Graph(names, types.astype(np.uint16), seg.input_offsets.astype(np.int64), inputs,
                     VarBytes(self.configs.offsets.astype(np.int64), self.configs.data),
                     self.flags if self.flags is not None else np.zeros(n, np.uint8),
                     self.request_codes if self.request_codes is not None else np.zeros(n, np.uint16),
                     self.requests, self.label_codes, self.labels, self.checkpoints, self.metadata, self.priorities)


@dataclass(eq=False)
class Segment:
    index: int                 # its slot in SegmentIndex.segments
    base: int                  # its first row
    gid: int                   # the global id of its first task
    job: int
    graph: SegmentInfo         # configs, labels, checkpoints, requests (local ids)
    input_offsets: np.ndarray  # local CSR, n+1
    inputs: np.ndarray         # rows
    consumer_offsets: np.ndarray
    consumers: np.ndarray      # rows, within this segment (-1: edge removed)
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

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.input_offsets, self.inputs, self.consumer_offsets, self.consumers)) \
            + self.graph.nbytes()

    @classmethod
    def build(cls, index: int, base: int, gid: int, job: int, graph: SegmentInfo, rows: np.ndarray,
              input_offsets: np.ndarray) -> "Segment":
        """``rows``: the input rows, one per slot; ``input_offsets``: local CSR."""
        n = len(input_offsets) - 1
        offsets = narrow(input_offsets)
        rows = np.asarray(rows)
        rows = narrow(rows if rows.dtype in (np.int32, np.int64) else rows.astype(np.int64))
        if not len(rows):   # no inputs at all (a job of sources): no consumers
            return cls(index, base, gid, job, graph, offsets, rows, np.zeros(n + 1, dtype=np.int32), rows)
        local = rows - rows.dtype.type(base)   # (the widths of rows: base is a row too)
        inside = (local >= 0) & (local < n)
        if not inside.all():
            local = local[inside]
        counts = np.bincount(local, minlength=n)[:n] if len(local) else np.zeros(n, np.int64)
        consumer_offsets = narrow(offsets_from_lengths(counts, compact=True))
        del counts
        order = narrow(np.argsort(local, kind="stable"))
        del local
        owners = np.repeat(np.arange(base, base + n, dtype=rows.dtype), np.diff(offsets))
        if not inside.all():
            owners = owners[inside]
        consumers = owners[order]
        del owners, order
        return cls(index, base, gid, job, graph, offsets, rows, consumer_offsets, consumers)


class SegmentIndex:
    """The live segments (slots reused), which segment holds a row, CSR gathers across
    segments, and the map between rows and global ids."""

    def __init__(self, cols):
        self.cols = cols
        self.segments: list[Segment | None] = []
        self.free_slots: list[int] = []
        self.offset = np.zeros(64, dtype=np.int64)   # per slot: gid - base
        self.next_gid = 0
        self._gid = np.zeros(64, dtype=np.int64)
        self._row = np.zeros(64, dtype=np.int64)
        self._n = np.zeros(64, dtype=np.int64)
        self._slot = np.zeros(64, dtype=np.int64)
        self._count = 0
        self._dead = 0
        self.shifted = 0   # live segments whose rows are not their global ids

    @property
    def identity(self) -> bool:
        """Every live row is its own global id (no segment took reused rows yet)."""
        return self.shifted == 0

    def new_slot(self) -> int:
        return self.free_slots[-1] if self.free_slots else len(self.segments)

    def skip_to(self, gid: int) -> None:
        """Global ids below ``gid`` are taken (a restored server takes its jobs' back)."""
        self.next_gid = max(self.next_gid, int(gid))

    def add(self, segment: Segment) -> None:
        k = segment.index
        if self.free_slots and self.free_slots[-1] == k:
            self.free_slots.pop()
            self.segments[k] = segment
        else:
            assert k == len(self.segments)
            self.segments.append(segment)
            if k >= len(self.offset):
                self.offset = np.concatenate([self.offset, np.zeros(k + 1, dtype=np.int64)])
                self.cols.segment_job = np.concatenate([self.cols.segment_job, np.zeros(k + 1, dtype=np.int64)])
        assert segment.gid >= self.next_gid, "global ids are never reused"
        self.offset[k] = segment.gid - segment.base
        self.shifted += segment.gid != segment.base
        self.cols.segment_job[k] = segment.job
        self.next_gid = segment.gid + segment.n
        if self._count == len(self._gid):
            self._gid, self._row, self._n, self._slot = (np.concatenate([a, np.zeros(len(a), np.int64)])
                                                         for a in (self._gid, self._row, self._n, self._slot))
        m = self._count
        self._gid[m], self._row[m], self._n[m], self._slot[m] = segment.gid, segment.base, segment.n, k
        self._count += 1

    def retire(self, index: int) -> None:
        """Forget a segment whose tasks are all done with; its rows go back to the table."""
        seg = self.segments[index]
        self.segments[index] = None
        self.shifted -= seg.gid != seg.base
        self.free_slots.append(index)
        self.cols.release(seg.base, seg.n)
        m = self._count
        k = int(np.searchsorted(self._gid[:m], seg.gid, side="left"))
        while k < m and self._slot[k] != index:
            k += 1
        if k < m:
            self._n[k] = 0
            self._slot[k] = -1
            self._dead += 1
        if self._dead > max(16, m // 2):
            live = np.flatnonzero(self._slot[:m] >= 0)
            c = len(live)
            for a in (self._gid, self._row, self._n, self._slot):
                a[:c] = a[live]
            self._count, self._dead = c, 0

    def live(self):
        return (seg for seg in self.segments if seg is not None)

    # ------------------------------------------------------------------ global ids
    def ids_of(self, rows) -> np.ndarray:
        """The global id of each row (rows of live segments)."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows + self.offset[self.cols.segment[rows]] if rows.size else rows

    def id_of(self, row: int) -> int:
        return int(row) + int(self.offset[self.cols.segment[row]])

    def rows_of(self, ids) -> np.ndarray:
        """The row of each global id; -1 for an id of no live task."""
        ids = np.asarray(ids)
        if ids.dtype != np.int64:
            ids = ids.astype(np.int64) if ids.dtype.kind in "iu" and ids.size else \
                np.zeros(ids.shape, np.int64) - 1
        m = self._count
        if not ids.size or not m:
            return np.full(ids.shape, -1, dtype=np.int64)
        if ids.shape == (1,):   # (most reports name one task: no vector work)
            t = int(ids[0])
            k = max(int(self._gid[:m].searchsorted(t, "right")) - 1, 0)
            offset = t - int(self._gid[k])
            return np.array([int(self._row[k]) + offset if 0 <= offset < int(self._n[k]) else -1], dtype=np.int64)
        k = np.maximum(np.searchsorted(self._gid[:m], ids, side="right") - 1, 0)
        offset = ids - self._gid[k]
        ok = (offset >= 0) & (offset < self._n[k])
        return np.where(ok, self._row[k] + offset, -1)

    def row_of(self, task_id) -> int:
        """The row of one global id (an int), -1 if it names no live task."""
        if type(task_id) is not int and not isinstance(task_id, np.integer):
            return -1
        if not -(1 << 63) <= int(task_id) < (1 << 63):
            return -1
        return int(self.rows_of(np.array([int(task_id)], dtype=np.int64))[0])

    # ------------------------------------------------------------------ structure
    def of(self, rows: np.ndarray) -> np.ndarray:
        return self.cols.segment[rows]

    def _gather(self, ids: np.ndarray, offsets_name: str, values_name: str, per_slot: bool):
        if len(ids) == 0:
            return (EMPTY, EMPTY) if per_slot else EMPTY
        if len(ids) == 1:   # (most reports and rounds of small jobs: no vector work)
            seg, local = self.locate(int(ids[0]))
            values = getattr(seg, values_name)
            if not len(values):   # e.g. a segment of sources has no inputs
                return (EMPTY, EMPTY) if per_slot else EMPTY
            offsets = getattr(seg, offsets_name)
            lo, hi = int(offsets[local]), int(offsets[local + 1])
            values = values[lo:hi].astype(np.int64)
            return (values, np.repeat(ids, hi - lo)) if per_slot else values
        seg = self.whole(ids)
        if seg is not None:   # a whole segment (as at submit): its CSR itself, read-only
            values = getattr(seg, values_name).view()
            values.flags.writeable = False
            if not per_slot:
                return values
            return values, np.repeat(ids, np.diff(getattr(seg, offsets_name)))
        seg_ids = self.of(ids)
        first = seg_ids[0]
        present = (first,) if (seg_ids == first).all() else distinct(seg_ids)
        values, owners = [], []
        for s in present:
            seg = self.segments[s]
            if not len(getattr(seg, values_name)):   # e.g. a segment of sources has no inputs
                continue
            mine = ids if len(present) == 1 else ids[seg_ids == s]
            offsets = getattr(seg, offsets_name)
            local = mine - seg.base
            starts, ends = offsets[local].astype(np.int64), offsets[local + 1].astype(np.int64)
            values.append(getattr(seg, values_name)[ranges(starts, ends)].astype(np.int64))
            if per_slot:
                owners.append(np.repeat(mine, ends - starts))
        values = values[0] if len(values) == 1 else np.concatenate(values) if values else EMPTY
        if not per_slot:
            return values
        return values, owners[0] if len(owners) == 1 else np.concatenate(owners) if owners else EMPTY

    def whole(self, ids: np.ndarray) -> Segment | None:
        """The segment whose rows ``ids`` are, all of them in order; else None."""
        if not len(ids):
            return None
        seg = self.segments[self.cols.segment[ids[0]]]
        if seg is None or len(ids) != seg.n or ids[0] != seg.base or ids[-1] != seg.base + seg.n - 1:
            return None
        return seg if len(ids) < 3 or (ids[1:] > ids[:-1]).all() else None

    def inputs_of(self, ids: np.ndarray, per_slot: bool = False):
        """Input rows (one per slot) of ``ids``; with per_slot also the consumer of each."""
        return self._gather(ids, "input_offsets", "inputs", per_slot)

    def consumers_of(self, ids: np.ndarray, per_slot: bool = False):
        """Consumer rows within the same segments (one per input slot; removed edges left
        out); with per_slot also the producer of each."""
        out = self._gather(ids, "consumer_offsets", "consumers", per_slot)
        consumers = out[0] if per_slot else out
        if len(consumers) and consumers.min() < 0:
            keep = consumers >= 0
            return (consumers[keep], out[1][keep]) if per_slot else consumers[keep]
        return out

    def input_counts(self, ids: np.ndarray) -> np.ndarray:
        """How many input slots each of ``ids`` has (int64)."""
        out = np.empty(len(ids), dtype=np.int64)
        if not len(ids):
            return out
        seg_ids = self.of(ids)
        present = (int(seg_ids[0]),) if (seg_ids == seg_ids[0]).all() else distinct(seg_ids).tolist()
        for s in present:
            mine = slice(None) if len(present) == 1 else seg_ids == s
            seg = self.segments[s]
            local = ids[mine] - seg.base
            out[mine] = seg.input_offsets[local + 1] - seg.input_offsets[local]
        return out

    def task_inputs(self, task_id: int) -> np.ndarray:
        seg, local = self.locate(task_id)
        return seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]].astype(np.int64)

    def task_consumers(self, task_id: int) -> np.ndarray:
        seg, local = self.locate(task_id)
        out = seg.consumers[seg.consumer_offsets[local]:seg.consumer_offsets[local + 1]].astype(np.int64)
        return out[out >= 0] if seg.pruned else out

    def locate(self, task_id: int) -> tuple[Segment, int]:
        seg = self.segments[self.cols.segment[task_id]]
        return seg, int(task_id) - seg.base

