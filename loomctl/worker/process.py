"""The worker process: one poll loop around the sans-I/O WorkerState, executor threads
and programs.

The loop (``Worker.run``) polls the server DEALER, the data ROUTER, one DEALER per peer,
the server socket's monitor and an inproc PAIR that executor threads use to wake it.
Each iteration turns what is readable into events (messages, peer answers, ended
programs and tasks, the clock), hands them to ``WorkerState.handle`` in one batch and
carries out the instructions that come back: start tasks (inline built-ins in the loop,
programs watched by the poller, cpu tasks in a pool of ``max(1, cpus)`` threads, other
light tasks in a small pool), send the UPDATE, connect to peers and send FETCHes. What
the worker decides is in ``worker.state``; this module keeps the sockets, threads,
programs and the clock.

Invariants:
- The loop never waits on a task, and only the loop thread touches sockets and the
  WorkerState. Executor threads only compute; they hand an ``Outcome`` back through a
  deque and wake the loop through the PAIR (sends serialised by a lock).
- Every message from the network is checked; a malformed or unauthenticated one is
  logged and dropped, never raised out of the loop. A task failure is a report, never a
  crash. The secret is never logged.
- Lost server: zmq reconnects silently, so a socket monitor on the server DEALER watches
  for EVENT_DISCONNECTED; when the server stays gone for ``server_lost_s`` (3 s) without
  the connection coming back, the worker logs "server lost; stopping" and exits. The
  DEALER has a fixed routing id, so a short outage (the same server process) resumes
  under the same identity. A *restarted* server would not know this worker; it must be
  restarted too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P
from loomctl.worker import data
from loomctl.worker import extensions as registry
from loomctl.routerpeers import RouterPeers
from loomctl.worker import state as W
from loomctl.worker.fetch import PeerLinks, serve_data
from loomctl.worker.outcome import Outcome
from loomctl.worker.programs import Programs
from loomctl.worker.running import Pool, run_task
from loomctl.worker.hostinfo import local_address_towards, rss, split_address
from loomctl.worker.taskqueue import is_int
from loomctl.worker.workdir import WorkDir

log = logging.getLogger("loomctl.worker")

LIGHT_THREADS = 2
MAX_DRAIN = 1000          # messages read from one socket per iteration
MAX_POLL_MS = 250


class Worker:
    """``start()`` connects and registers (ConnectionError on failure), ``run()`` serves
    until STOP, a lost server or ``stop()`` and returns the reason, ``close()`` releases
    sockets and the working directory. ``stop()`` may be called from any thread or a
    signal handler."""

    def __init__(self, server_address: str, secret: str | None = None, cpus: int = 1,
                 work_dir: str | None = None, resources: dict | None = None,
                 name: str | None = None, extensions: list | tuple = (),
                 keep_failed_dirs: bool = False, host: str | None = None,
                 heartbeat_s: float = 0.5, memory_limit: int | None = None,
                 server_lost_s: float = 3.0, connect_timeout_s: float = 10.0,
                 peer_timeout_s: float = 10.0, fetch_timeout_s: float = 120.0):
        self.server_address = server_address if server_address.startswith("tcp://") \
            else f"tcp://{server_address}"
        self.server_host, self.server_port = split_address(self.server_address)
        self.secret = secret
        self.cpus = max(0, int(cpus))
        self.resources = {str(k): int(v) for k, v in (resources or {}).items()}
        self.hostname = socket.gethostname()
        self.name = name or f"{self.hostname}-{os.getpid()}"
        self.extensions = list(extensions)
        self.keep_failed_dirs = keep_failed_dirs
        self.host = host
        self.heartbeat_s = heartbeat_s
        self.memory_limit = memory_limit
        self.server_lost_s = server_lost_s
        self.connect_timeout_s = connect_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.workdir = WorkDir(work_dir)

        self.worker_id: int | None = None
        self.data_address: str | None = None
        self.run_dir: str | None = None
        self.state = W.WorkerState(self.cpus, self.resources, fetch_timeout_s)
        self._events: list = []                  # for the state, this iteration
        self._heartbeats = 0
        self.context: zmq.Context | None = None
        self._sockets: list = []
        self._outcomes: deque = deque()
        self._wake_lock = threading.Lock()
        self._wake_tx = None
        self._pools: list[Pool] = []
        self._early: list = []
        self._stop_reason: str | None = None
        self._lost_since: float | None = None
        self._closed = False
        self.tracer = None        # a WorkerTracer while a traced job runs (loomctl.trace.hooks)

    # ------------------------------------------------------------------ setup
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        registry.load_extensions(self.extensions)
        registry.load_entry_points()
        self.context = ctx = zmq.Context()
        self.server = self._socket(zmq.DEALER)
        self.server.setsockopt(zmq.ROUTING_ID, b"w" + os.urandom(8))
        # zmtp heartbeats: a server host that vanishes without closing the connection
        # (power off, partition) is seen as a disconnection too
        self.server.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.server.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.monitor = self.server.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sockets.append(self.monitor)
        self.server.connect(self.server_address)
        P.client_handshake(self.server, "worker", self.secret,
                           timeout_ms=int(self.connect_timeout_s * 1000))

        bind_host = self.host or local_address_towards(self.server_host, self.server_port)
        advertised = bind_host
        if bind_host in ("0.0.0.0", "*", ""):
            bind_host = "*"
            advertised = local_address_towards(self.server_host, self.server_port)
        self.data = self._socket(zmq.ROUTER)
        # only handshakes and FETCH requests come in here: a peer sending more than this
        # in one message is disconnected by zmq before the bytes are held in memory
        self.data.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
        self.data.setsockopt(zmq.ROUTER_MANDATORY, 1)   # (RouterPeers probes gone peers)
        self.data_peers = RouterPeers(self.data)
        port = self.data.bind_to_random_port(f"tcp://{bind_host}")
        self.data_address = f"tcp://{advertised}:{port}"
        self.gate = P.Gatekeeper(self.secret, log=lambda msg: log.warning("data socket: %s", msg))

        self.run_dir = self.workdir.open()
        self._register()

        self.wake_rx = self._socket(zmq.PAIR)
        wake_address = f"inproc://loomctl-worker-wake-{id(self)}"
        self.wake_rx.bind(wake_address)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_address)

        self.poller = zmq.Poller()
        for sock in (self.server, self.data, self.monitor, self.wake_rx, self.data_peers.monitor):
            self.poller.register(sock, zmq.POLLIN)
        self.peers = PeerLinks(ctx, self.poller, self.secret)
        self._pools = [Pool(max(1, self.cpus), "loomctl-exec", self._done, python_processes=self.cpus > 1),
                       Pool(LIGHT_THREADS, "loomctl-light", self._done)]
        self.pool, self.light_pool = self._pools
        self.programs = Programs(self.poller, self.run_dir, self.keep_failed_dirs)

    def _socket(self, kind):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # no high-water mark: a report, an assignment or an answer is queued, never dropped
        # (at zmq's default of 1,000 queued messages a non-blocking send fails)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self._sockets.append(sock)
        return sock

    def _register(self) -> None:
        body = {"name": self.name, "hostname": self.hostname, "pid": os.getpid(),
                "cpus": self.cpus, "resources": self.resources,
                "symbols": sorted(registry.supported_symbols()),
                "data_address": self.data_address, "work_dir": self.run_dir}
        if self.memory_limit is not None:
            body["memory_limit"] = int(self.memory_limit)
        self.server.send_multipart(P.encode(P.REGISTER, body))
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.server.poll(int(remaining * 1000), zmq.POLLIN):
                raise ConnectionError("the server did not answer the worker's registration")
            frames = self.server.recv_multipart()
            try:
                kind, body, _ = P.decode(frames)
            except P.ProtocolError as exc:
                raise ConnectionError(f"malformed answer to the registration: {exc}") from None
            if kind == P.REPLY and is_int(body.get("worker_id")):
                self.worker_id = body["worker_id"]
                break
            if kind == P.ERROR:
                raise ConnectionError(f"the server refused the registration: {body.get('message')}")
            self._early.append(frames)
        log.info("registered as worker %d (%s, %d cpus%s) with %s; data at %s; work dir %s",
                 self.worker_id, self.name, self.cpus,
                 "".join(f", {k}={v}" for k, v in self.resources.items()),
                 self.server_address, self.data_address, self.run_dir)

    # ------------------------------------------------------------------ the loop
    def stop(self, reason: str = "stopped") -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    def run(self) -> str:
        now = time.monotonic()
        self._next_heartbeat = now
        self._hb_wall, self._hb_cpu = now, time.process_time()
        for frames in self._early:
            self._on_server_message(frames)
        self._early = []
        try:
            while self._stop_reason is None:
                self._iterate()
        except KeyboardInterrupt:
            self.stop("interrupted")
        return self._stop_reason

    def _iterate(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout(time.monotonic())))
        now = time.monotonic()
        pipes = [fd for fd in events if isinstance(fd, int)]
        if pipes or self.programs.reaping:
            for outcome in self.programs.on_ready(pipes):
                self._task_done(outcome)
        for sock in events:
            if isinstance(sock, int):
                continue
            if sock is self.server:
                self._drain(self.server, self._on_server_message)
            elif sock is self.data:
                self._drain(self.data, self._on_data_message, copy=False)
            elif sock is self.monitor:
                self._on_monitor(now)
            elif sock is self.wake_rx:
                self._drain(self.wake_rx, lambda frames: None)
            elif sock is self.data_peers.monitor:
                self.data_peers.on_monitor(now)
                self._forget_data_peers(now)
            else:
                for event in self.peers.receive(sock):
                    self._on_peer_event(event)
            if self._stop_reason is not None:
                return
        while self._outcomes:
            self._task_done(self._outcomes.popleft())
        self._timers(now)
        self._step(now)

    def _step(self, now: float) -> None:
        """Hand this iteration's events to the state and carry out what it says, until
        nothing more follows (tasks run inline end at once and may make others ready)."""
        events = self._events
        while True:
            self._events = []
            for instruction in self.state.handle(events, now):
                self._carry_out(instruction, now)
            events = self._events
            if not events:
                return

    def _carry_out(self, instruction, now: float) -> None:
        kind = type(instruction)
        if kind is W.Execute:
            spec, inputs, route = instruction.spec, instruction.inputs, instruction.route
            if self.tracer is not None:
                self.tracer.started(spec, route == "inline")
            if route == "program":   # started here, watched by the poller
                failed = self.programs.start(spec, inputs)
                if failed is not None:
                    self._task_done(failed)
            elif route == "pool":
                self.pool.submit(spec, inputs, self.run_dir, self.keep_failed_dirs)
            elif route == "inline":
                self._task_done(run_task(spec, inputs, self.run_dir, self.keep_failed_dirs))
            else:
                self.light_pool.submit(spec, inputs, self.run_dir, self.keep_failed_dirs)
        elif kind is W.SendUpdate:
            self._send_server(P.UPDATE, instruction.body)
        elif kind is W.SendFetch:
            try:
                self.peers.send_fetch(instruction.address, instruction.req, instruction.ids)
            except zmq.ZMQError as exc:
                self._events.append(W.PeerGone(instruction.address, f"cannot send to peer "
                                                                    f"{instruction.address}: {exc}"))
        elif kind is W.Connect:
            try:
                self.peers.ensure(instruction.address, now)
            except ConnectionError as exc:
                self._events.append(W.PeerGone(instruction.address, str(exc)))
        elif kind is W.CloseLink:
            self.peers.close_link(instruction.address)

    def _task_done(self, outcome: Outcome) -> None:
        if self.tracer is not None:
            self.tracer.ended(outcome.task_id, outcome, self.state.queue.running.get(outcome.task_id))
        self._events.append(W.TaskDone(outcome))

    def _poll_timeout(self, now: float) -> int:
        if self._outcomes or self._events:
            return 0
        if self.programs.waiting_for_exit():   # no pidfd: look again soon
            return 1
        deadline = self._next_heartbeat
        held = self.state.hold_deadline()
        if held is not None:
            deadline = min(deadline, held)
        if self._lost_since is not None:
            deadline = min(deadline, self._lost_since + self.server_lost_s)
        return max(0, min(MAX_POLL_MS, int((deadline - now) * 1000) + 1))

    def _drain(self, sock, handle, copy: bool = True) -> None:
        for _ in range(MAX_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            handle(frames)
            if self._stop_reason is not None:
                return

    # ------------------------------------------------------------------ the server
    def _send_server(self, kind: bytes, body: dict) -> None:
        try:
            self.server.send_multipart(P.encode(kind, body), zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not send %s to the server (its queue is full)", kind.decode())

    def _on_server_message(self, frames) -> None:
        try:
            kind, body, _ = P.decode(frames)
            if kind == P.COMPUTE:
                rows = P.field(body, "tasks", list)
                if self.tracer is not None and "jobs" in body:
                    self.tracer.assigned(rows, body["jobs"])
                self._events.append(W.Compute(rows, P.field(body, "locations", dict, {})))
            elif kind == P.TRACE:
                self._on_trace(body)
            elif kind == P.RELEASE_DATA:
                self._events.append(W.ReleaseData(P.ids_from_bytes(P.field(body, "ids", bytes)).tolist()))
            elif kind == P.STOP:
                log.info("the server asked this worker to stop")
                self.stop("stop")
            elif kind == P.PING:
                pass
            elif kind == P.PEER_LOST:   # fetches from a lost worker would wait for timeouts
                self._events.append(W.PeerGone(P.field(body, "address", str), "the server lost that worker"))
            elif kind == P.REFUSED:   # the server no longer knows us (it removed us)
                log.warning("the server dropped this worker (%s); stopping", body.get("reason"))
                self.stop("server lost")
            elif kind == P.ERROR:
                log.warning("the server reported an error: %s", body.get("message"))
            else:
                log.warning("ignored an unexpected %r message from the server", kind[:16])
        except P.ProtocolError as exc:
            log.warning("ignored a malformed message from the server: %s", exc)

    def _on_trace(self, body: dict) -> None:
        """TRACE {path, job, on}: start or stop recording a traced job's tasks."""
        if self.tracer is None:
            if not body.get("on", True):
                return
            from loomctl.trace.hooks import WorkerTracer
            self.tracer = WorkerTracer(self.name, self.worker_id, self.data_address, self.cpus, self.resources)
        self.tracer.on_message(body)
        if not self.tracer:   # no traced job left: no tracing cost from here on
            self.tracer.close()
            self.tracer = None

    def _on_monitor(self, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            except Exception:   # a malformed monitor frame: nothing to learn from it
                return
            if event == zmq.EVENT_DISCONNECTED and self._lost_since is None:
                self._lost_since = now
                log.warning("connection to the server lost; waiting %g s for it to come back",
                            self.server_lost_s)
            elif event in (zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED) \
                    and self._lost_since is not None:
                self._lost_since = None
                log.info("connection to the server is back")

    def _timers(self, now: float) -> None:
        if self.tracer is not None:
            self.tracer.tick(now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
            self._next_heartbeat = now + self.heartbeat_s
        if self._lost_since is not None and now - self._lost_since >= self.server_lost_s:
            log.error("server lost; stopping")
            self.stop("server lost")
        if self.data_peers.suspects:
            self._forget_data_peers(now)
        for address, reason in self.peers.handshakes_expired(now, self.peer_timeout_s):
            self._events.append(W.PeerGone(address, reason))

    def _heartbeat(self, now: float) -> None:
        cpu = time.process_time()
        wall = now - self._hb_wall
        percent = 100.0 * (cpu - self._hb_cpu) / wall if wall > 0 else 0.0
        self._hb_wall, self._hb_cpu = now, cpu
        self._heartbeats += 1
        stats = {**self.state.stats(), "rss": rss(), "cpu_percent": round(percent, 1), "heartbeat": self._heartbeats,
                 "data_connections": len(self.gate.roles) + len(self.gate.pending)}
        self._send_server(P.HEARTBEAT, stats)
        if self.tracer is not None:
            self.tracer.sample(now, stats)

    # ------------------------------------------------------------------ data socket
    def _forget_data_peers(self, now: float) -> None:
        for identity in self.data_peers.poll(now):
            self.gate.forget(identity)

    def _on_data_message(self, frames) -> None:
        self.data_peers.seen(frames[0], time.monotonic())
        for reply in serve_data(self.gate, self.state.objects, [frames[0].bytes, *(f.bytes for f in frames[1:])]):
            try:
                self.data.send_multipart(reply, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:   # gone (EHOSTUNREACH) or not reading (EAGAIN)
                log.info("could not answer a peer on the data socket: %s", exc)

    # ------------------------------------------------------------------ peers
    def _on_peer_event(self, event) -> None:
        if event[0] == "lost":
            self._events.append(W.PeerGone(event[1], event[2]))
        elif event[0] == "ready":
            self._events.append(W.LinkReady(event[1]))
        elif event[0] == "data":
            address, req, found, missing, blobs = event[1:]
            if self.tracer is not None and req in self.state.plan.inflight:
                self.tracer.transfer(address, self.state.plan.inflight[req][2], sum(len(b) for b in blobs), found)
            objects = []
            for blob in blobs:
                try:
                    objects.append(data.decode(blob))
                except (data.MalformedData, data.TaskError) as exc:
                    objects.append(str(exc))
            self._events.append(W.Fetched(address, req, found, missing, objects))

    # ------------------------------------------------------------------ tasks
    def _done(self, outcome: Outcome) -> None:
        """Called in executor threads."""
        self._outcomes.append(outcome)
        with self._wake_lock:
            if self._wake_tx is not None:
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass   # the loop drains the deque on its next iteration anyway

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        for pool in self._pools:
            pool.close()
        if getattr(self, "programs", None) is not None:
            self.programs.kill_all()
        with self._wake_lock:
            if self._wake_tx is not None:
                self._wake_tx.close(0)
                self._wake_tx = None
        if getattr(self, "peers", None) is not None:
            self.peers.close()
        if getattr(self, "monitor", None) is not None:
            try:
                self.server.disable_monitor()
            except zmq.ZMQError:
                pass
        if getattr(self, "data_peers", None) is not None:
            self.data_peers.close()
        for sock in self._sockets:
            sock.close(0)
        if self.context is not None:
            self.context.term()
        self.state.store.clear()
        self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        if getattr(self, "programs", None) is not None:
            self.programs.dirs.remove_spares()
        self.workdir.close(self.keep_failed_dirs)


def run_worker(server_address: str, secret: str | None, cpus: int, work_dir: str | None,
               resources: dict, name: str | None, extensions: list, keep_failed_dirs: bool,
               host: str | None, heartbeat_s: float = 0.5, memory_limit: int | None = None,
               server_lost_s: float = 3.0) -> str:
    """Connect, register and serve until STOP or a lost server; returns why it ended.
    Raises ConnectionError (server unreachable or refusing) and ExtensionError."""
    worker = Worker(server_address, secret, cpus, work_dir, resources, name, extensions,
                    keep_failed_dirs, host, heartbeat_s, memory_limit, server_lost_s)
    try:
        worker.start()
        return worker.run()
    finally:
        worker.close()
