"""A program's run (``loom/run/run``): its directory, inputs, argv and start; its outputs.

The steps are the worker's loop's (``worker.programs`` starts and watches the program
without blocking): ``prepare_run`` makes the run directory and puts the inputs in place
(files, the standard input, $variables), ``start_child`` starts the program,
``finish_run`` turns its exit into the task's result or a TaskError, ``cleanup_run``
gives the directory back.

Invariants:
- Every run gets an empty directory of its own, which is removed (or kept empty as a
  spare) when the run ends, unless the run failed and failed directories are kept.
- A program's standard input is its stdin input, or /dev/null; a standard output that is
  not an output of the task goes to /dev/null; nothing of one run reaches another.
- A failure names the program and its exit status (or why it did not start) and ends
  with the tail of its standard error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from graphfmt import symbols as S
from loomctl.worker import spawn
from loomctl.textfmt import human_bytes
from loomctl.worker.data import Array, DataObject, FileObj, Plain, TaskError, content

STDERR_TAIL_LINES = 20
STDERR_TAIL_BYTES = 2048


@dataclass
class PreparedRun:
    """A run task with its working directory made and its inputs in place."""
    argv: list
    run_dir: str
    stdin: bytes | None
    map_outputs: list
    keep_failed_dirs: bool
    dirs: RunDirs | None = None   # where run_dir came from and goes back to
    failed: bool = True


def prepare_run(config, inputs, ctx, dirs: RunDirs) -> PreparedRun:
    try:
        cfg = S.decode_run(bytes(config))
    except Exception:
        raise TaskError("malformed run configuration (not msgpack)") from None
    args = cfg.get("args") or []
    if isinstance(args, (str, bytes)):
        args = args.split()
    if not args:
        raise TaskError("run: no program given")
    map_inputs = list(cfg.get("map_inputs") or [])
    map_outputs = list(cfg.get("map_outputs") or [None])
    if len(map_inputs) != len(inputs):
        raise TaskError(f"run: {len(inputs)} input(s) but {len(map_inputs)} input mapping(s)")
    run_dir = dirs.make(ctx.task_id)
    prepared = PreparedRun([], run_dir, None, map_outputs, ctx.keep_failed_dirs, dirs)
    try:
        stdin, variables = _place_inputs(run_dir, inputs, map_inputs)
    except BaseException:
        cleanup_run(prepared)
        raise
    prepared.argv = substitute_variables(args, variables)
    prepared.stdin = stdin
    return prepared


class RunDirs:
    """The run directories of one work directory, and where PATH found each program.

    Empty run directories left by finished programs are handed to the next run instead
    of being removed and made again (on a journalled file system rmdir + mkdir cost more
    than a short program); only directories found empty are kept, at most SPARE_DIRS.
    A bare program name is looked up in PATH once (the child then makes one execve
    instead of one per PATH entry). One object per worker, used by its loop thread only.
    """

    SPARE_DIRS = 16

    def __init__(self, work_dir: str):
        self.work_dir = work_dir
        self.spare: list[str] = []
        self.program_paths: dict[bytes | str, bytes] = {}

    def make(self, task_id: int) -> str:
        """An empty directory for one run: a spare one, else ``run-ID`` (one mkdir), else
        a unique name (a rerun of the task next to a kept failed directory)."""
        if self.spare:
            return self.spare.pop()
        path = os.path.join(self.work_dir, f"run-{task_id}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            return tempfile.mkdtemp(prefix=f"run-{task_id}-", dir=self.work_dir)
        except FileNotFoundError:   # the work directory itself is not there (yet, or any more)
            os.makedirs(self.work_dir, exist_ok=True)
            return tempfile.mkdtemp(prefix=f"run-{task_id}-", dir=self.work_dir)

    def done(self, run_dir: str) -> None:
        """A run's directory is no longer needed: kept as a spare if empty, else removed."""
        try:
            with os.scandir(run_dir) as entries:
                empty = next(entries, None) is None
        except OSError:
            empty = False
        if empty and len(self.spare) < self.SPARE_DIRS:
            self.spare.append(run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)

    def remove_spares(self) -> None:
        for path in self.spare:
            shutil.rmtree(path, ignore_errors=True)
        self.spare = []

    def resolve(self, program):
        """The path of a bare program name (names with a slash as given)."""
        found = self.program_paths.get(program)
        if found is None:
            name = os.fsdecode(program)
            if "/" in name:
                return program
            found = shutil.which(name)
            if found is None or not os.path.isabs(found):
                return program   # not found (the start fails as usual), or a relative PATH entry
            found = self.program_paths[program] = os.fsencode(found)
        return found


def _start_popen(prepared: PreparedRun) -> subprocess.Popen:
    program = os.fsdecode(prepared.argv[0])
    argv = prepared.argv
    try:
        return subprocess.Popen(
            argv, executable=prepared.dirs.resolve(argv[0]), cwd=prepared.run_dir,
            stdin=subprocess.PIPE if prepared.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if None in prepared.map_outputs else subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)   # its own process group, as spawn.py
    except OSError as e:
        raise TaskError(f"cannot start program {program!r}: {e.strerror or e} "
                        "(no exit status: the program did not start)") from None


def start_child(prepared: PreparedRun) -> spawn.Child:
    """Start the program of a prepared run with pipes as plain fds (posix_spawn where
    libc has it, else subprocess.Popen)."""
    if not spawn.available():
        return spawn.Child.of_popen(_start_popen(prepared))
    argv = prepared.argv
    try:
        return spawn.spawn(argv, prepared.run_dir, stdin=prepared.stdin is not None,
                           stdout=None in prepared.map_outputs, stderr=True, executable=prepared.dirs.resolve(argv[0]))
    except OSError as e:
        raise TaskError(f"cannot start program {os.fsdecode(argv[0])!r}: {e.strerror or e} "
                        "(no exit status: the program did not start)") from None


def finish_run(prepared: PreparedRun, status: int, stdout: bytes | None, stderr: bytes | None,
               max_output: int | None = None):
    """The task's result from a program that exited; raises TaskError on failure (also
    for output files of more than ``max_output`` bytes together: they are not read)."""
    try:
        return _collect_outputs(prepared, status, stdout, stderr, max_output)
    except TaskError as e:
        if prepared.keep_failed_dirs:
            raise TaskError(f"{e}\n(working directory kept: {prepared.run_dir})") from None
        raise


def cleanup_run(prepared: PreparedRun) -> None:
    if prepared.failed and prepared.keep_failed_dirs:
        return
    prepared.dirs.done(prepared.run_dir)


def _place_inputs(run_dir: str, inputs: list, map_inputs: list):
    stdin_parts: list[bytes] = []
    variables: dict[str, bytes] = {}
    for i, (obj, target) in enumerate(zip(inputs, map_inputs)):
        what = f"run input {i}"
        if target is None:
            stdin_parts.append(content(obj, what))
        elif isinstance(target, str) and target.startswith("$"):
            variables[target[1:]] = content(obj, what)
        else:
            name = os.fsdecode(target)
            if not name or "/" in name or name in (".", ".."):
                raise TaskError(f"run: bad input file name {name!r}")
            _write_input_file(os.path.join(run_dir, name), obj, what)
    stdin = b"".join(stdin_parts) if stdin_parts else None
    return stdin, variables


def _write_input_file(path: str, obj: DataObject, what: str) -> None:
    try:
        if isinstance(obj, FileObj):
            shutil.copyfile(obj.path, path)
        else:
            with open(path, "wb") as f:
                f.write(content(obj, what))
    except OSError as e:
        raise TaskError(f"run: cannot write {what} to {os.path.basename(path)!r}: "
                        f"{e.strerror or e}") from None


def substitute_variables(args: list, variables: dict[str, bytes]) -> list:
    """Replace ``$NAME`` and ``${NAME}`` by the variable's content, as a whole argument
    or inside one; the longest defined name wins; undefined ``$names`` stay as they are.
    """
    if not variables:
        return list(args)
    names = sorted(variables, key=len, reverse=True)
    alternatives = "|".join(re.escape(n) for n in names)
    text_pattern = re.compile(r"\$(?:\{(%s)\}|(%s))" % (alternatives, alternatives))
    bytes_pattern = re.compile(text_pattern.pattern.encode("utf-8", "surrogateescape"))
    text_values = {k: v.decode("utf-8", "surrogateescape") for k, v in variables.items()}

    def text_sub(m):
        return text_values[m.group(1) or m.group(2)]

    def bytes_sub(m):
        return variables[(m.group(1) or m.group(2)).decode("utf-8", "surrogateescape")]

    out = []
    for arg in args:
        if isinstance(arg, bytes):
            out.append(bytes_pattern.sub(bytes_sub, arg))
        else:
            out.append(text_pattern.sub(text_sub, str(arg)))
    return out


def _collect_outputs(prepared: PreparedRun, status: int, stdout, stderr, max_output: int | None = None):
    program = os.fsdecode(prepared.argv[0])
    run_dir, map_outputs = prepared.run_dir, prepared.map_outputs
    if status != 0:
        raise TaskError(f"program {program!r} {_describe_status(status)}"
                        f"{_stderr_tail(stderr)}")
    if max_output is not None:
        total = len(stdout or b"")
        for name in map_outputs:
            try:
                total += os.path.getsize(os.path.join(run_dir, os.fsdecode(name))) if name is not None else 0
            except OSError:
                pass   # (reading it says why)
        if total > max_output:
            raise TaskError(f"the outputs of program {program!r} ({human_bytes(total)}) are larger than this "
                            f"worker's memory limit ({human_bytes(max_output)}, --memory-limit)")
    results = []
    for name in map_outputs:
        if name is None:
            results.append(Plain(stdout or b""))
            continue
        path = os.path.join(run_dir, os.fsdecode(name))
        try:
            with open(path, "rb") as f:
                results.append(Plain(f.read()))
        except OSError as e:
            raise TaskError(f"program {program!r} exited with status 0 but output file "
                            f"{os.fsdecode(name)!r} cannot be read: {e.strerror}"
                            f"{_stderr_tail(stderr)}") from None
    return results[0] if len(results) == 1 else Array(results)


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-status} ({name}) (exit status {status})"
    return f"exited with status {status}"


def _stderr_tail(stderr: bytes | None) -> str:
    if not stderr:
        return "\nstderr: (empty)"
    lines = stderr.splitlines()
    tail = b"\n".join(lines[-STDERR_TAIL_LINES:])
    cut = len(lines) > STDERR_TAIL_LINES
    if len(tail) > STDERR_TAIL_BYTES:
        tail = tail[-STDERR_TAIL_BYTES:]
        cut = True
    text = tail.decode("utf-8", "replace")
    return "\nstderr" + (" (last lines)" if cut else "") + ":\n" + text


