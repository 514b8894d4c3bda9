"""What workers report: finished tasks, failed tasks, replicas they fetched, and the
data a worker joining again still holds.

Invariants:
- A report counts only for a task ASSIGNED to the reporting worker: anything else (a
  task re-run elsewhere, an unknown id, one reported twice) changes nothing, and data
  the worker holds for it is released there, unless the server counts that worker as a
  holder of the task's data already.
- A task that failed only because an input could not be fetched from a live peer (the
  worker marks it ``unfetched``) waits and runs again, counting an attempt; at
  workers.MAX_ATTEMPTS attempts it fails. Any other failure fails it at once.
- A late result of a job that ended without finishing is dropped (the task is
  CANCELLED), unless a task of another job holds it.
- A copy a worker fetched of data that lost its holder since is taken as the data
  (where something still needs it), never released under the task that fetched it.
- A finished task is FINISHED with its data on that worker before anything else is
  decided, so that consumers made ready by it can be placed next to it.
- Results of a job's watched tasks are announced (RESULTS_READY) before the job's end
  (JOB_DONE).
"""

from __future__ import annotations

import numpy as np

from loomctl import messages as M
from loomctl.core import jobs, speculation
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, CANCELLED, FLAG_RESULT, READY, WAITING
from loomctl.core.workers import MAX_ATTEMPTS

MAX_REPORTED = 1 << 48   # bound of the sizes and lengths a worker reports (no object is 256 TiB)


def _first_of_each(ids: np.ndarray, *columns: np.ndarray):
    """ids without repeats (the first report of each wins), and the matching columns."""
    if len(ids) > 1:
        ordered = np.sort(ids)
        if (ordered[1:] == ordered[:-1]).any():
            keep = np.sort(np.unique(ids, return_index=True)[1])
            return (ids[keep], *(col[keep] for col in columns))
    return (ids, *columns)


def tasks_finished(core, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
                   now: float, inline: dict[int, bytes] | None = None) -> None:
    """A worker finished ``ids`` and holds their data; ``inline`` has the encodings of
    some (small results it was asked to send along), passed on to the watchers."""
    c = core.graph.cols
    worker = core.workers.get(wid)
    valid = (ids >= 0) & (ids < c.n)
    ids, sizes, lengths = _first_of_each(ids[valid], sizes[valid], lengths[valid])
    # sizes are summed into statistics: a bogus one near 2**63 would overflow them
    sizes = np.minimum(np.maximum(sizes, 0), MAX_REPORTED)   # (np.clip, without its Python layers)
    lengths = np.minimum(np.maximum(lengths, 0), MAX_REPORTED)
    mine = (c.state[ids] == ASSIGNED) & (c.worker[ids] == wid)
    if core.aborted_jobs:   # tasks of cancelled/failed jobs that were still running,
        # unless a task of another job needs them
        late = mine & np.isin(c.job[ids], list(core.aborted_jobs)) & (c.holds[ids] <= 0)
        if late.any():
            T.transition(core, ids[late], CANCELLED)
            mine &= ~late
    everything_mine = np.count_nonzero(mine) == len(mine)   # (the usual report: nothing to adopt, nothing stale)
    if worker is not None and not everything_mine:   # not assigned here, but ready, wanted and not
        # computed yet (the report of a task that ran on while its worker was away, its server
        # restarted): taken
        adopt = ~mine & (c.state[ids] == READY) & (c.holds[ids] > 0)
        if adopt.any():
            data_returned(core, wid, ids[adopt], sizes[adopt], lengths[adopt], now)
            ids, sizes, lengths, mine = ids[~adopt], sizes[~adopt], lengths[~adopt], mine[~adopt]
    stale = ids[:0] if everything_mine else ids[~mine]
    if len(stale) and worker is not None:   # cancelled or re-run elsewhere: drop the copy,
        # but not one it holds as the server knows (a report repeated)
        stale = stale[c.owner[stale] != wid]
        if core.replicas:
            stale = np.array([t for t in stale.tolist() if wid not in core.replicas.get(t, ())], dtype=np.int64)
        if len(stale):
            core.commands.append(M.ReleaseData(worker.key, stale))
    if not everything_mine:
        ids, sizes, lengths = ids[mine], sizes[mine], lengths[mine]
    if not len(ids):
        return
    c.owner[ids] = wid
    c.size[ids] = sizes
    c.length[ids] = lengths
    core.n_data += len(ids)
    core.stats["finished"] += len(ids)
    if worker is not None:
        worker.tasks_done += len(ids)
        worker.count_finished(int(np.count_nonzero(c.cpus[ids])), now)
    T.transition(core, ids, jobs.FINISHED)
    speculation.inputs_finished(core, ids)
    _announce(core, ids, worker, now, inline)


def _announce(core, ids: np.ndarray, worker, now: float, inline: dict | None = None) -> None:
    """Tasks of ``ids`` just finished with their data on ``worker``: their watchers hear
    of the results among them, and the jobs they complete end."""
    c = core.graph.cols
    results = ids[(c.flags[ids] & FLAG_RESULT) > 0]
    job_of = c.job[ids]
    if len(ids) == 1 or (job_of == job_of[0]).all():   # the usual case: one job
        per_job = [int(job_of[0])]
    else:
        per_job = T.small_unique(job_of).tolist()
    for job_id in per_job:
        job = core.jobs.get(job_id)
        if job is None:
            continue
        mine = results[c.job[results] == job_id] if len(per_job) > 1 else results
        if len(mine) and job.watchers:
            address = worker.data_address if worker is not None else ""
            sent = {t: inline[t] for t in mine.tolist() if t in inline} if inline else {}
            for client in job.watchers:
                core.commands.append(M.ResultsReady(client, job_id, mine, [address] * len(mine), sent))
        if job.finished >= job.active and job.status == "running":
            jobs.end(core, job, "finished", now)


def data_returned(core, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray, now: float) -> None:
    """Worker ``wid`` joined (again) holding the data of ``ids``: what is still needed is
    taken as held there (a task being computed again meanwhile, or still running
    elsewhere, counts as finished: the other run's report will be stale), a copy of data
    another worker holds is a replica, and the rest is released there."""
    c = core.graph.cols
    worker = core.workers[wid]
    valid = (ids >= 0) & (ids < c.n)
    ids, sizes, lengths = _first_of_each(ids[valid], sizes[valid], lengths[valid])
    state, owner, needed = c.state[ids], c.owner[ids], c.holds[ids] > 0
    replica = (state == jobs.FINISHED) & (owner >= 0) & (owner != wid)
    for t in ids[replica].tolist():
        core.replicas.setdefault(t, set()).add(wid)
    orphan = (state == jobs.FINISHED) & (owner < 0) & needed
    redone = ((state == WAITING) | (state == READY) | (state == ASSIGNED)) & needed
    take = orphan | redone
    taken = ids[take]
    c.owner[taken] = wid
    c.size[taken] = np.clip(sizes[take], 0, MAX_REPORTED)
    c.length[taken] = np.clip(lengths[take], 0, MAX_REPORTED)
    core.n_data += len(taken)
    finished = ids[redone]
    if len(finished):
        T.transition(core, finished, jobs.FINISHED)
        _announce(core, finished, worker, now)
    rest = ids[~(take | replica)]
    if len(rest):
        core.commands.append(M.ReleaseData(worker.key, rest))


def tasks_failed(core, wid: int, failures: list, now: float, unfetched: set = frozenset()) -> None:
    """``failures``: [(task id, message)] from worker ``wid``; ``unfetched``: those of them
    that failed because an input could not be fetched from a peer the server still counts
    as alive (the worker says so): they wait and run again, up to workers.MAX_ATTEMPTS
    attempts in all (a blip between two workers costs an attempt, not the job)."""
    g = core.graph
    c = g.cols
    worker = core.workers.get(wid)
    for task_id, message in failures:
        if not (0 <= task_id < c.n) or c.state[task_id] != ASSIGNED or c.worker[task_id] != wid:
            continue
        if core.stranded.pop(task_id, None) == wid:   # its input was on a lost worker
            T.transition(core, np.array([task_id], dtype=np.int64), WAITING)
            continue
        if task_id in unfetched:
            c.attempts[task_id] += 1
            if c.attempts[task_id] < MAX_ATTEMPTS:
                T.transition(core, np.array([task_id], dtype=np.int64), WAITING)
                continue
            message = f"{message} (tried {MAX_ATTEMPTS} times)"
        jobs.task_failed(core, task_id, str(message), worker.name if worker else "?", now)


def replicas_added(core, wid: int, ids: np.ndarray, now: float) -> None:
    """Worker ``wid`` fetched copies of ``ids`` from its peers and keeps them. A copy of
    data that has no holder now (its holder was lost after the fetch: it is being
    computed again, maybe for the very task that fetched it) is the data, where still
    needed (``data_returned``); a copy of data released meanwhile is dropped there."""
    c = core.graph.cols
    ids = ids[(ids >= 0) & (ids < c.n)]
    core.stats["transfers"] += len(ids)
    core.stats["transfer_bytes"] += int(c.size[ids].sum())
    for t in ids[(c.owner[ids] >= 0) & (c.owner[ids] != wid)].tolist():
        core.replicas.setdefault(t, set()).add(wid)
    orphans = ids[c.owner[ids] < 0]
    if len(orphans) and wid in core.workers:
        data_returned(core, wid, orphans, c.size[orphans], c.length[orphans], now)
