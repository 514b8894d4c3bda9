"""The one output layer of the CLI: text for people, JSON for scripts, quiet for pipes.

Invariants:
- A command builds plain data (dicts, lists, numbers, strings) and hands it to ``emit``
  with a text renderer and, optionally, the single value that quiet mode prints.
- JSON mode prints exactly one JSON document on stdout; text and quiet never print JSON.
- Errors never go through here: they are raised as CliError and printed by main().
"""

from __future__ import annotations

import enum
import json
import sys
from typing import Any, Callable

import typer
from tabulate import tabulate


class ExitCode(enum.IntEnum):
    """Exit codes of every loomctl command (documented in loomctl(1))."""
    OK = 0
    TASK_FAILED = 1      # a job ran and one of its tasks failed
    USAGE = 2            # bad command-line arguments
    BAD_INPUT = 3        # a graph file, plan or trace is malformed
    UNAVAILABLE = 4      # no server, or the connection was refused or lost
    INTERRUPTED = 130


class CliError(Exception):
    def __init__(self, message: str, code: ExitCode = ExitCode.BAD_INPUT):
        super().__init__(message)
        self.code = code


JsonOption = typer.Option(False, "--json", help="Print one JSON document instead of tables.")
QuietOption = typer.Option(False, "--quiet", "-q", help="Print only the essential value.")


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.mode = "json" if json_mode else "quiet" if quiet else "text"

    def emit(self, data: Any, render: Callable[[Any], str] | None = None, essential: Any = None) -> None:
        if self.mode == "json":
            text = json.dumps(data, indent=2, default=_jsonable)
        elif self.mode == "quiet":
            if essential is None:
                return
            text = str(essential)
        else:
            text = render(data) if render else str(data)
        if text:
            sys.stdout.write(text.rstrip("\n") + "\n")
            sys.stdout.flush()

    @property
    def is_text(self) -> bool:
        return self.mode == "text"


def table(rows: list, headers: list, **kw) -> str:
    return tabulate(rows, headers=headers, tablefmt="simple", **kw)


def key_values(pairs: list[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)


def human_bytes(n) -> str:
    """'812 B', '3.4 MiB'; '-' for an unknown amount."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class Progress:
    """Job progress on stderr: a redrawn bar on a terminal, a plain line every few
    seconds otherwise, nothing in quiet/JSON mode."""

    def __init__(self, enabled: bool = True, interval: float = 2.0):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval
        import time
        self.last_line = time.monotonic()   # plain lines start after one interval
        self.shown = False

    def update(self, done: int, failed: int, total: int, elapsed: float, force: bool = False) -> None:
        if not self.enabled:
            return
        import time
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, "
                             f"{failed} failed, {elapsed:.1f} s ")
            sys.stderr.flush()
            self.shown = True
        elif (force and self.shown) or time.monotonic() - self.last_line >= self.interval:
            self.last_line = time.monotonic()
            self.shown = True
            sys.stderr.write(f"progress: {done}/{total} tasks done, {failed} failed, {elapsed:.1f} s elapsed\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.shown:  # end the redrawn bar's line
            sys.stderr.write("\n")
            sys.stderr.flush()
