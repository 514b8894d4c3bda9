"""Worker commands: ``loomctl worker start``.

Invariants:
- The worker runs in the foreground until the server sends STOP, the server is lost,
  or SIGTERM/SIGINT arrives; the last two and STOP exit 0 after a clean shutdown.
- Not finding the server (no access file, no answer, refused) is one line on stderr and
  exit code UNAVAILABLE; bad options are USAGE; a broken extension is BAD_INPUT.
- The secret comes only from the access file; it is never taken from the command line
  nor printed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from typing import List, Optional

import typer

from loomctl import access
from loomctl.cli.output import CliError, ExitCode, SafeFormatter
from loomctl.worker.extensions import ExtensionError

app = typer.Typer(help="Start workers.", no_args_is_help=True)

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, host_memory=None) -> int | None:
    """"4G", "512M", "1.5g", "4GiB", "1000" (bytes) -> bytes; "25%" of ``host_memory()``;
    "none" -> None (no limit)."""
    if text.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", text)
    if m and host_memory is not None and 0 < float(m.group(1)) <= 100:
        total = host_memory()
        if not total:
            raise CliError("--memory-limit: the memory of this host is not known; give a size", ExitCode.USAGE)
        return int(total * float(m.group(1)) / 100)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m or float(m.group(1)) * _UNITS[m.group(2).lower()] < 1:
        raise CliError(f"--memory-limit {text!r} is not a size such as 4G, 512M, 1000000 or 25%, nor none",
                       ExitCode.USAGE)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_fraction(option: str, text: str) -> float:
    """"0.6" or "60%" -> 0.6, within (0, 1]."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    value = (float(m.group(1)) / (100 if m.group(2) else 1)) if m else -1.0
    if not 0 < value <= 1:
        raise CliError(f"{option} {text!r} is not a fraction of the memory limit such as 0.6 or 60%",
                       ExitCode.USAGE)
    return value


def parse_resources(pairs: list[str]) -> dict[str, int]:
    resources: dict[str, int] = {}
    for pair in pairs:
        name, sep, amount = pair.partition("=")
        name = name.strip()
        if not sep or not name or not amount.strip().isdigit():
            raise CliError(f"--resource {pair!r} is not NAME=N (N a non-negative integer)",
                           ExitCode.USAGE)
        if name == "cpus":
            raise CliError("use --cpus for cpus, not --resource cpus=N", ExitCode.USAGE)
        resources[name] = int(amount)
    return resources


def resolve_server(address: str | None, server_dir: str | None) -> tuple[str, str | None]:
    """(tcp address, secret or None) from ADDRESS and/or the access file."""
    if address is None:
        try:
            info = access.find_server(server_dir)
        except access.AccessError as exc:
            raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
        return access.connect_address(info["host"], info["port"]), info.get("secret")
    rest = address[len("tcp://"):] if address.startswith("tcp://") else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"server address {address!r} is not HOST:PORT", ExitCode.USAGE)
    try:
        secret = access.read_access(server_dir).get("secret")
    except access.AccessError:
        secret = None
    return access.connect_address(host, int(port)), secret


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("loomctl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter(
            "%(asctime)s loomctl-worker[%(process)d] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False


@app.command()
def start(
    address: Optional[str] = typer.Argument(None, help="Server HOST:PORT; without it, the server's access file gives the address and secret."),
    server_dir: Optional[str] = typer.Option(None, "--server-dir", help="Directory of the server's access file (default: $LOOM_SERVER_DIR, else ~/.loomctl/server)."),
    cpus: Optional[int] = typer.Option(None, "--cpus", min=0, help="Cpus this worker offers (default: all of this machine's)."),
    work_dir: Optional[str] = typer.Option(None, "--work-dir", help="Directory for the working directories of tasks (default: a new temporary directory)."),
    resource: List[str] = typer.Option([], "--resource", "-r", help="A named resource NAME=N this worker offers (repeatable)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the worker in status and traces (default: HOST-PID)."),
    extension: List[str] = typer.Option([], "--extension", "-e", help="Python module that registers task types (repeatable)."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Keep the working directory of a failed run task (its path is in the error)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to serve data on (default: the local address that reaches the server)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Memory this worker may use: a size (4G, 512M), a share of this host's (25%), or none (default: the host's memory, or its cgroup limit, times the share of the host's cpus the worker offers)."),
    memory_spill: str = typer.Option("0.6", "--memory-spill", help="Spill data to disk, least recently used first, above this fraction of the memory limit."),
    memory_pause: str = typer.Option("0.8", "--memory-pause", help="Start no new task above this fraction of the memory limit."),
    server_grace: float = typer.Option(300.0, "--server-grace", min=0, help="Seconds the worker runs on without its server, waiting for it (or a restarted one) to come back; then it exits with status 4."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every task failure and connection event, not only warnings."),
):
    """Start a worker: register with the server, run tasks, serve data to other workers."""
    import zmq

    from loomctl.worker.process import Worker

    from loomctl.worker.hostinfo import default_memory_limit, host_memory
    n_cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    limit = parse_size(memory_limit, host_memory) if memory_limit is not None else default_memory_limit(n_cpus)
    spill_at, pause_at = parse_fraction("--memory-spill", memory_spill), parse_fraction("--memory-pause", memory_pause)
    if spill_at > pause_at:
        raise CliError(f"--memory-spill ({memory_spill}) must not be above --memory-pause ({memory_pause})",
                       ExitCode.USAGE)
    resources = parse_resources(resource)
    server_address, secret = resolve_server(address, server_dir)
    _setup_logging(verbose)
    worker = Worker(server_address, secret, n_cpus, work_dir, resources, name, extension, keep_failed, host,
                    memory_limit=limit, server_grace_s=server_grace, spill_at=spill_at, pause_at=pause_at)
    try:
        try:
            worker.start()
        except ConnectionError as exc:
            raise CliError(f"cannot join the server at {server_address}: {exc}",
                           ExitCode.UNAVAILABLE) from None
        except ExtensionError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from None
        except (OSError, zmq.ZMQError) as exc:   # e.g. --host is not an address of this machine
            raise CliError(f"cannot start the worker: {exc}", ExitCode.UNAVAILABLE) from None

        def on_signal(signum, frame):
            worker.stop(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            reason = worker.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        worker.close()
    logging.getLogger("loomctl.worker").info("worker stopped (%s)", reason)
    if reason == "server lost":
        raise CliError("the server was lost", ExitCode.UNAVAILABLE)
