"""Running tasks off the worker's loop: one task -> an Outcome; outcomes -> UPDATE reports.

Invariants:
- ``run_task`` never raises: every failure (task error, checkpoint write, a bug in an
  executor) becomes ``Outcome.error``, a message for a person. It touches no socket and
  no worker state, so it may run in any thread.
- A result with a checkpoint path is written there atomically before the task counts as
  finished; a failed write fails the task.
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
from dataclasses import dataclass, field

from graphfmt import symbols as S
from loomctl import protocol as P
from loomctl.worker import data
from loomctl.worker.executors import ExecContext, Redirect, execute, write_atomically
from loomctl.worker.pyprocess import PyChild, run_in_child, wants_process
from loomctl.worker.redirect import redirect_graph_bytes
from loomctl.worker.taskqueue import TaskSpec

# light built-ins cheap enough to run inline in the worker's loop
INLINE_SYMBOLS = frozenset({S.CONST, S.MERGE, S.GET, S.SLICE, S.SIZE, S.LENGTH,
                            S.ARRAY_MAKE, S.SPLIT, S.OPEN})


@dataclass
class Outcome:
    """What became of one started task."""
    task_id: int
    result: data.DataObject | None = None
    size: int = 0
    length: int = 0
    error: str | None = None
    redirect: bytes | None = None
    logs: list = field(default_factory=list)
    started: float = 0.0     # Unix times of the run (for traces); 0: not measured
    ended: float = 0.0


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
    except data.TaskError as exc:
        out.error = str(exc)
    except Exception as exc:   # a bug must not take the worker down
        out.error = f"internal error while running the task: {type(exc).__name__}: {exc}"
    out.ended = time.time()
    return out


def finalize(out: Outcome, spec: TaskSpec, result) -> None:
    """Write the checkpoint (if any) and record the result; raises TaskError."""
    if spec.checkpoint:
        try:
            write_atomically(spec.checkpoint, result)
        except data.TaskError as exc:
            raise data.TaskError(f"cannot write checkpoint {spec.checkpoint!r}: {exc}") from None
    out.size, out.length = result.size(), result.length()
    out.result = result


class Report:
    """One UPDATE's worth of reports."""

    def __init__(self):
        self.finished, self.sizes, self.lengths = [], [], []
        self.failed, self.redirects, self.replicas, self.logs = [], [], [], []
        self.inline, self.blobs = [], []   # results sent along: ids, encodings

    def __bool__(self):
        return bool(self.finished or self.failed or self.redirects or self.replicas or self.logs)

    def urgent(self) -> bool:
        """Whether the report has more than finishes and logs (it is sent at once)."""
        return bool(self.failed or self.redirects or self.replicas)

    def body(self) -> dict:
        """The UPDATE body."""
        body = {"finished": P.ids_to_bytes(self.finished), "sizes": P.ids_to_bytes(self.sizes),
                "lengths": P.ids_to_bytes(self.lengths), "failed": self.failed,
                "redirects": self.redirects, "replicas": P.ids_to_bytes(self.replicas),
                "logs": self.logs}
        if self.inline:
            body["inline"], body["blobs"] = P.ids_to_bytes(self.inline), self.blobs
        return body


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
        finally:
            if child is not None:
                child.close()

    def submit(self, *job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
