"""Fetching inputs from other workers: request batching (sans-I/O) and peer links.

``FetchPlan`` decides what to ask whom: ids wanted from an address accumulate until
``take`` turns them into one FETCH per peer (one request per peer per loop iteration,
many ids). ``PeerLinks`` owns one DEALER per peer data address and runs the peer side of
the handshake as a non-blocking state machine driven by the worker's poll loop, so a
slow or dead peer never blocks the loop.

Invariants:
- An id is requested at most once while a request for it is outstanding; every wanted
  id ends in exactly one of: answered (found or missing), or given up (peer refused,
  handshake or reply timed out) — ``take``/``answered``/``give_up``/``expired`` report it.
- ``FetchPlan`` has no sockets and no clock: time is a parameter.
- A peer link is "ready" only after WELCOME; FETCH is never sent before. A link that
  was refused or timed out is closed and forgotten (a later request makes a new one).
- Nothing a peer sends can raise out of ``PeerLinks.receive``: garbage is logged and
  dropped (or fails the request it claims to answer).
"""

from __future__ import annotations

import logging

import zmq

from loomctl import protocol as P

log = logging.getLogger("loomctl.worker")


class FetchPlan:
    def __init__(self):
        self.pending: dict[str, list[int]] = {}                 # address -> ids not yet asked
        self.inflight: dict[int, tuple[str, list[int], float]] = {}   # req -> (address, ids, sent at)
        self._next_req = 1

    def want(self, task_id: int, address: str) -> None:
        self.pending.setdefault(address, []).append(int(task_id))

    def take(self, now: float, can_send=lambda address: True) -> list:
        """One request per address whose link is ready: [(address, req, ids)]."""
        out = []
        for address in [a for a in self.pending if can_send(a)]:
            ids = self.pending.pop(address)
            req = self._next_req
            self._next_req += 1
            self.inflight[req] = (address, ids, now)
            out.append((address, req, ids))
        return out

    def answered(self, req: int, address: str | None = None):
        """The request ``req`` got its answer: returns (address, ids asked) or None for
        an unknown request (or one that ``address`` was not asked)."""
        entry = self.inflight.get(req)
        if entry is None or (address is not None and entry[0] != address):
            return None
        del self.inflight[req]
        return entry[0], entry[1]

    def give_up(self, address: str) -> list[int]:
        """Every id pending or in flight at ``address`` (the peer is unreachable)."""
        ids = self.pending.pop(address, [])
        for req in [r for r, (a, _, _) in self.inflight.items() if a == address]:
            ids.extend(self.inflight.pop(req)[1])
        return ids

    def expired(self, now: float, timeout: float) -> list:
        """Requests without an answer after ``timeout`` seconds: [(address, ids)]."""
        out = []
        for req in [r for r, (_, _, t) in self.inflight.items() if now - t > timeout]:
            address, ids, _ = self.inflight.pop(req)
            out.append((address, ids))
        return out

    def addresses(self) -> set:
        return set(self.pending) | {a for a, _, _ in self.inflight.values()}


class _Link:
    __slots__ = ("address", "sock", "state", "since")

    def __init__(self, address, sock, since):
        self.address = address
        self.sock = sock
        self.state = "hello"     # hello -> (auth) -> ready
        self.since = since


class PeerLinks:
    """DEALER sockets to peers' data sockets (role "peer"), registered in ``poller``."""

    def __init__(self, context: zmq.Context, poller: zmq.Poller, secret: str | None):
        self.context = context
        self.poller = poller
        self.secret = secret
        self.links: dict[str, _Link] = {}
        self.by_socket: dict[zmq.Socket, _Link] = {}

    def ensure(self, address: str, now: float) -> None:
        if address in self.links:
            return
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ConnectionError(f"bad peer address {address!r}: {exc}") from None
        link = _Link(address, sock, now)
        self.links[address] = link
        self.by_socket[sock] = link
        self.poller.register(sock, zmq.POLLIN)
        sock.send_multipart(P.encode(P.HELLO, {"role": "peer", "version": P.PROTOCOL_VERSION}))

    def ready(self, address: str) -> bool:
        link = self.links.get(address)
        return link is not None and link.state == "ready"

    def send_fetch(self, address: str, req: int, ids: list) -> None:
        link = self.links[address]
        link.sock.send_multipart(P.encode(P.FETCH, {"req": req, "ids": P.ids_to_bytes(ids)}))

    def receive(self, sock) -> list:
        """Drain one peer socket. Events: ("ready", address) after WELCOME, ("data",
        address, req, found ids, missing ids, blobs) and ("lost", address, reason)."""
        link = self.by_socket.get(sock)
        if link is None:
            return []
        events = []
        while link.address in self.links:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)   # blobs: no extra copy
            except zmq.Again:
                break
            try:
                kind, body, blobs = P.decode(frames)
                event = self._handle(link, kind, body, blobs)
            except P.ProtocolError as exc:
                log.warning("peer %s sent a malformed message: %s", link.address, exc)
                continue
            if event is not None:
                events.append(event)
        return events

    def _handle(self, link: _Link, kind: bytes, body: dict, blobs: list):
        if link.state != "ready":
            if kind == P.CHALLENGE and link.state == "hello":
                if self.secret is None:
                    return self._lost(link, "the peer requires authentication but this worker "
                                            "has no secret")
                nonce = body.get("nonce")
                if not isinstance(nonce, bytes):
                    raise P.ProtocolError("CHALLENGE without a nonce")
                link.sock.send_multipart(P.encode(P.AUTH, {"proof": P.proof(self.secret, nonce, "peer")}))
                link.state = "auth"
                return None
            if kind == P.WELCOME:
                link.state = "ready"
                return ("ready", link.address)
            if kind == P.REFUSED:
                return self._lost(link, f"the peer refused the connection: {body.get('reason')}")
            raise P.ProtocolError(f"unexpected {kind!r} during the handshake")
        if kind != P.DATA:
            raise P.ProtocolError(f"unexpected {kind!r} on a data link")
        req = P.field(body, "req", int)
        found = P.ids_from_bytes(P.field(body, "ids", bytes)).tolist()
        missing = P.ids_from_bytes(P.field(body, "missing", bytes, b"")).tolist()
        return ("data", link.address, req, found, missing, blobs)

    def _lost(self, link: _Link, reason: str):
        self.close_link(link.address)
        return ("lost", link.address, reason)

    def handshakes_expired(self, now: float, timeout: float) -> list:
        """Links whose handshake did not complete in time: [(address, reason)], closed."""
        out = []
        for link in [k for k in self.links.values() if k.state != "ready"]:
            if now - link.since > timeout:
                self.close_link(link.address)
                out.append((link.address, f"no answer from peer {link.address} within "
                                          f"{timeout:g} s"))
        return out

    def close_link(self, address: str) -> None:
        link = self.links.pop(address, None)
        if link is None:
            return
        self.by_socket.pop(link.sock, None)
        try:
            self.poller.unregister(link.sock)
        except KeyError:
            pass
        link.sock.close(0)

    def close(self) -> None:
        for address in list(self.links):
            self.close_link(address)
