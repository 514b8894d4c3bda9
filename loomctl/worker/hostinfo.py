"""Facts about this host for the worker: its address towards the server, its memory use.

Invariants: nothing here raises for an unreadable /proc or an unroutable address (a
fallback value is returned), except ``split_address`` on a malformed address.
"""

from __future__ import annotations

import os
import socket


def split_address(address: str) -> tuple[str, int]:
    """"tcp://host:port" or "host:port" -> (host, port); ValueError when malformed."""
    rest = address[len("tcp://"):] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad server address {address!r} (expected host:port)")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The local IP address this machine uses to reach host:port (a UDP connect sends
    nothing); 127.0.0.1 when it cannot be told."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


_statm: tuple[int, int] | None = None   # (pid, fd of its /proc/<pid>/statm), kept open
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    """This process's resident memory in bytes (0 when it cannot be read). The statm file
    stays open (a read at offset 0 costs under half of an open, read and close; the worker
    samples it every MEMORY_SAMPLE_S); a forked child opens its own."""
    global _statm
    try:
        pid = os.getpid()
        if _statm is None or _statm[0] != pid:
            _statm = (pid, os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 256, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


UNLIMITED = 1 << 60   # cgroup limits at or above this mean none


def host_memory() -> int:
    """The memory this process may use on its host: MemTotal, or the limit of its
    memory cgroup (v2 memory.max, v1 memory.limit_in_bytes, of it or a parent) when
    lower; 0 when none can be read."""
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError, IndexError):
        total = 0
    limits = [n for n in _cgroup_limits() if 0 < n < UNLIMITED]
    return min([total, *limits]) if total else min(limits, default=0)


def _cgroup_limits() -> list:
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            files.append(("/sys/fs/cgroup", path, "memory.max"))
        elif "memory" in controllers.split(","):
            files.append(("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes"))
    out = []
    for root, path, name in files:
        parts = [p for p in path.split("/") if p]
        for k in range(len(parts), -1, -1):
            try:
                with open(os.path.join(root, *parts[:k], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit():
                out.append(int(text))
    return out


def default_memory_limit(cpus: int) -> int | None:
    """A worker's share of its host's memory: ``host_memory()`` times the share of the
    host's cpus it offers (all of it for a worker of all cpus; a worker of no cpus counts
    as one); None when the host's memory is not known."""
    total = host_memory()
    if not total:
        return None
    host_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(total * min(1.0, max(1, cpus) / max(1, host_cpus)))
