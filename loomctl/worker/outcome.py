"""What became of a task, and the reports made of it (a leaf: no worker module below it).

Invariants:
- ``finalize`` writes a result with a checkpoint path there atomically before the task
  counts as finished; a failed write raises TaskError (the task fails).
- A Report is one UPDATE's worth: ``body()`` is the UPDATE message body. A failed task
  whose only fault is an input a peer did not give (it timed out, was lost, sent garbage,
  did not hold it) is in ``unfetched`` too: the server may run it again.
"""

from __future__ import annotations

from dataclasses import dataclass

from loomctl import protocol as P
from loomctl.worker import data
from loomctl.worker.executors import write_atomically


@dataclass(slots=True)
class Outcome:
    """What became of one started task."""
    task_id: int
    result: data.DataObject | None = None
    size: int = 0
    length: int = 0
    error: str | None = None
    redirect: bytes | None = None
    logs: list | tuple = ()  # [(level, message)] (a tuple: none, and no list made per task)
    started: float = 0.0     # Unix times of the run (for traces); 0: not measured
    ended: float = 0.0


def finalize(out: Outcome, spec, result) -> None:
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
        self.returned: list | None = None  # the answer to a steal request: tasks given back
        self.unfetched: list = []          # of the failed: an input a peer did not give
        self.busy_count, self.busy_seconds = 0, 0.0   # finished cpu tasks timed, their run time

    def __bool__(self):
        return bool(self.finished or self.failed or self.redirects or self.replicas or self.logs) \
            or self.returned is not None

    def drop_finished(self, task_id: int) -> None:
        """Take a finish back (its data was lost before the report went)."""
        k = self.finished.index(task_id)
        del self.finished[k], self.sizes[k], self.lengths[k]
        if task_id in self.inline:
            k = self.inline.index(task_id)
            del self.inline[k], self.blobs[k]

    def give_back(self, ids: list) -> None:
        """The answer to a steal request: these tasks are given back (maybe none)."""
        self.returned = (self.returned or []) + list(ids)

    def urgent(self) -> bool:
        """Whether the report has more than finishes and logs (it is sent at once; a steal
        answer too: the server has idle cpus for those tasks)."""
        return bool(self.failed or self.redirects or self.replicas) or self.returned is not None

    def body(self) -> dict:
        """The UPDATE body."""
        body = {"finished": P.ids_to_bytes(self.finished), "sizes": P.ids_to_bytes(self.sizes),
                "lengths": P.ids_to_bytes(self.lengths), "failed": self.failed,
                "redirects": self.redirects, "replicas": P.ids_to_bytes(self.replicas),
                "logs": self.logs}
        if self.inline:
            body["inline"], body["blobs"] = P.ids_to_bytes(self.inline), self.blobs
        if self.returned is not None:
            body["returned"] = P.ids_to_bytes(self.returned)
        if self.unfetched:
            body["unfetched"] = P.ids_to_bytes(self.unfetched)
        if self.busy_count:
            body["cpu_busy"] = [self.busy_count, self.busy_seconds]
        return body
