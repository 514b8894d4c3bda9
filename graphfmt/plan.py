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
                if id(child) not in index:
                    stack.append((child, iter(child.inputs)))
                    break
            else:
                stack.pop()
                if id(task) not in index:
                    index[id(task)] = len(order)
                    order.append(task)

    result_ids = [index[id(resolve(r))] for r in roots]
    graph = _columns(order, index, resolve)
    graph.flags[result_ids] |= FLAG_RESULT
    return graph, result_ids


def _columns(order: list[Task], index: dict[int, int], resolve) -> Graph:
    n = len(order)
    symbols: dict[str, int] = {}
    labels: dict[str, int] = {}
    requests: dict[tuple, int] = {}
    request_table: list[dict] = []
    types: list[int] = []    # (lists, made arrays at the end: a numpy item write costs more)
    counts: list[int] = []
    label_codes = np.zeros(n, dtype=np.uint32)
    request_codes = np.zeros(n, dtype=np.uint16)
    flat_inputs: list[int] = []
    configs: list[bytes] = []
    checkpoints: list[bytes] | None = None
    metadata: list[bytes] | None = None
    priorities: np.ndarray | None = None
    for i, task in enumerate(order):
        code = symbols.get(task.task_type)
        if code is None:
            code = symbols[task.task_type] = len(symbols)
        types.append(code)
        ins = task.inputs
        counts.append(len(ins))
        if ins:
            flat_inputs.extend([index[id(x if isinstance(x, Task) else resolve(x))] for x in ins])
        config = task.config
        configs.append(config if isinstance(config, bytes) else bytes(config))
        if task.label is not None:
            label_codes[i] = labels.get(task.label) or labels.setdefault(task.label, len(labels) + 1)
        rr = task.resource_request
        if rr is not None and (rr.cpus or rr.resources):
            key = rr.key()
            if key not in requests:
                request_table.append(rr.to_dict())
                requests[key] = len(request_table)
            request_codes[i] = requests[key]
        if task.checkpoint_path:
            checkpoints = checkpoints if checkpoints is not None else [b""] * n
            checkpoints[i] = task.checkpoint_path.encode()
        if task.metadata is not None:
            metadata = metadata if metadata is not None else [b""] * n
            metadata[i] = msgpack.packb(task.metadata, use_bin_type=True)
        priority = getattr(task, "priority", 0)
        if priority:
            if isinstance(priority, bool) or not isinstance(priority, int) \
                    or not -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT:
                raise TypeError(f"{task!r}: priority must be an integer from {-PRIORITY_LIMIT} to "
                                f"{PRIORITY_LIMIT}, not {priority!r}")
            priorities = priorities if priorities is not None else np.zeros(n, dtype=np.int32)
            priorities[i] = priority
    return Graph(
        symbols=list(symbols), types=np.array(types, dtype=np.uint16),
        input_offsets=offsets_from_lengths(np.array(counts, dtype=np.int64)),
        inputs=np.array(flat_inputs, dtype=np.int64), configs=VarBytes.from_list(configs),
        flags=np.zeros(n, dtype=np.uint8), request_codes=request_codes, requests=request_table,
        label_codes=label_codes, labels=list(labels),
        checkpoints=VarBytes.from_list(checkpoints) if checkpoints is not None else None,
        metadata=VarBytes.from_list(metadata) if metadata is not None else None,
        priorities=priorities,
    )
