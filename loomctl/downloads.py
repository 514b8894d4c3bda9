"""A client's links to workers, to download results from them (FETCH, answered by DATA
and, for objects held in spill files, CHUNKs).

Invariants:
- One DEALER per worker address, with a monitor: a connection the worker refuses or
  closes means the worker process is gone, and the download ends at once with
  WorkerGone (it does not wait out the timeout); so does a connection that is not made
  within CONNECT_TIMEOUT_MS (the worker's host cannot be reached from here, though the
  server may reach it: a one-way partition costs seconds per attempt, not the timeout).
  A worker that does not answer at all ends it with WorkerGone after ``timeout_ms`` of
  silence (a large object streamed in chunks may take longer in all); zmq heartbeats,
  answered by the worker's I/O thread however busy it is, drop a connection whose
  peer vanished after 3 s.
- While it waits, a download calls ``moved()`` every 0.25 s; when that is true (the
  server announced the data elsewhere meanwhile) it ends and returns None.
- A link that failed is closed and forgotten; the next download opens a new one.
"""

from __future__ import annotations

import time
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from loomctl import protocol as P
from loomctl.worker.stream import CHUNK, DATA_RCVHWM, Assembly

SLICE_MS = 250
CONNECT_TIMEOUT_MS = 3000   # (TCP retries a lost SYN after 1 s and 3 s: two tries)
_GONE_EVENTS = zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED


class _Link:
    __slots__ = ("sock", "monitor", "poller", "connected")

    def __init__(self, sock: zmq.Socket, monitor: zmq.Socket):
        self.sock, self.monitor, self.connected = sock, monitor, False
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)


class WorkerGone(Exception):
    """A worker could not be reached or did not answer; the text says why."""


class WorkerLinks:
    def __init__(self, ctx: zmq.Context, secret: str | None, timeout_ms: int):
        self.ctx, self.secret, self.timeout_ms = ctx, secret, timeout_ms
        self.links: dict[str, _Link] = {}
        self.req = 0

    def __len__(self) -> int:
        return len(self.links)

    def download(self, address: str, ids: list[int], moved: Callable[[], bool]):
        """(found ids, missing ids, parts of the found ones: frames or an error text), or
        None when ``moved()`` turned true first. WorkerGone when the worker is gone or
        silent; P.ProtocolError for an answer that makes no sense."""
        try:
            link = self._link(address)
            sock = link.sock
            self.req += 1
            req = self.req
            sock.send_multipart(P.encode(P.FETCH, {"req": req, "ids": P.ids_to_bytes(ids)}))
            assembly = Assembly()
            deadline = time.monotonic() + self.timeout_ms / 1000
            while True:
                if not self._ready(link, SLICE_MS):
                    if moved():
                        return None
                    if time.monotonic() >= deadline:
                        raise WorkerGone(f"did not send the data of tasks {ids} within {self.timeout_ms / 1000:g} s")
                    continue
                kind, body, blobs = P.decode(sock.recv_multipart(copy=False))
                deadline = time.monotonic() + self.timeout_ms / 1000   # (silence counts, not the whole transfer)
                if body.get("req") == req and kind in (P.DATA, CHUNK):
                    answer = (assembly.data if kind == P.DATA else assembly.chunk)(body, blobs)
                    if answer is not None:
                        return answer[1:]
        except (WorkerGone, P.ProtocolError) as exc:
            self.drop(address)
            what = f"sent a malformed answer ({exc})" if isinstance(exc, P.ProtocolError) else str(exc)
            raise WorkerGone(f"the worker at {address} {what}") from None

    def _link(self, address: str) -> _Link:
        link = self.links.get(address)
        if link is not None:
            return link
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # a worker's chunks wait in its own queue (TCP holds them back), not in ours
        sock.setsockopt(zmq.RCVHWM, DATA_RCVHWM)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
        monitor = sock.get_monitor_socket(_GONE_EVENTS | zmq.EVENT_CONNECTED)
        self.links[address] = link = _Link(sock, monitor)
        sock.connect(address)
        try:
            P.client_handshake(sock, "client", self.secret, self.timeout_ms, ready=lambda ms: self._ready(link, ms))
        except ConnectionError as exc:
            raise WorkerGone(f"could not be reached: {exc}") from None
        return link

    def _ready(self, link: _Link, timeout_ms: int) -> bool:
        """Whether a message waits on the link's socket (within timeout_ms); WorkerGone as
        soon as its monitor tells that the connection was refused, not made or closed."""
        sock, monitor = link.sock, link.monitor
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            ready = dict(link.poller.poll(timeout_ms))
            if sock in ready:
                return True
            if monitor not in ready:
                return False
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
                except zmq.Again:
                    break
                except Exception:   # a malformed monitor frame: nothing to learn from it
                    break
                if event == zmq.EVENT_CONNECTED:   # (and the wait goes on)
                    link.connected = True
                elif event & _GONE_EVENTS:
                    raise WorkerGone("is gone (it closed its connection)" if link.connected else
                                     f"could not be reached (refused, or no answer within {CONNECT_TIMEOUT_MS / 1000:g} s)")
            timeout_ms = max(0, int((deadline - time.monotonic()) * 1000))

    def drop(self, address: str) -> None:
        link = self.links.pop(address, None)
        if link is None:
            return
        sock, monitor = link.sock, link.monitor
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
        sock.close(0)

    def close(self) -> None:
        for address in list(self.links):
            self.drop(address)
