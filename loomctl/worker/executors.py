"""Execute one task: symbol + config + input data objects -> one new data object.

Invariants:
- ``execute`` either returns a data object, returns ``Redirect(task)`` (a Python task
  asked to be replaced by a sub-plan), or raises ``TaskError`` with a message for a
  person. Any other exception escaping a task function is turned into a ``TaskError``;
  a task can never take its worker down.
- Executors never mutate their inputs. They keep no state between calls except the
  extension registry, so ``execute`` may run concurrently in several threads.
- ``loom/run/run`` is not executed here: the worker's loop starts programs
  (``worker.programs``, ``worker.runs``).
- ``loom/scheduler/dslice``/``dget`` are expanded by the server and ``loom/client/*``
  are references; asking to execute them is an error.
"""

from __future__ import annotations

import logging
import operator
import os
import shutil
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import cloudpickle
import numpy as np

from graphfmt import symbols as S
from loomctl.worker import extensions
from loomctl.worker.data import (CUT_DTYPE, Array, DataObject, FileObj, Index, Plain,
                                 PyObj, TaskError, content, kind_phrase)

task_logger = logging.getLogger("loomctl.task")

STDERR_TAIL_LINES = 20
STDERR_TAIL_BYTES = 2048


@dataclass(slots=True)
class ExecContext:
    """Per-execution facts a task may need; ``logs`` collects (level, message) pairs
    emitted by Python tasks, for the worker log and the trace."""
    task_id: int
    work_dir: str
    keep_failed_dirs: bool = False
    logs: list = field(default_factory=list)


@dataclass
class Redirect:
    """A Python task returned a Task: run that sub-plan in place of this task. Inputs
    of the sub-plan may be ``WrappedData`` objects (``.data``, ``.input_index``)."""
    task: Any


def execute(symbol: str, config: bytes, inputs: list, ctx: ExecContext):
    """Run one task; see the module docstring for the contract."""
    fn = _BUILTINS.get(symbol)
    try:
        if fn is not None:
            _check_shape(symbol, config, inputs)
            return fn(config, inputs, ctx)
        if symbol in (S.DSLICE, S.DGET):
            raise TaskError(f"{symbol} is expanded by the server and cannot be executed "
                            "on a worker")
        if symbol == S.RUN:
            raise TaskError(f"{symbol} is started by the worker's loop (worker.programs), not executed here")
        if symbol in (S.FUTURE, S.TASK_INPUT):
            raise TaskError(f"{symbol} is a reference to data, not an executable task")
        ext = extensions.lookup(symbol)
        if ext is None:
            raise TaskError(f"unknown task type {symbol!r}: no built-in or registered "
                            "extension on this worker")
        return _check_result(symbol, ext(config, inputs))
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"{symbol} failed with an internal error: {type(e).__name__}: {e}\n"
                        + traceback.format_exc(limit=-8)) from None


def _check_shape(symbol: str, config: bytes, inputs: list) -> None:
    lo, hi = S.ARITY[symbol]
    n = len(inputs)
    if n < lo or (hi is not None and n > hi):
        want = str(lo) if lo == hi else f"at least {lo}"
        raise TaskError(f"{symbol} takes {want} input(s), got {n}")
    need = S.FIXED_CONFIG_LEN.get(symbol)
    if need is not None and len(config) != need:
        raise TaskError(f"malformed config for {symbol}: {len(config)} bytes, "
                        f"expected {need}")


def _check_result(symbol: str, result) -> DataObject:
    if not isinstance(result, DataObject):
        raise TaskError(f"extension task {symbol!r} returned {type(result).__name__}, "
                        "not a data object")
    return result


# ---------------------------------------------------------------------------- data


def _config_text(config: bytes, symbol: str) -> str:
    try:
        name = bytes(config).decode()
    except UnicodeDecodeError:
        raise TaskError(f"{symbol}: file name is not valid UTF-8") from None
    if not name:
        raise TaskError(f"{symbol}: empty file name")
    return name


def _const(config, inputs, ctx):
    # (a large const comes as a read-only view of the frame it arrived in: kept, not copied)
    return Plain.over(config) if type(config) is memoryview else Plain(config)


def _merge(config, inputs, ctx):
    parts = [obj.read() if obj.is_dobject else content(obj, f"merge input {i}") for i, obj in enumerate(inputs)]
    return Plain(bytes(config).join(parts))


def _open(config, inputs, ctx):
    path = os.path.abspath(_config_text(config, S.OPEN))
    if not os.path.exists(path):
        raise TaskError(f"cannot open {path!r}: no such file")
    if not os.path.isfile(path):
        raise TaskError(f"cannot open {path!r}: not a regular file")
    return FileObj(path)


def _split(config, inputs, ctx):
    (obj,) = inputs
    delimiter = S.decode_split(bytes(config))
    if len(delimiter) != 1:
        raise TaskError("split delimiter must be a single byte")
    # (a large const's frame is scanned where it is: a copy of 10 MB is ~2,500 page faults)
    text = obj.content if type(obj) is Plain else content(obj, "split input")
    base = obj if obj.is_dobject else Plain(text)
    return Index(base, split_cuts(text, delimiter[0]))


SCAN_STEP = 1 << 18   # bytes a split compares with its delimiter at a time


def split_cuts(content: bytes, delimiter: int) -> np.ndarray:
    """End positions of pieces that each keep their delimiter; a last piece without a
    delimiter ends at the end of the content. Empty content has no pieces."""
    n = len(content)
    if n == 0:
        return np.empty(0, CUT_DTYPE)
    # (a stretch at a time into one small mask: a mask of the whole content, 10 MB for a
    # 10 MB const, is 2,500 fresh pages to fault in, more than the scan itself costs)
    view = np.frombuffer(content, dtype=np.uint8)
    mask = np.empty(min(n, SCAN_STEP), dtype=bool)
    found = []
    for lo in range(0, n, SCAN_STEP):
        part = view[lo:lo + SCAN_STEP]
        hits = mask[:len(part)]
        np.equal(part, delimiter, out=hits)
        found.append(np.flatnonzero(hits) + (lo + 1))
    cuts = (found[0] if len(found) == 1 else np.concatenate(found)).astype(CUT_DTYPE)
    if not len(cuts) or int(cuts[-1]) != n:
        cuts = np.append(cuts, np.array([n], dtype=CUT_DTYPE))
    return cuts


def _save(config, inputs, ctx):
    (obj,) = inputs
    path = _config_text(config, S.SAVE)
    if not os.path.isabs(path):
        raise TaskError(f"cannot save to {path!r}: the file name must be absolute")
    if not (obj.is_dobject or isinstance(obj, Index)):
        raise TaskError(f"save input is {kind_phrase(obj)}; expected a plain, file or "
                        "index object")
    write_atomically(path, obj)
    return Plain(b"")


def write_atomically(path: str, obj: DataObject) -> None:
    """Write the content of ``obj`` to ``path`` through a temporary file in the same
    directory and ``os.replace``; no partial or temporary file survives a failure."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise TaskError(f"cannot save to {path!r}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(obj, FileObj):
                with open(obj.path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            else:
                out.write(obj.read())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise TaskError(f"cannot save to {path!r}: {e.strerror or e}") from None
        raise


def _array_make(config, inputs, ctx):
    return Array(inputs)


def _get(config, inputs, ctx):
    (obj,) = inputs
    return obj.get(S.decode_u64(config))


def _slice(config, inputs, ctx):
    (obj,) = inputs
    start, end = S.decode_slice(config)
    return obj.slice(start, end)


def _size(config, inputs, ctx):
    (obj,) = inputs
    return Plain(S.encode_u64(obj.size()))


def _length(config, inputs, ctx):
    (obj,) = inputs
    return Plain(S.encode_u64(obj.length()))


# ---------------------------------------------------------------------------- python


class WrappedData:
    """What a Python task function receives for each data input. An array or an index
    also behaves as a sequence: ``len(x)``, ``x[i]`` and iteration give its elements,
    each wrapped (objects without elements have length 0)."""

    __slots__ = ("data", "input_index", "parent", "position")

    def __init__(self, data: DataObject, input_index: int | None = None,
                 parent: "WrappedData | None" = None, position: int = 0):
        self.data = data
        # position among the task's inputs (the function is input 0); None when made
        # by context.wrap() or taken from another wrapper
        self.input_index = input_index
        # an element x[i] knows x and i, so a sub-plan can refer to it as get(x, i)
        self.parent = parent
        self.position = position

    def read(self) -> bytes:
        obj = self.data
        return obj.read() if obj.is_dobject or isinstance(obj, Index) else b""

    def size(self) -> int:
        return self.data.size()

    def length(self) -> int:
        return self.data.length()

    def unwrap(self) -> Any:
        if isinstance(self.data, PyObj):
            return self.data.obj
        raise TaskError(f"unwrap() needs a Python object, but this input is "
                        f"{kind_phrase(self.data)}")

    def __len__(self) -> int:
        return self.data.length()

    def __getitem__(self, i) -> "WrappedData":
        n = self.data.length()
        k = operator.index(i)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"index {i} is out of range for {kind_phrase(self.data)} of length {n}")
        return WrappedData(self.data.get(k), parent=self, position=k)

    def __iter__(self):
        return (self[k] for k in range(self.data.length()))

    def __repr__(self):
        return f"<WrappedData {self.data!r}>"


class TaskContext:
    """First argument of a ``context=True`` Python task."""

    def __init__(self, ctx: ExecContext):
        self.task_id = ctx.task_id
        self._logs = ctx.logs

    def _log(self, level: str, levelno: int, msg) -> None:
        text = str(msg)
        self._logs.append((level, text))
        task_logger.log(levelno, "task %s: %s", self.task_id, text)

    def log_debug(self, msg) -> None:
        self._log("debug", logging.DEBUG, msg)

    def log_info(self, msg) -> None:
        self._log("info", logging.INFO, msg)

    def log_warn(self, msg) -> None:
        self._log("warn", logging.WARNING, msg)

    def log_error(self, msg) -> None:
        self._log("error", logging.ERROR, msg)

    def log_critical(self, msg) -> None:
        self._log("critical", logging.CRITICAL, msg)

    def wrap(self, obj: Any) -> WrappedData:
        """A Python object as a pyobj result; a wrapped object is returned as it is."""
        return obj if isinstance(obj, WrappedData) else WrappedData(PyObj(obj))


def _py_value(config, inputs, ctx):
    try:
        return PyObj(cloudpickle.loads(config))
    except Exception:
        raise TaskError("cannot load the Python object of loom/py/value:\n"
                        + traceback.format_exc()) from None


def _py_call(config, inputs, ctx):
    fn_obj = inputs[0] if inputs else None
    if not isinstance(fn_obj, PyObj) or not callable(fn_obj.obj):
        got = "nothing" if fn_obj is None else (
            f"a Python {type(fn_obj.obj).__name__}" if isinstance(fn_obj, PyObj)
            else kind_phrase(fn_obj))
        raise TaskError(f"the first input of loom/py/call must be a Python callable, got {got}")
    try:
        direct_args, with_context = cloudpickle.loads(config) if config else ((), False)
    except Exception:
        raise TaskError("cannot load the direct arguments of loom/py/call:\n"
                        + traceback.format_exc()) from None
    fn = fn_obj.obj
    args = [TaskContext(ctx)] if with_context else []
    args.extend(direct_args)
    args.extend(WrappedData(obj, i) for i, obj in enumerate(inputs[1:], start=1))
    try:
        result = fn(*args)
    except Exception as e:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__.tb_next))
        raise TaskError(f"Python task {name} raised an exception:\n{tb}") from None
    if _is_task(result):
        return Redirect(result)
    return convert_py_result(result)


def _is_task(value) -> bool:
    return hasattr(value, "task_type") and hasattr(value, "inputs")


def convert_py_result(value) -> DataObject:
    """bytes/str -> plain, wrapped -> its data object, list/tuple -> array."""
    if isinstance(value, bytes):
        return Plain(value)
    if isinstance(value, (bytearray, memoryview)):
        return Plain(bytes(value))
    if isinstance(value, str):
        return Plain(value.encode("utf-8"))
    if isinstance(value, WrappedData):
        return value.data
    if isinstance(value, (list, tuple)):
        return Array([convert_py_result(item) for item in value])
    if _is_task(value):
        raise TaskError("a Python task may return a Task only as its whole result, "
                        "not inside a list")
    raise TaskError(f"a Python task returned {type(value).__name__!r}; expected bytes, "
                    "str, a wrapped object (context.wrap), a list/tuple of these, or a Task")


_BUILTINS: dict[str, Callable[[bytes, list, ExecContext], Any]] = {
    S.CONST: _const, S.MERGE: _merge, S.OPEN: _open, S.SPLIT: _split, S.SAVE: _save,
    S.ARRAY_MAKE: _array_make, S.GET: _get, S.SLICE: _slice, S.SIZE: _size,
    S.LENGTH: _length, S.PY_VALUE: _py_value, S.PY_CALL: _py_call,
}
