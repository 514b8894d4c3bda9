"""A fast path of ``fileformat.read`` for small graph files held in memory.

A submission of a few tasks (an interactive client, an ``as_completed`` loop) is read and
validated here with Python ints over the buffer instead of the general reader's per-column
numpy work, which costs ~100 us however small the graph. The layout (structs, chunk
kinds, column types) is ``layout.py``'s, as for the general reader.

Invariants:
- ``read_small(data)`` returns exactly the Graph that ``read(data)`` returns (same
  columns, dtypes, tables; validated), or None. It returns None for anything it does not
  take in whole (more than SMALL_TASKS tasks, several parts or task blocks, ancillary
  chunks, duplicated table entries, a graph that is not in topological order) and for
  any problem at all: the general reader then runs and raises its one-line error.
  ``tests/test_graphfile.py`` drives both on random small graphs and compares.
- It never raises.
"""

from __future__ import annotations

import struct
import sys
from itertools import accumulate

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph, VarBytes, table_key
from graphfmt.layout import (MAGIC, VERSION, KNOWN_FEATURES, HEADER, CHUNK, COLUMN, U64x2, U64,
                             K_SYMBOLS, K_REQUESTS, K_LABELS, K_TASKS, K_END, FORMATS,
                             COLUMN_TYPES, DATA_COLUMNS, BYTE_COLUMNS, REQUIRED_COLUMNS)

SMALL_TASKS = 64
SMALL_BYTES = 1 << 16

# column -> (type code, memoryview format, itemsize)
_COLUMNS = {name: (code, FORMATS[code], struct.calcsize(FORMATS[code])) for name, code in COLUMN_TYPES.items()}
_TABLES = (K_SYMBOLS, K_LABELS, K_REQUESTS)
_LITTLE = sys.byteorder == "little"


def read_small(data) -> Graph | None:
    if not _LITTLE or len(data) > SMALL_BYTES:
        return None
    try:
        return _read(memoryview(data).cast("B"))
    except Exception:   # anything unusual: the general reader decides (and names the error)
        return None


def _read(view: memoryview) -> Graph | None:
    from graphfmt.fileformat import _unpack_table
    total = len(view)
    if total < 16:
        return None
    magic, major, _, features = HEADER.unpack_from(view, 0)
    if magic != MAGIC or major != VERSION[0] or features & ~KNOWN_FEATURES:
        return None
    pos = 16
    tables = {kind: [] for kind in _TABLES}
    block = None
    while True:
        if pos + 16 > total:
            return None
        kind, _, length = CHUNK.unpack_from(view, pos)
        start = pos + 16
        pos = start + length + (-length % 8)
        if pos > total:
            return None
        payload = view[start:start + length]
        if kind == K_END:
            if length < 8 or block is None or U64.unpack_from(payload, 0)[0] != block[0]:
                return None
            break
        if kind in tables:
            tables[kind] = tables[kind] + _unpack_table(payload, kind)
        elif kind == K_TASKS and block is None:
            block = _block(payload)
            if block is None:
                return None
        else:
            return None
    if pos != total:
        return None   # another part follows
    symbols, labels, requests = tables[K_SYMBOLS], tables[K_LABELS], tables[K_REQUESTS]
    for table in (symbols, labels, requests):
        if len({table_key(v) for v in table}) != len(table):
            return None   # (the general reader recodes duplicates)
    n, cols = block
    types = cols[b"TYPE"]
    counts = cols[b"NINP"]
    inputs = cols.get(b"INPS", [])
    rcodes = cols.get(b"RCOD")
    lcodes = cols.get(b"LCOD")
    n_symbols = len(symbols)
    if any(code >= n_symbols for code in types):
        return None
    if lcodes is not None and any(code > len(labels) for code in lcodes):
        return None
    if rcodes is not None and any(code > len(requests) for code in rcodes):
        return None
    # inputs before their consumer (topological order): no cycle to look for
    k = 0
    for i, count in enumerate(counts):
        for x in inputs[k:k + count]:
            if x >= i:
                return None
        k += count
    config_lengths = cols[b"CLEN"]
    config_data = cols.get(b"CFGD", b"")
    k = 0
    configs = []
    for length in config_lengths:
        configs.append(config_data[k:k + length])
        k += length
    checked = set()
    for i in range(n):
        key = (types[i], counts[i], configs[i])
        if key in checked:
            continue
        checked.add(key)
        symbol = symbols[types[i]]
        if not S.is_known(symbol) or S.check_config(symbol, counts[i], configs[i]):
            return None
    checkpoints = None
    if b"CKPL" in cols:
        checkpoints = _varbytes(cols[b"CKPL"], cols.get(b"CKPD", b""))
        k = 0
        data = checkpoints.data
        for length in cols[b"CKPL"]:
            if length:
                path = data[k:k + length]
                path.decode()   # (not UTF-8: raises, and the general reader names it)
                if not path.startswith(b"/"):
                    return None
            k += length
    metadata = _varbytes(cols[b"METL"], cols.get(b"METD", b"")) if b"METL" in cols else None
    prio = cols.get(b"prio")
    offsets = np.array([0, *accumulate(counts)], np.int32)   # (the general reader's compact columns: int32)
    return Graph(
        symbols=symbols, types=np.array(types, np.uint16), input_offsets=offsets,
        inputs=np.array(inputs, np.int32), configs=_varbytes(config_lengths, config_data),
        flags=np.array(cols[b"FLAG"], np.uint8),
        request_codes=np.array(rcodes, np.uint16) if rcodes is not None else np.zeros(n, np.uint16),
        requests=requests,
        label_codes=np.array(lcodes, np.uint32) if lcodes is not None else np.zeros(n, np.uint32),
        labels=labels, checkpoints=checkpoints, metadata=metadata,
        priorities=np.array(prio, np.uint32).view(np.int32) if prio is not None else None)


def _varbytes(lengths: list, data: bytes) -> VarBytes:
    return VarBytes(np.array([0, *accumulate(lengths)], np.int32), data)


def _block(payload: memoryview):
    """(n, {column: list of ints, or bytes for byte data}) of a TASK chunk the general
    reader takes whole, else None."""
    size = len(payload)
    n, n_columns = U64x2.unpack_from(payload, 0)
    if n > SMALL_TASKS or 16 + n_columns * COLUMN.size > size:
        return None
    cols = {}
    for k in range(n_columns):
        name, dtype, offset, length = COLUMN.unpack_from(payload, 16 + COLUMN.size * k)
        spec = _COLUMNS.get(name)
        if spec is None or name in cols or dtype != spec[0] or offset + length > size or length % spec[2]:
            return None
        raw = payload[offset:offset + length]
        cols[name] = bytes(raw) if name in BYTE_COLUMNS else raw.cast(spec[1]).tolist()
    for name in REQUIRED_COLUMNS:
        if name not in cols:
            return None
    for name, values in cols.items():
        lengths = DATA_COLUMNS.get(name)
        if lengths is None:
            if len(values) != n:
                return None
        elif lengths not in cols or len(values) != sum(cols[lengths]):
            return None
    for name, lengths in DATA_COLUMNS.items():
        if name not in cols and lengths in cols and sum(cols[lengths]):
            return None
    return n, cols
