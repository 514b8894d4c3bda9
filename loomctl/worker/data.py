"""The worker's data objects and their wire encoding.

Invariants:
- Data objects are immutable. Nothing here changes an object's value after construction
  (a ``Plain.over`` a frame's view swaps it for equal bytes when first read whole);
  cached values (a file's size, an array's size) are pure functions of the object.
- Five kinds: ``Plain`` (bytes), ``FileObj`` (a path on a shared file system, read on
  demand), ``Array`` (a tuple of data objects, nested freely), ``Index`` (a D-object plus
  cut positions, an array of byte slices that stores no slices) and ``PyObj`` (any
  Python object). Plain and FileObj are the *D-objects*: they have one contiguous
  content.
- An ``Index`` views ``base`` bytes ``[start, cuts[-1])``; piece ``i`` is
  ``[start if i == 0 else cuts[i-1], cuts[i])``. ``cuts`` is a non-decreasing uint64
  numpy array; slicing an index shares its base and never copies content (nor does
  getting a piece of a base that is a view: the piece is a view of the same buffer).
- Every failure a user can cause (reading an array, getting past the end, a vanished
  file) raises ``TaskError`` with a sentence for a person.
- ``decode(encode(x))`` equals ``x`` for every kind. A FileObj travels as its path only.
  A Plain travels as a one-byte tag followed by its bytes; containers (array, index) are a
  tag, a 4-byte header length, a msgpack header and the concatenated encodings of their
  parts, so ``encode_parts`` can hand large contents to a socket without copying them.
- ``cheap_to_encode`` is true only for objects whose size tells their encoding cost
  (the worker sends those along with its report).
"""

from __future__ import annotations

import os
import struct
import sys
from typing import Any, Iterable

import cloudpickle
import msgpack
import numpy as np

CUT_DTYPE = np.dtype("<u8")
VIEW_MIN = 8192   # a plain content frame this large is kept as it came (zmq gives it its own buffer)
TAG_PLAIN = b"P"
TAG_FILE = b"F"
TAG_ARRAY = b"A"
TAG_INDEX = b"X"
TAG_PYOBJ = b"Y"

_HEADER_LEN = struct.Struct("<I")


class TaskError(Exception):
    """A task failed; ``str(error)`` is a message meant for a person."""

    @property
    def message(self) -> str:
        return str(self)


class MalformedData(ValueError):
    """Bytes received from a peer are not an encoded data object."""


class DataObject:
    """Common interface; see the module docstring for the kinds."""

    __slots__ = ()
    kind = "?"
    is_dobject = False

    def size(self) -> int:
        raise NotImplementedError

    def length(self) -> int:
        return 0

    def read(self) -> bytes:
        raise TaskError(f"{_a(self.kind)} object has no contiguous content to read")

    def get(self, i: int) -> "DataObject":
        raise TaskError(f"cannot get an element of {_a(self.kind)} object (it has no elements)")

    def slice(self, start: int, end: int) -> "DataObject":
        raise TaskError(f"cannot slice {_a(self.kind)} object (it has no elements)")

    def _check_index(self, i: int) -> None:
        n = self.length()
        if not 0 <= i < n:
            raise TaskError(f"index {i} is out of range for {_a(self.kind)} of length {n}")


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _clamp(start: int, end: int, n: int) -> tuple[int, int]:
    start, end = min(max(start, 0), n), min(max(end, 0), n)
    return (start, end) if start < end else (0, 0)


def kind_phrase(obj: DataObject) -> str:
    return _a(obj.kind) + " object"


def content(obj: DataObject, what: str) -> bytes:
    """Bytes of a D-object or of the bytes an index views; else TaskError naming ``what``."""
    if obj.is_dobject or isinstance(obj, Index):
        return obj.read()
    raise TaskError(f"{what} is {kind_phrase(obj)}; expected a plain, file or index object")


class Plain(DataObject):
    __slots__ = ("content",)
    kind = "plain"
    is_dobject = True

    def __init__(self, content: bytes):
        self.content = content if type(content) is bytes else bytes(content)

    @classmethod
    def over(cls, view: memoryview) -> "Plain":
        """A read-only view's bytes (a large const's frame, its split's pieces, an encoded
        index's span), copied only when read whole; the store counts the whole buffer."""
        obj = cls.__new__(cls)
        obj.content = view.cast("B") if view.readonly else bytes(view)
        return obj

    def size(self) -> int:
        return len(self.content)

    def read(self) -> bytes:
        content = self.content   # (over a whole frame: its bytes from now on; a piece keeps its
        if type(content) is not bytes:   # view, whose frame the store counts for it)
            data = bytes(content)
            if content.nbytes == memoryview(content.obj).nbytes:
                self.content = data
            return data
        return content

    def read_range(self, start: int, end: int) -> bytes:
        part = self.content[start:end]
        return part if type(part) is bytes else bytes(part)

    def __eq__(self, other):
        return isinstance(other, Plain) and self.content == other.content

    def __hash__(self):
        return hash(self.content)

    def __repr__(self):
        more = "..." if len(self.content) > 32 else ""   # (bytes: the content may be a view)
        return f"Plain({bytes(self.content[:32])!r}{more}, size={len(self.content)})"


class FileObj(DataObject):
    """A file on a shared file system. Its size is taken once (data is immutable)."""

    __slots__ = ("path", "_size")
    kind = "file"
    is_dobject = True

    def __init__(self, path: str):
        self.path = path
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            try:
                self._size = os.path.getsize(self.path)
            except OSError as e:
                raise TaskError(f"cannot access file {self.path!r}: {e.strerror}") from None
        return self._size

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise TaskError(f"cannot read file {self.path!r}: {e.strerror}") from None

    def read_range(self, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except OSError as e:
            raise TaskError(f"cannot read file {self.path!r}: {e.strerror}") from None

    def __eq__(self, other):
        return isinstance(other, FileObj) and self.path == other.path

    def __hash__(self):
        return hash(("file", self.path))

    def __repr__(self):
        return f"FileObj({self.path!r})"


class Array(DataObject):
    __slots__ = ("items", "_size")
    kind = "array"

    def __init__(self, items: Iterable[DataObject]):
        self.items = tuple(items)
        self._size: int | None = None

    def size(self) -> int:
        if self._size is None:
            self._size = sum(item.size() for item in self.items)
        return self._size

    def length(self) -> int:
        return len(self.items)

    def get(self, i: int) -> DataObject:
        self._check_index(i)
        return self.items[i]

    def slice(self, start: int, end: int) -> "Array":
        start, end = _clamp(start, end, len(self.items))
        return Array(self.items[start:end])

    def __eq__(self, other):
        return isinstance(other, Array) and self.items == other.items

    __hash__ = None

    def __repr__(self):
        return f"Array({list(self.items)!r})"


class Index(DataObject):
    """An array of byte slices of ``base`` (a D-object) described by cut positions."""

    __slots__ = ("base", "cuts", "start")
    kind = "index"

    def __init__(self, base: DataObject, cuts, start: int = 0):
        if not base.is_dobject:
            raise TaskError(f"an index needs a plain or file object as its base, not {_a(base.kind)}")
        self.base = base
        self.cuts = np.asarray(cuts, dtype=CUT_DTYPE)
        self.start = int(start)

    def _end(self) -> int:
        return int(self.cuts[-1]) if len(self.cuts) else self.start

    def piece_bounds(self, i: int) -> tuple[int, int]:
        lo = self.start if i == 0 else int(self.cuts[i - 1])
        return lo, int(self.cuts[i])

    def size(self) -> int:
        return self._end() - self.start

    def length(self) -> int:
        return len(self.cuts)

    def read(self) -> bytes:
        return self.base.read_range(self.start, self._end()) if len(self.cuts) else b""

    def get(self, i: int) -> Plain:
        self._check_index(i)
        lo, hi = self.piece_bounds(i)
        if type(self.base) is Plain and type(self.base.content) is memoryview:   # (a large const's
            return Plain.over(self.base.content[lo:hi])   # frame: a view of it, counted whole in the store)
        return Plain(self.base.read_range(lo, hi))

    def slice(self, start: int, end: int) -> "Index":
        start, end = _clamp(start, end, len(self.cuts))
        if start == end:
            return Index(self.base, np.empty(0, CUT_DTYPE), 0)
        first = self.start if start == 0 else int(self.cuts[start - 1])
        return Index(self.base, self.cuts[start:end], first)

    def __eq__(self, other):
        if not isinstance(other, Index) or len(self.cuts) != len(other.cuts) or self.read() != other.read():
            return False
        return bool(np.array_equal(self.cuts - np.uint64(self.start),
                                   other.cuts - np.uint64(other.start)))

    __hash__ = None

    def __repr__(self):
        return f"Index({self.base!r}, pieces={len(self.cuts)}, size={self.size()})"


class PyObj(DataObject):
    __slots__ = ("obj",)
    kind = "pyobj"

    def __init__(self, obj: Any):
        self.obj = obj

    def size(self) -> int:
        return sys.getsizeof(self.obj)

    def __repr__(self):
        return f"PyObj({type(self.obj).__name__})"


# ---------------------------------------------------------------------------- client


def to_client(obj: DataObject) -> Any:
    """What a client receives: bytes (plain, file, index), a list (array, recursively)
    or the Python object (pyobj)."""
    if isinstance(obj, Array):
        return [to_client(item) for item in obj.items]
    if isinstance(obj, PyObj):
        return obj.obj
    return obj.read()


# ---------------------------------------------------------------------------- wire


def encode_parts(obj: DataObject) -> list:
    """The encoding of ``obj`` as a list of byte buffers whose concatenation is
    ``encode(obj)``; large contents are included by reference, not copied."""
    parts: list = []
    _encode_into(obj, parts)
    return parts


def encode(obj: DataObject) -> bytes:
    if type(obj) is Plain:
        return TAG_PLAIN + obj.content
    return b"".join(encode_parts(obj))


def decode_parts(parts: list) -> DataObject:
    """Inverse of ``encode_parts`` or of any cut of an encoding (zmq frames, a stream's chunks):
    a plain content that came whole (bytes, a frame >= VIEW_MIN) is kept, else copied once."""
    if len(parts) == 2 and memoryview(parts[0]) == TAG_PLAIN:
        content = parts[1]
        if type(content) is bytes:
            return Plain(content)
        if len(content) >= VIEW_MIN:   # (its own buffer: kept, and counted whole by the store)
            return Plain.over(memoryview(content).toreadonly())
    if len(parts) > 1 and memoryview(parts[0])[:1] == TAG_PLAIN:
        return Plain(b"".join([memoryview(parts[0])[1:], *parts[1:]]))
    return decode(parts[0] if len(parts) == 1 else b"".join(parts))


def data_parts(blobs: list, counts) -> list:
    """The frames of a DATA answer grouped per object (``counts``: frames per object);
    MalformedData when they do not add up."""
    if not isinstance(counts, list) or not all(type(n) is int and n > 0 for n in counts) \
            or sum(counts) != len(blobs):
        raise MalformedData("the frames of a DATA answer do not match its parts")
    out, k = [], 0
    for n in counts:
        out.append(blobs[k:k + n])
        k += n
    return out


def encoded_size(parts: list) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _encode_into(obj: DataObject, parts: list) -> None:
    if isinstance(obj, Plain):
        parts += (TAG_PLAIN, obj.content)
    elif isinstance(obj, FileObj):
        parts += (TAG_FILE, os.fsencode(obj.path))
    elif isinstance(obj, PyObj):
        try:
            parts += (TAG_PYOBJ, cloudpickle.dumps(obj.obj))
        except Exception as e:
            raise TaskError(f"cannot serialise a Python object of type "
                            f"{type(obj.obj).__name__}: {e}") from None
    elif isinstance(obj, Array):
        lengths: list[int] = []
        body: list = []
        for item in obj.items:
            if type(item) is Plain:  # the common case, inlined for speed
                body += (TAG_PLAIN, item.content)
                lengths.append(len(item.content) + 1)
            else:
                item_parts = encode_parts(item)
                body += item_parts
                lengths.append(encoded_size(item_parts))
        header = msgpack.packb(lengths)
        parts += (TAG_ARRAY, _HEADER_LEN.pack(len(header)), header)
        parts += body
    elif isinstance(obj, Index):
        base, cuts, start = _compact_index(obj)
        base_parts = encode_parts(base)
        header = msgpack.packb([start, encoded_size(base_parts)])
        parts += (TAG_INDEX, _HEADER_LEN.pack(len(header)), header)
        parts += base_parts
        parts.append(memoryview(np.ascontiguousarray(cuts, dtype=CUT_DTYPE)).cast("B"))
    else:
        raise TypeError(f"not a data object: {type(obj).__name__}")


def _compact_index(index: Index) -> tuple[DataObject, np.ndarray, int]:
    """Send only the viewed bytes of an in-memory base (a slice of a big index must not
    ship the whole base); a file base stays a path."""
    base = index.base
    if isinstance(base, Plain) and len(index.cuts):
        start, end = index.start, int(index.cuts[-1])
        if start > 0 or end < len(base.content):
            view = memoryview(base.content)[start:end]
            return Plain.over(view), index.cuts - np.uint64(start), 0
    return base, index.cuts, index.start


def decode(buf) -> DataObject:
    """Inverse of ``encode``; accepts bytes, bytearray or memoryview."""
    view = memoryview(buf)
    if view.nbytes == 0:
        raise MalformedData("empty data object encoding")
    try:
        return _decode(view.cast("B") if view.format != "B" else view)
    except MalformedData:
        raise
    except (ValueError, TypeError, IndexError, struct.error, msgpack.UnpackException) as e:
        raise MalformedData(f"malformed data object encoding: {e}") from None


def _decode(view: memoryview) -> DataObject:
    tag = bytes(view[:1])
    body = view[1:]
    if tag == TAG_PLAIN:
        return Plain(bytes(body))
    if tag == TAG_FILE:
        return FileObj(os.fsdecode(bytes(body)))
    if tag == TAG_PYOBJ:
        try:
            return PyObj(cloudpickle.loads(body))
        except Exception as e:
            raise TaskError(f"cannot deserialise a Python object: "
                            f"{type(e).__name__}: {e}") from None
    if tag == TAG_ARRAY:
        lengths, rest = _split_header(body)
        if sum(lengths) != len(rest) or (lengths and min(lengths) < 1):
            raise MalformedData("array encoding does not match its header")
        items = []
        offset = 0
        plain_tag = TAG_PLAIN[0]
        for n in lengths:
            end = offset + n
            if rest[offset] == plain_tag:  # the common case, inlined for speed
                items.append(Plain(rest[offset + 1:end].tobytes()))
            else:
                items.append(_decode(rest[offset:end]))
            offset = end
        return Array(items)
    if tag == TAG_INDEX:
        (start, base_len), rest = _split_header(body)
        if base_len > len(rest) or (len(rest) - base_len) % CUT_DTYPE.itemsize:
            raise MalformedData("truncated index encoding")
        base = _decode(rest[:base_len])
        if not base.is_dobject:
            raise MalformedData(f"index base is {_a(base.kind)}, not a plain or file object")
        cuts = np.frombuffer(rest[base_len:], dtype=CUT_DTYPE).copy()
        return Index(base, cuts, start)
    raise MalformedData(f"unknown data object tag {tag!r}")


def _split_header(body: memoryview) -> tuple[Any, memoryview]:
    (n,) = _HEADER_LEN.unpack(body[:_HEADER_LEN.size])
    end = _HEADER_LEN.size + n
    if end > len(body):
        raise MalformedData("truncated container header")
    return msgpack.unpackb(body[_HEADER_LEN.size:end]), body[end:]


_ATOMS = (int, float, complex, bool, str, bytes, type(None))


def cheap_to_encode(obj: DataObject) -> bool:
    """Objects whose size tells what they cost to encode: bytes, arrays of few such,
    Python numbers and strings (a dict's size does not count what it holds; a file's
    path means something on this host only)."""
    if type(obj) is Plain:
        return True
    if type(obj) is PyObj:
        return type(obj.obj) in _ATOMS
    if type(obj) is Array:   # (empty items cost bytes too: few of them)
        return len(obj.items) <= 256 and all(cheap_to_encode(item) for item in obj.items)
    return False


def new_bytes(n: int) -> tuple[bytes, memoryview]:
    """A ``bytes`` object of n bytes not filled yet, and a writable view of its content,
    so that a large object received in chunks is written into its final place (one
    copy of it in memory, not the chunks and then their join). The caller fills the
    view before the object is used anywhere (CPython's bytes layout; elsewhere, or if
    that is not available, a bytearray that is copied once at the end: see
    ``filled_bytes``)."""
    try:
        import ctypes
        b = _PyBytes_FromStringAndSize(None, n)
        view = memoryview((ctypes.c_char * n).from_address(id(b) + bytes.__basicsize__ - 1)).cast("B")
        return b, view
    except Exception:   # pragma: no cover (not CPython)
        buf = bytearray(n)
        return buf, memoryview(buf)


def filled_bytes(target) -> bytes:
    """The object ``new_bytes`` returned, once its view is filled: bytes."""
    return target if type(target) is bytes else bytes(target)


def _bytes_constructor():
    try:
        import ctypes
        if bytes.__basicsize__ != 33 or not hasattr(ctypes, "pythonapi"):
            return None
        f = ctypes.pythonapi.PyBytes_FromStringAndSize
        f.restype = ctypes.py_object
        f.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        return f
    except Exception:   # pragma: no cover
        return None


_PyBytes_FromStringAndSize = _bytes_constructor()
