"""Work stealing: queued tasks that have not started move from a loaded worker to an
idle one.

The server does not know which of a worker's assigned tasks have started, so it asks:
when a round leaves some worker with cpus nobody is assigned to and no ready cpu task
is waiting, every worker whose assigned cpu tasks that could start (not those given
ahead of their inputs, core.speculation: they wait for a producer there and cannot
move) need more cpus than it has gets a ``StealTasks`` with those of them one idle
worker could run (as many free cpus, the named resources, the task type:
``placement.could_run``) and how many to give back (its surplus, at most the idle
cpus). The worker gives back that many that have not started, those it would start
last first, and always answers
(``tasks_returned``, maybe with none). The tasks given back wait again (ASSIGNED ->
WAITING, then READY at once: their inputs are finished), and the next round places
them with the usual locality rule, where the idle cpus are.

Invariants:
- At most one request is outstanding per worker (``core.steals``: worker id -> the
  ids asked for, never none); a request names only tasks ASSIGNED to that worker when
  it is sent, and only tasks an idle worker could run (no task goes back and forth
  between a loaded worker and idle ones that cannot run it). Requests to a worker that
  was lost are dropped by the next round.
- An answer counts only for tasks still ASSIGNED to the answering worker and asked of
  it: a task it finished meanwhile, or one never asked for, changes nothing.
"""

from __future__ import annotations

import numpy as np

from loomctl import messages as M
from loomctl.core import placement
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, FINISHED, WAITING


def request(core, now: float) -> int:
    """Ask loaded workers for queued tasks if some cpus idle; returns the requests sent."""
    for wid in [w for w in core.steals if w not in core.workers]:
        del core.steals[wid]
    workers = list(core.workers.values())
    free = [w.cpus - w.assigned_cpus for w in workers if w.assigned_cpus < w.cpus]
    idle = sum(free)
    if idle <= 0 or core.pool.has_heavy():
        return 0
    g = core.graph
    c = g.cols
    n = c.n
    assigned = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.cpus[:n] > 0))
    assigned = assigned[g.unfinished_inputs(assigned, FINISHED) == 0]   # (not those given ahead)
    owners = c.worker[assigned]
    queued = np.bincount(owners, weights=c.cpus[assigned], minlength=core.next_worker + 1)
    movable = assigned[c.cpus[assigned] <= max(free)]   # (what some idle worker has the cpus for)
    if len(movable):
        movable = movable[_runnable_on_idle(core, [w for w in workers if w.assigned_cpus < w.cpus], movable)]
    victims = sorted((w for w in workers if queued[w.id] > w.cpus and w.id not in core.steals),
                     key=lambda w: (w.cpus - queued[w.id], w.id))
    sent = 0
    for w in victims:
        if idle <= 0:
            break
        count = min(int(queued[w.id]) - w.cpus, idle)
        ids = movable[c.worker[movable] == w.id]
        if not len(ids):
            continue
        core.steals[w.id] = ids
        core.commands.append(M.StealTasks(w.key, ids, int(count)))
        idle -= count
        sent += 1
    core.stats["steal_requests"] = core.stats.get("steal_requests", 0) + sent
    return sent


def _runnable_on_idle(core, idle: list, ids: np.ndarray) -> np.ndarray:
    """Per task of ``ids``: whether one of the ``idle`` workers could run it (its named
    resources and type too; placement.could_run), decided once per kind of task."""
    from loomctl.core.scheduler import support_mask
    g = core.graph
    c = g.cols
    rooms = [placement.WorkerRoom(k, w.cpus, w.assigned_cpus, w.assigned_light, w.resources,
                                  supports=support_mask(core, w)) for k, w in enumerate(idle)]
    kinds: dict = {}
    out = np.zeros(len(ids), dtype=bool)
    for k, (t, cpus, symbol) in enumerate(zip(ids.tolist(), c.cpus[ids].tolist(), c.symbol[ids].tolist())):
        request = g.named_request(t) if g.any_named_requests else {}
        key = (cpus, symbol, tuple(sorted(request.items())))
        if key not in kinds:
            kinds[key] = any(placement.could_run(r, cpus, symbol, request) for r in rooms)
        out[k] = kinds[key]
    return out


def tasks_returned(core, wid: int, ids: np.ndarray, now: float) -> None:
    """Worker ``wid`` answers its steal request: ``ids`` are back, not started."""
    asked = core.steals.pop(wid, None)
    if asked is None or not len(ids):
        return
    c = core.graph.cols
    ids = T.small_unique(ids[(ids >= 0) & (ids < c.n)])
    ids = ids[np.isin(ids, asked) & (c.state[ids] == ASSIGNED) & (c.worker[ids] == wid)]
    if len(ids):
        core.stats["stolen"] = core.stats.get("stolen", 0) + len(ids)
        T.transition(core, ids, WAITING)   # READY at once: their inputs are finished


def check(core) -> None:
    for wid, ids in core.steals.items():
        if wid in core.workers:
            assert len(ids), f"an empty steal request to worker {wid}"
