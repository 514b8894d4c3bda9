"""The server's access file: how workers, clients and the CLI find and prove themselves
to a server.

Invariants:
- The file is ``<server dir>/access.json``, written atomically with mode 0600; it holds
  host, port, the secret (hex; null when authentication is off), and the server's pid,
  host name and process start time, by which ``find_server`` tells a file whose server
  is gone (killed, crashed) at once instead of waiting for an answer that never comes.
- The server directory is, in order: an explicit option, ``$LOOM_SERVER_DIR``,
  ``~/.loomctl/server``.
- The secret is never printed, logged, or passed on a command line.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

ACCESS_FILE = "access.json"


class AccessError(Exception):
    pass


def server_dir(explicit: str | None = None) -> str:
    return os.path.abspath(explicit or os.environ.get("LOOM_SERVER_DIR")
                           or os.path.join(os.path.expanduser("~"), ".loomctl", "server"))


def write_access(directory: str, host: str, port: int, secret: str | None) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, ACCESS_FILE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".access-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": host, "port": port, "secret": secret, "pid": os.getpid(),
                       "hostname": socket.gethostname(), "start_time": process_start(os.getpid()) or time.time()}, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_access(directory: str | None = None) -> dict:
    path = os.path.join(server_dir(directory), ACCESS_FILE)
    try:
        with open(path) as f:
            access = json.load(f)
    except FileNotFoundError:
        raise AccessError(f"no server access file at {path} (is a server running? "
                          "use --server-dir or LOOM_SERVER_DIR)") from None
    except (OSError, ValueError) as exc:
        raise AccessError(f"cannot read access file {path}: {exc}") from None
    if not isinstance(access, dict) or not isinstance(access.get("port"), int) or "host" not in access:
        raise AccessError(f"access file {path} is malformed")
    return access


def find_server(directory: str | None = None) -> dict:
    """The access information of a server that is still there: AccessError when the file
    is missing or malformed, or when it was written on this host by a process that no
    longer runs (its pid is gone, or now belongs to a process started later)."""
    info = read_access(directory)
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("hostname") != socket.gethostname():
        return info   # an older file, or a server on another host: only a connection tells
    started = process_start(pid)
    recorded = info.get("start_time")
    alive = pid_exists(pid) and (started is None or not isinstance(recorded, (int, float))
                                  or abs(started - recorded) < 1.0)
    if not alive:
        path = os.path.join(server_dir(directory), ACCESS_FILE)
        raise AccessError(f"the server (pid {pid}) that wrote {path} is gone (it was killed or crashed); "
                          "start it again with `loomctl server start`, or remove the stale file")
    return info


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, 10 ms steps), from /proc; None where
    there is no /proc or no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    # field 22 of stat (the 20th after the command name): start time in clock ticks after boot
    return round(boot + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)


def remove_access(directory: str) -> None:
    try:
        os.unlink(os.path.join(directory, ACCESS_FILE))
    except FileNotFoundError:
        pass


def connect_address(host: str, port: int) -> str:
    if host in ("0.0.0.0", "*", ""):
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"
