"""The columnar task graph: one numpy array per attribute, indexed by task id.

Invariants:
- Task ids are 0..n-1; inputs are stored in CSR form: the inputs of task i are
  ``inputs[input_offsets[i]:input_offsets[i+1]]`` (repeats allowed, order kept). Id and
  offset columns are int64, or int32 where the file reader found that they fit (half
  the memory); code that adds to them widens them first.
- Variable-length attributes (configs, checkpoint paths, metadata) are a ``VarBytes``:
  one bytes buffer plus n+1 offsets (made from a list with a large item, the buffer is
  joined only when first read). Labels and resource requests are dictionary coded:
  code 0 means "none", code k means ``table[k-1]``.
- A Graph is never mutated after construction; ``concat`` builds a new one with the ids
  of later graphs offset so they never clash.
- ``validate()`` either returns or raises GraphError naming the first offending task;
  it never raises anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from graphfmt import symbols as S

FLAG_RESULT = 1
PRIORITY_LIMIT = (1 << 31) - 1   # user priorities are int32 (the smallest value is kept free)


class GraphError(Exception):
    """A graph (or graph file) is not valid; the message names what is wrong. ``task``
    is the id of the task at fault when the problem belongs to one task (a malformed
    config, a bad checkpoint path), else None."""

    def __init__(self, message: str, task: int | None = None):
        super().__init__(message)
        self.task = task


LARGE_ITEM = 1 << 16   # (a VarBytes item this large is not copied into a joined buffer early)


class VarBytes:
    """n byte strings stored as one buffer plus n+1 offsets (int64, or int32 as the
    graph file reader gives them when the buffer is under 2 GiB). Made from a list with
    a large item (a 10 MB const), the buffer is joined only when first asked for: a graph
    file is written from the items (``pieces``), the large one by reference."""

    __slots__ = ("offsets", "_data", "_items")

    def __init__(self, offsets: np.ndarray, data: bytes):
        self.offsets = offsets
        self._data = data
        self._items: list | None = None

    @property
    def data(self):
        if self._items is not None:   # (joined once, when something needs the buffer)
            self._data, self._items = b"".join(self._items), None
        return self._data

    @classmethod
    def from_list(cls, items: list[bytes]) -> "VarBytes":
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        if not len(items) or int(lengths.max()) < LARGE_ITEM:
            return cls(offsets_from_lengths(lengths), b"".join(items))
        out = cls(offsets_from_lengths(lengths), None)
        out._items = list(items)
        return out

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, data: bytes, compact: bool = False) -> "VarBytes":
        return cls(offsets_from_lengths(lengths, compact), data)

    @classmethod
    def empty(cls, n: int) -> "VarBytes":
        return cls(np.zeros(n + 1, dtype=np.int64), b"")

    def pieces(self, start: int, end: int) -> list:
        """The bytes of items [start, end) as buffers whose join they are: the small
        items joined, a large one as it is (no copy)."""
        if self._items is None:
            return [memoryview(self._data)[self.offsets[start]:self.offsets[end]]]
        out, run = [], []
        for item in self._items[start:end]:
            if len(item) >= LARGE_ITEM:
                if run:
                    out.append(b"".join(run))
                    run = []
                out.append(item)
            elif item:
                run.append(item)
        if run:
            out.append(b"".join(run))
        return out

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> bytes:
        return bytes(self.data[self.offsets[i]:self.offsets[i + 1]])

    def view(self, i: int) -> memoryview:
        """Item i without a copy (a 10 MB const's config is not copied to learn its length)."""
        return memoryview(self.data)[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def total(self) -> int:
        return int(self.offsets[-1])

    def take(self, ids: np.ndarray) -> "VarBytes":
        view = memoryview(self.data)
        return VarBytes.from_list([view[self.offsets[i]:self.offsets[i + 1]].tobytes() for i in ids])

    @staticmethod
    def concat(parts: list["VarBytes"]) -> "VarBytes":
        lengths = np.concatenate([p.lengths() for p in parts]) if parts else np.zeros(0, np.int64)
        return VarBytes.from_lengths(lengths, b"".join(bytes(p.data) for p in parts))


def distinct(values: np.ndarray) -> np.ndarray:
    """np.unique of ids, by sorting: numpy 2's hashing np.unique takes seconds on a
    million ids where a sort takes milliseconds, and a plain np.unique imports numpy.ma on
    its first call (~20 ms, paid by a process's first job)."""
    values = np.sort(values)
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _first_of_each_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct (a, b) pair, in order (what
    np.unique(axis=1, return_index=True) gives, without its cost: ~100 us for 1,000 pairs)."""
    order = np.lexsort((b, a))   # (stable: the first of equal pairs comes first)
    a, b = a[order], b[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return np.sort(order[first])


def offsets_from_lengths(lengths: np.ndarray, compact: bool = False) -> np.ndarray:
    """n+1 offsets of n lengths: int64, or with ``compact`` int32 when the total fits."""
    dtype = np.int32 if compact and int(np.sum(lengths, dtype=np.int64)) < (1 << 31) else np.int64
    offsets = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


@dataclass(eq=False)
class Graph:
    symbols: list[str]
    types: np.ndarray            # uint16 symbol codes
    input_offsets: np.ndarray    # int64, n+1 (int32 from the file reader when they fit)
    inputs: np.ndarray           # int64 task ids (int32 from the file reader when they fit)
    configs: VarBytes
    flags: np.ndarray            # uint8, FLAG_RESULT
    request_codes: np.ndarray    # uint16, 0 = no request
    requests: list[dict] = field(default_factory=list)
    label_codes: np.ndarray | None = None   # uint32, 0 = no label
    labels: list[str] = field(default_factory=list)
    checkpoints: VarBytes | None = None     # UTF-8 absolute paths, b"" = none
    metadata: VarBytes | None = None        # msgpack values, b"" = none
    priorities: np.ndarray | None = None    # int32 user priorities (higher first), None = all 0

    def __post_init__(self):
        if self.label_codes is None:
            self.label_codes = np.zeros(len(self.types), dtype=np.uint32)

    # --- construction -------------------------------------------------------------
    @classmethod
    def empty(cls) -> "Graph":
        return cls([], np.zeros(0, np.uint16), np.zeros(1, np.int64), np.zeros(0, np.int64),
                   VarBytes.empty(0), np.zeros(0, np.uint8), np.zeros(0, np.uint16))

    @staticmethod
    def concat(graphs: list["Graph"]) -> "Graph":
        """One graph holding all tasks of ``graphs`` in order; ids of each later graph
        are offset by the task count before it. Tables are merged by value."""
        graphs = [g for g in graphs if len(g)] or graphs[:1]
        if not graphs:
            return Graph.empty()
        if len(graphs) == 1:
            return graphs[0]
        symbols: list[str] = []
        labels: list[str] = []
        requests: list[dict] = []
        types, inputs, counts, flags, rcodes, lcodes = [], [], [], [], [], []
        base = 0
        for g in graphs:
            types.append(_recode(g.types, g.symbols, symbols, zero_is_none=False).astype(np.uint16))
            lcodes.append(_recode(g.label_codes, g.labels, labels, zero_is_none=True).astype(np.uint32))
            rcodes.append(_recode(g.request_codes, g.requests, requests, zero_is_none=True).astype(np.uint16))
            inputs.append(g.inputs.astype(np.int64) + base)
            counts.append(np.diff(g.input_offsets))
            flags.append(g.flags)
            base += len(g)
        n_by_graph = [len(g) for g in graphs]
        return Graph(
            symbols=symbols, types=np.concatenate(types),
            input_offsets=offsets_from_lengths(np.concatenate(counts)),
            inputs=np.concatenate(inputs), configs=VarBytes.concat([g.configs for g in graphs]),
            flags=np.concatenate(flags), request_codes=np.concatenate(rcodes), requests=requests,
            label_codes=np.concatenate(lcodes), labels=labels,
            checkpoints=_concat_optional([g.checkpoints for g in graphs], n_by_graph),
            metadata=_concat_optional([g.metadata for g in graphs], n_by_graph),
            priorities=np.concatenate([g.priorities if g.priorities is not None else np.zeros(len(g), np.int32)
                                       for g in graphs]) if any(g.priorities is not None for g in graphs) else None,
        )

    def deduplicated(self) -> "Graph":
        """The same graph with each symbol, label and request once in its table."""
        if all(len({table_key(v) for v in t}) == len(t) for t in (self.symbols, self.labels, self.requests)):
            return self
        symbols, labels, requests = [], [], []
        return replace(
            self, symbols=symbols, labels=labels, requests=requests,
            types=_recode(self.types, self.symbols, symbols, zero_is_none=False).astype(np.uint16),
            label_codes=_recode(self.label_codes, self.labels, labels, zero_is_none=True).astype(np.uint32),
            request_codes=_recode(self.request_codes, self.requests, requests, zero_is_none=True).astype(np.uint16))

    # --- per-task views (for reports and tests, not for hot paths) -------------------
    def __len__(self) -> int:
        return len(self.types)

    def symbol(self, i: int) -> str:
        return self.symbols[self.types[i]]

    def task_inputs(self, i: int) -> np.ndarray:
        return self.inputs[self.input_offsets[i]:self.input_offsets[i + 1]]

    def config(self, i: int) -> bytes:
        return self.configs[i]

    def label(self, i: int) -> str | None:
        code = int(self.label_codes[i])
        return self.labels[code - 1] if code else None

    def request(self, i: int) -> dict | None:
        code = int(self.request_codes[i])
        return self.requests[code - 1] if code else None

    def checkpoint(self, i: int) -> str | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints[i].decode() or None

    def result_ids(self) -> np.ndarray:
        return np.flatnonzero(self.flags & FLAG_RESULT)

    def describe(self, i: int) -> str:
        """'task 12 (loom/data/merge, label "x")' for error messages."""
        label = self.label(i)
        extra = f", label {label!r}" if label else ""
        return f"task {i} ({self.symbol(i)}{extra})"

    def type_codes(self, symbol: str) -> np.ndarray:
        """Boolean mask of the tasks with the given symbol."""
        if symbol not in self.symbols:
            return np.zeros(len(self), dtype=bool)
        return self.types == self.symbols.index(symbol)

    # --- structure ----------------------------------------------------------------
    def consumers(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR of consumers: consumers of task i are ``ids[offsets[i]:offsets[i+1]]``
        (a consumer appears once per input slot that uses i)."""
        n = len(self)
        owners = np.repeat(np.arange(n, dtype=np.int64), np.diff(self.input_offsets))
        order = np.argsort(self.inputs, kind="stable")
        offsets = offsets_from_lengths(np.bincount(self.inputs, minlength=n)[:n])
        return offsets, owners[order]

    def levels(self) -> np.ndarray:
        """Level of each task: 0 for tasks without inputs, else 1 + max input level.
        Raises GraphError naming a task on a cycle."""
        n = len(self)
        levels = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return levels
        remaining = np.diff(self.input_offsets).astype(np.int64)
        c_offsets, c_ids = self.consumers()
        frontier = np.flatnonzero(remaining == 0)
        level = 0
        while len(frontier):
            levels[frontier] = level
            starts, ends = c_offsets[frontier], c_offsets[frontier + 1]
            touched = c_ids[_ranges(starts, ends)]
            if len(touched) == 0:
                break
            np.subtract.at(remaining, touched, 1)
            touched = distinct(touched)
            frontier = touched[remaining[touched] == 0]
            level += 1
        if (levels < 0).any():
            raise GraphError(f"cycle through {self.describe(self._task_on_cycle(levels < 0))}")
        return levels

    def _task_on_cycle(self, stuck: np.ndarray) -> int:
        # Walk inputs among stuck tasks; every stuck task has a stuck input, so the
        # walk must revisit a task, and that task lies on a cycle.
        current = int(np.flatnonzero(stuck)[0])
        seen: set[int] = set()
        while current not in seen:
            seen.add(current)
            current = int(next(x for x in self.task_inputs(current) if stuck[x]))
        return current

    # --- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise GraphError naming the first problem. Columns and table codes are checked
        first, so that every later check may name tasks with ``describe``."""
        n = len(self)
        for name, column, length in (("input_offsets", self.input_offsets, n + 1),
                                     ("flags", self.flags, n), ("request_codes", self.request_codes, n),
                                     ("label_codes", self.label_codes, n)):
            if len(column) != length:
                raise GraphError(f"column {name} has {len(column)} entries, expected {length}")
        if len(self.configs) != n:
            raise GraphError(f"config column has {len(self.configs)} entries, expected {n}")
        for name, column in (("checkpoint", self.checkpoints), ("metadata", self.metadata),
                             ("priority", self.priorities)):
            if column is not None and len(column) != n:
                raise GraphError(f"{name} column has {len(column)} entries, expected {n}")
        if n == 0:
            return
        if self.input_offsets[0] != 0 or self.input_offsets[-1] != len(self.inputs) \
                or (np.diff(self.input_offsets) < 0).any():
            raise GraphError("input offsets do not match the inputs column")
        # symbol codes count from 0; label and request codes from 1 (0: none)
        for what, codes, limit in (("symbol", self.types, len(self.symbols) - 1),
                                   ("label", self.label_codes, len(self.labels)),
                                   ("request", self.request_codes, len(self.requests))):
            bad = np.flatnonzero(codes > limit)
            if len(bad):
                raise GraphError(f"task {bad[0]}: {what} code {codes[bad[0]]} is not in the {what} table")
        if len(self.inputs):
            bad = np.flatnonzero((self.inputs < 0) | (self.inputs >= n))
            if len(bad):
                i = int(np.searchsorted(self.input_offsets, bad[0], side="right")) - 1
                raise GraphError(f"{self.describe(i)}: input {self.inputs[bad[0]]} does not exist (dangling input)")
            if not self._inputs_come_first():   # not topologically ordered: look for cycles
                self.levels()
        self._validate_configs()
        if self.checkpoints is not None:
            for i in np.flatnonzero(self.checkpoints.lengths()):
                path = self.checkpoints[i]
                try:
                    path.decode()
                except UnicodeDecodeError:
                    raise GraphError(f"{self.describe(i)}: checkpoint path is not UTF-8", int(i)) from None
                if not path.startswith(b"/"):
                    raise GraphError(f"{self.describe(i)}: checkpoint path is not absolute", int(i))

    def _inputs_come_first(self, block: int = 1 << 16) -> bool:
        """Every input id is below its consumer's (checked a block of tasks at a time:
        the memory of a large graph's check stays small)."""
        offsets, inputs = self.input_offsets, self.inputs
        for t0 in range(0, len(self), block):
            t1 = min(t0 + block, len(self))
            owners = np.repeat(np.arange(t0, t1, dtype=np.int64), np.diff(offsets[t0:t1 + 1]))
            if (inputs[offsets[t0]:offsets[t1]] >= owners).any():
                return False
        return True

    def _validate_configs(self) -> None:
        counts = np.diff(self.input_offsets)
        lengths = self.configs.lengths()
        for code, symbol in enumerate(self.symbols):
            ids = np.flatnonzero(self.types == code)
            if not len(ids):
                continue
            if not S.is_known(symbol):
                raise GraphError(f"task {ids[0]}: unknown symbol {symbol!r}", int(ids[0]))
            # only the checks of programs and file names read a config's content; the
            # others read its length, which is all they are keyed by (and given a view
            # for: no copy, no hash of a large config)
            content = symbol in S.CONTENT_CHECKED
            if content or len(ids) <= 16:   # content checks, or few
                candidates = ids
            else:   # arity and length checks are the same for every task of the type
                candidates = ids[_first_of_each_pair(counts[ids], lengths[ids])]
            checked = set()   # (the checks depend on the arity and the config only; bounded memory)
            for i in candidates.tolist():
                config = self.configs[i] if content else self.configs.view(i)
                key = (int(counts[i]), config if content else len(config))
                if key in checked:
                    continue
                if len(checked) < 4096:
                    checked.add(key)
                problem = S.check_config(symbol, key[0], config)
                if problem:
                    raise GraphError(f"{self.describe(i)}: {problem}", i)

    # --- summaries ----------------------------------------------------------------
    def stats(self) -> dict:
        n = len(self)
        per_type = np.bincount(self.types, minlength=len(self.symbols)) if n else np.zeros(0, int)
        counts = {self.symbols[c]: int(k) for c, k in enumerate(per_type) if k}
        levels = self.levels()
        path = self.critical_path(levels)
        return {
            "tasks": n,
            "types": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "results": int(np.count_nonzero(self.flags & FLAG_RESULT)),
            "sources": int(np.count_nonzero(np.diff(self.input_offsets) == 0)),
            "sinks": int(n - np.count_nonzero(np.bincount(self.inputs, minlength=n))) if n else 0,
            "edges": int(len(self.inputs)),
            "depth": int(levels.max() + 1) if n else 0,
            "critical_path_length": len(path),
            "critical_path": [int(x) for x in path[:20]],
            "config_bytes": self.configs.total(),
            "cpu_requests": int(np.count_nonzero(self.request_codes)),
            "checkpoints": int(np.count_nonzero(self.checkpoints.lengths())) if self.checkpoints is not None else 0,
        }

    def critical_path(self, levels: np.ndarray | None = None) -> list[int]:
        """A longest chain of tasks (every task counts 1), from a source to a sink."""
        if len(self) == 0:
            return []
        levels = self.levels() if levels is None else levels
        current = int(np.argmax(levels))
        path = [current]
        while levels[current] > 0:
            ins = self.task_inputs(current)
            current = int(ins[np.argmax(levels[ins])])
            path.append(current)
        return path[::-1]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts - offsets_from_lengths(lengths)[:-1], lengths)
    return np.arange(total, dtype=np.int64) + shift


def _recode(codes: np.ndarray, table: list, merged: list, zero_is_none: bool) -> np.ndarray:
    """Map codes of ``table`` into ``merged`` (extended in place, deduplicated by value)."""
    keys = {table_key(v): i for i, v in enumerate(merged)}
    mapping = []
    for value in table:
        k = table_key(value)
        if k not in keys:
            keys[k] = len(merged)
            merged.append(value)
        mapping.append(keys[k])
    if zero_is_none:
        lut = np.array([0] + [m + 1 for m in mapping], dtype=np.int64)
    else:
        lut = np.array(mapping or [0], dtype=np.int64)
    return lut[codes] if len(codes) else codes.astype(np.int64)


def table_key(value):
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def _concat_optional(parts: list[VarBytes | None], sizes: list[int]) -> VarBytes | None:
    if all(p is None for p in parts):
        return None
    return VarBytes.concat([p if p is not None else VarBytes.empty(n) for p, n in zip(parts, sizes)])
