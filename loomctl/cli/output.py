"""The one output layer of the CLI: text for people, JSON for scripts, quiet for pipes.

Invariants:
- A command builds plain data (dicts, lists, numbers, strings) and hands it to ``emit``
  with a text renderer and, optionally, the single value that quiet mode prints.
- JSON mode prints exactly one JSON document on stdout; text and quiet never print JSON.
- Text and quiet output pass through ``escape`` (newlines and tabs kept), and tables
  cut long cells (loomctl.textfmt): text a task or plan controls cannot drive the
  terminal. JSON carries the whole text (json.dumps escapes control characters).
- Errors never go through here: they are raised as CliError and printed by main().
- The log lines of ``server start`` and ``worker start`` are escaped the same way
  (SafeFormatter).
- Files named on the command line are checked here before anything is read or
  written: an input that is not a regular file, an output file that is a directory or
  a fifo, an output directory that is a file: one line, BAD_INPUT. Files are written
  under a temporary name, renamed at the end, with the mode the umask gives.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import stat
import sys
import tempfile
from typing import Any, Callable

import typer

from loomctl.textfmt import LINE_LIMIT, escape, human_bytes, key_values, plural, shorten, table  # noqa: F401


class ExitCode(enum.IntEnum):
    """Exit codes of every loomctl command (documented in loomctl(1))."""
    OK = 0
    TASK_FAILED = 1      # a job ran and one of its tasks failed
    USAGE = 2            # bad command-line arguments
    BAD_INPUT = 3        # a graph file, plan or trace is malformed
    UNAVAILABLE = 4      # no server, or the connection was refused or lost
    INTERRUPTED = 130    # Ctrl-C (128 + SIGINT)
    PIPE_CLOSED = 141    # the reader of stdout went away (128 + SIGPIPE, as a shell shows)


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
            text = escape(essential, keep="\n\t")
        else:
            text = escape(render(data) if render else data, keep="\n\t")
        if text:
            sys.stdout.write(text.rstrip("\n") + "\n")
            sys.stdout.flush()

    @property
    def is_text(self) -> bool:
        return self.mode == "text"


class SafeFormatter(logging.Formatter):
    """Log lines of the server and worker commands: a message (worker names, task
    errors: text that peers and plans choose) has its control characters escaped and
    is cut to a length, one record a line; a traceback below it stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shorten(super().formatMessage(record), 4 * LINE_LIMIT)


def note(message: str) -> None:
    """A remark on stderr that is not an error (e.g. a trace that was cut short)."""
    sys.stderr.write(f"loomctl: note: {shorten(message)}\n")
    sys.stderr.flush()


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a fifo" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if not stat.S_ISREG(mode) else "a file")


def check_output_file(path: str) -> None:
    """An output file (not "-") may be new or a regular file, nothing else."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return   # a missing file is made; a bad directory is reported when writing
    if not stat.S_ISREG(mode):
        raise CliError(f"{path}: is {_kind(mode)}, not a regular file (-o - writes standard output)")


def check_output_dir(path: str) -> None:
    """An output directory (not "-") may be new or a directory, nothing else."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISDIR(mode):
        raise CliError(f"{path}: is {_kind(mode)}, not a directory (-o DIR writes one file per result there)")


def umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_file(path: str, write: Callable[[Any], None]) -> None:
    """``write(f)`` into a temporary file next to ``path``, renamed to ``path`` at the
    end (a failure leaves no partial file), with the mode a new file gets from the umask."""
    check_output_file(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".loomctl-")
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise CliError(f"cannot write {path}: {exc.strerror}") from None
    except BaseException:
        os.unlink(tmp)
        raise


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
