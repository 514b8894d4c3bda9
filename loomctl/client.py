"""HyperLoom-compatible Python client: Client, Future, TaskFailed, LoomError.

    from loomctl.client import Client, tasks
    client = Client("localhost", 9010)
    print(client.submit_one(tasks.merge((tasks.const("Hello "), tasks.const("world!")))).gather())

Results are downloaded directly from the worker that holds them (the server only tells
where); the server never carries data objects.

Invariants:
- One Client owns one DEALER to the server; it is not thread-safe.
- A Future's data stays on the workers until the future is released (gather releases).
- Pushes from the server (results ready, task failed, job done) are applied to futures
  whenever the client reads its socket, so waiting never loses a notification.
- A result whose worker is gone by the time it is fetched (or no longer holds it) is
  asked of the server again: computed again, it is announced and fetched from its new
  worker (``fetch`` gives up after FETCH_ATTEMPTS failures at one address).
- An error that belongs to one task is a TaskFailed, also when the server refuses a
  submission because of that task.
- Every blocking call raises LoomConnectionError within ``server_grace`` seconds (3 by
  default) of the server going away (its connection closed, or silent for 3 s). A server
  that comes back within that time (the same one, or one restarted from its journal) is
  joined again and the jobs of live futures are followed again, so waits go on.
"""

from __future__ import annotations

import itertools
import os
import socket as _socket
import time
from typing import Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks  # noqa: F401  (HyperLoom: from loom.client import tasks)
from graphfmt.graph import GraphError
from graphfmt.plan import as_task_list, build_graph
from graphfmt.tasks import Task
from loomctl import protocol as P
from loomctl.access import AccessError, connect_address, read_access
from loomctl.worker import data as D
from loomctl.downloads import WorkerGone, WorkerLinks
from loomctl.frames import EVERY, recv_message, send_message


SERVER_GRACE_S = 3.0   # a blocking call raises LoomConnectionError this long after the server went
FETCH_ATTEMPTS = 4     # downloads of one result from one worker address before fetch gives up
FETCH_RETRY_MS = 1000  # wait before trying again where the server still places the data


class LoomException(Exception):
    """Base of the errors this client raises."""


class LoomError(LoomException):
    """The server refused a request, or the connection failed."""


class LoomConnectionError(LoomError):
    """The server or a worker could not be reached, or stopped answering."""


def _held(reply: dict) -> dict[int, str]:
    """The results a job's reply (WAIT_JOB, JOB_RESULTS) says are held: id -> address."""
    return dict(zip(P.ids_from_bytes(reply.get("ids", b"")).tolist(), reply.get("addresses", [])))


class _HolderLost(Exception):
    """A download that could not give ``futures`` (their worker is gone, or no longer
    holds them); ``values`` are what it did give, ``error`` what to raise on giving up."""

    def __init__(self, futures: list, error: LoomError, values: dict | None = None):
        super().__init__(str(error))
        self.futures, self.error, self.values = futures, error, values or {}


class TaskFailed(LoomException):
    """A task of a submission failed; the whole submission failed with it. A task the
    server refuses at submit (a malformed config, a relative save or checkpoint path)
    fails the same way, with ``worker`` empty and ``id`` its id within the submission."""

    def __init__(self, id: int, worker: str, error_msg: str, label: str = ""):  # noqa: A002
        self.id = id
        self.worker = worker
        self.error_msg = error_msg
        self.label = label
        name = f" ({label})" if label else ""
        where = f" on worker {worker}" if worker else " at submit"
        super().__init__(f"task {id}{name} failed{where}: {error_msg}")


JOB_RECORDS = 1000   # job statuses/errors kept beyond those of live futures (see Client._prune)


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def _graph_bytes(graph) -> bytes:
    data = graphfmt.to_bytes(graph)
    if len(data) > P.MAX_MESSAGE - (1 << 16):   # the server drops bigger messages unread
        raise LoomError(f"the plan's graph file is {len(data) >> 20} MiB; the server takes at most "
                        f"{P.MAX_MESSAGE >> 20} MiB in one submission: submit it in parts (futures "
                        "of one job can be inputs of the next)")
    return data

def _task_at_fault(graph) -> TaskFailed | None:
    """The failure of the task that makes a refused graph invalid, if one task is at
    fault (the server's refusal names it only in its text). Validating here, after a
    refusal, costs nothing on the way of a valid plan."""
    try:
        graph.validate()
    except GraphError as exc:
        if exc.task is None:
            return None
        prefix = graph.describe(exc.task) + ": "
        message = str(exc)[len(prefix):] if str(exc).startswith(prefix) else str(exc)
        return TaskFailed(exc.task, "", message, graph.label(exc.task) or "")
    return None


class Future:
    __slots__ = ("client", "task_id", "job", "address", "inline", "_released", "__weakref__")

    def __init__(self, client: "Client", task_id: int, job: int):
        self.client, self.task_id, self.job = client, task_id, job
        self.address: str | None = None
        self.inline: bytes | None = None   # the result's encoding, when it came with the notice
        self._released = False

    def finished(self) -> bool:
        self.client._poll(0)
        return self.address is not None

    def released(self) -> bool:
        return self._released

    def wait(self) -> None:
        self.client.wait([self])

    def fetch(self):
        return self.client.fetch([self])[0]

    def gather(self):
        return self.client.gather([self])[0]

    def release(self) -> None:
        self.client.release([self])

    def __repr__(self):
        state = "released" if self._released else "finished" if self.address else "pending"
        return f"<Future task={self.task_id} job={self.job} {state}>"


class Client:
    def __init__(self, address: str | None = None, port: int | None = None,
                 server_dir_path: str | None = None, secret: str | None = ..., timeout: float = 30.0,
                 server_grace: float = SERVER_GRACE_S):
        access = None
        try:
            access = read_access(server_dir_path)
        except AccessError as exc:
            if address is None:
                raise LoomConnectionError(str(exc)) from None
        if address is None:
            address, port = access["host"], access["port"]
        if port is None:
            port = 9010
        if secret is ...:
            secret = access.get("secret") if access and _same_server(access, address, port) else None
        self.secret = secret
        self.timeout_ms = int(timeout * 1000)
        self.ctx = zmq.Context()
        self.server_grace = server_grace
        self.lost_since: float | None = None   # when the connection to the server closed
        self._rejoin_pending = False
        self.sock = self._connect(connect_address(address, port))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.links = WorkerLinks(self.ctx, secret, self.timeout_ms)   # to download results
        self.req = itertools.count(1)
        self.futures: dict[int, Future] = {}
        self.job_errors: dict[int, dict] = {}
        self.job_status: dict[int, str] = {}
        self.replies: dict[int, tuple[bytes, dict]] = {}
        # results ready before their futures exist (the notice can arrive in the same read
        # as the submit reply); consumed when the submit makes its futures
        self.early_addresses: dict[int, tuple[str, bytes | None]] = {}
        self.trace_path: str | None = None

    def _connect(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)   # notices (RELEASE) are queued, never dropped
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)      # a server host that vanished without
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)  # closing the connection counts as gone
        sock.connect(address)
        try:
            P.client_handshake(sock, "client", self.secret, self.timeout_ms)
        except (ConnectionError, P.ProtocolError) as exc:
            sock.close(0)
            raise LoomConnectionError(f"the server at {address}: {exc}") from None
        return sock

    # ------------------------------------------------------------------ requests
    def _request(self, kind: bytes, body: dict | None = None, *blobs) -> dict:
        req = next(self.req)
        send_message(self.sock, P.encode(kind, {**(body or {}), "req": req}, *blobs), copy=False)
        while req not in self.replies:
            if not self._poll(self.timeout_ms):
                raise LoomConnectionError(f"no reply from the server to {kind.decode()} within {self.timeout_ms / 1000:.0f} s")
        reply_kind, reply = self.replies.pop(req)
        if reply_kind == P.ERROR:
            raise LoomError(reply.get("message", "request failed"))
        reply.pop("req", None)
        return reply

    def _poll(self, timeout_ms: int) -> bool:
        """Read every waiting message (waiting up to timeout_ms for the first).
        LoomConnectionError once the server has been gone for ``server_grace`` seconds."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            wait = max(0, min(deadline - time.monotonic(), 0.25))
            ready = dict(self.poller.poll(int(wait * 1000)))
            if self.monitor in ready:
                self._on_monitor()
                if self._rejoin_pending:
                    self._rejoin()
            if self.lost_since is not None and time.monotonic() - self.lost_since >= self.server_grace:
                raise LoomConnectionError(f"the server is gone (no connection for {self.server_grace:g} s)")
            if self.sock in ready:
                break
            if time.monotonic() >= deadline:
                return False
        sock = self.sock
        while sock.getsockopt(_EVENTS) & _POLLIN:   # (asking is cheaper than a zmq.Again)
            try:
                frames = recv_message(sock, EVERY)
            except zmq.Again:
                return True
            kind, body, _ = P.decode(frames)
            self._apply(kind, body)
        return True

    def _on_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            except Exception:   # a malformed monitor frame: nothing to learn from it
                return
            if event == zmq.EVENT_DISCONNECTED and self.lost_since is None:
                self.lost_since = time.monotonic()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.lost_since is not None:
                self.lost_since = None
                self._rejoin_pending = True   # (the server may be a restarted one)

    def _rejoin(self) -> None:
        """The connection came back: prove the secret again (a restarted server does not
        know this client) and follow the jobs of live futures again, taking what the
        server says of them (results held, status, error)."""
        self._rejoin_pending = False
        self.sock.send_multipart(P.encode(P.HELLO, {"role": "client", "version": P.PROTOCOL_VERSION}))
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            if not self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
                raise LoomConnectionError("the server came back but did not answer this client")
            kind, body, _ = P.decode(self.sock.recv_multipart())
            if kind == P.CHALLENGE and self.secret is not None:
                self.sock.send_multipart(P.encode(P.AUTH, {"proof": P.proof(self.secret, body.get("nonce", b""),
                                                                            "client")}))
            elif kind == P.WELCOME:
                break
            elif kind == P.REFUSED or kind == P.CHALLENGE:
                raise LoomConnectionError(f"the server that came back refused this client ({body.get('reason')})")
            elif kind != P.PING:
                self._apply(kind, body)
        for job in sorted({f.job for f in self.futures.values()}):
            try:
                reply = self._request(P.WAIT_JOB, {"job": job})
            except LoomError as exc:   # a server without this job (no journal, or it retired it)
                self.job_errors[job] = {"job": job, "id": -1, "label": "", "worker": "",
                                        "message": f"the server came back without this job: {exc}"}
                continue
            for task_id, address in _held(reply).items():
                future = self.futures.get(task_id)
                if future is not None:
                    future.address = address
            if reply.get("error"):
                self.job_errors[job] = reply["error"]
            if reply.get("status") and reply["status"] != "running":
                self.job_status[job] = reply["status"]

    def _apply(self, kind: bytes, body: dict) -> None:
        if kind == P.REFUSED:   # a server restarted on the address: it does not know us
            raise LoomConnectionError(f"the server no longer knows this client ({body.get('reason')}); "
                                      "it was restarted or dropped this connection")
        if kind in (P.REPLY, P.ERROR):
            self.replies[body.get("req")] = (kind, body)
        elif kind == P.RESULTS_READY:
            inline = dict(zip(P.ids_from_bytes(body.get("inline", b"")).tolist(), body.get("blobs", ())))
            for task_id, address in zip(P.ids_from_bytes(body["ids"]).tolist(), body["addresses"]):
                future = self.futures.get(task_id)
                if future is not None:
                    future.address, future.inline = address, inline.get(task_id)
                else:
                    self.early_addresses[task_id] = (address, inline.get(task_id))
        elif kind == P.TASK_FAILED:
            self.job_errors[body["job"]] = body
            self._prune(self.job_errors)
        elif kind == P.JOB_DONE:
            self.job_status[body["job"]] = body["status"]
            self._prune(self.job_status)

    def _prune(self, records: dict) -> None:
        """Job records (status, error) are kept for the jobs of live futures and the
        last JOB_RECORDS jobs: a client that runs many jobs does not grow with them."""
        if len(records) > 2 * JOB_RECORDS:
            live = {f.job for f in self.futures.values()}
            recent = list(records)[-JOB_RECORDS:]
            kept = {job: records[job] for job in records if job in live}
            kept.update((job, records[job]) for job in recent)
            records.clear()
            records.update(kept)

    # ------------------------------------------------------------------ API
    def submit(self, tasks_, load: bool = False):
        """Submit a task or a list of tasks; returns a Future (for one task) or a list of
        Futures in the same order. Shared sub-graphs are computed once per submission."""
        single = isinstance(tasks_, Task)
        items = as_task_list(tasks_)
        bad = next((item for item in items if not isinstance(item, Task)), None)
        if isinstance(bad, Future):
            raise LoomError("a future cannot be submitted; submit a task that uses it as an input")
        if bad is not None:
            raise LoomError(f"cannot submit a {type(bad).__name__}; expected Task objects")
        graph, local_ids = build_graph(items, external=self._future_input)
        graph_bytes = _graph_bytes(graph)
        try:
            reply = self._request(P.SUBMIT, {"load": load, "notify": True, "trace": self.trace_path},
                                  graph_bytes)
        except LoomConnectionError:
            raise
        except LoomError as exc:
            raise _task_at_fault(graph) or exc from None
        job, base = reply["job"], reply["base"]
        futures = []
        for local in local_ids:
            task_id = base + local
            future = self.futures.get(task_id) or Future(self, task_id, job)
            self.futures[task_id] = future
            futures.append(future)
        self._take_early_addresses(futures)
        return futures[0] if single else futures

    def submit_graph(self, graph: graphfmt.Graph, load: bool = False, name: str = "",
                     detach: bool = False) -> tuple[int, list[Future]]:
        """Submit a columnar graph (e.g. read from a graph file); returns the job id and
        a future per result (the marked results, else the sinks), in task id order.
        A detached job outlives this client (its results stay until cancelled); other
        jobs are cancelled, and their results released, when the client disconnects."""
        reply = self._request(P.SUBMIT, {"load": load, "notify": True, "name": name, "trace": self.trace_path,
                                         "detach": detach}, _graph_bytes(graph))
        job = reply["job"]
        futures = []
        for task_id in P.ids_from_bytes(reply["results"]).tolist():
            future = self.futures[task_id] = Future(self, task_id, job)
            futures.append(future)
        self._take_early_addresses(futures)
        return job, futures

    def _take_early_addresses(self, futures: list[Future]) -> None:
        """Apply notices read before these futures existed; any other early notice is for
        a future released already, so none is kept."""
        if self.early_addresses:
            for future in futures:
                if future.task_id in self.early_addresses:
                    future.address, future.inline = self.early_addresses[future.task_id]
            self.early_addresses.clear()

    def job_progress(self, job: int) -> dict:
        """Status and per-state task counts of a job; also applies pending pushes."""
        return self._request(P.JOB_RESULTS, {"job": job})

    def wait_notice(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message from the server (a result notice,
        a failed task, the end of a job) and apply it; False when none came."""
        return self._poll(int(timeout * 1000))

    def job_futures(self, job: int) -> tuple[dict, list[Future]]:
        """The progress of any job (e.g. a detached one, submitted by another client) and
        a future for each result it still holds, in task id order."""
        info = self.job_progress(job)
        futures = []
        for task_id, address in _held(info).items():
            future = Future(self, task_id, job)
            future.address = address
            futures.append(future)
        return info, futures

    def submit_one(self, task: Task, load: bool = False) -> Future:
        return self.submit([task], load)[0]

    def _future_input(self, obj) -> Task:
        if not isinstance(obj, Future):
            raise TypeError(f"task input must be a Task or a Future, got {type(obj).__name__}")
        if obj.client is not self:
            raise LoomError("a future of another client cannot be used as an input")
        if obj._released:
            raise LoomError(f"future of task {obj.task_id} was released and cannot be used as an input")
        return Task(S.FUTURE, (), S.encode_u64(obj.task_id))

    def wait(self, futures) -> None:
        # each wake-up looks at the futures still pending and at their jobs once, not at
        # every future: waiting for n results costs O(n), not O(n) per notice
        pending = _as_list(futures)
        all_jobs = {f.job for f in pending}   # a failed task of any of them fails the wait
        while True:
            self._raise_failures(all_jobs)
            pending = [f for f in pending if f.address is None]
            if not pending:
                return
            jobs = {f.job for f in pending}
            for f in pending:
                if f._released:
                    raise LoomError(f"future of task {f.task_id} was released")
            for job in jobs:
                if self.job_status.get(job) == "cancelled":
                    raise LoomError(f"job {job} was cancelled")
            self._poll(1000)

    def _raise_failures(self, jobs) -> None:
        for job in jobs:
            error = self.job_errors.get(job)
            if error is not None:
                raise TaskFailed(error.get("id"), error.get("worker", ""), error.get("message", ""),
                                 error.get("label", ""))

    def as_completed(self, futures) -> Iterator[Future]:
        pending = list(_as_list(futures))
        while pending:
            self._raise_failures({f.job for f in pending})
            done = [f for f in pending if f.address is not None]
            if not done:
                self._poll(1000)
                continue
            pending = [f for f in pending if f.address is None]
            yield from done

    def fetch(self, futures) -> list:
        """The values of ``futures``, downloaded from the workers that hold them. When such
        a worker is gone (or no longer holds the data), the server is asked where the data
        is now; what it lost is computed again and announced, and the download goes on."""
        futures = _as_list(futures)
        values: dict[int, object] = {}
        failures: dict[tuple[int, str], int] = {}   # (task, address) -> failed downloads
        while True:
            self.wait([f for f in futures if f.task_id not in values])
            by_address: dict[str, list[Future]] = {}
            for f in futures:
                if f.task_id in values:
                    continue
                if f.inline is not None:   # came with the results notice
                    values[f.task_id] = D.to_client(D.decode(f.inline))
                else:
                    by_address.setdefault(f.address, []).append(f)
            if not by_address:
                return [values[f.task_id] for f in futures]
            for address, group in by_address.items():
                try:
                    values.update(self._download(address, group))
                except _HolderLost as exc:
                    values.update(exc.values)
                    for f in exc.futures:
                        key = (f.task_id, address)
                        failures[key] = failures.get(key, 0) + 1
                        if failures[key] >= FETCH_ATTEMPTS:
                            raise exc.error from None
                    self._locate(exc.futures, address)

    def _download(self, address: str, group: list[Future]) -> dict:
        """The values of ``group`` from the worker at ``address``; _HolderLost for those
        it could not give (it is gone, or no longer holds them)."""
        ids = [f.task_id for f in group]

        def moved() -> bool:   # (the server re-announced some of them elsewhere)
            self._poll(0)
            return any(f.address != address for f in group)

        try:
            answer = self.links.download(address, ids, moved)
        except WorkerGone as exc:
            raise _HolderLost(group, LoomConnectionError(str(exc))) from None
        if answer is None:
            return {}
        found, missing, parts = answer
        failed = [(t, p) for t, p in zip(found, parts) if isinstance(p, str)]
        if failed:
            raise LoomError(f"worker at {address} could not send the data of task {failed[0][0]}: {failed[0][1]}")
        values = {t: D.to_client(D.decode_parts(p)) for t, p in zip(found, parts)}
        if missing:
            lost = set(missing)
            raise _HolderLost([f for f in group if f.task_id in lost],
                              LoomError(f"worker at {address} no longer holds the data of tasks {missing}"), values)
        return values

    def _locate(self, group: list[Future], address: str) -> None:
        """Ask the server where the data of ``group`` is now (following their jobs, so
        that data computed again is announced to this client). A future whose data the
        server no longer counts as held waits for that announcement; one the server still
        places at ``address`` is tried there again after a short wait."""
        same = False
        for job in sorted({f.job for f in group}):
            reply = self._request(P.WAIT_JOB, {"job": job})
            held = _held(reply)
            for f in group:
                if f.job == job:
                    f.address = held.get(f.task_id)
                    same = same or f.address == address
        if same:
            self._poll(FETCH_RETRY_MS)

    def gather(self, futures) -> list:
        futures = _as_list(futures)
        values = self.fetch(futures)
        self.release(futures)
        return values

    def release(self, futures) -> None:
        futures = [f for f in _as_list(futures) if not f._released]
        if not futures:
            return
        ids = [f.task_id for f in futures]
        for f in futures:
            f._released = True
            self.futures.pop(f.task_id, None)
        # a notice, not a request: nothing to wait for (the server handles it before any
        # later request of this client)
        send_message(self.sock, P.encode(P.RELEASE, {"ids": P.ids_to_bytes(ids)}))

    def cancel(self, job: int) -> None:
        """Cancel a running job (its futures fail), or drop the results of a finished one."""
        self._request(P.CANCEL, {"job": job})

    def get_stats(self) -> dict:
        return self._request(P.STATS)

    def status(self) -> dict:
        return self._request(P.STATUS)

    def set_trace(self, path: str) -> None:
        """Trace the jobs submitted from now on into directory ``path``."""
        self.trace_path = os.path.abspath(path)
        self._request(P.SET_TRACE, {"path": self.trace_path})

    def terminate(self) -> None:
        """Stop the server and all its workers."""
        self._request(P.TERMINATE)
        self.close()

    def close(self) -> None:
        self.links.close()
        if not self.sock.closed:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(0)
            self.sock.close(0)
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_list(futures) -> list[Future]:
    if isinstance(futures, Future):
        return [futures]
    items = list(futures)
    for f in items:
        if not isinstance(f, Future):
            raise LoomError(f"expected futures, got {type(f).__name__}")
    return items


def _same_server(access: dict, address: str, port: int) -> bool:
    if access.get("port") != port:
        return False
    try:
        mine = {_socket.gethostbyname(address)}
        theirs = {_socket.gethostbyname(access["host"] if access["host"] not in ("0.0.0.0", "") else "127.0.0.1")}
    except OSError:
        return address == access.get("host")
    return bool(mine & theirs) or "127.0.0.1" in mine and access["host"] in ("0.0.0.0", "127.0.0.1", "localhost")
