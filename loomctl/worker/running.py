"""Running tasks off the worker's loop: one task -> an Outcome, in executor threads.

Invariants:
- ``run_task`` never raises: every failure (task error, checkpoint write, a bug in an
  executor) becomes ``Outcome.error``, a message for a person. It touches no socket and
  no worker state, so it may run in any thread.
- A result with a checkpoint path is written there atomically before the task counts as
  finished (outcome.finalize); a failed write fails the task.
- Pool threads are daemons: a task still running when the worker stops does not keep
  the process alive. On a worker with more than one cpu, a Python function task that
  holds cpus runs in the thread's child process (pyprocess.py), so that such tasks use
  all the cpus; everything else, and everything on a one-cpu worker (where a process
  would only add copies of the data), runs in the thread itself.
"""

from __future__ import annotations

import queue
import threading
import time

from loomctl.worker import data
from loomctl.worker.executors import ExecContext, Redirect, execute
from loomctl.worker.outcome import Outcome, finalize
from loomctl.worker.pyprocess import PyChild, run_in_child, wants_process
from loomctl.worker.redirect import redirect_graph_bytes
from loomctl.worker.taskqueue import TaskSpec


def run_task(spec: TaskSpec, inputs: list, work_dir: str, keep_failed_dirs: bool) -> Outcome:
    """Execute one task (in any thread); never raises."""
    ctx = ExecContext(spec.id, work_dir, keep_failed_dirs)
    out = Outcome(spec.id, logs=ctx.logs, started=time.time())
    try:
        result = execute(spec.symbol, spec.config, inputs, ctx)
        if isinstance(result, Redirect):
            out.redirect = redirect_graph_bytes(result.task)
        else:
            finalize(out, spec, result)
    except Exception as exc:   # (a bug must not take the worker down either)
        out.error = _error_of(exc)
    out.ended = time.time()
    return out


def _error_of(exc: Exception) -> str:
    """A task's failure as its message: a TaskError's own, anything else an internal error."""
    if isinstance(exc, data.TaskError):
        return str(exc)
    return f"internal error while running the task: {type(exc).__name__}: {exc}"


def run_inline(spec: TaskSpec, inputs: list, timed: bool = False) -> Outcome:
    """Execute an inline built-in (``taskqueue.route``: no checkpoint, no context, no
    logs), in the worker's loop; timed only when ``timed`` (a traced worker); never raises."""
    out = Outcome(spec.id, started=time.time() if timed else 0.0)
    try:
        finalize(out, spec, execute(spec.symbol, spec.config, inputs, None))
    except Exception as exc:   # (a bug must not take the worker down either)
        out.error = _error_of(exc)
    if timed:
        out.ended = time.time()
    return out


class Pool:
    """Daemon executor threads (a task still running at exit does not hold the process)."""

    def __init__(self, n: int, name: str, done, python_processes: bool = False):
        self.python_processes = python_processes
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._serve, args=(done,), daemon=True,
                                         name=f"{name}-{k}") for k in range(n)]
        for thread in self.threads:
            thread.start()

    def _serve(self, done) -> None:
        child = PyChild() if self.python_processes else None   # started when first needed
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    return
                spec, inputs, work_dir, _ = job
                if child is not None and wants_process(spec, inputs):
                    done(run_in_child(child, spec, inputs, work_dir))
                else:
                    done(run_task(*job))
                job = spec = inputs = None   # (a task's inputs are not kept while the next is awaited)
        finally:
            if child is not None:
                child.close()

    def submit(self, *job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
