"""The server's journal: what a restarted server needs to carry on its jobs.

A file of records: an 8-byte magic, a format version, then records framed as
``[u32 length][u32 crc32][msgpack payload]``. Records (lists, the first item a name):

  ["server", {host, port, secret}]        the address and secret to come back on
  ["job", job, base, graph file bytes, {name, load, trace, detached}]
  ["ids", next id]                        ids below this may be held by workers
  ["finished", ids, sizes, lengths]       (int64 bytes) tasks finished with these sizes
  ["unwanted", ids]                       results no client wants any more
  ["end", job, status, error]             a job ended (finished, failed, cancelled)
  ["retire", job]                         a job is done with: a compaction drops it

The core appends records of what changed (``core.record``, plain values); the server
loop hands them to the journal's thread, which writes them within BATCH_S and fsyncs
within FLUSH_S of a write: one fsync per batch, so a crash of the machine loses at most
about BATCH_S + FLUSH_S, a killed server at most BATCH_S (the page cache keeps the rest).
A batch with a new job is written at once, not gathered for BATCH_S: its client has the
job's id, and a server killed meanwhile would have forgotten the job (the window is the
thread's wake-up, not BATCH_S); so is one the loop waits for (``write_now``, ``close``). A large bytes item (a job's graph file,
a view of the frame it was received in) is written from where it is: neither packed
into a copy nor joined with the rest; a compaction's live jobs come as their Graphs,
encoded into graph files by the thread, not on the server's loop. When retired jobs make up
most of the file it is rewritten (``compact``) with the live jobs only.

The server's loop never waits for the disk: a ``JournalWriter`` thread owns the Journal
and does its framing, writes, fsyncs and compactions, in the order they were handed over
(``add``, ``compact``; ``write_now`` waits, for a huge graph file whose frame is to be
freed). A write that fails (a full disk, an I/O error) is cut back to the last complete
record and said in one log line; the journal is then *broken*: records are dropped (a
journal with a gap would restore a wrong state) until a compaction (``wants_compaction``,
every RETRY_S) writes the live state whole again.

Invariants:
- ``load`` returns every complete record in order and stops at the first incomplete or
  damaged one (a torn tail after a crash), saying how many bytes it dropped; the next
  write starts where the good records end.
- The file always ends with a complete record (a failed write is truncated away), and
  what it holds is a prefix of the records handed over since its last compaction.
- A journal of a newer format version is refused (JournalError), never misread.
- A compaction is atomic: a new file is written, fsynced and renamed over the old one.
- What is fsynced leaves the page cache (``_drop_cached``): the journal's pages do not
  stay in memory.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib

import msgpack

import graphfmt
from graphfmt.graph import Graph
from loomctl.protocol import packb

MAGIC = b"LOOMJRNL"
VERSION = 1
FLUSH_S = 0.1
_FRAME = struct.Struct("<II")
_BIN32 = struct.Struct(">BI")
BIG_ITEM = 1 << 16   # a record's bytes item above this is written from where it is, not copied
RETRY_S = 5.0        # a broken journal is compacted again this often (JournalWriter)
BATCH_S = 0.05       # the journal's thread gathers what the loop hands over this long, then writes it
                     # (at 0.01 s its wake-ups took the GIL from the loop often enough to cost a
                     # 2^10 tree loop ~15% of its speed)
COMPACT_BYTES = 1 << 20   # the journal is rewritten once this much (and twice its live size) was added

log = logging.getLogger("loomctl.server")


class JournalError(Exception):
    """A journal that cannot be used (a one-line message for a person)."""


def _frame(record: list) -> list:
    """The framed record as pieces to write in order: a large bytes-like item (a job's
    graph file, a view of the frame it came in) is written from where it is, not copied;
    a Graph item (a snapshot's job) is encoded here, as its graph file, in pieces."""
    items = [_item(x) for x in record]
    if not any(type(x) is _Raw for x in items):
        payload = packb(items)
        return [_FRAME.pack(len(payload), zlib.crc32(payload)) + payload]
    packer = msgpack.Packer(use_bin_type=True)
    pieces, small = [], [packer.pack_array_header(len(items))]
    for x in items:
        if type(x) is not _Raw:
            small.append(packer.pack(x))
            continue
        small.append(_BIN32.pack(0xC6, sum(len(p) for p in x)))   # (msgpack bin 32: BIG_ITEM < length < 4 GiB)
        pieces += [b"".join(small), *x]
        small = []
    pieces.append(b"".join(small))
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return [_FRAME.pack(sum(len(piece) for piece in pieces), crc), *pieces]


class _Raw(list):
    """The pieces of a bytes item of a record, written one after another as they are."""


def _item(x):
    if isinstance(x, Graph):
        parts = graphfmt.to_pieces(x)
    elif isinstance(x, (bytes, memoryview)) and len(x) > BIG_ITEM:
        parts = [x]
    else:
        return x
    views = [memoryview(p).cast("B") for p in parts]
    size = sum(len(v) for v in views)
    if size <= BIG_ITEM:
        return b"".join(views)
    if size >= 1 << 32:
        raise JournalError("a job's graph file of 4 GiB or more cannot be journaled")
    return _Raw(views)


def _write_pieces(fd: int, pieces) -> int:
    """Write ``pieces`` in order: large ones as they are, the small ones between them
    joined (one write each run); returns how many bytes were written."""
    written, small = 0, []
    for piece in pieces:
        if len(piece) > BIG_ITEM:
            written += _write_all(fd, b"".join(small)) + _write_all(fd, piece)
            small = []
        else:
            small.append(piece)
    return written + _write_all(fd, b"".join(small))


def _write_all(fd: int, data) -> int:
    """Write all of ``data`` (bytes or a view) to ``fd``; returns its length."""
    view = memoryview(data).cast("B")
    n = len(view)
    while view:
        view = view[os.write(fd, view):]
    return n


def _drop_cached(fd: int) -> None:
    """The file's pages leave the page cache once they are on disk: the server never reads
    its journal back (a restart reads it once), so a server writing large graphs keeps no
    page cache for them, and the pages freed are used again for the next writes."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def load(path: str) -> tuple[list, int, int]:
    """(records, offset of the end of the last complete one, bytes dropped after it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as exc:
        raise JournalError(f"cannot read the journal {path}: {exc.strerror or exc}") from None
    head = len(MAGIC) + 2
    if len(data) < head:
        return [], 0, len(data)
    if data[:len(MAGIC)] != MAGIC:
        raise JournalError(f"{path} is not a loomctl journal (wrong magic)")
    version = struct.unpack_from("<H", data, len(MAGIC))[0]
    if version > VERSION:
        raise JournalError(f"the journal {path} is of format version {version}, newer than this "
                           f"loomctl's ({VERSION}); use a newer loomctl, or move the journal away")
    records, pos = [], head
    while pos + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, pos)
        payload = data[pos + _FRAME.size:pos + _FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            break
        try:
            record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:
            break
        if not isinstance(record, list) or not record or not isinstance(record[0], str):
            break
        records.append(record)
        pos += _FRAME.size + length
    return records, pos, len(data) - pos


class Journal:
    def __init__(self, path: str, records_end: int | None = None):
        """Open ``path`` for appending after ``records_end`` (from ``load``; a torn tail
        is cut off), or start a new journal there."""
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if records_end:
            self.fd = os.open(path, os.O_WRONLY)
            os.ftruncate(self.fd, records_end)
            os.lseek(self.fd, records_end, os.SEEK_SET)
            self.size = records_end
        else:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(self.fd, MAGIC + struct.pack("<H", VERSION))
            self.size = len(MAGIC) + 2
        self.pending: list[bytes] = []
        self.unsynced = False      # written since the last fsync
        self.last_flush = 0.0
        self.written_since_compaction = 0

    def add(self, record: list) -> None:
        self.pending += _frame(record)

    def write(self) -> None:
        """Write what is pending (the pieces in order) without the fsync: the next
        ``flush`` makes it durable. Frees what the pending records held. On an OSError
        the file is cut back to its last complete record and the error raised."""
        pieces, self.pending = self.pending, []
        try:
            written = _write_pieces(self.fd, pieces)
        except OSError:
            try:   # (no torn record left behind: the next write starts after the good ones)
                os.ftruncate(self.fd, self.size)
                os.lseek(self.fd, self.size, os.SEEK_SET)
            except OSError:
                pass
            raise
        self.size += written
        self.written_since_compaction += written
        self.unsynced = self.unsynced or written > 0

    def flush(self, now: float) -> None:
        """Write what is pending, then one fsync."""
        self.last_flush = now
        if not self.pending and not self.unsynced:
            return
        self.write()
        os.fsync(self.fd)
        _drop_cached(self.fd)
        self.unsynced = False

    def due(self, now: float) -> bool:
        return bool(self.pending or self.unsynced) and now - self.last_flush >= FLUSH_S

    def compact(self, records: list, now: float) -> None:
        """Replace the journal by ``records`` (the live state), atomically."""
        self.pending = []
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # (piece by piece: a join of a live 10 MB graph file held the GIL from the server's
            # loop for the whole copy; os.write lets it go)
            size = _write_pieces(fd, [MAGIC + struct.pack("<H", VERSION), *(p for r in records for p in _frame(r))])
            os.fsync(fd)
            _drop_cached(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = size
        self.written_since_compaction = 0
        self.unsynced = False
        self.last_flush = now

    def close(self, now: float = 0.0) -> None:
        if self.fd is not None:
            self.flush(now)
            self.close_file()

    def close_file(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class JournalWriter:
    """A thread that owns a Journal (see the module docstring). ``add``, ``write_now``,
    ``compact`` and ``close`` come from the server's loop (they append to one list, in
    order, and wake the thread at most once per BATCH_S: one write per batch, not a lock
    handoff and a write per message); the counters are read there too."""

    def __init__(self, journal: Journal):
        self.journal = journal
        self.path = journal.path
        self.broken = False           # a write failed: records are dropped until a compaction
        self.compacting = False       # a compaction was handed over and has not ended
        self.compacted_size = journal.size
        self.last_attempt = 0.0       # (monotonic) of the last compaction handed over
        self.dead = False             # the thread stopped (a bug): nothing is handed over any more
        self._items: list = []        # records (lists) and operations (tuples), in order
        self._urgent = False          # a new job, or a waiter, was handed over: no gathering
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="journal", daemon=True)
        self._thread.start()

    def add(self, records: list) -> None:
        if records and not self.dead:
            self._hand_over(records, any(r[0] == "job" for r in records))

    def write_now(self, records: list) -> None:
        """Write ``records`` (after what was handed over) and wait until they are written
        (not yet fsynced)."""
        done = threading.Event()
        self._hand_over([*records, ("done", done)], True)
        while not done.wait(1.0) and self._thread.is_alive():   # (a dead thread must not hang the loop)
            pass

    def compact(self, records: list, now: float) -> None:
        """Replace the journal by ``records`` (the live state, from ``restore.snapshot``)."""
        if self.dead:
            return
        self.compacting, self.last_attempt = True, now
        self._hand_over([("compact", records)], False)

    def wants_compaction(self, now: float, retired: bool) -> bool:
        """Whether the loop should hand over a compaction now: the file grew with retired
        jobs (``retired``: the batch retired one), or it is broken and RETRY_S passed."""
        if self.compacting:
            return False
        if self.broken:
            return now - self.last_attempt >= RETRY_S
        return retired and self.journal.written_since_compaction > max(COMPACT_BYTES, 2 * self.compacted_size)

    def close(self) -> None:
        """Write and fsync what was handed over, then close the file (waits for it)."""
        self._hand_over([("close", None)], True)
        self._thread.join()

    def _hand_over(self, items: list, urgent: bool) -> None:
        """Append to what the thread takes next and wake it; ``urgent``: written without
        the BATCH_S gathering."""
        self._items.extend(items)
        if urgent:
            self._urgent = True
        if not self._wake.is_set():
            self._wake.set()

    # ------------------------------------------------------------------ the thread
    def _serve(self) -> None:
        try:
            self._run()
        except BaseException as exc:   # (the journal is lost, the server goes on: said once)
            log.error("journal %s: its thread stopped: %s: %s; the journal is no longer written", self.path,
                      type(exc).__name__, exc)
            self.broken, self.dead, self._items = True, True, []

    def _run(self) -> None:
        journal = self.journal
        while True:
            timeout = None   # (something written and not fsynced: until it is due)
            if journal.unsynced:
                timeout = max(0.0, journal.last_flush + FLUSH_S - time.monotonic())
            if self._wake.wait(timeout):
                if not self._urgent:
                    time.sleep(BATCH_S)   # (what comes meanwhile goes in the same write)
                self._wake.clear()
                self._urgent = False
                items, self._items = self._items, []   # (the loop appends to one list or the other)
                if self._apply(items):
                    return
            if journal.due(time.monotonic()):
                self._attempt(lambda: journal.flush(time.monotonic()))

    def _apply(self, items: list) -> bool:
        """Carry out the items in order; True once the journal is closed."""
        journal = self.journal
        records: list = []
        for item in items:
            if type(item) is list:
                records.append(item)
                continue
            self._write(records)
            records = []
            kind, arg = item
            if kind == "done":
                arg.set()
            elif kind == "compact":
                if self._attempt(lambda: journal.compact(arg, time.monotonic())):
                    if self.broken:
                        log.warning("journal %s: written again (the live state, whole)", self.path)
                    self.broken = False
                    self.compacted_size = journal.size
                self.compacting = False
            else:   # close
                self._attempt(lambda: journal.flush(time.monotonic()))
                journal.close_file()
                return True
        self._write(records)
        return False

    def _write(self, records: list) -> None:
        if not records or self.broken:
            return

        def write():
            for record in records:
                self.journal.add(record)
            self.journal.write()
        self._attempt(write)

    def _attempt(self, action) -> bool:
        try:
            action()
            return True
        except Exception as exc:   # (OSError: a full disk, an I/O error; anything else must not end the thread)
            self.journal.pending = []
            self.journal.unsynced = False
            if not self.broken:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
                log.error("journal %s: cannot write: %s; the server goes on, but a restart would lose what "
                          "is not in the journal (a whole rewrite is tried every %g s)", self.path, why, RETRY_S)
            self.broken = True
            return False
