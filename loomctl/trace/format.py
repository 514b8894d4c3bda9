"""The trace file format (documented in loom-trace(5)) and its writer.

A trace directory holds one file per process: ``server.trace`` and
``worker-<name>.trace``. A file is a sequence of msgpack maps ("records"), each with a
kind ``k``. The first record of a file is a ``header`` (format name and version, who
writes); a writer that reopens a file to append (the same worker traced again) starts
with a new header. Times ``t``/``t0``/``t1`` are Unix times in seconds (float), so the
files of the processes of one machine share one clock.

Invariants of ``TraceWriter``:
- Records are appended to a list and written in batches by ``flush`` (the processes call
  it at least every ``FLUSH_INTERVAL`` seconds), each batch with one ``write`` followed
  by a ``flush`` to the operating system: a process that is killed loses at most the
  records of the last interval, and at worst leaves a truncated last record.
- The writer never raises out of ``add``; an I/O error in ``flush`` disables the writer
  (logged once) instead of disturbing the process that traces.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time

import msgpack

FORMAT = "loom-trace"
VERSION = 1
FLUSH_INTERVAL = 0.5     # seconds between flushes
SAMPLE_INTERVAL = 1.0    # seconds between worker samples

SERVER_FILE = "server.trace"
SUFFIX = ".trace"

# record kinds
HEADER, END = "header", "end"
JOB, JOB_END, WORKER, WORKER_LOST, ROUND, ASSIGN = "job", "job_end", "worker", "worker_lost", "round", "assign"
TASKS, XFER, SAMPLE, LOG = "tasks", "xfer", "sample", "log"
# columns of a "tasks" record (one entry per task; "slots" is optional)
TASK_COLUMNS = ("id", "job", "slot", "cpus", "sym", "label", "t0", "t1", "status", "size", "in")

# cpu slots of tasks that hold no cpu
INLINE_SLOT = -1          # light built-ins run inline in the worker's loop, one at a time
FIRST_LIGHT_SLOT = -2     # other light tasks: -2, -3, ... (lowest free number first)

log = logging.getLogger("loomctl.trace")


def worker_file(name: str) -> str:
    """The file name of a worker's trace: ``worker-<name>.trace`` (unsafe characters
    of the name become ``_``)."""
    return f"worker-{re.sub(r'[^A-Za-z0-9._-]', '_', name) or '_'}{SUFFIX}"


def header(role: str, **fields) -> dict:
    return {"k": HEADER, "format": FORMAT, "version": VERSION, "role": role, "t": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), **fields}


class TraceWriter:
    """Append records to one trace file (see the module docstring)."""

    def __init__(self, path: str, head: dict):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.file = open(path, "ab")
        self.packer = msgpack.Packer(use_bin_type=True)
        self.records: list = [head]
        self.last_flush = 0.0
        self.broken = False
        self.flush()

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.records or self.broken:
            self.records = []
            return
        records, self.records = self.records, []
        pack = self.packer.pack
        try:
            self.file.write(b"".join([pack(r) for r in records]))
            self.file.flush()
        except (OSError, ValueError, TypeError) as exc:
            self.broken = True
            log.warning("trace file %s: cannot write (%s); tracing into it stops", self.path, exc)

    def close(self) -> None:
        if self.file.closed:
            return
        self.add({"k": END, "t": time.time()})
        self.flush()
        try:
            self.file.close()
        except OSError:
            pass
