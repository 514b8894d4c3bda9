"""Speculative assignment: a task whose unfinished inputs are all being computed on one
worker goes to that worker ahead of time, so that a chain runs at the worker's speed
(it starts each task once its inputs are produced there) instead of costing a report, a
round and a COMPUTE per link. The server still decides, and takes such tasks back.

A *speculative* task is ASSIGNED while some input of it is not FINISHED (no flag: the
states say it). Rounds make them (``extend``): when a round assigns tasks to a worker w,
their WAITING consumers whose every unfinished input is ASSIGNED to w (finished inputs
may be anywhere: w fetches them as usual) go to w too, in the same COMPUTE after their
producers, generation by generation, within a bounded lookahead: light tasks while w has
fewer than SPECULATE_LIGHT light tasks assigned, cpu tasks within w's queue room
(queue_factor x cpus). Where the lookahead ran out, the last generation is kept in
``core.frontier[w]`` and the next rounds go on from it (``resume``), so that a chain of a
million goes out in batches. Not speculated: dslice/dget (the server expands them), tasks
naming resources, tasks w cannot run, and anything for a worker near its memory limit.

Invariants (``check``):
- Every unfinished input of a speculative task is ASSIGNED to the task's worker, unless
  the task is ``stranded`` (an input's data was lost with another worker and is being
  computed again, core.workers).
- A worker has at most SPECULATE_LIGHT light speculative tasks that are not stranded.
- A task that leaves ASSIGNED other than FINISHED (it failed, was cancelled, given back,
  redirected, or its worker was lost) takes its ASSIGNED consumers back with it:
  ``transitions.take_back`` makes them WAITING again and sends CANCEL_TASKS to their
  worker, so no worker is left waiting for an input that will not be produced there.
- The frontier is only a hint: losing it costs a round trip, never progress (a chain's
  next task becomes READY when its input finishes, and the round speculates from there).
"""

from __future__ import annotations

import numpy as np

from graphfmt import symbols as S
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, FINISHED, WAITING

SPECULATE_LIGHT = 2048   # light tasks assigned to one worker, at most, for speculation to add more
EMPTY = np.zeros(0, dtype=np.int64)


def resume(core) -> int:
    """Go on from the frontiers the last rounds left; one COMPUTE per worker given
    something. Returns how many tasks were assigned."""
    if not core.frontier:
        return 0
    from loomctl.core.scheduler import compute
    c = core.graph.cols
    placed = 0
    for wid in list(core.frontier):
        w = core.workers.get(wid)
        seeds = core.frontier.pop(wid)
        if w is None:
            continue
        state = c.state[seeds]
        seeds = seeds[((state == ASSIGNED) & (c.worker[seeds] == wid)) | (state == FINISHED)]
        more = extend(core, w, seeds)
        if len(more):
            core.commands.append(compute(core, w, more))
            placed += len(more)
    return placed


def extend(core, w, seeds: np.ndarray) -> np.ndarray:
    """Assign to worker ``w`` the consumers of ``seeds`` (tasks ASSIGNED to w, or
    finished) that may go there ahead of their inputs, and theirs, within the
    lookahead; returns them, producers before consumers (the order of COMPUTE rows)."""
    if not len(seeds) or w.stats.get("memory_near") is True:
        return EMPTY
    g = core.graph
    c = g.cols
    light_room = SPECULATE_LIGHT - w.assigned_light
    cpu_room = w.queue_factor * w.cpus - w.assigned_cpus
    if light_room <= 0 and cpu_room <= 0:
        _keep(core, w.id, seeds)
        return EMPTY
    from loomctl.core.scheduler import support_mask
    mask = support_mask(core, w)
    dynamic = [g.symbol_codes[s] for s in (S.DSLICE, S.DGET) if s in g.symbol_codes]
    taken: list[int] = []
    seen: set[int] = set()
    wid = w.id
    state, worker, cpus, symbol = c.state, c.worker, c.cpus, c.symbol
    while len(seeds):
        generation = []
        cut = False
        for x in _waiting_consumers(g, seeds):
            if x in seen:
                continue
            inputs = g.inputs(x).tolist()
            if not all(i in seen or state[i] == FINISHED or (state[i] == ASSIGNED and worker[i] == wid)
                       for i in inputs):
                continue
            code = symbol[x]
            need = int(cpus[x])
            if code in dynamic or (mask is not None and not mask[code]) or need > w.cpus or \
                    (g.any_named_requests and g.named_request(x)):
                continue
            if need == 0:
                if light_room <= 0:
                    cut = True
                    continue
                light_room -= 1
            else:
                if need > cpu_room:
                    cut = True
                    continue
                cpu_room -= need
            seen.add(x)
            generation.append(x)
        taken.extend(generation)
        if cut:   # (what this generation took has consumers not looked at either)
            _keep(core, wid, np.concatenate([seeds, np.array(generation, dtype=np.int64)]))
            break
        seeds = np.array(generation, dtype=np.int64)
    if not taken:
        return EMPTY
    ids = np.array(taken, dtype=np.int64)
    T.transition(core, np.sort(ids), ASSIGNED, wid)
    core.stats["speculated"] = core.stats.get("speculated", 0) + len(ids)
    return ids


def _waiting_consumers(g, seeds: np.ndarray) -> list[int]:
    """The WAITING consumers of ``seeds``, each once, in id order."""
    state = g.cols.state
    if len(seeds) == 1:
        consumers = g.consumers(int(seeds[0]))
        if len(consumers) == 1:   # a chain: no numpy on the way
            return consumers if state[consumers[0]] == WAITING else []
        consumers = np.array(consumers, dtype=np.int64)
    else:
        consumers = g.consumers_of(seeds)
    return T.small_unique(consumers[state[consumers] == WAITING]).tolist()


def _keep(core, wid: int, seeds: np.ndarray) -> None:
    """Rounds go on from ``seeds`` on worker ``wid`` (its lookahead ran out)."""
    old = core.frontier.get(wid)
    core.frontier[wid] = seeds if old is None else np.union1d(old, seeds)


def check(core) -> None:
    c = core.graph.cols
    n = c.n
    assigned = np.flatnonzero(c.state[:n] == ASSIGNED)
    if not len(assigned):
        return
    inputs, consumer = core.graph.slots(assigned)
    pending = c.state[inputs] != FINISHED
    inputs, consumer = inputs[pending], consumer[pending]
    stranded = np.isin(consumer, np.fromiter(core.stranded, dtype=np.int64, count=len(core.stranded)))
    bad = ~stranded & ((c.state[inputs] != ASSIGNED) | (c.worker[inputs] != c.worker[consumer]))
    assert not bad.any(), f"speculative task {consumer[bad][:1].tolist()} waits for an input not computed on its worker"
    speculative = np.unique(consumer[~stranded])
    light = speculative[c.cpus[speculative] == 0]
    counts = np.bincount(c.worker[light], minlength=1)
    assert not len(light) or counts.max() <= SPECULATE_LIGHT, "too many light tasks speculated on a worker"
