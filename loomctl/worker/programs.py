"""External programs (``loom/run/run``) run from the worker's loop without threads.

A program is started with Popen in the loop thread; its stdin/stdout/stderr pipes are
non-blocking and registered in the loop's zmq Poller as raw file descriptors. When both
output pipes reach end of file the process is reaped (without blocking: a program that
closes its pipes and keeps running is polled again later) and the task's outcome made.

Invariants:
- Nothing here blocks: reads and writes are non-blocking, waits use WNOHANG.
- Every started program ends in exactly one Outcome (result or error), and its
  working directory is removed unless it failed and the worker keeps failed dirs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import zmq

from loomctl.worker import data
from loomctl.worker.executors import (ExecContext, PreparedRun, cleanup_run, finish_run,
                                      prepare_run, start_program)
from loomctl.worker.running import Outcome, finalize

READ_SIZE = 1 << 16


class _Program:
    __slots__ = ("spec", "prepared", "proc", "out", "err", "stdin_view", "open_fds", "fds", "started")

    def __init__(self, spec, prepared: PreparedRun, proc: subprocess.Popen, started: float = 0.0):
        self.spec, self.prepared, self.proc = spec, prepared, proc
        self.started = started   # Unix time before the program was prepared (for traces)
        # descriptor -> pipe, taken now: a closed pipe object no longer knows its fileno
        self.fds = {pipe.fileno(): pipe for pipe in (proc.stdin, proc.stdout, proc.stderr) if pipe is not None}
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.stdin_view = memoryview(prepared.stdin) if prepared.stdin else None
        self.open_fds: set[int] = set()


class Programs:
    def __init__(self, poller: zmq.Poller, work_dir: str, keep_failed_dirs: bool):
        self.poller = poller
        self.work_dir = work_dir
        self.keep_failed_dirs = keep_failed_dirs
        self.by_fd: dict[int, _Program] = {}
        self.reaping: list[_Program] = []

    def __len__(self) -> int:
        return len({id(p) for p in self.by_fd.values()}) + len(self.reaping)

    def start(self, spec, inputs: list) -> Outcome | None:
        """Start the program of a run task; an Outcome when it failed at once."""
        ctx = ExecContext(spec.id, self.work_dir, self.keep_failed_dirs)
        started = time.time()
        prepared = None
        try:
            prepared = prepare_run(spec.config, inputs, ctx)
            proc = start_program(prepared)
        except data.TaskError as exc:
            if prepared is not None:
                cleanup_run(prepared)
            return Outcome(spec.id, error=str(exc))
        program = _Program(spec, prepared, proc, started)
        for pipe, flags in ((proc.stdout, zmq.POLLIN), (proc.stderr, zmq.POLLIN), (proc.stdin, zmq.POLLOUT)):
            if pipe is None:
                continue
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            program.open_fds.add(fd)
            self.by_fd[fd] = program
            self.poller.register(fd, flags)
        if proc.stdin is not None and program.stdin_view is None:
            self._close(program, proc.stdin.fileno())
        if not program.open_fds:
            self.reaping.append(program)
        return None

    def on_ready(self, fds: list[int]) -> list[Outcome]:
        """Serve pipes that the poller found ready; returns outcomes of ended programs."""
        for fd in fds:
            program = self.by_fd.get(fd)
            if program is None:
                continue
            if program.fds[fd] is program.proc.stdin:
                self._write_stdin(program, fd)
            else:
                self._read(program, fd)
        return self.reap()

    def _write_stdin(self, program: _Program, fd: int) -> None:
        try:
            written = os.write(fd, program.stdin_view)
        except BlockingIOError:
            return
        except OSError as exc:   # the program closed its stdin (EPIPE): stop feeding it
            if exc.errno != errno.EPIPE:
                raise
            written = len(program.stdin_view)
        program.stdin_view = program.stdin_view[written:]
        if not len(program.stdin_view):
            self._close(program, fd)

    def _read(self, program: _Program, fd: int) -> None:
        sink = program.out if program.fds[fd] is program.proc.stdout else program.err
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                self._close(program, fd)
                return
            sink.append(chunk)

    def _close(self, program: _Program, fd: int) -> None:
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        self.by_fd.pop(fd, None)
        program.open_fds.discard(fd)
        program.fds[fd].close()
        if not program.open_fds:
            self.reaping.append(program)

    def reap(self) -> list[Outcome]:
        """Outcomes of the programs whose pipes are closed and that have exited."""
        outcomes, still = [], []
        for program in self.reaping:
            if program.proc.poll() is None:
                still.append(program)
                continue
            outcomes.append(self._outcome(program))
        self.reaping = still
        return outcomes

    def _outcome(self, program: _Program) -> Outcome:
        spec, prepared = program.spec, program.prepared
        out = Outcome(spec.id, started=program.started)
        try:
            result = finish_run(prepared, program.proc.returncode,
                                b"".join(program.out) if program.proc.stdout is not None else None,
                                b"".join(program.err))
            prepared.failed = False
            finalize(out, spec, result)
        except data.TaskError as exc:
            out.error = str(exc)
        finally:
            cleanup_run(prepared)
        out.ended = time.time()
        return out

    def kill_all(self) -> None:
        programs = {id(p): p for p in [*self.by_fd.values(), *self.reaping]}
        for program in programs.values():
            if program.proc.poll() is None:
                program.proc.kill()
            program.proc.wait()
            cleanup_run(program.prepared)
        self.by_fd.clear()
        self.reaping.clear()
