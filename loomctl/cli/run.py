"""``loomctl run``: the embedded default. A local server (in this process) and local
worker processes run one plan to completion, then everything stops.

Invariants: the server directory is a fresh temporary one (authentication on); every
worker process started here is stopped (terminate, then kill) before ``run`` returns,
whatever happened.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import typer

from loomctl.cli.common import (AsOption, load_graph, parse_params, run_to_end, start_server, stop_processes,
                                stop_server)
from loomctl.cli.output import CliError, ExitCode, JsonOption, Output, QuietOption, check_output_dir

root = typer.Typer()


@root.command()
def run(
    source: str = typer.Argument(..., help="Plan script (.py), TOML task file, command list, or graph file (- for stdin)."),
    workers: int = typer.Option(2, "--workers", "-n", help="Number of local worker processes."),
    cpus: int = typer.Option(1, "--cpus", "-c", help="Cpus of each worker."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Directory for result files, or - for stdout (default)."),
    param: List[str] = typer.Option([], "-p", "--param", help="KEY=VALUE for a plan script (repeatable)."),
    as_: Optional[str] = AsOption,
    load_checkpoints: bool = typer.Option(False, "--load-checkpoints", help="Take existing checkpoint files as results."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Write a trace of the run into this directory."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Keep working directories of failed programs."),
    steal: bool = typer.Option(False, "--steal/--no-steal", help="Work stealing between the workers (see loomctl-server(1))."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Run a plan locally: start a server and workers, run it, print or save the results, stop."""
    if workers < 1 or cpus < 1:
        raise CliError("--workers and --cpus must be at least 1", ExitCode.USAGE)
    graph = load_graph(source, parse_params(param), as_)
    if output not in (None, "-"):
        check_output_dir(output)
    from loomctl.client import Client, LoomError
    # the embedded server speaks only through run's own output and errors
    logging.getLogger("loomctl.server").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="loomctl-run-") as tmp:
        server, thread = start_server("127.0.0.1", tmp, trace, steal)
        procs = [_start_worker(tmp, cpus, k, keep_failed) for k in range(workers)]
        client = None
        try:
            client = Client(server_dir_path=tmp)
            _wait_for_workers(client, workers, procs, tmp)
            if trace:
                client.set_trace(trace)
            job, futures = client.submit_graph(graph, load=load_checkpoints, name=os.path.basename(source))
            run_to_end(client, job, futures, output, Output(json_mode, quiet))
        except LoomError as exc:
            raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
        finally:
            stop_server(client, server, thread)
            stop_processes(procs)


def _start_worker(server_dir: str, cpus: int, k: int, keep_failed: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loomctl", "worker", "start", "--server-dir", server_dir,
           "--cpus", str(cpus), "--name", f"local-{k}"]
    if keep_failed:
        cmd.append("--keep-failed")
    log = open(os.path.join(server_dir, f"worker-{k}.log"), "wb")
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _wait_for_workers(client, count: int, procs: list, server_dir: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get_stats()["n_workers"] < count:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            k = procs.index(dead[0])
            raise CliError(f"local worker {k} exited with status {dead[0].returncode} while starting: "
                           f"{_last_line(server_dir, k)}", ExitCode.UNAVAILABLE)
        if time.monotonic() > deadline:
            raise CliError(f"local workers did not register within {timeout:.0f} s", ExitCode.UNAVAILABLE)
        time.sleep(0.02)


def _last_line(server_dir: str, k: int) -> str:
    try:
        with open(os.path.join(server_dir, f"worker-{k}.log"), errors="replace") as f:
            lines = f.read().strip().splitlines()
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no log)"
