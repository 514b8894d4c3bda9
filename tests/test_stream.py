"""Objects in chunks (worker/stream.py), without sockets: the sender's chunks of an object
in memory are slices of its parts, and the receiver writes a large plain object into its
final bytes (one copy), keeps anything else as chunks, and fails an object whose chunks
do not follow each other or overrun what was announced."""

import zmq

from loomctl import protocol as P
from loomctl.worker import data as D
from loomctl.worker import stream as S


class Recorder:
    """Stands in for the data socket: keeps what Streams sends (trackers done at once)."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames, flags=0, copy=True, track=False):
        self.sent.append(frames)
        return zmq.MessageTracker() if track else None


def chunks_of(obj, monkeypatch, chunk=7):
    """The CHUNK messages Streams sends for obj from memory, as (body, blob) pairs."""
    monkeypatch.setattr(S, "MEMORY_CHUNK_BYTES", chunk)
    parts = D.encode_parts(obj)
    sock = Recorder()
    streams = S.Streams(sock, open_file=None)
    streams.start(b"peer", 5, 42, D.encoded_size(parts), parts)
    while streams:
        streams.pump()
    out = []
    for frames in sock.sent:
        kind, body, blobs = P.decode([bytes(f) for f in frames[1:]])
        assert kind == S.CHUNK
        out.append((body, blobs[0]))
    return out, D.encoded_size(parts)


def assemble(pairs, size):
    assembly = S.Assembly()
    assert assembly.data({"req": 5, "ids": P.ids_to_bytes([]), "parts": [], "streams": [[42, size]]}, []) is None
    answer = None
    for body, blob in pairs:
        assert answer is None, "an answer before the last chunk"
        answer = assembly.chunk(body, [blob])
    return answer


def test_a_large_plain_object_arrives_in_one_bytes_object(monkeypatch):
    monkeypatch.setattr(S, "STREAM_ABOVE", 10)
    content = bytes(range(256)) * 3
    pairs, size = chunks_of(D.Plain(content), monkeypatch)
    assert len(pairs) > 10 and all(len(blob) <= 7 for _, blob in pairs)
    req, found, missing, parts = assemble(pairs, size)
    assert (req, found, missing) == (5, [42], [])
    assert parts[0][0] == D.TAG_PLAIN and type(parts[0][1]) is bytes   # filled in place
    obj = S.decode(parts[0])
    assert type(obj) is D.Plain and obj.content == content


def test_small_and_non_plain_objects_are_joined_from_their_chunks(monkeypatch):
    monkeypatch.setattr(S, "STREAM_ABOVE", 10)
    array = D.Array((D.Plain(b"a" * 40), D.Plain(b""), D.Plain(b"b" * 33)))
    pairs, size = chunks_of(array, monkeypatch)
    *_, parts = assemble(pairs, size)
    assert S.decode(parts[0]) == array
    monkeypatch.setattr(S, "STREAM_ABOVE", 1 << 20)   # below the threshold: chunks kept, joined
    pairs, size = chunks_of(D.Plain(b"xyz" * 30), monkeypatch)
    *_, parts = assemble(pairs, size)
    assert S.decode(parts[0]).content == b"xyz" * 30


def test_chunks_that_skip_or_overrun_fail_the_object(monkeypatch):
    monkeypatch.setattr(S, "STREAM_ABOVE", 10)
    pairs, size = chunks_of(D.Plain(b"q" * 100), monkeypatch)
    skipped = [pairs[0], *pairs[2:3]]
    answer = assemble(skipped, size)
    assert answer[3][0] == "its chunks arrived malformed"
    body, blob = pairs[-1]
    overrun = [*pairs[:-1], (body, blob + b"extra")]
    assert assemble(overrun, size)[3][0] == "its chunks arrived malformed"


def test_new_bytes_is_written_in_place():
    target, view = D.new_bytes(5)
    view[:] = b"hello"
    assert D.filled_bytes(target) == b"hello" and type(D.filled_bytes(target)) is bytes
