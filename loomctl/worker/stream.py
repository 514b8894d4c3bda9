"""Objects that are sent in chunks (from their spill files, or from memory when larger
than STREAM_ABOVE), and DATA answers put together again from those chunks.

A FETCH of such an object is answered by ``DATA`` listing it in ``streams: [[id,
nbytes]]``, then one ``CHUNK {req, id, offset}`` message per piece of its wire encoding
(at most CHUNK_BYTES read from a file, or MEMORY_CHUNK_BYTES sliced from one part in
memory, in order), or a ``CHUNK {req, id, error}`` when the file cannot be read. The
chunks decode like any parts (``data.decode_parts``). Progress is visible: a receiver
waits for the next chunk, not for one message of gigabytes.

Invariants:
- The sender (``Streams``, in the worker's loop) never reads a file whole: at most
  WINDOW chunks of one stream are read and not yet taken by zmq (MessageTrackers);
  the streams to one peer go one after another. A gone peer ends its streams.
- A receiving socket queues at most DATA_RCVHWM messages (then TCP holds the sender
  back, whose WINDOW then stops reading): a stream costs the receiver the object plus a
  few chunks, not the object twice.
- The receiver (``Assembly``) returns an answer once every object of it arrived
  whole, with the parts of each object (or an error message for an object that failed);
  a plain object larger than STREAM_ABOVE is written into its final ``bytes`` as its
  chunks arrive (``data.new_bytes``), so it is in memory once, not as chunks plus a join;
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
CHUNK_BYTES = 1 << 20           # a chunk read from a spill file
MEMORY_CHUNK_BYTES = 16 << 20   # a chunk of an object in memory (a slice: no copy)
STREAM_ABOVE = 64 << 20         # objects in memory larger than this are streamed too
DATA_RCVHWM = 8                 # messages a receiver's socket queues before TCP pushes back
WINDOW = 8
MAX_STREAM = 1 << 44   # a declared size beyond this is malformed


class _Stream:
    __slots__ = ("identity", "req", "id", "size", "fd", "parts", "offset", "inflight")

    def __init__(self, identity, req, task_id, size, fd, parts=None):
        self.identity, self.req, self.id, self.size, self.fd = identity, req, task_id, size, fd
        self.parts = parts                   # an object in memory: its encoded parts
        self.offset = 0
        self.inflight: deque = deque()

    def open(self) -> bool:
        return self.fd is not None or self.parts is not None

    def read(self, offset: int) -> memoryview | bytes:
        """The next chunk from ``offset``: from the file, or a slice of one part in
        memory (no copy; a chunk never spans two parts)."""
        if self.parts is None:
            n = min(CHUNK_BYTES, self.size - offset)
            chunk = os.pread(self.fd, n, offset) if n else b""
            if len(chunk) != n:
                raise OSError(0, "the file is shorter than announced")
            return chunk
        start = 0
        for part in self.parts:
            if offset < start + len(part):
                return part[offset - start:min(len(part), offset - start + MEMORY_CHUNK_BYTES)]
            start += len(part)
        return b""


class Streams:
    """The sending side: ``start`` a stream, ``pump`` every loop iteration."""

    def __init__(self, sock, open_file):
        self.sock = sock
        self.open_file = open_file          # task id -> fd (OSError when gone)
        self.queues: dict[bytes, deque] = {}
        self.sent_bytes = 0

    def __bool__(self) -> bool:
        return bool(self.queues)

    def start(self, identity: bytes, req: int, task_id: int, size: int, parts: list | None = None) -> None:
        """Stream an object: from its spill file, or from its encoded ``parts`` in memory."""
        fd = None
        if parts is None:
            try:
                fd = self.open_file(task_id)
            except OSError as exc:
                self._send_error(identity, req, task_id, f"cannot open its spill file: {exc.strerror}")
                return
        else:
            parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self.queues.setdefault(identity, deque()).append(_Stream(identity, req, task_id, size, fd, parts))

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
        while s.open() and len(s.inflight) < WINDOW:
            try:
                chunk = s.read(s.offset)
                n = len(chunk)
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
            if s.offset >= s.size or not n:
                self._close(s)
        return not s.open()

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
        s.parts = None

    def close(self) -> None:
        for queue in self.queues.values():
            for s in queue:
                self._close(s)
        self.queues.clear()


class _Target:
    """A plain object's content written in place as its chunks arrive (``data.new_bytes``)."""
    __slots__ = ("target", "view")

    def __init__(self, size: int):
        self.target, self.view = data.new_bytes(size)


def _take_chunk(entry: list, chunk: memoryview) -> None:
    """entry = [size, chunks or _Target, bytes so far]: a large plain object goes into
    its final bytes (one copy in memory), anything else is kept as chunks."""
    size, offset = entry[0], entry[2]
    if offset == 0 and size > STREAM_ABOVE and len(chunk) and chunk[:1] == data.TAG_PLAIN:
        entry[1] = _Target(size - 1)
    if isinstance(entry[1], _Target):
        skip = 1 if offset == 0 else 0        # (the tag byte)
        start = offset + skip - 1             # where the chunk's content goes
        entry[1].view[start:start + len(chunk) - skip] = chunk[skip:]
    else:
        entry[1].append(chunk)
    entry[2] += len(chunk)


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
            _take_chunk(entry, memoryview(blobs[0]).cast("B"))
            if entry[2] < entry[0]:
                return None
            if isinstance(entry[1], _Target):
                entry[1] = [data.TAG_PLAIN, data.filled_bytes(entry[1].target)]
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
