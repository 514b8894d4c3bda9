"""Graph-file commands: build, add, inspect, cat.

Invariants:
- Reading "-" means standard input and writing "-" means standard output; nothing else
  is printed on stdout when a graph goes there.
- Every bad input ends in CliError (one line); no command leaves a partly written
  output file behind (writes go to a temporary file that is renamed at the end).
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

import numpy as np
import typer

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.graph import Graph, GraphError, VarBytes, offsets_from_lengths
from graphfmt.sources import PlanError, check_file
from loomctl.cli.common import AsOption, load_graph, parse_params
from loomctl.cli.output import (CliError, ExitCode, JsonOption, Output, QuietOption, escape, key_values, plural, table,
                                write_file)

app = typer.Typer()


def write_graph(graph: Graph, dest: str) -> None:
    if dest == "-":
        if sys.stdout.isatty():
            raise CliError("refusing to write a binary graph to a terminal; use -o FILE or a pipe", ExitCode.USAGE)
        graphfmt.write("-", graph)
        return
    write_file(dest, lambda f: graphfmt.write(f, graph))


@app.command()
def build(
    source: str = typer.Argument(..., help="Plan script (.py), TOML task file (.toml), command list (.txt: one shell "
                                 "command per line), or graph file; - reads a command list from stdin."),
    output: str = typer.Option("-", "-o", "--output", help="Graph file to write; - for stdout (the default)."),
    param: List[str] = typer.Option([], "-p", "--param", help="KEY=VALUE passed to a plan script in its 'params' dict (repeatable)."),
    as_: Optional[str] = AsOption,
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Build a graph file from a plan script, a TOML task file or a command list."""
    graph = load_graph(source, parse_params(param), as_, stdin_kind="commands")
    write_graph(graph, output)
    if output != "-":
        data = {"output": output, "tasks": len(graph), "results": int(len(graph.result_ids()))}
        Output(json_mode, quiet).emit(
            data, lambda d: f"wrote {plural(d['tasks'], 'task')} ({plural(d['results'], 'result')}) to {d['output']}")


ADD_KINDS = ("const", "open", "merge", "split", "save", "array", "get", "slice", "size", "length", "run")


@app.command()
def add(
    file: str = typer.Argument(..., help="Graph file to append to (created when missing)."),
    kind: str = typer.Argument(..., help=f"Task kind: {', '.join(ADD_KINDS)}."),
    args: List[str] = typer.Argument(None, help="const: TEXT; open: PATH; merge/array: IDS; split/size/length: ID; "
                                     "save: ID PATH; get: ID INDEX; slice: ID START END; run: a shell line, or -- PROGRAM ARGS..."),
    stdin: Optional[int] = typer.Option(None, "--stdin", help="run: task id whose data feeds standard input."),
    input_: List[str] = typer.Option([], "--input", "-i", help="run: ID:NAME, the data of task ID as file NAME ($NAME: a variable)."),
    output_: List[str] = typer.Option([], "--output", help="run: a file the program writes (default: its stdout); repeatable."),
    delimiter: str = typer.Option("", "--delimiter", "-d", help="merge: text between inputs; split: the delimiter byte."),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="Label of the task."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="Cpus the task reserves (run and save default to 1)."),
    result: bool = typer.Option(False, "--result", help="Mark the task as a result of the plan (a plan without marked results returns its sinks)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Absolute path where the finished result is saved."),
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Append one task to a graph file and print its id (for building plans in shell scripts)."""
    args = list(args or [])
    refs = _Refs()
    try:
        task = _make_task(kind, args, refs, stdin, input_, output_, delimiter)
    except (ValueError, IndexError) as exc:
        raise CliError(f"add {kind}: {exc}", ExitCode.USAGE) from None
    task.label = label
    if cpus is not None:
        task.resource_request = tasks.cpus(cpus) if cpus else None
    if checkpoint:
        if not os.path.isabs(checkpoint):
            raise CliError("--checkpoint must be an absolute path", ExitCode.USAGE)
        task.checkpoint_path = checkpoint
    input_ids = [S.decode_u64(x.config) for x in task.inputs]
    graph = _one_task_graph(task, input_ids, result)
    try:
        if os.path.lexists(file):
            check_file(file)
        existing = graphfmt.read(file, validate=False) if os.path.exists(file) and os.path.getsize(file) else None
        size = len(existing) if existing is not None else 0
        missing = [i for i in input_ids if i >= size]
        if missing:
            raise CliError(f"add {kind}: task {missing[0]} does not exist in {file} ({size} tasks)", ExitCode.USAGE)
        new_id = graphfmt.append(file, graph)
    except PlanError as exc:
        raise CliError(str(exc)) from None
    except GraphError as exc:
        raise CliError(f"{file}: {exc}") from None
    Output(json_mode, quiet).emit({"id": new_id}, lambda d: str(d["id"]), essential=new_id)


def _one_task_graph(task: tasks.Task, input_ids: list[int], result: bool) -> Graph:
    """A Graph of the single task ``task`` whose inputs are ids of an existing file."""
    rr = task.resource_request
    requests = [rr.to_dict()] if rr is not None and (rr.cpus or rr.resources) else []
    return Graph(
        symbols=[task.task_type], types=np.zeros(1, np.uint16),
        input_offsets=offsets_from_lengths(np.array([len(input_ids)])),
        inputs=np.array(input_ids, dtype=np.int64), configs=VarBytes.from_list([task.config]),
        flags=np.array([1 if result else 0], np.uint8),
        request_codes=np.array([1 if requests else 0], np.uint16), requests=requests,
        label_codes=np.array([1 if task.label else 0], np.uint32), labels=[task.label] if task.label else [],
        checkpoints=VarBytes.from_list([task.checkpoint_path.encode()]) if task.checkpoint_path else None)


class _Refs:
    """Task ids typed on the command line, as placeholder inputs carrying the id."""

    def __init__(self):
        self.placeholders: dict[int, tasks.Task] = {}

    def task(self, text: str) -> tasks.Task:
        try:
            task_id = int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a task id") from None
        if task_id < 0:
            raise ValueError(f"{task_id} is not a task id")
        return self.placeholders.setdefault(task_id, tasks.Task(S.FUTURE, (), S.encode_u64(task_id)))


def _make_task(kind, args, refs, stdin, inputs, outputs, delimiter) -> tasks.Task:
    def need(count):
        if len(args) != count:
            raise ValueError(f"expects {count} argument(s), got {len(args)}")

    if kind == "const":
        need(1)
        return tasks.const(args[0])
    if kind == "open":
        need(1)
        return tasks.open(os.path.abspath(args[0]))
    if kind in ("merge", "array"):
        ins = [refs.task(a) for a in args]
        return tasks.merge(ins, delimiter) if kind == "merge" else tasks.array_make(ins)
    if kind in ("split", "size", "length"):
        need(1)
        if kind == "split":
            return tasks.split(refs.task(args[0]), delimiter or None)
        return getattr(tasks, kind)(refs.task(args[0]))
    if kind == "save":
        need(2)
        return tasks.save(refs.task(args[0]), os.path.abspath(args[1]))
    if kind == "get":
        need(2)
        return tasks.get(refs.task(args[0]), int(args[1]))
    if kind == "slice":
        need(3)
        return tasks.slice(refs.task(args[0]), int(args[1]), int(args[2]))
    if kind == "run":
        if not args:
            raise ValueError("needs a command")
        # one argument is a shell line (as TOML `command` and command lists); several are
        # the program and its arguments, run without a shell
        command = ["sh", "-c", args[0]] if len(args) == 1 else args
        pairs = []
        if stdin is not None:
            pairs.append((refs.task(str(stdin)), None))
        for spec in inputs:
            task_id, sep, name = spec.partition(":")
            if not sep or not name:
                raise ValueError(f"--input {spec!r} is not ID:NAME")
            pairs.append((refs.task(task_id), name))
        return tasks.run(command, pairs, outputs or [None])
    raise ValueError(f"unknown kind; choose one of {', '.join(ADD_KINDS)}")


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Graph file, plan source, or - for a graph on stdin."),
    dot: bool = typer.Option(False, "--dot", help="Print the graph in Graphviz DOT instead of a summary."),
    as_: Optional[str] = AsOption,
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Validate a graph and summarise it: task types, results, sources, depth, critical path."""
    graph = load_graph(source, kind=as_)
    if dot:
        sys.stdout.write(to_dot(graph))
        return
    stats = graph.stats()
    stats["source"] = source
    Output(json_mode, quiet).emit(stats, _render_stats, essential=stats["tasks"])


def _render_stats(s: dict) -> str:
    path = " -> ".join(map(str, s["critical_path"])) + (" -> ..." if s["critical_path_length"] > 20 else "")
    summary = key_values([
        ("source", s["source"]), ("tasks", s["tasks"]), ("results", s["results"]),
        ("sources", s["sources"]), ("sinks", s["sinks"]), ("edges", s["edges"]), ("depth", s["depth"]),
        ("critical path", f"{s['critical_path_length']} tasks: {path}"),
        ("config bytes", s["config_bytes"]), ("cpu requests", s["cpu_requests"]),
        ("checkpoints", s["checkpoints"]), ("valid", "yes"),
    ])
    return summary + "\n\n" + table(list(s["types"].items()), ["task type", "count"])


def to_dot(graph: Graph) -> str:
    lines = ["digraph loom {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    results = graph.flags & 1
    for i in range(len(graph)):
        name = graph.symbol(i).rsplit("/", 1)[-1]
        label = graph.label(i)
        text = f"{i}: {name}" + (f"\\n{_dot_escape(label)}" if label else "")
        style = ", style=bold, peripheries=2" if results[i] else ""
        lines.append(f'  t{i} [label="{text}"{style}];')
    owners = np.repeat(np.arange(len(graph)), np.diff(graph.input_offsets))
    lines.extend(f"  t{src} -> t{dst};" for src, dst in zip(graph.inputs.tolist(), owners.tolist()))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return escape(text.replace("\\", "\\\\").replace('"', '\\"'))


@app.command()
def cat(
    sources: List[str] = typer.Argument(..., help="Graph files or plan sources to compose, in order (- for a graph on stdin)."),
    output: str = typer.Option("-", "-o", "--output", help="Graph file to write; - for stdout (the default)."),
    as_: Optional[str] = AsOption,
    json_mode: bool = JsonOption, quiet: bool = QuietOption,
):
    """Compose graphs into one file; ids of each later graph are offset so they never clash."""
    graphs = [load_graph(s, kind=as_) for s in sources]
    graph = Graph.concat(graphs)
    write_graph(graph, output)
    if output != "-":
        offsets = np.cumsum([0] + [len(g) for g in graphs[:-1]]).tolist()
        data = {"output": output, "tasks": len(graph), "offsets": dict(zip(sources, offsets))}
        Output(json_mode, quiet).emit(data, lambda d: f"wrote {plural(d['tasks'], 'task')} to {d['output']}")
