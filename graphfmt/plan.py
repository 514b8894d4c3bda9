"""Task objects -> columnar Graph.

Invariants:
- Tasks are numbered in a depth-first post-order from the results, so every input has
  a smaller id than its consumer (the graph is topologically ordered).
- A Task object reachable along several paths becomes one task (shared sub-graphs are
  computed once); two equal but distinct Task objects stay two tasks.
- Inputs that are not Tasks (client futures, wrapped inputs of a redirecting Python
  task) become pseudo-tasks through the ``external`` callback, or raise TypeError.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable

import msgpack
import numpy as np

from graphfmt.graph import FLAG_RESULT, PRIORITY_LIMIT, Graph, VarBytes, offsets_from_lengths
from graphfmt.tasks import Task

External = Callable[[object], Task]


def as_task_list(results) -> list:
    if isinstance(results, Task) or not isinstance(results, Iterable) or isinstance(results, (str, bytes)):
        return [results]
    return list(results)


def build_graph(results, external: External | None = None) -> tuple[Graph, list[int]]:
    """Linearise the plan reachable from ``results``. Returns the graph and, for each
    item of ``results`` in order, its task id (repeats map to the same id)."""
    roots = as_task_list(results)
    order: list[Task] = []
    index: dict[int, int] = {}
    substitutes: dict[int, Task] = {}

    def resolve(obj) -> Task:
        if isinstance(obj, Task):
            return obj
        key = id(obj)
        if key not in substitutes:
            if external is None:
                raise TypeError(f"task input must be a Task, got {type(obj).__name__}")
            substitutes[key] = (obj, external(obj))   # keep obj alive: ids stay unique
        return substitutes[key][1]

    for root in roots:
        root = resolve(root)
        if id(root) in index:
            continue
        stack = [(root, iter(root.inputs))]
        while stack:
            task, pending = stack[-1]
            for child in pending:
                if not isinstance(child, Task):
                    child = resolve(child)
                key = id(child)
                if key not in index:
                    if not child.inputs:   # (a source: numbered here, not pushed)
                        index[key] = len(order)
                        order.append(child)
                        continue
                    stack.append((child, iter(child.inputs)))
                    break
            else:
                stack.pop()
                if id(task) not in index:
                    index[id(task)] = len(order)
                    order.append(task)

    result_ids = [index[id(resolve(r))] for r in roots]
    graph = _columns(order, index, resolve, plain=not substitutes)
    graph.flags[result_ids] |= FLAG_RESULT
    return graph, result_ids


def _columns(order: list[Task], index: dict[int, int], resolve, plain: bool) -> Graph:
    """The columns of ``order``, an attribute at a time over all tasks (each a C-level
    pass; Python only where a task sets an optional attribute); ``plain``: every input is
    a Task (none went through ``resolve``)."""
    n = len(order)
    names = [task.task_type for task in order]
    symbols = {name: code for code, name in enumerate(dict.fromkeys(names))}
    inputs_of = [task.inputs for task in order]
    counts = np.fromiter(map(len, inputs_of), dtype=np.int64, count=n)
    every_input = itertools.chain.from_iterable(inputs_of)
    if not plain:
        every_input = (x if isinstance(x, Task) else resolve(x) for x in every_input)
    flat_inputs = np.fromiter(map(index.__getitem__, map(id, every_input)), dtype=np.int64, count=int(counts.sum()))
    configs = [task.config for task in order]
    if set(map(type, configs)) - {bytes}:
        configs = [config if type(config) is bytes else bytes(config) for config in configs]
    # (the optional attributes: a C-level count says whether any task sets one)
    label_codes = np.zeros(n, dtype=np.uint32)
    labels: dict[str, int] = {}
    every = [task.label for task in order]
    for i, label in enumerate(every) if every.count(None) < n else ():
        if label is not None:
            label_codes[i] = labels.get(label) or labels.setdefault(label, len(labels) + 1)
    request_codes = np.zeros(n, dtype=np.uint16)
    requests: dict[tuple, int] = {}
    request_table: list[dict] = []
    every = [task.resource_request for task in order]
    for i, rr in enumerate(every) if every.count(None) < n else ():
        if rr is not None and (rr.cpus or rr.resources):
            key = rr.key()
            if key not in requests:
                request_table.append(rr.to_dict())
                requests[key] = len(request_table)
            request_codes[i] = requests[key]
    checkpoints = [task.checkpoint_path for task in order]
    checkpoints = [path.encode() if path else b"" for path in checkpoints] if any(checkpoints) else None
    metadata = [task.metadata for task in order]
    metadata = [b"" if m is None else msgpack.packb(m, use_bin_type=True) for m in metadata] \
        if metadata.count(None) < n else None
    priorities = None
    every = [getattr(task, "priority", 0) for task in order]
    for i, priority in enumerate(every) if every.count(0) < n else ():
        if priority:
            if isinstance(priority, bool) or not isinstance(priority, int) \
                    or not -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT:
                raise TypeError(f"{order[i]!r}: priority must be an integer from {-PRIORITY_LIMIT} to "
                                f"{PRIORITY_LIMIT}, not {priority!r}")
            priorities = priorities if priorities is not None else np.zeros(n, dtype=np.int32)
            priorities[i] = priority
    return Graph(
        symbols=list(symbols), types=np.fromiter(map(symbols.__getitem__, names), dtype=np.uint16, count=n),
        input_offsets=offsets_from_lengths(counts), inputs=flat_inputs, configs=VarBytes.from_list(configs),
        flags=np.zeros(n, dtype=np.uint8), request_codes=request_codes, requests=request_table,
        label_codes=label_codes, labels=list(labels),
        checkpoints=VarBytes.from_list(checkpoints) if checkpoints is not None else None,
        metadata=VarBytes.from_list(metadata) if metadata is not None else None,
        priorities=priorities,
    )
