"""Start programs with libc's posix_spawnp: one call that vforks, sets the working
directory, wires the pipes, closes every other descriptor and execs. subprocess.Popen
does the same work with much more Python around it; on a worker that runs thousands of
short programs a second, that Python is most of the cost.

Invariants:
- The child gets: the given working directory, stdin/stdout/stderr as asked (a pipe, or
  /dev/null), no other descriptor of the worker (closefrom 3), default dispositions for
  the signals Python ignores (SIGPIPE, SIGXFSZ), an empty signal mask, and a process
  group of its own (its pid): a Ctrl-C on the terminal reaches the worker, not its
  programs, and ``Child.kill`` kills the program with every process it started.
- ``spawn`` returns a Child whose pipe ends (plain fds) belong to the caller; the child
  is reaped by ``poll``/``wait`` exactly once.
- ``available()`` is False where libc lacks one of the calls (not glibc >= 2.34, not
  Linux): callers then use subprocess.Popen.
"""

from __future__ import annotations

import ctypes
import os
import signal

_FILE_ACTIONS_SIZE = 256   # >= sizeof(posix_spawn_file_actions_t) (80 on glibc x86_64)
_ATTR_SIZE = 1024          # >= sizeof(posix_spawnattr_t) (336)
_SIGSET_SIZE = 128         # sizeof(sigset_t)
_POSIX_SPAWN_SETPGROUP = 0x02
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08

_libc = None
_attr = None


def _load():
    global _libc, _attr
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("posix_spawnp", "posix_spawn_file_actions_init", "posix_spawn_file_actions_destroy",
                     "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_addopen",
                     "posix_spawn_file_actions_addchdir_np", "posix_spawn_file_actions_addclosefrom_np",
                     "posix_spawnattr_init", "posix_spawnattr_setflags", "posix_spawnattr_setsigdefault",
                     "posix_spawnattr_setsigmask", "posix_spawnattr_setpgroup", "sigemptyset", "sigaddset"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    default = ctypes.create_string_buffer(_SIGSET_SIZE)
    empty = ctypes.create_string_buffer(_SIGSET_SIZE)
    if libc.posix_spawnattr_init(attr) != 0:
        return
    libc.sigemptyset(default)
    libc.sigemptyset(empty)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        libc.sigaddset(default, int(sig))
    libc.posix_spawnattr_setsigdefault(attr, default)
    libc.posix_spawnattr_setsigmask(attr, empty)
    libc.posix_spawnattr_setpgroup(attr, 0)   # a new group whose id is the child's pid
    libc.posix_spawnattr_setflags(attr, ctypes.c_short(_POSIX_SPAWN_SETPGROUP | _POSIX_SPAWN_SETSIGDEF
                                                       | _POSIX_SPAWN_SETSIGMASK))
    _libc, _attr = libc, attr


_load()
_environ = ctypes.c_void_p.in_dll(_libc, "environ") if _libc is not None else None


def available() -> bool:
    return _libc is not None


class Child:
    """A started program: its pid, the parent's ends of its pipes (fds or None), and the
    Popen that started it where posix_spawn was not available (it then reaps)."""
    __slots__ = ("pid", "stdin", "stdout", "stderr", "returncode", "popen")

    def __init__(self, pid: int, stdin, stdout, stderr, popen=None):
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self.returncode: int | None = None
        self.popen = popen

    @classmethod
    def of_popen(cls, proc) -> "Child":
        """The same interface over a Popen (its pipe file objects traded for plain fds)."""
        ends = []
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            ends.append(None if pipe is None else os.dup(pipe.fileno()))
            if pipe is not None:
                pipe.close()
        return cls(proc.pid, *ends, popen=proc)

    def poll(self) -> int | None:
        if self.popen is not None:
            self.returncode = self.popen.poll()
        elif self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # reaped elsewhere: its status is lost
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.popen is not None:
            self.returncode = self.popen.wait()
        elif self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        """SIGKILL to the program's process group: the program and what it started (a
        shell's children). Nothing once the program was reaped (its pid, and so the
        group id, may belong to another process by then)."""
        reaped = self.popen.returncode if self.popen is not None else self.returncode
        if reaped is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):   # not a group leader after all
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn(argv: list, cwd: str, stdin: bool, stdout: bool, stderr: bool, executable=None) -> Child:
    """Start ``executable`` (default argv[0], looked up in PATH) with argv in cwd; each of
    stdin/stdout/stderr is a pipe when True, else /dev/null. Raises OSError (with errno)
    when it cannot start."""
    args = [os.fsencode(a) for a in argv]
    program = os.fsencode(executable) if executable is not None else args[0]
    c_argv = (ctypes.c_char_p * (len(args) + 1))(*args, None)
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_SIZE)
    libc = _libc
    ours, theirs = [], []
    try:
        if libc.posix_spawn_file_actions_init(actions) != 0:
            raise OSError(ctypes.get_errno(), "posix_spawn_file_actions_init failed")
        ends = []
        for fd, piped in ((0, stdin), (1, stdout), (2, stderr)):
            if piped:
                r, w = os.pipe()
                parent, child = (w, r) if fd == 0 else (r, w)
                ours.append(parent)
                theirs.append(child)
                libc.posix_spawn_file_actions_adddup2(actions, child, fd)
                ends.append(parent)
            else:
                libc.posix_spawn_file_actions_addopen(actions, fd, b"/dev/null", os.O_RDWR, 0)
                ends.append(None)
        libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd))
        libc.posix_spawn_file_actions_addclosefrom_np(actions, 3)
        pid = ctypes.c_int(0)
        err = libc.posix_spawnp(ctypes.byref(pid), program, actions, _attr, c_argv, _environ)
        libc.posix_spawn_file_actions_destroy(actions)
        if err != 0:
            raise OSError(err, os.strerror(err))
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    return Child(pid.value, *ends)
