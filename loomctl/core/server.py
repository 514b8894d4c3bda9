"""The server's sans-I/O core: events in, commands out. No sockets, threads, clock or files
(time is a parameter; checkpoint files are only looked at, at submit).

``ServerCore`` holds the state and is the facade the dispatch calls; the work is done by
modules cut along the seams of the state machine:

  transitions  the one place where task states, holds and remaining counts change
  graphstate   the task graph: columns, segments, overrides, edges (structure only)
  jobs         submit, fail, cancel, a client gone, the end and retirement of jobs
  workers      a worker joining, its liveness, its loss and what that costs
  reports      finished and failed tasks, replicas
  dynamic      redirection and dslice/dget expansion
  scheduler    placement rounds (policy: placement; options: scheduler.Options)
  readypool    the ready tasks, best first; priority: user priorities and b-levels
  stealing     queued tasks given back by loaded workers to idle ones (off by default)
  speculation  tasks given to the worker computing their inputs, ahead of time

Each event appends typed commands (``loomctl.messages``) to ``commands``, which the
process shell drains (``take_commands``), encodes (``loomctl.protocol``) and sends.
``schedule()`` places ready tasks in one batch. ``core.invariants.check`` verifies
every invariant the modules state, from scratch (tests call it after every step).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from graphfmt.graph import Graph
from loomctl import messages
from loomctl.core import dynamic, invariants, jobs, reports, scheduler, stealing, workers
from loomctl.core.graphstate import TaskGraph
from loomctl.core.jobs import JOB_HISTORY, Job, SubmitError
from loomctl.core.readypool import ReadyPool
from loomctl.core.tasktable import ASSIGNED

__all__ = ["ServerCore", "SubmitError", "Job"]


def _count(value) -> int:
    """A count a worker reported (0 for anything but a non-negative int)."""
    return value if type(value) is int and value >= 0 else 0


class ServerCore:
    def __init__(self):
        self.graph = TaskGraph()
        self.workers: dict[int, workers.Worker] = {}
        self.jobs: dict[int, Job] = {}
        self.ready: list[np.ndarray] = []      # tasks made READY since the last round (stale entries too)
        self.pool = ReadyPool()                # the READY tasks rounds choose from, best first
        self.options = scheduler.Options()
        self.steals: dict[int, np.ndarray] = {}   # worker -> tasks a steal request asked it for
        self.starved: set[int] = set()            # workers the last round could not fill (scheduler)
        self.unchecked: list[np.ndarray] = []  # READY since the last satisfiability check
        self.commands: list = []
        self.replicas: dict[int, set[int]] = {}   # task -> workers with a copy besides its owner
        self.n_data = 0                        # tasks whose data some worker holds (owner >= 0)
        self.lost_workers: list[dict] = []
        self.stranded: dict[int, int] = {}     # task -> worker it waits on, for a lost input
        self.frontier: dict[int, np.ndarray] = {}   # worker -> tasks speculation goes on from (core.speculation)
        self.aborted_jobs: set[int] = set()    # cancelled or failed: late results are dropped
        self.ended_jobs: deque[int] = deque()  # ended, not retired yet, in the order they ended
        self.history: deque[dict] = deque(maxlen=JOB_HISTORY)   # status rows of retired jobs
        self.record: list | None = None        # journal records of what changed (None: no journal)
        self.hold_until: float | None = None   # a restored server waits for its workers till then
        self.recheck_at: float | None = None   # when to check again what no worker can run
        self.next_worker = 0
        self.next_job = 1
        self.stats = {"scheduled": 0, "finished": 0, "failed": 0, "rounds": 0, "transfers": 0,
                      "transfer_bytes": 0, "retired_jobs": 0}

    @property
    def cols(self):
        return self.graph.cols

    @property
    def segs(self):
        return self.graph.segs

    def take_commands(self) -> list:
        out, self.commands = self.commands, []
        return out

    # ------------------------------------------------------------------ events
    def add_worker(self, key: bytes, info: messages.Register, now: float) -> int:
        return workers.add_worker(self, key, info, now)

    def remove_worker(self, wid: int, now: float, reason: str = "lost") -> None:
        workers.remove_worker(self, wid, now, reason)

    def heartbeat(self, wid: int, stats: dict, now: float) -> None:
        workers.heartbeat(self, wid, stats, now)

    def dead_workers(self, now: float, timeout: float) -> list[int]:
        return workers.dead_workers(self, now, timeout)

    def submit(self, client: bytes | None, graph: Graph, now: float, **options) -> Job:
        return jobs.submit(self, client, graph, now, **options)

    def tasks_finished(self, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
                       now: float, inline: dict | None = None) -> None:
        reports.tasks_finished(self, wid, ids, sizes, lengths, now, inline)

    def tasks_failed(self, wid: int, failures: list, now: float) -> None:
        reports.tasks_failed(self, wid, failures, now)

    def replicas_added(self, wid: int, ids: np.ndarray) -> None:
        reports.replicas_added(self, wid, ids)

    def tasks_returned(self, wid: int, ids: np.ndarray, now: float) -> None:
        stealing.tasks_returned(self, wid, ids, now)

    def data_returned(self, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray, now: float) -> None:
        reports.data_returned(self, wid, ids, sizes, lengths, now)

    def task_redirected(self, wid: int, task_id: int, graph: Graph, now: float) -> None:
        dynamic.redirect(self, wid, task_id, graph, now)

    def release(self, ids: np.ndarray) -> None:
        jobs.release(self, ids)

    def cancel(self, job_id: int, now: float) -> bool:
        return jobs.cancel(self, job_id, now)

    def client_gone(self, client: bytes, now: float) -> list[int]:
        return jobs.client_gone(self, client, now)

    def retire_jobs(self, now: float, budget: int = 1000) -> int:
        return jobs.retire_jobs(self, now, budget)

    def schedule(self, now: float) -> int:
        return scheduler.schedule(self, now)

    def fail_unsatisfiable(self, ids: np.ndarray | None, now: float) -> None:
        scheduler.fail_unsatisfiable(self, ids, now)

    # ------------------------------------------------------------------ queries
    def job_counts(self, job: Job) -> dict:
        return jobs.job_counts(self, job)

    def job_row(self, job: Job, now: float) -> dict:
        return jobs.job_row(self, job, now)

    def job_results(self, job_id: int, watcher: bytes | None = None) -> dict:
        return jobs.job_results(self, job_id, watcher)

    def retired_row(self, job_id: int) -> dict | None:
        return next((row for row in self.history if row["id"] == job_id), None)

    def status(self, now: float) -> dict:
        c = self.graph.cols
        n = c.n
        rows = []
        for w in self.workers.values():
            mine = (c.state[:n] == ASSIGNED) & (c.worker[:n] == w.id)
            held = np.flatnonzero(c.owner[:n] == w.id)
            rows.append({"id": w.id, "name": w.name, "hostname": w.hostname, "cpus": w.cpus,
                         "resources": w.resources, "assigned": int(np.count_nonzero(mine)),
                         "running": w.stats.get("running"), "tasks_done": w.tasks_done,
                         "data_objects": int(len(held)), "data_bytes": int(c.size[held].sum()),
                         "rss": w.stats.get("rss"), "cpu_percent": w.stats.get("cpu_percent"),
                         "memory_used": w.stats.get("memory_used", w.stats.get("rss")),
                         "memory_limit": w.memory_limit, "paused": bool(w.stats.get("paused")),
                         "spilled_objects": _count(w.stats.get("spilled_objects")),
                         "spilled_bytes": _count(w.stats.get("spilled_bytes")),
                         "streamed_bytes": _count(w.stats.get("streamed_bytes")),
                         "data_connections": w.stats.get("data_connections"), "heartbeat": w.stats.get("heartbeat"),
                         "address": w.data_address, "last_seen_s": round(now - w.last_seen, 3)})
        job_rows = [*self.history, *(self.job_row(job, now) for job in self.jobs.values())]
        lost = [{**w, "ago_s": round(now - w["at"], 1)} for w in self.lost_workers[-20:]]
        return {"workers": rows, "lost_workers": lost, "jobs": job_rows, "n_tasks": int(n),
                "n_data_objects": self.n_data, "stats": dict(self.stats)}

    def check_invariants(self) -> None:
        """For tests: every invariant of the core's modules, recomputed from scratch."""
        invariants.check(self)
