"""A simulated worker: cpus, a queue of assigned tasks, the data it holds, its reports.

It behaves as the real worker does (``loomctl.worker.state`` / ``taskqueue``), minus the
execution: tasks arrive in COMPUTE batches; inputs it lacks are fetched from their
holders (one request per peer per batch; an input wanted by several tasks is fetched
once; an input without a location is made here by a task given earlier); a task whose inputs are local is *ready*; ready tasks start first-fit in arrival
order within the cpus (light tasks, cpus == 0, start at once); a finished task's data is
stored before it is reported. Finish reports are held (at most REPORT_HOLD_S, the real
worker's constant) while the worker is busy and has queued work for all its cpus;
replicas and given-back tasks go at once. A STEAL request gives back up to ``count`` of
the listed tasks that have not started, those it would start last first.

Invariants (``check``): a task is queued or running, never both; the cpus of running
tasks add up to ``cpus - free``, and ``free >= 0``; a ready task has every input in
``store``; every task is reported finished at most once.
"""

from __future__ import annotations

from collections import deque

from loomctl.worker.state import REPORT_HOLD_S


class SimWorker:
    def __init__(self, index: int, wid: int, key: bytes, cpus: int):
        self.index = index                  # position in the simulation's worker list
        self.wid = wid                      # the core's worker id
        self.key = key
        self.cpus = cpus
        self.free = cpus
        self.tasks: dict[int, list] = {}    # queued: id -> [row, missing inputs]
        self.ready: deque[int] = deque()    # queued cpu tasks with every input here, arrival order
        self.ready_light: deque[int] = deque()   # the same, of light tasks (they start at once)
        self.running: dict[int, tuple] = {}  # id -> (row, start time, slots)
        self.store: dict[int, int] = {}     # data held: id -> size
        self.fetching: dict[int, list] = {}  # input id -> queued tasks waiting for it
        self.finished: list[int] = []       # the unsent report
        self.sizes: list[int] = []
        self.lengths: list[int] = []
        self.replicas: list[int] = []
        self.returned: list[int] | None = None   # the answer to a steal request (maybe empty), to send
        self.report_since: float | None = None
        self.flush_due = False               # a flush event is scheduled
        self.hold_until: float | None = None  # a hold deadline event is scheduled
        self.free_slots = list(range(cpus))  # for traces: lowest free cpu slot first
        self.light_slots: list[int] = []
        self.n_light = 0
        self.reported: set[int] = set()

    # ------------------------------------------------------------------ COMPUTE
    def assign(self, rows, locations: dict) -> dict:
        """Queue the tasks; returns {holder address: [input ids]} to fetch."""
        fetch: dict[str, list] = {}
        store, fetching = self.store, self.fetching
        for row in rows:
            tid = row.id
            if tid in self.tasks or tid in self.running:
                continue
            missing = 0
            for i in set(row.inputs):
                if i in store:
                    continue
                missing += 1
                waiters = fetching.get(i)
                if waiters is None:
                    fetching[i] = [tid]
                    if i in locations:   # (else made here: the task was given ahead, core.speculation)
                        fetch.setdefault(locations[i], []).append(i)
                else:
                    waiters.append(tid)
            self.tasks[tid] = [row, missing]
            if not missing:
                (self.ready if row.cpus else self.ready_light).append(tid)
        return fetch

    def arrived(self, ids, sizes) -> None:
        """Fetched data is here: it is stored, reported as replicas, waiters may be ready."""
        for i, size in zip(ids, sizes):
            if i not in self.store:
                self.store[i] = size
                self.replicas.append(i)
            self._here(i)

    def _here(self, i: int) -> None:
        """The data of ``i`` is in the store: the tasks waiting for it may be ready."""
        for tid in self.fetching.pop(i, ()):
            entry = self.tasks.get(tid)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    (self.ready if entry[0].cpus else self.ready_light).append(tid)

    def release(self, ids) -> None:
        for i in ids:
            self.store.pop(i, None)

    # ------------------------------------------------------------------ running
    def startable(self) -> list:
        """Take the ready tasks that fit now (first-fit in arrival order; light ones all):
        [(id, row, slots)]."""
        out = []
        while self.ready_light:
            tid = self.ready_light.popleft()
            entry = self.tasks.pop(tid, None)
            if entry is not None:
                out.append((tid, entry[0], self._take_slots(0)))
        ready = self.ready
        if not ready or self.free == 0:
            return out
        skipped = []
        while ready and self.free > 0:
            tid = ready.popleft()
            entry = self.tasks.get(tid)
            if entry is None:   # given back
                continue
            need = entry[0].cpus
            if need > self.free:
                skipped.append(tid)
                continue
            del self.tasks[tid]
            self.free -= need
            out.append((tid, entry[0], self._take_slots(need)))
        ready.extendleft(reversed(skipped))
        return out

    def _take_slots(self, need: int) -> tuple:
        if need:
            self.free_slots.sort()
            taken, self.free_slots = self.free_slots[:need], self.free_slots[need:]
            return tuple(taken)
        if self.light_slots:
            self.light_slots.sort()
            return (-2 - self.light_slots.pop(0),)
        self.n_light += 1
        return (-2 - (self.n_light - 1),)

    def started(self, tid: int, row, now: float, slots: tuple) -> None:
        self.running[tid] = (row, now, slots)

    def done(self, tid: int, size: int, length: int, now: float):
        """A running task ended; returns (row, start time, slots)."""
        row, began, slots = self.running.pop(tid)
        self.free += row.cpus
        for s in slots:
            if s >= 0:
                self.free_slots.append(s)
            else:
                self.light_slots.append(-2 - s)
        self.store[tid] = size
        self._here(tid)
        assert tid not in self.reported, f"task {tid} reported twice"
        self.reported.add(tid)
        self.finished.append(tid)
        self.sizes.append(size)
        self.lengths.append(length)
        return row, began, slots

    # ------------------------------------------------------------------ stealing
    def give_back(self, ids, count: int) -> list:
        """Up to ``count`` of ``ids`` that are queued (not started), latest first."""
        wanted = set(ids)
        order = [tid for tid in reversed(list(self.tasks)) if tid in wanted]
        back = order[:max(0, count)]
        for tid in back:
            del self.tasks[tid]
        self.returned = (self.returned or []) + back   # (answered even with none, as a real worker does)
        return back

    # ------------------------------------------------------------------ reports
    def has_report(self) -> bool:
        return bool(self.finished or self.replicas) or self.returned is not None

    def may_hold(self) -> bool:
        """The real worker's rule: hold finish reports while busy with work queued for
        every cpu, unless something urgent is in the report."""
        return bool(self.running) and len(self.tasks) >= max(1, self.cpus) \
            and not self.replicas and self.returned is None

    def take_report(self) -> tuple:
        out = (self.finished, self.sizes, self.lengths, self.replicas, self.returned)
        self.finished, self.sizes, self.lengths, self.replicas, self.returned = [], [], [], [], None
        self.report_since = None
        return out

    def check(self) -> None:
        assert not set(self.tasks) & set(self.running), "a task is queued and running"
        assert self.free >= 0 and self.free == self.cpus - sum(r.cpus for r, _, _ in self.running.values()), \
            "free cpus"
        for tid in [*self.ready, *self.ready_light]:
            if tid in self.tasks:
                assert all(i in self.store for i in self.tasks[tid][0].inputs), f"ready task {tid} lacks inputs"


HOLD_S = REPORT_HOLD_S
