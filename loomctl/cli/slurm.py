"""``loomctl slurm submit | run-allocation``: run a plan in a Slurm allocation.

``submit`` writes a batch script (``--print`` shows it) and hands it to sbatch; the
script runs ``run-allocation`` on the allocation's first node, which keeps the server in
its own process (as ``loomctl run`` does), starts one worker per node with one srun
step, submits the plan, writes the results and stops the server, after which the
workers and the srun step end.

Invariants:
- ``run-allocation`` stops what it started whatever happens (a failed task, a worker
  that cannot start, SIGTERM at the job's time limit): the server stops, which stops
  the workers; the srun step is waited for, then terminated, then killed.
- The access file is in a server directory on the shared file system (default
  ``loomctl-<job id>/server`` in the submit directory), never in the home default, so
  two jobs never share one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import List, Optional

import typer

from loomctl import __version__
from loomctl.cli.common import (AsOption, load_graph, parse_params, run_to_end, start_server, stop_processes,
                                stop_server)
from loomctl.cli.output import CliError, ExitCode, JsonOption, Output, QuietOption, note
from loomctl.cluster import slurm

app = typer.Typer(help="Run plans in Slurm allocations.", no_args_is_help=True)

PlanArgument = typer.Argument(..., help="Plan script (.py), TOML task file, command list, or graph file, on a file system the nodes share.")
OutputOption = typer.Option(None, "--output", "-o", help="Directory for result files, or - for the job's output file (default: loomctl-JOBID/results in the submit directory).")
ServerDirOption = typer.Option(None, "--server-dir", help="Directory for the access file and the workers' log, on a shared file system (default: loomctl-JOBID/server in the submit directory).")
TraceOption = typer.Option(None, "--trace", help="Write a trace of the run into this directory.")
ParamOption = typer.Option([], "-p", "--param", help="KEY=VALUE for a plan script (repeatable).")
LoadOption = typer.Option(False, "--load-checkpoints", help="Take existing checkpoint files as results.")
HostOption = typer.Option(None, "--host", help="Address of the first node that the other nodes reach (default: the first non-loopback address of its host name).")
WorkerArgOption = typer.Option([], "--worker-arg", help="An option for `loomctl worker start` on every node, e.g. --worker-arg=--memory-limit=4G (repeatable).")
SrunArgOption = typer.Option([], "--srun-arg", help="An option for the srun that starts the workers, e.g. --srun-arg=--mem=0 (repeatable).")


@app.command()
def submit(
    plan: str = PlanArgument,
    nodes: int = typer.Option(1, "--nodes", "-N", min=1, help="Number of nodes; one worker runs on each."),
    time_limit: Optional[str] = typer.Option(None, "--time", "-t", help="Time limit of the job, as sbatch takes it (e.g. 30, 2:00:00, 1-0)."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition (default: the cluster's default)."),
    cpus_per_node: Optional[int] = typer.Option(None, "--cpus-per-node", min=1, help="Cpus to ask for on each node (default: whole nodes, sbatch --exclusive)."),
    job_name: str = typer.Option("loomctl", "--job-name", "-J", help="Name of the Slurm job."),
    output: Optional[str] = OutputOption,
    server_dir: Optional[str] = ServerDirOption,
    trace: Optional[str] = TraceOption,
    param: List[str] = ParamOption,
    as_: Optional[str] = AsOption,
    load_checkpoints: bool = LoadOption,
    host: Optional[str] = HostOption,
    worker_arg: List[str] = WorkerArgOption,
    srun_arg: List[str] = SrunArgOption,
    sbatch_arg: List[str] = typer.Option([], "--sbatch-arg", help="A line '#SBATCH ARG' for the batch script, e.g. --sbatch-arg=--account=proj (repeatable)."),
    print_only: bool = typer.Option(False, "--print", help="Print the batch script instead of submitting it."),
    wait: bool = typer.Option(False, "--wait", "-w", help="Wait for the job to end; exit non-zero unless it COMPLETED."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Submit a plan as a Slurm job (or print its batch script); prints the Slurm job id."""
    if plan == "-":
        raise CliError("the plan must be a file the nodes can read, not -", ExitCode.USAGE)
    params = parse_params(param)
    graph = load_graph(plan, params, as_)      # a broken plan fails here, not in the queue
    run_args = _run_args(output, server_dir, trace, param, as_, load_checkpoints, host, worker_arg, srun_arg)
    opts = slurm.BatchOptions(plan=os.path.abspath(plan), nodes=nodes, time=time_limit, partition=partition,
                              cpus_per_node=cpus_per_node, job_name=job_name, sbatch_args=sbatch_arg,
                              run_args=run_args)
    try:
        script = slurm.batch_script(opts, sys.executable, __version__)
    except slurm.SlurmError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    out = Output(json_mode, quiet)
    if print_only:
        out.emit({"script": script}, lambda d: d["script"], essential=script)
        return

    def describe(job_id: str) -> dict:
        job_dir = os.path.join(os.getcwd(), f"loomctl-{job_id}")
        return {"slurm_job": job_id, "nodes": nodes, "tasks": len(graph),
                "output": _abs(output) or os.path.join(job_dir, "results"),
                "server_dir": _abs(server_dir) or os.path.join(job_dir, "server")}

    try:
        job_id = slurm.sbatch(script)
    except slurm.SlurmError as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
    data = describe(job_id)
    if not wait or out.mode != "json":   # with --wait: the id now, the outcome when the job ends
        out.emit(data, lambda d: f"Submitted Slurm job {d['slurm_job']} ({d['nodes']} nodes, {d['tasks']} tasks); "
                                 f"results: {d['output']}", essential=job_id)
    if not wait:
        return
    try:
        info = slurm.wait_job(job_id)
    except slurm.SlurmError as exc:
        raise CliError(f"lost track of Slurm job {job_id}: {exc}", ExitCode.UNAVAILABLE) from None
    data.update(state=info.get("JobState"), exit_code=info.get("ExitCode"))
    if out.mode == "json":
        out.emit(data)
    if data["state"] != "COMPLETED":
        code = f", exit code {data['exit_code']}" if data["exit_code"] else ""
        raise CliError(f"Slurm job {job_id} ended {data['state']}{code}; see its output file "
                       f"(slurm-{job_id}.out unless --sbatch-arg sets --output)", ExitCode.TASK_FAILED)
    if out.is_text:
        out.emit(data, lambda d: f"Slurm job {d['slurm_job']} finished; results: {d['output']}")


def _abs(path: str | None) -> str | None:
    return path if path in (None, "-") else os.path.abspath(path)


def _run_args(output, server_dir, trace, params, kind, load_checkpoints, host, worker_args, srun_args) -> list[str]:
    """The options of run-allocation that submit passes on, with absolute paths."""
    args: list[str] = []
    for name, value in (("--output", _abs(output)), ("--server-dir", _abs(server_dir)), ("--trace", _abs(trace)),
                        ("--host", host), ("--as", kind)):
        if value is not None:
            args += [name, value]
    for pair in params:
        args += ["--param", pair]
    if load_checkpoints:
        args.append("--load-checkpoints")
    args += [f"--worker-arg={a}" for a in worker_args]
    args += [f"--srun-arg={a}" for a in srun_args]
    return args


@app.command("run-allocation")
def run_allocation(
    plan: str = PlanArgument,
    output: Optional[str] = OutputOption,
    server_dir: Optional[str] = ServerDirOption,
    trace: Optional[str] = TraceOption,
    param: List[str] = ParamOption,
    as_: Optional[str] = AsOption,
    load_checkpoints: bool = LoadOption,
    host: Optional[str] = HostOption,
    nodes: Optional[int] = typer.Option(None, "--nodes", "-N", min=1, help="Start workers on this many nodes (default: all of the allocation's)."),
    worker_arg: List[str] = WorkerArgOption,
    srun_arg: List[str] = SrunArgOption,
    start_timeout: float = typer.Option(120.0, "--start-timeout", help="Seconds to wait for every worker to join."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Inside a Slurm job: run the server here, a worker on every node (srun), the plan; then stop."""
    try:
        alloc = slurm.allocation(os.environ)
        address = slurm.server_address(host)
    except slurm.SlurmError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    count = nodes or alloc.nodes
    if count > alloc.nodes:
        raise CliError(f"--nodes {count}: the allocation has {alloc.nodes} nodes", ExitCode.USAGE)
    srun = shutil.which("srun")
    if srun is None:
        raise CliError("srun not found on this node", ExitCode.UNAVAILABLE)
    graph = load_graph(plan, parse_params(param), as_)
    server_dir = os.path.abspath(server_dir or os.path.join(alloc.job_dir, "server"))
    output = _abs(output) or os.path.join(alloc.job_dir, "results")
    os.makedirs(server_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(server_dir, "workers.log")
    talk = not (json_mode or quiet)

    from loomctl.client import Client, LoomError

    previous = signal.signal(signal.SIGTERM, _interrupt)   # scancel, the time limit
    try:
        server, thread = start_server(address, server_dir, trace)
        if talk:
            note(f"Slurm job {alloc.job_id}: server on {alloc.node_name} at {address}:{server.port}, "
                  f"server directory {server_dir}; starting {count} workers with srun (log: {log_path})")
            if count > 1 and slurm.is_loopback(address):
                note(f"the server listens on {address}, which only this host reaches; "
                      "if the nodes are separate hosts, pass --host")
        srun_proc = None
        client = None
        try:
            with open(log_path, "ab") as log:
                srun_proc = subprocess.Popen(
                    slurm.srun_command(count, sys.executable, server_dir, worker_arg, srun_arg, srun=srun),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            client = Client(server_dir_path=server_dir)
            _wait_for_workers(client, count, srun_proc, log_path, start_timeout, address)
            if trace:
                client.set_trace(trace)
            job, futures = client.submit_graph(graph, load=load_checkpoints, name=os.path.basename(plan))
            run_to_end(client, job, futures, output, Output(json_mode, quiet))
        except LoomError as exc:
            raise CliError(str(exc), ExitCode.UNAVAILABLE) from None
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut this short
            stop_server(client, server, thread)   # through the server, every worker stops
            if srun_proc is not None:
                stop_processes([srun_proc])
                if srun_proc.returncode not in (0, None) and talk:
                    note(f"the srun step of the workers exited with status {srun_proc.returncode} "
                          f"(log: {log_path})")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _wait_for_workers(client, count: int, srun_proc, log_path: str, timeout: float, address: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        joined = client.get_stats()["n_workers"]
        if joined >= count:
            return
        exited = srun_proc.poll() is not None
        failed = _worker_errors(log_path)   # read after the poll: an ended srun's log is complete
        if exited or failed:
            # a worker's own error is the cause; srun's status only says that the step ended
            what = "a worker failed" if failed else f"srun exited with status {srun_proc.returncode}"
            raise CliError(f"{what} while the workers started ({joined} of {count} joined): "
                           f"{(failed or _tail(log_path))[-1]}", ExitCode.UNAVAILABLE)
        if time.monotonic() > deadline:
            hint = (f"; the server listens on {address}, which other hosts cannot reach: pass --host"
                    if slurm.is_loopback(address) else "")
            raise CliError(f"{joined} of {count} workers joined within {timeout:.0f} s{hint} "
                           f"(log: {log_path})", ExitCode.UNAVAILABLE)
        time.sleep(0.1)


def _tail(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines or ["(no output)"]


def _worker_errors(path: str) -> list[str]:
    """The one-line errors of workers that could not start (srun --label prefixes them)."""
    return [line for line in _tail(path) if re.match(r"^(\d+:\s*)?loomctl: error: ", line)]
