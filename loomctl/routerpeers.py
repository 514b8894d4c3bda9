"""Which peers of a zmq ROUTER are still connected (the server's socket, workers' data
sockets).

zmq does not say which routing id a closed connection had; its socket monitor reports
the closed connection's file descriptor. ``RouterPeers`` remembers the descriptor each
routing id was first seen on; when a descriptor closes, its ids become *suspects*, probed
with a PING that zmq refuses to route to a peer that is gone (the ROUTER must have
ROUTER_MANDATORY set). ``poll(now)`` returns the ids found gone, so that their owner
forgets what it kept per connection (handshake state, roles, workers, jobs).

Invariants:
- Every id returned by ``poll`` is forgotten here too; an id is in the tables at most
  once, so what is kept per connection is bounded by the connections alive (plus those
  closed in the last PROBE_S seconds).
- A message whose descriptor cannot be read (its connection is gone already) makes its
  id a suspect at once.
- Descriptors are reused after their connection closed and messages of a closed
  connection may still be queued, so a descriptor may list several ids: each is probed.
"""

from __future__ import annotations

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P

PROBE_S = 2.0   # how long the ids of a closed connection are probed


class RouterPeers:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.fd_of: dict[bytes, int | None] = {}
        self.on_fd: dict[int, set[bytes]] = {}
        self.suspects: dict[bytes, float] = {}   # id -> probe until

    def __len__(self) -> int:
        return len(self.fd_of)

    def seen(self, frame: zmq.Frame, now: float) -> bytes:
        """The routing id of a received message's first frame (remembered with its fd)."""
        identity = frame.bytes
        if identity not in self.fd_of:
            try:
                fd = frame.get(zmq.SRCFD)
            except zmq.ZMQError:   # its connection is gone already (a stranger's bytes)
                fd = None
                self.suspects[identity] = now + PROBE_S
            self.fd_of[identity] = fd
            if fd is not None:
                self.on_fd.setdefault(fd, set()).add(identity)
        return identity

    def on_monitor(self, now: float) -> None:
        """Read the monitor's events: ids of closed connections become suspects."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except Exception:   # a malformed monitor frame: nothing to learn from it
                return
            fd = event.get("value")
            if event.get("event") == zmq.EVENT_DISCONNECTED and isinstance(fd, int):
                for identity in self.on_fd.get(fd, ()):
                    self.suspects[identity] = now + PROBE_S

    def poll(self, now: float) -> list[bytes]:
        """Suspects that zmq can no longer route to (forgotten here); those probed long
        enough without being found gone stop being suspects."""
        gone = []
        for identity, until in list(self.suspects.items()):
            if not self._routable(identity):
                del self.suspects[identity]
                self.forget(identity)
                gone.append(identity)
            elif now > until:
                del self.suspects[identity]
        return gone

    def forget(self, identity: bytes) -> None:
        fd = self.fd_of.pop(identity, None)
        peers = self.on_fd.get(fd)
        if peers is not None:
            peers.discard(identity)
            if not peers:
                del self.on_fd[fd]
        self.suspects.pop(identity, None)

    def _routable(self, identity: bytes) -> bool:
        try:
            self.sock.send_multipart([identity, *P.encode(P.PING)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc.errno != zmq.EHOSTUNREACH   # EAGAIN: alive, only busy
        return True

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
