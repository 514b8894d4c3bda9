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

import graphfmt
from graphfmt.graph import GraphError
from loomctl import protocol as P
from loomctl.access import remove_access, write_access
from loomctl.core.server import ServerCore, SubmitError

log = logging.getLogger("loomctl.server")


class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 9010, server_dir: str | None = None,
                 auth: bool = True, heartbeat_timeout: float = 5.0, trace_dir: str | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind_host = host if host not in ("", "localhost") else "127.0.0.1"
        if port == 0:
            self.port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self.sock.bind(f"tcp://{bind_host}:{port}")
            self.port = port
        self.host = bind_host
        self.secret = P.new_secret() if auth else None
        self.gate = P.Gatekeeper(self.secret, log=log.warning, welcome={"server": "loomctl"})
        self.core = ServerCore()
        self.worker_of_key: dict[bytes, int] = {}
        self.server_dir = server_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.trace_dir = trace_dir
        self.running = True
        self.started = time.time()
        self.bytes_received = 0
        self.messages_received = 0
        self.bad_messages = 0
        if server_dir:
            write_access(server_dir, self.host, self.port, self.secret)

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        log.info("server listening on tcp://%s:%d (authentication %s)", self.host, self.port,
                 "on" if self.secret else "OFF")
        last_check = time.monotonic()
        try:
            while self.running:
                if self.sock.poll(100, zmq.POLLIN):
                    self._drain()
                now = time.monotonic()
                if now - last_check > 0.25:
                    last_check = now
                    for wid in self.core.dead_workers(now, self.heartbeat_timeout):
                        name = self.core.workers[wid].name
                        log.warning("worker %s missed heartbeats for %.1f s; removing it", name, self.heartbeat_timeout)
                        self._remove_worker(wid, now)
                        self.core.schedule(now)
                    self._flush()
        finally:
            self.close()

    def _drain(self) -> None:
        now = time.monotonic()
        for _ in range(10000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            self.messages_received += 1
            self.bytes_received += sum(len(f) for f in frames)
            try:
                self._handle(frames, now)
            except Exception as exc:   # a peer must never take the server down
                self.bad_messages += 1
                log.warning("dropped a malformed message: %s", _short(exc))
        self.core.schedule(now)   # once per drained batch of messages
        self._flush()

    def _flush(self) -> None:
        for kind, target, message, body, blobs in self.core.take_commands():
            try:
                self.sock.send_multipart([target, *P.encode(message, body, *blobs)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("could not send %s: %s", message.decode(), exc)

    def _reply(self, identity: bytes, message: list) -> None:
        self.sock.send_multipart([identity, *message])

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
            wid = core.add_worker(identity, body, now)
            self.worker_of_key[identity] = wid
            w = core.workers[wid]
            log.info("worker %s registered: %d cpus at %s", w.name, w.cpus, w.data_address)
            self._reply(identity, P.encode(P.REPLY, {"worker_id": wid}))
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
                core.tasks_finished(wid, finished, sizes, lengths, now)
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
            self._reply(identity, P.encode(P.ERROR, {"req": req, "message": message}))
            return
        if result is not None:
            self._reply(identity, P.encode(P.REPLY, {"req": req, **result}))

    def _client_request(self, identity: bytes, kind: bytes, body: dict, now: float) -> dict | None:
        core = self.core
        if kind == P.SUBMIT:
            graph = graphfmt.read(P.field(body, "graph", bytes))
            job = core.submit(identity, graph, now, load=bool(body.get("load", False)),
                              name=str(body.get("name") or ""), notify=bool(body.get("notify", True)),
                              trace=body.get("trace"))
            log.info("job %d submitted: %d tasks", job.id, job.n)
            return {"job": job.id, "base": job.base, "n": job.n, "results": P.ids_to_bytes(job.results)}
        if kind == P.RELEASE:
            core.release(P.ids_from_bytes(P.field(body, "ids", bytes)))
            return {}
        if kind == P.STATS:
            return {"n_workers": len(core.workers), "n_data_objects": core.n_data, "n_tasks": core.cols.n,
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
            job = core.jobs.get(int(P.field(body, "job", int)))
            if job is None:
                raise KeyError(f"no job {body.get('job')}")
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
            log.info("terminate requested: stopping workers and the server")
            for worker in core.workers.values():
                self._reply(worker.key, P.encode(P.STOP))
            self._reply(identity, P.encode(P.REPLY, {"req": body.get("req")}))
            self.running = False
            return None
        raise P.ProtocolError(f"unknown client message {kind!r}")

    def _remove_worker(self, wid: int, now: float) -> None:
        key = self.core.workers[wid].key
        self.core.remove_worker(wid, now)
        self.worker_of_key.pop(key, None)
        self.gate.forget(key)

    def close(self) -> None:
        if self.server_dir:
            remove_access(self.server_dir)
        self.sock.close(linger=500)   # let STOP messages reach the workers
        self.ctx.term()


def _short(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]


def run_server(**kwargs) -> None:
    server = Server(**kwargs)

    def stop(signum, frame):
        server.running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve()
