"""A worker's own directory inside its work dir, and what dead workers left there.

A worker makes ``worker-<pid>-<random>/`` under the work dir (``--work-dir``; a temporary
directory without one) and holds an exclusive lock (flock) on its ``.lock`` file for as
long as it lives; the kernel drops the lock when the process ends, however it ends
(SIGKILL included). Run directories of its programs are made inside. A worker starting
in a work dir removes every ``worker-*`` directory whose lock it can take: the worker
that made it is gone.

Invariants:
- A directory whose lock is held is never removed by another worker; a directory is
  made under a temporary name and renamed once its lock is held, so no worker sees a
  ``worker-*`` directory before its lock exists.
- At a normal exit the worker removes its own directory (it keeps it when asked to keep
  failed tasks' directories and there are some) and the work dir if it made it and it
  is empty.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile

from loomctl.access import pid_exists

log = logging.getLogger("loomctl.worker")

LOCK = ".lock"


def _take_lock(path: str) -> int | None:
    """An fd holding the exclusive lock of ``path``, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class WorkDir:
    def __init__(self, base: str | None):
        self.base = os.path.abspath(base) if base is not None else None
        self.path: str | None = None
        self.created_base = False
        self.removed: list[str] = []   # directories of dead workers removed at open
        self._lock_fd: int | None = None

    def open(self) -> str:
        """Make this worker's directory (removing dead workers' first); returns its path."""
        if self.base is None:
            parent = tempfile.gettempdir()
        else:
            parent = self.base
            if not os.path.isdir(parent):
                os.makedirs(parent)
                self.created_base = True
            self._remove_dead()
        staging = tempfile.mkdtemp(prefix=".new-worker-", dir=parent)
        self._lock_fd = _take_lock(os.path.join(staging, LOCK))
        prefix = "worker-" if self.base is not None else "loomctl-worker-"
        final = os.path.join(parent, f"{prefix}{os.getpid()}-{os.path.basename(staging)[len('.new-worker-'):]}")
        os.rename(staging, final)
        self.path = final
        return final

    def _remove_dead(self) -> None:
        try:
            entries = list(os.scandir(self.base))
        except OSError:
            return
        for entry in entries:
            if not entry.name.startswith("worker-") or not entry.is_dir(follow_symlinks=False):
                continue
            lock_path = os.path.join(entry.path, LOCK)
            if os.path.exists(lock_path):
                fd = _take_lock(lock_path)
                if fd is None:
                    continue   # its worker lives
            else:   # made by a version without locks: its pid is in its name
                pid = entry.name.split("-")[1]
                if not pid.isdigit() or pid_exists(int(pid)):
                    continue
                fd = None
            shutil.rmtree(entry.path, ignore_errors=True)
            if fd is not None:
                os.close(fd)
            self.removed.append(entry.path)
        if self.removed:
            log.info("removed %d directories of workers that are gone from %s", len(self.removed), self.base)

    def close(self, keep_failed_dirs: bool = False) -> None:
        path = self.path
        if path and os.path.isdir(path):
            kept = [name for name in os.listdir(path) if name != LOCK]
            if keep_failed_dirs and kept:
                log.info("kept the working directory %s (failed tasks' directories)", path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.created_base:
            try:
                os.rmdir(self.base)
            except OSError:
                pass
