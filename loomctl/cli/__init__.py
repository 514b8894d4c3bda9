"""The ``loomctl`` command: one typer app assembled from one module per noun.

Invariants:
- main() turns every expected failure (CliError, GraphError, a closed pipe, Ctrl-C)
  into one line on stderr and a documented exit code; a traceback means a bug.
"""

from __future__ import annotations

import os
import sys

import typer

from loomctl import __version__
from loomctl.cli import graph, job, run, server, simulate, slurm, trace, worker
from loomctl.cli.output import CliError, ExitCode

app = typer.Typer(
    name="loomctl",
    help="Run pipelines of many interconnected tasks: build graph files, run servers and workers, submit jobs, analyse traces.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.registered_commands.extend(graph.app.registered_commands)
app.registered_commands.extend(job.root.registered_commands)
app.registered_commands.extend(run.root.registered_commands)
app.registered_commands.extend(simulate.root.registered_commands)
app.add_typer(server.app, name="server")
app.add_typer(worker.app, name="worker")
app.add_typer(job.app, name="job")
app.add_typer(slurm.app, name="slurm")
app.add_typer(trace.app, name="trace")


def _version(value: bool):
    if value:
        print(f"loomctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """loomctl: a task-graph engine compatible with HyperLoom."""


def main() -> None:
    try:
        app()
    except CliError as exc:
        _fail(str(exc), exc.code)
    except BrokenPipeError:
        # the reader went away (e.g. `loomctl ... | head`): exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(ExitCode.OK)
    except KeyboardInterrupt:
        _fail("interrupted", ExitCode.INTERRUPTED)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"loomctl: error: {message}\n")
    sys.exit(int(code))
