"""Workers as the server sees them: joining, liveness, loss, and what a loss costs.

Invariants:
- ``core.workers`` holds the connected workers by id; ids are never reused.
- When a worker is lost: its ASSIGNED tasks are WAITING again (a task of an ended job
  is cancelled, unless another job's task holds it); a task that was *running* on a lost
  worker MAX_ATTEMPTS times fails instead (``presumed_running``: queued tasks never
  count as attempts);
  its data objects survive where another worker holds a replica and are computed again
  where nothing else holds them and something still needs them (``recompute_lost``).
- A ready task that only the lost worker could run is not failed at once: the check
  waits REPLACE_GRACE_S for a replacement (scheduler).
- A worker joining a cluster of at most EAGER_PEERS is told the others' data addresses,
  and they its (PEERS): links are made before the first fetch needs them.
- When a worker is lost, the others are told (PEER_LOST) to stop fetching from it; a task
  ASSIGNED elsewhere that was to fetch an input from it is ``stranded``: its failure
  report from that worker ("input unavailable") makes it wait and run again, once,
  instead of failing its job.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loomctl import messages as M
from loomctl.core import placement
from loomctl.core import transitions as T
from loomctl.core.tasktable import ASSIGNED, CANCELLED, FINISHED, WAITING

MAX_ATTEMPTS = 3   # a task that lost its worker this many times fails
EAGER_PEERS = 16   # in a cluster of at most this many workers, each links to every other at once
BUSY_GROWTH = 2    # a report of short cpu tasks makes its worker's queue at most this much deeper


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
    assigned_cpus: int = 0         # (these three: core.transitions keeps them)
    assigned_light: int = 0
    assigned_resources: dict = field(default_factory=dict)
    last_seen: float = 0.0
    stats: dict = field(default_factory=dict)
    tasks_done: int = 0
    support_mask: tuple | None = None        # cache of scheduler.support_mask
    memory_limit: int | None = None          # bytes it may use (REGISTER), None: not said
    queue_factor: int = placement.QUEUE_FACTOR   # from the rate of cpu tasks it finishes
    rate_since: float | None = None          # start of the window counting them
    rate_count: int = 0
    busy_factor: int = placement.QUEUE_FACTOR    # from how long its last cpu tasks ran (cpu_tasks_ran)

    RATE_WINDOW = 0.05   # seconds
    RATE_TASKS = 16      # ... or this many finishes over a tenth of it

    def count_finished(self, cpu_tasks: int, now: float) -> None:
        """Account finished cpu tasks; every RATE_WINDOW (or RATE_TASKS finishes, over a
        tenth of it at least), set queue_factor from the rate."""
        if self.rate_since is None:
            self.rate_since = now
        self.rate_count += cpu_tasks
        elapsed = now - self.rate_since
        if elapsed >= self.RATE_WINDOW or (self.rate_count >= self.RATE_TASKS and elapsed >= self.RATE_WINDOW / 10):
            self.queue_factor = max(placement.queue_factor(self.rate_count / elapsed, self.cpus), self.busy_factor)
            self.rate_since, self.rate_count = now, 0

    def cpu_tasks_ran(self, count: int, seconds: float) -> None:
        """``count`` cpu tasks it finished ran ``seconds`` together (the worker timed
        them): a queue deep enough for QUEUE_SECONDS of tasks that short, BUSY_GROWTH times
        deeper per report at most, rather than after RATE_TASKS finishes two at a time. The queue is the larger
        of this and the rate's; a report of longer tasks lowers it at once, and so do two
        windows without finishes."""
        mean = seconds / count
        target = placement.queue_factor(self.cpus / max(mean, 1e-6), self.cpus)
        # (growing, at most BUSY_GROWTH times as deep per report: a first task that happened to be
        # short does not send a worker a hundred long ones; shrinking, at once)
        self.busy_factor = min(target, BUSY_GROWTH * max(self.busy_factor, self.queue_factor))
        self.queue_factor = max(self.queue_factor, self.busy_factor) if target >= self.queue_factor else \
            self.busy_factor

    def settle(self, now: float) -> None:
        """Without finishes for two windows, the rate so far, quiet time included, sets
        the queue again: a worker whose tasks turned long keeps no deep queue of them."""
        if self.rate_since is not None and now - self.rate_since >= 2 * self.RATE_WINDOW:
            self.busy_factor = placement.QUEUE_FACTOR
            self.count_finished(0, now)


def add_worker(core, key: bytes, info: M.Register, now: float) -> int:
    wid = core.next_worker
    core.next_worker += 1
    core.workers[wid] = Worker(
        id=wid, key=key, name=info.name or f"worker-{wid}", hostname=info.hostname, cpus=max(0, info.cpus),
        resources={str(k): int(v) for k, v in info.resources.items()}, symbols=set(info.symbols),
        data_address=info.data_address, last_seen=now, memory_limit=info.memory_limit)
    others = [w for w in core.workers.values() if w.id != wid and w.data_address != info.data_address]
    if others and len(core.workers) <= EAGER_PEERS:   # (linked before the first fetch)
        new = core.workers[wid]
        core.commands.append(M.Peers(new.key, [w.data_address for w in others]))
        core.commands.extend(M.Peers(w.key, [new.data_address]) for w in others)
    core.fail_unsatisfiable(None, now)
    return wid


def remove_worker(core, wid: int, now: float, reason: str = "lost") -> None:
    """A worker is gone (see the module docstring)."""
    from loomctl.core import jobs
    worker = core.workers.get(wid)
    if worker is None:
        return
    core.lost_workers.append({"id": wid, "name": worker.name, "reason": reason, "at": now})
    c = core.graph.cols
    n = c.n
    assigned = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.worker[:n] == wid))
    strand(core, wid, worker.data_address)
    for t in list(core.replicas):
        holders = core.replicas[t]
        holders.discard(wid)
        if not holders:
            del core.replicas[t]
    for t in np.flatnonzero(c.owner[:n] == wid).tolist():
        holders = core.replicas.pop(t, set())
        if holders:   # a replica survives: promote it
            c.owner[t] = holders.pop()
            if holders:
                core.replicas[t] = holders
        else:
            c.owner[t] = -1
            core.n_data -= 1
    running = presumed_running(worker, assigned, core.graph)
    del core.workers[wid]   # (from here on, nothing is sent to it)
    c.attempts[running] += 1
    for t in running[c.attempts[running] >= MAX_ATTEMPTS].tolist():
        if c.state[t] != ASSIGNED:   # (cancelled with its job by a failure just before)
            continue
        jobs.task_failed(core, t, f"task was running on a worker that was lost {MAX_ATTEMPTS} times "
                                  f"(last: {worker.name}); it may be killing its worker", worker.name, now)
    assigned = assigned[c.state[assigned] == ASSIGNED]
    if core.aborted_jobs:   # (a failure above may have ended a job)
        ended = np.isin(c.job[assigned], list(core.aborted_jobs)) & (c.holds[assigned] <= 0)
        T.transition(core, assigned[ended], CANCELLED)
        assigned = assigned[~ended]
    T.transition(core, assigned, WAITING)
    T.release_unheld(core, assigned)   # (an ended job's task held only by one given ahead of it)
    recompute_lost(core)
    from loomctl.core.scheduler import REPLACE_GRACE_S
    core.recheck_at = now + REPLACE_GRACE_S   # (not at once: a replacement may be on its way)


def presumed_running(worker: Worker, assigned: np.ndarray, graph) -> np.ndarray:
    """Of the tasks ASSIGNED to a lost worker, those it was (or may have been) running:
    the ones its last heartbeat said were running, and its ``cpus`` oldest (lowest ids;
    a worker starts its queue in order), so that a task that kills its worker as soon
    as it starts is counted too. The rest were only queued there."""
    reported = worker.stats.get("running_ids")
    ids = [t for t in reported if type(t) is int and 0 <= t < 1 << 63] if isinstance(reported, list) else []
    ids = graph.rows_of(np.array(ids, dtype=np.int64)) if ids else ids   # (it reports global ids)
    running = assigned[np.isin(assigned, ids)] if len(ids) else assigned[:0]
    oldest = assigned[np.argsort(graph.ids_of(assigned), kind="stable")[:max(1, worker.cpus)]]
    return T.small_unique(np.concatenate([running, oldest]).astype(np.int64))


def strand(core, wid: int, address: str) -> None:
    """Before the owners of ``wid``'s data change: remember the tasks assigned to
    other workers that need data ``wid`` held, and tell the others it is gone."""
    g = core.graph
    c = g.cols
    n = c.n
    core.stranded = {t: w for t, w in core.stranded.items()
                     if w != wid and c.state[t] == ASSIGNED and c.worker[t] == w}
    held = c.owner[:n] == wid
    if held.any():
        elsewhere = np.flatnonzero((c.state[:n] == ASSIGNED) & (c.worker[:n] >= 0) & (c.worker[:n] != wid))
        for t in elsewhere.tolist():
            if held[g.inputs(t)].any():
                core.stranded[t] = int(c.worker[t])
    for other in core.workers.values():
        if other.id != wid:
            core.commands.append(M.PeerLost(other.key, address))


def recompute_lost(core) -> None:
    """Finished tasks whose data vanished but is still needed are computed again,
    together with their own lost inputs, recursively."""
    g = core.graph
    c = g.cols
    n = c.n
    lost = np.flatnonzero((c.state[:n] == FINISHED) & (c.owner[:n] < 0) & (c.holds[:n] > 0))
    if not len(lost):
        return
    todo = lost.tolist()
    redo: set[int] = set()
    while todo:
        t = todo.pop()
        if t in redo:
            continue
        redo.add(t)
        for i in g.inputs(t).tolist():
            if c.state[i] == FINISHED and c.owner[i] < 0 and i not in redo:
                todo.append(i)
    T.transition(core, np.array(sorted(redo), dtype=np.int64), WAITING)


def heartbeat(core, wid: int, stats: dict, now: float) -> None:
    worker = core.workers.get(wid)
    if worker is not None:
        worker.last_seen = now
        worker.stats = stats


def dead_workers(core, now: float, timeout: float) -> list[int]:
    return [w.id for w in core.workers.values() if now - w.last_seen > timeout]
