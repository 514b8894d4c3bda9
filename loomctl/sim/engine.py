"""The discrete-event simulation: the real ``ServerCore`` against simulated workers.

The server is one process: messages that reached it wait in its inbox; when it is free
it takes them all, feeds the core (``tasks_finished``, ``replicas_added``,
``tasks_returned``), calls ``schedule`` once and sends the commands the core returned,
as the real server shell does. The time that takes is the core's own CPU time
(``time.thread_time`` around the calls, with the encoding of the commands by
``loomctl.protocol``), charged as simulated server time: the commands leave when it is
over, and messages arriving meanwhile wait. ``server_time`` may instead be a fixed cost
per task handled (deterministic, for tests). Every message between the server and a
worker takes ``latency``; a worker fetches an input from its holder with a request
(``latency``), a flow on the network (``sim.network``) and the answer's ``latency``.

Invariants (tests check them): the core is the real one and nothing here changes task
states; every task the core assigns runs on the worker it was assigned to, and each
task of the plan is reported finished once (``runs``); simulated time never goes back;
with ``check_every`` the core's invariants are checked every that many server wake-ups
and at the end. The same inputs (plan, cluster, rules, seed) with a deterministic
``server_time`` give the same result.
"""

from __future__ import annotations

import heapq
import math
import time

import numpy as np

from loomctl import messages as M
from loomctl import protocol as P
from loomctl.core.server import ServerCore
from loomctl.sim.network import Network
from loomctl.sim.worker import HOLD_S, SimWorker

# event kinds; phase orders events of one instant (0: first, 2: the server's wake-up last)
END, TO_WORKER, TO_SERVER, FETCH, NET, ARRIVE, FLUSH, HOLD, NETPLAN, WAKE, FREE = range(11)
CLIENT = b"sim-client"
ENCODED = set(P._COMMANDS)   # the commands the real protocol sends (their encoding is server time)
STEAL = getattr(M, "StealTasks", None)   # (absent from cores without work stealing)


class Stalled(Exception):
    """The simulation ran out of events before the job ended (a bug or an impossible plan)."""


class Simulation:
    def __init__(self, graph, cpus: list[int], model, bandwidth: float = 1e9, latency: float = 100e-6,
                 server_time="measured", trace=None, check_every: int = 0, configure=None):
        self.graph = graph
        self.model = model
        self.latency = latency
        self.server_time = server_time
        self.check_every = check_every
        self.core = ServerCore()
        if configure is not None:
            configure(self.core)
        self.workers: list[SimWorker] = []
        self.by_wid: dict[int, SimWorker] = {}
        self.by_key: dict[bytes, SimWorker] = {}
        self.addresses = [f"sim://{k}" for k in range(len(cpus))]
        self.by_address = {a: k for k, a in enumerate(self.addresses)}
        for k, c in enumerate(cpus):
            key = f"sim-{k}".encode()
            wid = self.core.add_worker(key, M.Register(f"sim-{k}", "simulated", c, {}, [], self.addresses[k]), 0.0)
            w = SimWorker(k, wid, key, c)
            self.workers.append(w)
            self.by_wid[wid] = w
            self.by_key[key] = w
        self.network = Network(len(cpus), bandwidth)
        self.net_version = 0
        self.net_planned = False
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        self.inbox: list = []
        self.busy = False
        self.wake_planned = False
        self.trace = trace(self.workers, self.addresses, [f"sim-{k}" for k in range(len(cpus))]) if trace else None
        self.runs = np.zeros(len(graph), dtype=np.int32)
        self.extra_runs = 0
        self.work = 0.0
        self.stats = {"server_busy_s": 0.0, "wakeups": 0, "rounds": 0, "transfers": 0, "transferred_bytes": 0,
                      "reports": 0, "computes": 0, "steal_requests": 0, "returned": 0}
        self.job = None
        self.end_time = None
        self.failure = None          # the first task failure the core reported

    # ------------------------------------------------------------------ events
    def _push(self, t: float, phase: int, kind: int, a=None, b=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, phase, self.seq, kind, a, b))

    def run(self) -> dict:
        started = time.perf_counter()
        cost0 = time.thread_time()
        self.job = self.core.submit(CLIENT, self.graph, 0.0)
        if self.trace:
            self.trace.job(0.0, self.job)
        self._serve(0.0, cost0)
        heap = self.heap
        while heap and self.end_time is None:
            t, _, _, kind, a, b = heapq.heappop(heap)
            self.now = t
            if kind == END:
                self._task_end(a, b)
            elif kind == TO_WORKER:
                self._to_worker(a, b)
            elif kind == TO_SERVER:
                self.inbox.append(a)
                if not self.busy and not self.wake_planned:
                    self.wake_planned = True
                    self._push(t, 2, WAKE)
            elif kind == WAKE:
                self.wake_planned = False
                self._serve(t, time.thread_time())
            elif kind == FREE:
                self.busy = False
                if self.inbox and not self.wake_planned:
                    self.wake_planned = True
                    self._push(t, 2, WAKE)
            elif kind == FLUSH:
                a.flush_due = False
                self._flush(a)
            elif kind == HOLD:
                a.hold_until = None
                self._flush(a, due=True)
            elif kind == FETCH:
                self._net_advance()
                self.network.start(t, a, b[0], b[1], b)
                self._plan_net()
            elif kind == NET:
                if a == self.net_version:
                    self._net_advance()
                    self._plan_net()
            elif kind == NETPLAN:
                self.net_planned = False
                self.net_version += 1
                end = self.network.next_end()
                if not math.isinf(end):
                    self._push(max(end, t), 0, NET, self.net_version)
            elif kind == ARRIVE:
                self._arrive(a, b)
        if self.end_time is None:
            raise Stalled(f"the simulation ran out of events at {self.now:.3f} s before the job ended "
                          f"({self.job.finished} of {self.job.active} tasks finished)")
        if self.check_every:
            self.core.check_invariants()
        if self.trace:
            self.trace.job_end(self.end_time, self.job)
            self.trace.close(self.end_time, [w.wid for w in self.workers])
        return self._result(time.perf_counter() - started)

    # ------------------------------------------------------------------ the server
    def _serve(self, now: float, cost0: float) -> None:
        core = self.core
        messages, self.inbox = self.inbox, []
        handled = 0
        for wid, finished, sizes, lengths, replicas, returned in messages:
            if finished:
                core.tasks_finished(wid, np.array(finished, np.int64), np.array(sizes, np.int64),
                                    np.array(lengths, np.int64), now)
                handled += len(finished)
            if replicas:
                core.replicas_added(wid, np.array(replicas, np.int64), now)
            if returned is not None:   # (an answer to a steal request, maybe empty)
                core.tasks_returned(wid, np.array(returned, np.int64), now)
        rounds = core.stats["rounds"]
        placed = core.schedule(now)
        commands = core.take_commands()
        if self.server_time == "measured":
            for cmd in commands:
                if type(cmd) in ENCODED:
                    P.encode_command(cmd)
            cost = time.thread_time() - cost0
        else:
            cost = float(self.server_time) * (handled + placed)
        self.stats["server_busy_s"] += cost
        self.stats["wakeups"] += 1
        self.stats["reports"] += len(messages)
        done = now + cost
        if core.stats["rounds"] > rounds and self.trace:
            self.trace.round(now, cost, placed, sum(len(r) for r in core.ready) + len(core.pool))
        if self.check_every and self.stats["wakeups"] % self.check_every == 0:
            core.check_invariants()
        arrive = done + self.latency
        for cmd in commands:
            kind = type(cmd)
            if kind is M.JobDone:
                self.end_time = done
            elif kind is M.TaskFailed:
                self.failure = self.failure or cmd.error
            elif kind is M.ResultsReady:
                continue
            else:
                w = self.by_key[cmd.target]
                if kind is M.Compute:
                    self.stats["computes"] += 1
                    if self.trace:
                        self.trace.assign(done, w.wid, [row.id for row in cmd.rows])
                self._push(arrive, 0, TO_WORKER, w, cmd)
        self.busy = True
        self._push(done, 1, FREE)

    # ------------------------------------------------------------------ workers
    def _to_worker(self, w: SimWorker, cmd) -> None:
        kind = type(cmd)
        if kind is M.Compute:
            fetch = w.assign(cmd.rows, cmd.locations)
            for address, ids in fetch.items():
                src = self.by_address[address]
                holder = self.workers[src].store
                nbytes = sum(holder[i] for i in ids)
                self._push(self.now + self.latency, 0, FETCH, src, (w.index, nbytes, ids, self.now, src))
            self._start(w)
        elif kind is M.ReleaseData:
            w.release(cmd.ids.tolist())
        elif kind is STEAL:
            self.stats["steal_requests"] += 1
            back = w.give_back(cmd.ids.tolist(), cmd.count)
            self.stats["returned"] += len(back)
            self._want_flush(w)
        # PeerLost, Stop and CancelTasks do not happen: simulated workers are never lost,
        # simulated tasks never fail and no job is cancelled; Peers: the model has no links

    def _start(self, w: SimWorker) -> None:
        now = self.now
        for tid, row, slots in w.startable():
            w.started(tid, row, now, slots)
            duration = self.model.task_duration(tid, row)
            self.work += duration * row.cpus
            self._push(now + duration, 0, END, w, tid)

    def _task_end(self, w: SimWorker, tid: int) -> None:
        row = w.running[tid][0]
        size = self.model.task_size(tid, row, [w.store.get(i, 0) for i in row.inputs])
        row, began, slots = w.done(tid, size, self.model.task_length(row), self.now)
        if tid < len(self.runs):
            self.runs[tid] += 1
        else:
            self.extra_runs += 1
        if self.trace:
            self.trace.task(w.index, w.wid, self.job.id, row, began, self.now, slots, size)
        self._start(w)
        self._want_flush(w)

    def _want_flush(self, w: SimWorker) -> None:
        if not w.flush_due:
            w.flush_due = True
            self._push(self.now, 1, FLUSH, w)

    def _flush(self, w: SimWorker, due: bool = False) -> None:
        if not w.has_report():
            return
        now = self.now
        if w.report_since is None:
            w.report_since = now
        if not due and w.may_hold() and now - w.report_since < HOLD_S:
            due = w.report_since + HOLD_S
            if w.hold_until is None:
                w.hold_until = due
                self._push(due, 1, HOLD, w)
            return
        finished, sizes, lengths, replicas, returned = w.take_report()
        self._push(now + self.latency, 0, TO_SERVER, (w.wid, finished, sizes, lengths, replicas, returned))

    # ------------------------------------------------------------------ network
    def _plan_net(self) -> None:
        if not self.net_planned:
            self.net_planned = True
            self._push(self.now, 1, NETPLAN)

    def _net_advance(self) -> None:
        for dst, nbytes, ids, asked, src in self.network.advance(self.now):
            self.stats["transfers"] += 1
            self.stats["transferred_bytes"] += nbytes
            self._push(self.now + self.latency, 0, ARRIVE, self.workers[dst], (ids, nbytes, asked, src))

    def _arrive(self, w: SimWorker, payload) -> None:
        ids, nbytes, asked, src = payload
        holder = self.workers[src].store
        w.arrived(ids, [holder.get(i, 0) for i in ids])
        if self.trace:
            self.trace.xfer(w.index, src, asked, self.now, nbytes, ids)
        self._start(w)
        self._want_flush(w)

    # ------------------------------------------------------------------ the result
    def _result(self, wall: float) -> dict:
        model = self.model
        cpus = sum(w.cpus for w in self.workers)
        critical = model.critical_path()
        work = self.work
        bound = max(critical, work / cpus)
        makespan = self.end_time
        tasks = int(self.job.finished)
        return {
            "status": self.job.status,
            "tasks": tasks,
            "workers": len(self.workers),
            "cpus": cpus,
            "makespan_s": makespan,
            "lower_bound_s": bound,
            "critical_path_s": critical,
            "work_s": work,
            "efficiency": work / (cpus * makespan) if makespan > 0 else 1.0,
            "makespan_over_bound": makespan / bound if bound > 0 else 1.0,
            "transferred_bytes": int(self.stats["transferred_bytes"]),
            "transfers": int(self.stats["transfers"]),
            "server_busy_s": self.stats["server_busy_s"],
            "server_us_per_task": 1e6 * self.stats["server_busy_s"] / max(1, tasks),
            "rounds": int(self.core.stats["rounds"]),
            "reports": int(self.stats["reports"]),
            "steal_requests": int(self.stats["steal_requests"]),
            "stolen": int(self.stats["returned"]),
            "wall_s": wall,
        }
