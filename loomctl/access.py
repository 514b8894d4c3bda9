"""The server's access file: how workers, clients and the CLI find and prove themselves
to a server.

Invariants:
- The file is ``<server dir>/access.json``, written atomically with mode 0600; it holds
  host, port, the secret (hex; null when authentication is off) and the server's pid.
- The server directory is, in order: an explicit option, ``$LOOM_SERVER_DIR``,
  ``~/.loomctl/server``.
- The secret is never printed, logged, or passed on a command line.
"""

from __future__ import annotations

import json
import os
import tempfile

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
            json.dump({"host": host, "port": port, "secret": secret, "pid": os.getpid()}, f)
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


def remove_access(directory: str) -> None:
    try:
        os.unlink(os.path.join(directory, ACCESS_FILE))
    except FileNotFoundError:
        pass


def connect_address(host: str, port: int) -> str:
    if host in ("0.0.0.0", "*", ""):
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"
