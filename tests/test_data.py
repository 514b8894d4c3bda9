"""Data objects of the worker: sizes, lengths, get/slice, wire encoding, client view."""

import sys

import numpy as np
import pytest

from loomctl.worker.data import (Array, FileObj, Index, MalformedData, Plain, PyObj,
                                 TaskError, decode, encode, encode_parts, to_client)


def lines_index(text: bytes) -> Index:
    cuts = [i + 1 for i, b in enumerate(text) if b == ord("\n")]
    if text and (not cuts or cuts[-1] != len(text)):
        cuts.append(len(text))
    return Index(Plain(text), np.array(cuts, dtype=np.uint64))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"one\ntwo\nthree")
    return str(path)


def test_plain_basics():
    p = Plain(b"hello")
    assert (p.size(), p.length(), p.is_dobject, p.read()) == (5, 0, True, b"hello")
    assert Plain(bytearray(b"x")).content == b"x"
    with pytest.raises(TaskError, match="no elements"):
        p.get(0)
    with pytest.raises(TaskError):
        p.slice(0, 1)


def test_file_reads_on_demand(a_file):
    f = FileObj(a_file)
    assert (f.size(), f.length(), f.is_dobject) == (13, 0, True)
    assert f.read() == b"one\ntwo\nthree"
    assert f.read_range(4, 7) == b"two"


def test_missing_file_is_a_task_error(tmp_path):
    f = FileObj(str(tmp_path / "gone"))
    with pytest.raises(TaskError, match="gone"):
        f.read()
    with pytest.raises(TaskError, match="gone"):
        f.size()


def test_array_size_length_get_and_out_of_range():
    a = Array([Plain(b"ab"), Plain(b"c"), Array([Plain(b"defg")])])
    assert (a.size(), a.length(), a.is_dobject) == (7, 3, False)
    assert a.get(1) == Plain(b"c")
    with pytest.raises(TaskError, match="index 3 is out of range for an array of length 3"):
        a.get(3)
    with pytest.raises(TaskError, match="no contiguous content"):
        a.read()


@pytest.mark.parametrize("start,end,expected", [
    (0, 2, [b"a", b"b"]), (1, 100, [b"b", b"c"]), (2, 1, []), (5, 9, []), (0, 0, []),
    (0, 2**64 - 1, [b"a", b"b", b"c"]),
])
def test_array_slice_clamps(start, end, expected):
    a = Array([Plain(b"a"), Plain(b"b"), Plain(b"c")])
    s = a.slice(start, end)
    assert isinstance(s, Array)
    assert to_client(s) == expected


def test_index_pieces_and_read():
    idx = lines_index(b"A\nBB\nC")
    assert (idx.length(), idx.size(), idx.is_dobject) == (3, 6, False)
    assert [idx.get(i).read() for i in range(3)] == [b"A\n", b"BB\n", b"C"]
    assert idx.read() == b"A\nBB\nC"
    with pytest.raises(TaskError, match="out of range for an index of length 3"):
        idx.get(3)


def test_index_slice_is_index_viewing_concatenated_bytes():
    idx = lines_index(b"a\nbb\nccc\ndddd\n")
    s = idx.slice(1, 3)
    assert isinstance(s, Index)
    assert s.base is idx.base
    assert (s.length(), s.size(), s.read()) == (2, 7, b"bb\nccc\n")
    assert s.get(0).read() == b"bb\n"
    assert s.slice(1, 10).read() == b"ccc\n"
    empty = idx.slice(3, 2)
    assert (empty.length(), empty.size(), empty.read()) == (0, 0, b"")


def test_index_over_file_reads_ranges(a_file):
    idx = Index(FileObj(a_file), np.array([4, 8, 13], dtype=np.uint64))
    assert idx.get(2).read() == b"three"
    assert idx.slice(1, 3).read() == b"two\nthree"


def test_index_needs_dobject_base():
    with pytest.raises(TaskError, match="base"):
        Index(Array([]), [1])


def test_pyobj_size_and_behaviour():
    value = {"a": [1, 2, 3]}
    p = PyObj(value)
    assert (p.size(), p.length(), p.is_dobject) == (sys.getsizeof(value), 0, False)
    with pytest.raises(TaskError):
        p.read()


def test_to_client_conversions(a_file):
    obj = Array([Plain(b"x"), FileObj(a_file), lines_index(b"p\nq\n").slice(1, 2),
                 Array([PyObj(42)])])
    assert to_client(obj) == [b"x", b"one\ntwo\nthree", b"q\n", [42]]
    assert to_client(PyObj({"k": 1})) == {"k": 1}


def roundtrip(obj):
    data = encode(obj)
    assert data == b"".join(bytes(p) for p in encode_parts(obj))
    return decode(data)


def test_plain_encoding_is_tag_plus_bytes():
    assert encode(Plain(b"abc")) == b"Pabc"
    parts = encode_parts(Plain(b"x" * 1000))
    assert parts[1] is not None and len(parts) == 2
    assert roundtrip(Plain(b"")) == Plain(b"")
    assert roundtrip(Plain(bytes(range(256)))) == Plain(bytes(range(256)))
    assert decode(memoryview(b"Pabc")) == Plain(b"abc")


def test_file_encoding_sends_only_the_path(a_file):
    data = encode(FileObj(a_file))
    assert b"three" not in data
    back = roundtrip(FileObj(a_file))
    assert isinstance(back, FileObj) and back.path == a_file and back.read().endswith(b"three")


def test_nested_array_roundtrip(a_file):
    obj = Array([Plain(b"a"), Array([]), Array([Plain(b"bc"), Array([Plain(b"")])]),
                 FileObj(a_file), lines_index(b"x\ny")])
    back = roundtrip(obj)
    assert back == obj
    assert to_client(back) == to_client(obj)


def test_index_roundtrip_keeps_pieces():
    idx = lines_index(b"a\nbb\nccc\n")
    back = roundtrip(idx)
    assert isinstance(back, Index)
    assert [back.get(i).read() for i in range(3)] == [b"a\n", b"bb\n", b"ccc\n"]
    assert back == idx


def test_sliced_index_ships_only_viewed_bytes():
    idx = lines_index(b"x" * 1000 + b"\nsmall\nrest\n")
    part = idx.slice(1, 2)
    data = encode(part)
    assert len(data) < 100
    back = decode(data)
    assert back.read() == b"small\n" and back.length() == 1 and back.get(0).read() == b"small\n"


def test_index_over_file_roundtrip(a_file):
    idx = Index(FileObj(a_file), [4, 8, 13]).slice(1, 3)
    back = roundtrip(idx)
    assert isinstance(back.base, FileObj)
    assert back.read() == b"two\nthree" and back.get(0).read() == b"two\n"


def test_empty_index_roundtrip():
    back = roundtrip(Index(Plain(b""), []))
    assert back.length() == 0 and back.read() == b""


def test_pyobj_roundtrip_uses_cloudpickle():
    back = roundtrip(PyObj(lambda x: x * 2))
    assert isinstance(back, PyObj) and back.obj(21) == 42


def test_unserialisable_pyobj_is_task_error():
    import threading
    with pytest.raises(TaskError, match="cannot serialise"):
        encode(PyObj(threading.Lock()))


@pytest.mark.parametrize("garbage", [b"", b"Z123", b"A\xff\xff\xff\xff", b"X\x01\x00\x00\x00",
                                     b"A\x01\x00\x00\x00\x05", b"A\x02\x00\x00\x00\x91\x09P"])
def test_malformed_encodings(garbage):
    with pytest.raises(MalformedData):
        decode(garbage)


def test_a_large_plain_content_frame_from_a_peer_is_kept_not_copied_and_a_small_one_copied():
    """A fetched object's content arrives as a zmq frame of its own: a large one stays a
    read-only view of it (a copy was fresh memory: page faults on the way to its task)."""
    import zmq
    from loomctl.worker.data import VIEW_MIN, decode_parts
    from loomctl.worker.store import DataStore
    big, small = zmq.Frame(b"b" * VIEW_MIN), zmq.Frame(b"s" * (VIEW_MIN - 1))
    kept = decode_parts([zmq.Frame(b"P"), big])
    assert type(kept) is Plain and kept.content.readonly and kept.content.obj is big
    assert kept == Plain(b"b" * VIEW_MIN) and kept.read_range(0, 2) == b"bb"
    copied = decode_parts([zmq.Frame(b"P"), small])
    assert type(copied.content) is bytes and copied == Plain(b"s" * (VIEW_MIN - 1))
    store = DataStore(None)
    store.put(1, kept, VIEW_MIN)
    assert store.memory_bytes == VIEW_MIN
    store.check()
    assert decode_parts([b"P", b"abc"]) == Plain(b"abc") and decode_parts([b"Pab", b"c"]) == Plain(b"abc")
