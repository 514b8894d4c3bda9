"""The one place where task state changes, with everything that follows from a change.

``transition(core, ids, to)`` checks each task's current state against
``tasktable.ALLOWED`` (a TransitionError names the first bad move) and then keeps these
counters true, so that no other module writes them:

- ``holds[p]`` = input slots on p of *live* tasks (WAITING, READY, ASSIGNED) + 1 when a
  client wants p's data (FLAG_RESULT). A task that stops being live (finished, failed,
  cancelled, skipped) drops one hold per input slot; one that is live again (its lost
  data is computed again) takes them back. Data of a task whose holds reach 0 is
  released at once (``release_unheld``), and a waiting or ready task of an aborted job
  whose holds reach 0 is cancelled (it was computed again for another job's sake).
- ``remaining[t]`` = input slots of t whose producer is not FINISHED, for WAITING and
  READY tasks; a WAITING task with none left becomes READY in the same call
  (``make_ready``), and every READY task is in ``core.ready`` once (FLAG_QUEUED marks
  the tasks in it, stale ones included; ``put_ready``/``take_ready``) or in the ready
  pool the scheduler moved it to (``core.pool``) (and, until the
  scheduler checked that some worker can run it, in ``core.unchecked``).
- A task that leaves ASSIGNED other than FINISHED takes its ASSIGNED consumers (tasks
  given to a worker ahead of their inputs, ``core.speculation``) back with it: they are
  WAITING again, and their workers are told to drop them (``take_back``).
- A worker's ``assigned_cpus``, ``assigned_light`` and ``assigned_resources`` are the
  sums over the tasks ASSIGNED to it (``c.worker``); ``c.worker`` is -1 for the others.
- A job's ``finished`` counts its FINISHED tasks and ``active`` its tasks that are
  neither ALIAS nor SKIPPED, over all its segments.

New tasks are born here too (``add_tasks``: WAITING, ALIAS or SKIPPED), and a task's
inputs are replaced at run time here (``rewire``), so that holds, remaining counts and
priorities (``core.priority``) stay true when the graph grows. ``core.invariants.check`` recomputes all of the above from scratch.
"""

from __future__ import annotations

import numpy as np

from graphfmt.graph import Graph
from loomctl import messages as M
from loomctl.core import priority
from loomctl.core.tasktable import (ALIAS, ALLOWED, ASSIGNED, CANCELLED, FINISHED, FLAG_QUEUED, FLAG_RESULT, LIVE,
                                    READY, SKIPPED, STATE_NAMES, WAITING, add_at, distinct)


_ACTIVE = np.ones(len(STATE_NAMES), dtype=bool)   # states a job's ``active`` counts
_ACTIVE[[ALIAS, SKIPPED]] = False


class TransitionError(AssertionError):
    """A state change the table does not allow: a bug in the core, never a peer's fault."""


def small_unique(values: np.ndarray) -> np.ndarray:
    """np.unique, without its cost for the one- or two-element arrays that most
    reports carry (and by sorting for more, ``tasktable.distinct``)."""
    if len(values) <= 1:
        return values
    if len(values) == 2:
        return values[:1] if values[0] == values[1] else np.sort(values)
    return distinct(values)


def transition(core, ids: np.ndarray, to: int, worker: int | None = None) -> None:
    """Move the tasks ``ids`` (distinct) to state ``to`` (to ASSIGNED: on ``worker``)."""
    if not len(ids):
        return
    c = core.graph.cols
    prev = c.state[ids]
    allowed = ALLOWED[to, prev]
    if np.count_nonzero(allowed) != len(ids):   # (cheaper than .all() on a few)
        bad = int(ids[np.argmin(allowed)])
        raise TransitionError(f"task {bad}: {STATE_NAMES[c.state[bad]]} -> {STATE_NAMES[to]} is not allowed")
    if to == ASSIGNED:
        c.state[ids] = ASSIGNED
        _assign(core, ids, worker)
        return
    was_assigned = prev == ASSIGNED
    left = None
    assigned = np.count_nonzero(was_assigned)
    if assigned:
        left = ids if assigned == len(ids) else ids[was_assigned]
        _unassign(core, left)
    c.state[ids] = to
    if to == READY:
        put_ready(core, ids)
        core.unchecked.append(ids)
    elif to == FINISHED:
        _count(core, ids, "finished", 1)
        if core.record is not None:
            core.record.append(["finished", core.graph.ids_of(ids).astype("<i8").tobytes(),
                                c.size[ids].astype("<i8").tobytes(),
                                c.length[ids].astype("<i8").tobytes()])
        _finished(core, ids)
    elif to == WAITING:
        was_finished = prev == FINISHED
        if was_finished.any():
            _live_again(core, ids[was_finished])
        c.remaining[ids] = core.graph.unfinished_inputs(ids, FINISHED)
        make_ready(core, ids)
    else:   # FAILED, CANCELLED, SKIPPED: no longer live
        if to == SKIPPED:
            _count(core, ids, "active", -1)
        inputs = core.graph.inputs_of(ids)
        add_at(c.holds, inputs, -1)
        release_unheld(core, inputs)
    if left is not None and to != FINISHED:
        take_back(core, left)


def take_back(core, left: np.ndarray) -> None:
    """``left`` are no longer ASSIGNED and not finished: the tasks given to a worker
    ahead of them (their ASSIGNED consumers, and theirs) are WAITING again, and their
    workers drop them (CANCEL_TASKS); those of an ended job that nothing holds are
    cancelled."""
    c = core.graph.cols
    back = downstream(core, left, lambda consumers: c.state[consumers] == ASSIGNED)
    if not len(back):
        return
    for wid in small_unique(c.worker[back]).tolist():
        worker = core.workers.get(wid)
        if worker is not None:
            core.commands.append(M.CancelTasks(worker.key, back[c.worker[back] == wid]))
    transition(core, back, WAITING)
    release_unheld(core, back)


def downstream(core, start: np.ndarray, keep) -> np.ndarray:
    """The consumers of ``start``, and theirs, that ``keep`` (a mask of a consumers
    array) keeps, followed only through kept ones; distinct, sorted."""
    g = core.graph
    found = []
    frontier = start
    while len(frontier):
        consumers = g.consumers_of(frontier)
        consumers = consumers[keep(consumers)]
        if found and len(consumers):
            consumers = consumers[~np.isin(consumers, np.concatenate(found))]
        frontier = small_unique(consumers)
        if len(frontier):
            found.append(frontier)
    if not found:
        return np.zeros(0, dtype=np.int64)
    return distinct(np.concatenate(found)) if len(found) > 1 else found[0]


def put_ready(core, ids: np.ndarray) -> None:
    """Into the ready list, those of ``ids`` not there already (FLAG_QUEUED)."""
    c = core.graph.cols
    ids = ids[(c.flags[ids] & FLAG_QUEUED) == 0]
    if len(ids):
        c.flags[ids] |= FLAG_QUEUED
        core.ready.append(ids)


def take_ready(core) -> np.ndarray:
    """Everything in the ready list, emptied; of it, the tasks still READY."""
    c = core.graph.cols
    if not core.ready:
        return np.zeros(0, np.int64)
    ids = np.concatenate(core.ready) if len(core.ready) > 1 else core.ready[0]
    core.ready = []
    c.flags[ids] &= ~np.uint8(FLAG_QUEUED)
    return ids[c.state[ids] == READY]


def make_ready(core, ids: np.ndarray) -> np.ndarray:
    """WAITING tasks of ``ids`` with no input left to wait for become READY; returns them."""
    if not len(ids):
        return ids
    c = core.graph.cols
    ids = ids[(c.state[ids] == WAITING) & (c.remaining[ids] == 0)]
    transition(core, ids, READY)
    return ids


def _finished(core, ids: np.ndarray) -> None:
    """ids became FINISHED (their owner is set): consumers have one input less to wait
    for; the finished tasks' own inputs lose one hold per slot."""
    g = core.graph
    c = g.cols
    consumers = g.consumers_of(ids)
    consumers = consumers[c.state[consumers] == WAITING]
    if len(consumers):
        add_at(c.remaining, consumers, -1)
        make_ready(core, small_unique(consumers))
    inputs = g.inputs_of(ids)
    add_at(c.holds, inputs, -1)
    release_unheld(core, np.concatenate([ids, inputs]) if len(inputs) else ids)


def _live_again(core, redo: np.ndarray) -> None:
    """Finished tasks are to be computed again: they hold their inputs again, and their
    consumers that wait (or were ready) wait for them again."""
    g = core.graph
    c = g.cols
    _count(core, redo, "finished", -1)
    add_at(c.holds, g.inputs_of(redo), 1)
    consumers = g.consumers_of(redo)
    priority.raise_from(core, consumers)   # live again: ahead of its live consumers
    state = c.state[consumers]
    affected = small_unique(consumers[(state == WAITING) | (state == READY)])
    if len(affected):
        c.remaining[affected] = g.unfinished_inputs(affected, FINISHED)
        back = affected[(c.state[affected] == READY) & (c.remaining[affected] > 0)]
        transition(core, back, WAITING)


def _count(core, ids: np.ndarray, counter: str, sign: int) -> None:
    job_of = core.graph.cols.job[ids]
    if len(ids) == 1 or (job_of == job_of[0]).all():
        pairs = ((int(job_of[0]), len(ids)),)
    else:
        jobs, counts = np.unique(job_of, return_counts=True)
        pairs = zip(jobs.tolist(), counts.tolist())
    for job_id, count in pairs:
        job = core.jobs.get(job_id)
        if job is not None:
            setattr(job, counter, getattr(job, counter) + sign * count)


# ---------------------------------------------------------------------- workers' load
def _load(cpus: np.ndarray) -> tuple[int, int]:
    """(cpus asked for, light tasks) of some tasks' ``cpus`` column."""
    if len(cpus) <= 16:   # (a few: no vector work)
        values = cpus.tolist()
        return sum(values), values.count(0)
    return int(cpus.sum()), len(cpus) - int(np.count_nonzero(cpus))


def _assign(core, ids: np.ndarray, wid: int) -> None:
    g = core.graph
    c = g.cols
    worker = core.workers[wid]
    c.worker[ids] = wid
    cpus = c.cpus[ids]
    asked, light = _load(cpus)
    worker.assigned_cpus += asked
    if not g.any_named_requests:
        worker.assigned_light += light
        return
    for t, n in zip(ids.tolist(), cpus.tolist()):
        request = g.named_request(t)
        if n == 0 and not request:   # light, as placement counts it
            worker.assigned_light += 1
        for name, amount in request.items():
            worker.assigned_resources[name] = worker.assigned_resources.get(name, 0) + amount


def _unassign(core, ids: np.ndarray) -> None:
    g = core.graph
    c = g.cols
    holders = small_unique(c.worker[ids]).tolist()
    for wid in holders:
        worker = core.workers.get(wid)
        if worker is None:   # removed: its record is gone with its counters
            continue
        mine = ids if len(holders) == 1 else ids[c.worker[ids] == wid]
        cpus = c.cpus[mine]
        asked, light = _load(cpus)
        worker.assigned_cpus -= asked
        if not g.any_named_requests:
            worker.assigned_light -= light
            continue
        for t, n in zip(mine.tolist(), cpus.tolist()):
            request = g.named_request(t)
            if n == 0 and not request:
                worker.assigned_light -= 1
            for name, amount in request.items():
                worker.assigned_resources[name] = worker.assigned_resources.get(name, 0) - amount
    c.worker[ids] = -1


# ---------------------------------------------------------------------- graph growth
def add_tasks(core, job, graph: Graph, global_inputs: np.ndarray, born: np.ndarray,
              results: np.ndarray, overrides: dict | None = None) -> np.ndarray:
    """The tasks of ``graph`` join ``job`` as one new segment: ``born`` is each one's
    first state (WAITING, ALIAS or SKIPPED), ``results`` marks those a client wants;
    their live input slots hold their producers. Returns the new ids (ready ones are
    READY already)."""
    g = core.graph
    c = g.cols
    segment = g.add_segment(graph, global_inputs, job.id, overrides)
    base, n = segment.base, len(graph)
    c.state[base:base + n] = born           # the birth: the one write besides transition()
    job.segments.append(segment.index)
    job.active += int(np.count_nonzero(_ACTIVE[born]))
    wanted = base + np.flatnonzero(results)
    c.flags[wanted] |= FLAG_RESULT
    c.holds[wanted] += 1
    priority.segment_added(core, segment, graph.priorities)
    ids = np.arange(base, base + n, dtype=np.int64)   # (after the sweeps: a large submission's peak)
    is_live = LIVE[born]
    live = ids if is_live.all() else ids[is_live]
    if len(live):
        inputs = g.inputs_of(live)
        if len(inputs):
            add_at(c.holds, inputs, 1)
            c.remaining[live] = g.unfinished_inputs(live, FINISHED)
        make_ready(core, live)
    return ids


def add_task(core, job, symbol: str, config: bytes, inputs: np.ndarray, request: dict | None = None,
             label: str | None = None) -> int:
    """One new WAITING task of ``job`` (an expansion's piece, a redirection's gather)."""
    from loomctl.core.graphstate import one_task_graph
    graph = one_task_graph(symbol, config, len(inputs), request, label)
    ids = add_tasks(core, job, graph, np.asarray(inputs, dtype=np.int64), np.array([WAITING], np.uint8),
                    np.zeros(1, dtype=bool))
    job.appended = True
    return int(ids[0])


def rewire(core, t: int, symbol: str, config: bytes, inputs: np.ndarray) -> None:
    """Task t runs as (symbol, config, inputs) from now on; a live t holds the new inputs
    instead of the old, and a waiting or ready one counts what it waits for again."""
    g = core.graph
    c = g.cols
    inputs = np.asarray(inputs, dtype=np.int64)
    old = g.replace_inputs(t, symbol, config, inputs)
    priority.raise_from(core, np.array([t], dtype=np.int64))
    state = c.state[t]
    if LIVE[state]:
        add_at(c.holds, inputs, 1)       # the new first: an input in both stays held
        add_at(c.holds, old, -1)
        release_unheld(core, old)
    if state in (WAITING, READY):
        ids = np.array([t], dtype=np.int64)
        c.remaining[ids] = g.unfinished_inputs(ids, FINISHED)
        if state == READY and c.remaining[t] > 0:
            transition(core, ids, WAITING)
        else:
            make_ready(core, ids)


def set_wanted(core, ids: np.ndarray, wanted: bool) -> np.ndarray:
    """A client wants (or no longer wants) the data of ``ids``; returns those changed."""
    c = core.graph.cols
    has = (c.flags[ids] & FLAG_RESULT) > 0
    ids = ids[~has] if wanted else ids[has]
    if wanted:
        c.flags[ids] |= FLAG_RESULT
        c.holds[ids] += 1
    else:
        c.flags[ids] &= ~np.uint8(FLAG_RESULT)
        c.holds[ids] -= 1
        if core.record is not None and len(ids):
            core.record.append(["unwanted", core.graph.ids_of(ids).astype("<i8").tobytes()])   # (journals: global ids)
        release_unheld(core, ids)
    return ids


# ---------------------------------------------------------------------- data
def release_unheld(core, candidates: np.ndarray) -> None:
    """Release the data of those candidates that nothing holds any more; a waiting or
    ready task of an ended job that nothing holds any more is cancelled."""
    if not len(candidates):
        return
    c = core.graph.cols
    candidates = small_unique(candidates)
    unheld = candidates[c.holds[candidates] <= 0]
    release(core, unheld[c.owner[unheld] >= 0])
    if core.aborted_jobs and len(unheld):
        state = c.state[unheld]
        idle = unheld[(state == WAITING) | (state == READY)]
        if len(idle):
            transition(core, idle[np.isin(c.job[idle], list(core.aborted_jobs))], CANCELLED)


def release(core, ids: np.ndarray) -> None:
    """The workers holding data of ``ids`` drop it (owner and replicas)."""
    c = core.graph.cols
    ids = ids[c.owner[ids] >= 0]
    if not len(ids):
        return
    targets: dict[int, list[np.ndarray]] = {}
    for wid in small_unique(c.owner[ids]).tolist():
        targets.setdefault(wid, []).append(ids[c.owner[ids] == wid])
    if core.replicas:
        for t in ids.tolist():
            for wid in core.replicas.pop(t, ()):
                targets.setdefault(wid, []).append(np.array([t], dtype=np.int64))
    for wid, parts in targets.items():
        worker = core.workers.get(wid)
        if worker is not None:
            core.commands.append(M.ReleaseData(worker.key, np.concatenate(parts)))
    c.owner[ids] = -1
    core.n_data -= len(ids)
