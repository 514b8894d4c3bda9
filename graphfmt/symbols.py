"""Built-in task symbols and their configuration encodings.

Invariants:
- Every built-in symbol starts with ``loom/``; a symbol outside ``loom/`` belongs to a
  worker extension and is never rejected here.
- Integers in configurations are unsigned 64-bit little-endian.
- ``check_config(symbol, n_inputs, config)`` returns ``None`` for a well-formed task or a
  short sentence saying what is wrong; it never raises.
"""

from __future__ import annotations

import struct

import msgpack

CONST = "loom/data/const"
MERGE = "loom/data/merge"
OPEN = "loom/data/open"
SPLIT = "loom/data/split"
SAVE = "loom/data/save"
ARRAY_MAKE = "loom/array/make"
GET = "loom/base/get"
SLICE = "loom/base/slice"
SIZE = "loom/base/size"
LENGTH = "loom/base/length"
RUN = "loom/run/run"
PY_VALUE = "loom/py/value"
PY_CALL = "loom/py/call"
DSLICE = "loom/scheduler/dslice"
DGET = "loom/scheduler/dget"
# Not a task: a reference to data the server already holds (a client future).
# Valid only in a submission; config is the server-side task id (u64).
FUTURE = "loom/client/future"
# Not a task: inside a redirection sub-plan, input i of the redirecting task (u64).
TASK_INPUT = "loom/client/input"

_U64 = struct.Struct("<Q")
_U64x2 = struct.Struct("<QQ")


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(config: bytes) -> int:
    return _U64.unpack(config)[0]


def encode_slice(start: int, end: int) -> bytes:
    return _U64x2.pack(start, end)


def decode_slice(config: bytes) -> tuple[int, int]:
    return _U64x2.unpack(config)


def encode_run(args: list, map_inputs: list, map_outputs: list) -> bytes:
    """args: list of str/bytes; map_inputs: one target per input (None = stdin,
    "$NAME" = variable, else a file name); map_outputs: file names, None = stdout."""
    return msgpack.packb({"args": args, "map_inputs": map_inputs, "map_outputs": map_outputs},
                         use_bin_type=True)


def decode_run(config: bytes) -> dict:
    return msgpack.unpackb(config, raw=False)


def decode_split(config: bytes) -> bytes:
    """The delimiter byte; newline when the config is empty."""
    return config or b"\n"


# symbol -> (min inputs, max inputs or None for any)
ARITY: dict[str, tuple[int, int | None]] = {
    CONST: (0, 0), MERGE: (0, None), OPEN: (0, 0), SPLIT: (1, 1), SAVE: (1, 1),
    ARRAY_MAKE: (0, None), GET: (1, 1), SLICE: (1, 1), SIZE: (1, 1), LENGTH: (1, 1),
    RUN: (0, None), PY_VALUE: (0, 0), PY_CALL: (1, None), DSLICE: (1, 1), DGET: (1, 1),
    FUTURE: (0, 0), TASK_INPUT: (0, 0),
}
BUILTINS = frozenset(ARITY)

# config length that a symbol demands (None: any length)
FIXED_CONFIG_LEN: dict[str, int] = {
    GET: 8, SLICE: 16, SIZE: 0, LENGTH: 0, ARRAY_MAKE: 0, DSLICE: 0, DGET: 0,
    FUTURE: 8, TASK_INPUT: 8,
}

# symbols that request one cpu unless the user says otherwise
DEFAULT_ONE_CPU = frozenset({RUN, PY_CALL, PY_VALUE, SAVE})


def is_known(symbol: str) -> bool:
    return symbol in BUILTINS or not symbol.startswith("loom/")


CONTENT_CHECKED = (RUN, OPEN, SAVE)   # symbols whose config check reads more than its length


def check_config(symbol: str, n_inputs: int, config: bytes) -> str | None:
    """A problem with a task's inputs or config, or None; of symbols other than those in
    CONTENT_CHECKED only len(config) is read (a memoryview will do)."""
    arity = ARITY.get(symbol)
    if arity is None:
        return None if is_known(symbol) else f"unknown symbol {symbol!r}"
    lo, hi = arity
    if n_inputs < lo or (hi is not None and n_inputs > hi):
        want = str(lo) if lo == hi else f"at least {lo}"
        return f"{symbol} takes {want} input(s), got {n_inputs}"
    need = FIXED_CONFIG_LEN.get(symbol)
    if need is not None and len(config) != need:
        return f"malformed config for {symbol}: {len(config)} bytes, expected {need}"
    if symbol == SPLIT and len(config) > 1:
        return f"malformed config for {symbol}: delimiter must be one byte"
    if symbol in (OPEN, SAVE):
        try:
            name = config.decode()
        except UnicodeDecodeError:
            return f"malformed config for {symbol}: file name is not UTF-8"
        if not name:
            return f"malformed config for {symbol}: empty file name"
        if symbol == SAVE and not name.startswith("/"):
            return f"malformed config for {symbol}: file name {name!r} is not absolute"
    if symbol == RUN:
        return _check_run(n_inputs, config)
    return None


def _check_run(n_inputs: int, config: bytes) -> str | None:
    try:
        cfg = decode_run(config)
    except Exception:
        return "malformed config for loom/run/run: not msgpack"
    if not isinstance(cfg, dict):
        return "malformed config for loom/run/run: not a map"
    args = cfg.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, (str, bytes)) for a in args):
        return "malformed config for loom/run/run: 'args' must be a non-empty list of strings"
    map_inputs = cfg.get("map_inputs", [])
    if not isinstance(map_inputs, list) or len(map_inputs) != n_inputs:
        return "malformed config for loom/run/run: 'map_inputs' must name every input"
    map_outputs = cfg.get("map_outputs", [None])
    if not isinstance(map_outputs, list) or not map_outputs:
        return "malformed config for loom/run/run: 'map_outputs' must be a non-empty list"
    for name in list(map_inputs) + list(map_outputs):
        if name is not None and (not isinstance(name, str) or not name or "/" in name.lstrip("$")):
            return f"malformed config for loom/run/run: bad file name {name!r}"
    return None
