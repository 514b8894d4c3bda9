"""What the server and the workers record while a traced job runs.

Tracing is switched on per job. When a job with a trace directory is submitted, the
server opens ``DIR/server.trace`` (``ServerTracer.start_job``) and sends every worker a
``TRACE {path, job, on: true}`` message (workers that register later get one too); every
COMPUTE carries the job of each task, so that a worker knows which of its tasks to
record. The server's tracer only observes the core's commands, it never changes them. When the job ends, ``TRACE {..., on: false}``
follows, and a file whose last traced job ended is closed (with an ``end`` record).

Cpu slots (the ``slot`` of a task record; one timeline row each):
- ``0 .. cpus-1``: tasks that hold cpus; a task holding n cpus takes the n lowest free
  slots (all listed in ``slots``) for its whole run;
- ``-1`` (INLINE_SLOT): light built-ins that run inline in the worker's loop thread, one
  at a time, so they never overlap;
- ``-2, -3, ...``: other light tasks (a pool of light threads, programs without a cpu
  request): the lowest free number while the task runs.

Invariants:
- When no traced job is active, the processes hold no tracer (``None``): an untraced
  run pays one ``is None`` test per hook and nothing else.
- A worker records only tasks the server marked as belonging to a traced job, each when
  it ends (start and end times come from the thread that ran it).
- Nothing here raises into the process loops: bad trace messages are logged and ignored,
  an unwritable directory disables tracing into it.
"""

from __future__ import annotations

import heapq
import logging
import os
import time

from loomctl import messages as M
from loomctl import protocol as P
from loomctl.trace import format as F

log = logging.getLogger("loomctl.trace")


def _open(path: str, head: dict) -> F.TraceWriter | None:
    try:
        return F.TraceWriter(path, head)
    except OSError as exc:
        log.warning("cannot write the trace file %s: %s", path, exc)
        return None


class ServerTracer:
    """The server's side: its own file per trace directory, TRACE messages for workers,
    the assignments of traced tasks. Methods that return messages return a list of
    ``(worker key, frames)`` for the shell to send."""

    def __init__(self):
        self.writers: dict[str, F.TraceWriter] = {}
        self.job_dir: dict[int, str] = {}

    def __bool__(self) -> bool:
        return bool(self.writers)

    def start_job(self, job, directory: str, workers) -> list:
        directory = os.path.abspath(directory)
        writer = self.writers.get(directory)
        if writer is None:
            writer = _open(os.path.join(directory, F.SERVER_FILE), F.header("server"))
            if writer is None:
                return []
            self.writers[directory] = writer
            for w in workers:
                writer.add(self._worker_record(w))
        writer.add({"k": F.JOB, "t": time.time(), "job": job.id, "name": job.name, "base": job.base, "n": job.n})
        self.job_dir[job.id] = directory
        message = P.encode(P.TRACE, {"path": directory, "job": job.id, "on": True})
        return [(w.key, message) for w in workers]

    @staticmethod
    def _worker_record(w) -> dict:
        return {"k": F.WORKER, "t": time.time(), "worker": w.id, "name": w.name, "address": w.data_address,
                "cpus": w.cpus, "host": w.hostname}

    def worker_added(self, w) -> list:
        for writer in self.writers.values():
            writer.add(self._worker_record(w))
        return [(w.key, P.encode(P.TRACE, {"path": d, "job": j, "on": True})) for j, d in self.job_dir.items()]

    def worker_lost(self, w, reason: str) -> None:
        for writer in self.writers.values():
            writer.add({"k": F.WORKER_LOST, "t": time.time(), "worker": w.id, "name": w.name, "reason": reason})

    @staticmethod
    def round_begin() -> tuple[float, float]:
        return time.time(), time.perf_counter()

    def round_end(self, mark: tuple[float, float], placed: int, ready: int) -> None:
        record = {"k": F.ROUND, "t": mark[0], "dur": time.perf_counter() - mark[1], "placed": placed, "ready": ready}
        for writer in self.writers.values():
            writer.add(record)

    def commands(self, commands: list, worker_of_key: dict) -> None:
        """Record the assignments of traced jobs' tasks (COMPUTE commands carry the job
        of every task, which is how workers tell theirs)."""
        now = time.time()
        for cmd in commands:
            if type(cmd) is not M.Compute:
                continue
            jobs = cmd.jobs.tolist()
            traced = {self.job_dir[j] for j in set(jobs) if j in self.job_dir}
            if not traced:
                continue
            worker = worker_of_key.get(cmd.target, -1)
            for directory in traced:
                mine = [row[0] for row, j in zip(cmd.rows, jobs) if self.job_dir.get(j) == directory]
                self.writers[directory].add({"k": F.ASSIGN, "t": now, "worker": worker,
                                             "ids": P.ids_to_bytes(mine)})

    def ended_jobs(self, jobs: dict, workers) -> list:
        """Close the trace of traced jobs that are no longer running."""
        messages = []
        for job_id in list(self.job_dir):
            job = jobs.get(job_id)
            if job is not None and job.status == "running":
                continue
            directory = self.job_dir.pop(job_id)
            writer = self.writers.get(directory)
            if writer is not None:
                writer.add({"k": F.JOB_END, "t": time.time(), "job": job_id,
                            "status": job.status if job is not None else "gone",
                            "finished": job.finished if job is not None else 0,
                            "failed": job.failed if job is not None else 0})
            message = P.encode(P.TRACE, {"path": directory, "job": job_id, "on": False})
            messages.extend((w.key, message) for w in workers)
            if directory not in self.job_dir.values() and writer is not None:
                writer.close()
                del self.writers[directory]
        return messages

    def tick(self) -> None:
        now = time.monotonic()
        for writer in self.writers.values():
            if now - writer.last_flush >= F.FLUSH_INTERVAL:
                writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        self.job_dir.clear()


class WorkerTracer:
    """A worker's side: one writer per trace directory of its traced jobs."""

    def __init__(self, name: str, worker_id, address: str | None, cpus: int, resources: dict | None = None):
        self.name, self.worker_id, self.address, self.cpus = name, worker_id, address, cpus
        self.resources = dict(resources or {})
        self.writers: dict[str, F.TraceWriter] = {}
        self.job_dir: dict[int, str] = {}
        self.task_job: dict[int, int] = {}      # assigned tasks of traced jobs -> job
        self.running: dict[int, tuple] = {}     # task -> (spec, job, slots, start time)
        self.ended_tasks: dict[str, list] = {}  # directory -> tuples, one "tasks" record per flush
        self.free_cpu = list(range(cpus))       # heaps of free slot numbers
        self.free_light: list[int] = []
        self.n_light = 0
        self.n_extra = 0
        self.last_sample = float("-inf")
        self.clock_offset = time.time() - time.monotonic()   # monotonic -> Unix time

    def __bool__(self) -> bool:
        return bool(self.writers)

    # ------------------------------------------------------------------ jobs
    def on_message(self, body: dict) -> None:
        path, job, on = body.get("path"), body.get("job"), body.get("on", True)
        if not isinstance(path, str) or not path or not isinstance(job, int) or isinstance(job, bool):
            log.warning("ignored a malformed TRACE message")
            return
        if on:
            self.job_on(job, path)
        else:
            self.job_off(job)

    def job_on(self, job: int, directory: str) -> None:
        if directory not in self.writers:
            head = F.header("worker", name=self.name, worker=self.worker_id, address=self.address,
                            cpus=self.cpus, resources=self.resources)
            writer = _open(os.path.join(directory, F.worker_file(self.name)), head)
            if writer is None:
                return
            self.writers[directory] = writer
            self.ended_tasks[directory] = []
        self.job_dir[job] = directory

    def job_off(self, job: int) -> None:
        directory = self.job_dir.pop(job, None)
        if directory is None:
            return
        for task, j in list(self.task_job.items()):
            if j == job and task not in self.running:
                del self.task_job[task]
        if directory not in self.job_dir.values():
            self._emit_tasks(directory)
            self.ended_tasks.pop(directory, None)
            writer = self.writers.pop(directory, None)
            if writer is not None:
                writer.close()

    # ------------------------------------------------------------------ tasks
    def assigned(self, rows: list, jobs_column) -> None:
        """A COMPUTE's ``jobs`` column: remember the tasks of traced jobs."""
        try:
            jobs = P.ids_from_bytes(jobs_column).tolist()
        except P.ProtocolError:
            log.warning("ignored a malformed jobs column in COMPUTE")
            return
        for row, job in zip(rows, jobs):
            if job in self.job_dir and isinstance(row, (list, tuple)) and row and isinstance(row[0], int):
                self.task_job[row[0]] = job

    def started(self, spec) -> None:
        """A task left the worker's loop to run (an inline one is not started: ``ended``
        records it alone)."""
        job = self.task_job.get(spec.id)
        if job is None:
            return
        if spec.cpus > 0:
            slots = tuple(self._take_cpu() for _ in range(spec.cpus))
        else:
            if self.free_light:
                k = heapq.heappop(self.free_light)
            else:
                k = self.n_light
                self.n_light += 1
            slots = (F.FIRST_LIGHT_SLOT - k,)
        self.running[spec.id] = (spec, job, slots, time.time())

    def _take_cpu(self) -> int:
        if self.free_cpu:
            return heapq.heappop(self.free_cpu)
        self.n_extra += 1        # traced tasks outnumber the cpus: short pool tasks overbooked (taskqueue)
        return self.cpus + self.n_extra - 1

    def ended(self, task_id: int, outcome, spec=None) -> None:
        """A started task ended (``spec``: its assignment, needed for inline tasks)."""
        entry = self.running.pop(task_id, None)
        if entry is None:    # an inline task (or not traced)
            job = self.task_job.pop(task_id, None)
            if job is None or spec is None:
                return
            slots, began = _INLINE, 0.0
        else:
            self.task_job.pop(task_id, None)
            spec, job, slots, began = entry
            for slot in slots:
                if slot >= 0:
                    heapq.heappush(self.free_cpu, slot)
                else:
                    heapq.heappush(self.free_light, F.FIRST_LIGHT_SLOT - slot)
        directory = self.job_dir.get(job)
        pending = self.ended_tasks.get(directory)
        if pending is None:
            return
        t1 = outcome.ended or time.time()
        t0 = min(outcome.started or began or t1, t1)
        status = "ok" if outcome.error is None and outcome.redirect is None else \
            "failed" if outcome.error is not None else "redirected"
        pending.append((task_id, job, slots, spec.cpus, spec.symbol, spec.label, t0, t1, status, outcome.size,
                        spec.inputs))
        for level, message in outcome.logs:
            self.writers[directory].add({"k": F.LOG, "t": t1, "id": task_id, "job": job, "level": str(level),
                                         "msg": str(message)})

    def _emit_tasks(self, directory: str) -> None:
        """The ended tasks since the last flush as one columnar ``tasks`` record."""
        pending = self.ended_tasks.get(directory)
        if not pending:
            return
        self.ended_tasks[directory] = []
        ids, jobs, slots, cpus, syms, labels, t0, t1, status, size, inputs = zip(*pending)
        record = {"k": F.TASKS, "w": self.worker_id, "id": ids, "job": jobs, "slot": [s[0] for s in slots],
                  "cpus": cpus, "sym": syms, "label": labels, "t0": t0, "t1": t1, "status": status,
                  "size": size, "in": inputs}
        if any(len(s) > 1 for s in slots):
            record["slots"] = [list(s) if len(s) > 1 else None for s in slots]
        self.writers[directory].add(record)

    # ------------------------------------------------------------------ data, samples
    def transfer(self, source: str, sent_at: float, nbytes: int, ids: list) -> None:
        """Data fetched from the peer at ``source``; ``sent_at``: monotonic time of the
        request."""
        record = {"k": F.XFER, "t0": sent_at + self.clock_offset, "t1": time.time(), "from": source,
                  "to": self.address, "bytes": nbytes, "n": len(ids), "ids": P.ids_to_bytes(ids)}
        for writer in self.writers.values():
            writer.add(record)

    def sample(self, now: float, stats: dict) -> None:
        if now - self.last_sample < 0.95 * F.SAMPLE_INTERVAL:
            return
        self.last_sample = now
        record = {"k": F.SAMPLE, "t": time.time(), "cpu": stats.get("cpu_percent", 0.0),
                  "rss": stats.get("rss", 0), "objects": stats.get("n_data", 0),
                  "bytes": stats.get("data_bytes", 0), "running": stats.get("running", 0)}
        for writer in self.writers.values():
            writer.add(record)

    def tick(self, now: float) -> None:
        for directory, writer in self.writers.items():
            if now - writer.last_flush >= F.FLUSH_INTERVAL:
                self._emit_tasks(directory)
                writer.flush()

    def close(self) -> None:
        for directory, writer in self.writers.items():
            self._emit_tasks(directory)
            writer.close()
        self.writers.clear()
        self.job_dir.clear()
        self.ended_tasks.clear()


_INLINE = (F.INLINE_SLOT,)
