"""``loomctl trace summary | timeline | export``: reports from a trace directory.

Invariants:
- Every command reads the directory with ``loomctl.trace.reader.read_trace``; a trace
  that cannot be used ends in one line and exit status BAD_INPUT (3), a partly written
  one is reported with its notes (on stderr for timeline and export).
- Nothing here needs a server: a trace directory is all it reads.
"""

from __future__ import annotations

import json
import os
import sys

import typer

from loomctl.cli.output import (CliError, ExitCode, JsonOption, Output, QuietOption, check_output_file, note,
                                write_file)

app = typer.Typer(help="Analyse a trace directory: summary tables, a timeline picture, Chrome/Perfetto export.",
                  no_args_is_help=True)

DirArgument = typer.Argument(..., help="Trace directory (written with submit/run --trace).")
PICTURE_FORMATS = {".html": "html", ".htm": "html", ".svg": "svg", ".png": "png"}


def _read(directory: str):
    from loomctl.trace.reader import TraceError, read_trace
    try:
        return read_trace(directory)
    except TraceError as exc:
        raise CliError(str(exc), ExitCode.BAD_INPUT) from None
    except OSError as exc:   # e.g. a directory this user may not list
        raise CliError(f"{directory}: cannot read: {exc.strerror}", ExitCode.BAD_INPUT) from None


def _notes(trace) -> None:
    for text in trace.notes:
        note(text)


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_file(path, lambda f: f.write(text.encode()))


@app.command()
def summary(
    directory: str = DirArgument,
    rows: int = typer.Option(30, "--rows", min=1, help="At most this many rows per table in text mode."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Tables: tasks per type and label group, workers, transfers, scheduler, critical path."""
    from loomctl.trace import report
    trace = _read(directory)
    data = report.summary(trace, path_limit=None)
    shown = dict(data, critical_path=report.critical_path(trace, limit=2 * (rows // 2) or 2))
    Output(json_mode, quiet).emit(data, lambda d: report.render(shown, max_rows=rows),
                                  essential=data["tasks"]["count"])


@app.command()
def timeline(
    directory: str = DirArgument,
    output: str = typer.Option(..., "--output", "-o", help="Picture file: .html, .svg or .png (PNG needs matplotlib); - writes SVG to stdout."),
    width: int = typer.Option(1400, "--width", min=400, help="Width of the picture in pixels."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Draw a Gantt chart (one row per worker cpu slot, coloured by label group) with utilisation beneath."""
    from loomctl.trace import report, timeline as tl
    if output != "-":
        check_output_file(output)
    kind = "svg" if output == "-" else PICTURE_FORMATS.get(os.path.splitext(output)[1].lower())
    if kind is None:
        raise CliError(f"{output}: unknown picture type (use a .html, .svg or .png file name)", ExitCode.USAGE)
    trace = _read(directory)
    _notes(trace)
    lay = tl.layout(trace)
    if kind == "png":
        try:
            tl.to_png(lay, output, width)
        except tl.MissingDependency as exc:
            raise CliError(str(exc), ExitCode.USAGE) from None
        except OSError as exc:
            raise CliError(f"cannot write {output}: {exc.strerror}", ExitCode.BAD_INPUT) from None
    else:
        svg = tl.to_svg(lay, width)
        _write(output, tl.to_html(lay, svg, report.summary(trace)) if kind == "html" else svg)
    if output != "-":
        info = {"output": output, "format": kind, "tasks": len(trace.tasks), "rows": len(lay.rows)}
        Output(json_mode, quiet).emit(info, lambda d: f"wrote {d['output']}: {d['tasks']} tasks on {d['rows']} rows",
                                      essential=output)


@app.command()
def export(
    directory: str = DirArgument,
    output: str = typer.Option(..., "--output", "-o", "--chrome",
                               help="File for the Chrome Trace Event JSON (Perfetto, chrome://tracing), or - for stdout; "
                                    "--chrome is another name for it."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Export the trace for other viewers (Chrome Trace Event JSON)."""
    from loomctl.trace.chrome import chrome_events
    if output != "-":
        check_output_file(output)
    trace = _read(directory)
    _notes(trace)
    document = chrome_events(trace)
    _write(output, json.dumps(document, separators=(",", ":")))
    if output != "-":
        info = {"output": output, "events": len(document["traceEvents"])}
        Output(json_mode, quiet).emit(info, lambda d: f"wrote {d['output']}: {d['events']} events", essential=output)
