"""The byte layout of a binary graph file (man/loom-graph.5), defined once.

``fileformat`` (the general reader and writer) and the small-graph fast paths
``smallread`` and ``smallwrite`` all take the magic number, version, header and chunk
structs, chunk kinds and column types from here, so that the three cannot drift apart.

Invariants:
- Everything is little-endian (the structs say "<").
- Every column of version 1.0 has exactly one type code (``COLUMN_TYPES``); ``DTYPES``
  and ``FORMATS`` give its numpy dtype and its memoryview/struct format letter.
- Nothing here reads or writes: this module holds constants only.
"""

from __future__ import annotations

import struct

MAGIC = b"\x89LOOMGF\n"
VERSION = (1, 0)
KNOWN_FEATURES = 0

HEADER = struct.Struct("<8sHHI")    # magic, major, minor, feature bits
CHUNK = struct.Struct("<4sIQ")      # kind, flags, payload length
COLUMN = struct.Struct("<4s4sQQ")   # column id, type code, offset in the chunk, length in bytes
U64x2 = struct.Struct("<QQ")        # a TASK chunk's task count and column count
U64 = struct.Struct("<Q")           # an END chunk's task count

K_SYMBOLS, K_REQUESTS, K_LABELS, K_TASKS, K_END = b"SYMB", b"RREQ", b"LABL", b"TASK", b"END!"

# type code -> numpy dtype, and -> memoryview / struct format letter
DTYPES = {b"u1\0\0": "<u1", b"u2\0\0": "<u2", b"u4\0\0": "<u4", b"u8\0\0": "<u8"}
FORMATS = {b"u1\0\0": "B", b"u2\0\0": "H", b"u4\0\0": "I", b"u8\0\0": "Q"}
# The type code of every column of version 1.0; a reader refuses any other.
COLUMN_TYPES = {b"TYPE": b"u2\0\0", b"NINP": b"u4\0\0", b"INPS": b"u4\0\0", b"CLEN": b"u4\0\0",
                b"CFGD": b"u1\0\0", b"FLAG": b"u1\0\0", b"RCOD": b"u2\0\0", b"LCOD": b"u4\0\0",
                b"CKPL": b"u4\0\0", b"CKPD": b"u1\0\0", b"METL": b"u4\0\0", b"METD": b"u1\0\0",
                b"prio": b"u4\0\0"}   # (ancillary: user priorities, int32 stored as two's complement)
# data column -> the column holding its per-task lengths
DATA_COLUMNS = {b"INPS": b"NINP", b"CFGD": b"CLEN", b"CKPD": b"CKPL", b"METD": b"METL"}
BYTE_COLUMNS = (b"CFGD", b"CKPD", b"METD")
REQUIRED_COLUMNS = (b"TYPE", b"NINP", b"CLEN", b"FLAG")
