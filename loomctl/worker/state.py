"""The worker's state machine, sans-I/O: ``handle(events, now) -> instructions``.

Events are what the worker process saw since it last asked (messages from the server,
answers of peers, links that became ready or failed, tasks that ended, the clock);
instructions are what it must do next: start a task (``Execute``, with the route the
task takes), stop one (``Kill``), send a report (``SendUpdate``), connect to a peer,
send a FETCH, close a link; inline built-ins (``route``) run within ``handle`` when
the process gives ``run_inline`` (a chain of them: one step, not one per task). The
process (``worker.process``) owns the sockets, threads, programs and clock and carries
the instructions out; everything else is decided here, on plain data (tests drive it).
The events and instructions themselves are in ``worker.events`` (they are re-exported here).

The data objects are in a ``DataStore`` (``worker.store``): in memory or spilled to
files, under the worker's memory limit. Its file I/O is instructions too (SpillWrite,
SpillRead, SpillRemove), answered by the events Spilled and Loaded; the process samples
its RSS into MemorySample events.

Invariants (tests check them after every step, ``check``):
- Data is stored before it is reported: an id in an UPDATE's ``finished`` or
  ``replicas`` is in ``store`` when the UPDATE is handed out.
- ``data_bytes`` is the sum of ``sizes`` over ``store``; ``sizes`` has exactly the ids
  of ``store``.
- A task starts (``Execute``) only with all its inputs in memory; one whose inputs are
  in files holds its cpus in ``loading`` while they are read back. Inputs of started
  and loading tasks are pinned in memory until the task ends (an inline built-in whose
  inputs are in memory runs and ends within the step: it needs no pin).
- While memory use is above the pause threshold, no task starts, except one at a time
  when nothing runs, loads or is being written (so that a worker always makes
  progress). A result larger than the memory limit fails its task and is not kept.
- Every task given in a COMPUTE ends in exactly one report (finished, failed or
  redirected), unless the server cancelled it (CANCEL_TASKS: no report at all) or it was
  given ahead of an input made here that did not come (taskqueue), or it was given back
  (STEAL_TASKS); a task whose input cannot come
  (released, peer gone, fetch timed out, malformed answer) fails with a message saying which input and why.
- An id is fetched from one peer at a time, only over a link that completed its
  handshake; the TaskQueue keeps running tasks within the worker's cpus and resources.
- Reports are held (for one UPDATE with more in it) only while the worker is busy and has
  queued work for all its cpus, with fewer than REPORT_BATCH finishes, and never longer
  than REPORT_HOLD_S; failures, redirects, replicas and the answer to a steal request go
  at once.
- A STEAL_TASKS request is always answered (UPDATE ``returned``, maybe empty); the tasks
  given back are dropped unstarted and nothing more is reported of them.
"""

from __future__ import annotations

import logging

from loomctl import protocol as P
from loomctl.messages import ComputeColumns
from loomctl.worker import data
from loomctl.worker.events import (  # noqa: F401  (the state's events and instructions, as W.<name>)
    CancelTasks, CloseLink, Compute, Connect, Execute, Fetched, Kill, LinkReady, Loaded, MemorySample, PeerGone,
    PeersKnown, ReleaseData, SendFetch, SendUpdate, Spilled, StealTasks, TaskDone, Tick)
from loomctl.worker.fetchplan import FetchPlan
from loomctl.worker.store import (DEFAULT_PAUSE_AT, DEFAULT_SPILL_AT, DataStore, SpillRead, SpillRef,  # noqa: F401
                                  SpillRemove, SpillWrite, human)
from loomctl.worker.outcome import Outcome, Report
from loomctl.worker.taskqueue import INLINE_SYMBOLS, TaskQueue, TaskSpec, is_int, route  # noqa: F401

log = logging.getLogger("loomctl.worker")

# A busy worker sends finish reports at most this late, in one UPDATE: the server does a
# round per message, so fewer and fuller messages leave its cpu to the tasks.
REPORT_HOLD_S = 0.020
REPORT_BATCH = 64   # a report of this many finishes is batch enough: it is not held
EAGER_LINKS = 64   # peers a PEERS message may have this worker link to (the server sends at most 16)


class WorkerState:
    def __init__(self, cpus: int, resources: dict | None = None, fetch_timeout_s: float = 120.0,
                 memory_limit: int | None = None, spill_at: float = DEFAULT_SPILL_AT,
                 pause_at: float = DEFAULT_PAUSE_AT, run_inline=None):
        self.cpus = max(0, int(cpus))
        self.run_inline = run_inline   # (spec, inputs) -> Outcome for "inline" tasks, or None
        self.queue = TaskQueue(self.cpus, resources or {})
        self.store = DataStore(memory_limit, spill_at, pause_at)
        self.loading: dict[int, TaskSpec] = {}   # started tasks whose inputs are read back
        self._io: list = []                      # the store's instructions, for this step
        self._pause_noted = False
        self.plan = FetchPlan()
        self.ready_links: set[str] = set()     # peers whose link completed its handshake
        self.connecting: set[str] = set()      # peers a Connect was given for
        self.report = Report()
        self.report_since: float | None = None  # when the unsent report got its first entry
        self.fetch_timeout_s = fetch_timeout_s
        self.cancelled: set[int] = set()       # running tasks the server gave up

    # ------------------------------------------------------------------ the one entry
    def handle(self, events: list, now: float) -> list:
        """Apply ``events`` in order; the instructions that follow, in order."""
        out: list = []
        rss = None
        for event in events:
            kind = type(event)
            if kind is TaskDone:
                self._done(event.outcome)
            elif kind is Compute:
                self._compute(event.rows, event.locations)
            elif kind is ReleaseData:
                self._release(event.ids)
            elif kind is CancelTasks:
                self._cancel(event.ids, out)
            elif kind is StealTasks:   # (always answered, at once: Report.give_back)
                self.report.give_back(self.queue.give_back(event.ids, event.count))
            elif kind is Fetched:
                self._fetched(event)
            elif kind is LinkReady:
                self.connecting.discard(event.address)
                self.ready_links.add(event.address)
            elif kind is PeerGone:
                self._peer_gone(event.address, event.reason, out)
            elif kind is PeersKnown:
                for address in event.addresses[:EAGER_LINKS]:
                    if isinstance(address, str) and address not in self.ready_links \
                            and address not in self.connecting:
                        self.connecting.add(address)
                        out.append(Connect(address))
            elif kind is Spilled:
                self._io += self.store.written(event.id, event.nbytes, event.error)
            elif kind is Loaded:
                held = event.id in self.store
                self._io += self.store.loaded(event.id, event.obj, event.error)
                if event.error is not None and held:
                    self._load_failed(event.id, event.error)
            elif kind is MemorySample:
                rss = event.rss
            elif kind is not Tick:
                raise TypeError(f"not a worker event: {event!r}")
        if rss is not None:   # (after the batch: the objects it stored count as data, and the
            self.store.sample(rss - self.queue.frame_bytes)   # frames of large consts to run will)
        for address, ids in self.plan.expired(now, self.fetch_timeout_s):
            self._unavailable(ids, f"peer {address} did not answer within {self.fetch_timeout_s:g} s")
        self._start(out)
        self._fetch(out, now)
        self._io += self.store.balance()
        out += self._io
        self._io = []
        self._flush(out, now)
        return out

    def forget_queued(self) -> list:
        """The server dropped this worker: queued tasks and the unsent report are forgotten
        (running tasks run on)."""
        dropped = self.queue.drop_queued()
        self.report = Report()
        self.report_since = None
        return dropped

    # ------------------------------------------------------------------ queries
    @property
    def sizes(self) -> dict:
        return self.store.sizes

    @property
    def data_bytes(self) -> int:
        return self.store.data_bytes

    def objects(self, ids: list) -> tuple[list, list, list]:
        """(found ids, their objects, missing ids): what a peer's FETCH gets; an object
        only in a file is a SpillRef (the process streams the file)."""
        found, objs, missing = [], [], []
        store = self.store
        for i in ids:
            obj = store.get(i)
            if obj is None:
                if i not in store:
                    missing.append(i)
                    continue
                obj = SpillRef(i, store.files[i])
            found.append(i)
            objs.append(obj)
        return found, objs, missing

    def stats(self) -> dict:
        return {"n_data": len(self.store), "data_bytes": self.data_bytes, "running": len(self.queue.running),
                "running_ids": list(self.queue.running), "queued": len(self.queue.queued), **self.store.stats()}

    def hold_deadline(self) -> float | None:
        """When a held report is due (the process wakes up for it)."""
        return None if self.report_since is None else self.report_since + REPORT_HOLD_S

    # ------------------------------------------------------------------ events
    def _compute(self, rows: list, raw_locations: dict) -> None:
        locations = {}
        for key, address in raw_locations.items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            if is_int(key) and isinstance(address, str):
                locations[key] = address
        if type(rows) is ComputeColumns:   # (checked whole as they were read)
            specs = TaskSpec.from_columns(rows)
        else:
            specs = []
            for row in rows:
                try:
                    specs.append(TaskSpec.from_wire(row))
                except P.ProtocolError as exc:
                    log.warning("malformed task in COMPUTE: %s", exc)
                    if isinstance(row, (list, tuple)) and row and is_int(row[0]):
                        self._fail(row[0], f"malformed task assignment: {exc}")
        fetch, failed = self.queue.assign(specs, self.store.sizes, locations)   # (sizes: the ids held)
        for task_id, message in failed:
            self._fail(task_id, message)
        for input_id, address in fetch:
            self.plan.want(input_id, address)

    def _cancel(self, ids, out: list) -> None:
        for t in ids:
            if t in self.queue.queued:   # (and the tasks given ahead of it)
                self._unavailable(self.queue.drop(t), f"task {t} was cancelled", local=True)
            elif t in self.queue.running:
                self.cancelled.add(t)
                out.append(Kill(t))

    def _release(self, ids) -> None:
        drop = self.store.drop
        for i in ids:
            io = drop(i)
            if io:
                self._io += io

    def _peer_gone(self, address: str, reason: str, out: list) -> None:
        known = address in self.ready_links or address in self.connecting or address in self.plan.addresses()
        if not known:
            return
        self.ready_links.discard(address)
        self.connecting.discard(address)
        out.append(CloseLink(address))
        log.warning("giving up on fetches from %s: %s", address, reason)
        self._unavailable(self.plan.give_up(address), reason)

    def _fetched(self, event: Fetched) -> None:
        entry = self.plan.answered(event.req, event.address)
        if entry is None:
            log.warning("peer %s answered an unknown or expired request %d", event.address, event.req)
            return
        asked = entry[1]
        if len(event.objects) != len(event.found) or not set(event.found) <= set(asked):
            log.warning("peer %s sent a malformed DATA answer", event.address)
            self._unavailable(asked, f"peer {event.address} sent a malformed answer")
            return
        arrived, bad = [], []
        for task_id, obj in zip(event.found, event.objects):
            if isinstance(obj, str):
                bad.append((task_id, obj))
                continue
            if task_id not in self.store:
                self._store(task_id, obj)
                self.report.replicas.append(task_id)
            arrived.append(task_id)
        self.queue.inputs_arrived(arrived)
        for task_id, why in bad:
            self._unavailable([task_id], f"peer {event.address} sent it malformed: {why}")
        absent = sorted(set(asked) - set(event.found))
        if absent:
            self._unavailable(absent, f"peer {event.address} does not hold it")

    def _done(self, outcome: Outcome, pinned: bool = True) -> None:
        task_id = outcome.task_id
        if self.cancelled and task_id in self.cancelled:   # given up by the server: nothing of it is kept or said
            self.cancelled.discard(task_id)
            self.queue.finished(task_id, ok=False)
            return
        spec = self.queue.running.get(task_id)
        if spec is not None and pinned:
            self.store.unpin(spec.inputs)
            if self.loading:
                self.loading.pop(task_id, None)
            self.queue.ran(spec, outcome.ended - outcome.started)
        report = self.report
        for level, message in outcome.logs:
            report.logs.append([task_id, level, message])
        if outcome.error is None and outcome.redirect is None and self.store.limit is not None:
            too_big = self.store.too_big(task_id, outcome.size)
            if too_big:
                outcome.error, outcome.result = too_big, None
        if outcome.error is not None:
            self._fail(task_id, outcome.error, spec)
            failed = self.queue.finished(task_id, ok=False)
        elif outcome.redirect is not None:
            report.redirects.append([task_id, outcome.redirect])
            failed = self.queue.finished(task_id, ok=False)
        else:
            io = self.store.put(task_id, outcome.result, outcome.size, outcome.length)
            if io:
                self._io += io
            if spec is not None and spec.inline and outcome.size <= P.INLINE_BYTES:
                self._send_along(task_id, outcome.result)
            report.finished.append(task_id)
            report.sizes.append(outcome.size)
            report.lengths.append(outcome.length)
            if spec is not None and spec.cpus and outcome.started > 0:   # (how short its cpu tasks are)
                report.busy_count += 1
                report.busy_seconds += max(0.0, outcome.ended - outcome.started)
            failed = self.queue.finished(task_id, ok=True)
        for other, message in failed:
            self._fail(other, message)

    # ------------------------------------------------------------------ instructions
    def _start(self, out: list) -> None:
        store, run_inline = self.store, self.run_inline
        for spec in [s for s in self.loading.values() if all(i in store.memory for i in s.inputs)
                     or not all(i in store for i in s.inputs)]:
            del self.loading[spec.id]
            self._execute(spec, out)
        while True:   # (again while tasks that ended at once, run inline or failed to start, freed cpus)
            limit = None
            if store.paused():
                self._io += store.balance()   # (what can leave memory goes first)
                if self.queue.running or store.writing:
                    if not self._pause_noted:
                        self._pause_noted = True
                        log.info("memory use %s is above %.0f%% of the limit %s: no new task starts",
                                 human(store.used()), 100 * store.pause_at, human(store.limit))
                    return
                limit = 1   # nothing runs and nothing more can leave memory: one at a time
            else:
                self._pause_noted = False
            started = self.queue.take_startable(limit)
            for spec in started:
                if run_inline is not None and route(spec) == "inline" and self._run_inline(spec):
                    continue
                store.pin(spec.inputs)
                if store.some_on_disk_only():
                    for i in dict.fromkeys(spec.inputs):
                        self._io += store.load(i)
                    if any(store.on_disk_only(i) for i in spec.inputs):
                        self.loading[spec.id] = spec
                        continue
                self._execute(spec, out)
            if not started or all(spec.id in self.queue.running for spec in started):
                return

    def _run_inline(self, spec: TaskSpec) -> bool:
        """Run an inline task now if its inputs are in memory (unpinned: it ends before
        anything else happens); False if they are not (it starts as any other)."""
        memory = self.store.memory
        try:
            inputs = [memory[i] for i in spec.inputs]
        except KeyError:
            return False
        touch = self.store.lru.move_to_end
        for i in spec.inputs:
            touch(i)
        self._done(self.run_inline(spec, inputs), pinned=False)
        return True

    def _execute(self, spec: TaskSpec, out: list) -> None:
        memory = self.store.memory
        inputs = [memory.get(i) for i in spec.inputs]
        if any(obj is None for obj in inputs):
            lost = [i for i, obj in zip(spec.inputs, inputs) if obj is None]
            # (a failed start, as an outcome: it frees the task's cpus in the queue)
            self._done(Outcome(spec.id, error=f"input {lost[0]} was released from this worker before "
                                              "the task started"))
            return
        touch = self.store.lru.move_to_end   # (most recently used; every id in memory is in lru)
        for i in spec.inputs:
            touch(i)
        where = route(spec)
        if where == "inline" and self.run_inline is not None:   # ends here: _start goes on
            return self._done(self.run_inline(spec, inputs))
        out.append(Execute(spec, inputs, where))

    def _load_failed(self, input_id: int, error: str) -> None:
        """The object of ``input_id`` is lost: the tasks loading it fail, and so does its
        own task if its finish is not reported yet."""
        message = f"could not be read back from its spill file: {error}"
        for spec in [s for s in self.loading.values() if input_id in s.inputs]:
            self._done(Outcome(spec.id, error=f"input {input_id} {message}"))
        if input_id in self.report.finished:
            self.report.drop_finished(input_id)
            self._fail(input_id, f"its result {message}")

    def _fetch(self, out: list, now: float) -> None:
        for address in self.plan.pending:
            if address not in self.ready_links and address not in self.connecting:
                self.connecting.add(address)
                out.append(Connect(address))
        for address, req, ids in self.plan.take(now, self.ready_links.__contains__):
            out.append(SendFetch(address, req, ids))

    def _flush(self, out: list, now: float) -> None:
        if not self.report:
            return
        if self.report_since is None:
            self.report_since = now
        if self._may_hold() and now - self.report_since < REPORT_HOLD_S:
            return
        # (first of the step's instructions: before the tasks it starts, whose threads may keep
        # the GIL a while; a py/value's import held a map-reduce's first report back ~8 ms)
        out.insert(0, SendUpdate(self.report.body()))
        self.report = Report()
        self.report_since = None

    def _may_hold(self) -> bool:
        """Finish reports may wait (for one UPDATE) while the worker is busy with queued work
        for all its cpus and the report is small: the server then handles fewer, larger
        batches. A large one goes at once: consumers of what it reports may be waiting to
        run elsewhere (a split's 1,000 pieces, held 8 ms behind a py/value's import)."""
        return bool(self.queue.running) and len(self.queue.queued) >= max(1, self.cpus) \
            and len(self.report.finished) < REPORT_BATCH and not self.report.urgent()

    # ------------------------------------------------------------------ helpers
    def _unavailable(self, ids, reason: str, local: bool = False) -> None:
        for task_id, message in self.queue.inputs_unavailable(ids, reason, local):
            self._fail(task_id, message)
            if not local:   # (a peer did not give the input: the server may run it again)
                self.report.unfetched.append(task_id)

    def _fail(self, task_id: int, message: str, spec: TaskSpec | None = None) -> None:
        self.report.failed.append([task_id, message])
        what = f" ({spec.symbol}{f', {spec.label}' if spec.label else ''})" if spec else ""
        first = message.strip().splitlines()[0] if message.strip() else "(no message)"
        log.warning("task %d%s failed: %s", task_id, what, first)

    def _store(self, task_id: int, obj: data.DataObject, size: int | None = None,
               length: int | None = None) -> None:
        try:
            size = obj.size() if size is None else size
        except data.TaskError:
            size = 0
        try:
            length = obj.length() if length is None else length
        except data.TaskError:
            length = 0
        self._io += self.store.put(task_id, obj, size, length)

    def _send_along(self, task_id: int, obj: data.DataObject) -> None:
        """A small result a client waits for goes with the finish report (it stays here
        too), if it is cheap to encode (see data.cheap_to_encode)."""
        if not data.cheap_to_encode(obj):
            return
        try:
            blob = data.encode(obj)
        except data.TaskError:
            return
        if len(blob) <= P.INLINE_BYTES:
            self.report.inline.append(task_id)
            self.report.blobs.append(blob)

    def check(self) -> None:
        """The module's invariants (for tests)."""
        self.queue.check_invariants()
        self.store.check()
        assert set(self.loading) <= set(self.queue.running), "loading tasks hold their cpus"
        pinned: dict = {}
        for spec in self.queue.running.values():
            for i in spec.inputs:
                pinned[i] = pinned.get(i, 0) + 1
        assert {i: n for i, n in pinned.items() if i in self.store} == \
            {i: n for i, n in self.store.pins.items() if i in self.store}, "inputs of started tasks are pinned"
        assert not self.ready_links & self.connecting, "a link is ready or connecting, not both"
