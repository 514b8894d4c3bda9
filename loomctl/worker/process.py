"""The worker process: one poll loop around the sans-I/O WorkerState, executor threads and programs.

The loop (``Worker.run``) polls the server DEALER, the data ROUTER, one DEALER per peer,
the server socket's monitor and an inproc PAIR that executor threads use to wake it.
Each iteration turns what is readable into events (messages, peer answers, ended
programs and tasks, the clock), hands them to ``WorkerState.handle`` in one batch and
carries out the instructions that come back: start tasks (inline built-ins run within
the state's step, ``_run_inline``; programs watched by the poller, cpu tasks in a pool
of ``max(1, cpus)`` threads, other light tasks in a small pool), send the UPDATE,
connect to peers and send FETCHes, and the spill files' I/O (a thread,
``worker.spill``; objects only in files are streamed to peers from them,
``worker.stream``). What the worker decides is in ``worker.state``; this module keeps
the sockets, threads, programs, files and the clock.

Invariants:
- The loop never waits on a task or a spill file, and only the loop thread touches
  sockets and the WorkerState. Executor and spill threads hand an ``Outcome`` or a
  spill answer back through a deque and wake the loop through the PAIR (sends
  serialised by a lock). With a memory limit the state gets the RSS at least every
  MEMORY_SAMPLE_S while the loop runs.
- Every message from the network is checked; a malformed or unauthenticated one is
  logged and dropped, never raised out of the loop. A task failure is a report, never a
  crash. The secret is never logged.
- The server is gone for a while, or does not know this worker any more: the worker runs
  on and joins again (``worker.serverlink``); only after ``server_grace_s``
  (SERVER_GRACE_S by default) without its server does it stop, with "server lost".
  Joining again forgets the tasks only queued here (the server placed them again) and
  says which data objects the worker holds.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque

import zmq

from loomctl import gcpolicy, protocol as P
from loomctl.frames import recv_message
from loomctl.worker import extensions as registry
from loomctl.routerpeers import RouterPeers
from loomctl.worker import state as W
from loomctl.worker.fetch import PeerLinks, decode_objects, serve_data
from loomctl.worker.outcome import Outcome
from loomctl.worker.programs import Programs
from loomctl.worker.running import Pool, run_inline
from loomctl.worker.serverlink import ServerLink
from loomctl.worker.hostinfo import local_address_towards, rss, split_address
from loomctl.worker.spill import SpillFiles, SpillThread
from loomctl.worker.stream import Streams
from loomctl.worker.workdir import WorkDir

log = logging.getLogger("loomctl.worker")

LIGHT_THREADS = 2
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
MAX_DRAIN = 1000          # messages read from one socket per iteration
ID_EVENTS = {P.CANCEL_TASKS: W.CancelTasks, P.RELEASE_DATA: W.ReleaseData, P.STEAL_TASKS: W.StealTasks}
MAX_POLL_MS = 250
SERVER_GRACE_S = 300.0    # how long a worker waits for its server to come back
MEMORY_SAMPLE_S = 0.01
_SPILL_IO = (W.SpillWrite, W.SpillRead, W.SpillRemove)


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
                 server_grace_s: float = SERVER_GRACE_S, connect_timeout_s: float = 10.0,
                 peer_timeout_s: float = 10.0, fetch_timeout_s: float = 120.0,
                 spill_at: float = W.DEFAULT_SPILL_AT, pause_at: float = W.DEFAULT_PAUSE_AT):
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
        self.server_grace_s = server_grace_s
        self.connect_timeout_s = connect_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.fetch_timeout_s = fetch_timeout_s
        self.workdir = WorkDir(work_dir)

        self.worker_id: int | None = None
        self.data_address: str | None = None
        self.run_dir: str | None = None
        self.state = W.WorkerState(self.cpus, self.resources, fetch_timeout_s, memory_limit, spill_at, pause_at,
                                   run_inline=self._run_inline)
        self._sampled = 0.0
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
        self.link = ServerLink(self.server, self.server_address, self.secret, self._register_body,
                               self.server_grace_s)
        self.monitor = self.link.monitor
        self.link.connect(self.connect_timeout_s)

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
        self.spill_files = SpillFiles(os.path.join(self.run_dir, "spill"))
        self.spiller = SpillThread(self.spill_files, self._done)
        self.streams = Streams(self.data, self.spill_files.open)
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
        self.programs = Programs(self.poller, self.run_dir, self.keep_failed_dirs, self.memory_limit)

    def _socket(self, kind):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # no high-water mark: a report, an assignment or an answer is queued, never dropped
        # (at zmq's default of 1,000 queued messages a non-blocking send fails)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self._sockets.append(sock)
        return sock

    def _register_body(self) -> dict:
        held = sorted(self.state.store)
        body = {"name": self.name, "hostname": self.hostname, "pid": os.getpid(),
                "cpus": self.cpus, "resources": self.resources,
                "symbols": sorted(registry.supported_symbols()),
                "data_address": self.data_address, "work_dir": self.run_dir,
                "held": P.ids_to_bytes(held), "held_sizes": P.ids_to_bytes([self.state.sizes[t] for t in held]),
                "held_lengths": P.ids_to_bytes([self.state.store.lengths[t] for t in held])}
        if self.memory_limit is not None:
            body["memory_limit"] = int(self.memory_limit)
        return body

    def _register(self) -> None:
        self.worker_id = self.link.register(self.connect_timeout_s)
        self._early = self.link.early
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
        gcpolicy.tune()
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
        for sock in (sock for sock in events if not isinstance(sock, int)):
            if sock is self.server:
                self._drain(self.server, self._on_server_message)
            elif sock is self.data:
                self._drain(self.data, self._on_data_message, copied=range(0))
            elif sock is self.monitor:
                self.link.on_monitor(now)
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
            item = self._outcomes.popleft()
            if type(item) is Outcome:
                self._task_done(item)
            else:   # a spill thread's answer
                self._events.append(item)
        self._timers(now)
        if self.memory_limit is not None and now - self._sampled >= MEMORY_SAMPLE_S:
            self._sampled = now
            self._events.append(W.MemorySample(rss()))
        self._step(now)
        if self.streams:
            self.streams.pump()

    def _step(self, now: float) -> None:
        """Hand this iteration's events to the state, carry out what it says, until no more follow."""
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
                self.tracer.started(spec)
            if route == "program":   # started here, watched by the poller
                failed = self.programs.start(spec, inputs)
                if failed is not None:
                    self._task_done(failed)
            elif route == "pool":
                self.pool.submit(spec, inputs, self.run_dir, self.keep_failed_dirs)
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
        elif kind in _SPILL_IO:
            self.spiller.submit(instruction)
        elif kind is W.Kill:   # (a Python task runs to its end; its result is discarded)
            self.programs.kill(instruction.task_id)

    def _run_inline(self, spec, inputs) -> Outcome:
        """An inline built-in, run within the state's step (WorkerState.run_inline)."""
        outcome = run_inline(spec, inputs, timed=self.tracer is not None)
        if self.tracer is not None:
            self.tracer.ended(spec.id, outcome, spec)
        return outcome

    def _task_done(self, outcome: Outcome) -> None:
        if self.tracer is not None:
            self.tracer.ended(outcome.task_id, outcome, self.state.queue.running.get(outcome.task_id))
        self._events.append(W.TaskDone(outcome))

    def _poll_timeout(self, now: float) -> int:
        if self._outcomes or self._events:
            return 0
        if self.programs.waiting_for_exit() or self.streams:   # no pidfd, or a stream to pace: soon
            return 1
        deadline = self._next_heartbeat
        held = self.state.hold_deadline()
        if held is not None:
            deadline = min(deadline, held)
        lost = self.link.deadline()
        if lost is not None:
            deadline = min(deadline, lost)
        return max(0, min(MAX_POLL_MS, int((deadline - now) * 1000) + 1))

    def _drain(self, sock, handle, copied: range = range(2)) -> None:
        for _ in range(MAX_DRAIN):   # (frames past ``copied``: zmq Frames, see loomctl.frames)
            if not sock.getsockopt(_EVENTS) & _POLLIN:   # (cheaper than ending on a zmq.Again)
                return
            try:
                frames = recv_message(sock, copied)
            except zmq.Again:
                return
            handle(frames)
            if self._stop_reason is not None:
                return

    # ------------------------------------------------------------------ the server
    def _send_server(self, kind: bytes, body: dict) -> None:
        if self.link.joining is None:   # (while joining, what it holds goes with REGISTER)
            self.link.send(kind, body)

    def _on_server_message(self, frames) -> None:
        message = self.link.receive(frames)
        if message is None:
            return
        kind, body, blobs = message
        try:
            if kind == P.COMPUTE:
                rows = P.compute_rows(body, blobs)
                if self.tracer is not None and "jobs" in body:
                    self.tracer.assigned(rows, body["jobs"])
                self._events.append(W.Compute(rows, P.field(body, "locations", dict, {})))
            elif kind == P.TRACE:
                self._on_trace(body)
            elif kind in ID_EVENTS:   # CANCEL_TASKS, RELEASE_DATA, STEAL_TASKS
                self._events.append(ID_EVENTS[kind](*P.decode_ids_command(kind, body)))
            elif kind == P.STOP:
                log.info("the server asked this worker to stop")
                self.stop("stop")
            elif kind == P.PEERS:   # linked now, before a fetch waits for the handshake
                self._events.append(W.PeersKnown(P.field(body, "addresses", list)))
            elif kind == P.PEER_LOST:   # fetches from a lost worker would wait for timeouts
                self._events.append(W.PeerGone(P.field(body, "address", str), "the server lost that worker"))
            elif kind == P.REFUSED:   # the server no longer knows us (it dropped us, or it restarted)
                if self.link.rejoin(str(body.get("reason"))):
                    dropped = self.state.forget_queued()
                    log.info("forgot %d queued tasks; joining with %d data objects", len(dropped),
                             len(self.state.store))
            elif kind == P.ERROR:
                log.warning("the server reported an error: %s", body.get("message"))
            elif kind != P.PING:
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

    def _timers(self, now: float) -> None:
        if self.tracer is not None:
            self.tracer.tick(now)
        if self.link.came_back:   # (a server that does not know this worker says so at once)
            self.link.came_back = False
            self._next_heartbeat = now
        if now >= self._next_heartbeat and self.link.joining is None:
            self._heartbeat(now)
            self._next_heartbeat = now + self.heartbeat_s
        stop = self.link.tick(now)
        if stop:
            self.stop(stop)
        if self.data_peers.suspects:
            self._forget_data_peers(now)
        for address, reason in self.peers.expired(now, self.peer_timeout_s):
            self._events.append(W.PeerGone(address, reason))

    def _heartbeat(self, now: float) -> None:
        cpu = time.process_time()
        wall = now - self._hb_wall
        percent = 100.0 * (cpu - self._hb_cpu) / wall if wall > 0 else 0.0
        self._hb_wall, self._hb_cpu = now, cpu
        self._heartbeats += 1
        stats = {**self.state.stats(), "rss": rss(), "cpu_percent": round(percent, 1), "heartbeat": self._heartbeats,
                 "data_connections": len(self.gate.roles) + len(self.gate.pending),
                 "streamed_bytes": self.streams.sent_bytes}
        self._send_server(P.HEARTBEAT, stats)
        if self.tracer is not None:
            self.tracer.sample(now, stats)

    # ------------------------------------------------------------------ data socket
    def _forget_data_peers(self, now: float) -> None:
        for identity in self.data_peers.poll(now):
            self.gate.forget(identity)

    def _on_data_message(self, frames) -> None:
        self.data_peers.seen(frames[0], time.monotonic())
        replies, streams = serve_data(self.gate, self.state.objects,
                                      [frames[0].bytes, *(f.bytes for f in frames[1:])])
        for reply in replies:
            try:
                self.data.send_multipart(reply, zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:   # gone (EHOSTUNREACH) or not reading (EAGAIN)
                log.info("could not answer a peer on the data socket: %s", exc)
                return
        for stream in streams:
            self.streams.start(*stream)

    # ------------------------------------------------------------------ peers
    def _on_peer_event(self, event) -> None:
        if event[0] == "lost":
            self._events.append(W.PeerGone(event[1], event[2]))
        elif event[0] == "ready":
            self._events.append(W.LinkReady(event[1]))
        elif event[0] == "data":
            address, req, found, missing, parts = event[1:]
            if self.tracer is not None and req in self.state.plan.inflight:
                self.tracer.transfer(address, self.state.plan.inflight[req][2],
                                     sum(len(b) for p in parts for b in p), found)
            self._events.append(W.Fetched(address, req, found, missing, decode_objects(parts)))

    # ------------------------------------------------------------------ tasks
    def _done(self, outcome) -> None:
        """Called in executor and spill threads: an Outcome, or a spill event."""
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
        if getattr(self, "spiller", None) is not None:
            self.spiller.close()
            self.streams.close()
        if getattr(self, "programs", None) is not None:
            self.programs.kill_all()
        with self._wake_lock:
            if self._wake_tx is not None:
                self._wake_tx.close(0)
                self._wake_tx = None
        if getattr(self, "peers", None) is not None:
            self.peers.close()
        if getattr(self, "link", None) is not None:
            self.link.close()
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
               server_grace_s: float = SERVER_GRACE_S) -> str:
    """Connect, register and serve until STOP or a lost server; returns why it ended.
    Raises ConnectionError (server unreachable or refusing) and ExtensionError."""
    worker = Worker(server_address, secret, cpus, work_dir, resources, name, extensions,
                    keep_failed_dirs, host, heartbeat_s, memory_limit, server_grace_s)
    try:
        worker.start()
        return worker.run()
    finally:
        worker.close()
