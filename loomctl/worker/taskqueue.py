"""The worker's task queue and resource accounting, sans-I/O (no sockets, threads, clock).

Events in, decisions out:
  ``assign(specs, have, locations)``   tasks received (COMPUTE)  -> inputs to fetch, tasks failed
  ``inputs_arrived(ids)``              data became local         -> (nothing; tasks may become ready)
  ``inputs_unavailable(ids, why)``     a fetch failed            -> tasks failed
  ``finished(task_id, ok)``            a started task ended      -> tasks failed (local waiters)
  ``take_startable()``                 -> tasks to start now, their cpus/resources reserved
  ``give_back(ids, count)``            work stealing (STEAL_TASKS) -> tasks dropped unstarted

Invariants:
- A task is in exactly one of: queued (``queued``) or running (``running``); a task id
  seen twice while queued or running is ignored.
- ``frame_bytes`` sums the configs that are frames (a large const's, a view) of the
  queued and running tasks: memory the process holds that is no data yet.
- A queued task is *ready* iff ``missing[t] == 0``; the ready tasks are kept in arrival
  order and started first-fit in that order (a ready task that does not fit now does not
  block a later one that does).
- ``free_cpus == cpus - sum(cpus of running tasks)`` and likewise for each named
  resource, which stays >= 0. Light tasks (cpus == 0) reserve no cpus. ``free_cpus``
  goes below 0 only by *overbooking*: while ``overbook > 0`` a pool task (a cpu task
  that is no program and names no resources) starts when ``free_cpus + overbook``
  covers it and no other kind of cpu task runs, and waits in the executor's queue for
  a thread (the worker sets ``overbook`` while its pool tasks are short: the next one
  then starts as the thread becomes free, without a round trip through the loop); any
  other cpu task starts only when ``free_cpus`` covers it. ``overbook`` is the
  worker's cpus after SHORT_STREAK pool tasks in a row ran shorter than SHORT_TASK_S
  (``ran``), TINY_OVERBOOK times that after as many shorter than TINY_TASK_S, else 0.
- A task that could never fit this worker (more cpus or named resources than it has) is
  failed at ``assign`` with a message saying so; it never waits, so it cannot deadlock
  the worker.
- An input that is neither held, nor located on a peer, nor produced by a task queued or
  running here, fails its task at ``assign``: nothing waits for data that cannot come.
  A task given *ahead* (speculatively, before the server saw its inputs finish) waits
  for inputs produced here; if the producer is gone already, or ends without producing
  the input, the task is dropped without a report (``dropped``): the server, which
  hears of the producer's end, takes it back. It never starts without its inputs.
- ``give_back`` drops only tasks that could start here now and that no other queued task
  waits on (a consumer given ahead): never a running task, one whose inputs are still
  being fetched or made here, nor the producer of a task given ahead.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from graphfmt import symbols as S
from loomctl.messages import COMPUTE_ROW_MIN, ComputeRow
from loomctl.protocol import ProtocolError, resource_amounts

_ROW_FIELDS = len(ComputeRow._fields)
SHORT_STREAK = 3
SHORT_TASK_S = 0.05   # (a task of microseconds may wait 5 ms for the GIL: the interpreter's switch interval)
TINY_TASK_S = 0.002   # pool tasks this short are overbooked TINY_OVERBOOK times the cpus: a thread runs
TINY_OVERBOOK = 8     # them back to back, and the loop hears of several at each wake-up


@dataclass(slots=True)
class TaskSpec:
    """One task assignment of a COMPUTE message."""
    id: int
    symbol: str
    config: bytes
    inputs: list
    cpus: int = 0
    resources: dict = field(default_factory=dict)
    checkpoint: str | None = None
    label: str | None = None
    inline: bool = False      # send a small result along with the finish report
    ahead: bool = False       # given before its inputs were all computed (see ``assign``)

    @classmethod
    def from_wire(cls, row) -> "TaskSpec":
        """A COMPUTE row (``loomctl.messages.ComputeRow``; the fields after ``cpus`` may
        be missing, fields beyond it are ignored); raises ProtocolError when malformed."""
        if type(row) is not list or len(row) != _ROW_FIELDS:   # (the server sends them whole)
            if not isinstance(row, (list, tuple)) or len(row) < COMPUTE_ROW_MIN:
                raise ProtocolError(f"a COMPUTE task is not a list of at least {COMPUTE_ROW_MIN} fields")
            row = [*row[:_ROW_FIELDS], *[None] * (_ROW_FIELDS - len(row))]
        tid, symbol, config, inputs, cpus, resources, checkpoint, label, inline, ahead = row
        if type(tid) is not int or tid < 0:   # (type(): a bool is no task id)
            raise ProtocolError("a COMPUTE task id is not a non-negative integer")
        if type(symbol) is not str:
            raise ProtocolError(f"task {tid}: symbol is not a string")
        if type(config) is not bytes:
            if isinstance(config, str):
                config = config.encode()
            if not isinstance(config, (bytes, bytearray, memoryview)):
                raise ProtocolError(f"task {tid}: config is not bytes")
            if not (symbol == S.CONST and type(config) is memoryview and config.readonly):
                config = bytes(config)   # (a const's frame stays a view: its data, executors._const)
        if not isinstance(inputs, (list, tuple)):
            raise ProtocolError(f"task {tid}: inputs are not a list of task ids")
        for i in inputs:
            if type(i) is not int or i < 0:
                raise ProtocolError(f"task {tid}: inputs are not a list of task ids")
        if type(cpus) is not int or cpus < 0:
            raise ProtocolError(f"task {tid}: cpus is not a non-negative integer")
        if resources is None or type(resources) is dict and not resources:
            resources = {}
        else:
            resources = resource_amounts(resources)
            if resources is None:
                raise ProtocolError(f"task {tid}: resources are not a map of names to amounts")
        if checkpoint is not None and type(checkpoint) is not str:
            raise ProtocolError(f"task {tid}: checkpoint is not a string")
        if label is not None and type(label) is not str:
            raise ProtocolError(f"task {tid}: label is not a string")
        return cls(tid, symbol, config, list(inputs), cpus, resources, checkpoint or None, label, inline is True,
                   ahead is True)

    @classmethod
    def from_columns(cls, columns) -> list:
        """The tasks of a COMPUTE sent as columns (``messages.ComputeColumns``, checked as
        ``protocol.compute_columns`` read them)."""
        return list(columns.rows(cls, dict))

    @property
    def light(self) -> bool:
        return self.cpus == 0


# light built-ins cheap enough to run inline in the worker's loop
INLINE_SYMBOLS = frozenset({S.CONST, S.MERGE, S.GET, S.SLICE, S.SIZE, S.LENGTH,
                            S.ARRAY_MAKE, S.SPLIT, S.OPEN})


def route(spec: TaskSpec) -> str:
    """Where a started task runs (the one rule, for the process and its tracer)."""
    if spec.symbol == S.RUN:
        return "program"
    if not spec.light:
        return "pool"
    if spec.symbol in INLINE_SYMBOLS and not spec.checkpoint:
        return "inline"
    return "light"


def _poolable(spec: TaskSpec) -> bool:
    """A task that may be overbooked: one for the executor threads (``route``: "pool"),
    naming no resources."""
    return spec.cpus > 0 and not spec.resources and spec.symbol != S.RUN


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TaskQueue:
    """See the module docstring."""

    def __init__(self, cpus: int, resources: dict | None = None):
        self.cpus = int(cpus)
        self.resources = {str(k): int(v) for k, v in (resources or {}).items()}
        self.free_cpus = self.cpus
        self.overbook = 0                            # cpus pool tasks may book beyond free_cpus
        self.short_streak = 0                        # pool tasks in a row shorter than SHORT_TASK_S
        self.tiny_streak = 0                         # ... and shorter than TINY_TASK_S
        self.free_resources = dict(self.resources)
        self.queued: dict[int, TaskSpec] = {}
        self.running: dict[int, TaskSpec] = {}
        self.missing: dict[int, int] = {}            # queued task -> distinct inputs not held
        self.waiters: dict[int, list[int]] = {}      # input id -> queued tasks waiting on it
        self.fetching: set[int] = set()              # inputs requested from peers
        self._seq = 0
        self._arrival: dict[int, int] = {}           # queued task -> arrival number
        self._ready: list[tuple[int, int]] = []      # (arrival, task id), sorted
        self._ready_light = 0                        # how many of them are light
        self.dropped = 0                             # tasks given ahead, dropped (see the docstring)
        self.frame_bytes = 0                         # configs kept as frames (large consts) of queued/running tasks

    # ------------------------------------------------------------------ events
    def assign(self, specs, have, locations: dict) -> tuple[list, list]:
        """Queue tasks. ``have(id)`` (or ``id in have``) says whether data is held here;
        ``locations`` maps input id -> data address. Returns ``(fetch, failed)``:
        ``fetch`` = [(input id, address)] not requested before, ``failed`` = [(task id,
        message)]."""
        has = have if callable(have) else have.__contains__
        fetch: list[tuple[int, str]] = []
        failed: list[tuple[int, str]] = []
        queued, running, fetching, cpus = self.queued, self.running, self.fetching, self.cpus
        for spec in specs:
            tid = spec.id
            if tid in queued or tid in running:
                continue
            if spec.cpus > cpus or spec.resources:
                why = self.never_fits(spec)
                if why:
                    failed.append((tid, why))
                    continue
            missing: list[int] = []
            problem = None
            inputs = spec.inputs
            for i in (dict.fromkeys(inputs) if len(inputs) > 1 else inputs):
                if has(i):
                    continue
                if i in fetching or i in queued or i in running:
                    missing.append(i)
                elif i in locations:
                    missing.append(i)
                    fetch.append((i, locations[i]))
                    self.fetching.add(i)
                else:
                    problem = (f"input {i} of task {tid} is not on this worker and the "
                               "server gave no location for it")
                    break
            if problem:
                if spec.ahead:   # its producer ended here without producing: the server takes it back
                    self.dropped += 1
                else:
                    failed.append((tid, problem))
                continue
            self.queued[tid] = spec
            if type(spec.config) is memoryview:   # (in the process's RSS, not yet data)
                self.frame_bytes += spec.config.nbytes
            self._arrival[tid] = self._seq
            self._seq += 1
            self.missing[tid] = len(missing)
            for i in missing:
                self.waiters.setdefault(i, []).append(tid)
            if not missing:
                self._now_ready(tid)
        return fetch, failed

    def inputs_arrived(self, ids) -> None:
        for i in ids:
            self._arrived(int(i))

    def inputs_unavailable(self, ids, why: str, local: bool = False) -> list:
        """Inputs that will not arrive: every queued task waiting on one fails (one
        given ahead and waiting for a ``local`` producer is dropped)."""
        failed = []
        todo = [int(i) for i in ids]
        while todo:
            i = todo.pop()
            self.fetching.discard(i)
            for tid in self.waiters.pop(i, ()):
                if tid in self.queued:
                    ahead = local and self.queued[tid].ahead
                    self._drop(tid)
                    if ahead:   # (and so are those given ahead of it)
                        self.dropped += 1
                        todo.append(tid)
                    else:
                        failed.append((tid, f"input {i} is unavailable: {why}"))
        return failed

    def finished(self, task_id: int, ok: bool = True) -> list:
        """A running task ended (``ok``: its data is now held here). Frees its cpus and
        resources; when not ok, queued tasks waiting on its data fail."""
        spec = self.running.pop(task_id, None)
        if spec is not None:
            if type(spec.config) is memoryview:
                self.frame_bytes -= spec.config.nbytes
            self.free_cpus += spec.cpus
            for name, amount in spec.resources.items():
                self.free_resources[name] += amount
        if ok:
            self._arrived(task_id)
            return []
        return self.inputs_unavailable([task_id], f"task {task_id} did not produce it here", local=True)

    def ran(self, spec: TaskSpec, seconds: float) -> None:
        """A started task ran this long (0 or less: not measured): sets ``overbook``."""
        if _poolable(spec):
            self.short_streak = self.short_streak + 1 if 0 < seconds < SHORT_TASK_S else 0
            self.tiny_streak = self.tiny_streak + 1 if 0 < seconds < TINY_TASK_S else 0
            if self.short_streak < SHORT_STREAK:
                self.overbook = 0
            elif self.tiny_streak < SHORT_STREAK:
                self.overbook = self.cpus
            else:
                self.overbook = self.cpus * TINY_OVERBOOK

    def take_startable(self, limit: int | None = None) -> list:
        """Ready tasks that fit now (at most ``limit``), in arrival order (first fit);
        their cpus and resources are reserved and they count as running."""
        over = self.overbook if self.overbook and self._only_pool_tasks_run() else 0
        full = -over   # (free_cpus at which no cpu task fits)
        if not self._ready or (self.free_cpus <= full and not self._ready_light):
            return []   # (a full worker with a long queue: this is called every loop)
        start: list[TaskSpec] = []
        keep: list[tuple[int, int]] = []
        for pos, item in enumerate(self._ready):
            if limit is not None and len(start) >= limit:
                keep.extend(self._ready[pos:])
                break
            spec = self.queued[item[1]]
            room = self.free_cpus + over if over and _poolable(spec) else self.free_cpus
            if spec.cpus > room or not self._resources_free(spec):
                keep.append(item)
                if self.free_cpus <= full and not spec.light:
                    # only light tasks can start from here on: skip to them cheaply (none
                    # queued: nothing more starts, and a long queue of cpu tasks is not
                    # walked at every start)
                    if not self._ready_light:
                        keep.extend(self._ready[pos + 1:])
                        break
                    for rest in self._ready[pos + 1:]:
                        other = self.queued[rest[1]]
                        if other.light and self._resources_free(other) and (limit is None or len(start) < limit):
                            self._reserve(other)
                            start.append(other)
                        else:
                            keep.append(rest)
                    break
                continue
            self._reserve(spec)
            start.append(spec)
            if over and spec.cpus and not _poolable(spec):
                over, full = 0, 0
        self._ready = keep
        self._ready_light -= sum(1 for spec in start if spec.light)
        return start

    def _only_pool_tasks_run(self) -> bool:
        """Whether every running cpu task may be overbooked (a program's or a resource
        task's cpus are its own: nothing is overbooked beside it)."""
        return all(_poolable(s) for s in self.running.values() if s.cpus)

    def give_back(self, ids, count: int) -> list:
        """Work stealing: drop up to ``count`` of ``ids`` that could start now and that no
        queued task waits on, those that would start last first; returns their ids."""
        if count <= 0 or not self._ready:
            return []
        wanted = set(ids)
        back: list[int] = []
        for _, tid in reversed(self._ready):   # (arrival order is start order: latest first)
            if tid in wanted and not self.waiters.get(tid):
                back.append(tid)
                if len(back) >= count:
                    break
        for tid in back:
            self._drop(tid)
        return back

    def drop(self, tid: int) -> list:
        """Forget a queued task (it will not run); returns [tid] (its data will not come)."""
        if tid in self.queued:
            self._drop(tid)
        return [tid]

    def drop_queued(self) -> list:
        """Forget every queued task (not the running ones); returns their ids."""
        dropped = list(self.queued)
        for tid in dropped:
            self._drop(tid)
        return dropped

    # ------------------------------------------------------------------ queries
    def never_fits(self, spec: TaskSpec) -> str | None:
        if spec.cpus > self.cpus:
            return (f"task {spec.id} requests {spec.cpus} cpus but this worker has only "
                    f"{self.cpus}")
        for name, amount in spec.resources.items():
            have = self.resources.get(name, 0)
            if amount > have:
                return (f"task {spec.id} requests {amount} of resource {name!r} but this "
                        f"worker has {have}")
        return None

    def is_known(self, task_id: int) -> bool:
        return task_id in self.queued or task_id in self.running

    @property
    def n_ready(self) -> int:
        return len(self._ready)

    def check_invariants(self) -> None:
        assert not (set(self.queued) & set(self.running))
        assert self.frame_bytes == sum(s.config.nbytes for s in [*self.queued.values(), *self.running.values()]
                                       if type(s.config) is memoryview)
        assert self.free_cpus == self.cpus - sum(s.cpus for s in self.running.values())
        assert self.free_cpus >= -self.cpus * TINY_OVERBOOK and (self.free_cpus >= 0 or self._only_pool_tasks_run())
        for name, cap in self.resources.items():
            used = sum(s.resources.get(name, 0) for s in self.running.values())
            assert self.free_resources[name] == cap - used >= 0
        ready = {tid for _, tid in self._ready}
        assert ready == {t for t in self.queued if self.missing[t] == 0}
        assert self._ready_light == sum(1 for t in ready if self.queued[t].light)
        assert [a for a, _ in self._ready] == sorted(a for a, _ in self._ready)

    # ------------------------------------------------------------------ internals
    def _arrived(self, i: int) -> None:
        self.fetching.discard(i)
        waiting = self.waiters.pop(i, None)
        if waiting:
            missing = self.missing
            for tid in waiting:
                left = missing.get(tid)
                if left is not None:
                    missing[tid] = left - 1
                    if left == 1:
                        self._now_ready(tid)

    def _now_ready(self, tid: int) -> None:
        bisect.insort(self._ready, (self._arrival[tid], tid))
        self._ready_light += self.queued[tid].light

    def _resources_free(self, spec: TaskSpec) -> bool:
        return not spec.resources or all(self.free_resources.get(n, 0) >= a for n, a in spec.resources.items())

    def _reserve(self, spec: TaskSpec) -> None:
        tid = spec.id
        del self.queued[tid]
        del self.missing[tid]
        del self._arrival[tid]
        self.free_cpus -= spec.cpus
        for name, amount in spec.resources.items():
            self.free_resources[name] -= amount
        self.running[tid] = spec

    def _drop(self, tid: int) -> None:
        """Remove a queued task (it failed before starting)."""
        spec = self.queued.pop(tid)
        if type(spec.config) is memoryview:
            self.frame_bytes -= spec.config.nbytes
        if self.missing.pop(tid, 1) == 0:
            self._ready.remove((self._arrival[tid], tid))
            self._ready_light -= spec.light
        del self._arrival[tid]
        for i in dict.fromkeys(spec.inputs):
            waiting = self.waiters.get(i)
            if waiting and tid in waiting:
                waiting.remove(tid)
                if not waiting:
                    del self.waiters[i]
