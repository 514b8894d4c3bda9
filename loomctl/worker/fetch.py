"""Moving data between workers: links to other workers' data sockets for fetching
inputs (what to fetch from whom is decided by ``worker.fetchplan`` inside the
WorkerState), and the answers of this worker's data socket (``serve_data``).

``PeerLinks`` owns one DEALER per peer data address and runs the peer side of the
handshake as a non-blocking state machine driven by the worker's poll loop, so a slow
or dead peer never blocks the loop.

Invariants:
- A peer link is "ready" only after WELCOME; FETCH is never sent before. A link that
  was refused or timed out is closed and forgotten (a later request makes a new one); so
  is a ready link silent for SILENT_LINK_S while a FETCH waits on it.
- ``serve_data`` answers only peers that completed the handshake, and only FETCH; an
  object only in a spill file is announced in the answer and streamed from its file
  (``worker.stream``), as the answers a link receives are put together from its chunks.
- Nothing a peer sends can raise out of ``PeerLinks.receive`` or ``serve_data``: garbage is logged and
  dropped (or fails the request it claims to answer).
"""

from __future__ import annotations

import logging
import time

import zmq

from loomctl import protocol as P
from loomctl.worker import data
from loomctl.worker.store import SpillRef
from loomctl.worker.stream import CHUNK, DATA_RCVHWM, STREAM_ABOVE, Assembly

log = logging.getLogger("loomctl.worker")

# A ready link from which nothing came for this long while a FETCH waited is given up (its
# path died under the open connection: the fetch would otherwise wait for its timeout).
# A peer streams large objects in chunks, so a long transfer is never silent that long.
SILENT_LINK_S = 30.0


class _Link:
    __slots__ = ("address", "sock", "state", "since", "assembly", "asked", "heard")

    def __init__(self, address, sock, since):
        self.address = address
        self.sock = sock
        self.state = "hello"     # hello -> (auth) -> ready
        self.since = since
        self.assembly = Assembly()
        self.asked = 0           # FETCHes sent and not answered whole yet
        self.heard = since       # (monotonic) when the peer last sent something, or the first of them went


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
        sock.setsockopt(zmq.RCVHWM, DATA_RCVHWM)   # chunks wait at the sender (TCP holds them back)
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
        if not link.asked:   # (the peer's silence counts from here)
            link.heard = time.monotonic()
        link.asked += 1

    def receive(self, sock) -> list:
        """Drain one peer socket. Events: ("ready", address) after WELCOME, ("data",
        address, req, found ids, missing ids, frames per object) and ("lost", address,
        reason)."""
        link = self.by_socket.get(sock)
        if link is None:
            return []
        events = []
        while link.address in self.links:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)   # blobs: no extra copy
            except zmq.Again:
                break
            link.heard = time.monotonic()
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
        if kind == P.PING:   # the peer probes whether a connection is alive (routerpeers): nothing to do
            return None
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
        if kind == P.DATA:
            answer = link.assembly.data(body, blobs)
        elif kind == CHUNK:
            answer = link.assembly.chunk(body, blobs)
        else:
            raise P.ProtocolError(f"unexpected {kind!r} on a data link")
        if answer is None:
            return None
        link.asked = max(0, link.asked - 1)
        return ("data", link.address, *answer)

    def _lost(self, link: _Link, reason: str):
        self.close_link(link.address)
        return ("lost", link.address, reason)

    def expired(self, now: float, timeout: float, silence: float = SILENT_LINK_S) -> list:
        """Links whose handshake did not complete within ``timeout``, and ready links from
        which nothing came for ``silence`` while a fetch waited (a path that died under an
        open connection): [(address, reason)], closed."""
        out = []
        for link in list(self.links.values()):
            if link.state != "ready" and now - link.since > timeout:
                out.append((link.address, f"no answer from peer {link.address} within {timeout:g} s"))
            elif link.state == "ready" and link.asked and now - link.heard > silence:
                out.append((link.address, f"peer {link.address} sent nothing for {silence:g} s while a fetch "
                                          "waited"))
            else:
                continue
            self.close_link(link.address)
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


def decode_objects(parts: list) -> list:
    """The data object of each object's parts of an answer, or a message saying why not."""
    objects = []
    for frames in parts:
        if isinstance(frames, str):   # (the peer could not send it)
            objects.append(frames)
            continue
        try:
            objects.append(data.decode_parts(frames))
        except (data.MalformedData, data.TaskError) as exc:
            objects.append(str(exc))
    return objects


def serve_data(gate: P.Gatekeeper, objects, frames: list) -> tuple[list, list]:
    """The replies (with the routing id) to one message on the data socket: the
    handshake's, or the DATA answer of a FETCH (``objects(ids)`` -> found ids, their
    objects, missing ids); and the streams to send after it: [(routing id, req, id,
    bytes, parts)] of the objects only in spill files (parts None) and of those in
    memory larger than STREAM_ABOVE (their encoded parts)."""
    if len(frames) < 3:
        log.warning("data socket: dropped a message with too few frames")
        return [], []
    identity = frames[0]
    try:
        kind, body, _ = P.decode(frames[1:])
    except P.ProtocolError as exc:
        log.warning("data socket: dropped a malformed message: %s", exc)
        return [], []
    admitted, reply = gate.handle(identity, kind, body)
    replies = [[identity, *reply]] if reply is not None else []
    if not admitted:
        return replies, []
    if kind != P.FETCH:
        log.warning("data socket: dropped an unexpected %r message", kind[:16])
        return replies, []
    try:
        req = P.field(body, "req", int)
        ids = P.ids_from_bytes(P.field(body, "ids", bytes)).tolist()
    except P.ProtocolError as exc:
        log.warning("data socket: dropped a malformed FETCH: %s", exc)
        return replies, []
    held, found_objects, missing = objects(ids)
    found, blobs, counts, streams = [], [], [], []
    sources = {}
    for i, obj in zip(held, found_objects):
        if type(obj) is SpillRef:
            streams.append([i, obj.nbytes])
            continue
        try:
            parts = data.encode_parts(obj)   # (contents by reference: sent without a copy)
        except data.TaskError as exc:
            log.warning("cannot send data object %d: %s", i, exc)
            missing.append(i)
            continue
        size = data.encoded_size(parts)
        if size > STREAM_ABOVE:   # in chunks from memory: the receiver sees progress
            streams.append([i, size])
            sources[i] = parts
            continue
        found.append(i)
        blobs += parts
        counts.append(len(parts))
    body = {"req": req, "ids": P.ids_to_bytes(found), "parts": counts, "missing": P.ids_to_bytes(missing)}
    if streams:
        body["streams"] = streams
    return [*replies, [identity, *P.encode(P.DATA, body, *blobs)]], \
        [(identity, req, i, n, sources.get(i)) for i, n in streams]
