"""What several command modules share: the options they have in common, loading a
plan from the command line, finding the server, a local server for ``run`` and
``slurm run-allocation``, and following a job to its end and writing its results.

Invariants:
- Connecting turns every connection problem into one line with UNAVAILABLE (4); an
  access file whose server is gone is reported at once (loomctl.access.find_server).
- A job's results go to one file per result in a directory (``result-ID``, ID the task's
  id in the plan, as ``loomctl inspect`` numbers it; or
  ``result-ID.pickle`` for a Python object), or to stdout: one result as it is;
  several framed by a ``==> task ID <==`` line each (as head(1) frames several files);
  bare and concatenated with -q; as one JSON document with --json. Bytes are written
  as they are, a Python object as its pickle (pretty-printed on a terminal). These
  rules are loomctl-submit(1)'s "RESULTS" section.
- Ctrl-C while following a detached job says that the job goes on and how to cancel it.
"""

from __future__ import annotations

import base64
import json
import os
import pprint
import subprocess
import sys
import threading
import time
from typing import Optional

import cloudpickle
import typer

from graphfmt.graph import Graph, GraphError
from graphfmt.sources import PlanError, load_source, plan_kind
from loomctl import access
from loomctl.cli.output import CliError, ExitCode, Output, Progress, check_output_dir, plural

ServerDirOption = typer.Option(None, "--server-dir", envvar="LOOM_SERVER_DIR",
                               help="Directory of the access file (default: $LOOM_SERVER_DIR or ~/.loomctl/server).")
AsOption = typer.Option(None, "--as", metavar="KIND",
                        help="What the source is: graph, script, toml or commands (default: a graph file by its magic "
                             "number, else by its name: .py script, .toml task file, .txt command list).")
KIND_NAMES = {"graph": "graph file", "script": "plan script", "toml": "TOML task file", "commands": "command list"}


# ---------------------------------------------------------------------------- plans

def parse_params(pairs: list[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"parameter {pair!r} is not KEY=VALUE", ExitCode.USAGE)
        params[key] = value
    return params


def load_graph(source: str, params: dict[str, str] | None = None, kind: Optional[str] = None,
               stdin_kind: str = "graph") -> Graph:
    """The graph of a graph file or plan source ("-": standard input, a graph file
    unless ``stdin_kind`` or ``kind`` says otherwise); see graphfmt.sources.plan_kind."""
    name = "standard input" if source == "-" else source
    try:
        found = plan_kind(source, kind, stdin_kind)
    except PlanError as exc:
        hint = "; --as KIND says what it is" if "not a graph file" in str(exc) else ""
        raise CliError(f"{exc}{hint}") from None
    if params and found != "script":
        raise CliError(f"-p/--param is for plan scripts; {name} is a {KIND_NAMES[found]}", ExitCode.USAGE)
    try:
        return load_source(source, found, params)
    except GraphError as exc:
        raise CliError(f"{name}: {exc}") from None
    except PlanError as exc:   # its message names the file
        raise CliError(str(exc)) from None


# ---------------------------------------------------------------------------- servers

def connect(server_dir: str | None, address: str | None = None):
    from loomctl.client import Client, LoomConnectionError
    host, port = None, None
    if address:
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise CliError(f"server address {address!r} is not HOST:PORT", ExitCode.USAGE)
        port = int(port_text)
    else:
        try:
            access.find_server(server_dir)
        except access.AccessError as exc:
            raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
    try:
        return Client(host, port, server_dir_path=server_dir)
    except LoomConnectionError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from None


def start_server(host: str, server_dir: str, trace_dir: str | None, steal: bool = False):
    """A server in this process, serving from a daemon thread: (server, thread)."""
    from loomctl.server.process import Server
    try:
        server = Server(host=host, port=0, server_dir=server_dir, trace_dir=trace_dir, steal=steal)
    except Exception as exc:   # OSError, zmq.ZMQError (e.g. not an address of this host)
        raise CliError(f"cannot start the server on {host}: {exc}", ExitCode.UNAVAILABLE) from None
    thread = threading.Thread(target=server.serve, name="loomctl-server", daemon=True)
    thread.start()
    return server, thread


def stop_server(client, server, thread) -> None:
    """Stop the server (and, through it, its workers); the client is closed."""
    if client is not None:
        try:
            client.terminate()
        except Exception:
            client.close()
    server.running = False
    thread.join(5)


def stop_processes(procs: list) -> None:
    """Wait up to 5 s for ``procs`` to exit, then SIGTERM, then 2 s later SIGKILL."""
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in procs:
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------------------- jobs

def interrupted_job(job: int) -> CliError:
    return CliError(f"interrupted; job {job} goes on on the server (`loomctl job cancel {job}` stops it, "
                    f"`loomctl job results --wait {job}` follows it again)", ExitCode.INTERRUPTED)


def run_to_end(client, job: int, futures: list, output: str | None, out: Output) -> None:
    """Wait for a job with progress, write its results, raise CliError if it failed."""
    info = wait_for_job(client, job, progress=out.is_text)
    if info["status"] == "failed":
        raise CliError(failure(info), ExitCode.TASK_FAILED)
    if info["status"] != "finished":
        raise CliError(f"job {job} was {info['status']}", ExitCode.TASK_FAILED)
    deliver_results(client, job, info, futures, output, out)


def failure(info: dict) -> str:
    """'job 3 failed: task 7 (label) [loom/run/run] on worker w0: message'."""
    e = info.get("error") or {}
    label = f" ({e.get('label')})" if e.get("label") else ""
    message = " | ".join(line.strip() for line in (e.get("message") or "").strip().splitlines() if line.strip())
    task = e.get("task") if "task" in e else e.get("id")   # the plan's own id; None: added at run time
    what = f"task {task}" if task is not None else f"a task added at run time (server id {e.get('id')})"
    return (f"job {info['job']} failed: {what}{label} [{e.get('symbol')}] on worker "
            f"{e.get('worker') or '?'}: {message}")


def wait_for_job(client, job: int, progress: bool = True) -> dict:
    bar = Progress(enabled=progress)
    started = time.monotonic()
    try:
        while True:
            info = client.job_progress(job)
            counts = info["counts"]
            bar.update(counts.get("finished", 0), counts.get("failed", 0), counts.get("total", 0),
                       time.monotonic() - started)
            if info["status"] != "running":
                bar.update(counts.get("finished", 0), counts.get("failed", 0), counts.get("total", 0),
                           time.monotonic() - started, force=True)
                return info
            client.wait_notice(0.1)
    finally:
        bar.close()


def deliver_results(client, job: int, info: dict, futures: list, output: str | None, out: Output) -> None:
    """Download the results and write them as the module docstring says."""
    values = client.fetch(futures) if futures else []
    base = info.get("base", 0)   # results are named by the plan's own task ids
    summary = {"job": job, "status": info["status"], "counts": info["counts"], "results": []}
    rows = summary["results"]
    if output not in (None, "-"):
        check_output_dir(output)
        try:
            os.makedirs(output, exist_ok=True)
            for f, value in zip(futures, values):
                data, name = as_bytes(value), f"result-{f.task_id - base}"
                if data is None:
                    data, name = cloudpickle.dumps(value), name + ".pickle"
                path = os.path.join(output, name)
                with open(path, "wb") as fh:
                    fh.write(data)
                rows.append({"task": f.task_id - base, "path": path, "bytes": len(data)})
        except OSError as exc:
            raise CliError(f"cannot write results into {output}: {exc.strerror}") from None
        out.emit(summary, lambda d: f"job {job} finished: wrote {plural(len(rows), 'result')} to {output}",
                 essential=job)
        return
    if out.mode == "json":
        rows.extend({"task": f.task_id - base, **json_entry(v)} for f, v in zip(futures, values))
        out.emit(summary)
        return
    stream = sys.stdout.buffer
    tty = sys.stdout.isatty()
    framed = len(values) > 1 and out.is_text
    for k, (f, value) in enumerate(zip(futures, values)):
        data = as_bytes(value)
        if data is None:   # a Python object: readable on a terminal, else its pickle
            data = (pprint.pformat(value) + "\n").encode() if tty else cloudpickle.dumps(value)
        if framed:
            stream.write((b"\n" if k else b"") + f"==> task {f.task_id - base} <==\n".encode())
        stream.write(data)
        if framed and data and not data.endswith(b"\n"):
            stream.write(b"\n")
    stream.flush()


def as_bytes(value) -> bytes | None:
    """The bytes of a result (plain, file and index contents; an array of them
    concatenated), or None for a Python object."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, list):
        parts = [as_bytes(v) for v in value]
        return None if any(p is None for p in parts) else b"".join(parts)
    return None


def json_entry(value) -> dict:
    """A result in JSON: {"text": ...} (UTF-8 bytes) or {"base64": ...}; {"items": [...]}
    for an array; {"value": ...} for a JSON-able Python object (numpy values as lists
    and numbers), else {"repr": ...}."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return {"text": bytes(value).decode()}
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list) and as_bytes(value) is not None:
        return {"items": [json_entry(v) for v in value]}
    try:
        return {"value": json.loads(json.dumps(value, default=_plain_json, allow_nan=False))}
    except (TypeError, ValueError):
        return {"repr": repr(value)}


def _plain_json(value):
    if hasattr(value, "tolist"):   # numpy arrays and scalars
        return value.tolist()
    raise TypeError(type(value).__name__)
