"""A fast path of ``fileformat.to_bytes`` for small graphs (what a client sends when it
submits a few tasks): the same bytes, built with struct and Python ints instead of the
general writer's per-column numpy work (~150 us however small the graph). The layout
(structs, chunk kinds, column types) is ``layout.py``'s, as for the general writer.

Invariants:
- ``to_bytes_small(graph)`` returns exactly the bytes ``to_bytes(graph)`` writes, or
  None: for more than SMALL_TASKS tasks or table entries, and for any value the general
  writer would refuse (it then runs and raises its one-line error).
  ``tests/test_graphfile.py`` compares both on random small graphs.
- It never raises.
"""

from __future__ import annotations

import struct
import sys

import msgpack

from graphfmt.graph import LARGE_ITEM, Graph, table_key
from graphfmt.layout import (MAGIC, VERSION, CHUNK, COLUMN, HEADER, U64x2, U64, K_SYMBOLS, K_LABELS,
                             K_REQUESTS, K_TASKS, K_END, COLUMN_TYPES, FORMATS)

SMALL_TASKS = 64
_LITTLE = sys.byteorder == "little"


def to_bytes_small(graph) -> bytes | None:
    if not _LITTLE or not isinstance(graph, Graph) or len(graph) > SMALL_TASKS \
            or graph.configs.total() >= LARGE_ITEM:   # (a large config: passed on by reference)
        return None
    try:
        return _write(graph)
    except Exception:   # anything unusual: the general writer decides (and names the error)
        return None


def _pad(n: int) -> int:
    return -n % 8


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return CHUNK.pack(kind, 0, len(payload)) + payload + b"\0" * _pad(len(payload))


def _table(values: list) -> tuple[list, list]:
    """(code per value, the distinct values in first-seen order)."""
    fresh, new, lut = {}, [], []
    for value in values:
        k = table_key(value)
        code = fresh.get(k)
        if code is None:
            code = fresh[k] = len(new)
            new.append(value)
        lut.append(code)
    return lut, new


def _column(values: list, name: bytes) -> bytes | None:
    """``values`` packed as column ``name``, or None when one does not fit its type."""
    fmt = FORMATS[COLUMN_TYPES[name]]
    limit = 1 << (8 * struct.calcsize(fmt))
    for v in values:
        if not 0 <= v < limit:
            return None
    return struct.pack(f"<{len(values)}{fmt}", *values)


def _write(graph: Graph) -> bytes | None:
    n = len(graph)
    symbols, labels, requests = graph.symbols, graph.labels, graph.requests
    if max(len(symbols), len(labels), len(requests)) > SMALL_TASKS:
        return None
    types = graph.types.tolist()
    if n and max(types) >= len(symbols):
        return None
    offsets = graph.input_offsets.tolist()
    counts = [offsets[i + 1] - offsets[i] for i in range(n)]
    config_offsets = graph.configs.offsets.tolist()
    columns = [(b"NINP", counts), (b"INPS", graph.inputs.tolist()),
               (b"CLEN", [config_offsets[i + 1] - config_offsets[i] for i in range(n)]),
               (b"FLAG", graph.flags.tolist())]
    packed = {}
    for name, values in columns:
        raw = _column(values, name)
        if raw is None:
            return None
        packed[name] = raw
    extra = {}
    for prefix, column in ((b"CKP", graph.checkpoints), (b"MET", graph.metadata)):
        if column is not None:
            column_offsets = column.offsets.tolist()
            raw = _column([column_offsets[i + 1] - column_offsets[i] for i in range(n)], prefix + b"L")
            if raw is None:
                return None
            extra[prefix] = (raw, column_offsets, column.data)
    out = [HEADER.pack(MAGIC, *VERSION, 0)]
    luts = {}
    for kind, values in ((K_SYMBOLS, symbols), (K_LABELS, labels), (K_REQUESTS, requests)):
        lut, new = _table(values)
        luts[kind] = lut
        if new:
            out.append(_chunk(kind, msgpack.packb(new, use_bin_type=True)))
    if n:
        symbol_lut = luts[K_SYMBOLS]
        cols = [(b"TYPE", struct.pack(f"<{n}H", *[symbol_lut[t] for t in types])),
                (b"NINP", packed[b"NINP"]), (b"INPS", packed[b"INPS"]), (b"CLEN", packed[b"CLEN"]),
                (b"CFGD", bytes(memoryview(graph.configs.data)[config_offsets[0]:config_offsets[n]])),
                (b"FLAG", packed[b"FLAG"])]
        request_codes = graph.request_codes.tolist()
        if any(request_codes):
            lut = luts[K_REQUESTS]
            cols.append((b"RCOD", struct.pack(f"<{n}H", *[lut[c - 1] + 1 if c else 0
                                                         for c in request_codes])))
        label_codes = graph.label_codes.tolist()
        if any(label_codes):
            lut = luts[K_LABELS]
            cols.append((b"LCOD", struct.pack(f"<{n}I", *[lut[c - 1] + 1 if c else 0
                                                         for c in label_codes])))
        if graph.priorities is not None:
            prio = graph.priorities.tolist()
            if any(prio):
                cols.append((b"prio", struct.pack(f"<{n}i", *prio)))
        for prefix in (b"CKP", b"MET"):
            if prefix in extra:
                raw, column_offsets, data = extra[prefix]
                if column_offsets[n] > column_offsets[0]:
                    cols.append((prefix + b"L", raw))
                    cols.append((prefix + b"D", bytes(memoryview(data)[column_offsets[0]:column_offsets[n]])))
        directory, body = [], []
        offset = position = 16 + COLUMN.size * len(cols)
        for name, raw in cols:
            offset += _pad(offset)
            directory.append(COLUMN.pack(name, COLUMN_TYPES[name], offset, len(raw)))
            if offset > position:
                body.append(b"\0" * (offset - position))
            body.append(raw)
            offset += len(raw)
            position = offset
        out.append(_chunk(K_TASKS, b"".join([U64x2.pack(n, len(cols)), *directory, *body])))
    out.append(_chunk(K_END, U64.pack(n)))
    return b"".join(out)
