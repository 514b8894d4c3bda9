"""The graph growing at run time: a Python task's redirection to a sub-plan, and the
expansion of dslice/dget once the length of their input is known.

Invariants:
- Growth goes through ``transitions.add_tasks`` / ``add_task`` (new tasks join the
  redirecting or expanding task's job as new segments) and ``transitions.rewire`` (a
  task's inputs replaced), so holds, remaining counts and consumer edges stay true.
- A redirecting task becomes ``get(array_make(root), 0)`` of its sub-plan's root: an
  identity that takes no cpu, so its consumers see the root's data as its result.
- An expanded dslice/dget and its single consumer f are SKIPPED; k pieces of the input
  (slices, or one get per element) each feed a copy of f (with f's request and label),
  and the array_make that gathered f gathers the copies in order.
"""

from __future__ import annotations

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph, GraphError
from loomctl.core import jobs
from loomctl.core import transitions as T
from loomctl.core.tasktable import ALIAS, ASSIGNED, CANCELLED, SKIPPED, WAITING

PIECES_PER_CPU = 4   # a dslice cuts its input into about this many slices per connected cpu


def redirect(core, wid: int, t: int, graph: Graph, now: float) -> None:
    """Task t (ASSIGNED to ``wid``) returned a sub-plan: run it in t's place."""
    g = core.graph
    c = g.cols
    if not (0 <= t < c.n) or c.state[t] != ASSIGNED or c.worker[t] != wid:
        return
    worker = core.workers[wid]
    job = core.jobs.get(int(c.job[t]))
    ids = np.array([t], dtype=np.int64)
    if job is None or job.status != "running":   # a late report of an ended job
        T.transition(core, ids, CANCELLED)
        return
    inputs = g.inputs(t).copy()
    try:
        roots = graph.result_ids()
        if len(roots) != 1:
            raise jobs.SubmitError("a redirection must have exactly one result")
        local_to_global, alias = jobs.map_inputs(core, graph, inputs)
    except (jobs.SubmitError, GraphError) as exc:
        jobs.task_failed(core, t, f"invalid redirection: {exc}", worker.name, now)
        return
    born = np.where(alias, ALIAS, WAITING).astype(np.uint8)
    T.add_tasks(core, job, graph, local_to_global[graph.inputs], born, np.zeros(len(graph), dtype=bool))
    job.appended = True
    gather = T.add_task(core, job, S.ARRAY_MAKE, b"", np.array([local_to_global[roots[0]]]))
    T.rewire(core, t, S.GET, S.encode_u64(0), np.array([gather]))
    T.transition(core, ids, WAITING)
    c.cpus[t] = 0   # (not ASSIGNED now: no worker counts its cpus)


def expand(core, t: int, now: float) -> None:
    """dslice(x) / dget(x), READY (x finished): see the module docstring."""
    g = core.graph
    c = g.cols
    job = core.jobs.get(int(c.job[t]))
    (x,) = g.inputs(t).tolist()
    consumers = g.consumers(t)
    fail = None
    if len(set(consumers)) != 1:
        fail = "dslice/dget must have exactly one consumer task"
    else:
        f = consumers[0]
        f_consumers = g.consumers(f)
        if len(set(f_consumers)) != 1 or g.symbols[c.symbol[f_consumers[0]]] != S.ARRAY_MAKE:
            fail = "the consumer of dslice/dget must be gathered by one array_make"
    if fail or job is None:
        jobs.task_failed(core, t, fail or "its job is gone", "", now)
        return
    gather = f_consumers[0]
    length = int(c.length[x])
    if g.symbols[c.symbol[t]] == S.DGET:
        pieces = [(S.GET, S.encode_u64(i)) for i in range(length)]
    else:
        total_cpus = sum(w.cpus for w in core.workers.values()) or 1
        k = max(1, min(length, PIECES_PER_CPU * total_cpus))
        bounds = np.linspace(0, length, k + 1).astype(np.int64)
        pieces = [(S.SLICE, S.encode_slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    f_symbol, f_config, f_inputs = g.task(f)
    seg, local = g.segs.locate(f)
    f_request, f_label = seg.graph.request(local), seg.graph.label(local)
    copies = []
    for piece_symbol, piece_config in pieces:
        piece = T.add_task(core, job, piece_symbol, piece_config, np.array([x]))
        copies.append(T.add_task(core, job, f_symbol, f_config, np.where(f_inputs == t, piece, f_inputs),
                                 f_request, f_label))
    gathered = [np.array(copies, dtype=np.int64) if i == f else np.array([i], dtype=np.int64)
                for i in g.inputs(gather).tolist()]
    T.rewire(core, gather, S.ARRAY_MAKE, b"", np.concatenate(gathered) if gathered else np.zeros(0, np.int64))
    T.transition(core, np.array([t, f], dtype=np.int64), SKIPPED)

