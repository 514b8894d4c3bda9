"""Text for people: tables, key/value lists, byte sizes, and terminal-safe strings.

A leaf module (nothing of loomctl, no typer), shared by the CLI's output layer and the
trace reports.

Invariants:
- ``escape`` makes any text safe to print on a terminal: every control character (C0,
  DEL, C1, and the bidirectional overrides that reorder what a terminal shows) becomes a
  visible escape such as ``\\x1b`` or ``\\n``; ``shorten`` also cuts it to a length.
- ``table`` and ``key_values`` pass every cell through ``shorten``, so text that a task,
  a plan or a worker controls (labels, names, messages, paths) can never move the
  cursor, retitle the terminal, or spread over screens.
"""

from __future__ import annotations

import re
from typing import Any

LINE_LIMIT = 1000   # characters of a one-line error
CELL_LIMIT = 60     # characters of a table cell
VALUE_LIMIT = 300   # characters of a key/value value

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _visible(match: re.Match) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: Any, keep: str = "") -> str:
    """``text`` with every control character made visible, except those in ``keep``
    (e.g. "\\n\\t" for a multi-line report)."""
    text = text if isinstance(text, str) else str(text)
    if keep:
        return _CONTROL.sub(lambda m: m.group() if m.group() in keep else _visible(m), text)
    return _CONTROL.sub(_visible, text)


def shorten(text: Any, limit: int = LINE_LIMIT) -> str:
    """``escape(text)`` cut to about ``limit`` characters, saying how much was left out."""
    text = escape(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def table(rows: list, headers: list, limit: int = CELL_LIMIT, **kw) -> str:
    from tabulate import tabulate
    cells = [[shorten(v, limit) if isinstance(v, str) else v for v in row] for row in rows]
    return tabulate(cells, headers=headers, tablefmt="simple", **kw)


def key_values(pairs: list[tuple[str, Any]], limit: int = VALUE_LIMIT) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{width}}  {shorten(v, limit)}" for k, v in pairs)


def human_bytes(n) -> str:
    """'812 B', '3.4 MiB'; '-' for an unknown amount."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 result', '3 results'."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
