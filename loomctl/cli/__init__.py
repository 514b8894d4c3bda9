"""The ``loomctl`` command: one typer app assembled from one module per noun.

Invariants:
- main() turns every expected failure (a usage error, CliError, GraphError, a lost
  server, Ctrl-C) into one line on stderr, escaped and cut to a length, and a
  documented exit code; a closed stdout ends quietly with status 141. A traceback
  means a bug.
"""

from __future__ import annotations

import os
import re
import sys

import typer

try:   # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:   # pragma: no cover (older typer on click)
    from click.exceptions import UsageError
    from click.exceptions import NoArgsIsHelpError  # click >= 8.2

from loomctl import __version__
from loomctl.cli import graph, job, run, server, simulate, slurm, trace, worker
from graphfmt.graph import GraphError
from graphfmt.sources import PlanError
from loomctl.cli.output import CliError, ExitCode
from loomctl.textfmt import shorten

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


def main(args: list[str] | None = None) -> None:
    """Run one command; every expected failure ends in one line and an ExitCode.

    The click command is driven here rather than by typer's standalone mode, which
    would print usage errors as boxed help, swallow Ctrl-C into a bare 130 and turn a
    closed stdout into status 1."""
    if os.environ.get("_LOOMCTL_COMPLETE"):
        app(prog_name="loomctl")   # shell completion: answers and exits
    command = typer.main.get_command(app)
    try:
        with command.make_context("loomctl", list(sys.argv[1:] if args is None else args)) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:      # --help, --version, and commands that end early
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:   # `loomctl`, `loomctl job`: the help, as a usage error
        text = exc.ctx.get_help()      # typer's rich help prints itself and returns ""
        if text:
            sys.stdout.write(text + "\n")
        sys.exit(ExitCode.USAGE)
    except UsageError as exc:
        _fail(usage_message(exc), ExitCode.USAGE)
    except CliError as exc:
        _fail(str(exc), exc.code)
    except (GraphError, PlanError) as exc:
        _fail(str(exc), ExitCode.BAD_INPUT)
    except BrokenPipeError:
        # the reader went away (`loomctl ... | head`): end quietly with the status a shell
        # gives a program killed by SIGPIPE; stdout goes to /dev/null so that the final
        # flush at exit cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(ExitCode.PIPE_CLOSED)
    except (KeyboardInterrupt, typer.Abort):
        _fail("interrupted", ExitCode.INTERRUPTED)
    except Exception as exc:
        client = sys.modules.get("loomctl.client")   # loaded by every command that talks to a server
        if client is not None and isinstance(exc, client.LoomConnectionError):
            _fail(str(exc), ExitCode.UNAVAILABLE)
        raise
    sys.exit(ExitCode.OK)


def usage_message(exc: UsageError) -> str:
    """One line for a usage error: the command, click's message, where to read more."""
    message = exc.format_message().strip().replace(". Did you mean", "; did you mean").rstrip(".")
    message = message[:1].lower() + message[1:]
    possible = re.search(r" \(Possible options: (.*)\)$", message)
    if possible:   # click's wording for a mistyped option
        message = message[:possible.start()] + f"; did you mean {possible.group(1).replace(', ', ' or ')}?"
    path = exc.ctx.command_path if exc.ctx is not None else "loomctl"
    where = path.split(" ", 1)[1] + ": " if " " in path else ""
    return f"{where}{message} (see '{path} --help')"


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"loomctl: error: {shorten(message)}\n")
    sys.stderr.flush()
    sys.exit(int(code))
