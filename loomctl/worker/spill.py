"""The file side of spilling: the worker's spill directory and the thread that writes,
reads and removes its files, off the worker's loop.

A spilled object is the file ``<run dir>/spill/<task id>`` holding its wire encoding
(``data.encode_parts``), so that a peer or a client can be sent the file as it is.

Invariants:
- Only the spill thread touches the files, one operation at a time, in the order the
  loop asked for them (a removal asked before a new write of the same id comes first).
- Every write and read ends in exactly one answer, the state's event ``Spilled`` or
  ``Loaded``, handed to ``done`` (removals have none); a failed write leaves no file.
  Nothing here raises into the loop.
- A plain object is read back into one bytes object of its size (no second copy).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time

from loomctl.worker import data
from loomctl.worker.state import Loaded, Spilled
from loomctl.worker.store import SpillRead, SpillRemove, SpillWrite

log = logging.getLogger("loomctl.worker")


class SpillFiles:
    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.seconds = {"write": 0.0, "read": 0.0}   # time spent, for the figures

    def path(self, task_id: int) -> str:
        return os.path.join(self.dir, str(int(task_id)))

    def write(self, task_id: int, obj: data.DataObject) -> int:
        """Write the encoding of ``obj``; returns its bytes (OSError / TaskError)."""
        t0 = time.perf_counter()
        parts = data.encode_parts(obj)
        path = self.path(task_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            total = 0
            for part in parts:
                view = memoryview(part).cast("B")
                while len(view):
                    n = os.write(fd, view)
                    total += n
                    view = view[n:]
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        self.seconds["write"] += time.perf_counter() - t0
        return total

    def read(self, task_id: int) -> data.DataObject:
        t0 = time.perf_counter()
        with open(self.path(task_id), "rb", buffering=0) as f:
            tag = f.read(1)
            if tag == data.TAG_PLAIN:
                size = os.fstat(f.fileno()).st_size - 1
                content = os.pread(f.fileno(), size, 1) if size else b""
                if len(content) != size:
                    raise data.MalformedData("the spill file is shorter than it was")
                obj = data.Plain(content)
            else:
                obj = data.decode(tag + f.read())
        self.seconds["read"] += time.perf_counter() - t0
        return obj

    def open(self, task_id: int) -> int:
        """A file descriptor of the file, to stream it (the caller closes it)."""
        return os.open(self.path(task_id), os.O_RDONLY | os.O_CLOEXEC)

    def remove(self, task_id: int) -> None:
        _unlink(self.path(task_id))

    def remove_all(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove spill file %s: %s", path, exc.strerror)


class SpillThread:
    """One daemon thread carrying out SpillWrite / SpillRead / SpillRemove in order."""

    def __init__(self, files: SpillFiles, done):
        self.files = files
        self.done = done
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, daemon=True, name="loomctl-spill")
        self.thread.start()

    def submit(self, instruction) -> None:
        self.jobs.put(instruction)

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            kind = type(job)
            if kind is SpillRemove:
                self.files.remove(job.id)
            elif kind is SpillWrite:
                task_id = job.id
                try:
                    nbytes, error = self.files.write(task_id, job.obj), None
                except (OSError, data.TaskError) as exc:
                    nbytes, error = 0, getattr(exc, "strerror", None) or str(exc)
                    log.warning("cannot spill data object %d to disk: %s", task_id, error)
                job = None   # (the object may leave memory as soon as the loop hears)
                self.done(Spilled(task_id, nbytes, error))
            elif kind is SpillRead:
                try:
                    obj, error = self.files.read(job.id), None
                except (OSError, data.TaskError, data.MalformedData) as exc:
                    obj, error = None, getattr(exc, "strerror", None) or str(exc)
                    log.warning("cannot read data object %d back from disk: %s", job.id, error)
                self.done(Loaded(job.id, obj, error))
                obj = None   # (nor is an object read back kept here while the next job is awaited)

    def close(self) -> None:
        self.jobs.put(None)
