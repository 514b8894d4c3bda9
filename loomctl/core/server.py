"""The server's sans-I/O reactor: events in, commands out. No sockets, threads or clock.

Events are method calls (``submit``, ``add_worker``, ``tasks_finished``, ...); each
appends commands ``(target_kind, target, message_kind, body)`` to ``self.commands``,
which the process shell drains and sends. ``schedule()`` places ready tasks in one batch.

Invariants (checked by ``check_invariants`` in tests):
- ``remaining[t]`` = input slots of t whose task is not FINISHED (for WAITING tasks);
  a task is READY exactly when it is WAITING-free with remaining 0 and not yet placed.
- ``holds[t]`` = unfinished consumer slots of t + 1 if a client still wants t's data.
  Data of a FINISHED task is released (owner -1) as soon as holds reaches 0.
- ``owner[t] >= 0`` iff t's data is held by that worker; ``n_data`` counts those.
- A worker's assigned cpus / light counts equal the sums over its ASSIGNED tasks.
- When a worker is lost, the others are told (PEER_LOST) to stop fetching from it; a task
  ASSIGNED elsewhere that was to fetch an input from it is ``stranded``: its failure
  report from that worker ("input unavailable") makes it wait and run again, once,
  instead of failing its job.
- A job ended RETIRE_AFTER_S ago whose tasks hold no data and run nowhere is *retired*
  (``retire_jobs``): its segments and record are dropped, a status row stays in
  ``history`` (the last JOB_HISTORY). Only the per-task columns (~50 bytes a task) of
  its ids remain, so a server that runs many jobs for hours does not grow per job.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph, GraphError
from loomctl import protocol as P
from loomctl.core import placement
from loomctl.core.tasktable import (ALIAS, ASSIGNED, CANCELLED, FAILED, FINISHED, FLAG_CHECKPOINT,
                                    FLAG_EXTRA, FLAG_LOADED, FLAG_OVERRIDE, FLAG_RESULT, READY,
                                    SKIPPED, STATE_NAMES, WAITING, Segment, SegmentIndex,
                                    TaskColumns)

MAX_ATTEMPTS = 3   # a task that lost its worker this many times fails
RETIRE_AFTER_S = 1.0   # an ended job is kept whole at least this long (traces, late reports)
JOB_HISTORY = 1000     # status rows kept of retired jobs


def small_unique(values: np.ndarray) -> np.ndarray:
    """np.unique, without its sorting cost for the one- or two-element arrays that most
    reports carry."""
    if len(values) <= 1:
        return values
    if len(values) == 2:
        return values[:1] if values[0] == values[1] else np.sort(values)
    return np.unique(values)


def _drop_range(table: dict, lo: int, hi: int) -> None:
    """Remove the keys lo <= key < hi of a dict keyed by task id."""
    if not table:
        return
    keys = [k for k in table if lo <= k < hi] if len(table) < hi - lo else \
        [k for k in range(lo, hi) if k in table]
    for k in keys:
        del table[k]


class SubmitError(Exception):
    """A submission is refused; the message is for the client."""


@dataclass
class Worker:
    id: int
    key: bytes                     # the shell's handle (zmq identity)
    name: str
    hostname: str
    cpus: int
    resources: dict
    symbols: set
    data_address: str
    assigned_cpus: int = 0
    assigned_light: int = 0
    assigned_resources: dict = field(default_factory=dict)
    last_seen: float = 0.0
    stats: dict = field(default_factory=dict)
    tasks_done: int = 0
    support_mask: np.ndarray | None = None   # cache of ServerCore._support_mask
    queue_factor: int = placement.QUEUE_FACTOR   # from the rate of cpu tasks it finishes
    rate_since: float | None = None          # start of the window counting them
    rate_count: int = 0

    RATE_WINDOW = 0.05   # seconds

    def count_finished(self, cpu_tasks: int, now: float) -> None:
        """Account finished cpu tasks; every RATE_WINDOW, set queue_factor from the rate."""
        if self.rate_since is None:
            self.rate_since = now
        self.rate_count += cpu_tasks
        elapsed = now - self.rate_since
        if elapsed >= self.RATE_WINDOW:
            self.queue_factor = placement.queue_factor(self.rate_count / elapsed, self.cpus)
            self.rate_since, self.rate_count = now, 0

    def settle(self, now: float) -> None:
        """Without finishes for two windows, the rate so far, quiet time included, sets
        the queue again: a worker whose tasks turned long keeps no deep queue of them."""
        if self.rate_since is not None and now - self.rate_since >= 2 * self.RATE_WINDOW:
            self.count_finished(0, now)


@dataclass
class Job:
    id: int
    client: bytes | None
    name: str
    base: int
    n: int
    active: int                    # tasks to run (not alias / skipped)
    results: np.ndarray
    submitted: float
    status: str = "running"
    finished: int = 0
    failed: int = 0
    error: dict | None = None
    watchers: set = field(default_factory=set)
    ended: float | None = None
    trace: str | None = None
    detached: bool = False      # kept when its client disconnects (loomctl submit)
    appended: bool = False      # has tasks after its id range (redirection sub-plans, dslice/dget)
    segments: list = field(default_factory=list)   # its segment indices (the first: its own range)


class ServerCore:
    def __init__(self):
        self.cols = TaskColumns()
        self.segs = SegmentIndex()
        self.symbols: list[str] = []
        self.symbol_codes: dict[str, int] = {}
        self.workers: dict[int, Worker] = {}
        self.jobs: dict[int, Job] = {}
        self.ready: list[np.ndarray] = []
        self.commands: list[tuple] = []
        self.replicas: dict[int, set[int]] = {}
        self.extra_consumers: dict[int, list[int]] = {}
        self.overrides: dict[int, tuple[str, bytes, np.ndarray]] = {}
        self.n_data = 0
        self.any_named_requests = False   # fast path: no task asked for more than cpus
        self.lost_workers: list[dict] = []
        self.stranded: dict[int, int] = {}   # task -> worker it waits on, for a lost input
        self.aborted_jobs: set[int] = set()   # cancelled or failed: late results are dropped
        self.ended_jobs: deque[int] = deque()  # ended, not retired yet, in the order they ended
        self.history: deque[dict] = deque(maxlen=JOB_HISTORY)   # status rows of retired jobs
        self.next_worker = 0
        self.next_job = 1
        self.stats = {"scheduled": 0, "finished": 0, "failed": 0, "rounds": 0, "transfers": 0,
                      "transfer_bytes": 0, "retired_jobs": 0}

    # ------------------------------------------------------------------ helpers
    def _send(self, kind: str, target, message: bytes, body: dict, *blobs) -> None:
        self.commands.append((kind, target, message, body, blobs))

    def take_commands(self) -> list[tuple]:
        out, self.commands = self.commands, []
        return out

    def _code(self, symbol: str) -> int:
        code = self.symbol_codes.get(symbol)
        if code is None:
            code = self.symbol_codes[symbol] = len(self.symbols)
            self.symbols.append(symbol)
        return code

    # ------------------------------------------------------------------ workers
    def add_worker(self, key: bytes, info: dict, now: float) -> int:
        wid = self.next_worker
        self.next_worker += 1
        self.workers[wid] = Worker(
            id=wid, key=key, name=str(info.get("name") or f"worker-{wid}"),
            hostname=str(info.get("hostname", "")), cpus=max(0, int(info.get("cpus", 1))),
            resources={str(k): int(v) for k, v in dict(info.get("resources") or {}).items()},
            symbols=set(info.get("symbols") or ()), data_address=str(info.get("data_address", "")),
            last_seen=now)
        self._fail_unsatisfiable()
        return wid

    def remove_worker(self, wid: int, now: float, reason: str = "lost") -> None:
        """A worker is gone: its assigned tasks run again elsewhere; data that only it
        held is recomputed when still needed."""
        worker = self.workers.pop(wid, None)
        if worker is None:
            return
        self.lost_workers.append({"id": wid, "name": worker.name, "reason": reason, "at": now})
        c = self.cols
        n = c.n
        assigned = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.worker[:n] == wid))
        self._strand(wid, worker.data_address)
        for t in list(self.replicas):
            holders = self.replicas[t]
            holders.discard(wid)
            if not holders:
                del self.replicas[t]
        lost = np.flatnonzero(c.owner[:n] == wid)
        for t in lost:
            holders = self.replicas.pop(int(t), set())
            if holders:   # a replica survives: promote it
                c.owner[t] = holders.pop()
                if holders:
                    self.replicas[int(t)] = holders
            else:
                c.owner[t] = -1
                self.n_data -= 1
        c.attempts[assigned] += 1
        too_many = assigned[c.attempts[assigned] >= MAX_ATTEMPTS]
        for t in too_many:
            self._task_failed(int(t), f"task was running on a worker that was lost {MAX_ATTEMPTS} times "
                              f"(last: {worker.name}); it may be killing its worker", worker.name, now)
        retry = assigned[c.state[assigned] == ASSIGNED]
        c.state[retry] = WAITING
        c.worker[retry] = -1
        self._recompute_lost(now)
        self._make_ready(retry)
        self._fail_unsatisfiable()

    def _strand(self, wid: int, address: str) -> None:
        """Before the owners of ``wid``'s data change: remember the tasks assigned to
        other workers that need data ``wid`` held, and tell the others it is gone."""
        c = self.cols
        n = c.n
        self.stranded = {t: w for t, w in self.stranded.items()
                         if w != wid and c.state[t] == ASSIGNED and c.worker[t] == w}
        held = c.owner[:n] == wid
        if held.any():
            elsewhere = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.worker[:n] >= 0) & (c.worker[:n] != wid))
            for t in elsewhere.tolist():
                if held[self._inputs(t)].any():
                    self.stranded[t] = int(c.worker[t])
        for other in self.workers.values():
            self._send("worker", other.key, P.PEER_LOST, {"address": address})

    def _recompute_lost(self, now: float) -> None:
        """Finished tasks whose data vanished but is still needed go back to WAITING,
        together with their own lost inputs, recursively."""
        c = self.cols
        n = c.n
        lost = np.flatnonzero((c.state[:n] == FINISHED) & (c.owner[:n] < 0) & (c.holds[:n] > 0))
        if not len(lost):
            return
        todo = list(map(int, lost))
        redo: set[int] = set()
        while todo:
            t = todo.pop()
            if t in redo:
                continue
            redo.add(t)
            for i in self._inputs(t):
                i = int(i)
                if c.state[i] == FINISHED and c.owner[i] < 0 and i not in redo:
                    todo.append(i)
        redo_ids = np.array(sorted(redo), dtype=np.int64)
        # consumers of the redone tasks that are waiting must wait for them again
        for t in redo_ids:
            c.state[t] = WAITING
            for consumer in self._consumers(int(t)):
                if c.state[consumer] in (WAITING, READY):
                    c.remaining[consumer] += 1
                    c.state[consumer] = WAITING
            for i in self._inputs(int(t)):
                c.holds[i] += 1
            job = self.jobs.get(int(c.job[t]))
            if job is not None and job.status == "running":
                job.finished -= 1
        for t in redo_ids:
            ins = self._inputs(int(t))
            c.remaining[t] = int(np.count_nonzero(c.state[ins] != FINISHED)) if len(ins) else 0
        self._make_ready(redo_ids)

    def heartbeat(self, wid: int, stats: dict, now: float) -> None:
        worker = self.workers.get(wid)
        if worker is not None:
            worker.last_seen = now
            worker.stats = stats

    def dead_workers(self, now: float, timeout: float) -> list[int]:
        return [w.id for w in self.workers.values() if now - w.last_seen > timeout]

    # ------------------------------------------------------------------ submit
    def submit(self, client: bytes | None, graph: Graph, now: float, load: bool = False,
               name: str = "", notify: bool = True, trace: str | None = None,
               redirect_inputs: np.ndarray | None = None, detached: bool = False) -> Job:
        """Add a validated graph as a new job (or, with ``redirect_inputs``, as a
        redirection sub-plan whose TASK_INPUT pseudo-tasks map to those ids)."""
        n = len(graph)
        c = self.cols
        base = c.n
        local_to_global = np.arange(base, base + n, dtype=np.int64)
        alias = np.zeros(n, dtype=bool)
        for symbol, targets in ((S.FUTURE, None), (S.TASK_INPUT, redirect_inputs)):
            mask = graph.type_codes(symbol)
            if not mask.any():
                continue
            if symbol == S.TASK_INPUT and targets is None:
                raise SubmitError(f"{graph.describe(int(np.flatnonzero(mask)[0]))} is only valid inside a redirection")
            for i in np.flatnonzero(mask):
                ref = S.decode_u64(graph.config(int(i)))
                if targets is not None:
                    if ref >= len(targets):
                        raise SubmitError(f"redirection uses input {ref}, the task has {len(targets)}")
                    ref = int(targets[ref])
                elif not self._usable_future(ref):
                    raise SubmitError(f"{graph.describe(int(i))}: future {ref} is unknown, failed or released")
                local_to_global[i] = ref
                alias[i] = True
        if (alias & (graph.flags & 1).astype(bool)).any():
            raise SubmitError("a future cannot itself be a result of a submission")
        global_inputs = local_to_global[graph.inputs]
        c.allocate(n)
        ids = np.arange(base, base + n, dtype=np.int64)
        job = Job(id=self.next_job, client=client, name=name, base=base, n=n, active=0,
                  results=np.zeros(0, np.int64), submitted=now, trace=trace, detached=detached)
        self.next_job += 1
        segment = Segment.build(len(self.segs.segments), base, graph, global_inputs, graph.input_offsets)
        self.segs.add(segment)
        job.segments.append(segment.index)
        self.any_named_requests |= segment.has_named_requests
        lut = np.array([self._code(s) for s in graph.symbols] or [0], dtype=np.int32)
        c.symbol[base:base + n] = lut[graph.types] if n else 0
        c.job[base:base + n] = job.id
        c.segment[base:base + n] = segment.index
        c.cpus[base:base + n] = [int((graph.request(i) or {}).get("cpus", 0)) for i in range(n)] \
            if len(graph.requests) else 0
        if graph.checkpoints is not None:
            c.flags[base:base + n] |= np.where(graph.checkpoints.lengths() > 0, FLAG_CHECKPOINT, 0).astype(np.uint8)
        results = graph.flags & 1
        if redirect_inputs is None and not results.any():
            consumed = np.zeros(n, dtype=bool)
            consumed[graph.inputs] = True
            results = (~consumed & ~alias).astype(np.uint8)
        c.flags[base:base + n] |= np.where(results > 0, FLAG_RESULT, 0).astype(np.uint8)
        c.state[base:base + n] = np.where(alias, ALIAS, WAITING)
        needed = self._load_checkpoints(graph, ids, alias, base) if load else ~alias
        c.state[ids[~needed & ~alias]] = SKIPPED
        # holds: one per consumer slot of a needed consumer, plus the client's hold
        counts = np.diff(graph.input_offsets)
        consumer_slots = np.repeat(ids, counts)
        live_slots = needed[consumer_slots - base] & ~(c.flags[consumer_slots] & FLAG_LOADED).astype(bool)
        np.add.at(c.holds, global_inputs[live_slots], 1)
        c.holds[ids[results > 0]] += 1
        # remaining: live slots whose input is not finished
        unfinished = c.state[global_inputs] != FINISHED
        np.add.at(c.remaining, consumer_slots[live_slots & unfinished], 1)
        # consumers of older tasks (futures, redirect inputs) are "extra"
        external = live_slots & (global_inputs < base)
        for producer, consumer in zip(global_inputs[external].tolist(), consumer_slots[external].tolist()):
            self.extra_consumers.setdefault(producer, []).append(consumer)
            c.flags[producer] |= FLAG_EXTRA
        job.active = int(np.count_nonzero(needed))
        job.results = ids[(results > 0) & needed]
        if client is not None and notify:
            job.watchers.add(client)
        self.jobs[job.id] = job
        self._fail_unsatisfiable(self._make_ready(ids[needed & (c.remaining[base:base + n] == 0)]))
        if job.active == 0:
            self._end_job(job, "finished", now)
        return job

    def _usable_future(self, ref: int) -> bool:
        c = self.cols
        if not 0 <= ref < c.n:
            return False
        state = c.state[ref]
        if state == FINISHED:
            return c.owner[ref] >= 0
        return state in (WAITING, READY, ASSIGNED) and c.holds[ref] > 0

    def _load_checkpoints(self, graph: Graph, ids, alias, base) -> np.ndarray:
        """Mark tasks whose checkpoint file exists as loaded; returns the mask of tasks
        that must run (reachable from results and sinks without crossing a loaded one)."""
        c = self.cols
        n = len(graph)
        loaded = np.zeros(n, dtype=bool)
        if graph.checkpoints is not None:
            for i in np.flatnonzero(graph.checkpoints.lengths()):
                path = graph.checkpoint(int(i))
                if path and os.path.isfile(path):
                    loaded[i] = True
                    self.overrides[base + int(i)] = (S.OPEN, path.encode(), np.zeros(0, np.int64))
        c.flags[ids[loaded]] |= FLAG_LOADED | FLAG_OVERRIDE
        consumed = np.zeros(n, dtype=bool)
        consumed[graph.inputs] = True
        needed = np.zeros(n, dtype=bool)
        frontier = np.flatnonzero((~consumed | (graph.flags & 1).astype(bool)) & ~alias)
        while len(frontier):
            frontier = frontier[~needed[frontier]]
            needed[frontier] = True
            expand = frontier[~loaded[frontier]]
            starts, ends = graph.input_offsets[expand], graph.input_offsets[expand + 1]
            from loomctl.core.tasktable import ranges
            nxt = graph.inputs[ranges(starts, ends)]
            frontier = np.unique(nxt[~alias[nxt]])
        return needed & ~alias

    # ------------------------------------------------------------------ task graph access
    def _inputs(self, t: int) -> np.ndarray:
        override = self.overrides.get(t)
        return override[2] if override is not None else self.segs.task_inputs(t)

    def _consumers(self, t: int) -> list[int]:
        seg, local = self.segs.locate(t)
        out = seg.consumers[seg.consumer_offsets[local]:seg.consumer_offsets[local + 1]].tolist()
        return out + self.extra_consumers.get(t, [])

    def _make_ready(self, ids: np.ndarray) -> np.ndarray:
        """Waiting tasks of ``ids`` with no input left to wait for become ready; returns those."""
        if len(ids):
            c = self.cols
            ids = ids[(c.state[ids] == WAITING) & (c.remaining[ids] == 0)]
            c.state[ids] = READY
            self.ready.append(ids)
        return ids

    # ------------------------------------------------------------------ reports
    def tasks_finished(self, wid: int, ids: np.ndarray, sizes: np.ndarray, lengths: np.ndarray,
                       now: float, inline: dict[int, bytes] | None = None) -> None:
        """A worker finished ``ids`` and holds their data; ``inline`` has the encodings
        of some (small results it was asked to send along), passed on to the watchers."""
        c = self.cols
        worker = self.workers.get(wid)
        valid = (ids >= 0) & (ids < c.n)
        ids, sizes, lengths = ids[valid], sizes[valid], lengths[valid]
        mine = (c.state[ids] == ASSIGNED) & (c.worker[ids] == wid)
        if self.aborted_jobs:   # tasks of cancelled/failed jobs that were still running
            late = mine & np.isin(c.job[ids], list(self.aborted_jobs))
            if late.any():
                self._unassign(ids[late])
                c.state[ids[late]] = CANCELLED
                mine &= ~late
        stale = ids[~mine]
        if len(stale) and worker is not None:   # cancelled or re-run elsewhere: drop the copy
            self._send("worker", worker.key, P.RELEASE_DATA, {"ids": P.ids_to_bytes(stale)})
        ids, sizes, lengths = ids[mine], sizes[mine], lengths[mine]
        if not len(ids):
            return
        self._unassign(ids)
        c.state[ids] = FINISHED
        c.owner[ids] = wid
        c.size[ids] = sizes
        c.length[ids] = lengths
        self.n_data += len(ids)
        self.stats["finished"] += len(ids)
        if worker is not None:
            worker.tasks_done += len(ids)
            worker.count_finished(int(np.count_nonzero(c.cpus[ids])), now)
        # consumers: one decrement per input slot
        consumers = self.segs.consumers_of(ids)
        extra = ids[(c.flags[ids] & FLAG_EXTRA) > 0]
        if len(extra):
            more = [x for t in extra.tolist() for x in self.extra_consumers.get(t, [])]
            consumers = np.concatenate([consumers, np.array(more, dtype=np.int64)])
        consumers = consumers[c.state[consumers] == WAITING]
        np.subtract.at(c.remaining, consumers, 1)
        self._make_ready(small_unique(consumers))
        # inputs of the finished tasks lose one hold per slot
        inputs = self._inputs_of_many(ids)
        np.subtract.at(c.holds, inputs, 1)
        # results: tell the watchers; then release what nobody holds
        job_of = c.job[ids]
        if (job_of == job_of[0]).all():   # the usual case: one job
            per_job = [(int(job_of[0]), len(ids))]
        else:
            jobs, counts = np.unique(job_of, return_counts=True)
            per_job = zip(jobs.tolist(), counts.tolist())
        for job_id, count in per_job:
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.finished += count
            mine = ids[(c.job[ids] == job_id) & ((c.flags[ids] & FLAG_RESULT) > 0)]
            if len(mine) and job.watchers:
                body = {"job": job_id, "ids": P.ids_to_bytes(mine),
                        "addresses": [self.workers[wid].data_address] * len(mine) if worker else []}
                sent = [t for t in mine.tolist() if t in inline] if inline else []
                if sent:
                    body["inline"], body["blobs"] = P.ids_to_bytes(sent), [inline[t] for t in sent]
                for client in job.watchers:
                    self._send("client", client, P.RESULTS_READY, body)
            if job.finished >= job.active and job.status == "running":
                self._end_job(job, "finished", now)
        self._release_unheld(np.concatenate([ids, inputs]))

    def _inputs_of_many(self, ids: np.ndarray) -> np.ndarray:
        c = self.cols
        plain = ids[(c.flags[ids] & FLAG_OVERRIDE) == 0]
        inputs = self.segs.inputs_of(plain)
        special = ids[(c.flags[ids] & FLAG_OVERRIDE) > 0]
        if len(special):
            inputs = np.concatenate([inputs] + [self.overrides[int(t)][2] for t in special])
        return inputs

    def _unassign(self, ids: np.ndarray) -> None:
        c = self.cols
        for wid in small_unique(c.worker[ids]).tolist():
            worker = self.workers.get(wid)
            if worker is None:
                continue
            mine = ids[c.worker[ids] == wid]
            cpus = c.cpus[mine]
            worker.assigned_cpus -= int(cpus.sum())
            if not self.any_named_requests:
                worker.assigned_light -= int(np.count_nonzero(cpus == 0))
                continue
            for t, n in zip(mine.tolist(), cpus.tolist()):
                request = self._named_request(t)
                if n == 0 and not request:   # light, as placement counted it
                    worker.assigned_light -= 1
                for name, amount in request.items():
                    worker.assigned_resources[name] = worker.assigned_resources.get(name, 0) - amount
        c.worker[ids] = -1

    def _named_request(self, t: int) -> dict:
        if not self.any_named_requests:
            return {}
        seg, local = self.segs.locate(t)
        request = seg.graph.request(local) or {}
        return {k: v for k, v in request.items() if k != "cpus"}

    def _release_unheld(self, candidates: np.ndarray) -> None:
        c = self.cols
        if not len(candidates):
            return
        candidates = small_unique(candidates)
        free = candidates[(c.holds[candidates] <= 0) & (c.owner[candidates] >= 0)]
        self._release(free)

    def _release(self, ids: np.ndarray) -> None:
        c = self.cols
        ids = ids[c.owner[ids] >= 0]
        if not len(ids):
            return
        targets: dict[int, list[np.ndarray]] = {}
        for wid in small_unique(c.owner[ids]).tolist():
            targets.setdefault(wid, []).append(ids[c.owner[ids] == wid])
        for t in ids.tolist():
            for wid in self.replicas.pop(t, ()):
                targets.setdefault(wid, []).append(np.array([t]))
        for wid, parts in targets.items():
            worker = self.workers.get(wid)
            if worker is not None:
                self._send("worker", worker.key, P.RELEASE_DATA, {"ids": P.ids_to_bytes(np.concatenate(parts))})
        c.owner[ids] = -1
        self.n_data -= len(ids)

    def replicas_added(self, wid: int, ids: np.ndarray) -> None:
        c = self.cols
        ids = ids[(ids >= 0) & (ids < c.n)]
        self.stats["transfers"] += len(ids)
        self.stats["transfer_bytes"] += int(c.size[ids].sum())
        for t in ids.tolist():
            if c.owner[t] >= 0 and c.owner[t] != wid:
                self.replicas.setdefault(t, set()).add(wid)
            elif c.owner[t] < 0 and wid in self.workers:   # already released: drop it there
                self._send("worker", self.workers[wid].key, P.RELEASE_DATA, {"ids": P.ids_to_bytes([t])})

    def tasks_failed(self, wid: int, failures: list, now: float) -> None:
        c = self.cols
        worker = self.workers.get(wid)
        for task_id, message in failures:
            if not (0 <= task_id < c.n) or c.state[task_id] != ASSIGNED or c.worker[task_id] != wid:
                continue
            self._unassign(np.array([task_id]))
            if self.stranded.pop(task_id, None) == wid:   # its input was on a lost worker
                ins = self._inputs(task_id)
                c.state[task_id] = WAITING
                c.remaining[task_id] = int(np.count_nonzero(c.state[ins] != FINISHED)) if len(ins) else 0
                self._make_ready(np.array([task_id], dtype=np.int64))
                continue
            self._task_failed(task_id, str(message), worker.name if worker else "?", now)

    def _task_failed(self, t: int, message: str, worker_name: str, now: float) -> None:
        c = self.cols
        c.state[t] = FAILED
        c.worker[t] = -1
        self.stats["failed"] += 1
        job = self.jobs.get(int(c.job[t]))
        if job is None or job.status != "running":
            return
        seg, local = self.segs.locate(t)
        job.failed += 1
        job.error = {"job": job.id, "id": t, "label": seg.graph.label(local) or "",
                     "symbol": self.symbols[c.symbol[t]], "worker": worker_name, "message": message}
        for client in job.watchers:
            self._send("client", client, P.TASK_FAILED, job.error)
        self._abort_job(job, "failed", now)

    def _abort_job(self, job: Job, status: str, now: float) -> None:
        c = self.cols
        ids = np.arange(job.base, job.base + job.n, dtype=np.int64)
        if job.appended:   # tasks added later (a redirection's sub-plan, ...) are released and cancelled too
            end = job.base + job.n
            ids = np.concatenate([ids, end + np.flatnonzero(c.job[end:c.n] == job.id)])
        pending = ids[np.isin(c.state[ids], (WAITING, READY))]
        c.state[pending] = CANCELLED
        # tasks of other jobs that wait on this job's unfinished tasks fail too
        doomed = ids[((c.flags[ids] & FLAG_EXTRA) > 0) & (c.state[ids] != FINISHED)]
        self._end_job(job, status, now)
        held_elsewhere = np.zeros(len(ids), dtype=bool)
        for k, t in enumerate(ids.tolist()):
            if c.flags[t] & FLAG_EXTRA:
                held_elsewhere[k] = any(c.job[x] != job.id and c.state[x] in (WAITING, READY, ASSIGNED)
                                        for x in self.extra_consumers.get(t, []))
        self._release(ids[(c.owner[ids] >= 0) & ~held_elsewhere])
        for t in doomed.tolist():
            for consumer in self.extra_consumers.get(t, []):
                other = self.jobs.get(int(c.job[consumer]))
                if other is not None and other.status == "running" and c.state[consumer] in (WAITING, READY):
                    c.state[consumer] = FAILED
                    other.error = {"job": other.id, "id": consumer, "label": "", "symbol": self.symbols[c.symbol[consumer]],
                                   "worker": "", "message": f"input task {t} of job {job.id} did not finish ({status})"}
                    for client in other.watchers:
                        self._send("client", client, P.TASK_FAILED, other.error)
                    self._abort_job(other, "failed", now)

    def _end_job(self, job: Job, status: str, now: float) -> None:
        job.status = status
        if status != "finished":
            self.aborted_jobs.add(job.id)
        job.ended = now
        self.ended_jobs.append(job.id)
        body = {"job": job.id, "status": status, "counts": self.job_counts(job)}
        for client in job.watchers:
            self._send("client", client, P.JOB_DONE, body)

    def task_redirected(self, wid: int, task_id: int, graph: Graph, now: float) -> None:
        """A Python task returned a sub-plan: run it; its single result becomes the
        redirecting task's result (the task is re-targeted as an alias of the root)."""
        c = self.cols
        if not (0 <= task_id < c.n) or c.state[task_id] != ASSIGNED or c.worker[task_id] != wid:
            return
        inputs = self._inputs(task_id)
        try:
            roots = graph.result_ids()
            if len(roots) != 1:
                raise SubmitError("a redirection must have exactly one result")
            job = self.jobs[int(c.job[task_id])]
            sub = self.submit(None, graph, now, redirect_inputs=inputs, notify=False)
        except (SubmitError, GraphError, KeyError) as exc:
            self._unassign(np.array([task_id]))
            self._task_failed(task_id, f"invalid redirection: {exc}", self.workers[wid].name, now)
            return
        root = sub.base + int(roots[0])
        sub.watchers.clear()
        del self.jobs[sub.id]
        job.segments.extend(sub.segments)
        c.job[sub.base:sub.base + sub.n] = job.id
        job.active += sub.active
        # the sub-plan's root no longer counts as a held result of its own
        c.flags[root] &= ~np.uint8(FLAG_RESULT)
        c.holds[root] -= 1
        # the redirecting task becomes "get element 0 of array_make(root)": an identity
        self._unassign(np.array([task_id]))
        array_task = self._append_single(job.id, S.ARRAY_MAKE, b"", np.array([root]), now)
        self.overrides[task_id] = (S.GET, S.encode_u64(0), np.array([array_task]))
        c.flags[task_id] |= FLAG_OVERRIDE
        c.cpus[task_id] = 0
        for i in inputs.tolist():   # the original inputs are held by the sub-plan now
            c.holds[i] -= 1
        c.holds[array_task] += 1
        self.extra_consumers.setdefault(array_task, []).append(task_id)
        c.flags[array_task] |= FLAG_EXTRA
        c.state[task_id] = WAITING
        c.remaining[task_id] = 0 if c.state[array_task] == FINISHED else 1
        self._release_unheld(inputs)
        self._make_ready(np.array([task_id]))

    def _append_single(self, job_id: int, symbol: str, config: bytes, inputs: np.ndarray, now: float) -> int:
        from graphfmt.graph import VarBytes, offsets_from_lengths
        g = Graph([symbol], np.zeros(1, np.uint16), offsets_from_lengths(np.array([len(inputs)])),
                  np.zeros(len(inputs), np.int64), VarBytes.from_list([config]), np.zeros(1, np.uint8),
                  np.zeros(1, np.uint16))
        c = self.cols
        t = c.allocate(1)
        seg = Segment.build(len(self.segs.segments), t, g, inputs.astype(np.int64), g.input_offsets)
        self.segs.add(seg)
        c.symbol[t] = self._code(symbol)
        c.job[t] = job_id
        c.segment[t] = seg.index
        c.state[t] = WAITING
        for i in inputs.tolist():
            c.holds[i] += 1
            if c.state[i] != FINISHED:
                c.remaining[t] += 1
                self.extra_consumers.setdefault(i, []).append(t)
                c.flags[i] |= FLAG_EXTRA
        self.jobs[job_id].active += 1
        self.jobs[job_id].appended = True
        self.jobs[job_id].segments.append(seg.index)
        self._make_ready(np.array([t]))
        return t

    # ------------------------------------------------------------------ clients
    def release(self, ids: np.ndarray) -> None:
        """The client no longer wants these results."""
        c = self.cols
        ids = small_unique(ids[(ids >= 0) & (ids < c.n)])
        ids = ids[(c.flags[ids] & FLAG_RESULT) > 0]
        c.flags[ids] &= ~np.uint8(FLAG_RESULT)
        c.holds[ids] -= 1
        self._release_unheld(ids)

    def cancel(self, job_id: int, now: float) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.status == "running":
            self._abort_job(job, "cancelled", now)
        else:   # a finished job: drop its results
            self.release(job.results)
        return True

    def client_gone(self, client: bytes, now: float) -> list[int]:
        """A client disconnected: its session jobs are cancelled (running) or their
        results released (finished); detached jobs stay. Returns the cancelled ids."""
        cancelled = []
        for job in list(self.jobs.values()):
            job.watchers.discard(client)
            if job.client != client or job.detached:
                continue
            if job.status == "running":
                self._abort_job(job, "cancelled", now)
                cancelled.append(job.id)
            self.release(job.results)
        return cancelled

    def job_row(self, job: Job, now: float) -> dict:
        """The job as a row of ``status``."""
        return {"id": job.id, "name": job.name, "status": job.status, **self.job_counts(job),
                "results": int(len(job.results)), "error": job.error,
                "elapsed_s": round((job.ended or now) - job.submitted, 3)}

    def retired_row(self, job_id: int) -> dict | None:
        return next((row for row in self.history if row["id"] == job_id), None)

    # ------------------------------------------------------------------ forgetting
    def retire_jobs(self, now: float, budget: int = 1000) -> int:
        """Retire up to ``budget`` ended jobs whose tasks hold no data and run nowhere
        (see the module docstring); the others are looked at again on a later call.
        Returns how many were retired."""
        retired = 0
        for _ in range(min(budget, len(self.ended_jobs))):
            job = self.jobs.get(self.ended_jobs[0])
            if job is not None and now - job.ended < RETIRE_AFTER_S:
                break   # every later one ended later still
            self.ended_jobs.popleft()
            if job is None or job.status == "running":
                continue
            if self._holds_nothing(job):
                self._retire(job, now)
                retired += 1
            else:
                self.ended_jobs.append(job.id)
        return retired

    def _holds_nothing(self, job: Job) -> bool:
        c = self.cols
        for index in job.segments:
            seg = self.segs.segments[index]
            lo, hi = seg.base, seg.base + seg.n
            state = c.state[lo:hi]
            if (c.owner[lo:hi] >= 0).any() or (state <= ASSIGNED).any() \
                    or ((state == FINISHED) & (c.holds[lo:hi] > 0)).any():
                return False   # data, work (WAITING, READY, ASSIGNED < FINISHED), or needed again
        return True

    def _retire(self, job: Job, now: float) -> None:
        self.history.append(self.job_row(job, now))
        for index in job.segments:
            seg = self.segs.segments[index]
            for table in (self.overrides, self.extra_consumers, self.stranded):
                _drop_range(table, seg.base, seg.base + seg.n)
            self.segs.retire(index)
        self.aborted_jobs.discard(job.id)
        del self.jobs[job.id]
        self.stats["retired_jobs"] += 1

    def job_counts(self, job: Job) -> dict:
        c = self.cols
        states = np.bincount(c.state[job.base:job.base + job.n], minlength=len(STATE_NAMES))
        counts = {name: int(states[i]) for i, name in enumerate(STATE_NAMES) if states[i]}
        counts["total"] = job.active
        return counts

    # ------------------------------------------------------------------ scheduling
    def _fail_unsatisfiable(self, ids: np.ndarray | None = None) -> None:
        """Fail ready tasks (all, or those of ``ids``) no connected worker can ever run
        (needs >= 1 worker)."""
        if not self.workers or not self.ready:
            return
        c = self.cols
        if ids is None:
            ids = np.concatenate(self.ready)
            ids = ids[c.state[ids] == READY]
            self.ready = [ids]
        max_cpus = max(w.cpus for w in self.workers.values())
        too_big = ids[c.cpus[ids] > max_cpus]
        for t in too_big.tolist():
            self._task_failed(t, f"requests {c.cpus[t]} cpus, but the largest connected worker has {max_cpus}",
                              "", 0.0)
        codes = set(c.symbol[ids].tolist()) if len(ids) < 64 else np.unique(c.symbol[ids]).tolist()
        for code in sorted(codes):
            symbol = self.symbols[code]
            if symbol in (S.DSLICE, S.DGET) or any(self._supports(w, symbol) for w in self.workers.values()):
                continue
            for t in ids[(c.symbol[ids] == code) & (c.state[ids] == READY)].tolist():
                self._task_failed(t, f"no connected worker supports task type {symbol!r}", "", 0.0)

    def _support_mask(self, worker: Worker) -> np.ndarray | None:
        """Bool per global symbol code: can this worker run it (None: everything)."""
        if not worker.symbols:
            return None
        mask = worker.support_mask
        if mask is None or len(mask) != len(self.symbols):
            mask = worker.support_mask = np.array([self._supports(worker, s) for s in self.symbols], dtype=bool)
        return mask

    @staticmethod
    def _supports(worker: Worker, symbol: str) -> bool:
        return symbol in worker.symbols or (symbol.startswith("loom/") and not worker.symbols)

    def schedule(self, now: float) -> int:
        """Place ready tasks on workers; returns how many were placed."""
        if not self.ready or not self.workers:
            return 0
        for w in self.workers.values():
            w.settle(now)
        if not any(w.assigned_light < placement.LIGHT_QUEUE or w.assigned_cpus < w.queue_factor * w.cpus
                   for w in self.workers.values()):
            return 0   # every worker is full: leave the ready list as it is
        c = self.cols
        ids = np.concatenate(self.ready) if len(self.ready) > 1 else self.ready[0]
        ids = ids[c.state[ids] == READY]
        self.ready = []
        if not len(ids):
            return 0
        self.stats["rounds"] += 1
        dynamic_codes = [self.symbol_codes[s] for s in (S.DSLICE, S.DGET) if s in self.symbol_codes]
        dynamic = np.isin(c.symbol[ids], dynamic_codes) if dynamic_codes else None
        if dynamic is not None and dynamic.any():
            for t in ids[dynamic].tolist():
                self._expand_dynamic(t, now)
            ids = np.concatenate([ids[~dynamic], *self.ready])   # expansions are placed now too
            self.ready = []
            ids = ids[c.state[ids] == READY]
        workers = list(self.workers.values())
        ids, deferred = self._candidates(ids, workers)
        if len(deferred):
            self.ready.append(deferred)
        if not len(ids):
            return 0
        index = {w.id: k for k, w in enumerate(workers)}
        inputs, consumer_of_slot = self._slots(ids)
        task_pos = np.searchsorted(ids, consumer_of_slot)
        holder = np.array([index.get(int(w), -1) for w in c.owner[inputs]], dtype=np.int64) \
            if len(inputs) else np.zeros(0, np.int64)
        best, best_bytes = placement.preferences(task_pos, holder, c.size[inputs], len(ids))
        rooms = []
        for k, w in enumerate(workers):
            supports = self._support_mask(w)
            rooms.append(placement.WorkerRoom(k, w.cpus, w.assigned_cpus, w.assigned_light, w.resources,
                                              dict(w.assigned_resources), supports, w.queue_factor))
        requests = {}
        named = ids if self.any_named_requests else ids[:0]   # a 0-cpu task may name resources too
        for t in named.tolist():
            req = self._named_request(t)
            if req:
                requests[int(np.searchsorted(ids, t))] = req
        chosen = placement.place(c.cpus[ids], c.symbol[ids], best, best_bytes, rooms, requests)
        placed = 0
        for k, w in enumerate(workers):
            mine = ids[chosen == k]
            room = rooms[k]
            w.assigned_cpus, w.assigned_light, w.assigned_resources = (
                room.assigned_cpus, room.assigned_light, room.assigned_resources)
            if len(mine):
                c.state[mine] = ASSIGNED
                c.worker[mine] = w.id
                self._send("worker", w.key, P.COMPUTE, self._compute_body(w, mine))
                placed += len(mine)
        waiting = ids[chosen < 0]
        if len(waiting):
            self.ready.append(waiting)
        self.stats["scheduled"] += placed
        return placed

    def _candidates(self, ids: np.ndarray, workers: list) -> tuple[np.ndarray, np.ndarray]:
        """The ready tasks worth considering this round (sorted), and the rest, kept in
        order for later rounds: no more light tasks than the workers' light queues can
        take, and a few times as many cpu tasks as there are free cpu slots."""
        c = self.cols
        light_room = sum(max(0, placement.LIGHT_QUEUE - w.assigned_light) for w in workers)
        cpu_room = sum(max(0, w.queue_factor * w.cpus - w.assigned_cpus) for w in workers)
        is_light = c.cpus[ids] == 0
        light, heavy = ids[is_light], ids[~is_light]
        heavy_take = 4 * cpu_room + 16 if cpu_room else 0
        taken = np.concatenate([light[:light_room], heavy[:heavy_take]])
        rest = np.concatenate([light[light_room:], heavy[heavy_take:]])
        return np.sort(taken), rest

    def _slots(self, ids: np.ndarray):
        c = self.cols
        special = (c.flags[ids] & FLAG_OVERRIDE) > 0
        if not special.any():
            return self.segs.inputs_of(ids, per_slot=True)
        inputs, owners = self.segs.inputs_of(ids[~special], per_slot=True)
        extra_in = [self.overrides[int(t)][2] for t in ids[special]]
        extra_owner = [np.full(len(x), t) for x, t in zip(extra_in, ids[special].tolist())]
        inputs = np.concatenate([inputs, *extra_in]).astype(np.int64)
        owners = np.concatenate([owners, *extra_owner]).astype(np.int64)
        order = np.argsort(owners, kind="stable")
        return inputs[order], owners[order]

    def _compute_body(self, worker: Worker, ids: np.ndarray) -> dict:
        c = self.cols
        tasks = []
        locations = {}
        segments = self.segs.segments
        for t, s in zip(ids.tolist(), self.segs.of(ids).tolist()):
            override = self.overrides.get(t)
            seg = segments[s]
            local = t - seg.base
            g = seg.graph
            if override is not None:
                symbol, config, inputs = override
            else:
                symbol = self.symbols[c.symbol[t]]
                config = g.configs[local]
                inputs = seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]]
            input_list = inputs.tolist()
            for i in input_list:
                holder = c.owner[i]
                if holder != worker.id and i not in locations:
                    holders = self.replicas.get(i, ())
                    if worker.id not in holders and holder >= 0:
                        locations[i] = self.workers[int(holder)].data_address
            request = self._named_request(t)
            checkpoint = g.checkpoint(local) if c.flags[t] & FLAG_CHECKPOINT and not c.flags[t] & FLAG_LOADED else None
            inline = bool(c.flags[t] & FLAG_RESULT) and self._watched(int(c.job[t]))
            tasks.append([t, symbol, config, input_list, int(c.cpus[t]), request or None, checkpoint,
                          g.label(local), inline])
        return {"tasks": tasks, "locations": locations}

    def _watched(self, job_id: int) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and bool(job.watchers)

    def _expand_dynamic(self, t: int, now: float) -> None:
        """dslice(x) / dget(x) with x finished: append k slices (or gets) of x, each
        feeding a copy of the single consumer f, and re-target the array_make that
        gathers f to gather the copies."""
        c = self.cols
        job = self.jobs.get(int(c.job[t]))
        (x,) = self._inputs(t).tolist()
        consumers = self._consumers(t)
        fail = None
        if len(set(consumers)) != 1:
            fail = "dslice/dget must have exactly one consumer task"
        else:
            f = consumers[0]
            f_consumers = self._consumers(f)
            if len(set(f_consumers)) != 1 or self.symbols[c.symbol[f_consumers[0]]] != S.ARRAY_MAKE:
                fail = "the consumer of dslice/dget must be gathered by one array_make"
        if fail or job is None:
            c.state[t] = ASSIGNED
            c.worker[t] = -1
            self._task_failed(t, fail or "job is gone", "", now)
            return
        gather = f_consumers[0]
        length = int(c.length[x])
        total_cpus = sum(w.cpus for w in self.workers.values()) or 1
        symbol = self.symbols[c.symbol[t]]
        if symbol == S.DGET:
            pieces = [(S.GET, S.encode_u64(i)) for i in range(length)]
        else:
            k = max(1, min(length, 4 * total_cpus))
            bounds = np.linspace(0, length, k + 1).astype(np.int64)
            pieces = [(S.SLICE, S.encode_slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        seg, local = self.segs.locate(f)
        f_symbol, f_config = self.symbols[c.symbol[f]], seg.graph.configs[local]
        f_inputs = self._inputs(f)
        copies = []
        for piece_symbol, piece_config in pieces:
            piece = self._append_single(job.id, piece_symbol, piece_config, np.array([x]), now)
            copy_inputs = np.where(f_inputs == t, piece, f_inputs)
            copy = self._append_single(job.id, f_symbol, f_config, copy_inputs, now)
            c.cpus[copy] = c.cpus[f]
            copies.append(copy)
        # the original dslice and f are done away with; the gather takes the copies
        for dead in (t, f):
            c.state[dead] = SKIPPED
            job.active -= 1
        for i in self._inputs(t).tolist():
            c.holds[i] -= 1
        for i in f_inputs.tolist():
            if i != t:
                c.holds[i] -= 1
        g_inputs = self._inputs(gather)
        new_inputs = np.concatenate([np.array(copies, dtype=np.int64) if i == f else np.array([i]) for i in g_inputs.tolist()]) \
            if len(g_inputs) else np.zeros(0, np.int64)
        seg_g, local_g = self.segs.locate(gather)
        self.overrides[gather] = (S.ARRAY_MAKE, b"", new_inputs)
        c.flags[gather] |= FLAG_OVERRIDE
        for copy in copies:
            self.extra_consumers.setdefault(copy, []).append(gather)
            c.flags[copy] |= FLAG_EXTRA
            c.holds[copy] += 1
        c.remaining[gather] = int(np.count_nonzero(c.state[new_inputs] != FINISHED))
        self._release_unheld(np.array([x]))
        self._make_ready(np.array([gather]))

    # ------------------------------------------------------------------ reports for people
    def status(self, now: float) -> dict:
        c = self.cols
        workers = []
        for w in self.workers.values():
            running = int(np.count_nonzero((c.state[:c.n] == ASSIGNED) & (c.worker[:c.n] == w.id)))
            held = np.flatnonzero(c.owner[:c.n] == w.id)
            workers.append({"id": w.id, "name": w.name, "hostname": w.hostname, "cpus": w.cpus,
                            "resources": w.resources, "assigned": running, "tasks_done": w.tasks_done,
                            "data_objects": int(len(held)), "data_bytes": int(c.size[held].sum()),
                            "rss": w.stats.get("rss"), "cpu_percent": w.stats.get("cpu_percent"),
                            "address": w.data_address, "last_seen_s": round(now - w.last_seen, 3)})
        jobs = [*self.history, *(self.job_row(job, now) for job in self.jobs.values())]
        lost = [{**w, "ago_s": round(now - w["at"], 1)} for w in self.lost_workers[-20:]]
        return {"workers": workers, "lost_workers": lost, "jobs": jobs, "n_tasks": int(c.n), "n_data_objects": self.n_data,
                "stats": dict(self.stats)}

    def check_invariants(self) -> None:
        """For tests: the invariants of the module docstring."""
        c = self.cols
        n = c.n
        assert self.n_data == int(np.count_nonzero(c.owner[:n] >= 0)), "n_data"
        assert not np.any((c.owner[:n] >= 0) & (c.state[:n] != FINISHED)), "data of unfinished task"
        for w in self.workers.values():
            mine = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.worker[:n] == w.id))
            assert w.assigned_cpus == int(c.cpus[mine].sum()), "assigned cpus"
            light = [t for t in mine[c.cpus[mine] == 0].tolist() if not self._named_request(t)]
            assert w.assigned_light == len(light), "assigned light"
        live = (c.state[:n] == FINISHED) & (c.owner[:n] >= 0)
        assert not np.any(live & (c.holds[:n] <= 0)), "unheld data kept"
