"""The server process: a thin zmq shell around the sans-I/O ServerCore.

Loop: wait for messages -> drain every message already waiting -> feed them to the core
-> schedule once -> send the commands the core returned. Workers that miss heartbeats
for ``worker_timeout`` seconds are removed (their work is redone elsewhere).

Invariants:
- Nothing a peer sends can stop the loop: every handler runs under one guard that logs
  and drops the offending message (and the handshake keeps strangers out entirely).
- The server never carries data objects: it handles ids, sizes and addresses only.
- The secret is written only to the access file (mode 0600) and never logged.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

import graphfmt
from graphfmt.graph import GraphError
from loomctl import protocol as P
from loomctl.access import remove_access, write_access
from loomctl.core.server import ServerCore, SubmitError
from loomctl.core.tasktable import STATE_NAMES

log = logging.getLogger("loomctl.server")
MAX_REPORTED = 1 << 48   # bound of the sizes and lengths a worker reports


class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 9010, server_dir: str | None = None,
                 auth: bool = True, heartbeat_timeout: float = 2.0, trace_dir: str | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # no high-water mark: a COMPUTE or RELEASE_DATA to a busy worker is queued, never
        # dropped (at zmq's default of 1,000 queued messages a non-blocking send failed and
        # the message was lost: tasks assigned for ever); a stalled worker is dropped by
        # the heartbeats instead
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # no ROUTER_HANDOVER: a peer must never inherit another connection's routing id,
        # and with it that connection's authentication (a second connection with an id in
        # use is refused by zmq; a worker reconnecting after a cut gets in once the old
        # connection is dropped, 3 s at most, see the heartbeats below)
        # zmq-level heartbeats: a peer that vanishes without closing its connection
        # (a cut cable) is disconnected after 3 s, which the monitor below reports
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE)
        bind_host = host if host not in ("", "localhost") else "127.0.0.1"
        if port == 0:
            self.port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self.sock.bind(f"tcp://{bind_host}:{port}")
            self.port = port
        self.host = bind_host
        self.secret = P.new_secret() if auth else None
        self.gate = P.Gatekeeper(self.secret, log=log.warning, welcome={"server": "loomctl"},
                                 tell_strangers=True)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable peer raises: see _routable
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.peers = PeerConnections()
        self.suspects: dict[bytes, float] = {}   # identity -> probe until (monotonic time)
        self.core = ServerCore()
        self.worker_of_key: dict[bytes, int] = {}
        self.server_dir = server_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.trace_dir = trace_dir
        self.running = True
        self.tracer = None   # a ServerTracer while a traced job runs (loomctl.trace.hooks)
        self.started = time.time()
        self.bytes_received = 0
        self.messages_received = 0
        self.bad_messages = 0
        self.replies: list[tuple[bytes, list]] = []   # answers of this drained batch
        if server_dir:
            write_access(server_dir, self.host, self.port, self.secret)

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        log.info("server listening on tcp://%s:%d (authentication %s)", self.host, self.port,
                 "on" if self.secret else "OFF")
        last_check = time.monotonic()
        try:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            while self.running:
                events = dict(poller.poll(100))
                if self.monitor in events:
                    self._on_monitor()
                if self.sock in events:
                    self._drain()
                now = time.monotonic()
                if now - last_check > 0.25:
                    last_check = now
                    self._probe_suspects(now)
                    self.core.retire_jobs(now)
                    if self.tracer is not None:
                        self.tracer.tick()
                    for wid in self.core.dead_workers(now, self.heartbeat_timeout):
                        name = self.core.workers[wid].name
                        log.warning("worker %s missed heartbeats for %.1f s; removing it", name, self.heartbeat_timeout)
                        self._remove_worker(wid, now)
                        self._schedule(now)
                    self._flush()
        finally:
            self.close()

    def _drain(self) -> None:
        now = time.monotonic()
        for _ in range(10000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.messages_received += 1
            self.bytes_received += sum(len(f) for f in frames)
            identity = frames[0].bytes
            if not self.peers.known(identity):
                self.peers.connected(identity, frames[0].get(zmq.SRCFD))
            try:
                self._handle([identity, *(f.bytes for f in frames[1:])], now)
            except Exception as exc:   # a peer must never take the server down
                self.bad_messages += 1
                log.warning("dropped a malformed message: %s", _short(exc))
        self._schedule(now)   # once per drained batch of messages
        self._flush()
        # replies last: a submission's tasks reach the workers before its client hears back
        for identity, message in self.replies:
            self._reply(identity, message)
        self.replies.clear()

    def _on_monitor(self) -> None:
        now = time.monotonic()
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            except Exception:   # a malformed monitor frame: nothing to learn from it
                break
            if event.get("event") == zmq.EVENT_DISCONNECTED:
                for identity in self.peers.candidates(event.get("value")):
                    self.suspects[identity] = now + 2.0
        self._probe_suspects(now)

    def _probe_suspects(self, now: float) -> None:
        """Peers seen on a connection that closed: gone if zmq can no longer route to
        them; probed again for a short while otherwise (the close may still be in
        flight inside zmq)."""
        for identity, until in list(self.suspects.items()):
            if not self._routable(identity):
                del self.suspects[identity]
                self._peer_gone(identity, now)
            elif now > until:
                del self.suspects[identity]

    def _routable(self, identity: bytes) -> bool:
        try:
            self.sock.send_multipart([identity, *P.encode(P.PING)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH   # EAGAIN: alive, only busy
        return True

    def _peer_gone(self, identity: bytes | None, now: float) -> None:
        if identity is None:
            return
        role = self.gate.role(identity)
        self.gate.forget(identity)
        self.peers.forget(identity)
        if role == "worker":
            wid = self.worker_of_key.get(identity)
            if wid is not None and wid in self.core.workers:
                log.warning("worker %s disconnected; its tasks run elsewhere", self.core.workers[wid].name)
                self._remove_worker(wid, now, "disconnected")
                self._schedule(now)
                self._flush()
        elif role == "client":
            cancelled = self.core.client_gone(identity, now)
            if cancelled:
                log.info("a client disconnected; cancelled its jobs %s", cancelled)
            self._flush()

    def _schedule(self, now: float) -> int:
        if self.tracer is None:
            return self.core.schedule(now)
        started, rounds, t0 = time.time(), self.core.stats["rounds"], time.perf_counter()
        placed = self.core.schedule(now)
        if placed or self.core.stats["rounds"] != rounds:
            self.tracer.round(started, time.perf_counter() - t0, placed, sum(len(r) for r in self.core.ready))
        return placed

    def _flush(self) -> None:
        commands = self.core.take_commands()
        if self.tracer is not None:
            self.tracer.commands(commands, self.core.cols.job, self.worker_of_key)
        for kind, target, message, body, blobs in commands:
            try:
                self.sock.send_multipart([target, *P.encode(message, body, *blobs)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("could not send %s: %s", message.decode(), exc)
        if self.tracer is not None:
            self._send_trace(self.tracer.ended_jobs(self.core.jobs, self.core.workers.values()))
            if not self.tracer:   # no traced job left: no tracing cost from here on
                self.tracer = None

    def _send_trace(self, messages: list) -> None:
        for key, message in messages:
            try:
                self.sock.send_multipart([key, *message], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("could not send TRACE: %s", exc)

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
            from loomctl.trace.hooks import ServerTracer
            self.tracer = ServerTracer()
        self._send_trace(self.tracer.start_job(job, directory, list(self.core.workers.values())))
        if not self.tracer:
            self.tracer = None

    def _reply(self, identity: bytes, message: list) -> None:
        try:
            self.sock.send_multipart([identity, *message], zmq.NOBLOCK)
        except zmq.ZMQError as exc:   # the peer is gone or not reading: nothing to do
            log.info("could not answer a peer: %s", exc)

    # ------------------------------------------------------------------ dispatch
    def _handle(self, frames: list, now: float) -> None:
        if len(frames) < 2:
            raise P.ProtocolError("no identity")
        identity = frames[0]
        kind, body, blobs = P.decode(frames[1:])
        admitted, reply = self.gate.handle(identity, kind, body)
        if reply is not None:
            self._reply(identity, reply)
        if not admitted:
            return
        role = self.gate.role(identity)
        if role == "worker":
            self._worker_message(identity, kind, body, now)
        elif role == "client":
            self._client_message(identity, kind, body, now)
        else:
            raise P.ProtocolError(f"{role} may not send {kind!r} to the server")

    def _worker_message(self, identity: bytes, kind: bytes, body: dict, now: float) -> None:
        core = self.core
        if kind == P.REGISTER:
            if self.worker_of_key.get(identity) in core.workers:
                # a second worker on one connection would be a phantom that gets tasks
                raise P.ProtocolError("REGISTER from a worker that is already registered")
            address = P.field(body, "data_address", str)
            cpus = P.field(body, "cpus", int)
            if not address.startswith("tcp://") or cpus < 0:
                raise P.ProtocolError("REGISTER needs a tcp:// data_address and cpus >= 0")
            resources = body.get("resources") or {}
            if not isinstance(resources, dict) or not all(   # replies (STATUS) carry them
                    isinstance(k, str) and type(v) is int and 0 <= v < 1 << 63 for k, v in resources.items()):
                raise P.ProtocolError("REGISTER resources must map names to integers 0 <= n < 2**63")
            wid = core.add_worker(identity, body, now)
            self.worker_of_key[identity] = wid
            w = core.workers[wid]
            log.info("worker %s registered: %d cpus at %s", w.name, w.cpus, w.data_address)
            self._reply(identity, P.encode(P.REPLY, {"worker_id": wid}))
            if self.tracer is not None:
                self._send_trace(self.tracer.worker_added(w))
            return
        wid = self.worker_of_key.get(identity)
        if wid is None or wid not in core.workers:
            raise P.ProtocolError(f"{kind!r} from an unregistered worker")
        core.workers[wid].last_seen = now
        if kind == P.UPDATE:
            finished = P.ids_from_bytes(P.field(body, "finished", bytes, b""))
            if len(finished):
                sizes = P.ids_from_bytes(P.field(body, "sizes", bytes))
                lengths = P.ids_from_bytes(P.field(body, "lengths", bytes))
                if not len(sizes) == len(lengths) == len(finished):
                    raise P.ProtocolError("finished/sizes/lengths differ in length")
                if len(finished) > 1:   # an id reported twice would be counted twice
                    ordered = np.sort(finished)
                    if (ordered[1:] == ordered[:-1]).any():
                        keep = np.sort(np.unique(finished, return_index=True)[1])
                        finished, sizes, lengths = finished[keep], sizes[keep], lengths[keep]
                # sizes are summed into statistics: one near 2**63 overflowed them (and then
                # STATS could no longer be encoded); no data object is 2**48 bytes
                sizes = np.minimum(np.maximum(sizes, 0), MAX_REPORTED)
                lengths = np.minimum(np.maximum(lengths, 0), MAX_REPORTED)
                core.tasks_finished(wid, finished, sizes, lengths, now, _inline(body))
            replicas = P.ids_from_bytes(P.field(body, "replicas", bytes, b""))
            if len(replicas):
                core.replicas_added(wid, replicas)
            failed = P.field(body, "failed", list, [])
            if failed:
                core.tasks_failed(wid, [(int(t), str(m)) for t, m in failed], now)
                for t, m in failed:
                    log.info("task %s failed on %s: %s", t, core.workers[wid].name, str(m).splitlines()[0][:200] if m else "")
            for task_id, graph_bytes in P.field(body, "redirects", list, []):
                try:
                    if not isinstance(graph_bytes, bytes):   # read() would open a str as a path
                        raise GraphError("the sub-plan is not graph file bytes")
                    graph = graphfmt.read(graph_bytes)
                except GraphError as exc:
                    core.tasks_failed(wid, [(int(task_id), f"invalid redirection sub-plan: {exc}")], now)
                    continue
                core.task_redirected(wid, int(task_id), graph, now)
            for task_id, level, message in P.field(body, "logs", list, []):
                log.info("task %s [%s]: %s", task_id, level, message)
        elif kind == P.HEARTBEAT:
            core.heartbeat(wid, body, now)
        else:
            raise P.ProtocolError(f"unknown worker message {kind!r}")

    def _client_message(self, identity: bytes, kind: bytes, body: dict, now: float) -> None:
        req = body.get("req")
        try:
            result = self._client_request(identity, kind, body, now)
        except (SubmitError, GraphError, P.ProtocolError, ValueError, TypeError, KeyError) as exc:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else _short(exc)
            if req is None:   # a notice: nobody waits for an answer
                self.bad_messages += 1
                log.info("bad %s notice from a client: %s", kind.decode(errors="replace"), message)
                return
            self._reply(identity, P.encode(P.ERROR, {"req": req, "message": message}))
            return
        if result is not None and req is not None:   # sent after this batch's COMPUTEs (see _drain)
            self.replies.append((identity, P.encode(P.REPLY, {"req": req, **result})))

    def _client_request(self, identity: bytes, kind: bytes, body: dict, now: float) -> dict | None:
        core = self.core
        if kind == P.SUBMIT:
            graph = graphfmt.read(P.field(body, "graph", bytes))
            trace_dir = self._trace_dir(body.get("trace"))
            job = core.submit(identity, graph, now, load=bool(body.get("load", False)),
                              name=str(body.get("name") or ""), notify=bool(body.get("notify", True)),
                              trace=body.get("trace"), detached=bool(body.get("detach", False)))
            log.info("job %d submitted: %d tasks", job.id, job.n)
            if trace_dir is not None:
                self._trace_job(job, trace_dir)
            return {"job": job.id, "base": job.base, "n": job.n, "results": P.ids_to_bytes(job.results)}
        if kind == P.RELEASE:
            core.release(P.ids_from_bytes(P.field(body, "ids", bytes)))
            return {}
        if kind == P.STATS:
            return {"n_workers": len(core.workers), "n_data_objects": core.n_data, "n_tasks": core.cols.n,
                    "n_jobs": len(core.jobs),
                    "bytes_received": self.bytes_received, "messages_received": self.messages_received,
                    "bad_messages": self.bad_messages, "refused": self.gate.refused, **core.stats}
        if kind == P.STATUS:
            status = core.status(now)
            status["server"] = {"host": self.host, "port": self.port, "pid": os.getpid(),
                                "uptime_s": round(time.time() - self.started, 1),
                                "auth": self.secret is not None, "bytes_received": self.bytes_received}
            return status
        if kind == P.CANCEL:
            job = int(P.field(body, "job", int))
            if not core.cancel(job, now):
                raise KeyError(f"no job {job}")
            return {}
        if kind == P.JOB_RESULTS or kind == P.WAIT_JOB:
            job_id = int(P.field(body, "job", int))
            job = core.jobs.get(job_id)
            if job is None:   # retired (it holds nothing any more), or unknown
                row = core.retired_row(job_id)
                if row is None:
                    raise KeyError(f"no job {job_id}")
                return {"job": job_id, "status": row["status"], "error": row["error"],
                        "counts": {k: v for k, v in row.items() if k in STATE_NAMES or k == "total"},
                        "ids": b"", "addresses": []}
            if kind == P.WAIT_JOB:
                job.watchers.add(identity)
            c = core.cols
            held = job.results[c.owner[job.results] >= 0]
            return {"job": job.id, "status": job.status, "error": job.error, "counts": core.job_counts(job),
                    "ids": P.ids_to_bytes(held),
                    "addresses": [core.workers[int(c.owner[t])].data_address for t in held.tolist()]}
        if kind == P.SET_TRACE:
            self.trace_dir = str(P.field(body, "path", str))
            return {}
        if kind == P.TERMINATE:
            log.warning("terminate requested: stopping workers and the server")
            for worker in core.workers.values():
                self._reply(worker.key, P.encode(P.STOP))
            self._reply(identity, P.encode(P.REPLY, {"req": body.get("req")}))
            self.running = False
            return None
        raise P.ProtocolError(f"unknown client message {kind!r}")

    def _remove_worker(self, wid: int, now: float, reason: str = "missed heartbeats") -> None:
        key = self.core.workers[wid].key
        if self.tracer is not None:
            self.tracer.worker_lost(self.core.workers[wid], reason)
        self.core.remove_worker(wid, now, reason)
        self.worker_of_key.pop(key, None)
        self.gate.forget(key)

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        if self.server_dir:
            remove_access(self.server_dir)
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(linger=500)   # let STOP messages reach the workers
        self.ctx.term()


class PeerConnections:
    """Which connection (file descriptor) each peer identity was seen on, so that a
    disconnection reported by the socket monitor (by descriptor) can be traced to peers.

    A descriptor is reused after its connection closed, and messages of a closed
    connection may still be queued, so a descriptor may list several identities; the
    server probes each of them (a PING that zmq refuses to route to a gone peer)."""

    def __init__(self):
        self.fd_of: dict[bytes, int] = {}
        self.on_fd: dict[int, set[bytes]] = {}

    def known(self, identity: bytes) -> bool:
        return identity in self.fd_of

    def connected(self, identity: bytes, fd: int) -> None:
        self.fd_of[identity] = fd
        self.on_fd.setdefault(fd, set()).add(identity)

    def candidates(self, fd) -> list[bytes]:
        return sorted(self.on_fd.get(fd, ())) if isinstance(fd, int) else []

    def forget(self, identity: bytes) -> None:
        fd = self.fd_of.pop(identity, None)
        peers = self.on_fd.get(fd)
        if peers is not None:
            peers.discard(identity)
            if not peers:
                del self.on_fd[fd]


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]


def _inline(body: dict) -> dict[int, bytes] | None:
    """The small results an UPDATE sends along (id -> encoding); a malformed or
    oversized set is ignored (the client then fetches from the worker)."""
    raw, blobs = body.get("inline"), body.get("blobs")
    if not raw or not isinstance(raw, bytes) or len(raw) % 8 or not isinstance(blobs, list):
        return None
    ids = P.ids_from_bytes(raw).tolist()
    if len(ids) != len(blobs) or not all(type(b) is bytes and len(b) <= P.INLINE_BYTES for b in blobs):
        return None
    return dict(zip(ids, blobs))


def run_server(**kwargs) -> None:
    server = Server(**kwargs)

    def stop(signum, frame):
        server.running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve()
