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
million goes out in batches. Finishes make them too (``inputs_finished``): a consumer
whose other inputs just finished and that waits only for inputs ASSIGNED to one worker
(a reduction's last branch) joins that worker's frontier. Not speculated: dslice/dget (the server expands them), tasks
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
from loomctl.core.tasktable import ASSIGNED, FINISHED, FLAG_EXTRA, FLAG_OVERRIDE, WAITING

SPECULATE_LIGHT = 2048   # light tasks assigned to one worker, at most, for speculation to add more
SMALL_WALK = 32           # waiting consumers a generation looks at task by task (more: over columns)
FINISH_LOOKS = 64         # waiting consumers of a finished batch looked at (inputs_finished)
FINISH_LOOK_INPUTS = 256  # inputs a consumer may have for that look
EMPTY = np.zeros(0, dtype=np.int64)


def resume(core) -> int:
    """Go on from the frontiers the last rounds left; one COMPUTE per worker given
    something. Returns how many tasks were assigned."""
    if not core.frontier:
        return 0
    from loomctl.core.compute import compute
    c = core.graph.cols
    placed = 0
    for wid in list(core.frontier):
        w = core.workers.get(wid)
        seeds = core.frontier.pop(wid)
        if w is None:
            continue
        seeds = seeds[(c.state[seeds] == ASSIGNED) & (c.worker[seeds] == wid)]   # (finished: their
        # consumers became READY, or wait for another input, which has its own turn)
        more = extend(core, w, seeds)
        if len(more):
            core.commands.append(compute(core, w, more))
            placed += len(more)
    return placed


def extend(core, w, seeds: np.ndarray) -> np.ndarray:
    """Assign to worker ``w`` the consumers of ``seeds`` (tasks ASSIGNED to w, or
    finished) that may go there ahead of their inputs, and theirs, within the
    lookahead; returns them, producers before consumers (the order of COMPUTE rows)."""
    if not len(seeds) or not core.options.speculate or w.stats.get("memory_near") is True:
        return EMPTY
    if len(seeds) == 1 and not _waiting_consumers(core.graph, seeds):   # (a job of one task, a sink)
        return EMPTY
    light_room = SPECULATE_LIGHT - w.assigned_light
    cpu_room = w.queue_factor * w.cpus - w.assigned_cpus
    if light_room <= 0 and cpu_room <= 0:
        _keep(core, w.id, seeds)
        return EMPTY
    from loomctl.core.scheduler import support_mask
    walk = _Walk(core, w, support_mask(core, w), light_room, cpu_room)
    while len(seeds):
        generation, cut = walk.chain(int(seeds[0])) if len(seeds) == 1 else (EMPTY, False)
        if not len(generation) and not cut:
            generation, cut = walk.small(seeds) if len(seeds) <= 8 else walk.large(seeds)
        elif not cut:   # (a chain's last task: go on from it, whatever follows)
            walk.take(generation)
            seeds = generation[-1:]
            continue
        if len(generation):
            walk.take(generation)
        if cut:   # (what this generation took has consumers not looked at either)
            _keep(core, w.id, np.concatenate([seeds, generation]))
            break
        seeds = generation
    if not walk.taken:
        return EMPTY
    ids = np.concatenate(walk.taken) if len(walk.taken) > 1 else walk.taken[0]
    T.transition(core, np.sort(ids), ASSIGNED, w.id)
    core.stats["speculated"] = core.stats.get("speculated", 0) + len(ids)
    return ids


class _Walk:
    """One worker's speculation, a generation at a time: what it took, its rooms."""

    def __init__(self, core, w, mask, light_room: int, cpu_room: int):
        self.g, self.w, self.mask = core.graph, w, mask
        self.light_room, self.cpu_room = light_room, cpu_room
        self.dynamic = [self.g.symbol_codes[s] for s in (S.DSLICE, S.DGET) if s in self.g.symbol_codes]
        self.taken: list[np.ndarray] = []
        self.seen: set[int] = set()
        self.marks: np.ndarray | None = None   # taken, per row (made by the first walk over columns)

    def take(self, generation: np.ndarray) -> None:
        self.taken.append(generation)
        self.seen.update(generation.tolist())
        if self.marks is not None:
            self.marks[generation] = True

    def chain(self, t: int) -> tuple[np.ndarray, bool]:
        """From ``t``, the links of a chain (each task the only consumer of the one before,
        in one segment, without overrides or consumers elsewhere), over the segment's
        arrays directly; an empty array where t is no such link."""
        g, w = self.g, self.w
        c = g.cols
        seg, local = g.segs.locate(t)
        base, n = seg.base, seg.n
        c_off, cons, i_off, inputs = seg.consumer_offsets, seg.consumers, seg.input_offsets, seg.inputs
        state, worker, flags, cpus, symbol, wid = c.state, c.worker, c.flags, c.cpus, c.symbol, w.id
        special = FLAG_EXTRA | FLAG_OVERRIDE
        out, cut = [], False
        while True:
            lo = c_off[local]
            if c_off[local + 1] - lo != 1 or flags[t] & FLAG_EXTRA:
                break
            x = int(cons[lo])
            lx = x - base
            if not 0 <= lx < n or state[x] != WAITING or flags[x] & special:
                break
            ins = inputs[i_off[lx]:i_off[lx + 1]]
            if not all(i == t or state[i] == FINISHED or (state[i] == ASSIGNED and worker[i] == wid)
                       for i in ins.tolist()):
                break
            code, need = symbol[x], int(cpus[x])
            if need or code in self.dynamic or (self.mask is not None and not self.mask[code]) or \
                    (g.any_named_requests and g.named_request(x)):
                break   # (cpu tasks and the rest: the general walk)
            if self.light_room <= 0:
                cut = True
                break
            self.light_room -= 1
            out.append(x)
            t, local = x, lx
        return np.array(out, dtype=np.int64), cut and not out

    def small(self, seeds: np.ndarray) -> tuple[np.ndarray, bool]:
        """The next generation, task by task (a chain: no numpy on the way)."""
        g, w, seen = self.g, self.w, self.seen
        c = g.cols
        state, worker, cpus, symbol, wid = c.state, c.worker, c.cpus, c.symbol, w.id
        generation, cut = [], False
        consumers = _waiting_consumers(g, seeds)
        if len(consumers) > SMALL_WALK:   # (a split's thousand pieces: the columns are cheaper)
            return self.large(seeds)
        for x in consumers:
            if x in seen or not all(i in seen or state[i] == FINISHED or (state[i] == ASSIGNED and worker[i] == wid)
                                    for i in g.inputs(x).tolist()):
                continue
            code, need = symbol[x], int(cpus[x])
            if code in self.dynamic or (self.mask is not None and not self.mask[code]) or need > w.cpus or \
                    (g.any_named_requests and g.named_request(x)):
                continue
            if need == 0:
                if self.light_room <= 0:
                    cut = True
                    continue
                self.light_room -= 1
            else:
                if need > self.cpu_room:
                    cut = True
                    continue
                self.cpu_room -= need
            seen.add(x)
            generation.append(x)
        return np.array(generation, dtype=np.int64), cut

    def large(self, seeds: np.ndarray) -> tuple[np.ndarray, bool]:
        """The next generation, over columns."""
        g, w = self.g, self.w
        c = g.cols
        if self.marks is None:   # (a mark per row: no set operations per generation)
            self.marks = np.zeros(len(c.state), dtype=bool)
            for taken in self.taken:
                self.marks[taken] = True
        marks = self.marks
        x = g.consumers_of(seeds)   # (one per slot on a seed)
        x = np.sort(x[c.state[x] == WAITING])
        hits = None   # per distinct consumer, its slots on seeds (with plain CSRs: each an input)
        if len(x) > 1:
            first = np.flatnonzero(np.concatenate(([True], x[1:] != x[:-1])))
            if not g.overrides and not g.extra_consumers:
                hits = np.diff(np.append(first, len(x)))
            x = x[first]
        keep = ~marks[x]
        code = c.symbol[x]
        keep &= c.cpus[x] <= w.cpus
        if self.dynamic:
            keep &= ~np.isin(code, self.dynamic)
        if self.mask is not None:
            keep &= self.mask[code]
        if g.any_named_requests:
            keep &= np.array([not g.named_request(t) for t in x.tolist()], dtype=bool)
        x = x[keep]
        if not len(x):
            return EMPTY, False
        # a consumer whose every input is a seed is good as it is (a tree's next level); the
        # others' inputs are looked at: finished, assigned to w, or taken by this walk
        rest = x if hits is None else x[hits[keep] < g.segs.input_counts(x)]
        if len(rest):
            inputs, consumer = g.slots(rest)
            state = c.state[inputs]
            good = (state == FINISHED) | ((state == ASSIGNED) & (c.worker[inputs] == w.id)) | marks[inputs]
            if not good.all():   # (x is sorted, and the slots are of some of its ids)
                bad = np.zeros(len(x), dtype=bool)
                bad[np.searchsorted(x, consumer[~good])] = True
                x = x[~bad]
        need = c.cpus[x]
        light, heavy = x[need == 0], x[need > 0]
        room = max(0, self.light_room)
        cut = len(light) > room
        light = light[:room]
        self.light_room -= len(light)
        if len(heavy):
            fits = np.cumsum(c.cpus[heavy]) <= self.cpu_room
            cut |= not fits.all()
            heavy = heavy[fits]
            self.cpu_room -= int(c.cpus[heavy].sum())
        return (np.sort(np.concatenate([light, heavy])) if len(heavy) else light), cut


def inputs_finished(core, ids: np.ndarray) -> None:
    """Tasks of ``ids`` just finished. A consumer they leave WAITING only for inputs being
    computed on one worker (the last branch of a reduction) goes to that worker ahead
    too: those inputs join its frontier, and the next round resumes from there (so the
    consumer starts where its last input is made, its other inputs fetched meanwhile,
    instead of after a report, a round and a fetch). Consumers of many inputs, and more
    than FINISH_LOOKS of them, are left to the rounds."""
    if not core.options.speculate or not core.workers:
        return
    g = core.graph
    c = g.cols
    waiting = _waiting_consumers(g, ids)
    for x in waiting[:FINISH_LOOKS]:
        inputs = g.inputs(x)
        if len(inputs) > FINISH_LOOK_INPUTS:
            continue
        pending = inputs[c.state[inputs] != FINISHED]
        if not len(pending) or (c.state[pending] != ASSIGNED).any():
            continue
        owners = c.worker[pending]
        wid = int(owners[0])
        if (owners == wid).all() and wid in core.workers:
            _keep(core, wid, T.small_unique(pending))


def _waiting_consumers(g, seeds: np.ndarray) -> list[int]:
    """The WAITING consumers of ``seeds``, each once, in id order."""
    state = g.cols.state
    if len(seeds) == 1:
        consumers = g.consumers(int(seeds[0]))
        if len(consumers) <= 1:   # a chain or a sink: no numpy on the way
            return consumers if consumers and state[consumers[0]] == WAITING else []
        consumers = np.array(consumers, dtype=np.int64)
    else:
        consumers = g.consumers_of(seeds)
    return T.small_unique(consumers[state[consumers] == WAITING]).tolist()


def _keep(core, wid: int, seeds: np.ndarray) -> None:
    """Rounds go on from ``seeds`` on worker ``wid`` (its lookahead ran out)."""
    old = core.frontier.get(wid)
    core.frontier[wid] = seeds if old is None else T.small_unique(np.concatenate([old, seeds]))


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
    speculative = T.small_unique(consumer[~stranded])
    light = speculative[c.cpus[speculative] == 0]
    counts = np.bincount(c.worker[light], minlength=1)
    assert not len(light) or counts.max() <= SPECULATE_LIGHT, "too many light tasks speculated on a worker"
