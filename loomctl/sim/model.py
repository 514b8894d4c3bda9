"""How long each task runs and how large its result is, in a simulation.

A rule applies to a task by its label group first, then by its task type, then ``*``.
Durations come from ``--duration`` rules, then from a trace of a real run
(``--durations-from``: the observed durations of that label group, or of that task type
for unlabelled tasks, drawn with replacement), else 0. Sizes come from ``--size``
rules, then from the trace's observed sizes, else from the plan where it determines
them (a const's config length; a merge or array/make: the sum of its inputs), else 0.

Invariants: every task of the plan gets its duration before the run, drawn from one
``numpy.random.Generator`` seeded with ``--seed``, rule by rule in a fixed order, so the
same seed gives the same durations; tasks added at run time (expansions) draw theirs
from the same generator when they start, in the simulation's deterministic event order.
"""

from __future__ import annotations

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph
from loomctl.sim.spec import Dist, SpecError, label_group

SUMMED = frozenset({S.MERGE, S.ARRAY_MAKE})


class TaskModel:
    def __init__(self, graph: Graph, durations: dict[str, Dist], sizes: dict[str, int], seed: int,
                 observed: dict | None = None):
        self.graph = graph
        self.rng = np.random.default_rng(seed)
        observed = observed or {"durations": {}, "sizes": {}}
        self.duration_rules = {**observed["durations"], **durations}
        self.size_rules: dict[str, object] = {**observed["sizes"], **sizes}
        n = len(graph)
        self.n = n
        lut = np.array([0] + [int((r or {}).get("cpus", 0)) for r in graph.requests], dtype=np.int64)
        self.cpus = lut[graph.request_codes]
        groups = [label_group(label) for label in graph.labels]   # per label code - 1
        self.task_group = np.array([""] + groups, dtype=object)[graph.label_codes] if n else np.zeros(0, object)
        self.task_symbol = np.array(graph.symbols, dtype=object)[graph.types] if n else np.zeros(0, object)
        self.duration = self._assign(self.duration_rules, lambda d, k: d.sample(self.rng, k), 0.0)
        self.size = self._assign(self.size_rules, self._sizes, -1).astype(np.int64)
        const = graph.type_codes(S.CONST) & (self.size < 0)
        self.size[const] = graph.configs.lengths()[const]
        self.extra_duration: dict[int, float] = {}

    def _assign(self, rules: dict, draw, default) -> np.ndarray:
        out = np.full(self.n, default, dtype=np.float64)
        done = np.zeros(self.n, dtype=bool)
        for column in (self.task_group, self.task_symbol):
            for key in sorted(k for k in rules if k != "*"):
                mask = ~done & (column == key)
                if mask.any():
                    out[mask] = draw(rules[key], int(mask.sum()))
                    done |= mask
        if "*" in rules and (~done).any():
            out[~done] = draw(rules["*"], int((~done).sum()))
        return out

    def _sizes(self, rule, k: int) -> np.ndarray:
        if isinstance(rule, tuple):    # observed sizes: drawn with replacement
            return np.asarray(rule, dtype=np.float64)[self.rng.integers(0, len(rule), k)]
        return np.full(k, float(rule))

    # ------------------------------------------------------------------ per task, at run time
    def rule_for(self, rules: dict, symbol: str, label: str | None):
        group = label_group(label)
        for key in (group, symbol, "*"):
            if key and key in rules:
                return rules[key]
        return None

    def task_duration(self, tid: int, row) -> float:
        if tid < self.n:
            return float(self.duration[tid])
        value = self.extra_duration.get(tid)
        if value is None:
            rule = self.rule_for(self.duration_rules, row.symbol, row.label)
            value = float(rule.sample(self.rng, 1)[0]) if rule is not None else 0.0
            self.extra_duration[tid] = value
        return value

    def task_size(self, tid: int, row, input_sizes) -> int:
        size = int(self.size[tid]) if tid < self.n else -1
        if size < 0 and tid >= self.n:
            rule = self.rule_for(self.size_rules, row.symbol, row.label)
            if rule is not None:
                size = int(self._sizes(rule, 1)[0])
        if size < 0:
            size = int(sum(input_sizes)) if row.symbol in SUMMED else 0
        return size

    @staticmethod
    def task_length(row) -> int:
        """The length the result reports: an array's number of elements, else 0."""
        return len(row.inputs) if row.symbol == S.ARRAY_MAKE else 0

    # ------------------------------------------------------------------ bounds
    def critical_path(self) -> float:
        """The longest chain of the plan by durations (seconds)."""
        g = self.graph
        n = self.n
        if n == 0:
            return 0.0
        levels = g.levels()
        finish = self.duration.copy()
        counts = np.diff(g.input_offsets)
        owners = np.repeat(np.arange(n), counts)
        order = np.argsort(levels[owners], kind="stable") if len(owners) else owners
        slot_level = levels[owners][order]
        bounds = np.searchsorted(slot_level, np.arange(1, int(levels.max()) + 2))
        start = 0
        best = np.zeros(n)
        for end in bounds.tolist():
            if end > start:
                sl = order[start:end]
                np.maximum.at(best, owners[sl], finish[g.inputs[sl]])
                touched = np.unique(owners[sl])
                finish[touched] = self.duration[touched] + best[touched]
            start = end
        return float(finish.max())

    def work(self) -> float:
        """cpu-seconds of the plan's tasks (duration x cpus)."""
        return float((self.duration * self.cpus).sum())


def observed_from_trace(directory: str) -> dict:
    """{"durations": {group: Dist}, "sizes": {group: tuple}} from a trace of a real run:
    label groups, and task types for unlabelled tasks."""
    from loomctl.trace.reader import TraceError, read_trace
    try:
        trace = read_trace(directory)
    except TraceError as exc:
        raise SpecError(f"--durations-from: {exc}") from None
    durations: dict[str, list] = {}
    sizes: dict[str, list] = {}
    for t in trace.tasks:
        if t.get("status") != "ok":
            continue
        key = label_group(t.get("label")) or t["sym"]
        durations.setdefault(key, []).append(max(0.0, t["t1"] - t["t0"]))
        sizes.setdefault(key, []).append(int(t.get("size") or 0))
    if not durations:
        raise SpecError(f"--durations-from {directory}: the trace has no finished tasks")
    return {"durations": {k: Dist("empirical", values=tuple(v)) for k, v in durations.items()},
            "sizes": {k: tuple(v) for k, v in sizes.items()}}
