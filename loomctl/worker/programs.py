"""External programs (``loom/run/run``) run from the worker's loop without threads.

A program is started in the loop thread (posix_spawn, see spawn.py; Popen where libc
lacks it); its stdin/stdout/stderr pipes are non-blocking and registered in the loop's zmq Poller as
raw file descriptors. When one output pipe reaches end of file the program is exiting:
the other is read at once (after one sched_yield if it is still open), and once both are
closed the process, given one more sched_yield, has almost always exited and is reaped
in the same wake-up; if not yet, a pidfd of it (Linux >= 5.3), which becomes readable
when it exits, joins the poller. Without pidfds, such a program is polled for its exit
(the loop then wakes every millisecond).

Invariants:
- Nothing here blocks: reads and writes are non-blocking, waits use WNOHANG.
- Every started program ends in exactly one Outcome (result or error), and its
  working directory is removed unless it failed and the worker keeps failed dirs.
- A program's standard output is never held beyond ``max_output`` bytes (the worker's
  memory limit): past it the program is killed and fails, its output dropped.
"""

from __future__ import annotations

import errno
import os
import time

import zmq

from loomctl.textfmt import human_bytes
from loomctl.worker import data
from loomctl.worker.executors import ExecContext
from loomctl.worker.runs import PreparedRun, RunDirs, cleanup_run, finish_run, prepare_run, start_child
from loomctl.worker.spawn import Child
from loomctl.worker.outcome import Outcome, finalize

READ_SIZE = 1 << 16


class _Program:
    __slots__ = ("spec", "prepared", "proc", "out", "err", "stdin_view", "open_fds", "fds", "started", "pidfd",
                 "out_bytes", "too_big")

    def __init__(self, spec, prepared: PreparedRun, proc: Child, started: float = 0.0):
        self.spec, self.prepared, self.proc = spec, prepared, proc
        self.started = started   # Unix time before the program was prepared (for traces)
        self.fds = {fd: role for fd, role in ((proc.stdin, "stdin"), (proc.stdout, "stdout"),
                                              (proc.stderr, "stderr")) if fd is not None}
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.stdin_view = memoryview(prepared.stdin) if prepared.stdin else None
        self.open_fds: set[int] = set()
        self.pidfd: int | None = None   # open until the process exited
        self.out_bytes = 0
        self.too_big = False            # its standard output passed max_output: killed


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):   # an older kernel or Python: poll for the exit
        return None


class Programs:
    def __init__(self, poller: zmq.Poller, work_dir: str, keep_failed_dirs: bool, max_output: int | None = None):
        self.poller = poller
        self.max_output = max_output   # a program whose outputs pass this fails (the memory limit)
        self.work_dir = work_dir
        self.keep_failed_dirs = keep_failed_dirs
        self.dirs = RunDirs(work_dir)
        self.by_fd: dict[int, _Program] = {}
        self.reaping: list[_Program] = []

    def __len__(self) -> int:
        return len({id(p) for p in [*self.by_fd.values(), *self.reaping]})

    def start(self, spec, inputs: list) -> Outcome | None:
        """Start the program of a run task; an Outcome when it failed at once."""
        ctx = ExecContext(spec.id, self.work_dir, self.keep_failed_dirs)
        started = time.time()
        prepared = None
        try:
            prepared = prepare_run(spec.config, inputs, ctx, self.dirs)
            proc = start_child(prepared)
        except data.TaskError as exc:
            if prepared is not None:
                cleanup_run(prepared)
            return Outcome(spec.id, error=str(exc))
        program = _Program(spec, prepared, proc, started)
        for fd, flags in ((proc.stdout, zmq.POLLIN), (proc.stderr, zmq.POLLIN), (proc.stdin, zmq.POLLOUT)):
            if fd is None:
                continue
            os.set_blocking(fd, False)
            program.open_fds.add(fd)
            self.by_fd[fd] = program
            self.poller.register(fd, flags)
        if proc.stdin is not None and program.stdin_view is None:
            self._close(program, proc.stdin)
        if not program.open_fds:
            self.reaping.append(program)
        return None

    def on_ready(self, fds: list[int]) -> list[Outcome]:
        """Serve pipes that the poller found ready; returns outcomes of ended programs."""
        for fd in fds:
            program = self.by_fd.get(fd)
            if program is None:
                continue
            if fd == program.pidfd:
                self._exited(program)
            elif program.fds[fd] == "stdin":
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
        sink = program.out if program.fds[fd] == "stdout" else program.err
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                self._close(program, fd)
                self._read_siblings(program)
                return
            if sink is program.out:
                program.out_bytes += len(chunk)
                if self.max_output is not None and program.out_bytes > self.max_output:
                    if not program.too_big:
                        program.too_big = True
                        program.proc.kill()
                    program.out.clear()
                    continue
            sink.append(chunk)

    def _read_siblings(self, program: _Program) -> None:
        """One output pipe ended: the program is most likely exiting and its other pipe
        ended too or is about to; read it now rather than after another wake-up."""
        for fd in [fd for fd in program.open_fds if program.fds[fd] != "stdin"]:
            self._read(program, fd)
            if fd in program.open_fds:   # not closed yet: give the exiting program the cpu once
                os.sched_yield()
                self._read(program, fd)

    def _close(self, program: _Program, fd: int) -> None:
        try:
            self.poller.unregister(fd)
        except KeyError:
            pass
        self.by_fd.pop(fd, None)
        program.open_fds.discard(fd)
        os.close(fd)
        if not program.open_fds:
            self.reaping.append(program)

    def _exited(self, program: _Program) -> None:
        self.poller.unregister(program.pidfd)
        self.by_fd.pop(program.pidfd, None)
        os.close(program.pidfd)
        program.pidfd = None
        program.proc.poll()

    def waiting_for_exit(self) -> bool:
        """Whether a program closed its pipes and has no pidfd to say when it exits."""
        return any(p.pidfd is None for p in self.reaping)

    def reap(self) -> list[Outcome]:
        """Outcomes of the programs whose pipes are closed and that have exited."""
        outcomes, still = [], []
        for program in self.reaping:
            if program.pidfd is None and program.proc.poll() is None:
                os.sched_yield()   # its pipes are closed, it is exiting: let it finish first
            if program.pidfd is not None or program.proc.poll() is None:
                if program.pidfd is None:   # pipes closed, exit still to come: be told
                    program.pidfd = _pidfd(program.proc.pid)
                    if program.pidfd is not None:
                        self.by_fd[program.pidfd] = program
                        self.poller.register(program.pidfd, zmq.POLLIN)
                still.append(program)
                continue
            outcomes.append(self._outcome(program))
        self.reaping = still
        return outcomes

    def _outcome(self, program: _Program) -> Outcome:
        spec, prepared = program.spec, program.prepared
        out = Outcome(spec.id, started=program.started)
        try:
            if program.too_big:
                raise data.TaskError(f"the standard output of program {os.fsdecode(prepared.argv[0])!r} passed "
                                     f"this worker's memory limit ({human_bytes(self.max_output)}, "
                                     "--memory-limit): the program was killed")
            result = finish_run(prepared, program.proc.returncode,
                                b"".join(program.out) if program.proc.stdout is not None else None,
                                b"".join(program.err), self.max_output)
            prepared.failed = False
            finalize(out, spec, result)
        except data.TaskError as exc:
            out.error = str(exc)
        finally:
            cleanup_run(prepared)
        out.ended = time.time()
        return out

    def kill(self, task_id: int) -> None:
        """Kill the program of a task with its process group; its outcome (an error)
        comes as usual once its pipes close."""
        for program in {id(p): p for p in [*self.by_fd.values(), *self.reaping]}.values():
            if program.spec.id == task_id and program.proc.poll() is None:
                program.proc.kill()

    def kill_all(self) -> None:
        """Kill every running program with its whole process group (a shell's children
        too: they would otherwise run on as orphans), reap it and clean up."""
        programs = {id(p): p for p in [*self.by_fd.values(), *self.reaping]}
        for program in programs.values():
            program.proc.kill()
            program.proc.wait()
            for fd in [*program.open_fds, *([program.pidfd] if program.pidfd is not None else [])]:
                os.close(fd)
            cleanup_run(program.prepared)
        self.by_fd.clear()
        self.reaping.clear()
