"""Read, write, stream and append binary graph files (specified in man/loom-graph.5).

Layout: a file is one or more *parts*; a part is a 16-byte header followed by chunks and
ends with an END chunk. Each chunk is a 16-byte header (kind, flags, payload length)
then the payload, zero-padded to a multiple of 8 bytes. Task ids inside a part are
local to it; a reader numbers the tasks of later parts after those of earlier ones, so
``cat a.loom b.loom`` is a valid file whose ids never clash.

Invariants:
- Everything is little-endian; every column starts 8-byte aligned in its chunk, so a
  reader takes columns with ``np.frombuffer`` and builds no Python object per task.
- A chunk or column kind whose first letter is upper case is critical: a reader that
  does not know it refuses the file. Lower case ones may be skipped.
- Any malformed input makes ``read`` raise GraphError with a one-line message; it never
  raises anything else.
"""

from __future__ import annotations

import io
import os
import struct
import sys
from typing import BinaryIO, Iterator

import msgpack
import numpy as np

from graphfmt.graph import Graph, GraphError, VarBytes, table_key, offsets_from_lengths

MAGIC = b"\x89LOOMGF\n"
VERSION = (1, 0)
KNOWN_FEATURES = 0
BLOCK_TASKS = 1 << 16

_HEADER = struct.Struct("<8sHHI")
_CHUNK = struct.Struct("<4sIQ")
_COLUMN = struct.Struct("<4s4sQQ")
_U64x2 = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")

K_SYMBOLS, K_REQUESTS, K_LABELS, K_TASKS, K_END = b"SYMB", b"RREQ", b"LABL", b"TASK", b"END!"
_DTYPES = {b"u1\0\0": "<u1", b"u2\0\0": "<u2", b"u4\0\0": "<u4", b"u8\0\0": "<u8"}
_DTYPE_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _pad(n: int) -> int:
    return -n % 8


# ----------------------------------------------------------------------- writing
class GraphWriter:
    """Writes one part to a binary stream: tables and task blocks as they come, so a
    consumer at the other end of a pipe can start reading before the end."""

    def __init__(self, out: BinaryIO, tables: dict | None = None, n_tasks: int = 0,
                 header: bool = True):
        self.out = out
        self.n_tasks = n_tasks
        # value -> code of every entry already in the part's tables
        self.codes = {kind: {table_key(v): i for i, v in enumerate((tables or {}).get(kind, []))}
                      for kind in (K_SYMBOLS, K_LABELS, K_REQUESTS)}
        if header:
            out.write(_HEADER.pack(MAGIC, *VERSION, 0))

    def _chunk(self, kind: bytes, payload_parts: list) -> None:
        length = sum(len(memoryview(p).cast("B")) for p in payload_parts)
        self.out.write(_CHUNK.pack(kind, 0, length))
        for p in payload_parts:
            self.out.write(p)
        self.out.write(b"\0" * _pad(length))

    def _table(self, kind: bytes, values: list) -> np.ndarray:
        """Codes in the part table for ``values``; appends the ones not there yet."""
        codes = self.codes[kind]
        new = []
        lut = np.zeros(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            k = table_key(value)
            if k not in codes:
                codes[k] = len(codes)
                new.append(value)
            lut[i] = codes[k]
        if new:
            self._chunk(kind, [msgpack.packb(new, use_bin_type=True)])
        return lut

    def write_graph(self, graph: Graph, input_base: int = 0, block_tasks: int = BLOCK_TASKS) -> None:
        """Append the tasks of ``graph``. Its input ids are part-local ids minus
        ``input_base`` (0 for a self-contained graph written into a fresh part)."""
        symbol_lut = self._table(K_SYMBOLS, graph.symbols)
        label_lut = np.concatenate([[0], self._table(K_LABELS, graph.labels) + 1])
        request_lut = np.concatenate([[0], self._table(K_REQUESTS, graph.requests) + 1])
        n = len(graph)
        counts = np.diff(graph.input_offsets)
        config_lengths = graph.configs.lengths()
        shift = self.n_tasks - input_base
        for start in range(0, n, block_tasks):
            end = min(n, start + block_tasks)
            i0, i1 = graph.input_offsets[start], graph.input_offsets[end]
            c0, c1 = graph.configs.offsets[start], graph.configs.offsets[end]
            columns = [
                (b"TYPE", symbol_lut[graph.types[start:end]].astype("<u2")),
                (b"NINP", counts[start:end].astype("<u4")),
                (b"INPS", (graph.inputs[i0:i1] + shift).astype("<u4")),
                (b"CLEN", config_lengths[start:end].astype("<u4")),
                (b"CFGD", np.frombuffer(memoryview(graph.configs.data)[c0:c1], dtype=np.uint8)),
                (b"FLAG", graph.flags[start:end].astype("<u1")),
            ]
            if graph.request_codes[start:end].any():
                columns.append((b"RCOD", request_lut[graph.request_codes[start:end]].astype("<u2")))
            if graph.label_codes[start:end].any():
                columns.append((b"LCOD", label_lut[graph.label_codes[start:end]].astype("<u4")))
            for name, column in ((b"CKP", graph.checkpoints), (b"MET", graph.metadata)):
                if column is not None and column.offsets[end] > column.offsets[start]:
                    d0, d1 = column.offsets[start], column.offsets[end]
                    columns.append((name + b"L", column.lengths()[start:end].astype("<u4")))
                    columns.append((name + b"D", np.frombuffer(memoryview(column.data)[d0:d1], dtype=np.uint8)))
            self._task_block(end - start, columns)
        self.n_tasks += n

    def _task_block(self, n: int, columns: list) -> None:
        directory = []
        offset = 16 + _COLUMN.size * len(columns)
        body = []
        for name, array in columns:
            offset += _pad(offset)
            directory.append(_COLUMN.pack(name, _DTYPE_CODES[array.dtype], offset, array.nbytes))
            body.append((offset, array))
            offset += array.nbytes
        parts = [_U64x2.pack(n, len(columns)), *directory]
        position = 16 + _COLUMN.size * len(columns)
        for start, array in body:
            if start > position:
                parts.append(b"\0" * (start - position))
            parts.append(np.ascontiguousarray(array).data.cast("B"))
            position = start + array.nbytes
        self._chunk(K_TASKS, parts)

    def close(self) -> None:
        self._chunk(K_END, [_U64.pack(self.n_tasks)])
        self.out.flush()


def write(dest, graph_or_results, block_tasks: int = BLOCK_TASKS) -> Graph:
    """Write a graph (or a task / list of tasks, marked as results) to ``dest``: a path,
    a binary file object, or "-" for standard output. Returns the graph written."""
    graph = as_graph(graph_or_results)
    with _open_out(dest) as out:
        writer = GraphWriter(out)
        writer.write_graph(graph, block_tasks=block_tasks)
        writer.close()
    return graph


def to_bytes(graph: Graph) -> bytes:
    buffer = io.BytesIO()
    write(buffer, graph)
    return buffer.getvalue()


def as_graph(graph_or_results) -> Graph:
    if isinstance(graph_or_results, Graph):
        return graph_or_results
    from graphfmt.plan import build_graph
    return build_graph(graph_or_results)[0]


class _open_out:
    def __init__(self, dest):
        self.dest, self.file, self.owned = dest, None, False

    def __enter__(self) -> BinaryIO:
        if self.dest == "-":
            self.file = sys.stdout.buffer
        elif isinstance(self.dest, (str, os.PathLike)):
            self.file, self.owned = open(self.dest, "wb"), True
        else:
            self.file = self.dest
        return self.file

    def __exit__(self, *exc):
        if self.owned:
            self.file.close()
        else:
            self.file.flush()


def append(path: str, graph: Graph) -> int:
    """Append the tasks of ``graph`` to the last part of the file at ``path`` (created
    when missing). Input ids of ``graph`` are ids of the whole file (tasks already in it
    first, then the new ones). Returns the id of the first appended task."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "wb") as out:
            GraphWriter(out).close()
    with open(path, "r+b") as f:
        scan = _scan_tables(f)
        part_base = scan["total"] - scan["part_tasks"]
        if len(graph.inputs) and graph.inputs.min() < part_base:
            raise GraphError(f"input {graph.inputs.min()} lies in an earlier part of the file; "
                             "only tasks of the last part can be inputs of appended tasks")
        f.seek(scan["end_offset"])
        f.truncate()
        writer = GraphWriter(f, scan, n_tasks=scan["part_tasks"], header=False)
        writer.write_graph(graph, input_base=scan["part_tasks"])
        writer.close()
    return scan["total"]


def _scan_tables(f: BinaryIO) -> dict:
    """Walk chunk headers (skipping task payloads); the last part's tables."""
    size = f.seek(0, 2)
    f.seek(0)
    total = 0
    state: dict = {}
    position = 0
    while position < size:
        header = f.read(_HEADER.size)
        _check_header(header)
        state = {K_SYMBOLS: [], K_LABELS: [], K_REQUESTS: [], "part_tasks": 0}
        position += _HEADER.size
        while True:
            raw = f.read(_CHUNK.size)
            if len(raw) < _CHUNK.size:
                raise GraphError("truncated file: missing end of part")
            kind, _, length = _CHUNK.unpack(raw)
            if kind == K_END:
                state["end_offset"] = position
                f.seek(length + _pad(length), 1)
                position += _CHUNK.size + length + _pad(length)
                break
            if kind in (K_SYMBOLS, K_LABELS, K_REQUESTS):
                state[kind] += _unpack_table(f.read(length), kind)
                f.seek(_pad(length), 1)
            elif kind == K_TASKS:
                state["part_tasks"] += _U64.unpack(f.read(8))[0]
                f.seek(length - 8 + _pad(length), 1)
            else:
                f.seek(length + _pad(length), 1)
            position += _CHUNK.size + length + _pad(length)
        total += state["part_tasks"]
    state["total"] = total
    return state


# ----------------------------------------------------------------------- reading
class _Source:
    """Exact reads from a memory buffer (zero copy) or a stream (incremental)."""

    def __init__(self, data: bytes | memoryview | None = None, stream: BinaryIO | None = None):
        self.view = memoryview(data) if data is not None else None
        self.stream = stream
        self.position = 0

    def read(self, n: int, what: str) -> memoryview:
        if self.view is not None:
            chunk = self.view[self.position:self.position + n]
        else:
            chunk = memoryview(_read_exact(self.stream, n))
        if len(chunk) < n:
            raise GraphError(f"truncated file: {what} at byte {self.position} is cut short")
        self.position += n
        return chunk


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = stream.read(n - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def _check_header(raw) -> None:
    if len(raw) < _HEADER.size:
        raise GraphError("truncated file: header is cut short" if raw else "empty file: not a graph file")
    magic, major, minor, features = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise GraphError("not a loomctl graph file (wrong magic number)")
    if major != VERSION[0]:
        raise GraphError(f"graph format version {major}.{minor} is not supported "
                         f"(this loomctl reads {VERSION[0]}.x)")
    if features & ~KNOWN_FEATURES:
        raise GraphError(f"graph file needs features {features:#x} that this loomctl does not know")


def _unpack_table(payload, kind: bytes) -> list:
    try:
        values = msgpack.unpackb(payload, raw=False)
    except Exception:
        raise GraphError(f"malformed {kind.decode()} chunk: not a msgpack array") from None
    if not isinstance(values, list):
        raise GraphError(f"malformed {kind.decode()} chunk: not an array")
    want = dict if kind == K_REQUESTS else str
    if not all(isinstance(v, want) for v in values):
        raise GraphError(f"malformed {kind.decode()} chunk: entries must be {want.__name__}")
    return values


class _PartBuilder:
    def __init__(self):
        self.tables = {K_SYMBOLS: [], K_LABELS: [], K_REQUESTS: []}
        self.blocks: list[dict] = []
        self.n = 0

    def add_block(self, payload: memoryview) -> None:
        if len(payload) < 16:
            raise GraphError("malformed TASK chunk: too short")
        n, n_columns = _U64x2.unpack(payload[:16])
        if 16 + n_columns * _COLUMN.size > len(payload):
            raise GraphError("malformed TASK chunk: column directory is cut short")
        columns = {}
        for k in range(n_columns):
            name, dtype, offset, length = _COLUMN.unpack(payload[16 + k * _COLUMN.size:16 + (k + 1) * _COLUMN.size])
            if dtype not in _DTYPES:
                raise GraphError(f"malformed TASK chunk: column {name!r} has unknown type {dtype!r}")
            if offset + length > len(payload) or length % np.dtype(_DTYPES[dtype]).itemsize:
                raise GraphError(f"malformed TASK chunk: column {name.decode(errors='replace')} is out of bounds")
            if name[:1].isupper() and name not in _KNOWN_COLUMNS:
                raise GraphError(f"graph file uses column {name.decode(errors='replace')} that this loomctl does not know")
            columns[name] = np.frombuffer(payload[offset:offset + length], dtype=_DTYPES[dtype])
        block = {"n": n, "base": self.n}
        for name in (b"TYPE", b"NINP", b"CLEN", b"FLAG"):
            if name not in columns:
                raise GraphError(f"malformed TASK chunk: column {name.decode()} is missing")
        for name, column in columns.items():
            expected = _expected_length(name, n, columns)
            if expected is not None and len(column) != expected:
                raise GraphError(f"malformed TASK chunk at task {self.n}: column {name.decode()} "
                                 f"has {len(column)} entries, expected {expected}")
        block.update(columns)
        self.blocks.append(block)
        self.n += n

    def graph(self, part_base: int) -> Graph:
        b = self.blocks
        n = self.n
        counts = _cat(b, b"NINP", np.int64)
        inputs = _cat(b, b"INPS", np.int64)
        if len(inputs) and inputs.max() >= n:
            owners = np.repeat(np.arange(n), counts)
            bad = int(np.flatnonzero(inputs >= n)[0])
            raise GraphError(f"task {part_base + owners[bad]}: input {part_base + inputs[bad]} "
                             "does not exist (dangling input)")
        return Graph(
            symbols=self.tables[K_SYMBOLS], types=_cat(b, b"TYPE", np.uint16),
            input_offsets=offsets_from_lengths(counts), inputs=inputs,
            configs=VarBytes.from_lengths(_cat(b, b"CLEN", np.int64), _join(b, b"CFGD")),
            flags=_cat(b, b"FLAG", np.uint8),
            request_codes=_cat(b, b"RCOD", np.uint16), requests=self.tables[K_REQUESTS],
            label_codes=_cat(b, b"LCOD", np.uint32), labels=self.tables[K_LABELS],
            checkpoints=_optional(b, b"CKP"), metadata=_optional(b, b"MET"),
        )


_KNOWN_COLUMNS = {b"TYPE", b"NINP", b"INPS", b"CLEN", b"CFGD", b"FLAG", b"RCOD", b"LCOD",
                  b"CKPL", b"CKPD", b"METL", b"METD"}


def _expected_length(name: bytes, n: int, columns: dict) -> int | None:
    if name in (b"TYPE", b"NINP", b"CLEN", b"FLAG", b"RCOD", b"LCOD", b"CKPL", b"METL"):
        return n
    lengths = {b"INPS": b"NINP", b"CFGD": b"CLEN", b"CKPD": b"CKPL", b"METD": b"METL"}.get(name)
    if lengths is not None:
        return int(columns[lengths].sum()) if lengths in columns else 0
    return None


def _cat(blocks: list[dict], name: bytes, dtype) -> np.ndarray:
    parts = [blk[name] if name in blk else np.zeros(blk["n"] if name != b"INPS" else 0, dtype)
             for blk in blocks]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _join(blocks: list[dict], name: bytes) -> bytes:
    return b"".join(blk[name].data if name in blk else b"" for blk in blocks)


def _optional(blocks: list[dict], prefix: bytes) -> VarBytes | None:
    if not any(prefix + b"L" in blk for blk in blocks):
        return None
    lengths = np.concatenate([blk.get(prefix + b"L", np.zeros(blk["n"], np.uint32)) for blk in blocks])
    return VarBytes.from_lengths(lengths.astype(np.int64), _join(blocks, prefix + b"D"))


def iter_parts(source: _Source) -> Iterator[Graph]:
    """Parse parts one after another as the bytes arrive."""
    base = 0
    while True:
        _check_header(_read_header(source))
        part = _PartBuilder()
        while True:
            kind, _, length = _CHUNK.unpack(source.read(_CHUNK.size, "chunk header"))
            if length > (1 << 40):
                raise GraphError(f"malformed chunk {kind!r}: length {length} is absurd")
            payload = source.read(length, f"{kind.decode(errors='replace')} chunk")
            source.read(_pad(length), "chunk padding")
            if kind == K_END:
                declared = _U64.unpack(payload[:8])[0] if len(payload) >= 8 else -1
                if declared != part.n:
                    raise GraphError(f"end of part declares {declared} tasks, but {part.n} were read")
                break
            if kind in part.tables:
                part.tables[kind] = part.tables[kind] + _unpack_table(payload, kind)
            elif kind == K_TASKS:
                part.add_block(payload)
            elif kind[:1].isupper():
                raise GraphError(f"graph file uses chunk {kind.decode(errors='replace')} that this loomctl does not know")
        yield part.graph(base).deduplicated()
        base += part.n
        if _exhausted(source):
            return


def _read_header(source: _Source) -> memoryview:
    try:
        return source.read(_HEADER.size, "header")
    except GraphError:
        if source.position == 0 and (source.view is None or len(source.view) == 0):
            raise GraphError("empty file: not a graph file") from None
        raise


def _exhausted(source: _Source) -> bool:
    if source.view is not None:
        return source.position >= len(source.view)
    peek = source.stream.read(1)
    if not peek:
        return True
    source.stream = _Prepend(peek, source.stream)
    return False


class _Prepend:
    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int) -> bytes:
        if self.head:
            out, self.head = self.head[:n], self.head[n:]
            return out + (self.stream.read(n - len(out)) if n > len(out) else b"")
        return self.stream.read(n)


def read(src, validate: bool = True) -> Graph:
    """Read a whole graph file: ``src`` is a path, "-" (standard input), bytes, or a
    binary file object. Raises GraphError (one line) for any malformed input."""
    source = _as_source(src)
    try:
        graph = Graph.concat(list(iter_parts(source)))
    except GraphError:
        raise
    except (ValueError, struct.error, OverflowError, TypeError, IndexError, MemoryError) as exc:
        raise GraphError(f"malformed graph file: {exc}") from None
    if validate:
        graph.validate()
    return graph


def _as_source(src) -> _Source:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _Source(data=src)
    if src == "-":
        return _Source(stream=sys.stdin.buffer)
    if isinstance(src, (str, os.PathLike)):
        try:
            with open(src, "rb") as f:
                return _Source(data=f.read())
        except OSError as exc:
            raise GraphError(f"cannot read {src}: {exc.strerror}") from None
    return _Source(stream=src)
