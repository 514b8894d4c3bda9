"""``loomctl simulate``: run a plan on a simulated cluster with the real scheduler.

Invariants:
- Bad arguments (a cluster, bandwidth, latency, duration or size that does not parse)
  end in one line and exit status USAGE (2); a plan or trace that cannot be used in
  BAD_INPUT (3); a simulated job whose task fails (no worker could ever run it) in
  TASK_FAILED (1), after the figures. Nothing here opens a socket or starts a process.
- The figures are computed by ``loomctl.sim`` (defined in loomctl-simulate(1)); this
  module only parses and prints.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import typer

from graphfmt.graph import GraphError
from loomctl.cli.graph import load_graph, parse_params
from loomctl.cli.output import CliError, ExitCode, JsonOption, Output, QuietOption, human_bytes, key_values

root = typer.Typer()


@root.command()
def simulate(
    source: str = typer.Argument(..., help="Plan script (.py), TOML task file, command list, or graph file (- for stdin)."),
    workers: list[str] = typer.Option([], "--workers", "-w", help="NxC: N workers of C cpus (repeatable; required)."),
    bandwidth: str = typer.Option("1G", "--bandwidth", help="Each worker's link, bytes/s each way (1G, 125M, 10Gbit, inf)."),
    latency: str = typer.Option("100us", "--latency", help="One-way latency of every message and fetch (100us, 1ms)."),
    duration: list[str] = typer.Option([], "--duration", "-d", help="GROUP=SECONDS|uniform:LOW:HIGH|normal:MEAN:SD|lognormal:MEAN:SD (repeatable)."),
    size: list[str] = typer.Option([], "--size", help="GROUP=BYTES: result size of a label group or task type (repeatable)."),
    durations_from: Optional[str] = typer.Option(None, "--durations-from", help="Trace directory of a real run: durations and sizes per label group."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random durations and sizes."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Write a trace of the simulated run into this directory."),
    steal: bool = typer.Option(False, "--steal/--no-steal", help="Work stealing (off by default, as in the real server: loomctl server start --steal)."),
    blevel: bool = typer.Option(True, "--blevel/--no-blevel", help="Order ready tasks by b-level (critical path)."),
    spill: bool = typer.Option(True, "--spill/--no-spill", help="Let tasks leave their data's worker for an idle cpu."),
    server_time: str = typer.Option("measured", "--server-time", help="Server time charged: measured (the core's CPU time) or SECONDS per task handled."),
    param: list[str] = typer.Option([], "-p", "--param", help="KEY=VALUE for a plan script (repeatable)."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Simulate a plan on a cluster of N x C cpus: makespan, lower bound, efficiency, transfers, server time."""
    from loomctl import sim
    from loomctl.sim import model, spec
    try:
        cpus = spec.parse_workers(workers)
        link = spec.parse_bandwidth(bandwidth)
        delay = spec.parse_seconds(latency)
        durations = spec.parse_rules(duration, spec.parse_duration, "--duration")
        sizes = spec.parse_rules(size, spec.parse_bytes, "--size")
        charge = server_time if server_time == "measured" else spec.parse_seconds(server_time, "--server-time")
    except spec.SpecError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    observed = None
    if durations_from is not None:
        try:
            observed = model.observed_from_trace(durations_from)
        except spec.SpecError as exc:
            raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    graph = load_graph(source, parse_params(param))
    try:
        graph.validate()
    except GraphError as exc:
        raise CliError(f"{source}: {exc}", ExitCode.BAD_INPUT) from None

    def configure(core):
        core.options.steal, core.options.blevel, core.options.spill = steal, blevel, spill

    runs = []
    try:
        result = sim.simulate(graph, cpus, durations, sizes, seed, link, delay, observed, charge, trace,
                              configure=configure, simulation=runs)
    except OSError as exc:
        raise CliError(f"cannot write the trace into {trace}: {exc.strerror}", ExitCode.BAD_INPUT) from None
    except sim.Stalled as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    shape = Counter(cpus)
    result["cluster"] = " + ".join(f"{n}x{c}" for c, n in sorted(shape.items(), key=lambda kv: -kv[1]))
    result["scheduler"] = {"blevel": blevel, "steal": steal, "spill": spill}
    Output(json_mode, quiet).emit(result, _render, essential=f"{result['makespan_s']:.6g}")
    failure = runs[0].failure if runs else None
    if failure:
        raise CliError(f"task {failure.get('id')} ({failure.get('symbol')}) failed: {failure.get('message')}",
                       ExitCode.TASK_FAILED)


def _render(r: dict) -> str:
    return key_values([
        ("status", r["status"]),
        ("tasks", f"{r['tasks']:,}"),
        ("cluster", f"{r['cluster']} ({r['cpus']:,} cpus)"),
        ("makespan", f"{r['makespan_s']:.6g} s"),
        ("lower bound", f"{r['lower_bound_s']:.6g} s (critical path {r['critical_path_s']:.6g} s, "
                        f"work {r['work_s']:.6g} cpu-s)"),
        ("makespan / bound", f"{r['makespan_over_bound']:.3f}"),
        ("efficiency", f"{r['efficiency']:.3f}"),
        ("transferred", f"{human_bytes(r['transferred_bytes'])} in {r['transfers']:,} fetches"),
        ("server busy", f"{r['server_busy_s']:.3f} s ({r['server_us_per_task']:.1f} us/task, "
                        f"{r['rounds']:,} rounds, {r['reports']:,} reports)"),
        ("work stealing", f"{r['stolen']:,} tasks moved ({r['steal_requests']:,} requests)"),
        ("simulated in", f"{r['wall_s']:.2f} s"),
    ])
