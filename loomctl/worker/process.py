"""The worker process: one poll loop around a data store, a task queue and executor threads.

The loop (``Worker.run``) polls the server DEALER, the data ROUTER, one DEALER per peer,
the server socket's monitor and an inproc PAIR that executor threads use to wake it. Each
iteration drains what is readable, applies finished task outcomes, starts what the
``TaskQueue`` allows, sends FETCH requests (``FetchPlan``: one per peer, many ids), runs
timers (heartbeat, lost server, transfer timeouts) and sends at most one UPDATE.

Invariants:
- The loop never waits on a task: tasks with cpus > 0 run in a pool of ``max(1, cpus)``
  threads, light tasks of cheap built-ins (const, merge, get, slice, size, length,
  array/make, split, open) run inline, other light tasks (extensions, a run without a
  request, anything with a checkpoint) in a small separate pool. ``TaskQueue`` keeps the
  cpus and named resources of running tasks within the worker's.
- Only the loop thread touches sockets, the store and the queue. Executor threads only
  compute; they hand an ``Outcome`` back through a deque and wake the loop through the
  PAIR (sends serialised by a lock).
- Data is stored before it is reported: an id in an UPDATE's ``finished`` or
  ``replicas`` is in the store when the server reads it.
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
import shutil
import socket
import tempfile
import threading
import time
from collections import deque

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P
from loomctl.worker import data
from loomctl.worker import extensions as registry
from graphfmt import symbols as S
from loomctl.worker.fetch import FetchPlan, PeerLinks
from loomctl.worker.executors import remove_spare_dirs
from loomctl.worker.programs import Programs
from loomctl.worker.running import INLINE_SYMBOLS, Outcome, Pool, Report, run_task
from loomctl.worker.taskqueue import TaskQueue, TaskSpec, is_int

log = logging.getLogger("loomctl.worker")

LIGHT_THREADS = 2
MAX_DRAIN = 1000          # messages read from one socket per iteration
MAX_POLL_MS = 250
# A busy worker (a task running and queued work for all its cpus) sends finish reports
# at most this late, in one UPDATE: the server does a round per message, so fewer and
# fuller messages leave its cpu to the tasks. A worker whose queue runs low, and any
# failure, reports at once (see Worker._may_hold).
REPORT_HOLD_S = 0.020


def split_address(address: str) -> tuple[str, int]:
    """"tcp://host:port" or "host:port" -> (host, port); ValueError when malformed."""
    rest = address[len("tcp://"):] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad server address {address!r} (expected host:port)")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The local IP address this machine uses to reach host:port (a UDP connect sends
    nothing); 127.0.0.1 when it cannot be told."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_ATOMS = (int, float, complex, bool, str, bytes, type(None))


def _cheap_to_encode(obj: data.DataObject) -> bool:
    if type(obj) is data.Plain:
        return True
    if type(obj) is data.PyObj:
        return type(obj.obj) in _ATOMS
    if type(obj) is data.Array:   # (empty items cost bytes too: few of them)
        return len(obj.items) <= 256 and all(_cheap_to_encode(item) for item in obj.items)
    return False


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
        self._work_dir_arg = work_dir

        self.worker_id: int | None = None
        self.data_address: str | None = None
        self.run_dir: str | None = None
        self.store: dict[int, data.DataObject] = {}
        self.sizes: dict[int, int] = {}
        self.data_bytes = 0
        self.queue = TaskQueue(self.cpus, self.resources)
        self.plan = FetchPlan()
        self.report = Report()
        self._report_since: float | None = None   # when the unsent report got its first entry
        self.context: zmq.Context | None = None
        self._sockets: list = []
        self._outcomes: deque = deque()
        self._wake_lock = threading.Lock()
        self._wake_tx = None
        self._pools: list[Pool] = []
        self._early: list = []
        self._stop_reason: str | None = None
        self._lost_since: float | None = None
        self._created_base: str | None = None
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
        port = self.data.bind_to_random_port(f"tcp://{bind_host}")
        self.data_address = f"tcp://{advertised}:{port}"
        self.gate = P.Gatekeeper(self.secret, log=lambda msg: log.warning("data socket: %s", msg))

        self._make_run_dir()
        self._register()

        self.wake_rx = self._socket(zmq.PAIR)
        wake_address = f"inproc://loomctl-worker-wake-{id(self)}"
        self.wake_rx.bind(wake_address)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(wake_address)

        self.poller = zmq.Poller()
        for sock in (self.server, self.data, self.monitor, self.wake_rx):
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

    def _make_run_dir(self) -> None:
        if self._work_dir_arg is None:
            self.run_dir = tempfile.mkdtemp(prefix="loomctl-worker-")
            return
        base = os.path.abspath(self._work_dir_arg)
        if not os.path.isdir(base):
            os.makedirs(base)
            self._created_base = base
        self.run_dir = tempfile.mkdtemp(prefix=f"worker-{os.getpid()}-", dir=base)

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
                self._apply(outcome)
        for sock in events:
            if isinstance(sock, int):
                continue
            if sock is self.server:
                self._drain(self.server, self._on_server_message)
            elif sock is self.data:
                self._drain(self.data, self._on_data_message)
            elif sock is self.monitor:
                self._on_monitor(now)
            elif sock is self.wake_rx:
                self._drain(self.wake_rx, lambda frames: None)
            else:
                for event in self.peers.receive(sock):
                    self._on_peer_event(event)
            if self._stop_reason is not None:
                return
        self._collect_outcomes()
        self._start_tasks()
        self._timers(now)
        self._send_fetches(now)
        self._flush_report(now)

    def _poll_timeout(self, now: float) -> int:
        if self._outcomes:
            return 0
        if self.programs.waiting_for_exit():   # no pidfd: look again soon
            return 1
        deadline = self._next_heartbeat
        if self._report_since is not None:
            deadline = min(deadline, self._report_since + REPORT_HOLD_S)
        if self._lost_since is not None:
            deadline = min(deadline, self._lost_since + self.server_lost_s)
        return max(0, min(MAX_POLL_MS, int((deadline - now) * 1000) + 1))

    def _drain(self, sock, handle) -> None:
        for _ in range(MAX_DRAIN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
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
                self._on_compute(body)
            elif kind == P.TRACE:
                self._on_trace(body)
            elif kind == P.RELEASE_DATA:
                self._release(P.ids_from_bytes(P.field(body, "ids", bytes)).tolist())
            elif kind == P.STOP:
                log.info("the server asked this worker to stop")
                self.stop("stop")
            elif kind == P.PING:
                pass
            elif kind == P.PEER_LOST:   # fetches from a lost worker would wait for timeouts
                address = P.field(body, "address", str)
                if address in self.plan.addresses() or address in self.peers.links:
                    self._give_up(address, "the server lost that worker")
            elif kind == P.REFUSED:   # the server no longer knows us (it removed us)
                log.warning("the server dropped this worker (%s); stopping", body.get("reason"))
                self.stop("server lost")
            elif kind == P.ERROR:
                log.warning("the server reported an error: %s", body.get("message"))
            else:
                log.warning("ignored an unexpected %r message from the server", kind[:16])
        except P.ProtocolError as exc:
            log.warning("ignored a malformed message from the server: %s", exc)

    def _on_compute(self, body: dict) -> None:
        rows = P.field(body, "tasks", list)
        locations = {}
        for key, address in P.field(body, "locations", dict, {}).items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            if is_int(key) and isinstance(address, str):
                locations[key] = address
        specs = []
        for row in rows:
            try:
                specs.append(TaskSpec.from_wire(row))
            except P.ProtocolError as exc:
                log.warning("malformed task in COMPUTE: %s", exc)
                if isinstance(row, (list, tuple)) and row and is_int(row[0]):
                    self._fail(row[0], f"malformed task assignment: {exc}")
        if self.tracer is not None and "jobs" in body:
            self.tracer.assigned(rows, body["jobs"])
        fetch, failed = self.queue.assign(specs, self.store, locations)
        for task_id, message in failed:
            self._fail(task_id, message)
        for input_id, address in fetch:
            self.plan.want(input_id, address)

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

    def _flush_report(self, now: float) -> None:
        if not self.report:
            return
        if self._report_since is None:
            self._report_since = now
        if self._may_hold() and now - self._report_since < REPORT_HOLD_S:
            return
        self._send_server(P.UPDATE, self.report.body())
        self.report = Report()
        self._report_since = None

    def _may_hold(self) -> bool:
        """Finish reports may wait (to go in one UPDATE) while the worker is busy and has
        queued work for all its cpus: holding them delays nobody here, and the server
        handles fewer, larger batches. Failures and the like go at once."""
        return bool(self.queue.running) and len(self.queue.queued) >= max(1, self.cpus) \
            and not self.report.urgent()

    def _timers(self, now: float) -> None:
        if self.tracer is not None:
            self.tracer.tick(now)
        if now >= self._next_heartbeat:
            self._heartbeat(now)
            self._next_heartbeat = now + self.heartbeat_s
        if self._lost_since is not None and now - self._lost_since >= self.server_lost_s:
            log.error("server lost; stopping")
            self.stop("server lost")
        for address, reason in self.peers.handshakes_expired(now, self.peer_timeout_s):
            self._give_up(address, reason)
        for address, ids in self.plan.expired(now, self.fetch_timeout_s):
            self._inputs_unavailable(ids, f"peer {address} did not answer within "
                                          f"{self.fetch_timeout_s:g} s")

    def _heartbeat(self, now: float) -> None:
        cpu = time.process_time()
        wall = now - self._hb_wall
        percent = 100.0 * (cpu - self._hb_cpu) / wall if wall > 0 else 0.0
        self._hb_wall, self._hb_cpu = now, cpu
        stats = {"n_data": len(self.store), "data_bytes": self.data_bytes, "rss": _rss(),
                 "cpu_percent": round(percent, 1), "running": len(self.queue.running)}
        self._send_server(P.HEARTBEAT, stats)
        if self.tracer is not None:
            self.tracer.sample(now, stats)

    # ------------------------------------------------------------------ data socket
    def _on_data_message(self, frames) -> None:
        if len(frames) < 3:
            log.warning("data socket: dropped a message with too few frames")
            return
        identity = frames[0]
        try:
            kind, body, _ = P.decode(frames[1:])
        except P.ProtocolError as exc:
            log.warning("data socket: dropped a malformed message: %s", exc)
            return
        admitted, reply = self.gate.handle(identity, kind, body)
        if reply is not None:
            self.data.send_multipart([identity, *reply], zmq.NOBLOCK)
        if not admitted:
            return
        if kind != P.FETCH:
            log.warning("data socket: dropped an unexpected %r message", kind[:16])
            return
        try:
            req = P.field(body, "req", int)
            ids = P.ids_from_bytes(P.field(body, "ids", bytes)).tolist()
        except P.ProtocolError as exc:
            log.warning("data socket: dropped a malformed FETCH: %s", exc)
            return
        found, missing, blobs = [], [], []
        for i in ids:
            obj = self.store.get(i)
            if obj is None:
                missing.append(i)
                continue
            try:
                blobs.append(data.encode(obj))
                found.append(i)
            except data.TaskError as exc:
                log.warning("cannot send data object %d: %s", i, exc)
                missing.append(i)
        reply = P.encode(P.DATA, {"req": req, "ids": P.ids_to_bytes(found),
                                  "missing": P.ids_to_bytes(missing)}, *blobs)
        try:
            self.data.send_multipart([identity, *reply], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("could not answer a FETCH (the peer's queue is full)")

    # ------------------------------------------------------------------ peers
    def _send_fetches(self, now: float) -> None:
        for address in list(self.plan.pending):
            try:
                self.peers.ensure(address, now)
            except ConnectionError as exc:
                self._give_up(address, str(exc))
        for address, req, ids in self.plan.take(now, self.peers.ready):
            try:
                self.peers.send_fetch(address, req, ids)
            except zmq.ZMQError as exc:
                self._give_up(address, f"cannot send to peer {address}: {exc}")

    def _on_peer_event(self, event) -> None:
        if event[0] == "lost":
            self._give_up(event[1], event[2])
        elif event[0] == "data":
            self._on_fetched(*event[1:])

    def _give_up(self, address: str, reason: str) -> None:
        self.peers.close_link(address)
        log.warning("giving up on fetches from %s: %s", address, reason)
        self._inputs_unavailable(self.plan.give_up(address), reason)

    def _inputs_unavailable(self, ids, reason: str) -> None:
        for task_id, message in self.queue.inputs_unavailable(ids, reason):
            self._fail(task_id, message)

    def _on_fetched(self, address: str, req: int, found: list, missing: list, blobs: list) -> None:
        if self.tracer is not None and req in self.plan.inflight:
            self.tracer.transfer(address, self.plan.inflight[req][2], sum(len(b) for b in blobs), found)
        entry = self.plan.answered(req, address)
        if entry is None:
            log.warning("peer %s answered an unknown or expired request %d", address, req)
            return
        asked = entry[1]
        if len(blobs) != len(found) or not set(found) <= set(asked):
            log.warning("peer %s sent a malformed DATA answer", address)
            self._inputs_unavailable(asked, f"peer {address} sent a malformed answer")
            return
        arrived, bad = [], []
        for task_id, blob in zip(found, blobs):
            try:
                obj = data.decode(blob)
            except (data.MalformedData, data.TaskError) as exc:
                bad.append((task_id, str(exc)))
                continue
            if task_id not in self.store:
                self._store(task_id, obj)
                self.report.replicas.append(task_id)
            arrived.append(task_id)
        self.queue.inputs_arrived(arrived)
        for task_id, why in bad:
            self._inputs_unavailable([task_id], f"peer {address} sent it malformed: {why}")
        absent = sorted(set(asked) - set(found))
        if absent:
            self._inputs_unavailable(absent, f"peer {address} does not hold it")

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

    def _collect_outcomes(self) -> None:
        while self._outcomes:
            self._apply(self._outcomes.popleft())

    def _start_tasks(self) -> None:
        while True:
            specs = self.queue.take_startable()
            if not specs:
                return
            tracer = self.tracer
            for spec in specs:
                if tracer is not None:   # inline: the same rule as the dispatch below
                    tracer.started(spec, spec.light and spec.symbol != S.RUN and spec.symbol in INLINE_SYMBOLS
                                   and not spec.checkpoint)
                inputs = [self.store.get(i) for i in spec.inputs]
                if any(obj is None for obj in inputs):
                    lost = [i for i, obj in zip(spec.inputs, inputs) if obj is None]
                    self._apply(Outcome(spec.id, error=f"input {lost[0]} was released from "
                                                       "this worker before the task started"))
                elif spec.symbol == S.RUN:   # started here, watched by the poller
                    failed = self.programs.start(spec, inputs)
                    if failed is not None:
                        self._apply(failed)
                elif not spec.light:
                    self.pool.submit(spec, inputs, self.run_dir, self.keep_failed_dirs)
                elif spec.symbol in INLINE_SYMBOLS and not spec.checkpoint:
                    self._apply(run_task(spec, inputs, self.run_dir, self.keep_failed_dirs))
                else:
                    self.light_pool.submit(spec, inputs, self.run_dir, self.keep_failed_dirs)

    def _apply(self, outcome: Outcome) -> None:
        task_id = outcome.task_id
        spec = self.queue.running.get(task_id)
        if self.tracer is not None:
            self.tracer.ended(task_id, outcome, spec)
        for level, message in outcome.logs:
            self.report.logs.append([task_id, level, message])
        if outcome.error is not None:
            self._fail(task_id, outcome.error, spec)
            failed = self.queue.finished(task_id, ok=False)
        elif outcome.redirect is not None:
            self.report.redirects.append([task_id, outcome.redirect])
            failed = self.queue.finished(task_id, ok=False)
        else:
            self._store(task_id, outcome.result, outcome.size)
            if spec is not None and spec.inline and self.sizes[task_id] <= P.INLINE_BYTES:
                self._send_along(task_id, outcome.result)
            self.report.finished.append(task_id)
            self.report.sizes.append(outcome.size)
            self.report.lengths.append(outcome.length)
            failed = self.queue.finished(task_id, ok=True)
        for other, message in failed:
            self._fail(other, message)

    def _send_along(self, task_id: int, obj: data.DataObject) -> None:
        """A small result a client waits for goes with the finish report (it stays here
        too). Only objects whose size says what they cost to encode go: bytes, arrays of
        them, Python numbers and strings (a dict's size does not count what it holds; a
        file's path means something on this host only)."""
        if not _cheap_to_encode(obj):
            return
        try:
            blob = data.encode(obj)
        except data.TaskError:
            return
        if len(blob) <= P.INLINE_BYTES:
            self.report.inline.append(task_id)
            self.report.blobs.append(blob)

    def _fail(self, task_id: int, message: str, spec: TaskSpec | None = None) -> None:
        self.report.failed.append([task_id, message])
        what = f" ({spec.symbol}{f', {spec.label}' if spec.label else ''})" if spec else ""
        first = message.strip().splitlines()[0] if message.strip() else "(no message)"
        log.warning("task %d%s failed: %s", task_id, what, first)

    # ------------------------------------------------------------------ store
    def _store(self, task_id: int, obj: data.DataObject, size: int | None = None) -> None:
        if size is None:
            try:
                size = obj.size()
            except data.TaskError:
                size = 0
        self.data_bytes += size - self.sizes.get(task_id, 0)
        self.store[task_id] = obj
        self.sizes[task_id] = size

    def _release(self, ids) -> None:
        for i in ids:
            if self.store.pop(i, None) is not None:
                self.data_bytes -= self.sizes.pop(i, 0)

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
        for sock in self._sockets:
            sock.close(0)
        if self.context is not None:
            self.context.term()
        self.store.clear()
        self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        run_dir = self.run_dir
        if run_dir:
            remove_spare_dirs(run_dir)
        if run_dir and os.path.isdir(run_dir):
            if self.keep_failed_dirs and os.listdir(run_dir):
                log.info("kept the working directory %s (failed tasks' directories)", run_dir)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
        if self._created_base:
            try:
                os.rmdir(self._created_base)
            except OSError:
                pass


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
