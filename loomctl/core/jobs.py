"""Jobs: submission, failure, cancellation, a client going away, the end and retirement.

Invariants:
- A job's tasks are the ids of its segments (``job.segments``: its own range first,
  then the segments added at run time); its counts are taken over all of them.
- A job ends once: ``end`` sets its status (finished, failed or cancelled), tells its
  watchers (JOB_DONE) and queues it for retirement. A job that did not finish is
  *aborted*: its waiting and ready tasks are cancelled, so are its running ones (their
  workers are told to stop them: CANCEL_TASKS; a late result is dropped), its results
  are no longer wanted, and tasks of other jobs that wait on its unfinished tasks fail
  (their jobs with them). A task another job still needs is left to finish.
- A task of an ended job that fails (it was computed again because another job needs
  its lost data) takes the tasks of its job waiting on it with it (CANCELLED), and the
  jobs that wait on any of them fail; a waiting task of another ended job among those
  goes the same way (a chain of futures across ended jobs): none waits for ever.
- A job ended RETIRE_AFTER_S ago whose tasks hold no data, run nowhere, are needed by
  nothing and are no input of a job that is not retired (lost data of that job may have
  to be computed again from them) is *retired*: its segments and record are dropped and
  their rows go back to the task table (commands naming them are mapped to global ids
  first, ready lists forget them), a status row stays in ``core.history`` (the last
  JOB_HISTORY). ``job.base`` and the ids clients give and get are global ids; every
  other id here is a row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph
from loomctl import messages as M
from loomctl.core import transitions as T
from loomctl.core.tasktable import (ALIAS, ASSIGNED, CANCELLED, FAILED, FINISHED, FLAG_EXTRA, FLAG_LOADED, FLAG_QUEUED,
                                    LIVE, N_STATES, READY, SKIPPED, STATE_NAMES, WAITING,
                                    ranges)

RETIRE_AFTER_S = 1.0   # an ended job is kept whole at least this long (traces, late reports)
JOB_HISTORY = 1000     # status rows kept of retired jobs


class SubmitError(Exception):
    """A submission is refused; the message is for the client."""


@dataclass
class Job:
    id: int
    client: bytes | None
    name: str
    base: int
    n: int
    submitted: float
    active: int = 0                # tasks to run: neither alias nor skipped (transitions keeps it)
    finished: int = 0              # of them, finished (transitions keeps it)
    results: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    status: str = "running"
    failed: int = 0
    error: dict | None = None
    watchers: set = field(default_factory=set)
    ended: float | None = None
    trace: str | None = None
    detached: bool = False      # kept when its client disconnects (loomctl submit)
    appended: bool = False      # has segments added at run time (redirection, dslice/dget)
    segments: list = field(default_factory=list)   # its segment indices (the first: its own range)


# ---------------------------------------------------------------------- submit
def submit(core, client: bytes | None, graph: Graph, now: float, load: bool = False, name: str = "",
           notify: bool = True, trace: str | None = None, detached: bool = False) -> Job:
    """Add a validated graph as a new job."""
    local_to_global, alias = map_inputs(core, graph, None)
    n = len(graph)
    aliased = bool(alias.any())   # (none, the usual case: no mask work below)
    marked = (graph.flags & 1).astype(bool)   # the file's result flag
    if aliased and (alias & marked).any():
        raise SubmitError("a future cannot itself be a result of a submission")
    if not marked.any():   # no results marked: the sinks are the results
        consumed = np.zeros(n, dtype=bool)
        consumed[graph.inputs] = True
        marked = ~consumed & ~alias if aliased else ~consumed
    job = Job(id=core.next_job, client=client, name=name, base=core.graph.segs.next_gid, n=n, submitted=now, trace=trace,
              detached=detached)
    core.next_job += 1
    core.jobs[job.id] = job
    overrides, needed = (_checkpoints(graph, alias) if load else ({}, None if not aliased else ~alias))
    born = np.full(n, WAITING, dtype=np.uint8)   # (not np.where: two int64 temporaries)
    if needed is not None:   # (None: every task)
        born[~needed] = SKIPPED
        born[alias] = ALIAS
        results = marked & needed
    else:
        results = marked
    global_inputs = local_to_global[graph.inputs]
    del local_to_global, marked, needed   # (a large submission's memory peak is in add_tasks)
    ids = T.add_tasks(core, job, graph, global_inputs, born, results, overrides)
    if overrides:
        core.graph.cols.flags[ids[list(overrides)]] |= FLAG_LOADED
    job.results = ids[results]
    del ids, born, results, alias
    if client is not None and notify:
        job.watchers.add(client)
    if core.workers and core.unchecked:
        unchecked = core.unchecked
        core.fail_unsatisfiable(unchecked[0] if len(unchecked) == 1 else np.concatenate(unchecked), now)
    if job.active == 0 and job.status == "running":
        end(core, job, "finished", now)
    return job


def map_inputs(core, graph: Graph, redirect_inputs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows for the tasks of a graph about to be added, and its alias mask: a FUTURE
    pseudo-task stands for an existing task a client holds (by its global id), a
    TASK_INPUT (in a redirection's sub-plan) for the redirecting task's input of that
    number (``redirect_inputs``: rows)."""
    n = len(graph)
    base = core.graph.next_rows(n)
    # (rows as int32 while every row fits: half the memory of a large submission's inputs)
    local_to_global = np.arange(base, base + n, dtype=np.int32 if core.graph.cols.n + n < (1 << 31) else np.int64)
    alias = np.zeros(n, dtype=bool)
    for symbol, targets in ((S.FUTURE, None), (S.TASK_INPUT, redirect_inputs)):
        if symbol not in graph.symbols:   # (no such task: no mask to build)
            continue
        mask = graph.type_codes(symbol)
        if not mask.any():
            continue
        if symbol == S.TASK_INPUT and targets is None:
            raise SubmitError(f"{graph.describe(int(np.flatnonzero(mask)[0]))} is only valid inside a redirection")
        for i in np.flatnonzero(mask):
            ref = S.decode_u64(graph.config(int(i)))
            if targets is not None:
                if ref >= len(targets):
                    raise SubmitError(f"redirection uses input {ref}, the task has {len(targets)}")
                ref = int(targets[ref])
            else:
                row = core.graph.segs.row_of(ref)
                if not _usable_future(core, row):
                    raise SubmitError(f"{graph.describe(int(i))}: future {ref} is unknown, failed or released")
                ref = row
            local_to_global[i] = ref
            alias[i] = True
    return local_to_global, alias


def _usable_future(core, ref: int) -> bool:
    c = core.graph.cols
    if not 0 <= ref < c.n:
        return False
    state = c.state[ref]
    if state == FINISHED:
        return c.owner[ref] >= 0
    return bool(LIVE[state]) and c.holds[ref] > 0


def _checkpoints(graph: Graph, alias: np.ndarray) -> tuple[dict, np.ndarray]:
    """Tasks whose checkpoint file exists are taken from it (an override: open the
    file); returns those overrides and the mask of tasks that must run (reachable from
    results and sinks without crossing a loaded one)."""
    n = len(graph)
    loaded = np.zeros(n, dtype=bool)
    overrides = {}
    if graph.checkpoints is not None:
        for i in np.flatnonzero(graph.checkpoints.lengths()):
            path = graph.checkpoint(int(i))
            if path and os.path.isfile(path):
                loaded[i] = True
                overrides[int(i)] = (S.OPEN, path.encode(), np.zeros(0, np.int64))
    consumed = np.zeros(n, dtype=bool)
    consumed[graph.inputs] = True
    needed = np.zeros(n, dtype=bool)
    frontier = np.flatnonzero((~consumed | (graph.flags & 1).astype(bool)) & ~alias)
    while len(frontier):
        frontier = frontier[~needed[frontier]]
        needed[frontier] = True
        expand = frontier[~loaded[frontier]]
        nxt = graph.inputs[ranges(graph.input_offsets[expand], graph.input_offsets[expand + 1])]
        frontier = T.small_unique(nxt[~alias[nxt]])
    return overrides, needed & ~alias


# ---------------------------------------------------------------------- the end of a job
def job_ids(core, job: Job) -> np.ndarray:
    segs = core.graph.segs.segments
    parts = [np.arange(segs[k].base, segs[k].base + segs[k].n, dtype=np.int64) for k in job.segments]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def end(core, job: Job, status: str, now: float) -> None:
    job.status = status
    if status != "finished":
        core.aborted_jobs.add(job.id)
    job.ended = now
    core.ended_jobs.append(job.id)
    if core.record is not None:
        core.record.append(["end", job.id, status, job.error])
    for client in job.watchers:
        core.commands.append(M.JobDone(client, job.id, status, job_counts(core, job)))


def task_failed(core, t: int, message: str, worker_name: str, now: float) -> None:
    """Task t failed (it was live): its job fails, unless it already ended."""
    g = core.graph
    c = g.cols
    T.transition(core, np.array([t], dtype=np.int64), FAILED)
    core.stats["failed"] += 1
    job = core.jobs.get(int(c.job[t]))
    if job is None or job.status != "running":   # (a task computed again for another job's sake):
        # what of its ended job was computed again with it can never run either; the jobs
        # waiting on any of them fail
        _cancel_with_waiting(core, t, "failed", now)
        return
    job.failed += 1
    gid = g.segs.id_of(t)
    job.error = {"job": job.id, "id": gid, "task": gid - job.base if job.base <= gid < job.base + job.n else None,
                 "label": g.label(t), "symbol": g.symbols[c.symbol[t]], "worker": worker_name, "message": message}
    for client in job.watchers:
        core.commands.append(M.TaskFailed(client, job.error))
    abort(core, job, "failed", now)


def abort(core, job: Job, status: str, now: float) -> None:
    """The job ends without finishing (see the module docstring)."""
    c = core.graph.cols
    ids = job_ids(core, job)
    end(core, job, status, now)
    T.set_wanted(core, ids, False)
    state = c.state[ids]
    T.transition(core, ids[(state == WAITING) | (state == READY)], CANCELLED)
    # running tasks are stopped (programs killed) unless another job needs them; a task
    # held only by its job's tasks given ahead of it (core.speculation) goes with them
    assigned, stopped = ids[c.state[ids] == ASSIGNED], []
    while len(assigned):
        running = assigned[c.holds[assigned] <= 0]
        if not len(running):
            break
        stopped.append((running, c.worker[running]))   # (a copy: the transition clears it)
        T.transition(core, running, CANCELLED)
        assigned = assigned[c.state[assigned] == ASSIGNED]
    if stopped:
        running = np.concatenate([r for r, _ in stopped])
        where = np.concatenate([w for _, w in stopped])
        for wid in T.small_unique(where).tolist():
            worker = core.workers.get(wid)
            if worker is not None:
                core.commands.append(M.CancelTasks(worker.key, running[where == wid]))
    _fail_dependents(core, ids[c.state[ids] != FINISHED], job.id, status, now)


def _fail_dependents(core, ids: np.ndarray, job_id: int, status: str, now: float) -> None:
    """Tasks of other jobs that wait on these unfinished tasks can never run: they fail
    (a running job with them). A waiting task of an *ended* job (computed again for a
    later job's sake, through a future) is cancelled with what of its job waits on it,
    and the tasks of other jobs waiting on those fail in turn: a chain of futures across
    ended jobs leaves no job waiting for ever."""
    c = core.graph.cols
    for t in ids[(c.flags[ids] & FLAG_EXTRA) > 0].tolist():
        for consumer in core.graph.extra_consumers.get(t, []):
            other = core.jobs.get(int(c.job[consumer]))
            if other is None or other.id == job_id or c.state[consumer] not in (WAITING, READY):
                continue
            if other.status == "running":
                task_failed(core, consumer, f"input task {core.graph.segs.id_of(t)} of job {job_id} did not finish "
                                            f"({status})", "", now)
            else:
                _cancel_with_waiting(core, consumer, status, now)


def _cancel_with_waiting(core, t: int, status: str, now: float) -> None:
    """Task t of an ended job can never run (it failed, or waits on what cannot run): it
    is cancelled, unless it failed, with the tasks of its job waiting on it, and the jobs
    waiting on any of them fail."""
    c = core.graph.cols
    job_of_t = c.job[t]
    start = np.array([t], dtype=np.int64)
    waiting = T.downstream(core, start, lambda consumers: (c.state[consumers] == WAITING) & (c.job[consumers] == job_of_t))
    T.transition(core, np.concatenate([start, waiting]) if c.state[t] in (WAITING, READY) else waiting, CANCELLED)
    _fail_dependents(core, np.concatenate([start, waiting]), int(job_of_t), status, now)


def cancel(core, job_id: int, now: float) -> bool:
    job = core.jobs.get(job_id)
    if job is None:
        return False
    if job.status == "running":
        abort(core, job, "cancelled", now)
    else:   # an ended job: drop its results
        T.set_wanted(core, job.results, False)
    return True


def client_gone(core, client: bytes, now: float) -> list[int]:
    """A client disconnected: its session jobs are cancelled (running) or their
    results released (ended); detached jobs stay. Returns the cancelled ids."""
    cancelled = []
    for job in list(core.jobs.values()):
        job.watchers.discard(client)
        if job.client != client or job.detached:
            continue
        if job.status == "running":
            abort(core, job, "cancelled", now)
            cancelled.append(job.id)
        T.set_wanted(core, job.results, False)
    return cancelled


def release(core, ids: np.ndarray) -> None:
    """The client no longer wants these results (rows)."""
    c = core.graph.cols
    ids = T.small_unique(ids[(ids >= 0) & (ids < c.n)])
    T.set_wanted(core, ids, False)


# ---------------------------------------------------------------------- reports
def job_counts(core, job: Job) -> dict:
    state = core.graph.cols.state
    if len(job.segments) == 1:
        seg = core.graph.segs.segments[job.segments[0]]
        states = state[seg.base:seg.base + seg.n]
    else:
        states = state[job_ids(core, job)]
    if len(states) <= 16:   # (a small job: no vector work)
        values = states.tolist()
        counts = {name: values.count(i) for i, name in enumerate(STATE_NAMES) if i in values}
    else:
        per_state = np.bincount(states, minlength=N_STATES)
        counts = {name: int(per_state[i]) for i, name in enumerate(STATE_NAMES) if per_state[i]}
    counts["total"] = job.active
    return counts


def job_row(core, job: Job, now: float) -> dict:
    """The job as a row of ``status``."""
    return {"id": job.id, "name": job.name, "base": job.base, "status": job.status, **job_counts(core, job),
            "results": int(len(job.results)), "error": job.error,
            "elapsed_s": round((job.ended or now) - job.submitted, 3)}


def job_results(core, job_id: int, watcher: bytes | None = None) -> dict:
    """Status, counts and the results still held (with their workers' addresses) of a
    job; ``watcher`` also subscribes to its notices. KeyError for an unknown job."""
    job = core.jobs.get(job_id)
    if job is None:   # retired (it holds nothing any more), or unknown
        row = next((row for row in core.history if row["id"] == job_id), None)
        if row is None:
            raise KeyError(f"no job {job_id}")
        return {"job": job_id, "base": row.get("base", 0), "status": row["status"], "error": row["error"],
                "counts": {k: v for k, v in row.items() if k in STATE_NAMES or k == "total"},
                "ids": np.zeros(0, np.int64), "addresses": []}
    if watcher is not None:
        job.watchers.add(watcher)
    c = core.graph.cols
    held = job.results[c.owner[job.results] >= 0]
    return {"job": job.id, "base": job.base, "status": job.status, "error": job.error, "counts": job_counts(core, job),
            "ids": held, "addresses": [core.workers[int(c.owner[t])].data_address for t in held.tolist()]}


# ---------------------------------------------------------------------- retirement
def retire_jobs(core, now: float, budget: int = 1000) -> int:
    """Retire up to ``budget`` ended jobs that are done with (see the module docstring);
    the others are looked at again on a later call. Returns how many were retired."""
    retired = blocked = 0
    for _ in range(budget):
        if not core.ended_jobs or blocked >= len(core.ended_jobs):
            break   # (every one left was looked at since the last retirement)
        job = core.jobs.get(core.ended_jobs[0])
        if job is not None and now - job.ended < RETIRE_AFTER_S:
            break   # every later one ended later still
        core.ended_jobs.popleft()
        if job is None or job.status == "running":
            continue
        if _holds_nothing(core, job):
            _retire(core, job, now)
            retired += 1
            blocked = 0   # (it may have been what held the others)
        else:
            core.ended_jobs.append(job.id)
            blocked += 1
    return retired


def _forget_ready(core, spans: list) -> None:
    """The ready lists, the pool and the speculation frontiers drop their (stale) entries
    of rows about to be freed."""
    queued = [lo + np.flatnonzero(core.graph.cols.flags[lo:hi] & FLAG_QUEUED) for lo, hi in spans]
    if not any(len(q) for q in queued) and not core.pool and not core.unchecked and not core.frontier:
        return
    dead = np.zeros(core.graph.cols.n + 1, dtype=bool)
    for lo, hi in spans:
        dead[lo:hi] = True
    for wid, seeds in list(core.frontier.items()):
        core.frontier[wid] = seeds[~dead[seeds]]
    core.ready = [a[~dead[a]] for a in core.ready]
    core.unchecked = [a[~dead[a]] for a in core.unchecked]
    core.pool.forget(dead)


def _holds_nothing(core, job: Job) -> bool:
    g = core.graph
    c = g.cols
    for index in job.segments:
        seg = g.segs.segments[index]
        lo, hi = seg.base, seg.base + seg.n
        if (c.owner[lo:hi] >= 0).any() or LIVE[c.state[lo:hi]].any() or (c.holds[lo:hi] > 0).any():
            return False   # data, work, or needed by a live task
        # the lineage of another job's tasks: lost data of theirs is computed again from it
        for t in (lo + np.flatnonzero(c.flags[lo:hi] & FLAG_EXTRA)).tolist():
            if any(c.job[x] != job.id and int(c.job[x]) in core.jobs for x in g.extra_consumers.get(t, ())):
                return False
    return True


def _retire(core, job: Job, now: float) -> None:
    core.history.append(job_row(core, job, now))
    core.seal()   # (commands naming its rows name its global ids from here on)
    g = core.graph
    spans = [(seg.base, seg.base + seg.n) for seg in (g.segs.segments[index] for index in job.segments)]
    for lo, hi in spans:
        g.detach(lo, hi)
    for lo, hi in spans:
        g.forget(lo, hi)
        if core.stranded:
            core.stranded = {t: w for t, w in core.stranded.items() if not lo <= t < hi}
    _forget_ready(core, spans)
    for index in job.segments:
        g.segs.retire(index)   # (its rows are free now)
    core.aborted_jobs.discard(job.id)
    del core.jobs[job.id]
    core.stats["retired_jobs"] += 1
    if core.record is not None:
        core.record.append(["retire", job.id])

