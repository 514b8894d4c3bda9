"""The server's sans-I/O core: events in, commands out. No sockets, threads, clock or files
(time is a parameter; checkpoint files are only looked at, at submit).

``ServerCore`` holds the state and is the facade the dispatch calls; the work is done by
modules cut along the seams of the state machine:

  transitions  the one place where task states, holds and remaining counts change
  tasktable    the per-row columns, free row ranges, the allowed state changes
  segments     a submission's rows and 64-bit ids, its input/consumer CSR
  graphstate   the task graph: columns, segments, overrides, edges (structure only)
  edge         global ids <-> rows for events in and commands out
  jobs         submit, fail, cancel, a client gone, the end and retirement of jobs
  workers      a worker joining, its liveness, its loss and what that costs
  reports      finished and failed tasks, replicas
  dynamic      redirection and dslice/dget expansion
  scheduler    placement rounds (policy: placement; options: scheduler.Options)
  readypool    the ready tasks, best first; priority: user priorities and b-levels
  stealing     queued tasks given back by loaded workers to idle ones (off by default)
  speculation  tasks given to the worker computing their inputs, ahead of time

Inside the core a task is its row in the task table; outside it is its global id (64-bit,
never reused). This facade is the edge (``core.edge``): the ids of every event are mapped
to rows here (an id of no live task, a retired one's included, is left out), and the
commands are mapped to global ids when they are taken. ``job.base`` is a global id.

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
from loomctl.core import dynamic, edge, invariants, jobs, reports, scheduler, stealing, workers
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
        self.sealed = 0                        # commands[:sealed] name global ids already (core.edge)
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
        self.worker_index = None   # (worker ids, id -> position), the scheduler's cache
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
        self.seal()
        out, self.commands, self.sealed = self.commands, [], 0
        return out

    def seal(self) -> None:
        """Map the commands made so far to global ids (before rows are given back)."""
        if self.sealed < len(self.commands):
            tail = self.commands[self.sealed:]
            edge.to_global(self, tail)
            self.commands[self.sealed:] = tail
            self.sealed = len(self.commands)

    def _release_unknown(self, wid: int, ids, rows: np.ndarray) -> None:
        """Data a worker holds for ids of no live task (retired meanwhile, or never known)
        is released there."""
        unknown = rows < 0
        if unknown.any() and wid in self.workers:
            ids = np.asarray(ids)[unknown]
            if ids.dtype.kind in "iu":
                ids = ids[(ids >= 0) & (ids <= edge.MAX_ID)].astype(np.int64)
                if len(ids):
                    self._command(messages.ReleaseData(self.workers[wid].key, ids))

    def _command(self, command) -> None:
        """A command that names global ids already."""
        self.seal()
        self.commands.append(command)
        self.sealed = len(self.commands)

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

    def cpu_tasks_ran(self, wid: int, count: int, seconds: float) -> None:
        """How long the cpu tasks of a worker's report ran (its queue follows them)."""
        worker = self.workers.get(wid)
        if worker is not None:
            worker.cpu_tasks_ran(count, seconds)

    def tasks_finished(self, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
                       now: float, inline: dict | None = None) -> None:
        rows = edge.rows(self, ids)
        self._release_unknown(wid, ids, rows)
        if inline:
            given = np.asarray(ids).tolist()
            inline = {r: inline[t] for t, r in zip(given, rows.tolist()) if r >= 0 and t in inline}
        reports.tasks_finished(self, wid, rows, sizes, lengths, now, inline)

    def tasks_failed(self, wid: int, failures: list, now: float, unfetched: np.ndarray | None = None) -> None:
        rows = edge.rows(self, [t for t, _ in failures]).tolist() if failures else []
        again = set(edge.rows(self, unfetched).tolist()) if unfetched is not None and len(unfetched) else set()
        reports.tasks_failed(self, wid, [(r, m) for r, (_, m) in zip(rows, failures) if r >= 0], now, again)

    def replicas_added(self, wid: int, ids: np.ndarray, now: float) -> None:
        reports.replicas_added(self, wid, edge.rows(self, ids), now)

    def tasks_returned(self, wid: int, ids: np.ndarray, now: float) -> None:
        stealing.tasks_returned(self, wid, edge.rows(self, ids), now)

    def data_returned(self, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray, now: float) -> None:
        rows = edge.rows(self, ids)
        self._release_unknown(wid, ids, rows)
        reports.data_returned(self, wid, rows, sizes, lengths, now)

    def task_redirected(self, wid: int, task_id: int, graph: Graph, now: float) -> None:
        dynamic.redirect(self, wid, int(edge.rows(self, [task_id])[0]), graph, now)

    def release(self, ids: np.ndarray) -> None:
        jobs.release(self, edge.rows(self, ids))

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
        answer = jobs.job_results(self, job_id, watcher)
        return {**answer, "ids": self.graph.ids_of(answer["ids"])}

    def ids_of(self, rows) -> np.ndarray:
        """The global ids of rows (``job.results``, say)."""
        return self.graph.ids_of(rows)

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
        return {"workers": rows, "lost_workers": lost, "jobs": job_rows, "n_tasks": int(self.segs.next_gid),
                "live_tasks": int(c.used),
                "n_data_objects": self.n_data, "stats": dict(self.stats)}

    def check_invariants(self) -> None:
        """For tests: every invariant of the core's modules, recomputed from scratch."""
        invariants.check(self)
