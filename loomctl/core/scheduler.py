"""Placement rounds: ready tasks to workers, in batches (the policy is in placement.py).

Invariants:
- A round looks at the READY tasks of ``core.ready`` (stale entries are dropped), expands
  ready dslice/dget tasks first (their pieces are placed in the same round), and moves
  each placed task to ASSIGNED on its worker with one COMPUTE per worker. Tasks left
  over stay in ``core.ready`` for a later round, in order.
- A ready task that no connected worker can ever run (more cpus or named resources
  than any has, or a task type none supports) fails with a message saying so, as soon as
  at least one worker is connected: at submit, when a worker joins, and in the first
  round after it became READY (``core.unchecked``). After a worker is lost the check
  waits REPLACE_GRACE_S (``core.recheck_at``): a replacement that joins meanwhile may
  be the one worker that can run it.
- A worker whose last heartbeat says it is near its memory limit (``memory_near``: at
  its spill threshold, or paused) is given only tasks whose inputs are all on it, while
  some other worker is not near its limit: tasks that would bring it data (inputs from
  elsewhere, or new data from no input) go to the workers with room, or wait for them
  (unless none of those could ever run them).
"""

from __future__ import annotations

import numpy as np

from graphfmt import symbols as S
from loomctl import messages as M
from loomctl.core import dynamic, jobs, placement
from loomctl.core.workers import recompute_lost
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, FLAG_CHECKPOINT, FLAG_LOADED, FLAG_RESULT, READY


REPLACE_GRACE_S = 10.0


def schedule(core, now: float) -> int:
    """Place ready tasks on workers; returns how many were placed."""
    if core.hold_until is not None:   # restored: workers that come back bring data first
        if now < core.hold_until:
            return 0
        core.hold_until = None
        recompute_lost(core)
    if core.recheck_at is not None and now >= core.recheck_at:   # a worker left a while ago
        core.recheck_at = None
        fail_unsatisfiable(core, None, now)
    if not core.ready or not core.workers:
        return 0
    if core.unchecked and core.recheck_at is None:
        fail_unsatisfiable(core, np.concatenate(core.unchecked), now)
    for w in core.workers.values():
        w.settle(now)
    if not any(w.assigned_light < placement.LIGHT_QUEUE or w.assigned_cpus < w.queue_factor * w.cpus
               for w in core.workers.values()):
        return 0   # every worker is full: leave the ready list as it is
    g = core.graph
    c = g.cols
    ids = T.take_ready(core)
    if not len(ids):
        return 0
    core.stats["rounds"] += 1
    dynamic_codes = [g.symbol_codes[s] for s in (S.DSLICE, S.DGET) if s in g.symbol_codes]
    is_dynamic = np.isin(c.symbol[ids], dynamic_codes) if dynamic_codes else None
    if is_dynamic is not None and is_dynamic.any():
        for t in ids[is_dynamic].tolist():
            dynamic.expand(core, t, now)
        ids = np.concatenate([ids[~is_dynamic], T.take_ready(core)])   # expansions are placed now too
        ids = ids[c.state[ids] == READY]
    workers = list(core.workers.values())
    ids, deferred = _candidates(c, ids, workers)
    if len(deferred):
        T.put_ready(core, deferred)
    if not len(ids):
        return 0
    index = {w.id: k for k, w in enumerate(workers)}
    inputs, consumer_of_slot = g.slots(ids)
    task_pos = np.searchsorted(ids, consumer_of_slot)
    holder = np.array([index.get(int(w), -1) for w in c.owner[inputs]], dtype=np.int64) \
        if len(inputs) else np.zeros(0, np.int64)
    best, best_bytes = placement.preferences(task_pos, holder, c.size[inputs], len(ids))
    rooms = [placement.WorkerRoom(k, w.cpus, w.assigned_cpus, w.assigned_light, w.resources,
                                  dict(w.assigned_resources), support_mask(core, w), w.queue_factor)
             for k, w in enumerate(workers)]
    requests = {}
    named = ids if g.any_named_requests else ids[:0]   # a 0-cpu task may name resources too
    for t in named.tolist():
        request = g.named_request(t)
        if request:
            requests[int(np.searchsorted(ids, t))] = request
    near = [k for k, w in enumerate(workers) if w.stats.get("memory_near") is True]
    if near and len(near) < len(workers):
        only = _local_only(len(ids), task_pos, holder, c.size[inputs], near)
        chosen = _place_by_memory(c.cpus[ids], c.symbol[ids], best, best_bytes, rooms, requests, near, only)
    else:
        chosen = placement.place(c.cpus[ids], c.symbol[ids], best, best_bytes, rooms, requests)
    placed = 0
    for k, w in enumerate(workers):
        mine = ids[chosen == k]
        if len(mine):
            T.transition(core, mine, ASSIGNED, w.id)
            core.commands.append(compute(core, w, mine))
            placed += len(mine)
    waiting = ids[chosen < 0]
    if len(waiting):
        T.put_ready(core, waiting)
    core.stats["scheduled"] += placed
    return placed


def _local_only(n: int, task_pos: np.ndarray, holder: np.ndarray, sizes: np.ndarray, near: list) -> np.ndarray:
    """Per task of a round: the near-limit worker that holds all its input bytes (and
    some), or -1."""
    total = np.zeros(n, dtype=np.int64)
    np.add.at(total, task_pos, sizes)
    only = np.full(n, -1, dtype=np.int64)
    for k in near:
        mine = holder == k
        local = np.zeros(n, dtype=np.int64)
        np.add.at(local, task_pos[mine], sizes[mine])
        only[(local > 0) & (local == total)] = k
    return only


def _place_by_memory(cpus, symbols, best, best_bytes, rooms, requests, near, only) -> np.ndarray:
    """``placement.place`` by groups: a task may go to the workers not near their memory
    limit, and to the near-limit worker holding all its data (``only``), if any."""
    chosen = np.full(len(cpus), -1, dtype=np.int64)
    roomy = [r for r in rooms if r.index not in near]
    for k in [-1, *near]:
        sel = np.flatnonzero(only == k)
        if not len(sel):
            continue
        subset = roomy + [rooms[k]] if k >= 0 else roomy
        allowed = np.zeros(len(rooms), dtype=bool)
        allowed[[r.index for r in subset]] = True
        b = best[sel]
        keep = b >= 0
        keep[keep] = allowed[b[keep]]
        b = np.where(keep, b, -1)   # (a preferred worker left out is no preference)
        group_requests = {j: requests[p] for j, p in enumerate(sel.tolist()) if p in requests}
        chosen[sel] = placement.place(cpus[sel], symbols[sel], b, np.where(keep, best_bytes[sel], 0), subset,
                                      group_requests)
    # a task that no worker with room could ever run may go anywhere (it would wait for ever)
    stuck = np.array([p for p in np.flatnonzero(chosen < 0).tolist() if not any(
        placement.could_run(r, int(cpus[p]), int(symbols[p]), requests.get(p)) for r in roomy)], dtype=np.int64)
    if len(stuck):
        chosen[stuck] = placement.place(cpus[stuck], symbols[stuck], best[stuck], best_bytes[stuck], rooms,
                                        {j: requests[p] for j, p in enumerate(stuck.tolist()) if p in requests})
    return chosen


def _candidates(c, ids: np.ndarray, workers: list) -> tuple[np.ndarray, np.ndarray]:
    """The ready tasks worth considering this round (sorted), and the rest, kept in
    order for later rounds: no more light tasks than the workers' light queues can
    take, and a few times as many cpu tasks as there are free cpu slots."""
    light_room = sum(max(0, placement.LIGHT_QUEUE - w.assigned_light) for w in workers)
    cpu_room = sum(max(0, w.queue_factor * w.cpus - w.assigned_cpus) for w in workers)
    is_light = c.cpus[ids] == 0
    light, heavy = ids[is_light], ids[~is_light]
    heavy_take = 4 * cpu_room + 16 if cpu_room else 0
    taken = np.concatenate([light[:light_room], heavy[:heavy_take]])
    rest = np.concatenate([light[light_room:], heavy[heavy_take:]])
    return np.sort(taken), rest


def compute(core, worker, ids: np.ndarray) -> M.Compute:
    """The COMPUTE command giving ``ids`` to ``worker``."""
    g = core.graph
    c = g.cols
    rows = []
    locations = {}
    segments = g.segs.segments
    watched = {}
    for t, s in zip(ids.tolist(), g.segs.of(ids).tolist()):
        seg = segments[s]
        local = t - seg.base
        graph = seg.graph
        override = g.overrides.get(t)
        if override is not None:
            symbol, config, inputs = override
        else:
            symbol = g.symbols[c.symbol[t]]
            config = graph.configs[local]
            inputs = seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]]
        input_list = inputs.tolist()
        for i in input_list:
            holder = c.owner[i]
            if holder != worker.id and i not in locations and holder >= 0:
                if worker.id not in core.replicas.get(i, ()):
                    locations[i] = core.workers[int(holder)].data_address
        flags = c.flags[t]
        checkpoint = graph.checkpoint(local) if flags & FLAG_CHECKPOINT and not flags & FLAG_LOADED else None
        inline = False
        if flags & FLAG_RESULT:
            job_id = int(c.job[t])
            inline = watched.get(job_id)
            if inline is None:
                job = core.jobs.get(job_id)
                inline = watched[job_id] = job is not None and bool(job.watchers)
        rows.append(M.ComputeRow(t, symbol, config, input_list, int(c.cpus[t]), g.named_request(t) or None,
                                 checkpoint, graph.label(local), inline))
    return M.Compute(worker.key, rows, locations, c.job[ids].astype(np.int64))


def fail_unsatisfiable(core, ids: np.ndarray | None, now: float) -> None:
    """Fail ready tasks (all, or those of ``ids``) no connected worker can ever run
    (needs >= 1 worker). Tasks become READY into ``core.unchecked`` too, so that each is
    looked at once: the calls with ``ids`` take those."""
    if not core.workers or not core.ready:
        return
    g = core.graph
    c = g.cols
    core.unchecked = []
    if ids is None:
        ids = T.take_ready(core)
        T.put_ready(core, ids)
    ids = ids[c.state[ids] == READY]
    if not len(ids):
        return
    max_cpus = max(w.cpus for w in core.workers.values())
    for t in ids[c.cpus[ids] > max_cpus].tolist():
        if c.state[t] == READY:   # (a failure before may have cancelled it with its job)
            jobs.task_failed(core, t, f"requests {c.cpus[t]} cpus, but the largest connected worker has "
                                      f"{max_cpus}", "", now)
    if g.any_named_requests:
        for t in ids.tolist():
            request = g.named_request(t)
            if request and c.state[t] == READY and not any(
                    w.cpus >= c.cpus[t] and all(w.resources.get(k, 0) >= v for k, v in request.items())
                    for w in core.workers.values()):
                wanted = ", ".join(f"{k}={v}" for k, v in sorted(request.items()))
                jobs.task_failed(core, t, f"requests {wanted} with {c.cpus[t]} cpus, but no connected worker "
                                          "has that much", "", now)
    codes = set(c.symbol[ids].tolist()) if len(ids) < 64 else np.unique(c.symbol[ids]).tolist()
    for code in sorted(codes):
        symbol = g.symbols[code]
        if symbol in (S.DSLICE, S.DGET) or any(supports(w, symbol) for w in core.workers.values()):
            continue
        for t in ids[c.symbol[ids] == code].tolist():
            if c.state[t] == READY:
                jobs.task_failed(core, t, f"no connected worker supports task type {symbol!r}", "", now)


def support_mask(core, worker) -> np.ndarray | None:
    """Bool per global symbol code: can this worker run it (None: everything)."""
    if not worker.symbols:
        return None
    mask = worker.support_mask
    symbols = core.graph.symbols
    if mask is None or len(mask) != len(symbols):
        mask = worker.support_mask = np.array([supports(worker, s) for s in symbols], dtype=bool)
    return mask


def supports(worker, symbol: str) -> bool:
    return symbol in worker.symbols or (symbol.startswith("loom/") and not worker.symbols)
