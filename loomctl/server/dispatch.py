"""The server's dispatch, sans-I/O: wire messages in, core calls, frames out.

``Dispatch.message(identity, frames, now)`` takes one message as the ROUTER gave it
(routing id apart), and takes the list: it is emptied once decoded, and a SUBMIT's graph
frame is dropped once the graph is read, before the core adds the job (the frame of a
large graph is the biggest thing in memory at that moment); ``flush(now)`` schedules once, turns the core's commands into
frames and returns everything to send, in order: handshake answers and commands first,
then the answers to client requests of the batch (a submission's tasks reach the workers
before its client hears back). ``peer_gone`` and ``tick`` are the shell's other events.
No sockets, threads or clock: the shell passes ``now`` and sends what comes back.

Invariants:
- Nothing a peer sends raises out of ``message``: a malformed message is counted
  (``bad_messages``), logged in one clipped line and dropped; a malformed *request*
  gets an ERROR answer naming the problem. Strangers are kept out by the Gatekeeper.
- A connection keeps one role and at most one worker record (a second REGISTER is
  refused).
- A tracer (``loomctl.trace.hooks.ServerTracer``, made on demand by ``tracer_factory``)
  only observes: commands go out as the core made them.
"""

from __future__ import annotations

import logging
import os

import graphfmt
from graphfmt.graph import GraphError
from loomctl import messages as M
from loomctl import protocol as P
from loomctl.core.server import ServerCore, SubmitError

# A graph file this large is journaled before its job is added, so that its frame is freed
# before the job's columns are built (the peak memory of a huge submission). A smaller one
# is journaled after the job's first messages are sent, as every other record: its write
# (a 10 MB map-reduce input: 10-30 ms) does not delay its first tasks.
EARLY_JOURNAL_BYTES = 64 << 20

log = logging.getLogger("loomctl.server")
lifecycle = logging.getLogger("loomctl.server.lifecycle")   # always logged (cli/server.py)


def short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]


class Dispatch:
    def __init__(self, secret: str | None, info: dict | None = None, trace_dir: str | None = None,
                 tracer_factory=None):
        self.core = ServerCore()
        self.secret = secret
        self.gate = P.Gatekeeper(secret, log=log.warning, welcome={"server": "loomctl"}, tell_strangers=True)
        self.info = info or {}          # host, port, pid, ... for STATUS
        self.trace_dir = trace_dir
        self.tracer_factory = tracer_factory
        self.tracer = None              # a ServerTracer while a traced job runs
        self.worker_of_key: dict[bytes, int] = {}
        self.running = True
        self.bytes_received = 0
        self.messages_received = 0
        self.bad_messages = 0
        self._out: list[tuple[bytes, list]] = []       # to send at the next flush, first
        self._answers: list[tuple[bytes, list]] = []   # answers of this batch, last
        self._journaled_ids = 0
        # the shell's way to hand journal records over at once (None: at the next flush);
        # a large submission's graph file goes so, before the core adds the job
        self.journal_now = None

    # ------------------------------------------------------------------ events
    def message(self, identity: bytes, frames: list, now: float) -> None:
        self.messages_received += 1
        self.bytes_received += sum(len(f) for f in frames)
        try:
            kind, body, blobs = P.decode(frames)
            if type(frames) is list:
                frames.clear()   # (the caller's list: see the top comment)
            admitted, reply = self.gate.handle(identity, kind, body)
            if reply is not None:
                self._out.append((identity, reply))
            if not admitted:
                return
            role = self.gate.role(identity)
            if role == "worker":
                self._worker_message(identity, kind, body, now)
            elif role == "client":
                self._client_message(identity, kind, body, blobs, now)
            else:
                raise P.ProtocolError(f"{role} may not send {kind!r} to the server")
        except Exception as exc:   # a peer must never take the server down
            self.bad_messages += 1
            log.warning("dropped a malformed message: %s", short(exc))

    def peer_gone(self, identity: bytes, now: float) -> None:
        """The connection of ``identity`` closed."""
        role = self.gate.role(identity)
        self.gate.forget(identity)
        if role == "worker":
            wid = self.worker_of_key.get(identity)
            if wid is not None and wid in self.core.workers:
                log.warning("worker %s disconnected; its tasks run elsewhere", self.core.workers[wid].name)
                self._remove_worker(wid, now, "disconnected")
        elif role == "client":
            cancelled = self.core.client_gone(identity, now)
            if cancelled:
                log.info("a client disconnected; cancelled its jobs %s", cancelled)

    def tick(self, now: float, worker_timeout: float) -> None:
        """Timers: retire jobs done with, remove workers silent for ``worker_timeout``."""
        self.core.retire_jobs(now)
        if self.tracer is not None:
            self.tracer.tick()
        for wid in self.core.dead_workers(now, worker_timeout):
            log.warning("worker %s missed heartbeats for %.1f s; removing it", self.core.workers[wid].name,
                        worker_timeout)
            self._remove_worker(wid, now, "missed heartbeats")

    def flush(self, now: float) -> list[tuple[bytes, list]]:
        """Schedule once; everything to send now, in order."""
        self._schedule(now)
        commands = self.core.take_commands()
        tracer = self.tracer
        if tracer is not None:
            tracer.commands(commands, self.worker_of_key)
        out, self._out = self._out, []
        out.extend(P.encode_command(cmd) for cmd in commands)
        if tracer is not None:
            out.extend(tracer.ended_jobs(self.core.jobs, self.core.workers.values()))
            if not tracer:   # no traced job left: no tracing cost from here on
                self.tracer = None
        out.extend(self._answers)
        self._answers = []
        return out

    def journal_records(self) -> list:
        """What changed since the last call, as journal records (see server/journal.py)."""
        core = self.core
        if core.record is None:
            return []
        records, core.record = core.record, []
        if core.segs.next_gid != self._journaled_ids:
            self._journaled_ids = core.segs.next_gid
            records.append(["ids", int(core.segs.next_gid)])
        return records

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None

    # ------------------------------------------------------------------ workers
    def _worker_message(self, identity: bytes, kind: bytes, body: dict, now: float) -> None:
        core = self.core
        event = P.decode_worker_event(kind, body)
        if isinstance(event, M.Register):
            if self.worker_of_key.get(identity) in core.workers:
                # a second worker on one connection would be a phantom that gets tasks
                raise P.ProtocolError("REGISTER from a worker that is already registered")
            wid = core.add_worker(identity, event, now)
            self.worker_of_key[identity] = wid
            w = core.workers[wid]
            log.info("worker %s registered: %d cpus at %s%s", w.name, w.cpus, w.data_address,
                     f", holding {len(event.held)} data objects" if event.held is not None and len(event.held) else "")
            if event.held is not None and len(event.held):
                core.data_returned(wid, event.held, event.held_sizes, event.held_lengths, now)
            self._out.append((identity, P.encode(P.REPLY, {"worker_id": wid})))
            if self.tracer is not None:
                self._out.extend(self.tracer.worker_added(w))
            return
        wid = self.worker_of_key.get(identity)
        if wid is None or wid not in core.workers:
            raise P.ProtocolError(f"{kind!r} from an unregistered worker")
        worker = core.workers[wid]
        worker.last_seen = now
        if isinstance(event, M.Heartbeat):
            core.heartbeat(wid, event.stats, now)
            return
        if event.cpu_busy is not None:
            core.cpu_tasks_ran(wid, *event.cpu_busy)
        if len(event.finished):
            core.tasks_finished(wid, event.finished, event.sizes, event.lengths, now, event.inline)
        if len(event.replicas):
            core.replicas_added(wid, event.replicas, now)
        if event.failed:
            core.tasks_failed(wid, event.failed, now, event.unfetched)
            for t, m in event.failed:
                log.info("task %s failed on %s: %s", t, worker.name, m.splitlines()[0][:200] if m else "")
        if event.returned is not None:   # the answer to a steal request (maybe none given back)
            core.tasks_returned(wid, event.returned, now)
        for task_id, graph_bytes in event.redirects:
            try:
                if not isinstance(graph_bytes, bytes):   # read() would open a str as a path
                    raise GraphError("the sub-plan is not graph file bytes")
                graph = graphfmt.read(graph_bytes)
            except GraphError as exc:
                core.tasks_failed(wid, [(task_id, f"invalid redirection sub-plan: {exc}")], now)
                continue
            core.task_redirected(wid, task_id, graph, now)
        for task_id, level, message in event.logs:
            log.info("task %s [%s]: %s", task_id, level, message)

    def _remove_worker(self, wid: int, now: float, reason: str) -> None:
        worker = self.core.workers[wid]
        if self.tracer is not None:
            self.tracer.worker_lost(worker, reason)
        self.core.remove_worker(wid, now, reason)
        self.worker_of_key.pop(worker.key, None)
        self.gate.forget(worker.key)

    # ------------------------------------------------------------------ clients
    def _client_message(self, identity: bytes, kind: bytes, body: dict, blobs: list, now: float) -> None:
        req = body.get("req")
        try:
            result = self._request(identity, P.decode_client_request(kind, body, blobs), now)
        except (SubmitError, GraphError, P.ProtocolError, ValueError, TypeError, KeyError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else short(exc)
            if req is None:   # a notice: nobody waits for an answer
                self.bad_messages += 1
                log.info("bad %s notice from a client: %s", kind.decode(errors="replace"), message)
                return
            self._answers.append((identity, P.encode(P.ERROR, {"req": req, "message": message})))
            return
        if result is not None and req is not None:
            self._answers.append((identity, P.encode(P.REPLY, {"req": req, **result})))

    def _request(self, identity: bytes, request, now: float) -> dict | None:
        core = self.core
        if isinstance(request, M.Submit):
            graph_file, request.graph = request.graph, None   # (the only reference to the frame)
            graph = graphfmt.read(graph_file)
            trace_dir = self._trace_dir(request.trace)
            options = {"name": request.name, "load": request.load, "detached": request.detach}
            early = None
            if core.record is None:
                graph_file = None
            elif self.journal_now is not None and len(graph_file) >= EARLY_JOURNAL_BYTES:
                # journaled before the core adds the job, so that the frame is freed first
                # (a failed submission is then retired in the journal)
                early, base = core.next_job, core.segs.next_gid   # (the job's id and base, as submit gives them)
                self.journal_now([*self.journal_records(), ["job", early, base, graph_file, options]])
                graph_file = None
            mark = len(core.record) if core.record is not None else 0
            try:
                job = core.submit(identity, graph, now, load=request.load, name=request.name,
                                  notify=request.notify, trace=request.trace, detached=request.detach)
            except Exception:
                if early is not None:
                    core.next_job = max(core.next_job, early + 1)   # (that id is the journal's)
                    core.record.append(["retire", early])
                raise
            assert early is None or (job.id, job.base) == (early, base)
            if core.record is not None and early is None:   # (before what the submission itself recorded)
                core.record.insert(mark, ["job", job.id, job.base, graph_file, options])
            log.info("job %d submitted: %d tasks", job.id, job.n)
            if trace_dir is not None:
                self._trace_job(job, trace_dir)
            return {"job": job.id, "base": job.base, "n": job.n, "results": P.ids_to_bytes(core.ids_of(job.results))}
        if isinstance(request, M.Release):
            core.release(request.ids)
            return {}
        if isinstance(request, M.JobRequest):
            if request.kind == P.CANCEL:
                if not core.cancel(request.job, now):
                    raise KeyError(f"no job {request.job}")
                return {}
            watcher = identity if request.kind == P.WAIT_JOB else None
            answer = core.job_results(request.job, watcher)
            return {**answer, "ids": P.ids_to_bytes(answer["ids"])}
        if isinstance(request, M.SetTrace):
            self.trace_dir = request.path
            return {}
        if request.kind == P.STATS:
            return {"n_workers": len(core.workers), "n_data_objects": core.n_data, "n_tasks": core.segs.next_gid,
                    "live_tasks": core.cols.used,
                    "n_jobs": len(core.jobs), "bytes_received": self.bytes_received,
                    "messages_received": self.messages_received, "bad_messages": self.bad_messages,
                    "refused": self.gate.refused, "connections": len(self.gate.roles),
                    "handshakes": len(self.gate.pending), **core.stats}
        if request.kind == P.STATUS:
            status = core.status(now)
            status["server"] = {**self.info, "uptime_s": round(now - self.info.get("started", now), 1),
                                "auth": self.secret is not None, "bytes_received": self.bytes_received}
            return status
        # TERMINATE
        lifecycle.info("terminate requested: stopping workers and the server")
        self._out.extend(P.encode_command(M.Stop(w.key)) for w in core.workers.values())
        self._out.append((identity, P.encode(P.REPLY, {"req": request.req})))
        self.running = False
        return None

    # ------------------------------------------------------------------ tracing
    def _schedule(self, now: float) -> int:
        if self.tracer is None:
            return self.core.schedule(now)
        mark, rounds = self.tracer.round_begin(), self.core.stats["rounds"]
        placed = self.core.schedule(now)
        if placed or self.core.stats["rounds"] != rounds:
            self.tracer.round_end(mark, placed, sum(len(r) for r in self.core.ready) + len(self.core.pool))
        return placed

    def _trace_dir(self, requested) -> str | None:
        """The directory a submission asks to be traced into (see the protocol)."""
        if requested is None or requested is False or requested == "":
            return None
        if requested is True:
            if not self.trace_dir:
                raise SubmitError("the job asks for a trace, but the server has no trace directory")
            return os.path.abspath(self.trace_dir)
        if not isinstance(requested, str):
            raise SubmitError("trace must be a directory name")
        return os.path.abspath(os.path.join(self.trace_dir or os.getcwd(), requested))

    def _trace_job(self, job, directory: str) -> None:
        if self.tracer is None:
            if self.tracer_factory is None:
                return
            self.tracer = self.tracer_factory()
        self._out.extend(self.tracer.start_job(job, directory, list(self.core.workers.values())))
        if not self.tracer:
            self.tracer = None
