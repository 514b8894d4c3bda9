"""The server process: the zmq shell around the sans-I/O dispatch and core.

Loop: wait for messages -> drain every message already waiting into the Dispatch ->
flush (schedule once, send what comes back). Timers every 0.25 s: probe peers whose
connection closed, retire jobs, remove workers silent for ``heartbeat_timeout``.
This module keeps only sockets, the clock and signals; what a message means is decided
in ``loomctl.server.dispatch``.

Invariants:
- Nothing a peer sends can stop the loop (the Dispatch drops what it cannot use; the
  handshake keeps strangers out entirely).
- The server never carries data objects: it handles ids, sizes and addresses only.
- The secret is written only to the access file (mode 0600) and never logged.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P
from loomctl.access import remove_access, write_access
from loomctl.server.dispatch import Dispatch

log = logging.getLogger("loomctl.server")


def _tracer():
    from loomctl.trace.hooks import ServerTracer
    return ServerTracer()


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
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable peer raises: see _routable
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.peers = PeerConnections()
        self.suspects: dict[bytes, float] = {}   # identity -> probe until (monotonic time)
        self.server_dir = server_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.dispatch = Dispatch(self.secret, {"host": self.host, "port": self.port, "pid": os.getpid(),
                                               "started": time.monotonic()},
                                 trace_dir, tracer_factory=_tracer)
        self.core = self.dispatch.core
        if server_dir:
            write_access(server_dir, self.host, self.port, self.secret)

    @property
    def running(self) -> bool:
        return self.dispatch.running

    @running.setter
    def running(self, value: bool) -> None:
        self.dispatch.running = value

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
                    self.dispatch.tick(now, self.heartbeat_timeout)
                    self._flush(now)
        finally:
            self.close()

    def _drain(self) -> None:
        now = time.monotonic()
        dispatch = self.dispatch
        for _ in range(10000):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            identity = frames[0].bytes
            if not self.peers.known(identity):
                self.peers.connected(identity, frames[0].get(zmq.SRCFD))
            dispatch.message(identity, [f.bytes for f in frames[1:]], now)
        self._flush(now)   # once per drained batch of messages

    def _flush(self, now: float) -> None:
        for identity, frames in self.dispatch.flush(now):
            try:
                self.sock.send_multipart([identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:   # the peer is gone: nothing to do
                log.info("could not send to a peer: %s", exc)

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
        gone = False
        for identity, until in list(self.suspects.items()):
            if not self._routable(identity):
                del self.suspects[identity]
                self.peers.forget(identity)
                self.dispatch.peer_gone(identity, now)
                gone = True
            elif now > until:
                del self.suspects[identity]
        if gone:
            self._flush(now)

    def _routable(self, identity: bytes) -> bool:
        try:
            self.sock.send_multipart([identity, *P.encode(P.PING)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH   # EAGAIN: alive, only busy
        return True

    def close(self) -> None:
        self.dispatch.close()
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


def run_server(**kwargs) -> None:
    server = Server(**kwargs)

    def stop(signum, frame):
        server.running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve()
