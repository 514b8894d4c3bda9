"""Slurm without the CLI: batch scripts, the srun line that starts workers, the
server's address, and talking to sbatch.

A plan runs in one Slurm job: the batch script (on the allocation's first node) runs
``loomctl slurm run-allocation``, which keeps the server in its own process, starts one
worker per node with one ``srun`` step, submits the plan, writes the results and stops
everything.

Invariants:
- Everything here is a plain function of its arguments (and of the environment passed
  in); only ``sbatch``, ``job_info`` and ``server_address`` touch the outside world.
- A generated batch script runs the loomctl of the Python interpreter that generated
  it, so it needs the same installation path on the compute nodes (a shared file
  system, as for the plan and the results).
- Paths written into a script are absolute: a job may start in another directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import time
from typing import Callable, Mapping, Sequence

#: The worker command inside the srun step: the node's cpus and name come from the
#: environment Slurm gives each task, so they are expanded there, not in the batch step.
#: Options given by the user come last and so win (click keeps the last occurrence).
WORKER_SHELL = ('py=$1; shift; exec "$py" -m loomctl worker start '
                '--cpus "${SLURM_CPUS_ON_NODE:-1}" --name "${SLURMD_NODENAME:-$(hostname -s)}" "$@"')


class SlurmError(Exception):
    """Slurm is missing, refused a job, or this is not an allocation."""


@dataclasses.dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: int
    submit_dir: str
    node_name: str

    @property
    def job_dir(self) -> str:
        """Where a job keeps its server directory and default results."""
        return os.path.join(self.submit_dir, f"loomctl-{self.job_id}")


def allocation(env: Mapping[str, str]) -> Allocation:
    """The Slurm job this process runs in, from its environment."""
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise SlurmError("not inside a Slurm allocation (SLURM_JOB_ID is not set); "
                         "use `loomctl slurm submit` to create one")
    nodes_text = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    try:
        nodes = int(nodes_text)
    except ValueError:
        raise SlurmError(f"SLURM_JOB_NUM_NODES={nodes_text!r} is not a number") from None
    return Allocation(job_id=job_id, nodes=nodes,
                      submit_dir=env.get("SLURM_SUBMIT_DIR") or os.getcwd(),
                      node_name=env.get("SLURMD_NODENAME") or socket.gethostname())


def server_address(explicit: str | None = None) -> str:
    """The IPv4 address the server listens on and writes into the access file.

    An explicit host name or address is resolved; otherwise the first non-loopback
    address of this host's name, else 127.0.0.1 (enough when every node of the
    allocation is this host)."""
    if explicit:
        try:
            return socket.gethostbyname(explicit)
        except OSError as exc:
            raise SlurmError(f"--host {explicit!r} does not resolve: {exc}") from None
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        infos = []
    for info in infos:
        address = info[4][0]
        if not address.startswith("127."):
            return address
    return "127.0.0.1"


def is_loopback(address: str) -> bool:
    return address.startswith("127.")


def srun_command(nodes: int, python: str, server_dir: str, worker_args: Sequence[str] = (),
                 srun_args: Sequence[str] = (), srun: str = "srun") -> list[str]:
    """One srun step: one worker on each of ``nodes`` nodes, with all of the node's cpus
    (``--whole``), whose exit does not end the others."""
    return [srun, f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--whole",
            "--kill-on-bad-exit=0", "--label", "--job-name=loomctl-workers", *srun_args,
            "sh", "-c", WORKER_SHELL, "loomctl-worker", python,
            "--server-dir", server_dir, *worker_args]


@dataclasses.dataclass
class BatchOptions:
    """What ``loomctl slurm submit`` puts into a batch script."""
    plan: str                     # absolute
    nodes: int = 1
    time: str | None = None
    partition: str | None = None
    cpus_per_node: int | None = None
    job_name: str = "loomctl"
    sbatch_args: Sequence[str] = ()
    run_args: Sequence[str] = ()  # further options of `loomctl slurm run-allocation`


def _directive(option: str, value: object) -> str:
    """``#SBATCH --option=value``; sbatch reads a value with spaces in double quotes."""
    text = str(value)
    if any(c in text for c in "\r\n"):
        raise SlurmError(f"{option} {text!r} contains a line break")
    if any(c.isspace() for c in text):
        if '"' in text:
            raise SlurmError(f"{option} {text!r} has both spaces and double quotes")
        text = f'"{text}"'
    return f"#SBATCH {option}={text}"


def batch_script(opts: BatchOptions, python: str, version: str = "") -> str:
    """The batch script: #SBATCH lines (the user's last: a later line wins in sbatch),
    then one line that runs the plan."""
    lines = ["#!/bin/bash",
             _directive("--job-name", opts.job_name),
             _directive("--nodes", opts.nodes),
             _directive("--ntasks-per-node", 1)]
    if opts.cpus_per_node is None:
        lines.append("#SBATCH --exclusive")
    else:
        lines.append(_directive("--cpus-per-task", opts.cpus_per_node))
    if opts.time:
        lines.append(_directive("--time", opts.time))
    if opts.partition:
        lines.append(_directive("--partition", opts.partition))
    for arg in opts.sbatch_args:
        if any(c in arg for c in "\r\n"):
            raise SlurmError(f"--sbatch-arg {arg!r} contains a line break")
        lines.append(f"#SBATCH {arg}")
    command = [python, "-m", "loomctl", "slurm", "run-allocation", opts.plan, *opts.run_args]
    lines += [
        f"# Generated by `loomctl slurm submit`{f' (loomctl {version})' if version else ''}.",
        "# The server runs in this batch step on the first node; one srun step starts a",
        "# worker on every node with the node's cpus; everything stops when the plan ends.",
        "# Server directory and default results: loomctl-$SLURM_JOB_ID/ in the submit directory.",
        "exec " + shlex.join(command),
    ]
    return "\n".join(lines) + "\n"


def sbatch(script: str, command: str = "sbatch", env: Mapping[str, str] | None = None) -> str:
    """Submit a script on stdin; returns the Slurm job id."""
    try:
        proc = subprocess.run([command, "--parsable"], input=script, capture_output=True, text=True,
                              env=None if env is None else dict(env), timeout=300)
    except FileNotFoundError:
        raise SlurmError(f"{command} not found: is Slurm installed here? "
                         "(--print shows the batch script instead)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{command} did not answer within 300 s") from None
    lines = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    for line in proc.stdout.splitlines():      # "123" or "123;cluster"; warnings go to stderr
        if re.fullmatch(r"\d+(;.*)?", line.strip()):
            return line.strip().split(";", 1)[0]
    raise SlurmError(f"sbatch failed (exit status {proc.returncode}): {' | '.join(lines) or 'no message'}")


#: States after which a job does nothing more (scontrol's names).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                          "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})


def job_info(job_id: str, command: str = "scontrol", env: Mapping[str, str] | None = None) -> dict | None:
    """``scontrol show job`` as a dict of its KEY=VALUE fields; None once Slurm has
    forgotten the job (MinJobAge after it ended)."""
    try:
        proc = subprocess.run([command, "show", "job", "-o", job_id], capture_output=True, text=True,
                              env=None if env is None else dict(env), timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{command} not found") from None
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():
            return None
        raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip() or proc.returncode}")
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_job(job_id: str, info: Callable[[str], dict | None] = job_info,
             sleep: Callable[[float], None] = time.sleep, first: float = 0.5, longest: float = 5.0) -> dict:
    """Poll until the job reaches a final state; returns its last fields (JobState
    UNKNOWN when Slurm forgot it first). Polls soon after submission, then less often;
    a few failed polls in a row (a busy slurmctld) are retried."""
    delay, failures = first, 0
    while True:
        try:
            fields = info(job_id)
            failures = 0
        except (SlurmError, subprocess.TimeoutExpired):
            failures += 1
            if failures >= 5:
                raise
            fields = {}
        if fields is None:
            return {"JobId": job_id, "JobState": "UNKNOWN"}
        if fields.get("JobState") in FINAL_STATES:
            return fields
        sleep(delay)
        delay = min(delay * 1.5, longest)
