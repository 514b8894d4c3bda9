"""Python function tasks (loom/py/call that hold cpus) run in child processes: one per
executor thread of the worker, started when first needed and reused. CPU-bound tasks
of one worker then use as many cores as it has cpus, and never hold the GIL of the
worker's loop (which keeps serving data and heartbeats).

The child is ``python -m loomctl.worker.pyprocess``. Messages on its stdin and on a
private copy of its stdout are: two 8-byte little-endian lengths (meta, number of data
objects), one length per data object, the cloudpickled meta, then the data objects in
the worker's wire encoding (worker/data.py: contents are not pickled, and arrive as
views of the read buffer):
  parent -> child  ("path", sys.path)   once, first
                   ("run", task_id, config, fn_id, fn or None, work_dir) + the inputs
  child -> parent  ("ok", None, logs) + the result, ("redirect", graph file bytes,
                   logs) or ("error", message for a person, logs)
The task's own prints go to the worker's stderr (the child's fd 1 is pointed there).

Invariants:
- A child runs one task at a time; the thread that owns it waits for the answer.
- A function is sent to a child once: both sides keep the same FN_CACHE most recently
  used functions, by the id of the task that made them.
- A child that dies (exit, signal, unreadable answer) fails only the task it ran, with
  a message naming how it ended; the next task starts a new child.
- Results leave the child pickled: a result that cannot be pickled fails its task.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict

import cloudpickle

from graphfmt import symbols as S
from loomctl.worker import data
from loomctl.worker.data import PyObj
from loomctl.worker.outcome import Outcome, finalize

FN_CACHE = 64
PIPE_BYTES = 1 << 20
_HEADER = struct.Struct("<Q")


class ChildDied(Exception):
    pass


def _write_message(stream, meta, objects=()) -> None:
    """A frame: lengths, the cloudpickled ``meta``, then each data object in the worker's
    wire encoding (large contents written by reference, never pickled)."""
    meta_bytes = cloudpickle.dumps(meta, protocol=5)
    parts = [data.encode_parts(obj) for obj in objects]
    sizes = [data.encoded_size(p) for p in parts]
    stream.write(_HEADER.pack(len(meta_bytes)) + _HEADER.pack(len(sizes))
                 + b"".join(_HEADER.pack(n) for n in sizes) + meta_bytes)
    for object_parts in parts:
        for part in object_parts:
            stream.write(part)
    stream.flush()


def _read_exactly(stream, n: int) -> bytes | None:
    buf = stream.read(n)
    return buf if len(buf) == n else None


def _read_message(stream):
    """(meta, data objects) or None at end of input."""
    head = _read_exactly(stream, 2 * _HEADER.size)
    if head is None:
        return None
    meta_length, count = struct.unpack("<QQ", head)
    sizes = _read_exactly(stream, count * _HEADER.size)
    meta = _read_exactly(stream, meta_length)
    if sizes is None or meta is None:
        return None
    objects = []
    for (n,) in struct.iter_unpack("<Q", sizes):
        buf = _read_exactly(stream, n)
        if buf is None:
            return None
        objects.append(data.decode(buf))
    return cloudpickle.loads(meta), objects


def _widen(fd: int) -> None:
    """A pipe buffer of PIPE_BYTES instead of 64 KiB: megabytes of task data cross in a
    few system calls instead of one context switch per 64 KiB."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:   # above /proc/sys/fs/pipe-max-size for this user: keep the default
        pass


def _remember(cache: OrderedDict, key, value=None) -> None:
    """The same most-recently-used bookkeeping on both sides."""
    if key in cache:
        cache.move_to_end(key)
        return
    cache[key] = value
    if len(cache) > FN_CACHE:
        cache.popitem(last=False)


# ---------------------------------------------------------------------------- parent

def wants_process(spec, inputs) -> bool:
    """A py/call holding cpus whose function input is a callable Python object (any
    other case runs in the thread, where its error is made)."""
    return (spec.symbol == S.PY_CALL and spec.cpus > 0 and len(spec.inputs) == len(inputs) and inputs
            and isinstance(inputs[0], PyObj) and callable(inputs[0].obj))


class PyChild:
    """The parent's handle on one child (owned by one executor thread)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.sent: OrderedDict = OrderedDict()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "loomctl.worker.pyprocess"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            _widen(pipe.fileno())
        self.sent = OrderedDict()
        _write_message(self.proc.stdin, ("path", list(sys.path)))

    def call(self, spec, inputs: list, work_dir: str) -> tuple:
        """((kind, value, logs), result data object or None) from the child; raises
        ChildDied."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        fn_id = spec.inputs[0]
        fn = None if fn_id in self.sent else inputs[0].obj
        try:
            try:
                _write_message(self.proc.stdin, ("run", spec.id, spec.config, fn_id, fn, work_dir), inputs[1:])
            except (BrokenPipeError, OSError):
                raise
            except Exception as exc:   # an input that cannot be pickled
                return ("error", f"cannot send the inputs of the Python task to its process: "
                                 f"{type(exc).__name__}: {exc}", []), None
            _remember(self.sent, fn_id)
            reply = _read_message(self.proc.stdout)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            raise ChildDied(self._death())
        meta, objects = reply
        return meta, (objects[0] if objects else None)

    def _death(self) -> str:
        proc, self.proc = self.proc, None
        try:
            status = proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"the Python process running the task {how} before answering"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()   # end of input: the child exits
            proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()


def run_in_child(child: PyChild, spec, inputs: list, work_dir: str):
    """An Outcome of running the task in ``child`` (never raises)."""
    from loomctl.worker.executors import task_logger
    out = Outcome(spec.id, started=time.time())
    try:
        (kind, value, logs), result = child.call(spec, inputs, work_dir)
    except ChildDied as exc:
        out.error = str(exc)
        out.ended = time.time()
        return out
    out.logs = logs
    for level, text in logs:
        task_logger.log(_LEVELS.get(level, 20), "task %s: %s", spec.id, text)
    if kind == "ok":
        try:
            finalize(out, spec, result)
        except data.TaskError as exc:
            out.error = str(exc)
    elif kind == "redirect":
        out.redirect = value
    else:
        out.error = str(value)
    out.ended = time.time()
    return out


_LEVELS = {"debug": 10, "info": 20, "warn": 30, "error": 40, "critical": 50}


# ---------------------------------------------------------------------------- child

def _child_main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the worker decides when we stop
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)                                  # the task's prints go to the worker's stderr
    sys.stdout = sys.stderr
    requests = os.fdopen(0, "rb")
    import logging
    logging.getLogger("loomctl.task").disabled = True   # the parent logs what the task logged
    from loomctl.worker.executors import ExecContext, Redirect, execute
    from loomctl.worker.redirect import redirect_graph_bytes
    functions: OrderedDict = OrderedDict()
    while True:
        message = _read_message(requests)
        if message is None:
            return
        meta, inputs = message
        if meta[0] == "path":
            sys.path[:] = meta[1]
            continue
        _, task_id, config, fn_id, fn, work_dir = meta
        if fn is not None:
            _remember(functions, fn_id, fn)
        else:
            _remember(functions, fn_id)
        ctx = ExecContext(task_id, work_dir, False)
        result = ()
        try:
            value = execute(S.PY_CALL, config, [PyObj(functions[fn_id]), *inputs], ctx)
            if isinstance(value, Redirect):
                reply = ("redirect", redirect_graph_bytes(value.task), ctx.logs)
            else:
                reply, result = ("ok", None, ctx.logs), (value,)
        except data.TaskError as exc:
            reply = ("error", str(exc), ctx.logs)
        except Exception as exc:   # a bug here must not end the process
            reply = ("error", f"internal error while running the task: {type(exc).__name__}: {exc}", ctx.logs)
        try:
            _write_message(answers, reply, result)
        except BrokenPipeError:
            return
        except Exception as exc:   # the result cannot be serialised
            message = exc.args[0] if isinstance(exc, data.TaskError) else f"{type(exc).__name__}: {exc}"
            _write_message(answers, ("error", "the result of the Python task cannot leave its process "
                                              f"(it must be picklable): {message}", ctx.logs))


if __name__ == "__main__":
    _child_main()
