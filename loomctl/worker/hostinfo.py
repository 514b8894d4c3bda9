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


def rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
