"""Job commands: ``submit``, ``status``, ``job list | info | results | cancel``.

Invariants:
- ``submit`` without --wait prints the job id and returns at once; with --wait it exits
  0 when every task finished, TASK_FAILED (1) naming the failed task otherwise.
- Results are written by ``write_results``: one file per result in a directory, or all
  of them in order to stdout for "-". Bytes are written as they are; a Python object
  as its pickle (``result-ID.pickle``; on stdout: pretty-printed on a terminal); with
  --json to stdout, one JSON document carries the values.
"""

from __future__ import annotations

import base64
import json
import os
import pprint
import sys
import time
from typing import Optional

import cloudpickle
import typer

from loomctl.cli.connect import connect
from loomctl.cli.graph import load_graph, parse_params
from loomctl.cli.output import (CliError, ExitCode, JsonOption, Output, Progress, QuietOption, human_bytes,
                                 key_values, table)
from loomctl.cli.server import ServerDirOption

app = typer.Typer(help="Manage jobs.", no_args_is_help=True)
root = typer.Typer()   # top-level commands of this module (submit, status)


@root.command()
def submit(
    source: str = typer.Argument(..., help="Graph file, plan source (.py, .toml, command list), or - for a graph on stdin."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the job, show progress, write its results."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="With --wait: directory for result files, or - for stdout."),
    load_checkpoints: bool = typer.Option(False, "--load-checkpoints", help="Take existing checkpoint files as results instead of computing them."),
    param: list[str] = typer.Option([], "-p", "--param", help="KEY=VALUE for a plan script (repeatable)."),
    name: str = typer.Option("", "--name", help="A name for the job in status listings."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Write a trace of this job into this directory."),
    server_dir: Optional[str] = ServerDirOption,
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Submit a graph to the server; prints the job id (or waits with --wait)."""
    graph = load_graph(source, parse_params(param))
    client = connect(server_dir)
    try:
        if trace:
            client.set_trace(trace)
        job, futures = client.submit_graph(graph, load=load_checkpoints, name=name or os.path.basename(source),
                                           detach=True)
        if not wait:
            Output(json_mode, quiet).emit({"job": job, "tasks": len(graph)}, lambda d: f"job {d['job']} submitted ({d['tasks']} tasks)", essential=job)
            return
        run_to_end(client, job, futures, output, json_mode, quiet)
    finally:
        client.close()


def run_to_end(client, job: int, futures: list, output: str | None, json_mode: bool, quiet: bool) -> None:
    """Wait for a job with progress, write its results, raise CliError if it failed."""
    info = wait_for_job(client, job, progress=not (json_mode or quiet))
    if info["status"] == "failed":
        e = info.get("error") or {}
        label = f" ({e.get('label')})" if e.get("label") else ""
        message = " | ".join(line.strip() for line in (e.get("message") or "").strip().splitlines() if line.strip())
        raise CliError(f"job {job} failed: task {e.get('id')}{label} [{e.get('symbol')}] on worker "
                       f"{e.get('worker') or '?'}: {message}", ExitCode.TASK_FAILED)
    if info["status"] != "finished":
        raise CliError(f"job {job} was {info['status']}", ExitCode.TASK_FAILED)
    written = write_results(client, futures, output, as_json=json_mode)
    data = {"job": job, "status": info["status"], "counts": info["counts"], "results": written}
    if output not in (None, "-") or json_mode:
        Output(json_mode, quiet).emit(data, lambda d: f"job {d['job']} finished: {d['counts'].get('finished', 0)} tasks",
                                      essential=job)


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
            client._poll(100)
    finally:
        bar.close()


def write_results(client, futures: list, output: str | None, as_json: bool = False) -> list:
    """Download results; "-" or None writes them in order to stdout, else one file per
    result in the directory ``output``: ``result-ID`` for bytes, ``result-ID.pickle``
    for a Python object. With ``as_json`` and stdout nothing is written: the entries
    returned carry the values (see ``json_entry``)."""
    if not futures:
        return []
    values = client.fetch(futures)
    if output in (None, "-"):
        if as_json:
            return [{"task": f.task_id, **json_entry(v)} for f, v in zip(futures, values)]
        out = sys.stdout.buffer
        tty = sys.stdout.isatty()
        written = []
        for f, value in zip(futures, values):
            data = as_bytes(value)
            if data is None:   # a Python object: readable on a terminal, else its pickle
                data = (pprint.pformat(value) + "\n").encode() if tty else cloudpickle.dumps(value)
            out.write(data)
            written.append({"task": f.task_id, "bytes": len(data)})
        out.flush()
        return written
    os.makedirs(output, exist_ok=True)
    written = []
    for f, value in zip(futures, values):
        data = as_bytes(value)
        name = f"result-{f.task_id}"
        if data is None:
            data, name = cloudpickle.dumps(value), name + ".pickle"
        path = os.path.join(output, name)
        with open(path, "wb") as fh:
            fh.write(data)
        written.append({"task": f.task_id, "path": path, "bytes": len(data)})
    return written


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


@root.command()
def status(server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Show the server, its workers and its jobs."""
    client = connect(server_dir)
    try:
        data = client.status()
    finally:
        client.close()
    data.pop("req", None)
    Output(json_mode, quiet).emit(data, _render_status, essential=len(data["workers"]))


def _render_status(d: dict) -> str:
    s = d["server"]
    head = key_values([("server", f"{s['host']}:{s['port']} (pid {s['pid']}, up {s['uptime_s']} s, "
                                  f"authentication {'on' if s['auth'] else 'off'})"),
                       ("workers", len(d["workers"])), ("data objects", d["n_data_objects"]),
                       ("tasks", d["n_tasks"])])
    workers = table([[w["id"], w["name"], w["hostname"], w["cpus"], w["assigned"], w["tasks_done"],
                      w["data_objects"], human_bytes(w["data_bytes"]), human_bytes(w["rss"])] for w in d["workers"]],
                    ["id", "worker", "host", "cpus", "running", "done", "data", "bytes", "memory"])
    return head + "\n\n" + workers + "\n\n" + _jobs_table(d["jobs"])


def _jobs_table(jobs: list) -> str:
    return table([[j["id"], j["name"], j["status"], j.get("waiting", 0) + j.get("ready", 0),
                   j.get("assigned", 0), j.get("finished", 0), j.get("failed", 0), j["total"], j["elapsed_s"]]
                  for j in jobs],
                 ["job", "name", "status", "waiting", "running", "finished", "failed", "total", "seconds"])


@app.command("list")
def list_jobs(server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """List jobs with their task counts."""
    client = connect(server_dir)
    try:
        jobs = client.status()["jobs"]
    finally:
        client.close()
    Output(json_mode, quiet).emit(jobs, _jobs_table, essential="\n".join(str(j["id"]) for j in jobs))


@app.command()
def info(job: int = typer.Argument(..., help="Job id."), server_dir: Optional[str] = ServerDirOption,
         json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Show one job: status, task counts, the error of a failed task."""
    client = connect(server_dir)
    try:
        jobs = {j["id"]: j for j in client.status()["jobs"]}
    finally:
        client.close()
    if job not in jobs:
        raise CliError(f"no job {job}", ExitCode.BAD_INPUT)
    j = jobs[job]
    Output(json_mode, quiet).emit(j, lambda d: key_values(list(d.items())), essential=j["status"])


@app.command()
def results(job: int = typer.Argument(..., help="Job id."),
            output: str = typer.Option("-", "--output", "-o", help="Directory for result files, or - for stdout."),
            wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the job to end first."),
            server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Download the results of a job (they stay on the workers until the job is cancelled)."""
    from loomctl import protocol as P
    from loomctl.client import Future, LoomConnectionError, LoomError
    client = connect(server_dir)
    try:
        info = wait_for_job(client, job, progress=not (json_mode or quiet) and output != "-") if wait \
            else client.job_progress(job)
        if info["status"] != "finished":
            raise CliError(f"job {job} is {info['status']}; its results are not available",
                           ExitCode.TASK_FAILED if info["status"] == "failed" else ExitCode.BAD_INPUT)
        futures = []
        for task_id, address in zip(P.ids_from_bytes(info["ids"]).tolist(), info["addresses"]):
            f = Future(client, task_id, job)
            f.address = address
            futures.append(f)
        written = write_results(client, futures, output, as_json=json_mode)
    except LoomConnectionError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
    except LoomError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    finally:
        client.close()
    if output != "-" or json_mode:
        Output(json_mode, quiet).emit(written, lambda d: "\n".join(w["path"] for w in d))


@app.command()
def cancel(job: int = typer.Argument(..., help="Job id."), server_dir: Optional[str] = ServerDirOption,
           json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Cancel a running job, or drop the results of a finished one."""
    from loomctl.client import LoomError
    client = connect(server_dir)
    try:
        client.cancel(job)
    except LoomError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    finally:
        client.close()
    Output(json_mode, quiet).emit({"job": job, "cancelled": True}, lambda d: f"job {d['job']} cancelled")
