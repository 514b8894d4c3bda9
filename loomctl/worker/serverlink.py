"""The worker's link to its server: the DEALER, joining (and joining again), loss.

``ServerLink`` connects and registers at start (blocking, with a timeout), then runs in
the worker's loop without blocking: ``receive`` hands the loop the server's messages,
except those of a join in progress; ``on_monitor`` and ``tick`` follow the connection.

Invariants:
- The DEALER has a fixed routing id, so a short outage of the same server process
  resumes under the same identity; zmq's heartbeats notice a server host that vanished
  without closing the connection.
- While the server is gone the worker runs on; only after ``grace_s`` without it does
  ``tick`` say "server lost" (the worker then stops).
- Joining again: a server that answers REFUSED does not know this worker (it dropped it
  after a silence, or it restarted). ``rejoin`` runs the handshake and REGISTER (with
  what ``register_body()`` says, the data held included) as messages handled by
  ``receive``, never blocking the loop; a refused or unanswered step is tried again
  after JOIN_RETRY_S. Nothing but the join's own messages is sent meanwhile.
"""

from __future__ import annotations

import logging
import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P
from loomctl.frames import send_message
from loomctl.worker.taskqueue import is_int

log = logging.getLogger("loomctl.worker")

JOIN_RETRY_S = 1.0        # a refused or unanswered join is tried again after this


class ServerLink:
    def __init__(self, sock: zmq.Socket, address: str, secret: str | None, register_body, grace_s: float):
        self.sock = sock
        self.address = address
        self.secret = secret
        self.register_body = register_body
        self.grace_s = grace_s
        sock.setsockopt(zmq.ROUTING_ID, b"w" + os.urandom(8))
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.worker_id: int | None = None
        self.joining: str | None = None     # hello, auth, register: joining again
        self.join_sent = 0.0
        self.lost_since: float | None = None
        self.came_back = False              # the connection returned: say something soon
        self.early: list = []               # messages that came before the registration's answer

    # ------------------------------------------------------------------ start
    def connect(self, timeout_s: float) -> None:
        """Connect and authenticate (blocking); ConnectionError when it cannot."""
        self.sock.connect(self.address)
        P.client_handshake(self.sock, "worker", self.secret, timeout_ms=int(timeout_s * 1000))

    def register(self, timeout_s: float) -> int:
        """Register (blocking); the worker id, or ConnectionError."""
        self.sock.send_multipart(P.encode(P.REGISTER, self.register_body()))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000), zmq.POLLIN):
                raise ConnectionError("the server did not answer the worker's registration")
            frames = self.sock.recv_multipart()
            try:
                kind, body, _ = P.decode(frames)
            except P.ProtocolError as exc:
                raise ConnectionError(f"malformed answer to the registration: {exc}") from None
            if kind == P.REPLY and is_int(body.get("worker_id")):
                self.worker_id = body["worker_id"]
                return self.worker_id
            if kind == P.ERROR:
                raise ConnectionError(f"the server refused the registration: {body.get('message')}")
            self.early.append(frames)

    # ------------------------------------------------------------------ the loop
    def send(self, kind: bytes, body: dict) -> None:
        try:
            send_message(self.sock, P.encode(kind, body), dontwait=True)
        except zmq.Again:
            log.warning("could not send %s to the server (its queue is full)", kind.decode())

    def receive(self, frames) -> tuple[bytes, dict, list] | None:
        """(kind, body, blobs) of a server message for the worker, or None (a join's step,
        a malformed message: logged). ProtocolError never escapes."""
        try:
            kind, body, blobs = P.decode(frames)
        except P.ProtocolError as exc:
            log.warning("ignored a malformed message from the server: %s", exc)
            return None
        if self.joining is not None:
            self._join_step(kind, body)
            return None
        return kind, body, blobs

    def rejoin(self, reason: str) -> bool:
        """Start joining again (False if a join is in progress already)."""
        if self.joining is not None:
            return False
        log.warning("the server does not know this worker (%s); joining again", reason)
        self.worker_id = None
        self._join(time.monotonic())
        return True

    def _join(self, now: float) -> None:
        self.joining, self.join_sent = "hello", now
        self.send(P.HELLO, {"role": "worker", "version": P.PROTOCOL_VERSION})

    def _join_step(self, kind: bytes, body: dict) -> None:
        if kind == P.CHALLENGE and self.joining == "hello":
            nonce = body.get("nonce")
            if isinstance(nonce, bytes) and self.secret is not None:
                self.joining = "auth"
                self.send(P.AUTH, {"proof": P.proof(self.secret, nonce, "worker")})
        elif kind == P.WELCOME and self.joining in ("hello", "auth"):
            self.joining = "register"
            self.send(P.REGISTER, self.register_body())
        elif kind == P.REPLY and self.joining == "register" and is_int(body.get("worker_id")):
            self.worker_id = body["worker_id"]
            self.joining = None
            self.came_back = True
            log.info("joined the server again as worker %d", self.worker_id)
        elif kind in (P.REFUSED, P.ERROR):
            log.warning("the server refused this worker's join (%s); trying again",
                        body.get("reason") or body.get("message"))
        # anything else (a PING, a late message of the old session) is dropped

    def on_monitor(self, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            except Exception:   # a malformed monitor frame: nothing to learn from it
                return
            if event == zmq.EVENT_DISCONNECTED and self.lost_since is None:
                self.lost_since = now
                log.warning("connection to the server lost; running on and waiting %g s for it to come back",
                            self.grace_s)
            elif event in (zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED) and self.lost_since is not None:
                self.lost_since = None
                self.came_back = True   # (a server that does not know us says so at once)
                log.info("connection to the server is back")

    def tick(self, now: float) -> str | None:
        """"server lost" once the server has been gone for ``grace_s``; retries a join."""
        if self.lost_since is not None and now - self.lost_since >= self.grace_s:
            log.error("server lost for %g s; stopping", self.grace_s)
            return "server lost"
        if self.joining is not None and now - self.join_sent >= JOIN_RETRY_S:
            self._join(now)
        return None

    def deadline(self) -> float | None:
        return None if self.lost_since is None else self.lost_since + self.grace_s

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
