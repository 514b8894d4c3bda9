"""HyperLoom-compatible builder API: functions that make Task objects.

Invariants:
- A Task is a node of a plan; it is never executed here. Building is cheap: a Task holds
  its symbol, its inputs (a tuple of Tasks, repeats allowed), its config bytes, and
  optional resource request, label, metadata and checkpoint path.
- Signatures and defaults follow HyperLoom: run (``request=``), py_call, py_value and save
  request one cpu; every other built-in is light (no request). Text arguments (const
  data, merge delimiter, split char, file names) are bytes or str, anything else is a
  TypeError naming the argument.
- Porting a HyperLoom plan means replacing ``from loom.client import tasks`` with
  ``from graphfmt import tasks``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterable, Sequence

from graphfmt import symbols as S


class ResourceRequest:
    """What a task reserves on a worker while it runs (cpus, plus named resources)."""

    __slots__ = ("cpus", "resources")

    def __init__(self, cpus: int = 0, **resources: int):
        if cpus < 0 or any(v < 0 for v in resources.values()):
            raise ValueError("resource amounts must not be negative")
        self.cpus = int(cpus)
        self.resources = {k: int(v) for k, v in sorted(resources.items())}

    def to_dict(self) -> dict:
        return {"cpus": self.cpus, **self.resources}

    @classmethod
    def from_dict(cls, d: dict) -> "ResourceRequest":
        d = dict(d)
        return cls(d.pop("cpus", 0), **d)

    def key(self) -> tuple:
        return (self.cpus, *self.resources.items())

    def __eq__(self, other):
        return isinstance(other, ResourceRequest) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def __repr__(self):
        extra = "".join(f", {k}={v}" for k, v in self.resources.items())
        return f"cpus({self.cpus}{extra})"


def cpus(n: int) -> ResourceRequest:
    """Reserve n cpus of a worker while the task runs."""
    return ResourceRequest(n)


cpu1 = cpus(1)


class Task:
    """One node of a plan. ``task.label``, ``task.resource_request``,
    ``task.checkpoint_path`` and ``task.priority`` may be set after construction, as in
    HyperLoom. ``priority`` is an integer (-2^31 < p < 2^31): among ready tasks the
    scheduler starts those of higher priority first (0 by default)."""

    __slots__ = ("task_type", "inputs", "config", "resource_request", "label",
                 "metadata", "checkpoint_path", "priority", "__weakref__")

    def __init__(self, task_type: str, inputs: Sequence["Task"] = (), config: bytes = b"",
                 resource_request: ResourceRequest | None = None, label: str | None = None,
                 metadata: Any = None, checkpoint_path: str | None = None, priority: int = 0):
        self.task_type = task_type
        self.inputs = tuple(inputs)
        self.config = config
        self.resource_request = resource_request
        self.label = label
        self.metadata = metadata
        self.checkpoint_path = checkpoint_path
        self.priority = priority

    def __repr__(self):
        label = f" {self.label!r}" if self.label else ""
        return f"<Task {self.task_type}{label} inputs={len(self.inputs)}>"


def _bytes(value, argument: str, builder: str) -> bytes:
    """The bytes of a bytes or str argument (str as UTF-8); anything else is a TypeError
    naming the argument (``bytes(5)`` would silently be five NUL bytes)."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{builder}: {argument} must be bytes or str, not {type(value).__name__}")


def _filename(value, builder: str) -> bytes:
    return _bytes(os.fspath(value) if isinstance(value, os.PathLike) else value, "filename", builder)


def _inputs(tasks: Iterable) -> tuple:
    items = tuple(tasks)
    for item in items:
        if not _is_input(item):
            raise TypeError(f"task input must be a Task, got {type(item).__name__}")
    return items


def _is_input(item) -> bool:
    # A Task, a client Future (has .task_id and .client), or a wrapped data object
    # inside a Python task that returns a sub-plan (has .data).
    return isinstance(item, Task) or hasattr(item, "task_id") or hasattr(item, "data")


def const(data: bytes | str) -> Task:
    return Task(S.CONST, (), _bytes(data, "data", "const"))


def merge(inputs: Iterable[Task], delimiter: bytes | str = "") -> Task:
    return Task(S.MERGE, _inputs(inputs), _bytes(delimiter, "delimiter", "merge"))


def open(filename: str) -> Task:  # noqa: A001 - HyperLoom's name
    return Task(S.OPEN, (), _filename(filename, "open"))


def split(input: Task, char: bytes | str | None = None) -> Task:  # noqa: A002
    config = b"" if char is None else _bytes(char, "char", "split")
    if len(config) > 1:
        raise ValueError("split: char must be a single byte")
    return Task(S.SPLIT, _inputs((input,)), config)


def save(input: Task, filename: str) -> Task:  # noqa: A002
    return Task(S.SAVE, _inputs((input,)), _filename(filename, "save"), cpu1)


def array_make(inputs: Iterable[Task]) -> Task:
    return Task(S.ARRAY_MAKE, _inputs(inputs))


def get(input: Task, index: int) -> Task:  # noqa: A002
    return Task(S.GET, _inputs((input,)), S.encode_u64(index))


def slice(input: Task, start: int, end: int) -> Task:  # noqa: A001,A002
    return Task(S.SLICE, _inputs((input,)), S.encode_slice(start, end))


def size(input: Task) -> Task:  # noqa: A002
    return Task(S.SIZE, _inputs((input,)))


def length(input: Task) -> Task:  # noqa: A002
    return Task(S.LENGTH, _inputs((input,)))


def run(args: str | Sequence[str], inputs: Iterable[tuple] = (),
        outputs: Sequence[str | None] = (None,), stdin: Task | None = None,
        request: ResourceRequest | None = cpu1) -> Task:
    """Run a program. ``inputs`` are (task, target) pairs: target None feeds stdin,
    "$NAME" defines a variable for the arguments, any other name becomes a file in the
    program's working directory. ``stdin`` is a task for standard input (placed before
    ``inputs``). ``outputs`` are file names read after the program exits; None is its
    standard output. ``request`` is what the task reserves (None: a light task)."""
    if isinstance(args, str):
        args = args.split()
    args = [a if isinstance(a, (str, bytes)) else str(a) for a in args]
    pairs = list(inputs)
    if stdin is not None:
        pairs.insert(0, (stdin, None))
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError("run inputs must be (task, name) pairs")
    input_tasks = _inputs(t for t, _ in pairs)
    outputs = list(outputs)
    if not outputs:
        raise ValueError("run needs at least one output")
    config = S.encode_run(args, [name for _, name in pairs], outputs)
    return Task(S.RUN, input_tasks, config, request)


def py_value(obj: Any) -> Task:
    import cloudpickle
    return Task(S.PY_VALUE, (), cloudpickle.dumps(obj), cpu1)


def py_call(obj: Any, inputs: Iterable[Task] = (), direct_args: Sequence = (), *,
            context: bool = False) -> Task:
    """Call ``obj(*direct_args, *wrapped_inputs)`` on a worker; ``obj`` is a function
    or a task that produces one. With ``context`` (loomctl's own) a context object
    comes first."""
    import cloudpickle
    fn_task = obj if _is_input(obj) else py_value(obj)
    config = cloudpickle.dumps((tuple(direct_args), bool(context)))
    return Task(S.PY_CALL, (fn_task, *_inputs(inputs)), config, cpu1)


def py_task(label: str | None = None, request: ResourceRequest | None = cpu1,
            context: bool = False, n_direct_args: int = 0):
    """Decorator: ``f(*direct_args, *input_tasks)`` builds a py_call task of ``f``."""
    def decorator(fn):
        fn_task = py_value(fn)
        fn_task.label = f"{label or fn.__name__}:fn"

        @functools.wraps(fn)
        def build(*args):
            direct, task_inputs = args[:n_direct_args], args[n_direct_args:]
            task = py_call(fn_task, task_inputs, direct, context=context)
            task.label = label or fn.__name__
            task.resource_request = request
            return task
        return build
    return decorator


def dslice(input: Task) -> Task:  # noqa: A002
    return Task(S.DSLICE, _inputs((input,)))


def dget(input: Task) -> Task:  # noqa: A002
    return Task(S.DGET, _inputs((input,)))
