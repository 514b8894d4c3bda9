"""Placement rounds: ready tasks to workers, in batches (the policy is in placement.py).

Invariants:
- A round moves the tasks that became READY (``core.ready``) into the ready pool
  (``core.pool``, ordered by ``priority.keys``: user priority, then b-level), expanding
  ready dslice/dget tasks first (their pieces are placed in the same round); it takes
  the best tasks the workers have room for, moves each placed one to ASSIGNED on its
  worker with one COMPUTE per worker (rows in priority order), and puts the others
  back at the front of the pool.
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
- Cpu tasks are placed once some worker has used up half of its queue or has an idle
  cpu (``placement.wants_work``); light tasks whenever some are ready. A worker that a
  round could not fill is *starved* (``core.starved``) and calls for a round again only
  once it has an idle cpu.
- With ``options.steal``, a round that leaves a worker with idle cpus and no ready cpu
  task asks loaded workers to give queued tasks back (``stealing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphfmt import symbols as S
from loomctl import messages as M
from loomctl.core import dynamic, jobs, placement, priority, speculation, stealing
from loomctl.core.compute import compute
from loomctl.core.workers import recompute_lost
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, READY


@dataclass
class Options:
    """The scheduler's policy switches (the simulator compares them, bench/README.md)."""
    blevel: bool = True        # order ready tasks by b-level (after the user's priority)
    steal: bool = False        # ask loaded workers to give queued tasks back (server start --steal)
    spill: bool = True         # a task may leave its data's worker when another has an idle cpu, copies
    #                            count as data, ties spread (off: the rule before, owners only, wait)
    speculate: bool = True     # give consumers to the worker computing their inputs, ahead (core.speculation)


REPLACE_GRACE_S = 10.0


def schedule(core, now: float) -> int:
    """Place ready tasks on workers (and go on with chains given ahead); returns how many
    tasks were assigned."""
    if core.hold_until is not None:   # restored: workers that come back bring data first
        if now < core.hold_until:
            return 0
        core.hold_until = None
        recompute_lost(core)
    if core.recheck_at is not None and now >= core.recheck_at:   # a worker left a while ago
        core.recheck_at = None
        fail_unsatisfiable(core, None, now)
    if not core.workers:
        return 0
    resumed = 0
    if core.frontier:   # chains given ahead of time go on (core.speculation)
        resumed = speculation.resume(core)
        core.stats["scheduled"] += resumed
    return resumed + _round(core, now)


def _round(core, now: float) -> int:
    """Place ready tasks (and their consumers ahead) on workers; how many were placed."""
    if not (core.ready or len(core.pool)):
        if core.options.steal:
            stealing.request(core, now)
        return 0
    if core.unchecked and core.recheck_at is None:
        fail_unsatisfiable(core, np.concatenate(core.unchecked), now)
    g = core.graph
    c = g.cols
    _intake(core, now)
    workers = list(core.workers.values())
    for w in workers:
        w.settle(now)
    # a round fills queues once some worker used up half of its queue (or has an idle
    # cpu): rounds place batches, not one task per finish. A worker a round could not
    # fill (the ready tasks belong elsewhere) asks again only once it has an idle cpu.
    starved = core.starved
    hungry = any(w.assigned_cpus < w.cpus or (w.id not in starved and
                                             placement.wants_work(w.cpus, w.assigned_cpus, w.queue_factor))
                 for w in workers)
    light_room = sum(max(0, placement.LIGHT_QUEUE - w.assigned_light) for w in workers) \
        if core.pool.has_light() else 0
    cpu_room = sum(max(0, w.queue_factor * w.cpus - w.assigned_cpus) for w in workers) if hungry else 0
    heavy_take = 2 * cpu_room + 16 if cpu_room else 0
    if not light_room and not heavy_take:
        if core.options.steal:
            stealing.request(core, now)
        return 0
    light, heavy = core.pool.take(c.state, light_room, heavy_take)
    ranked = np.concatenate([light, heavy]) if len(light) and len(heavy) else light if len(light) else heavy
    if not len(ranked):
        _mark_starved(core, workers)
        if core.options.steal:
            stealing.request(core, now)
        return 0
    core.stats["rounds"] += 1
    if len(ranked) == 1:   # (a round of one task: a small job's)
        ids, order = ranked, ranked[:1] * 0
    else:
        ids = np.sort(ranked)
        order = np.searchsorted(ids, ranked)      # positions in ids, best first
    index = _worker_index(core, workers)          # worker id -> k (the last: owner -1)
    inputs, consumer_of_slot = g.slots(ids)
    task_pos = np.searchsorted(ids, consumer_of_slot)
    holder = index[c.owner[inputs]]
    sizes = c.size[inputs]
    owned = (task_pos, holder, sizes)   # the owners' copies only
    if not len(inputs):   # (a round of sources: no preferences, no groups)
        best, best_bytes = np.full(len(ids), -1, dtype=np.int64), np.zeros(len(ids), dtype=np.int64)
        groups = best.copy() if core.options.spill else None
    else:
        groups = _largest_input(inputs, task_pos, sizes, len(ids)) if core.options.spill else None
        if core.replicas and core.options.spill:   # copies count as data on their workers
            task_pos, holder, sizes = _with_copies(core, index, inputs, task_pos, holder, sizes)
        best, best_bytes = placement.preferences(task_pos, holder, sizes, len(ids), spread=core.options.spill)
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
        only = _local_only(len(ids), *owned, near)
        chosen = _place_by_memory(c.cpus[ids], c.symbol[ids], best, best_bytes, rooms, requests, order, near, only,
                                  core.options.spill, groups)
    else:
        chosen = placement.place(c.cpus[ids], c.symbol[ids], best, best_bytes, rooms, requests, order,
                                 spill=core.options.spill, groups=groups)
    chosen_ranked = chosen[order]
    placed = 0
    if len(ranked) == 1:
        k = int(chosen_ranked[0])
        given = [(k, ranked)] if k >= 0 else []
    else:
        given = [(k, ranked[chosen_ranked == k]) for k in range(len(workers))]
    for k, mine in given:
        w = workers[k]
        if len(mine):
            T.transition(core, np.sort(mine) if len(mine) > 1 else mine, ASSIGNED, w.id)
            ahead = speculation.extend(core, w, mine)   # their consumers, ahead of time
            core.commands.append(compute(core, w, np.concatenate([mine, ahead]) if len(ahead) else mine))
            placed += len(mine) + len(ahead)
    waiting = ranked[chosen_ranked < 0]
    if len(waiting):
        core.pool.add(waiting, priority.keys(core, waiting), c.cpus[waiting] == 0, front=True)
    core.stats["scheduled"] += placed
    if heavy_take:
        _mark_starved(core, workers)
    if core.options.steal:
        stealing.request(core, now)
    return placed


def _worker_index(core, workers: list) -> np.ndarray:
    """Worker id -> its position in ``workers`` (-1 for no worker, the last entry: an
    owner of -1), kept while the workers stay the same."""
    key = tuple(w.id for w in workers)
    cached = core.worker_index
    if cached is None or cached[0] != key:
        index = np.full(core.next_worker + 1, -1, dtype=np.int64)
        index[list(key)] = np.arange(len(workers))
        cached = core.worker_index = (key, index)
    return cached[1]


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


def _place_by_memory(cpus, symbols, best, best_bytes, rooms, requests, order, near, only, spill,
                     groups) -> np.ndarray:
    """``placement.place`` by groups: a task may go to the workers not near their memory
    limit, and to the near-limit worker holding all its data (``only``), if any; each
    group in the round's order (``order``: positions, best first)."""
    chosen = np.full(len(cpus), -1, dtype=np.int64)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))

    def place(sel, b, b_bytes, subset):
        group_requests = {j: requests[p] for j, p in enumerate(sel.tolist()) if p in requests}
        return placement.place(cpus[sel], symbols[sel], b, b_bytes, subset, group_requests,
                               np.argsort(rank[sel], kind="stable"), spill,
                               None if groups is None else groups[sel])

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
        chosen[sel] = place(sel, b, np.where(keep, best_bytes[sel], 0), subset)
    # a task that no worker with room could ever run may go anywhere (it would wait for ever)
    stuck = np.array([p for p in np.flatnonzero(chosen < 0).tolist() if not any(
        placement.could_run(r, int(cpus[p]), int(symbols[p]), requests.get(p)) for r in roomy)], dtype=np.int64)
    if len(stuck):
        chosen[stuck] = place(stuck, best[stuck], best_bytes[stuck], rooms)
    return chosen


def _with_copies(core, index, inputs, task_pos, holder, sizes):
    """The input slots, plus one per copy of a (non-empty) input held elsewhere."""
    copied = np.fromiter(core.replicas, dtype=np.int64, count=len(core.replicas))
    hit = np.flatnonzero(np.isin(inputs, copied) & (sizes > 0))
    if not len(hit):
        return task_pos, holder, sizes
    distinct, which = np.unique(inputs[hit], return_inverse=True)
    copies = [np.array(sorted(core.replicas[int(i)]), dtype=np.int64) for i in distinct.tolist()]
    counts = np.array([len(x) for x in copies], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    flat = np.concatenate(copies)
    per_slot = counts[which]                                  # copies of each hit slot's input
    slot = np.repeat(hit, per_slot)
    k = np.arange(len(slot)) - np.repeat(np.cumsum(per_slot) - per_slot, per_slot)
    workers = index[flat[np.repeat(starts[which], per_slot) + k]]
    keep = workers >= 0
    return (np.concatenate([task_pos, task_pos[slot][keep]]), np.concatenate([holder, workers[keep]]),
            np.concatenate([sizes, sizes[slot][keep]]))


def _largest_input(inputs: np.ndarray, task_pos: np.ndarray, sizes: np.ndarray, n: int) -> np.ndarray:
    """Per task position: its largest input (-1 without inputs)."""
    out = np.full(n, -1, dtype=np.int64)
    if len(inputs):
        order = np.lexsort((-sizes, task_pos))
        first = np.concatenate(([True], task_pos[order][1:] != task_pos[order][:-1]))
        out[task_pos[order][first]] = inputs[order][first]
    return out


def _mark_starved(core, workers) -> None:
    """The workers a round left below their low-water mark, cpus all assigned."""
    core.starved = {w.id for w in workers if w.assigned_cpus >= w.cpus
                    and placement.wants_work(w.cpus, w.assigned_cpus, w.queue_factor)}


def _intake(core, now: float) -> None:
    """Move the newly READY tasks into the pool; ready dslice/dget tasks are expanded
    first (their pieces become READY and are taken in too)."""
    g = core.graph
    c = g.cols
    dynamic_codes = [g.symbol_codes[s] for s in (S.DSLICE, S.DGET) if s in g.symbol_codes]
    while core.ready:
        ids = T.take_ready(core)
        if dynamic_codes and len(ids):
            symbols = c.symbol[ids]
            is_dynamic = symbols == dynamic_codes[0]   # (np.isin's set machinery, for one or two codes)
            for code in dynamic_codes[1:]:
                is_dynamic |= symbols == code
            if is_dynamic.any():
                for t in ids[is_dynamic].tolist():
                    if c.state[t] == READY:
                        dynamic.expand(core, t, now)
                ids = ids[~is_dynamic]
                ids = ids[c.state[ids] == READY]
        if len(ids):
            core.pool.add(ids, priority.keys(core, ids), c.cpus[ids] == 0)


def fail_unsatisfiable(core, ids: np.ndarray | None, now: float) -> None:
    """Fail ready tasks (all, or those of ``ids``) no connected worker can ever run
    (needs >= 1 worker). Tasks become READY into ``core.unchecked`` too, so that each is
    looked at once: the calls with ``ids`` take those."""
    if not core.workers or not (core.ready or len(core.pool)):
        return
    g = core.graph
    c = g.cols
    core.unchecked = []
    if ids is None:   # every ready task: those in the pool go back to core.ready
        ids = np.concatenate([T.take_ready(core), core.pool.drain()])
        T.put_ready(core, T.small_unique(ids[c.state[ids] == READY]))
    ready = c.state[ids] == READY
    if not ready.all():   # (no copy of a large submission's ready tasks when all are)
        ids = ids[ready]
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
    codes = set(c.symbol[ids].tolist()) if len(ids) < 64 else T.small_unique(c.symbol[ids]).tolist()
    for code in sorted(codes):
        symbol = g.symbols[code]
        if symbol in (S.DSLICE, S.DGET) or any(supports(w, symbol) for w in core.workers.values()):
            continue
        for t in ids[c.symbol[ids] == code].tolist():
            if c.state[t] == READY:
                jobs.task_failed(core, t, f"no connected worker supports task type {symbol!r}", "", now)


def support_mask(core, worker) -> np.ndarray | None:
    """Bool per global symbol code: can this worker run it (None: every symbol the
    server knows so far, so that placement takes its fast paths)."""
    if not worker.symbols:
        return None
    cached = worker.support_mask   # (mask, mask or None)
    symbols = core.graph.symbols
    if cached is None or len(cached[0]) != len(symbols):
        mask = np.array([supports(worker, s) for s in symbols], dtype=bool)
        cached = worker.support_mask = (mask, None if mask.all() else mask)
    return cached[1]


def supports(worker, symbol: str) -> bool:
    return symbol in worker.symbols or (symbol.startswith("loom/") and not worker.symbols)
