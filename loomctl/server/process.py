"""The server process: the zmq shell around the sans-I/O dispatch and core.

Loop: wait for messages -> drain every message already waiting into the Dispatch ->
flush (schedule once, send what comes back, then hand the batch's journal records to
the journal: its writes, fsync and compaction never delay a message). Timers every
0.25 s: probe peers whose connection closed (``RouterPeers``), retire jobs, remove
workers whose loop has been silent too long (see BUSY_LOOP_FACTOR).
This module keeps only sockets, the clock and signals; what a message means is decided
in ``loomctl.server.dispatch``.

Invariants:
- Nothing a peer sends can stop the loop (the Dispatch drops what it cannot use; the
  handshake keeps strangers out entirely).
- The server never carries data objects: it handles ids, sizes and addresses only.
- The secret is written only to the access file (mode 0600) and never logged.
- Memory the core frees goes back to the system (``return_freed_memory``): a server that
  ran a large job is as small as its live work again.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import zmq
from loomctl import gcpolicy
from loomctl import protocol as P
from loomctl.frames import recv_message, send_message
from loomctl.access import remove_access, write_access
from loomctl.core.restore import restore, snapshot
from loomctl.routerpeers import RouterPeers
from loomctl.server import journal as J
from loomctl.server.dispatch import Dispatch

log = logging.getLogger("loomctl.server")

# A worker is lost when its connection closes (at once) or goes silent: zmq's own
# heartbeats, answered by zmq's I/O thread even while the worker's Python is busy, stop
# for ``heartbeat_timeout``. A worker whose connection lives but whose loop sent nothing
# (no heartbeat, no report) for BUSY_LOOP_FACTOR times as long is dropped too; it joins
# again with its data when its loop comes back.
BUSY_LOOP_FACTOR = 4
RESTORE_WAIT_S = 5.0          # a restored server waits this long for workers before computing again
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def _tracer():
    from loomctl.trace.hooks import ServerTracer
    return ServerTracer()


class Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 9010, server_dir: str | None = None,
                 auth: bool = True, heartbeat_timeout: float = 30.0, trace_dir: str | None = None,
                 journal: str | None = None, restore_wait: float = RESTORE_WAIT_S, steal: bool = False):
        """``journal``: the journal's path (None: no journal). A journal with live jobs is
        restored: its jobs, and its port and secret (when ``port`` is 0). JournalError
        when it cannot be used. ``steal``: work stealing (``core.stealing``)."""
        return_freed_memory()
        records, records_end, dropped = J.load(journal) if journal else ([], 0, 0)
        old = next((r[1] for r in reversed(records) if r[0] == "server" and isinstance(r[1], dict)), {})
        live = any(r[0] == "job" for r in records)
        if live and port == 0 and isinstance(old.get("port"), int):
            port = old["port"]   # (workers and clients come back to the address they knew)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # no high-water mark: a COMPUTE or RELEASE_DATA to a busy worker is queued, never
        # dropped (at zmq's default of 1,000 queued messages a non-blocking send failed and
        # the message was lost: tasks assigned for ever); a stalled worker is dropped by
        # the heartbeats instead
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # no ROUTER_HANDOVER: a peer must never inherit another connection's routing id,
        # and with it that connection's authentication (a second connection with an id in
        # use is refused by zmq; a worker reconnecting after a cut gets in once the old
        # connection is dropped, 3 s at most, see the heartbeats below)
        # zmq-level heartbeats: a peer that vanishes without closing its connection (a cut
        # cable, a stopped process) is disconnected after the same silence as a worker
        # without heartbeats (a closed connection is seen at once, by the monitor)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(max(1.0, heartbeat_timeout) * 1000))
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE)
        bind_host = host if host not in ("", "localhost") else "127.0.0.1"
        if port == 0:
            self.port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            self.sock.bind(f"tcp://{bind_host}:{port}")
            self.port = port
        self.host = bind_host
        self.secret = P.new_secret() if auth else None
        if live and auth and isinstance(old.get("secret"), str):
            self.secret = old["secret"]
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # an unroutable peer raises (RouterPeers probes)
        self.peers = RouterPeers(self.sock)
        self.monitor = self.peers.monitor
        self.server_dir = server_dir
        self.heartbeat_timeout = heartbeat_timeout
        self.dispatch = Dispatch(self.secret, {"host": self.host, "port": self.port, "pid": os.getpid(),
                                               "started": time.monotonic(), "steal": steal},
                                 trace_dir, tracer_factory=_tracer)
        self.core = self.dispatch.core
        self.core.options.steal = steal
        self.journal = None
        self.restored = None
        if journal:
            self._open_journal(journal, records, records_end, dropped, restore_wait)
        if server_dir:
            write_access(server_dir, self.host, self.port, self.secret)

    # ------------------------------------------------------------------ journal
    def _open_journal(self, path: str, records: list, records_end: int, dropped: int, wait: float) -> None:
        now = time.monotonic()
        if dropped:
            log.warning("journal %s: dropped %d bytes after its last complete record (a write cut short)",
                        path, dropped)
        if any(r[0] == "job" for r in records):
            summary = restore(self.core, records, now, wait)
            self.restored = {"at": time.time(), "jobs": summary["jobs"], "journal": path,
                             "tasks_finished": summary["tasks_finished"]}
            self.dispatch.info["restored"] = self.restored
            log.warning("restored %d jobs (%d tasks had finished) from the journal %s; waiting %g s for "
                        "workers to bring their data back%s", summary["jobs"], summary["tasks_finished"], path, wait,
                        f" ({summary['skipped']} records skipped)" if summary["skipped"] else "")
        try:
            journal = J.Journal(path, records_end)
            journal.compact(snapshot(self.core, self._server_record()), now)   # the live state only, from a clean start
        except OSError as exc:
            raise J.JournalError(f"cannot write the journal {path}: {exc.strerror or exc}") from None
        self.journal = J.JournalWriter(journal)
        self.core.record = []
        self.dispatch.journal_now = self.journal.write_now   # (a large job's records, with its graph file:
        # written before the job is added, so that its frame is freed first)

    def _server_record(self) -> dict:
        return {"host": self.host, "port": self.port, "secret": self.secret}

    def _journal_step(self, now: float) -> None:
        """The batch's records to the journal's thread (and a compaction, when it is due)."""
        records = self.dispatch.journal_records()
        self.journal.add(records)
        if self.journal.wants_compaction(now, any(r[0] == "retire" for r in records)):
            self.journal.compact(snapshot(self.core, self._server_record()), now)

    @property
    def running(self) -> bool:
        return self.dispatch.running

    @running.setter
    def running(self, value: bool) -> None:
        self.dispatch.running = value

    # ------------------------------------------------------------------ loop
    def serve(self) -> None:
        log.info("server listening on tcp://%s:%d (authentication %s)", self.host, self.port,
                 "on" if self.secret else "OFF")
        last_check = time.monotonic()
        gcpolicy.tune()
        try:
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.monitor, zmq.POLLIN)
            while self.running:
                events = dict(poller.poll(100))
                if self.monitor in events:
                    self.peers.on_monitor(time.monotonic())
                    self._probe_peers(time.monotonic())
                if self.sock in events:
                    self._drain()
                now = time.monotonic()
                if now - last_check > 0.25:
                    last_check = now
                    self._probe_peers(now)
                    self.dispatch.tick(now, BUSY_LOOP_FACTOR * self.heartbeat_timeout)
                    self._flush(now)
        finally:
            self.close()

    def _drain(self) -> None:
        now = time.monotonic()
        dispatch = self.dispatch
        sock = self.sock
        # (a zmq.Again at the end of every drain costs more than asking for EVENTS; the
        # routing id stays a Frame, for its fd; the kind and body frames are copied into
        # bytes, the blobs after them (a SUBMIT's graph file) are not: loomctl.frames)
        for _ in range(10000):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                break
            try:
                route, *frames = recv_message(sock, range(1, 3))
            except zmq.Again:
                break
            identity = self.peers.seen(route, now)
            dispatch.message(identity, frames, now)   # (takes the list: it empties it)
        self._flush(now)   # once per drained batch of messages

    def _flush(self, now: float) -> None:
        outgoing = self.dispatch.flush(now)
        sock = self.sock
        for identity, frames in outgoing:
            try:   # (copy=False: a large frame, a COMPUTE's 10 MB const, is sent from where it
                #     is; pyzmq still copies frames under zmq.COPY_THRESHOLD, which is cheaper)
                send_message(sock, [identity, *frames], dontwait=True, copy=False)
            except zmq.ZMQError as exc:   # the peer is gone: nothing to do
                log.info("could not send to a peer: %s", exc)
        if self.journal is not None:   # (what a reply confirms is on disk within FLUSH_S, written
            self._journal_step(now)    # by the journal's thread: no message waits for the disk)

    def _probe_peers(self, now: float) -> None:
        gone = self.peers.poll(now)
        for identity in gone:
            self.dispatch.peer_gone(identity, now)
        if gone:
            self._flush(now)

    def close(self) -> None:
        self.dispatch.close()
        if self.journal is not None:
            self._journal_step(time.monotonic())
            self.journal.close()
        if self.server_dir:
            remove_access(self.server_dir)
        self.peers.close()
        self.sock.close(linger=500)   # let STOP messages reach the workers
        self.ctx.term()


def return_freed_memory() -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which
    arrays of up to 32 MB come from the heap and stay in the process when freed (a 1M-task
    submission left ~100 MB of RSS behind); a fixed threshold keeps them mmapped."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)   # M_MMAP_THRESHOLD: 128 KiB, fixed
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


def run_server(**kwargs) -> None:
    server = Server(**kwargs)

    def stop(signum, frame):
        server.running = False
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve()
