"""A redirecting Python task's sub-plan -> graph-file bytes for the server.

Invariants:
- The sub-plan's root is the graph's only result (``build_graph`` marks it).
- A ``WrappedData`` with ``input_index`` k (input k of the redirecting task) becomes the
  pseudo-task ``loom/client/input`` with config u64 k; the same k always maps to one
  pseudo-task.
- An element ``x[i]`` of a wrapped input (or of an element) becomes ``get(x, i)`` of the
  task that stands for ``x``, so the sub-plan refers to the data instead of copying it.
- A ``WrappedData`` made inside the task (``context.wrap``, no ``input_index``) becomes a
  task that recreates its object: ``loom/py/value`` for a Python object, ``const`` for
  plain or index bytes, ``open`` for a file, ``array/make`` of those for an array.
- Anything else in the sub-plan that is not a Task is an error with a message for a
  person (``TaskError``).
"""

from __future__ import annotations

from graphfmt import fileformat
from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.plan import build_graph
from graphfmt.tasks import Task
from loomctl.worker.data import Array, DataObject, FileObj, PyObj, TaskError


def redirect_graph_bytes(task) -> bytes:
    """The graph file (bytes) of the sub-plan rooted at ``task``."""
    by_index: dict[int, Task] = {}
    elements: dict[int, tuple] = {}   # id(wrapper) -> (wrapper, its get task)

    def external(obj) -> Task:
        index = getattr(obj, "input_index", None)
        data = getattr(obj, "data", None)
        parent = getattr(obj, "parent", None)
        if index is not None:
            if index not in by_index:
                by_index[index] = Task(S.TASK_INPUT, (), S.encode_u64(int(index)))
            return by_index[index]
        if parent is not None:
            if id(obj) not in elements:
                elements[id(obj)] = (obj, tasks.get(external(parent), obj.position))
            return elements[id(obj)][1]
        if isinstance(data, DataObject):
            return recreate(data)
        raise TaskError(f"a redirection sub-plan has an input of type {type(obj).__name__}; "
                        "expected tasks or the task's own (wrapped) inputs")

    try:
        graph, _ = build_graph([task], external=external)
        return fileformat.to_bytes(graph)
    except TaskError:
        raise
    except Exception as exc:   # e.g. a wrapped object cloudpickle cannot serialise
        raise TaskError(f"invalid redirection sub-plan: {type(exc).__name__}: {exc}") from None


def recreate(data: DataObject) -> Task:
    """A task whose result equals ``data``."""
    if isinstance(data, PyObj):
        return tasks.py_value(data.obj)
    if isinstance(data, FileObj):
        return tasks.open(data.path)
    if isinstance(data, Array):
        return tasks.array_make([recreate(item) for item in data.items])
    return tasks.const(data.read())
