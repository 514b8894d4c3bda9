"""Objects that are sent from their spill files in chunks, and DATA answers put together
again from those chunks.

A FETCH of an object that is only in a spill file is answered by ``DATA`` listing it in
``streams: [[id, nbytes]]``, then one ``CHUNK {req, id, offset}`` message per piece of
the file (at most CHUNK_BYTES each, in order), or a ``CHUNK {req, id, error}`` when the
file cannot be read. The file's bytes are the object's wire encoding, so the chunks
decode like any parts (``data.decode_parts``).

Invariants:
- The sender (``Streams``, in the worker's loop) never reads a file whole: at most
  WINDOW chunks of one stream are read and not yet taken by zmq (MessageTrackers);
  the streams to one peer go one after another. A gone peer ends its streams.
- The receiver (``Assembly``) returns an answer once every object of it arrived
  whole, with the parts of each object (or an error message for an object that failed);
  a chunk that does not follow the one before, or more bytes than announced, fails
  that object. Nothing a peer sends raises out of it but ProtocolError.
"""

from __future__ import annotations

import logging
import os
from collections import deque

import zmq

from loomctl import protocol as P
from loomctl.worker import data

log = logging.getLogger("loomctl.worker")

CHUNK = b"CHUNK"
CHUNK_BYTES = 1 << 20
WINDOW = 8
MAX_STREAM = 1 << 44   # a declared size beyond this is malformed


class _Stream:
    __slots__ = ("identity", "req", "id", "size", "fd", "offset", "inflight")

    def __init__(self, identity, req, task_id, size, fd):
        self.identity, self.req, self.id, self.size, self.fd = identity, req, task_id, size, fd
        self.offset = 0
        self.inflight: deque = deque()


class Streams:
    """The sending side: ``start`` a stream, ``pump`` every loop iteration."""

    def __init__(self, sock, open_file):
        self.sock = sock
        self.open_file = open_file          # task id -> fd (OSError when gone)
        self.queues: dict[bytes, deque] = {}
        self.sent_bytes = 0

    def __bool__(self) -> bool:
        return bool(self.queues)

    def start(self, identity: bytes, req: int, task_id: int, size: int) -> None:
        try:
            fd = self.open_file(task_id)
        except OSError as exc:
            self._send_error(identity, req, task_id, f"cannot open its spill file: {exc.strerror}")
            return
        self.queues.setdefault(identity, deque()).append(_Stream(identity, req, task_id, size, fd))

    def pump(self) -> None:
        for identity in list(self.queues):
            queue = self.queues[identity]
            while queue and self._advance(queue[0]):
                queue.popleft()
            if not queue:
                del self.queues[identity]

    def _advance(self, s: _Stream) -> bool:
        """Send what the window allows; True when the stream is done with."""
        while s.inflight and s.inflight[0].done:
            s.inflight.popleft()
        while s.fd is not None and len(s.inflight) < WINDOW:
            n = min(CHUNK_BYTES, s.size - s.offset)
            try:
                chunk = os.pread(s.fd, n, s.offset) if n else b""
                if len(chunk) != n:
                    raise OSError(0, "the file is shorter than announced")
            except OSError as exc:
                self._close(s)
                self._send_error(s.identity, s.req, s.id, f"cannot read its spill file: {exc.strerror}")
                return True
            try:
                tracker = self.sock.send_multipart(
                    [s.identity, CHUNK, P.encode(CHUNK, {"req": s.req, "id": s.id, "offset": s.offset})[1], chunk],
                    zmq.NOBLOCK, copy=False, track=True)
            except zmq.ZMQError as exc:   # the peer is gone: so are its streams
                log.info("stopped sending data object %d to a peer: %s", s.id, exc)
                for other in self.queues.get(s.identity, ()):
                    self._close(other)
                self.queues[s.identity] = deque()
                return True
            s.inflight.append(tracker)
            s.offset += n
            self.sent_bytes += n
            if s.offset >= s.size:
                self._close(s)
        return s.fd is None

    def _send_error(self, identity, req, task_id, message) -> None:
        try:
            self.sock.send_multipart([identity, *P.encode(CHUNK, {"req": req, "id": task_id, "error": message})],
                                     zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    @staticmethod
    def _close(s: _Stream) -> None:
        if s.fd is not None:
            os.close(s.fd)
            s.fd = None

    def close(self) -> None:
        for queue in self.queues.values():
            for s in queue:
                self._close(s)
        self.queues.clear()


class _Answer:
    __slots__ = ("found", "missing", "parts", "streams", "waiting")

    def __init__(self, found, missing, parts, streams):
        self.found, self.missing, self.parts = found, missing, parts
        self.streams = {i: [n, [], 0] for i, n in streams}   # id -> [size, chunks, bytes so far]
        self.waiting = {i for i, n in streams}


class Assembly:
    """The receiving side, for one connection: ``data`` and ``chunk`` take DATA and CHUNK
    messages; each returns None, or a whole answer (req, found ids, missing ids, parts
    per found object: a list of frames, or an error message)."""

    def __init__(self):
        self.pending: dict[int, _Answer] = {}

    def data(self, body: dict, blobs: list):
        req = P.field(body, "req", int)
        found = P.ids_from_bytes(P.field(body, "ids", bytes)).tolist()
        missing = P.ids_from_bytes(P.field(body, "missing", bytes, b"")).tolist()
        try:
            parts = data.data_parts(blobs, body.get("parts")) if found or blobs else []
        except data.MalformedData as exc:
            raise P.ProtocolError(str(exc)) from None
        if len(parts) != len(found):
            raise P.ProtocolError("a DATA answer's parts do not match its ids")
        streams = P.field(body, "streams", list, [])
        if not all(isinstance(x, list) and len(x) == 2 and type(x[0]) is int and type(x[1]) is int
                   and 0 < x[1] <= MAX_STREAM for x in streams):
            raise P.ProtocolError("malformed streams of a DATA answer")
        if not streams:
            return req, found, missing, parts
        self.pending[req] = _Answer(found, missing, parts, [tuple(x) for x in streams])
        return None

    def chunk(self, body: dict, blobs: list):
        req = P.field(body, "req", int)
        answer = self.pending.get(req)
        task_id = body.get("id")
        if answer is None or task_id not in answer.waiting:
            raise P.ProtocolError("a CHUNK of no stream under way")
        entry = answer.streams[task_id]
        if "error" in body:
            entry[1] = str(body["error"])[:500]
        elif body.get("offset") != entry[2] or len(blobs) != 1 or entry[2] + len(blobs[0]) > entry[0]:
            entry[1] = "its chunks arrived malformed"
        else:
            entry[1].append(blobs[0])
            entry[2] += len(blobs[0])
            if entry[2] < entry[0]:
                return None
        answer.waiting.discard(task_id)
        if answer.waiting:
            return None
        del self.pending[req]
        ids = list(answer.streams)
        return (req, answer.found + ids, answer.missing,
                answer.parts + [answer.streams[i][1] for i in ids])

    def forget(self, req: int) -> None:
        self.pending.pop(req, None)


def decode(part):
    """A data object from one object's parts, or the error message it came with."""
    return part if isinstance(part, str) else data.decode_parts(part)
