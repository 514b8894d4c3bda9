"""``loomctl server start | stop``: the server in the foreground, and stopping it.

Invariants: ``start`` writes the access file into the server directory and removes it
on exit, and always logs (INFO, on stderr) where it listens with its server directory
when it starts and why it stopped when it stops normally (SIGTERM, Ctrl-C, a client's
terminate); ``stop`` finds the server through that file and stops it and its workers.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Optional

import typer

from loomctl.access import server_dir as resolve_server_dir
from loomctl.cli.common import ServerDirOption, connect
from loomctl.cli.output import CliError, ExitCode, JsonOption, Output, QuietOption, SafeFormatter

app = typer.Typer(help="Start and stop the server.", no_args_is_help=True)
log = logging.getLogger("loomctl.cli.server")


@app.command()
def start(
    server_dir: Optional[str] = ServerDirOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(9010, "--port", help="Port to listen on (0: any free port)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Accept peers without the secret (trusted networks only)."),
    heartbeat_timeout: float = typer.Option(30.0, "--heartbeat-timeout", min=0.5, help="Seconds a worker may be silent (no heartbeat; they are sent every 0.5 s) before it counts as lost; a closed connection counts at once. A dropped worker that comes back joins again with its data."),
    trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="Directory for traces of jobs that ask for one."),
    journal: Optional[str] = typer.Option(None, "--journal", help="The journal file (default: journal in the server directory); a journal with live jobs is restored at start."),
    no_journal: bool = typer.Option(False, "--no-journal", help="Keep no journal: a restarted server knows no job."),
    restore_wait: float = typer.Option(5.0, "--restore-wait", min=0, help="Seconds a restored server waits for its workers to bring their data back before computing what is missing."),
    steal: bool = typer.Option(False, "--steal/--no-steal", help="Work stealing: while cpus idle and no ready task waits, loaded workers give back queued tasks that have not started."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every job and worker event."),
):
    """Run the server in the foreground (logs go to stderr)."""
    from loomctl.server.process import Server
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    log.setLevel(logging.INFO)   # the start and the stop are always logged
    logging.getLogger("loomctl.server.lifecycle").setLevel(logging.INFO)
    directory = resolve_server_dir(server_dir)
    from loomctl.server.journal import JournalError
    journal_path = None if no_journal else os.path.abspath(journal or os.path.join(directory, "journal"))
    try:
        server = Server(host=host, port=port, server_dir=directory, auth=not no_auth,
                        heartbeat_timeout=heartbeat_timeout, trace_dir=trace_dir, journal=journal_path,
                        restore_wait=restore_wait, steal=steal)
    except JournalError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    except Exception as exc:   # OSError; zmq.ZMQError (address in use) is not one
        raise CliError(f"cannot start the server: {exc}", ExitCode.UNAVAILABLE) from None
    log.info("listening on %s:%d (pid %d, authentication %s); server directory %s", server.host, server.port,
             os.getpid(), "on" if server.secret else "OFF", directory)
    why = []

    def on_signal(signum, frame):
        why.append(signal.Signals(signum).name)
        server.running = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server.serve()
    except Exception as exc:
        log.exception("the server failed")
        raise CliError(f"the server failed: {exc}", ExitCode.UNAVAILABLE) from None
    log.info("stopped (%s)", why[0] if why else "a client asked it to terminate")


@app.command()
def stop(server_dir: Optional[str] = ServerDirOption, json_mode: bool = JsonOption, quiet: bool = QuietOption):
    """Stop the server and all its workers."""
    client = connect(server_dir)
    client.terminate()
    Output(json_mode, quiet).emit({"stopped": True}, lambda d: "server stopped")
