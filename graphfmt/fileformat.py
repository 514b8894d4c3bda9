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
- The layout (magic, structs, chunk kinds, column types) is in ``layout.py``, shared
  with the small-graph fast paths ``smallread`` and ``smallwrite``.
- Every column of version 1.0 has exactly one type (``COLUMN_TYPES``): a reader refuses
  any other, and a writer refuses a value that does not fit, so nothing is ever narrowed.
- ``read`` gives id and offset columns as int32 where they fit (``graph.py``) and copies
  every column out of the source buffer, so a caller may free the buffer once read.
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
from graphfmt.layout import (MAGIC, VERSION, KNOWN_FEATURES, HEADER, CHUNK, COLUMN, U64x2, U64,
                             K_SYMBOLS, K_REQUESTS, K_LABELS, K_TASKS, K_END, DTYPES,
                             COLUMN_TYPES, DATA_COLUMNS, REQUIRED_COLUMNS)
from graphfmt.smallread import read_small
from graphfmt.smallwrite import to_bytes_small

BLOCK_TASKS = 1 << 16
_DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
# Most entries a part's table can hold: the largest code must fit its column
# (symbol codes are 0-based; label and request codes start at 1).
_TABLE_LIMITS = {K_SYMBOLS: (1 << 16, "symbols"), K_REQUESTS: ((1 << 16) - 1, "resource requests"),
                 K_LABELS: ((1 << 32) - 1, "labels")}
MAX_CHUNK = 1 << 40


def _pad(n: int) -> int:
    return -n % 8


def _text(raw, type_code: bool = False) -> str:
    """A chunk kind, column id or type code as text: printable ASCII as is, other bytes
    as \\xNN; a type code without its trailing zero bytes ("u4" rather than "u4\\x00\\x00")."""
    raw = bytes(raw)
    if type_code:
        raw = raw.rstrip(b"\0") or raw
    return "".join(chr(c) if 32 <= c < 127 and c != 92 else f"\\x{c:02x}" for c in raw)


# ----------------------------------------------------------------------- writing
class GraphWriter:
    """Writes one part to a binary stream: tables and task blocks as they come, so a
    consumer at the other end of a pipe can start reading before the end.

    ``tables`` and ``n_tasks`` continue a part that already holds those table entries
    and tasks (for appending); ``header=False`` then leaves out the part header."""

    def __init__(self, out: BinaryIO, tables: dict | None = None, n_tasks: int = 0,
                 header: bool = True):
        self.out = out
        self.n_tasks = n_tasks
        tables = tables or {}
        # value -> code of every entry already in the part's tables (a value held twice
        # keeps its first code), and the length of each table: new entries get codes from
        # there, which is more than the number of distinct values when a value is twice.
        self.codes: dict = {}
        self.sizes: dict = {}
        for kind in (K_SYMBOLS, K_LABELS, K_REQUESTS):
            values = tables.get(kind, [])
            codes = self.codes[kind] = {}
            for i, value in enumerate(values):
                codes.setdefault(table_key(value), i)
            self.sizes[kind] = len(values)
        if header:
            out.write(HEADER.pack(MAGIC, *VERSION, 0))

    def _chunk(self, kind: bytes, payload_parts: list) -> None:
        length = sum(len(memoryview(p).cast("B")) for p in payload_parts)
        self.out.write(CHUNK.pack(kind, 0, length))
        for p in payload_parts:
            self.out.write(p)
        self.out.write(b"\0" * _pad(length))

    def _plan_table(self, kind: bytes, values: list) -> tuple[np.ndarray, list]:
        """Codes in the part table for ``values``, and the values not there yet (whose
        codes follow the table's current length). Changes nothing."""
        codes = self.codes[kind]
        fresh: dict = {}
        new = []
        lut = np.zeros(len(values), dtype=np.int64)
        for i, value in enumerate(values):
            k = table_key(value)
            code = codes.get(k)
            if code is None:
                code = fresh.get(k)
                if code is None:
                    code = fresh[k] = self.sizes[kind] + len(new)
                    new.append(value)
            lut[i] = code
        limit, what = _TABLE_LIMITS[kind]
        if self.sizes[kind] + len(new) > limit:
            raise GraphError(f"cannot write the graph: a part holds at most {limit} {what}, "
                             f"this one would hold {self.sizes[kind] + len(new)}")
        return lut, new

    def _commit_table(self, kind: bytes, new: list) -> None:
        """Write a table chunk with the entries that ``_plan_table`` found new."""
        if not new:
            return
        codes = self.codes[kind]
        for value in new:
            codes[table_key(value)] = self.sizes[kind]
            self.sizes[kind] += 1
        self._chunk(kind, [msgpack.packb(new, use_bin_type=True)])

    def write_graph(self, graph: Graph, input_base: int = 0, block_tasks: int = BLOCK_TASKS) -> None:
        """Append the tasks of ``graph`` to the part. ``input_base`` says how the input ids
        of ``graph`` are numbered: it is the id, in that numbering, of the first task that
        this call writes. 0 (the default) when the inputs are ids within ``graph``; the
        file's task count when they are whole-file ids of a file whose last part this
        writer continues (``append``). An input ``x`` is stored as the part-local id
        ``x - input_base + n_tasks``. Raises GraphError, before writing any task chunk,
        when a value does not fit its column."""
        n = len(graph)
        if n and int(graph.types.max()) >= len(graph.symbols):
            raise GraphError("cannot write the graph: a symbol code is not in its symbol table")
        counts = np.diff(graph.input_offsets)
        shift = self.n_tasks - input_base
        # check every value against its column's width before writing anything
        columns_of = {
            b"NINP": ("number of inputs", counts, None),
            b"INPS": ("input id (part-local)", graph.inputs.astype(np.int64) + shift if len(graph.inputs) else graph.inputs,
                      graph.input_offsets),
            b"CLEN": ("config length", graph.configs.lengths(), None),
            b"FLAG": ("flags", graph.flags, None),
        }
        for prefix, column, what in ((b"CKP", graph.checkpoints, "checkpoint path length"),
                                     (b"MET", graph.metadata, "metadata length")):
            if column is not None:
                columns_of[prefix + b"L"] = (what, column.lengths(), None)
        narrow = {name: _narrow(name, what, values, offsets)
                  for name, (what, values, offsets) in columns_of.items()}
        plans = {kind: self._plan_table(kind, values) for kind, values in
                 ((K_SYMBOLS, graph.symbols), (K_LABELS, graph.labels), (K_REQUESTS, graph.requests))}
        for kind, (_, new) in plans.items():
            self._commit_table(kind, new)
        symbol_lut = plans[K_SYMBOLS][0]
        label_lut = np.concatenate([[0], plans[K_LABELS][0] + 1])
        request_lut = np.concatenate([[0], plans[K_REQUESTS][0] + 1])
        for start in range(0, n, block_tasks):
            end = min(n, start + block_tasks)
            i0, i1 = graph.input_offsets[start], graph.input_offsets[end]
            c0, c1 = graph.configs.offsets[start], graph.configs.offsets[end]
            columns = [
                (b"TYPE", symbol_lut[graph.types[start:end]].astype("<u2")),
                (b"NINP", narrow[b"NINP"][start:end]),
                (b"INPS", narrow[b"INPS"][i0:i1]),
                (b"CLEN", narrow[b"CLEN"][start:end]),
                (b"CFGD", graph.configs.pieces(start, end)),   # (buffers: a large const by reference)
                (b"FLAG", narrow[b"FLAG"][start:end]),
            ]
            if graph.request_codes[start:end].any():
                columns.append((b"RCOD", request_lut[graph.request_codes[start:end]].astype("<u2")))
            if graph.label_codes[start:end].any():
                columns.append((b"LCOD", label_lut[graph.label_codes[start:end]].astype("<u4")))
            if graph.priorities is not None and graph.priorities[start:end].any():
                columns.append((b"prio", np.ascontiguousarray(graph.priorities[start:end], dtype="<i4").view("<u4")))
            for name, column in ((b"CKP", graph.checkpoints), (b"MET", graph.metadata)):
                if column is not None and column.offsets[end] > column.offsets[start]:
                    d0, d1 = column.offsets[start], column.offsets[end]
                    columns.append((name + b"L", narrow[name + b"L"][start:end]))
                    columns.append((name + b"D", np.frombuffer(memoryview(column.data)[d0:d1], dtype=np.uint8)))
            self._task_block(end - start, columns)
        self.n_tasks += n

    def _task_block(self, n: int, columns: list) -> None:
        directory = []
        offset = 16 + COLUMN.size * len(columns)
        body = []
        for name, array in columns:   # (an array, or a list of byte buffers: a uint8 column)
            buffers = [memoryview(b).cast("B") for b in array] if type(array) is list \
                else [np.ascontiguousarray(array).data.cast("B")]
            nbytes = sum(b.nbytes for b in buffers)
            offset += _pad(offset)
            directory.append(COLUMN.pack(name, _DTYPE_CODES[np.dtype(np.uint8) if type(array) is list else array.dtype],
                                         offset, nbytes))
            body.append((offset, buffers, nbytes))
            offset += nbytes
        parts = [U64x2.pack(n, len(columns)), *directory]
        position = 16 + COLUMN.size * len(columns)
        for start, buffers, nbytes in body:
            if start > position:
                parts.append(b"\0" * (start - position))
            parts.extend(buffers)
            position = start + nbytes
        self._chunk(K_TASKS, parts)

    def close(self) -> None:
        """Write the end chunk: the part is complete."""
        self._chunk(K_END, [U64.pack(self.n_tasks)])
        self.out.flush()


def _narrow(name: bytes, what: str, values: np.ndarray, input_offsets: np.ndarray | None) -> np.ndarray:
    """``values`` as the type of column ``name``; GraphError naming the first task whose
    value does not fit. ``input_offsets`` maps input slots to tasks (for INPS)."""
    dtype = np.dtype(DTYPES[COLUMN_TYPES[name]])
    values = np.asarray(values)
    if len(values) and not np.can_cast(values.dtype, dtype):
        top = np.iinfo(dtype).max
        bad = np.flatnonzero((values < 0) | (values > top))
        if len(bad):
            i = int(bad[0])
            task = i if input_offsets is None else int(np.searchsorted(input_offsets, i, side="right")) - 1
            raise GraphError(f"cannot write task {task} of the graph: {what} {values[i]} does not fit "
                             f"column {name.decode()} ({_text(COLUMN_TYPES[name], True)}: 0 to {top})")
    return values.astype(dtype, copy=False)


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
    pieces = to_pieces(graph)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def to_pieces(graph: Graph) -> list:
    """The graph file as pieces (bytes, or views of the graph's columns) whose join is
    ``to_bytes(graph)``: to be written or sent one after another, without that copy."""
    data = to_bytes_small(graph)   # (a few tasks: the same bytes without the per-column numpy work)
    if data is not None:
        return [data]
    pieces = _Pieces()
    write(pieces, graph)
    return pieces.parts


class _Pieces:
    """A sink that keeps what the writer gives it, to be joined once: a BytesIO copies
    each write, and again each time it grows (a map-reduce's 10 MB const cost 3 copies
    into fresh memory, 5-30 ms each here). The pieces are bytes or views of the graph's
    columns, which nothing changes while the writer runs."""

    def __init__(self):
        self.parts: list = []

    def write(self, piece) -> int:
        self.parts.append(piece)
        return memoryview(piece).nbytes

    def flush(self) -> None:
        pass


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
    first, then the new ones). Returns the id of the first appended task.

    The new chunks are built in memory before the file is touched, so an append that
    fails with GraphError (a bad input id, a value that does not fit its column, a
    malformed file) leaves the file as it was. They are then written over the old end
    chunk and the file is synced to disk; an append interrupted while writing leaves a
    last part without a valid end chunk, which readers refuse as truncated."""
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        f = _open_new(path)
    except OSError as exc:
        raise GraphError(f"cannot append to {path}: {exc.strerror}") from None
    with f:
        size = f.seek(0, 2)
        scan = _scan_tables(f, size) if size else _empty_scan()
        total = scan["total"]
        part_base = total - scan["part_tasks"]
        if len(graph.inputs):
            low, high = int(graph.inputs.min()), int(graph.inputs.max())
            if low < 0 or high >= total + len(graph):
                bad = low if low < 0 else high
                raise GraphError(f"input {bad} does not exist (the file would hold {total + len(graph)} tasks)")
            if low < part_base:
                raise GraphError(f"input {low} lies in an earlier part of the file; "
                                 "only tasks of the last part can be inputs of appended tasks")
        tail = io.BytesIO()
        writer = GraphWriter(tail, scan, n_tasks=scan["part_tasks"], header=not size)
        writer.write_graph(graph, input_base=total)
        writer.close()
        try:
            f.seek(scan["end_offset"])
            f.write(tail.getbuffer())
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            raise GraphError(f"cannot append to {path}: {exc.strerror}") from None
    return total


def _open_new(path: str) -> BinaryIO:
    try:
        return open(path, "x+b")
    except FileExistsError:   # created meanwhile: append to it
        return open(path, "r+b")
    except OSError as exc:
        raise GraphError(f"cannot create {path}: {exc.strerror}") from None


def _empty_scan() -> dict:
    return {K_SYMBOLS: [], K_LABELS: [], K_REQUESTS: [], "part_tasks": 0, "total": 0, "end_offset": 0}


def _scan_tables(f: BinaryIO, size: int) -> dict:
    """Walk the chunk headers of the whole file, skipping task payloads, with the
    reader's checks on everything but task payloads (a chunk cut short, an unknown
    critical chunk, a malformed table or end chunk, a wrong task count). Returns the
    last part's tables, task count and end chunk offset, and the file's task count."""
    f.seek(0)
    total = 0
    position = 0
    state = _empty_scan()
    while position < size:
        _check_header(f.read(HEADER.size), position)
        position += HEADER.size
        state = _empty_scan()
        while True:
            raw = f.read(CHUNK.size)
            if len(raw) < CHUNK.size:
                raise GraphError(f"truncated file: chunk header at byte {position} is cut short")
            kind, _, length = CHUNK.unpack(raw)
            _check_chunk_length(kind, length)
            stored = length + _pad(length)
            if position + CHUNK.size + stored > size:
                raise GraphError(f"truncated file: {_text(kind)} chunk at byte {position + CHUNK.size} is cut short")
            if kind == K_END:
                _check_task_count(_end_count(f.read(length)), state["part_tasks"])
                state["end_offset"] = position
                f.seek(_pad(length), 1)
            elif kind in (K_SYMBOLS, K_LABELS, K_REQUESTS):
                state[kind] += _unpack_table(f.read(length), kind)
                f.seek(_pad(length), 1)
            elif kind == K_TASKS:
                if length < 16:
                    raise GraphError(f"malformed TASK chunk at task {total + state['part_tasks']}: too short")
                state["part_tasks"] += U64.unpack(f.read(8))[0]
                f.seek(length - 8 + _pad(length), 1)
            else:
                _check_ancillary_chunk(kind)
                f.seek(stored, 1)
            position += CHUNK.size + stored
            if kind == K_END:
                break
        total += state["part_tasks"]
    state["total"] = total
    return state


# ------------------------------------------------------------ checks shared by reader and appender
def _critical(name: bytes) -> bool:
    return 65 <= name[0] <= 90   # A-Z


def _check_chunk_length(kind: bytes, length: int) -> None:
    if length > MAX_CHUNK:
        raise GraphError(f"malformed {_text(kind)} chunk: length {length} exceeds 2^40 bytes")


def _check_ancillary_chunk(kind: bytes) -> None:
    if _critical(kind):
        raise GraphError(f"graph file uses chunk {_text(kind)} that this loomctl does not know")


def _end_count(payload) -> int:
    if len(payload) < 8:
        raise GraphError(f"malformed END chunk: payload is {len(payload)} bytes, expected 8")
    return U64.unpack(payload[:8])[0]


def _check_task_count(declared: int, read: int) -> None:
    if declared != read:
        raise GraphError(f"end of part declares {declared} tasks, but {read} were read")


# ----------------------------------------------------------------------- reading
class _Source:
    """Exact reads from a memory buffer (zero copy) or a stream (incremental)."""

    def __init__(self, data: bytes | memoryview | None = None, stream: BinaryIO | None = None):
        self.view = memoryview(data).cast("B") if data is not None else None
        self.stream = stream
        self.position = 0
        self.short = 0   # bytes that the last read cut short did get
        self.partial = b""   # the first of them

    def read(self, n: int, what: str | bytes) -> memoryview:
        """``what`` names the piece for the error: text, or a chunk kind (bytes)."""
        if self.view is not None:
            chunk = self.view[self.position:self.position + n]
        else:
            chunk = memoryview(_read_exact(self.stream, n))
        if len(chunk) < n:
            self.short = len(chunk)
            self.partial = bytes(chunk[:len(MAGIC)])
            if isinstance(what, bytes):
                what = f"{_text(what)} chunk"
            raise GraphError(f"truncated file: {what} at byte {self.position} is cut short")
        self.position += n
        return chunk


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    # in bounded pieces: a length read from a corrupt file must not allocate 2^40 bytes
    buf = bytearray()
    while len(buf) < n:
        piece = stream.read(min(n - len(buf), 1 << 24))
        if not piece:
            break
        buf += piece
    return bytes(buf)


def _check_header(raw, position: int = 0) -> None:
    if len(raw) < HEADER.size:
        if not len(raw) and not position:
            raise GraphError("empty file: not a graph file")
        raise GraphError(f"truncated file: header at byte {position} is cut short")
    magic, major, minor, features = HEADER.unpack(raw)
    if magic != MAGIC:
        raise GraphError("not a loomctl graph file (wrong magic number)")
    if major != VERSION[0]:
        raise GraphError(f"graph format version {major}.{minor} is not supported "
                         f"(this loomctl reads {VERSION[0]}.x)")
    unknown = features & ~KNOWN_FEATURES
    if unknown:
        raise GraphError(f"graph file needs features {unknown:#x} that this loomctl does not know")


def _unpack_table(payload, kind: bytes) -> list:
    name = kind.decode()
    try:
        values = msgpack.unpackb(payload, raw=False)
    except Exception:
        raise GraphError(f"malformed {name} chunk: not a msgpack array") from None
    if not isinstance(values, list):
        raise GraphError(f"malformed {name} chunk: not an array")
    if kind == K_REQUESTS:
        for value in values:
            if not isinstance(value, dict):
                raise GraphError(f"malformed {name} chunk: entries must be dict")
            if not all(type(k) is str and type(v) is int and v >= 0 for k, v in value.items()):
                raise GraphError(f"malformed {name} chunk: a request must map names (str) "
                                 "to amounts (non-negative int)")
    elif not all(type(v) is str for v in values):
        raise GraphError(f"malformed {name} chunk: entries must be str")
    return values


class _PartBuilder:
    def __init__(self, base: int):
        self.base = base   # whole-file id of the part's first task
        self.tables = {K_SYMBOLS: [], K_LABELS: [], K_REQUESTS: []}
        self.blocks: list[dict] = []
        self.n = 0

    def add_block(self, payload: memoryview) -> None:
        where = f"malformed TASK chunk at task {self.base + self.n}"
        if len(payload) < 16:
            raise GraphError(f"{where}: too short")
        n, n_columns = U64x2.unpack(payload[:16])
        if 16 + n_columns * COLUMN.size > len(payload):
            raise GraphError(f"{where}: column directory is cut short")
        columns = {}
        seen = set()
        for k in range(n_columns):
            name, dtype, offset, length = COLUMN.unpack(payload[16 + k * COLUMN.size:16 + (k + 1) * COLUMN.size])
            want = COLUMN_TYPES.get(name)
            if want is None and _critical(name):
                raise GraphError(f"graph file uses column {_text(name)} that this loomctl does not know")
            if name in seen:
                raise GraphError(f"{where}: column {_text(name)} appears twice")
            seen.add(name)
            if dtype not in DTYPES:
                raise GraphError(f"{where}: column {_text(name)} has unknown type code '{_text(dtype, True)}'")
            if want is not None and dtype != want:
                raise GraphError(f"{where}: column {_text(name)} has type {_text(dtype, True)}, "
                                 f"but must have type {_text(want, True)}")
            if offset + length > len(payload) or length % np.dtype(DTYPES[dtype]).itemsize:
                raise GraphError(f"{where}: column {_text(name)} is out of bounds")
            if want is not None:
                columns[name] = np.frombuffer(payload[offset:offset + length], dtype=DTYPES[dtype])
        for name in REQUIRED_COLUMNS:
            if name not in columns:
                raise GraphError(f"{where}: column {name.decode()} is missing")
        for name, column in columns.items():
            if name not in DATA_COLUMNS and len(column) != n:
                raise GraphError(f"{where}: column {name.decode()} has {len(column)} entries, expected {n}")
        for name, lengths in DATA_COLUMNS.items():
            expected = int(columns[lengths].sum(dtype=np.uint64)) if lengths in columns else 0
            if name not in columns:
                if expected:
                    raise GraphError(f"{where}: column {name.decode()} is missing, but {lengths.decode()} "
                                     f"says it has {expected} entries")
            elif len(columns[name]) != expected:
                raise GraphError(f"{where}: column {name.decode()} has {len(columns[name])} entries, "
                                 f"expected {expected}")
        columns["n"] = n
        self.blocks.append(columns)
        self.n += n

    def graph(self) -> Graph:
        b = self.blocks
        n = self.n
        base = self.base
        types = _cat(b, b"TYPE", np.uint16)
        request_codes = _cat(b, b"RCOD", np.uint16)
        label_codes = _cat(b, b"LCOD", np.uint32)
        for codes, table, what in ((types, self.tables[K_SYMBOLS], "symbol code {} is not in the symbol table"),
                                   (label_codes, self.tables[K_LABELS], "label code {} is not in the label table"),
                                   (request_codes, self.tables[K_REQUESTS], "request code {} is not in the request table")):
            # symbol codes count from 0, label and request codes from 1 (0: none)
            limit = len(table) - (codes is types)
            if n and int(codes.max()) > limit:
                bad = int(np.flatnonzero(codes > limit)[0])
                raise GraphError(f"task {base + bad}: " + what.format(codes[bad]))
        counts = _cat(b, b"NINP", np.uint32)
        inputs = _cat(b, b"INPS", np.uint32)
        if len(inputs) and inputs.max() >= n:
            owners = np.repeat(np.arange(n), counts)
            bad = int(np.flatnonzero(inputs >= n)[0])
            raise GraphError(f"task {base + int(owners[bad])}: input {base + int(inputs[bad])} "
                             "does not exist (dangling input)")
        # every input is < n: int32 (the same bits) when n fits, else int64
        inputs = inputs.view(np.int32) if n <= (1 << 31) else inputs.astype(np.int64)
        return Graph(
            symbols=self.tables[K_SYMBOLS], types=types,
            input_offsets=offsets_from_lengths(counts, compact=True), inputs=inputs,
            configs=VarBytes.from_lengths(_cat(b, b"CLEN", np.uint32), _config_data(b), compact=True),
            flags=_cat(b, b"FLAG", np.uint8),
            request_codes=request_codes, requests=self.tables[K_REQUESTS],
            label_codes=label_codes, labels=self.tables[K_LABELS],
            checkpoints=_optional(b, b"CKP"), metadata=_optional(b, b"MET"),
            priorities=_cat(b, b"prio", np.uint32).view(np.int32) if any(b"prio" in blk for blk in b) else None,
        )


def _cat(blocks: list[dict], name: bytes, dtype) -> np.ndarray:
    """A column of the part (a copy: the Graph keeps nothing of the buffer it was read from,
    which may be a received frame to be freed once read)."""
    if len(blocks) == 1 and name in blocks[0]:   # the usual small file: one block
        return np.array(blocks[0][name], dtype=dtype)
    if not any(name in blk for blk in blocks):   # (zeros: pages the process never touches)
        return np.zeros(sum(blk["n"] for blk in blocks) if name not in DATA_COLUMNS else 0, dtype)
    parts = [blk[name] if name in blk else np.zeros(blk["n"] if name not in DATA_COLUMNS else 0, dtype)
             for blk in blocks]
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)


def _config_data(blocks: list[dict]):
    """The part's config bytes. A copy, unless the file was read from a read-only buffer
    (bytes, a received frame marked read-only) that is mostly these configs: then a view
    of it, which keeps at most twice the configs alive (a 10 MB const is not copied again
    on the way to the worker; it cost a server 5-12 ms of a map-reduce's submission)."""
    if len(blocks) == 1 and b"CFGD" in blocks[0]:
        read = blocks[0][b"CFGD"].base   # (the slice of the buffer the column was read from)
        if isinstance(read, memoryview) and read.readonly and 2 * read.nbytes >= memoryview(read.obj).nbytes:
            return read
    return _join(blocks, b"CFGD")


def _join(blocks: list[dict], name: bytes) -> bytes:
    return b"".join(blk[name].data if name in blk else b"" for blk in blocks)


def _optional(blocks: list[dict], prefix: bytes) -> VarBytes | None:
    if not any(prefix + b"L" in blk for blk in blocks):
        return None
    lengths = np.concatenate([blk.get(prefix + b"L", np.zeros(blk["n"], np.uint32)) for blk in blocks])
    return VarBytes.from_lengths(lengths, _join(blocks, prefix + b"D"), compact=True)


def iter_parts(source: _Source) -> Iterator[Graph]:
    """Parse parts one after another as the bytes arrive."""
    base = 0
    while True:
        _check_header(_read_header(source))
        part = _PartBuilder(base)
        while True:
            kind, _, length = CHUNK.unpack(source.read(CHUNK.size, "chunk header"))
            _check_chunk_length(kind, length)
            payload = source.read(length, kind)
            source.read(_pad(length), "chunk padding")
            if kind == K_END:
                _check_task_count(_end_count(payload), part.n)
                break
            if kind in part.tables:
                part.tables[kind] = part.tables[kind] + _unpack_table(payload, kind)
            elif kind == K_TASKS:
                part.add_block(payload)
            else:
                _check_ancillary_chunk(kind)
        yield part.graph().deduplicated()
        base += part.n
        if _exhausted(source):
            return


def _read_header(source: _Source) -> memoryview:
    try:
        return source.read(HEADER.size, "header")
    except GraphError:
        if source.position == 0 and source.short == 0:
            raise GraphError("empty file: not a graph file") from None
        if source.position == 0 and not MAGIC.startswith(source.partial):
            raise GraphError("not a loomctl graph file (wrong magic number)") from None
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
    if validate and isinstance(src, (bytes, bytearray, memoryview)):
        graph = read_small(src)   # (a few tasks: the same Graph without the per-column numpy work)
        if graph is not None:
            return graph
    source = _as_source(src)
    try:
        graph = Graph.concat(list(iter_parts(source)))
        if validate:
            graph.validate()
    except GraphError:
        raise
    except (ValueError, struct.error, OverflowError, TypeError, IndexError, MemoryError) as exc:
        raise GraphError(f"malformed graph file: {exc}") from None
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
