"""Job commands: ``submit``, ``status``, ``job list | info | results | cancel``.

Invariants:
- ``submit`` without --wait prints the job id and returns at once; with --wait it exits
  0 when every task finished, TASK_FAILED (1) naming the failed task otherwise, and
  INTERRUPTED (130) on Ctrl-C, saying that the (detached) job goes on.
- Results are written by ``common.deliver_results`` (one file per result, or stdout).
- Jobs are listed in id order. A job's "assigned" tasks are those the server gave to
  a worker, running there or queued; a worker's are shown apart, running (as its last
  heartbeat said) and queued.
"""

from __future__ import annotations

import os
from typing import List, Optional

import typer

from loomctl.cli.common import (AsOption, ServerDirOption, connect, deliver_results, failure, interrupted_job,
                                load_graph, parse_params, run_to_end, wait_for_job)
from loomctl.cli.output import (CliError, ExitCode, JsonOption, Output, QuietOption, check_output_dir, human_bytes,
                                key_values, plural, table)

app = typer.Typer(help="Manage jobs.", no_args_is_help=True)
root = typer.Typer()   # top-level commands of this module (submit, status)


@root.command()
def submit(
    source: str = typer.Argument(..., help="Graph file, plan source (.py, .toml, .txt command list), or - for a graph on stdin."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the job, show progress, write its results."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="With --wait: directory for result files, or - for stdout."),
    load_checkpoints: bool = typer.Option(False, "--load-checkpoints", help="Take existing checkpoint files as results instead of computing them."),
    param: List[str] = typer.Option([], "-p", "--param", help="KEY=VALUE for a plan script (repeatable)."),
    as_: Optional[str] = AsOption,
    name: str = typer.Option("", "--name", help="A name for the job in status listings."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Write a trace of this job into this directory."),
    server_dir: Optional[str] = ServerDirOption,
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Submit a graph to the server; prints the job id (or waits with --wait)."""
    graph = load_graph(source, parse_params(param), as_)
    if wait and output not in (None, "-"):
        check_output_dir(output)
    out = Output(json_mode, quiet)
    client = connect(server_dir)
    try:
        if trace:
            client.set_trace(trace)
        job, futures = client.submit_graph(graph, load=load_checkpoints, name=name or os.path.basename(source),
                                           detach=True)
        if not wait:
            out.emit({"job": job, "tasks": len(graph)},
                     lambda d: f"job {d['job']} submitted ({plural(d['tasks'], 'task')})", essential=job)
            return
        try:
            run_to_end(client, job, futures, output, out)
        except KeyboardInterrupt:
            raise interrupted_job(job) from None
    finally:
        client.close()


@root.command()
def status(server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Show the server, its workers and its jobs."""
    data = _status(server_dir)
    Output(json_mode, quiet).emit(data, _render_status, essential=len(data["workers"]))


def _status(server_dir: str | None) -> dict:
    client = connect(server_dir)
    try:
        data = client.status()
    finally:
        client.close()
    data.pop("req", None)
    data["jobs"] = sorted(data["jobs"], key=lambda j: j["id"])
    return data


def _restored(r: dict) -> str:
    import time
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
    return f"at {when}: {r['jobs']} jobs from the journal {r['journal']}"


def _render_status(d: dict) -> str:
    s = d["server"]
    head = key_values([("server", f"{s['host']}:{s['port']} (pid {s['pid']}, up {s['uptime_s']} s, "
                                  f"authentication {'on' if s['auth'] else 'off'})"),
                       *([("restored", _restored(s["restored"]))] if s.get("restored") else []),
                       ("workers", len(d["workers"])), ("data objects", d["n_data_objects"]),
                       ("tasks", d["n_tasks"])])
    workers = table([[w["id"], w["name"], w["hostname"], w["cpus"], *_running_queued(w), w["tasks_done"],
                      w["data_objects"], human_bytes(w["data_bytes"]), *_memory(w)] for w in d["workers"]],
                    ["id", "worker", "host", "cpus", "running", "queued", "done", "data", "bytes", "memory",
                     "limit", "spilled"])
    return head + "\n\n" + workers + "\n\n" + _jobs_table(d["jobs"])


def _memory(w: dict) -> tuple:
    """(memory used, its limit, objects spilled to disk (their bytes)) of a worker; a
    paused worker (above its pause threshold: it starts no task) says so."""
    used = human_bytes(w.get("memory_used", w.get("rss")))
    limit = human_bytes(w["memory_limit"]) if w.get("memory_limit") else "-"
    spilled = f"{w.get('spilled_objects', 0)} ({human_bytes(w.get('spilled_bytes', 0))})" \
        if w.get("spilled_objects") else "0"
    return used + (" paused" if w.get("paused") else ""), limit, spilled


def _running_queued(w: dict) -> tuple:
    """(running, queued) tasks of a worker: running as its last heartbeat (every 0.5 s)
    said, queued the rest of those the server assigned to it; '-' before a heartbeat."""
    running = w.get("running")
    if running is None:
        return "-", "-"
    return running, max(0, w["assigned"] - running)


def _waiting(j: dict) -> int:
    return j.get("waiting", 0) + j.get("ready", 0)


def _jobs_table(jobs: list) -> str:
    return table([[j["id"], j["name"], j["status"], _waiting(j), j.get("assigned", 0), j.get("finished", 0),
                   j.get("failed", 0), j["total"], j["elapsed_s"]] for j in jobs],
                 ["job", "name", "status", "waiting", "assigned", "finished", "failed", "total", "seconds"])


STATES = ("running", "finished", "failed", "cancelled")


@app.command("list")
def list_jobs(
    state: Optional[str] = typer.Option(None, "--state", help=f"Only jobs in this state: {', '.join(STATES)}."),
    server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """List jobs (in id order) with their task counts."""
    if state is not None and state not in STATES:
        raise CliError(f"--state {state!r}: choose one of {', '.join(STATES)}", ExitCode.USAGE)
    jobs = [j for j in _status(server_dir)["jobs"] if state is None or j["status"] == state]
    Output(json_mode, quiet).emit(jobs, _jobs_table, essential="\n".join(str(j["id"]) for j in jobs))


@app.command()
def info(job: int = typer.Argument(..., help="Job id."), server_dir: Optional[str] = ServerDirOption,
         json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Show one job: status, task counts, the error of a failed task."""
    jobs = {j["id"]: j for j in _status(server_dir)["jobs"]}
    if job not in jobs:
        raise CliError(f"no job {job}", ExitCode.BAD_INPUT)
    Output(json_mode, quiet).emit(jobs[job], _render_job, essential=jobs[job]["status"])


def _render_job(j: dict) -> str:
    pairs = [("job", j["id"]), ("name", j["name"] or "-"), ("status", j["status"]),
             ("tasks", f"{j['total']}: {_waiting(j)} waiting, {j.get('assigned', 0)} assigned, "
                       f"{j.get('finished', 0)} finished, {j.get('failed', 0)} failed"),
             ("results", j.get("results", "-")), ("seconds", j["elapsed_s"])]
    e = j.get("error")
    if e:
        label = f" ({e['label']})" if e.get("label") else ""
        pairs += [("failed task", f"{e.get('id')}{label} [{e.get('symbol')}] on worker {e.get('worker') or '?'}"),
                  ("error", " | ".join(x.strip() for x in str(e.get("message") or "").splitlines() if x.strip()))]
    return key_values(pairs)


NO_RESULTS = {"failed": "failed", "cancelled": "was cancelled", "running": "is still running (--wait waits for it)"}


@app.command()
def results(job: int = typer.Argument(..., help="Job id."),
            output: str = typer.Option("-", "--output", "-o", help="Directory for result files, or - for stdout."),
            wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the job to end first."),
            server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Download the results of a job (they stay on the workers until the job is cancelled)."""
    from loomctl.client import LoomConnectionError, LoomError
    if output != "-":
        check_output_dir(output)
    out = Output(json_mode, quiet)
    client = connect(server_dir)
    try:
        if wait:
            try:
                wait_for_job(client, job, progress=out.is_text and output != "-")
            except KeyboardInterrupt:
                raise interrupted_job(job) from None
        info, futures = client.job_futures(job)
        status = info["status"]
        if status == "failed":
            raise CliError(f"{failure(info)}; the job has no results", ExitCode.TASK_FAILED)
        if status != "finished":
            raise CliError(f"job {job} {NO_RESULTS.get(status, status)}; it has no results", ExitCode.BAD_INPUT)
        if not futures:
            raise CliError(f"job {job} holds no results any more (cancelled, or released by the client that "
                           "submitted it)", ExitCode.BAD_INPUT)
        deliver_results(client, job, info, futures, output, out)
    except LoomConnectionError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
    except LoomError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    finally:
        client.close()


@app.command()
def cancel(jobs: List[int] = typer.Argument(..., help="Job ids (e.g. from `loomctl job list -q --state finished`)."),
           server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Cancel running jobs (their tasks stop) or drop the results of ended ones."""
    from loomctl.client import LoomConnectionError, LoomError
    client = connect(server_dir)
    done, problems = [], []
    try:
        for job in jobs:
            try:
                client.cancel(job)
                done.append(job)
            except LoomConnectionError:
                raise
            except LoomError as exc:
                problems.append(str(exc))
    finally:
        client.close()
    if done:
        Output(json_mode, quiet).emit({"cancelled": done}, lambda d: f"cancelled {_jobs(d['cancelled'])}")
    if problems:
        raise CliError("; ".join(problems) + (f" (cancelled {_jobs(done)})" if done else ""), ExitCode.BAD_INPUT)


def _jobs(ids: list[int]) -> str:
    return ("job " if len(ids) == 1 else "jobs ") + ", ".join(map(str, ids))
