"""Placement of a batch of ready tasks on workers (pure functions, no state).

Policy (HyperLoom's, computed over whole batches, tasks taken in the order given):
- A task prefers the worker that already holds the most bytes of its inputs (copies
  count; among equals, a spread choice rather than always the first worker).
- Tasks with a cpu request go to a worker with enough cpus. A worker is given work up to
  ``queue_factor`` times its cpus: a short queue so it never idles while a round trip is
  in flight. The factor is 2 (a queue as long as the cpus) for workers whose tasks take
  long; the server raises it (up to MAX_QUEUE_FACTOR) for a worker that finishes many
  short tasks a second, or whose report says its cpu tasks ran that short (UPDATE
  ``cpu_busy``), so that its reports and the server's rounds carry batches. A
  worker is refilled once it has used up half of its queue (``wants_work``).
- A task goes to its preferred worker when that has a free cpu. A task whose preferred
  worker holds >= LOCALITY_BYTES of its inputs but has no free cpu waits in that
  worker's queue rather than moving the data elsewhere, unless (``spill``) another
  worker has a cpu nobody is assigned to: then it goes there (an idle cpu costs more
  than moving the data). Other tasks go to the least loaded worker with room.
- Light tasks (no request) without a preferred worker are spread by free queue room, in
  blocks of neighbours (tasks next to each other in the batch, such as the sources of
  one merge, go to one worker); up to LIGHT_QUEUE of them may be outstanding on one worker.
- A task is pinned to the worker holding its data only if that worker could run it at
  all (cpus, named resources, task type): locality never makes a task wait for ever.

Invariants: every returned assignment respects the worker's symbol support and, counting
queued tasks, never exceeds queue_factor x its cpus; a task appears in at most one assignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LOCALITY_BYTES = 1 << 20
LIGHT_QUEUE = 8192
QUEUE_FACTOR = 2       # cpu tasks assigned to a worker: up to this many times its cpus ...
MAX_QUEUE_FACTOR = 128  # ... or more, up to this, for a worker that finishes short tasks fast
QUEUE_SECONDS = 0.030  # the queue beyond the cpus should hold about this much work


@dataclass
class WorkerRoom:
    index: int                   # dense index used in preference arrays
    cpus: int
    assigned_cpus: int
    assigned_light: int
    resources: dict = field(default_factory=dict)
    assigned_resources: dict = field(default_factory=dict)
    supports: np.ndarray | None = None   # bool per global symbol code; None = everything
    queue_factor: int = QUEUE_FACTOR

    def cpu_room(self) -> int:
        return self.queue_factor * self.cpus - self.assigned_cpus

    def light_room(self) -> int:
        return LIGHT_QUEUE - self.assigned_light


def queue_factor(cpu_tasks_per_second: float, cpus: int) -> int:
    """How many times its cpus a worker may be given: enough queued tasks for about
    QUEUE_SECONDS of work at the rate it has been finishing them."""
    extra = cpu_tasks_per_second * QUEUE_SECONDS / max(cpus, 1)
    return int(min(MAX_QUEUE_FACTOR, max(QUEUE_FACTOR, 1 + np.ceil(extra))))


def wants_work(cpus: int, assigned_cpus: int, factor: int) -> bool:
    """A worker is given cpu tasks once it has an idle cpu or has used up half of the
    queue beyond its cpus (the low-water mark: rounds place batches, not single tasks)."""
    return assigned_cpus < cpus or assigned_cpus <= cpus + (factor - 1) * cpus // 2


def preferences(task_pos: np.ndarray, holder: np.ndarray, sizes: np.ndarray, n_tasks: int, spread: bool = True):
    """Per task: the holder index with the most input bytes and those bytes (-1, 0 when
    none). ``task_pos`` / ``holder`` / ``sizes`` describe one input slot each; holder -1
    means the input's data is on no worker. Ties: a holder spread by task (or, without
    ``spread``, the lowest index)."""
    best = np.full(n_tasks, -1, dtype=np.int64)
    best_bytes = np.zeros(n_tasks, dtype=np.int64)
    known = holder >= 0
    if not known.any():
        return best, best_bytes
    t, h, s = task_pos[known], holder[known], sizes[known]
    key = t * (int(h.max()) + 1) + h
    order = np.argsort(key, kind="stable")
    key, t, h, s = key[order], t[order], h[order], s[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    totals = np.add.reduceat(s, starts)
    pair_task, pair_holder = t[starts], h[starts]
    # for each task, the pair with the largest total (ties: a holder spread by task, so
    # that tasks with their data on many workers do not all pick the first one)
    tie = (pair_holder - pair_task) % (int(h.max()) + 1) if spread else pair_holder
    order = np.lexsort((tie, -totals, pair_task))
    first = np.concatenate(([True], pair_task[order][1:] != pair_task[order][:-1]))
    chosen = order[first]
    best[pair_task[chosen]] = pair_holder[chosen]
    best_bytes[pair_task[chosen]] = totals[chosen]
    return best, best_bytes


def place(cpus: np.ndarray, symbols: np.ndarray, best: np.ndarray, best_bytes: np.ndarray,
          workers: list[WorkerRoom], requests: dict[int, dict] | None = None, order: np.ndarray | None = None,
          spill: bool = True, groups: np.ndarray | None = None) -> np.ndarray:
    """Chosen worker index per task (-1: stays ready). ``requests`` maps task position to
    named resources beyond cpus; ``order`` lists the positions in the order to place
    them (best first; default: as given); ``groups`` (optional) names each task's largest
    input: tasks that spill to idle cpus go there in blocks of the same input, so that
    each worker fetches few distinct objects. Mutates the rooms' assigned counters."""
    n = len(cpus)
    chosen = np.full(n, -1, dtype=np.int64)
    if not workers or n == 0:
        return chosen
    requests = requests or {}
    light = (cpus == 0) & np.array([i not in requests for i in range(n)]) if requests else cpus == 0
    order = np.arange(n) if order is None else order
    _place_light(order[light[order]], symbols, best, best_bytes, workers, chosen)
    _place_heavy(order[~light[order]], cpus, symbols, best, best_bytes, workers, requests, chosen, spill, groups)
    return chosen


def _supports(room: WorkerRoom, symbol: int) -> bool:
    return room.supports is None or (symbol < len(room.supports) and bool(room.supports[symbol]))


def _supported(room: WorkerRoom, codes: np.ndarray) -> np.ndarray:
    """Per symbol code: can the worker (with a support mask) run it."""
    ok = np.zeros(len(codes), dtype=bool)
    inside = codes < len(room.supports)
    ok[inside] = room.supports[codes[inside]]
    return ok


def _place_light(positions, symbols, best, best_bytes, workers, chosen) -> None:
    if not len(positions):
        return
    uniform = all(w.supports is None for w in workers)
    # 1. tasks go to their preferred worker while it has room
    prefs = best[positions]
    if (prefs >= 0).any():   # (none: a round of tasks without inputs on any worker)
        for w in workers:
            mine = positions[prefs == w.index]
            if w.supports is not None and len(mine):
                mine = mine[_supported(w, symbols[mine])]
            take = mine[:max(0, w.light_room())]
            chosen[take] = w.index
            w.assigned_light += len(take)
        rest = positions[chosen[positions] < 0]
    else:
        rest = positions
    # strongly local tasks whose worker is full wait for it
    pinned = (best[rest] >= 0) & (best_bytes[rest] >= LOCALITY_BYTES)   # best is a worker's index or -1
    rest = rest[~pinned]
    if not len(rest):
        return
    # 2. the others are spread over the free room, emptiest workers first; what some
    # worker cannot run, task by task
    if not uniform:
        anywhere = np.ones(len(rest), dtype=bool)
        for w in workers:
            if w.supports is not None:
                anywhere &= _supported(w, symbols[rest])
        for p in rest[~anywhere]:
            candidates = [w for w in workers if w.light_room() > 0 and _supports(w, symbols[p])]
            if candidates:
                w = max(candidates, key=WorkerRoom.light_room)
                chosen[p] = w.index
                w.assigned_light += 1
        rest = rest[anywhere]
    if len(rest) == 1:   # one task: the roomiest worker (the first of equals)
        w = max(workers, key=WorkerRoom.light_room)
        if w.light_room() > 0:
            chosen[rest[0]] = w.index
            w.assigned_light += 1
        return
    rooms = np.array([max(0, w.light_room()) for w in workers])
    total = int(rooms.sum())
    k = min(len(rest), total)
    if k == 0:
        return
    # each worker's share in proportion to its room, as one block of neighbours in the
    # order given (siblings, like the leaves of a tree, meet on one worker)
    slots = np.sort(_spread(rooms, np.array([w.index for w in workers]), k), kind="stable")
    chosen[rest[:k]] = slots
    for w in workers:
        w.assigned_light += int(np.count_nonzero(slots == w.index))


def _spread(rooms: np.ndarray, owners: np.ndarray, k: int) -> np.ndarray:
    """The first k of the slots (rooms[i] of them owned by owners[i]) interleaved in
    proportion to the rooms: slot j of owner i sorts at (j + 0.5) / rooms[i]. No owner
    gives more than k of the first k, so only min(room, k) slots of each are built
    (rooms are up to LIGHT_QUEUE; k is often small)."""
    built = np.minimum(rooms, k)
    keys = np.concatenate([(np.arange(b) + 0.5) / r for b, r in zip(built.tolist(), rooms.tolist())])
    return np.repeat(owners, built)[np.argsort(keys, kind="stable")[:k]]


def _place_unit_tasks(positions, workers, chosen, up_to_cpus: bool = False) -> np.ndarray:
    """The loop of _place_heavy, at once, for 1-cpu tasks without a preferred worker (or
    sent away from it), no named resources and workers that run everything: the loop gives
    each task to the least loaded worker (assigned / cpus; the lowest index among equals)
    with room (queue room, or with ``up_to_cpus`` a free cpu), so worker w's j-th new task
    comes at load (assigned_w + j) / cpus_w, and the tasks take the smallest such loads in
    order. Returns the positions placed."""
    limit = [w.cpus if up_to_cpus else w.queue_factor * w.cpus for w in workers]
    free = [max(0, lim - w.assigned_cpus) if w.cpus >= 1 else 0 for w, lim in zip(workers, limit)]
    k = min(len(positions), sum(free))
    if k == 0:
        return positions[:0]
    built = [min(f, k) for f in free]
    loads = np.concatenate([(w.assigned_cpus + np.arange(b)) / w.cpus for w, b in zip(workers, built) if b])
    owners = np.repeat([w.index for w in workers], built)
    slots = owners[np.lexsort((owners, loads))[:k]]
    chosen[positions[:k]] = slots
    counts = np.bincount(slots, minlength=max(w.index for w in workers) + 1)
    for w in workers:
        w.assigned_cpus += int(counts[w.index])
    return positions[:k]


def _by_preference(positions, best, room: np.ndarray) -> np.ndarray:
    """Mask of ``positions`` (in order) that fit their preferred worker's ``room``
    (indexed by worker index): the first room[w] of those preferring w."""
    prefs = best[positions]
    order = np.argsort(prefs, kind="stable")
    sorted_prefs = prefs[order]
    starts = np.searchsorted(sorted_prefs, sorted_prefs, side="left")
    rank = np.empty(len(positions), dtype=np.int64)
    rank[order] = np.arange(len(positions)) - starts
    return rank < room[prefs]


def _place_blocks(positions, workers, chosen) -> None:
    """Fill the idle cpus, worker by worker (least loaded first), with ``positions`` in
    order: neighbours in the list land on the same worker."""
    start = 0
    for w in sorted(workers, key=lambda w: (w.assigned_cpus / max(w.cpus, 1), w.index)):
        free = w.cpus - w.assigned_cpus
        if free <= 0 or start >= len(positions):
            continue
        take = positions[start:start + free]
        chosen[take] = w.index
        w.assigned_cpus += len(take)
        start += len(take)


def _place_unit_batch(positions, best, best_bytes, workers, chosen, spill: bool, groups=None) -> None:
    """_place_heavy's rules, vectorised, for 1-cpu tasks on uniform workers (no named
    resources): preferred worker with a free cpu; strongly local tasks to an idle cpu
    elsewhere (``spill``), else queued at their worker or waiting; the others to the
    least loaded worker with room."""
    size = max(w.index for w in workers) + 1
    by_index = {w.index: w for w in workers}
    assigned = np.zeros(size, np.int64)
    cpus = np.zeros(size, np.int64)
    queue = np.zeros(size, np.int64)
    for w in workers:
        assigned[w.index], cpus[w.index], queue[w.index] = w.assigned_cpus, w.cpus, w.queue_factor * w.cpus

    def commit(pos):
        if len(pos):
            counts = np.bincount(chosen[pos], minlength=size)
            assigned[:] += counts
            for k in np.flatnonzero(counts).tolist():
                by_index[k].assigned_cpus += int(counts[k])

    has_pref = best[positions] >= 0
    preferring = positions[has_pref]
    fits = _by_preference(preferring, best, np.maximum(0, cpus - assigned)) if len(preferring) else has_pref[:0]
    placed = preferring[fits]
    chosen[placed] = best[placed]
    commit(placed)
    rest = positions[chosen[positions] < 0]
    strong = rest[(best[rest] >= 0) & (best_bytes[rest] >= LOCALITY_BYTES)]
    weak = rest[~((best[rest] >= 0) & (best_bytes[rest] >= LOCALITY_BYTES))]
    if len(strong) and spill:
        idle = sum(max(0, w.cpus - w.assigned_cpus) for w in workers)
        first = strong[:idle]
        if groups is not None and len(first) > 1:
            first = first[np.argsort(groups[first], kind="stable")]
        _place_blocks(first, workers, chosen)
        for w in workers:
            assigned[w.index] = w.assigned_cpus
        strong = strong[chosen[strong] < 0]
    if len(strong):
        fits = _by_preference(strong, best, np.maximum(0, queue - assigned))
        placed = strong[fits]
        chosen[placed] = best[placed]
        commit(placed)
    if len(weak):
        _place_unit_tasks(weak, workers, chosen)


def _fits(w: WorkerRoom, cpus: int, request: dict | None, limit_cpus: int) -> bool:
    if w.assigned_cpus + cpus > limit_cpus:
        return False
    for name, amount in (request or {}).items():
        if w.assigned_resources.get(name, 0) + amount > w.resources.get(name, 0):
            return False
    return True


def _could_run(w: WorkerRoom, cpus: int, request: dict | None) -> bool:
    """Whether the worker has the cpus and resources at all (a task is pinned to the
    data's worker only then: otherwise it would wait there for ever)."""
    return cpus <= w.cpus and all(w.resources.get(k, 0) >= v for k, v in (request or {}).items())


def could_run(w: WorkerRoom, cpus: int, symbol: int, request: dict | None) -> bool:
    """Whether the worker could run the task at all (cpus, named resources, type)."""
    return _supports(w, symbol) and _could_run(w, cpus, request)


def _place_heavy(positions, cpus, symbols, best, best_bytes, workers, requests, chosen, spill=True,
                 groups=None) -> None:
    if not len(positions):
        return
    if len(positions) >= 8 and not requests and all(w.supports is None for w in workers) \
            and (cpus[positions] == 1).all():
        _place_unit_batch(positions, best, best_bytes, workers, chosen, spill, groups)
        return
    by_index = {w.index: w for w in workers}
    open_rooms = sum(1 for w in workers if w.cpu_room() > 0)        # workers with queue room
    idle = {w.index for w in workers if w.assigned_cpus < w.cpus}   # workers with an unassigned cpu
    for p in positions.tolist():
        need = int(cpus[p])
        if need and not open_rooms:
            continue   # every worker is full: the cpu tasks wait for the next round
        request = requests.get(p)
        pref = by_index.get(int(best[p]))
        target = None
        if pref is not None and _supports(pref, symbols[p]) and _could_run(pref, need, request):
            if _fits(pref, need, request, pref.cpus):
                target = pref
            elif best_bytes[p] >= LOCALITY_BYTES:
                spare = [w for w in (by_index[i] for i in idle) if _supports(w, symbols[p])
                         and _fits(w, need, request, w.cpus)] if spill and idle else []
                if spare:
                    target = min(spare, key=lambda w: (w.assigned_cpus / max(w.cpus, 1), w.index))
                elif _fits(pref, need, request, pref.queue_factor * pref.cpus):
                    target = pref
                else:
                    continue   # wait for the worker that has the data
        if target is None:
            candidates = [w for w in workers if _supports(w, symbols[p]) and _fits(w, need, request, w.queue_factor * w.cpus)
                          and need <= w.cpus]
            if not candidates:
                continue
            target = min(candidates, key=lambda w: (w.assigned_cpus / max(w.cpus, 1), w.index))
        chosen[p] = target.index
        had_room = target.cpu_room() > 0
        target.assigned_cpus += need
        if had_room and target.cpu_room() <= 0:
            open_rooms -= 1
        if target.assigned_cpus >= target.cpus:
            idle.discard(target.index)
        for name, amount in (request or {}).items():
            target.assigned_resources[name] = target.assigned_resources.get(name, 0) + amount
