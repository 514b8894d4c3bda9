"""Typed messages between the sans-I/O parts and their process shells.

The server core returns *commands* (what to send to whom) and the server's dispatch
turns wire messages into calls; ``loomctl.protocol`` alone turns these values into
frames and back. Nothing here imports zmq or msgpack.

Invariants:
- A command names its target by the shell's opaque handle (a zmq routing id); the core
  never learns more about a peer than that handle.
- Id columns are int64 numpy arrays; the protocol encodes them with ``ids_to_bytes``.
- ``ComputeRow`` is the one definition of a COMPUTE task row, for the server that builds
  it and the worker that reads it (``loomctl.worker.taskqueue.TaskSpec.from_wire``);
  ``ComputeColumns`` holds many rows as columns and iterates as the same ComputeRows
  (tests/test_core_properties.py: both ways of building a COMPUTE agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class ComputeRow(NamedTuple):
    """One task of a COMPUTE message, in wire order (a NamedTuple: msgpack packs it as
    a list, so a row costs no conversion)."""
    id: int
    symbol: str
    config: bytes
    inputs: list
    cpus: int
    resources: dict | None
    checkpoint: str | None
    label: str | None
    inline: bool          # a client waits for it: send a small result along with the report
    ahead: bool = False   # speculative: some input is still being computed on this worker


class ComputeColumns:
    """The tasks of a COMPUTE as columns, for many rows: the server builds them with a
    few array operations, not a row each, and the worker reads them without a row each
    to unpack. Iterating gives the ComputeRows they stand for, in order."""

    __slots__ = ("ids", "symbols", "symbol", "configs", "config_starts", "config_ends", "inputs", "input_ends",
                 "cpus", "flags", "resources", "checkpoints", "labels")
    INLINE, AHEAD = 1, 2   # (bits of ``flags``: ComputeRow.inline, ComputeRow.ahead)

    def __init__(self, ids: np.ndarray, symbols: list, symbol: np.ndarray, configs: bytes, config_starts: np.ndarray,
                 config_ends: np.ndarray, inputs: np.ndarray, input_ends: np.ndarray, cpus: np.ndarray,
                 flags: np.ndarray, resources: dict | None = None, checkpoints: dict | None = None,
                 labels: dict | None = None):
        self.ids = ids                   # int64 task ids
        self.symbols = symbols           # the symbol names ``symbol`` indexes
        self.symbol = symbol             # per task: its symbol's index in ``symbols``
        self.configs = configs               # bytes holding every task's config
        self.config_starts = config_starts   # int64 per task: where its config is in ``configs``
        self.config_ends = config_ends
        self.inputs = inputs             # int64: the tasks' input ids one after another
        self.input_ends = input_ends     # int64 per task: where its inputs end in ``inputs``
        self.cpus = cpus                 # int64 per task
        self.flags = flags               # uint8 per task: INLINE | AHEAD
        self.resources = resources or {}     # row -> {name: amount}, for the rows that name some
        self.checkpoints = checkpoints or {}  # row -> checkpoint path
        self.labels = labels or {}           # row -> label

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return self.rows(ComputeRow)

    def rows(self, make, no_resources=lambda: None):
        """``make(*fields)`` of each row, in ComputeRow's order (``no_resources()``: the
        resources of a row that names none)."""
        configs, flat, table = self.configs, self.inputs.tolist(), self.symbols
        resources, checkpoints, labels = self.resources, self.checkpoints, self.labels
        b = 0
        for p, (tid, code, a, e, f, cpus, flag) in enumerate(zip(
                self.ids.tolist(), self.symbol.tolist(), self.config_starts.tolist(), self.config_ends.tolist(),
                self.input_ends.tolist(), self.cpus.tolist(), self.flags.tolist())):
            named = resources.get(p) if resources else None
            yield make(tid, table[code], configs[a:e], flat[b:f], cpus, no_resources() if named is None else named,
                       checkpoints.get(p) if checkpoints else None, labels.get(p) if labels else None,
                       bool(flag & 1), bool(flag & 2))
            b = f


LARGE_CONFIG = 1 << 16   # a config longer than this is a view in a ComputeRow (protocol: a frame of its own)
COMPUTE_ROW_MIN = 5        # rows shorter than this are malformed; later fields are optional


# ---------------------------------------------------------------- server -> worker
@dataclass(slots=True)
class Compute:
    target: bytes
    rows: list                # [ComputeRow], or ComputeColumns (many rows, no large config)
    locations: dict           # input id -> data address, for inputs the worker lacks
    jobs: np.ndarray          # the job of each row, in the order of rows
    large: list = field(default_factory=list)   # rows whose config is a large view (sent as a frame)


@dataclass(slots=True)
class ReleaseData:
    target: bytes
    ids: np.ndarray


@dataclass(slots=True)
class CancelTasks:
    """Stop these tasks: drop them if queued, kill a running program (its process
    group), discard the result of a running Python task."""
    target: bytes
    ids: np.ndarray


@dataclass(slots=True)
class PeerLost:
    target: bytes
    address: str


@dataclass(slots=True)
class Peers:
    """Data addresses of other workers, for a worker to link to before it first fetches."""
    target: bytes
    addresses: list


@dataclass(slots=True)
class Stop:
    target: bytes


@dataclass(slots=True)
class StealTasks:
    """Give back up to ``count`` of ``ids`` (tasks assigned to the target) that have not
    started, those it would start last first; the answer lists them (``Update.returned``,
    ``ServerCore.tasks_returned``). Sent only by a core with stealing on."""
    target: bytes
    ids: np.ndarray
    count: int


# ---------------------------------------------------------------- server -> client
@dataclass(slots=True)
class ResultsReady:
    target: bytes
    job: int
    ids: np.ndarray
    addresses: list           # data address per id
    inline: dict = field(default_factory=dict)   # id -> encoding, for some of the ids


@dataclass(slots=True)
class TaskFailed:
    target: bytes
    error: dict               # {job, id, label, symbol, worker, message}


@dataclass(slots=True)
class JobDone:
    target: bytes
    job: int
    status: str
    counts: dict


WORKER_COMMANDS = (Compute, ReleaseData, CancelTasks, PeerLost, Peers, Stop, StealTasks)
CLIENT_COMMANDS = (ResultsReady, TaskFailed, JobDone)


# ---------------------------------------------------------------- worker -> server
@dataclass(slots=True)
class Register:
    name: str
    hostname: str
    cpus: int
    resources: dict           # name -> amount
    symbols: list             # task types it runs; empty: the built-ins
    data_address: str         # tcp://host:port of its data socket
    memory_limit: int | None = None
    held: np.ndarray | None = None          # data objects it holds already (it joins again)
    held_sizes: np.ndarray | None = None
    held_lengths: np.ndarray | None = None


@dataclass(slots=True)
class Update:
    """One batch of a worker's reports."""
    finished: np.ndarray
    sizes: np.ndarray
    lengths: np.ndarray
    failed: list              # [(task id, message)]
    redirects: list           # [(task id, graph file bytes)]
    replicas: np.ndarray      # objects it fetched from peers and now holds too
    logs: list                # [(task id, level, message)]
    inline: dict | None       # task id -> encoding of a small finished result
    returned: np.ndarray | None = None   # the answer to a StealTasks (None: not one)
    unfetched: np.ndarray | None = None  # of the failed, those whose input a peer did not give
    cpu_busy: tuple | None = None        # (count, seconds) of the finished cpu tasks timed


@dataclass(slots=True)
class Heartbeat:
    stats: dict


# ---------------------------------------------------------------- client -> server
# Each carries ``req``: the number echoed in the answer, or None for a notice.
@dataclass(slots=True)
class Submit:
    req: int | None
    graph: bytes | memoryview | None   # (a view of the received frame; None once read)
    load: bool = False
    name: str = ""
    trace: object = None      # None/False/"": untraced; True: the server's trace dir; str: a dir
    notify: bool = True
    detach: bool = False


@dataclass(slots=True)
class Release:
    req: int | None
    ids: np.ndarray


@dataclass(slots=True)
class JobRequest:
    """CANCEL, JOB_RESULTS and WAIT_JOB: a request about one job."""
    req: int | None
    kind: bytes
    job: int


@dataclass(slots=True)
class Query:
    """STATS, STATUS and TERMINATE: a request without arguments."""
    req: int | None
    kind: bytes


@dataclass(slots=True)
class SetTrace:
    req: int | None
    path: str
