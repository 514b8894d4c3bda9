"""Wire protocol between clients, the server and workers (pyzmq + msgpack).

Every message is a multipart zmq message ``[kind, body, *blobs]``: ``kind`` is a short
ASCII name below, ``body`` one msgpack map, ``blobs`` raw byte frames (data objects) so
large data is never copied into msgpack. Integer id columns travel as raw little-endian
int64 bytes (``ids_to_bytes``) so that thousands of ids cost one memcpy.

Sockets: the server binds one ROUTER; workers and clients connect DEALERs to it. Every
worker binds a ROUTER for its data; other workers and clients fetch data from it
directly (the server carries no data object, except results of at most INLINE_BYTES
passed from a worker's UPDATE to the client's RESULTS_READY).

Handshake on every ROUTER (server and worker data sockets), before anything else:
  peer -> HELLO {role, version}
  router -> CHALLENGE {nonce}           (authentication on)
  peer -> AUTH {proof: HMAC-SHA256(secret, nonce + role)}
  router -> WELCOME {...} or REFUSED {reason}
A router drops (and logs) every other message from a peer that is not welcome.

Message bodies ("ids" fields are ids_to_bytes columns; task ids are server-global):
  worker -> server
    REGISTER  {name, hostname, pid, cpus, resources: {name: amount}, symbols: [str],
               data_address: "tcp://host:port", work_dir, memory_limit,
               held, held_sizes, held_lengths: ids (data objects it still holds: a worker
               joining again after the server dropped it, or after a server restart)}
                                                               -> REPLY {worker_id}
    UPDATE    {finished: ids, sizes: ids, lengths: ids,          (one batch of reports)
               failed: [[id, message]], redirects: [[id, graph_file_bytes]],
               replicas: ids (objects fetched from peers, now also held here),
               logs: [[id, level, message]],
               inline: ids, blobs: [bytes] (optional: finished results sent along, their
                       encodings in the same order; only tasks marked so in COMPUTE, each
                       <= INLINE_BYTES; in the body, as one frame per small blob costs more),
               returned: ids (only in the answer to a STEAL_TASKS, and always in it, empty
                       when the worker gives nothing back: tasks dropped from its queue
                       unstarted, nothing more is reported of them),
               unfetched: ids (optional: of the failed, those that failed only because a
                       peer did not give an input: the server may run them again),
               cpu_busy: [count, seconds] (optional: of the finished tasks with cpus, how
                       many were timed and how long they ran together: the server queues
                       more of them for a worker whose tasks are short)}
    HEARTBEAT {n_data, data_bytes, rss, cpu_percent, running, running_ids: [task id],
               queued, heartbeat (a count), data_connections}
  server -> worker
    COMPUTE   {tasks: [[id, symbol, config, [input ids], cpus, resources|None,
                        checkpoint|None, label|None, inline: bool, ahead: bool]],
               (inline: a client waits for this result; when its encoding is at most
                INLINE_BYTES the worker sends it along in UPDATE, and the server passes
                it on in RESULTS_READY, saving the client a fetch; the worker keeps it.
                ahead: given before its inputs are all computed; an input without a
                location is produced by a task given to this worker earlier in the
                COMPUTE or before; if that task ends without producing it, the task is
                dropped without a report, the server takes it back)
               locations: {input id: data_address},   (inputs this worker does not hold)
               jobs: ids (optional: the job of each task, in the order of tasks; present
                     only when a task of a traced job is among them)}
              + frames: the configs longer than messages.LARGE_CONFIG (64 KiB), each a
                frame of its own; the row's config is then the number of its frame (0
                for the first)
              or, for many tasks and no large config, the same rows as columns:
              {columns: {ids, inputs: ids columns; config_starts, config_ends, input_ends,
                         cpus: uint32 per task; symbols: [str], symbol: uint16 per task, its
                         index in symbols;
                         configs: bytes (task p's is configs[config_starts[p]:config_ends[p]]);
                         inputs: every task's inputs one after another (task p's end at
                         input_ends[p]); flags: uint8 per task (1 inline, 2 ahead);
                         resources, checkpoints, labels: [[row, value]] for the rows with
                         one (optional)},
               locations, jobs}   (messages.ComputeColumns)
    RELEASE_DATA {ids}     STOP {}
    CANCEL_TASKS {ids}     (their job ended: drop them if queued, kill a running program
                            with its process group, discard a running Python task's result;
                            nothing is reported of them)
    STEAL_TASKS {ids, count: int}   (work stealing, a server started with --steal: give back
                            up to count of these tasks that have not started, those the
                            worker would start last first; it answers with an UPDATE whose
                            "returned" lists them, maybe none; one request at a time)
    PEER_LOST {address}    (the server removed the worker with this data address: give
                            up fetching from it now; tasks left waiting for its data fail
                            with "input ... is unavailable" and the server runs them again)
    PEERS {addresses: [data_address]}   (other workers, in a cluster of at most
                            core.workers.EAGER_PEERS: the worker links to them now, so that
                            its first fetch from them does not wait for a handshake)
  server -> any peer
    PING {}    (a probe after a connection closed; peers ignore it)
    TRACE     {path: trace directory, job, on: bool}   (start / stop tracing a job into
               path: the worker appends records to path/worker-<name>.trace; see
               loomctl.trace.hooks and loom-trace(5))
  client -> server: each request carries "req" (int), echoed in REPLY {req, ...} or
  ERROR {req, message}; a message without "req" is a notice and gets no answer at all
  (the client sends RELEASE so: nothing waits for it, and later requests on the same
  connection are handled after it)
    SUBMIT {load: bool, name, trace: dir|None, notify: bool} + the graph file bytes as
           the message's one blob frame (received without a copy and read in place; a
           ``graph`` field in the body, with no blob, is taken too)
                                    -> REPLY {job, base, n}   (global id = base + local id)
    RELEASE {ids}   STATS {}   STATUS {}   CANCEL {job}   TERMINATE {}   SET_TRACE {path}
    (SUBMIT trace: the job is traced into that directory; a relative one, or true, is
     taken relative to / as the server's trace directory, which ``--trace-dir`` or
     SET_TRACE sets.)
    JOB_RESULTS {job} -> REPLY {status, ids, addresses, failed}
    WAIT_JOB {job}    (subscribe to the job's pushes below)
  server -> client pushes (for jobs submitted with notify, or after WAIT_JOB)
    RESULTS_READY {job, ids, addresses: [data_address per id],
                   inline: ids, blobs: [bytes] (optional: encodings of some of the ids)}
    TASK_FAILED {job, id, label, symbol, worker, message}
    JOB_DONE {job, status: finished|failed|cancelled, counts: {...}}
  peer/client -> worker data socket
    FETCH {req, ids} -> DATA {req, ids (found), missing: ids, parts: [frames per found id]}
                        + the frames of each found object in order (loomctl.worker.data
                        .encode_parts: a large content is a frame of its own, sent
                        without a copy; data.decode_parts reads them back)

Invariants:
- ``decode`` never raises anything but ProtocolError for malformed input.
- Bumping PROTOCOL_VERSION is required for any incompatible change of a message.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading

import msgpack
import numpy as np

from loomctl import messages as M

PROTOCOL_VERSION = 5   # 2: DATA sends each object as its parts (frames), a REGISTER may hold data;
                      # 3: SUBMIT sends its graph file as a blob frame; 4: COMPUTE large configs as frames;
                      # 5: a COMPUTE of many tasks sends them as columns
INLINE_BYTES = 4096   # results up to this size travel with the finish report (see UPDATE)
MAX_MESSAGE = 1 << 30  # the server's limit on one message (a SUBMIT's graph file: ~40M tasks);
                       # zmq drops a bigger one before holding it, from strangers too

# handshake
HELLO, CHALLENGE, AUTH, WELCOME, REFUSED = b"HELLO", b"CHALLENGE", b"AUTH", b"WELCOME", b"REFUSED"
# worker -> server
REGISTER, UPDATE, HEARTBEAT = b"REGISTER", b"UPDATE", b"HEARTBEAT"
# server -> worker
COMPUTE, RELEASE_DATA, STOP = b"COMPUTE", b"RELEASE_DATA", b"STOP"
TRACE = b"TRACE"
PEER_LOST = b"PEER_LOST"
PEERS = b"PEERS"
CANCEL_TASKS = b"CANCEL_TASKS"
STEAL_TASKS = b"STEAL_TASKS"
# client -> server (requests carry "req"; the reply echoes it)
SUBMIT, RELEASE, STATS, STATUS, CANCEL, TERMINATE, SET_TRACE, JOB_RESULTS, WAIT_JOB = (
    b"SUBMIT", b"RELEASE", b"STATS", b"STATUS", b"CANCEL", b"TERMINATE", b"SET_TRACE",
    b"JOB_RESULTS", b"WAIT_JOB")
# server -> client
REPLY, ERROR, RESULTS_READY, TASK_FAILED, JOB_DONE = (
    b"REPLY", b"ERROR", b"RESULTS_READY", b"TASK_FAILED", b"JOB_DONE")
# peer -> worker data socket, and its answer
FETCH, DATA = b"FETCH", b"DATA"
# server -> any peer: "are you there" after a connection closed (zmq tells the server
# when the peer is gone); every peer ignores it
PING = b"PING"

ROLES = ("worker", "client", "peer")


class ProtocolError(Exception):
    """A message that does not follow this protocol."""


_packers = threading.local()


def packb(obj) -> bytes:
    """msgpack bytes of ``obj`` (bin type) from this thread's own Packer: msgpack.packb
    makes a Packer, and its 256 KiB buffer, per call, and under the server's fixed mmap
    threshold (server/process.return_freed_memory) each such buffer was an mmap and a
    munmap: 11 pairs per one-task job."""
    try:
        return _packers.pack(obj)
    except AttributeError:
        if hasattr(_packers, "pack"):
            raise
        _packers.pack = msgpack.Packer(use_bin_type=True).pack
        return _packers.pack(obj)


def encode(kind: bytes, body: dict | None = None, *blobs) -> list:
    return [kind, packb(body or {}), *blobs]


def decode(frames: list) -> tuple[bytes, dict, list]:
    """(kind, body, blobs) of a message, without the ROUTER identity frame."""
    if len(frames) < 2:
        raise ProtocolError(f"message has {len(frames)} frame(s), expected at least 2")
    kind = bytes(frames[0])
    if len(kind) > 16:
        raise ProtocolError("message kind is too long")
    try:
        body = msgpack.unpackb(frames[1], raw=False, strict_map_key=False,
                               max_bin_len=1 << 31, max_str_len=1 << 26)
    except Exception as exc:   # msgpack raises many types for garbage
        raise ProtocolError(f"{kind!r} body is not msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{kind!r} body is not a map")
    return kind, body, list(frames[2:])


def _submitted_graph(body: dict, blobs: list | None):
    """A SUBMIT's graph file: its one blob frame (a view of it: bytes, or a zmq.Frame's
    buffer, no copy), else the body's ``graph`` field."""
    if not blobs:
        return field(body, "graph", bytes)
    if len(blobs) != 1 or "graph" in body:
        raise ProtocolError("SUBMIT carries its graph file as one blob frame, or in the body, not both")
    # (read-only: the graph's configs may stay a view of it, graphfmt's _config_data)
    return _readonly_view(blobs.pop())


def _readonly_view(blob) -> memoryview:
    """A read-only view of a received frame (a zmq.Frame received without a copy, or
    bytes), not a copy of it."""
    view = getattr(blob, "buffer", None)
    return (view if isinstance(view, memoryview) else memoryview(blob)).toreadonly()


def ids_to_bytes(ids) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def ids_from_bytes(raw) -> np.ndarray:
    if not isinstance(raw, (bytes, bytearray, memoryview)) or len(raw) % 8:
        raise ProtocolError("id column is not a whole number of int64 values")
    return np.frombuffer(raw, dtype="<i8").astype(np.int64)


def field(body: dict, name: str, types, default=...):
    """body[name] checked against ``types``; ProtocolError when missing or wrong."""
    if name not in body:
        if default is not ...:
            return default
        raise ProtocolError(f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise ProtocolError(f"field {name!r} has the wrong type")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


# --------------------------------------------------------------- commands
def _compute_frames(cmd: M.Compute) -> list:
    """A COMPUTE's frames: a large config (``cmd.large``) is not packed into the body but
    sent as a frame of its own, its row naming the frame by number (see COMPUTE)."""
    if type(cmd.rows) is M.ComputeColumns:
        return encode(COMPUTE, {"columns": _columns_body(cmd.rows), "locations": cmd.locations,
                                "jobs": ids_to_bytes(cmd.jobs)})
    rows, blobs = cmd.rows, []
    if cmd.large:
        rows = list(rows)
        for k in cmd.large:
            blobs.append(rows[k][2])
            rows[k] = rows[k]._replace(config=len(blobs) - 1)
    return encode(COMPUTE, {"tasks": rows, "locations": cmd.locations, "jobs": ids_to_bytes(cmd.jobs)}, *blobs)


def _columns_body(cols: M.ComputeColumns) -> dict:
    u4 = _u4_bytes
    body = {"ids": ids_to_bytes(cols.ids), "symbols": cols.symbols, "symbol": cols.symbol.astype("<u2").tobytes(),
            "configs": cols.configs, "config_starts": u4(cols.config_starts), "config_ends": u4(cols.config_ends),
            "inputs": ids_to_bytes(cols.inputs), "input_ends": u4(cols.input_ends), "cpus": u4(cols.cpus),
            "flags": cols.flags.tobytes()}
    for name in ("resources", "checkpoints", "labels"):
        if getattr(cols, name):
            body[name] = list(getattr(cols, name).items())
    return body


def _u4_bytes(values: np.ndarray) -> bytes:
    """A uint32 column of COMPUTE columns (offsets, counts, cpus: no message holds 4 GiB)."""
    return np.ascontiguousarray(values, dtype="<u4").tobytes()


def _u4_column(raw) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ProtocolError("COMPUTE columns: a column is not a whole number of uint32 values")
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)


def _sparse(body: dict, name: str, n: int, check) -> dict:
    out = {}
    for pair in field(body, name, list, []):
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or not 0 <= pair[0] < n:
            raise ProtocolError(f"COMPUTE columns: {name} are not [row, value] pairs")
        out[pair[0]] = check(pair[1])
    return out


def resource_amounts(value) -> dict | None:
    """A COMPUTE task's resources as {name: amount}, the zero ones left out; None when
    ``value`` is no map of names to non-negative integers."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()):
        return None
    return {k: v for k, v in value.items() if v}


def _resources(value) -> dict:
    amounts = resource_amounts(value)
    if amounts is None:
        raise ProtocolError("COMPUTE columns: resources are not a map of names to amounts")
    return amounts


def _text(value) -> str:
    if type(value) is not str:
        raise ProtocolError("COMPUTE columns: a checkpoint or label is not a string")
    return value


def compute_columns(body: dict) -> M.ComputeColumns:
    """The ComputeColumns of a COMPUTE body's ``columns`` (ProtocolError when malformed)."""
    ids = ids_from_bytes(field(body, "ids", bytes))
    n = len(ids)
    symbols = field(body, "symbols", list)
    raw = field(body, "symbol", bytes)
    configs = field(body, "configs", bytes)
    u4 = _u4_column
    starts, ends = u4(field(body, "config_starts", bytes)), u4(field(body, "config_ends", bytes))
    inputs, input_ends = ids_from_bytes(field(body, "inputs", bytes)), u4(field(body, "input_ends", bytes))
    cpus, flags = u4(field(body, "cpus", bytes)), np.frombuffer(field(body, "flags", bytes), np.uint8)
    if len(raw) != 2 * n or not all(len(col) == n for col in (starts, ends, input_ends, cpus, flags)):
        raise ProtocolError("COMPUTE columns are not all one per task")
    symbol = np.frombuffer(raw, "<u2").astype(np.uint16)
    if not all(type(x) is str for x in symbols) or n and int(symbol.max()) >= len(symbols):
        raise ProtocolError("COMPUTE columns: a symbol is not a string of the table")
    if n and ((ids < 0).any() or (cpus < 0).any() or (starts < 0).any() or (ends < starts).any()
              or int(ends.max()) > len(configs)):
        raise ProtocolError("COMPUTE columns: a task id, cpus or config bounds are out of range")
    if n and (int(input_ends[0]) < 0 or (input_ends[1:] < input_ends[:-1]).any() or int(input_ends[-1]) != len(inputs)
              or (inputs < 0).any()):
        raise ProtocolError("COMPUTE columns: the inputs are not task ids in order")
    return M.ComputeColumns(ids, symbols, symbol, configs, starts, ends, inputs, input_ends, cpus, flags,
                            _sparse(body, "resources", n, _resources), _sparse(body, "checkpoints", n, _text),
                            _sparse(body, "labels", n, _text))


def compute_rows(body: dict, blobs: list) -> list | M.ComputeColumns:
    """A COMPUTE's task rows with the configs sent as frames in place, as read-only views
    of the frames (a row naming a frame that is not there keeps the number: that task is
    malformed, not the message); its ComputeColumns when it sent columns."""
    if "columns" in body:
        return compute_columns(field(body, "columns", dict))
    rows = field(body, "tasks", list)
    if not blobs:
        return rows
    out = []
    for row in rows:
        if isinstance(row, list) and len(row) > 2 and type(row[2]) is int and 0 <= row[2] < len(blobs):
            row = [*row[:2], _readonly_view(blobs[row[2]]), *row[3:]]
        out.append(row)
    return out


def _results_body(cmd: M.ResultsReady) -> dict:
    body = {"job": cmd.job, "ids": ids_to_bytes(cmd.ids), "addresses": cmd.addresses}
    if cmd.inline:
        body["inline"], body["blobs"] = ids_to_bytes(list(cmd.inline)), list(cmd.inline.values())
    return body


_COMMANDS = {
    M.Compute: (COMPUTE, None),   # (its frames: _compute_frames)
    M.ReleaseData: (RELEASE_DATA, lambda cmd: {"ids": ids_to_bytes(cmd.ids)}),
    M.PeerLost: (PEER_LOST, lambda cmd: {"address": cmd.address}),
    M.Peers: (PEERS, lambda cmd: {"addresses": list(cmd.addresses)}),
    M.CancelTasks: (CANCEL_TASKS, lambda cmd: {"ids": ids_to_bytes(cmd.ids)}),
    M.StealTasks: (STEAL_TASKS, lambda cmd: {"ids": ids_to_bytes(cmd.ids), "count": int(cmd.count)}),
    M.Stop: (STOP, lambda cmd: {}),
    M.ResultsReady: (RESULTS_READY, _results_body),
    M.TaskFailed: (TASK_FAILED, lambda cmd: cmd.error),
    M.JobDone: (JOB_DONE, lambda cmd: {"job": cmd.job, "status": cmd.status, "counts": cmd.counts}),
}


def encode_command(cmd) -> tuple[bytes, list]:
    """(target, frames) of a command of loomctl.messages."""
    if type(cmd) is M.Compute:
        return cmd.target, _compute_frames(cmd)
    kind, body = _COMMANDS[type(cmd)]
    return cmd.target, encode(kind, body(cmd))


def command_kind(cmd) -> bytes:
    return _COMMANDS[type(cmd)][0]


# --------------------------------------------------------------- events
MAX_COUNT = 1 << 63


def _register(body: dict) -> M.Register:
    address = field(body, "data_address", str)
    cpus = field(body, "cpus", int)
    if not address.startswith("tcp://") or cpus < 0:
        raise ProtocolError("REGISTER needs a tcp:// data_address and cpus >= 0")
    resources = body.get("resources") or {}
    if not isinstance(resources, dict) or not all(   # replies (STATUS) carry them
            isinstance(k, str) and type(v) is int and 0 <= v < MAX_COUNT for k, v in resources.items()):
        raise ProtocolError("REGISTER resources must map names to integers 0 <= n < 2**63")
    symbols = body.get("symbols") or []
    if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
        raise ProtocolError("REGISTER symbols must be a list of strings")
    limit = body.get("memory_limit")
    held = ids_from_bytes(field(body, "held", bytes, b""))
    sizes = ids_from_bytes(field(body, "held_sizes", bytes, b""))
    lengths = ids_from_bytes(field(body, "held_lengths", bytes, b""))
    if not len(held) == len(sizes) == len(lengths):
        raise ProtocolError("REGISTER held/held_sizes/held_lengths differ in length")
    return M.Register(str(body.get("name") or ""), str(body.get("hostname") or ""), cpus, resources, symbols,
                      address, limit if type(limit) is int and 0 < limit < MAX_COUNT else None,
                      held, sizes, lengths)


def _update(body: dict) -> M.Update:
    finished = ids_from_bytes(field(body, "finished", bytes, b""))
    sizes = lengths = finished[:0]
    if len(finished):
        sizes = ids_from_bytes(field(body, "sizes", bytes))
        lengths = ids_from_bytes(field(body, "lengths", bytes))
        if not len(sizes) == len(lengths) == len(finished):
            raise ProtocolError("finished/sizes/lengths differ in length")
    failed = [(int(t), str(m)) for t, m in field(body, "failed", list, [])]
    redirects = [(int(t), g) for t, g in field(body, "redirects", list, [])]
    logs = [(t, level, message) for t, level, message in field(body, "logs", list, [])]
    returned = ids_from_bytes(field(body, "returned", bytes)) if "returned" in body else None
    unfetched = ids_from_bytes(field(body, "unfetched", bytes)) if "unfetched" in body else None
    return M.Update(finished, sizes, lengths, failed, redirects,
                    ids_from_bytes(field(body, "replicas", bytes, b"")), logs, _inline(body), returned, unfetched,
                    _cpu_busy(body))


def _cpu_busy(body: dict) -> tuple | None:
    """(count, seconds) of an UPDATE's timed cpu tasks; None when absent or malformed
    (it is a hint: a bad one is ignored, not the message)."""
    busy = body.get("cpu_busy")
    if not isinstance(busy, list) or len(busy) != 2:
        return None
    count, seconds = busy
    if type(count) is not int or count <= 0 or type(seconds) not in (int, float) or not 0 <= seconds < 1e9:
        return None
    return count, float(seconds)


def _inline(body: dict) -> dict | None:
    """The small results an UPDATE sends along (id -> encoding); a malformed or
    oversized set is ignored (the client then fetches from the worker)."""
    raw, blobs = body.get("inline"), body.get("blobs")
    if not raw or not isinstance(raw, bytes) or len(raw) % 8 or not isinstance(blobs, list):
        return None
    ids = ids_from_bytes(raw).tolist()
    if len(ids) != len(blobs) or not all(type(b) is bytes and len(b) <= INLINE_BYTES for b in blobs):
        return None
    return dict(zip(ids, blobs))


def decode_worker_event(kind: bytes, body: dict):
    """The typed event of a worker's message (ProtocolError when malformed)."""
    if kind == UPDATE:
        return _update(body)
    if kind == HEARTBEAT:
        return M.Heartbeat(body)
    if kind == REGISTER:
        return _register(body)
    raise ProtocolError(f"unknown worker message {kind!r}")


def decode_ids_command(kind: bytes, body: dict) -> tuple:
    """The arguments of a server's CANCEL_TASKS or RELEASE_DATA (ids,) or STEAL_TASKS
    (ids, count) to a worker (ProtocolError when malformed)."""
    ids = ids_from_bytes(field(body, "ids", bytes)).tolist()
    if kind != STEAL_TASKS:
        return (ids,)
    count = field(body, "count", int)
    if count < 0:
        raise ProtocolError("STEAL_TASKS count is negative")
    return ids, count


def decode_client_request(kind: bytes, body: dict, blobs: list | None = None):
    """The typed request of a client's message (ProtocolError when malformed). A SUBMIT
    takes its graph out of ``blobs`` (emptied: the request then holds the only reference
    to the frame, so dropping the request's graph frees it)."""
    req = body.get("req")
    if kind == SUBMIT:
        return M.Submit(req, _submitted_graph(body, blobs), bool(body.get("load", False)), str(body.get("name") or ""),
                        body.get("trace"), bool(body.get("notify", True)), bool(body.get("detach", False)))
    if kind == RELEASE:
        return M.Release(req, ids_from_bytes(field(body, "ids", bytes)))
    if kind in (CANCEL, JOB_RESULTS, WAIT_JOB):
        return M.JobRequest(req, kind, int(field(body, "job", int)))
    if kind in (STATS, STATUS, TERMINATE):
        return M.Query(req, kind)
    if kind == SET_TRACE:
        return M.SetTrace(req, str(field(body, "path", str)))
    raise ProtocolError(f"unknown client message {kind!r}")


# --------------------------------------------------------------- authentication
def new_secret() -> str:
    return os.urandom(32).hex()


def new_nonce() -> bytes:
    return os.urandom(32)


def proof(secret: str, nonce: bytes, role: str) -> bytes:
    return hmac.new(bytes.fromhex(secret), nonce + role.encode(), hashlib.sha256).digest()


def check_proof(secret: str, nonce: bytes, role: str, given) -> bool:
    return isinstance(given, bytes) and hmac.compare_digest(proof(secret, nonce, role), given)


MAX_PENDING = 10000   # handshakes under way on one ROUTER (beyond: the oldest is dropped)


class Gatekeeper:
    """The router side of the handshake, for one ROUTER socket (sans-I/O).

    It keeps one entry per connection (its role, or its handshake under way); the owner
    calls ``forget`` when the connection goes (``loomctl.routerpeers``), and at most
    MAX_PENDING handshakes are under way at once (a flood of HELLOs from new connections
    pushes out the oldest, never everyone's).

    ``handle(identity, kind, body)`` returns (admitted, reply): ``admitted`` is True only
    for a message of a peer that completed the handshake; ``reply`` is a message to send
    back (or None)."""

    def __init__(self, secret: str | None, log=None, welcome: dict | None = None,
                 tell_strangers: bool = False):
        self.secret = secret
        # answer REFUSED to messages of unknown peers (the server does, so a worker it
        # removed learns it); otherwise they are dropped silently
        self.tell_strangers = tell_strangers
        self.log = log or (lambda msg: None)
        self.welcome = welcome or {}
        self.pending: dict[bytes, tuple[bytes, str]] = {}
        self.roles: dict[bytes, str] = {}
        self.refused = 0

    def role(self, identity: bytes) -> str | None:
        return self.roles.get(identity)

    def forget(self, identity: bytes) -> None:
        self.roles.pop(identity, None)
        self.pending.pop(identity, None)

    def handle(self, identity: bytes, kind: bytes, body: dict):
        if identity in self.roles and kind != HELLO:
            return True, None
        if kind == HELLO:
            role = body.get("role")
            if role not in ROLES or body.get("version") != PROTOCOL_VERSION:
                self.refused += 1
                # clipped: a stranger's 60 MB role must not become a 60 MB log line
                self.log(f"refused a peer: bad hello (role {role!r:.80}, version {body.get('version')!r:.80})")
                return False, encode(REFUSED, {"reason": f"protocol version {PROTOCOL_VERSION} and a known role required"})
            if identity in self.roles and self.roles[identity] != role:
                # a connection keeps its role: the server ties jobs (client) or a worker
                # record (worker) to it, which a change of role would orphan
                self.refused += 1
                self.log(f"refused a {self.roles[identity]}'s hello as a {role}: a connection keeps its role")
                return False, encode(REFUSED, {"reason": "a connection keeps its role"})
            if self.secret is None:
                self.roles[identity] = role
                return False, encode(WELCOME, self.welcome)
            nonce = new_nonce()
            self.pending.pop(identity, None)   # (one per connection: a new HELLO replaces it)
            if len(self.pending) >= MAX_PENDING:   # a flood of connections: the oldest goes
                self.pending.pop(next(iter(self.pending)))
            self.pending[identity] = (nonce, role)
            return False, encode(CHALLENGE, {"nonce": nonce})
        if kind == AUTH and identity in self.pending:
            nonce, role = self.pending.pop(identity)
            if check_proof(self.secret, nonce, role, body.get("proof")):
                self.roles[identity] = role
                return False, encode(WELCOME, self.welcome)
            self.refused += 1
            self.log(f"refused a {role}: wrong secret")
            return False, encode(REFUSED, {"reason": "authentication failed"})
        self.refused += 1
        self.log(f"dropped a {kind[:16]!r} message from a peer that has not authenticated")
        if not self.tell_strangers:
            return False, None
        return False, encode(REFUSED, {"reason": "not authenticated (start with HELLO)"})


def client_handshake(sock, role: str, secret: str | None, timeout_ms: int = 10000, ready=None) -> dict:
    """Run the peer side of the handshake on a connected DEALER; returns the WELCOME
    body or raises ConnectionError with a message for a person. ``ready(timeout_ms)``
    waits for a message (default: polling ``sock``)."""
    import zmq
    if ready is None:
        def ready(ms):
            return sock.poll(ms, zmq.POLLIN)
    sock.send_multipart(encode(HELLO, {"role": role, "version": PROTOCOL_VERSION}))
    for _ in range(16):
        if not ready(timeout_ms):
            raise ConnectionError("no answer (is it running at that address?)")
        kind, body, _ = decode(sock.recv_multipart())
        if kind == PING:   # a liveness probe may arrive at any time; it needs no answer
            continue
        if kind == WELCOME:
            return body
        if kind == REFUSED:
            raise ConnectionError(f"the server refused the connection: {body.get('reason')}")
        if kind == CHALLENGE:
            if secret is None:
                raise ConnectionError("the server requires authentication, but no secret is known "
                                      "(point --server-dir or LOOM_SERVER_DIR at its access file)")
            sock.send_multipart(encode(AUTH, {"proof": proof(secret, body["nonce"], role)}))
            continue
        raise ConnectionError(f"unexpected {kind!r} during the handshake")
    raise ConnectionError("handshake did not complete")
