"""Read a trace directory into one ``Trace``: every file, checked, records merged.

Invariants:
- ``read_trace`` either returns a Trace or raises ``TraceError`` with one line for a
  person naming the directory or file at fault: a missing or empty directory, a file
  that is not a loomctl trace (no ``loom-trace`` header), a newer format version, a
  file cut inside its header, a corrupt or malformed record.
- A file whose *last* record is cut short (its writer was killed while writing) is
  read up to that record; the Trace carries a note saying so. So does a file without
  an ``end`` record (its writer was killed, or is still running).
- Unknown record kinds and unknown fields are ignored (later versions may add them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import msgpack
import numpy as np

from loomctl.trace import format as F


class TraceError(Exception):
    """A trace directory or file that cannot be used; the message is for a person."""


NUM = (int, float)
NONE = type(None)
# element types of the columns of a "tasks" record
TASK_COLUMN_TYPES = {"id": int, "job": (int, NONE), "slot": int, "cpus": int, "sym": str, "label": (str, NONE),
                     "t0": NUM, "t1": NUM, "status": str, "size": int, "in": list}
# required fields (name -> types) of the record kinds this reader uses
REQUIRED = {
    F.HEADER: {"role": str},
    F.XFER: {"t0": NUM, "t1": NUM, "from": str, "bytes": int},
    F.SAMPLE: {"t": NUM},
    F.LOG: {"t": NUM, "id": int, "msg": str},
    F.ROUND: {"t": NUM, "dur": NUM, "placed": int},
    F.JOB: {"t": NUM, "job": int},
    F.JOB_END: {"t": NUM, "job": int},
    F.WORKER: {"worker": int, "name": str},
    F.WORKER_LOST: {"t": NUM, "worker": int},
    F.ASSIGN: {"t": NUM, "worker": int, "ids": bytes},
    F.END: {"t": NUM},
}


@dataclass
class FileInfo:
    name: str
    role: str
    worker: str | None
    records: int
    truncated_bytes: int = 0
    ended: bool = False


@dataclass
class Trace:
    directory: str
    files: list = field(default_factory=list)        # FileInfo
    notes: list = field(default_factory=list)        # str
    workers: dict = field(default_factory=dict)      # name -> {name, id, address, cpus, host}
    tasks: list = field(default_factory=list)        # task records + "worker" (name)
    transfers: list = field(default_factory=list)    # xfer records + "src", "dst" (names)
    samples: list = field(default_factory=list)      # sample records + "worker"
    logs: list = field(default_factory=list)         # log records + "worker"
    rounds: list = field(default_factory=list)
    jobs: dict = field(default_factory=dict)         # job id -> {job, name, n, t, t_end, status}
    assigned: dict = field(default_factory=dict)     # task id -> worker id (last assignment)
    lost: list = field(default_factory=list)         # worker_lost records
    server_workers: dict = field(default_factory=dict)   # worker id -> name (server's view)

    @property
    def span(self) -> tuple[float, float]:
        """(first, last) time of the tasks, transfers and rounds; (0, 0) when empty."""
        starts = [t["t0"] for t in self.tasks] + [x["t0"] for x in self.transfers] + [r["t"] for r in self.rounds]
        ends = [t["t1"] for t in self.tasks] + [x["t1"] for x in self.transfers] + \
               [r["t"] + r["dur"] for r in self.rounds]
        if not starts:
            return 0.0, 0.0
        return min(starts), max(ends)


def read_trace(directory: str) -> Trace:
    if not os.path.exists(directory):
        raise TraceError(f"{directory}: no such trace directory")
    if not os.path.isdir(directory):
        raise TraceError(f"{directory}: not a directory (give the trace directory)")
    names = sorted(n for n in os.listdir(directory) if n.endswith(F.SUFFIX))
    if not names:
        raise TraceError(f"{directory}: no trace files (*{F.SUFFIX}) in it")
    names.sort(key=lambda n: n != F.SERVER_FILE)   # the server first: it names workers
    trace = Trace(directory)
    per_file = [(name, read_file(os.path.join(directory, name))) for name in names]
    for name, (records, truncated) in per_file:
        _merge(trace, name, records, truncated)
    _resolve(trace)
    start = min((t["t0"] for t in trace.tasks), default=None)
    for lost in trace.lost:
        when = f" {lost['t'] - start:.3f} s after the first task started" if start is not None else ""
        trace.notes.append(f"the server lost worker {lost.get('name', lost['worker'])}{when} "
                           f"({lost.get('reason', '?')}); its unfinished tasks ran again elsewhere")
    if F.SERVER_FILE not in names:
        trace.notes.append(f"no {F.SERVER_FILE}: job records and scheduler rounds are missing")
    return trace


def read_file(path: str) -> tuple[list, int]:
    """The records of one file and the number of bytes of a cut-short last record."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    records = []
    consumed = 0
    with f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, read_size=1 << 20,
                                    max_buffer_size=max(size, 1 << 20))
        try:
            for record in unpacker:
                if not records:
                    _check_header(path, record)
                else:
                    _check_record(path, len(records), record)
                records.append(record)
                consumed = unpacker.tell()   # the end of the last complete record
        except TraceError:
            raise
        except Exception as exc:   # msgpack raises many types for garbage
            if not records:
                raise TraceError(f"{path}: not a loomctl trace file (it does not start with a "
                                 f"{F.FORMAT} header)") from None
            raise TraceError(f"{path}: corrupt data after record {len(records)} "
                             f"({type(exc).__name__})") from None
    if not records:
        if size == 0:
            raise TraceError(f"{path}: empty file (not a complete {F.FORMAT} file)")
        raise TraceError(f"{path}: truncated inside its header (or not a loomctl trace file)")
    return records, size - consumed


def _check_header(path: str, record) -> None:
    if not isinstance(record, dict) or record.get("k") != F.HEADER or record.get("format") != F.FORMAT:
        raise TraceError(f"{path}: not a loomctl trace file (it does not start with a {F.FORMAT} header)")
    version = record.get("version")
    if not isinstance(version, int) or version > F.VERSION or version < 1:
        raise TraceError(f"{path}: trace format version {version!r}; this loomctl reads version "
                         f"{F.VERSION} (upgrade loomctl)")
    _check_fields(path, 0, record)


def _check_record(path: str, index: int, record) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("k"), str):
        raise TraceError(f"{path}: record {index} is not a trace record")
    if record["k"] == F.HEADER:
        _check_header(path, record)
    else:
        _check_fields(path, index, record)


def _check_fields(path: str, index: int, record: dict) -> None:
    if record["k"] == F.TASKS:
        _check_tasks(path, index, record)
        return
    for name, types in REQUIRED.get(record["k"], {}).items():
        value = record.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise TraceError(f"{path}: record {index} ({record['k']}) has no valid {name!r} field")


def _check_tasks(path: str, index: int, record: dict) -> None:
    n = None
    for name, types in TASK_COLUMN_TYPES.items():
        column = record.get(name)
        if not isinstance(column, list) or (n is not None and len(column) != n) or not all(
                isinstance(v, types) and (not isinstance(v, bool)) for v in column):
            raise TraceError(f"{path}: record {index} (tasks) has no valid {name!r} column")
        n = len(column)
    slots = record.get("slots")
    if slots is not None and (not isinstance(slots, list) or len(slots) != n):
        raise TraceError(f"{path}: record {index} (tasks) has no valid 'slots' column")


def _merge(trace: Trace, name: str, records: list, truncated: int) -> None:
    info = FileInfo(name, records[0]["role"], None, len(records), truncated)
    trace.files.append(info)
    worker = None
    for r in records:
        k = r["k"]
        if k == F.TASKS:
            slots = r.get("slots") or [None] * len(r["id"])
            for values in zip(*(r[c] for c in F.TASK_COLUMNS), slots):
                task = dict(zip(F.TASK_COLUMNS, values))    # the last value is the slots entry
                if isinstance(values[-1], list) and values[-1]:
                    task["slots"] = values[-1]
                task["worker"] = worker
                trace.tasks.append(task)
        elif k == F.XFER:
            r["dst"] = worker
            trace.transfers.append(r)
        elif k == F.SAMPLE:
            r["worker"] = worker
            trace.samples.append(r)
        elif k == F.LOG:
            r["worker"] = worker
            trace.logs.append(r)
        elif k == F.ROUND:
            trace.rounds.append(r)
        elif k == F.ASSIGN:
            for t in np.frombuffer(r["ids"][:len(r["ids"]) // 8 * 8], dtype="<i8").tolist():
                trace.assigned[t] = r["worker"]
        elif k == F.HEADER:
            info.ended = False
            if r["role"] == "worker":
                worker = str(r.get("name") or name)
                info.worker = worker
                known = trace.workers.setdefault(worker, {"name": worker})
                known.update({"id": r.get("worker"), "address": r.get("address"),
                              "cpus": int(r.get("cpus") or 0), "host": r.get("host")})
        elif k == F.JOB:
            trace.jobs[r["job"]] = {"job": r["job"], "name": r.get("name", ""), "n": r.get("n"),
                                    "t": r["t"], "t_end": None, "status": "running"}
        elif k == F.JOB_END:
            job = trace.jobs.setdefault(r["job"], {"job": r["job"], "name": "", "n": None, "t": r["t"]})
            job.update({"t_end": r["t"], "status": r.get("status", "?")})
        elif k == F.WORKER:
            trace.server_workers[r["worker"]] = r["name"]
            if r.get("address"):
                trace.workers.setdefault(r["name"], {"name": r["name"], "id": r["worker"], "address": r["address"],
                                                     "cpus": int(r.get("cpus") or 0), "host": r.get("host")})
        elif k == F.WORKER_LOST:
            trace.lost.append(r)
        elif k == F.END:
            info.ended = True
    who = f"worker {info.worker}" if info.worker else info.role
    if truncated:
        trace.notes.append(f"{name}: its last record is cut short ({truncated} bytes ignored): the "
                           f"{who} stopped while writing; reporting what it wrote before")
    elif not info.ended:
        trace.notes.append(f"{name}: no end record: the {who} was killed or is still running; "
                           "reporting what it wrote until then")


def _resolve(trace: Trace) -> None:
    by_address = {w.get("address"): n for n, w in trace.workers.items() if w.get("address")}
    for x in trace.transfers:
        x["src"] = by_address.get(x["from"], x["from"])
    for t in trace.tasks:
        t.setdefault("label", None)
        t.setdefault("cpus", 0)
        t.setdefault("status", "ok")
        t.setdefault("in", [])
        t.setdefault("job", None)
