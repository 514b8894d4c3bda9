"""The server's task graph: columns, segments, run-time overrides and the edges between
tasks, all by row (``ids_of``/``rows_of`` map rows to the global ids the world knows and
back, see core.segments). Structure only: task states, holds and remaining counts are kept by
``core.transitions``, the one module that writes them.

Invariants (``check`` verifies them; the core's tests call it after every step):
- ``inputs(t)`` is the override's inputs when t carries FLAG_OVERRIDE, else its
  segment's; ``consumers(t)`` lists each consumer once per input slot it has on t:
  the segment CSR for consumers in t's own segment, ``extra_consumers[t]`` for the rest
  (consumers in later segments, and every consumer whose inputs were replaced).
- An edge p -> c exists exactly when p is an input of c (slot for slot):
  ``replace_inputs`` removes the old edges (the CSR entry becomes -1, or the entry of
  ``extra_consumers``) and adds the new ones to ``extra_consumers``.
- FLAG_EXTRA is set exactly on the tasks that have an ``extra_consumers`` entry.
- No edge and no side table names a free row: a retired segment's edges from other
  segments go (``detach``) and its side tables with it (``forget``) before its rows are
  given back.
"""

from __future__ import annotations

import numpy as np

from graphfmt.graph import Graph, VarBytes, offsets_from_lengths
from loomctl.core.segments import Segment, SegmentIndex, SegmentInfo
from loomctl.core.tasktable import FLAG_CHECKPOINT, FLAG_EXTRA, FLAG_OVERRIDE, TaskColumns

MAX_SYMBOLS = 1 << 16   # task types a server knows in its life (the symbol column is uint16)

EMPTY = np.zeros(0, dtype=np.int64)


def one_task_graph(symbol: str, config: bytes, n_inputs: int, request: dict | None = None,
                   label: str | None = None) -> Graph:
    """A graph of one task (its inputs are given as global ids to ``add_segment``)."""
    return Graph([symbol], np.zeros(1, np.uint16), offsets_from_lengths(np.array([n_inputs])),
                 np.zeros(n_inputs, np.int64), VarBytes.from_list([config]), np.zeros(1, np.uint8),
                 np.ones(1, np.uint16) if request else np.zeros(1, np.uint16), [request] if request else [],
                 np.ones(1, np.uint32) if label else None, [label] if label else [])


class TaskGraph:
    def __init__(self):
        self.cols = TaskColumns()
        self.segs = SegmentIndex(self.cols)
        self.symbols: list[str] = []
        self.symbol_codes: dict[str, int] = {}
        self.extra_consumers: dict[int, list[int]] = {}
        self.overrides: dict[int, tuple[str, bytes, np.ndarray]] = {}
        self.any_named_requests = False   # fast path: no task asked for more than cpus

    def code(self, symbol: str) -> int:
        code = self.symbol_codes.get(symbol)
        if code is None:
            if len(self.symbols) >= MAX_SYMBOLS:
                raise ValueError(f"this server knows {MAX_SYMBOLS} task types already; restart it for more")
            code = self.symbol_codes[symbol] = len(self.symbols)
            self.symbols.append(symbol)
        return code

    # ------------------------------------------------------------------ global ids
    def ids_of(self, rows) -> np.ndarray:
        return self.segs.ids_of(rows)

    def rows_of(self, ids) -> np.ndarray:
        return self.segs.rows_of(ids)

    def next_rows(self, n: int) -> int:
        """The first row the next ``add_segment`` of n tasks gets."""
        return self.cols.peek(n)

    # ------------------------------------------------------------------ growth
    def add_segment(self, graph: Graph, global_inputs: np.ndarray, job_id: int,
                    overrides: dict | None = None) -> Segment:
        """New rows and global ids for the tasks of ``graph`` (inputs already mapped to
        rows: its own from ``next_rows``), as one segment of ``job_id``; ``overrides`` maps
        local ids to (symbol, config, inputs) that replace theirs from the start
        (checkpoint loads). Edges from other segments are recorded in
        ``extra_consumers``. States, holds and remaining counts are the caller's
        (core.transitions.add_tasks)."""
        n = len(graph)
        c = self.cols
        lut = np.array([self.code(s) for s in graph.symbols] or [0], dtype=np.uint16)
        base = c.allocate(n)
        segment = Segment.build(self.segs.new_slot(), base, self.segs.next_gid, job_id, SegmentInfo(graph),
                                global_inputs, graph.input_offsets)
        self.segs.add(segment)
        self.any_named_requests |= segment.has_named_requests
        c.symbol[base:base + n] = lut[graph.types] if n else 0
        c.segment[base:base + n] = segment.index
        if len(graph.requests):
            per_code = np.array([0] + [int(r.get("cpus", 0)) for r in graph.requests])   # (code 0: none)
            c.cpus[base:base + n] = per_code[graph.request_codes]
        if graph.checkpoints is not None:
            c.flags[base:base + n] |= np.where(graph.checkpoints.lengths() > 0, FLAG_CHECKPOINT, 0).astype(np.uint8)
        external = (global_inputs < base) | (global_inputs >= base + n)
        if external.any():
            consumer_of_slot = np.repeat(np.arange(base, base + n, dtype=np.int64), np.diff(graph.input_offsets))
            for producer, consumer in zip(global_inputs[external].tolist(), consumer_of_slot[external].tolist()):
                self._add_extra(producer, consumer)
        for local, override in (overrides or {}).items():
            self.replace_inputs(base + local, *override)
        return segment

    def replace_inputs(self, t: int, symbol: str, config: bytes, inputs: np.ndarray) -> np.ndarray:
        """Task t becomes (symbol, config, inputs); its old edges go, the new ones come.
        Returns the old inputs."""
        old = self.inputs(t)
        for p in old.tolist():
            if not self._drop_extra(p, t):
                seg, _ = self.segs.locate(p)
                seg.drop_consumer(p, t)
        inputs = np.asarray(inputs, dtype=np.int64)
        self.overrides[t] = (symbol, config, inputs)
        self.cols.flags[t] |= FLAG_OVERRIDE
        for p in inputs.tolist():
            self._add_extra(p, t)
        return old

    def _add_extra(self, producer: int, consumer: int) -> None:
        self.extra_consumers.setdefault(producer, []).append(consumer)
        self.cols.flags[producer] |= FLAG_EXTRA

    def _drop_extra(self, producer: int, consumer: int) -> bool:
        """Remove the edge producer -> consumer from the extra consumers (True if it was one)."""
        extra = self.extra_consumers.get(producer)
        if not extra or consumer not in extra:
            return False
        extra.remove(consumer)
        if not extra:
            del self.extra_consumers[producer]
            self.cols.flags[producer] &= ~np.uint8(FLAG_EXTRA)
        return True

    def detach(self, lo: int, hi: int) -> None:
        """The edges from tasks outside rows lo <= row < hi to tasks inside go (the inside
        is retired: its rows will be other tasks')."""
        if not self.extra_consumers:
            return
        inputs, consumers = self.slots(np.arange(lo, hi, dtype=np.int64))
        outside = (inputs < lo) | (inputs >= hi)
        for p, t in zip(inputs[outside].tolist(), consumers[outside].tolist()):
            self._drop_extra(p, t)

    def forget(self, lo: int, hi: int) -> None:
        """Drop the side tables of the rows lo <= row < hi (their segment is retired)."""
        for table in (self.overrides, self.extra_consumers):
            if not table:
                continue
            keys = [k for k in table if lo <= k < hi] if len(table) < hi - lo else \
                [k for k in range(lo, hi) if k in table]
            for k in keys:
                del table[k]

    # ------------------------------------------------------------------ reading
    def inputs(self, t: int) -> np.ndarray:
        override = self.overrides.get(t)
        return override[2] if override is not None else self.segs.task_inputs(t)

    def task(self, t: int) -> tuple[str, bytes, np.ndarray]:
        """(symbol, config, inputs) of t as it runs (an override replaces them)."""
        override = self.overrides.get(t)
        if override is not None:
            return override
        seg, local = self.segs.locate(t)
        return self.symbols[self.cols.symbol[t]], seg.graph.configs[local], \
            seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]]

    def inputs_of(self, ids: np.ndarray) -> np.ndarray:
        """The inputs of ``ids``, one per slot."""
        c = self.cols
        if not self.overrides:
            return self.segs.inputs_of(ids)
        special = (c.flags[ids] & FLAG_OVERRIDE) > 0
        if not special.any():
            return self.segs.inputs_of(ids)
        inputs = self.segs.inputs_of(ids[~special])
        return np.concatenate([inputs] + [self.overrides[int(t)][2] for t in ids[special]])

    def slots(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input, consumer) per input slot of ``ids`` (sorted), ordered by consumer."""
        c = self.cols
        if not self.overrides:
            return self.segs.inputs_of(ids, per_slot=True)
        special = (c.flags[ids] & FLAG_OVERRIDE) > 0
        if not special.any():
            return self.segs.inputs_of(ids, per_slot=True)
        inputs, owners = self.segs.inputs_of(ids[~special], per_slot=True)
        extra_in = [self.overrides[int(t)][2] for t in ids[special]]
        extra_owner = [np.full(len(x), t) for x, t in zip(extra_in, ids[special].tolist())]
        inputs = np.concatenate([inputs, *extra_in]).astype(np.int64)
        owners = np.concatenate([owners, *extra_owner]).astype(np.int64)
        order = np.argsort(owners, kind="stable")
        return inputs[order], owners[order]

    def consumers(self, t: int) -> list[int]:
        return self.segs.task_consumers(t).tolist() + self.extra_consumers.get(t, [])

    def consumers_of(self, ids: np.ndarray) -> np.ndarray:
        """The consumers of ``ids``, one per input slot they have on them."""
        consumers = self.segs.consumers_of(ids)
        if not self.extra_consumers:
            return consumers
        extra = ids[(self.cols.flags[ids] & FLAG_EXTRA) > 0]
        if len(extra):
            more = [x for t in extra.tolist() for x in self.extra_consumers.get(t, ())]
            consumers = np.concatenate([consumers, np.array(more, dtype=np.int64)])
        return consumers

    def named_request(self, t: int) -> dict:
        if not self.any_named_requests:
            return {}
        seg, local = self.segs.locate(t)
        request = seg.graph.request(local) or {}
        return {k: v for k, v in request.items() if k != "cpus"}

    def label(self, t: int) -> str:
        seg, local = self.segs.locate(t)
        return seg.graph.label(local) or ""

    def unfinished_inputs(self, ids: np.ndarray, finished_state: int) -> np.ndarray:
        """Per task of ``ids``: how many input slots wait for an unfinished producer."""
        seg = self.segs.whole(ids)
        if seg is not None and (not self.overrides or not ((self.cols.flags[ids] & FLAG_OVERRIDE) > 0).any()):   # (at submit)
            if not len(seg.inputs):
                return np.zeros(len(ids), dtype=np.int32)
            pending = np.zeros(len(seg.inputs) + 1, dtype=np.int32)
            np.cumsum(self.cols.state[seg.inputs] != finished_state, out=pending[1:])
            return pending[seg.input_offsets[1:]] - pending[seg.input_offsets[:-1]]
        inputs, consumer = self.slots(ids)
        if not len(inputs):
            return np.zeros(len(ids), dtype=np.int32)
        pending = consumer[self.cols.state[inputs] != finished_state]
        first = int(ids[0])
        if len(ids) == 1 or (int(ids[-1]) - first == len(ids) - 1 and (np.diff(ids) == 1).all()):
            return np.bincount(pending - first, minlength=len(ids)).astype(np.int32)   # a range of ids
        order = np.argsort(ids)
        counts = np.zeros(len(ids), dtype=np.int32)
        np.add.at(counts, order[np.searchsorted(ids, pending, sorter=order)], 1)
        return counts

    def submitted_graph(self, segment: Segment) -> Graph:
        """The graph of a segment as it was added (journal snapshots)."""
        return segment.graph.graph(segment, self.symbols, self.cols.symbol[segment.base:segment.base + segment.n],
                                   self.rows_of)

    # ------------------------------------------------------------------ checks
    def held_ids(self) -> np.ndarray:
        """The rows of the segments not retired."""
        parts = [np.arange(seg.base, seg.base + seg.n) for seg in self.segs.live()]
        return np.concatenate(parts).astype(np.int64) if parts else EMPTY

    def check(self) -> None:
        """The module's invariants over the segments still held (for tests; slow)."""
        c = self.cols
        held = self.held_ids()
        alive = np.zeros(c.n, dtype=bool)
        alive[held] = True
        edges: dict[tuple[int, int], int] = {}
        listed: dict[tuple[int, int], int] = {}
        for t in held.tolist():
            for p in self.inputs(t).tolist():
                if alive[p]:
                    edges[(p, t)] = edges.get((p, t), 0) + 1
            for consumer in self.consumers(t):
                if alive[consumer]:
                    listed[(t, consumer)] = listed.get((t, consumer), 0) + 1
        assert edges == listed, "edges and consumer lists differ"
        flagged = set(held[(c.flags[held] & FLAG_EXTRA) > 0].tolist())
        assert flagged == {p for p in self.extra_consumers if alive[p]}, "FLAG_EXTRA"
        assert all(alive[p] for p in self.extra_consumers) and all(alive[t] for t in self.overrides), \
            "side tables name free rows"
        assert all(alive[t] for ts in self.extra_consumers.values() for t in ts), "an edge to a free row"
        for seg in self.segs.live():
            assert (c.segment[seg.base:seg.base + seg.n] == seg.index).all(), "segment column"
            rows = np.arange(seg.base, seg.base + seg.n)
            assert (self.rows_of(self.ids_of(rows)) == rows).all(), "rows and ids map both ways"
            assert seg.gid + seg.n <= self.segs.next_gid, "global ids handed out"
        assert c.used == len(held), "rows in use are the live segments'"
        assert c.used + sum(length for _, length in c.free) == c.n, "a row is in use or free"
        assert all(a + m < b for (a, m), (b, _) in zip(c.free, c.free[1:])), "free ranges apart, in order"
        assert not c.free or c.free[-1][0] + c.free[-1][1] < c.n, "no free range at the end"
        free = np.ones(c.n, dtype=bool)
        free[held] = False
        assert not (c.flags[:c.n][free].any() or c.holds[:c.n][free].any() or (c.owner[:c.n][free] >= 0).any()
                    or (c.worker[:c.n][free] >= 0).any()), "a free row holds nothing"

    def nbytes(self) -> int:
        """Bytes the graph keeps (columns, segments' CSR, side tables), roughly."""
        return self.cols.nbytes() + sum(seg.nbytes() for seg in self.segs.live()) \
            + 100 * (len(self.extra_consumers) + len(self.overrides))
