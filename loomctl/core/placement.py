"""Placement of a batch of ready tasks on workers (pure functions, no state).

Policy (HyperLoom's, computed over whole batches):
- A task prefers the worker that already holds the most bytes of its inputs.
- Tasks with a cpu request go to a worker with enough cpus. A worker is given work up to
  ``queue_factor`` times its cpus: a short queue so it never idles while a round trip is
  in flight. The factor is 2 (a queue as long as the cpus) for workers whose tasks take
  long; the server raises it (up to MAX_QUEUE_FACTOR) for a worker that finishes many
  short tasks a second, so that its reports and the server's rounds carry batches. A task
  whose preferred worker holds >= LOCALITY_BYTES of its inputs waits in that worker's
  queue rather than moving the data elsewhere.
- Light tasks (no request) are spread by free queue room; up to LIGHT_QUEUE of them may
  be outstanding on one worker.
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
MAX_QUEUE_FACTOR = 32  # ... or more, up to this, for a worker that finishes short tasks fast
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


def preferences(task_pos: np.ndarray, holder: np.ndarray, sizes: np.ndarray, n_tasks: int):
    """Per task: the holder index with the most input bytes and those bytes (-1, 0 when
    none). ``task_pos`` / ``holder`` / ``sizes`` describe one input slot each; holder -1
    means the input's data is on no worker."""
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
    # for each task, the pair with the largest total (ties: lowest holder index)
    order = np.lexsort((pair_holder, -totals, pair_task))
    first = np.concatenate(([True], pair_task[order][1:] != pair_task[order][:-1]))
    chosen = order[first]
    best[pair_task[chosen]] = pair_holder[chosen]
    best_bytes[pair_task[chosen]] = totals[chosen]
    return best, best_bytes


def place(cpus: np.ndarray, symbols: np.ndarray, best: np.ndarray, best_bytes: np.ndarray,
          workers: list[WorkerRoom], requests: dict[int, dict] | None = None) -> np.ndarray:
    """Chosen worker index per task (-1: stays ready). ``requests`` maps task position to
    named resources beyond cpus. Mutates the rooms' assigned counters."""
    n = len(cpus)
    chosen = np.full(n, -1, dtype=np.int64)
    if not workers or n == 0:
        return chosen
    requests = requests or {}
    light = (cpus == 0) & np.array([i not in requests for i in range(n)]) if requests else cpus == 0
    _place_light(np.flatnonzero(light), symbols, best, best_bytes, workers, chosen)
    _place_heavy(np.flatnonzero(~light), cpus, symbols, best, best_bytes, workers, requests, chosen)
    return chosen


def _supports(room: WorkerRoom, symbol: int) -> bool:
    return room.supports is None or (symbol < len(room.supports) and bool(room.supports[symbol]))


def _place_light(positions, symbols, best, best_bytes, workers, chosen) -> None:
    if not len(positions):
        return
    uniform = all(w.supports is None for w in workers)
    # 1. tasks go to their preferred worker while it has room
    rest = []
    for w in workers:
        mine = positions[best[positions] == w.index]
        if not uniform:
            mine = np.array([p for p in mine if _supports(w, symbols[p])], dtype=np.int64)
        take = mine[:max(0, w.light_room())]
        chosen[take] = w.index
        w.assigned_light += len(take)
    rest = positions[chosen[positions] < 0]
    # strongly local tasks whose worker is full wait for it
    pinned = (best[rest] >= 0) & (best_bytes[rest] >= LOCALITY_BYTES)   # best is a worker's index or -1
    rest = rest[~pinned]
    if not len(rest):
        return
    # 2. the others are spread over the free room, emptiest workers first
    if uniform and len(rest) == 1:   # one task: the roomiest worker (the first of equals)
        w = max(workers, key=WorkerRoom.light_room)
        if w.light_room() > 0:
            chosen[rest[0]] = w.index
            w.assigned_light += 1
        return
    if uniform:
        rooms = np.array([max(0, w.light_room()) for w in workers])
        total = int(rooms.sum())
        if total == 0:
            return
        k = min(len(rest), total)
        # round-robin over workers weighted by room: interleave so batches stay balanced
        slots = _spread(rooms, np.array([w.index for w in workers]), k)
        chosen[rest[:k]] = slots
        for w in workers:
            w.assigned_light += int(np.count_nonzero(slots == w.index))
        return
    for p in rest:
        candidates = [w for w in workers if w.light_room() > 0 and _supports(w, symbols[p])]
        if candidates:
            w = max(candidates, key=WorkerRoom.light_room)
            chosen[p] = w.index
            w.assigned_light += 1


def _spread(rooms: np.ndarray, owners: np.ndarray, k: int) -> np.ndarray:
    """The first k of the slots (rooms[i] of them owned by owners[i]) interleaved in
    proportion to the rooms: slot j of owner i sorts at (j + 0.5) / rooms[i]. No owner
    gives more than k of the first k, so only min(room, k) slots of each are built
    (rooms are up to LIGHT_QUEUE; k is often small)."""
    built = np.minimum(rooms, k)
    keys = np.concatenate([(np.arange(b) + 0.5) / r for b, r in zip(built.tolist(), rooms.tolist())])
    return np.repeat(owners, built)[np.argsort(keys, kind="stable")[:k]]


def _place_unit_tasks(positions, workers, chosen) -> None:
    """The loop of _place_heavy, at once, for a common batch (8 or more) of 1-cpu tasks
    with no data yet, no named resources and workers that run everything: the loop gives
    each task to the least loaded worker (assigned / cpus; the lowest index among equals)
    with room, so worker w's j-th new task comes at load (assigned_w + j) / cpus_w, and
    the tasks take the smallest such loads in order."""
    free = [max(0, w.queue_factor * w.cpus - w.assigned_cpus) if w.cpus >= 1 else 0 for w in workers]
    k = min(len(positions), sum(free))
    if k == 0:
        return
    built = [min(f, k) for f in free]
    loads = np.concatenate([(w.assigned_cpus + np.arange(b)) / w.cpus for w, b in zip(workers, built) if b])
    owners = np.repeat([w.index for w in workers], built)
    slots = owners[np.lexsort((owners, loads))[:k]]
    chosen[positions[:k]] = slots
    for w in workers:
        w.assigned_cpus += int(np.count_nonzero(slots == w.index))


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


def _place_heavy(positions, cpus, symbols, best, best_bytes, workers, requests, chosen) -> None:
    if len(positions) >= 8 and not requests and all(w.supports is None for w in workers) \
            and (best[positions] < 0).all() and (cpus[positions] == 1).all():
        _place_unit_tasks(positions, workers, chosen)
        return
    by_index = {w.index: w for w in workers}
    full = False
    for p in positions:
        need = int(cpus[p])
        if need and (full or all(w.cpu_room() <= 0 for w in workers)):
            full = True   # every worker is full: the cpu tasks wait for the next round
            continue
        request = requests.get(int(p))
        pref = by_index.get(int(best[p]))
        target = None
        if pref is not None and _supports(pref, symbols[p]) and _could_run(pref, need, request):
            if _fits(pref, need, request, pref.cpus):
                target = pref
            elif best_bytes[p] >= LOCALITY_BYTES:
                if _fits(pref, need, request, pref.queue_factor * pref.cpus):
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
        target.assigned_cpus += need
        for name, amount in (request or {}).items():
            target.assigned_resources[name] = target.assigned_resources.get(name, 0) + amount
