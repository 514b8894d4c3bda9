"""Plans from files: graph files, Python plan scripts, TOML task files, command lists.

Invariants:
- ``plan_kind`` decides what a file is: the graph file magic number first, then the
  name (.loom graph, .py script, .toml task file, .txt command list), or the kind the
  caller names. A file that claims to be a graph file and is not one is an error.
- Every loader returns a Graph whose result flags mark what the user asked for, or
  raises PlanError with one line naming the file (and task) at fault.
- A plan script runs with a global ``params`` (dict of the ``-p KEY=VALUE`` strings)
  and must define a module-level ``results``: a Task or a sequence of Tasks.
- A plan script runs as the module ``__plan__``, registered with cloudpickle to be
  pickled by value while it runs: its functions and classes travel inside the plan
  (workers cannot import the script). The module is gone from ``sys.modules`` after.
- Relative file names in a TOML task file are relative to that file's directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import traceback
import types

import cloudpickle

import graphfmt
from graphfmt import tasks
from graphfmt.fileformat import MAGIC
from graphfmt.graph import Graph
from graphfmt.plan import as_task_list, build_graph


class PlanError(Exception):
    """A plan source could not be turned into a graph."""


KINDS = ("graph", "script", "toml", "commands")
EXTENSIONS = {".loom": "graph", ".py": "script", ".toml": "toml", ".txt": "commands"}


def check_file(path: str) -> None:
    """PlanError unless ``path`` is a regular file this process can read: a directory, a
    fifo (which would block), a device or an unreadable file is refused at once."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PlanError(f"{path}: no such file") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        what = ("a directory" if stat.S_ISDIR(mode) else "a fifo" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise PlanError(f"{path}: is {what}, not a regular file (- reads standard input)")
    if not os.access(path, os.R_OK):
        raise PlanError(f"{path}: cannot read: permission denied")


def plan_kind(path: str, kind: str | None = None, stdin_kind: str = "graph") -> str:
    """What ``path`` holds: ``kind`` when given; for "-" (standard input) ``stdin_kind``;
    a file that starts with the graph file magic number is a graph file whatever its
    name; otherwise its extension says (see EXTENSIONS). A ``.loom`` file without the
    magic number, or a name without a known extension, is a PlanError: a damaged or
    misnamed graph file is never read (let alone run) as another kind of plan."""
    if kind is not None and kind not in KINDS:
        raise PlanError(f"unknown kind of plan source {kind!r}; choose one of {', '.join(KINDS)}")
    if path == "-":
        return kind or stdin_kind
    check_file(path)
    if kind is not None:
        return kind
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    if head and MAGIC.startswith(head):   # the magic number, or a cut-short graph file
        return "graph"
    kind = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if kind == "graph":
        raise PlanError(f"{path}: not a graph file (wrong magic number)")
    if kind is None:
        raise PlanError(f"{path}: not a graph file, and its name does not say which plan source it is "
                        f"(.py plan script, .toml task file, .txt command list)")
    return kind


def load_source(path: str, kind: str, params: dict[str, str] | None = None) -> Graph:
    """The graph of a source whose kind ``plan_kind`` found; GraphError or PlanError."""
    if kind == "graph":
        return graphfmt.read(path)
    if kind == "script":
        return load_script(path, params)
    if kind == "toml":
        return load_toml(path)
    return load_lines(path)


def load_script(path: str, params: dict[str, str] | None = None) -> Graph:
    if not os.path.isfile(path):
        raise PlanError(f"plan script {path} does not exist")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        # the script's prints go to stderr: stdout may be carrying the graph (-o -)
        with contextlib.redirect_stdout(sys.stderr):
            namespace = _run_plan_module(path, dict(params or {}))
    except SystemExit as exc:
        raise PlanError(f"plan script {path} exited ({exc.code}) instead of defining results") from None
    except BaseException as exc:   # the user's code: report it in one line
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f" at line {frame.lineno}" if frame.filename == path or frame.filename.endswith(os.path.basename(path)) else ""
        raise PlanError(f"plan script {path} raised {type(exc).__name__}{where}: {exc}") from None
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if "results" not in namespace:
        raise PlanError(f"plan script {path} defines no 'results' (a task or a list of tasks)")
    return graph_of_results(namespace["results"], f"plan script {path}")


PLAN_MODULE = "__plan__"


def _run_plan_module(path: str, params: dict) -> dict:
    """Run the script as module ``__plan__``, pickled by value; its namespace."""
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType(PLAN_MODULE)
    module.__file__ = path
    module.params = params
    saved = sys.modules.get(PLAN_MODULE)
    sys.modules[PLAN_MODULE] = module
    cloudpickle.register_pickle_by_value(module)
    try:
        exec(code, module.__dict__)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        if saved is None:
            sys.modules.pop(PLAN_MODULE, None)
        else:
            sys.modules[PLAN_MODULE] = saved
    return module.__dict__


def graph_of_results(results, origin: str) -> Graph:
    items = as_task_list(results)
    for k, item in enumerate(items):
        if not isinstance(item, tasks.Task):
            raise PlanError(f"{origin}: results[{k}] is a {type(item).__name__}, not a Task")
    if not items:
        raise PlanError(f"{origin}: results is empty")
    try:
        return build_graph(items)[0]
    except TypeError as exc:
        raise PlanError(f"{origin}: {exc}") from None


def load_lines(path: str) -> Graph:
    """One ``run`` task per non-empty, non-comment line, run by ``sh -c``; every task
    is a result (its standard output)."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.buffer.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as exc:
        raise PlanError(f"cannot read command list {name}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise PlanError(f"command list {name} is not UTF-8 text (byte {exc.start})") from None
    lines = text.splitlines()
    results = []
    for number, line in enumerate(lines, 1):
        command = line.strip()
        if not command or command.startswith("#"):
            continue
        task = tasks.run(["sh", "-c", command])
        task.label = f"line:{number}"
        results.append(task)
    if not results:
        raise PlanError(f"command list {name} has no commands")
    return build_graph(results)[0]


def load_toml(path: str) -> Graph:
    try:
        import tomllib
    except ImportError:   # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise PlanError(f"cannot read task file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"task file {path} is not valid TOML: {exc}") from None
    specs = document.get("task")
    if not isinstance(specs, dict) or not specs:
        raise PlanError(f"task file {path} has no [task.NAME] tables")
    return _TomlPlan(path, specs).graph()


_TOML_KEYS = {"command", "args", "stdin", "inputs", "outputs", "after", "label", "cpus", "result",
              "checkpoint"}


class _TomlPlan:
    def __init__(self, path: str, specs: dict):
        self.path, self.specs = path, specs
        self.base = os.path.dirname(os.path.abspath(path))
        self.built: dict[str, tasks.Task] = {}
        self.building: set[str] = set()
        self.files: dict[str, tasks.Task] = {}
        self.picks: dict[tuple[str, str], tasks.Task] = {}   # (task, output) -> its get task

    def fail(self, name: str, message: str):
        raise PlanError(f"task file {self.path}: task {name!r}: {message}")

    def graph(self) -> Graph:
        for name in self.specs:
            self.task(name)
        consumed = {id(x) for t in [*self.built.values(), *self.picks.values()] for x in t.inputs}
        results = [t for name, t in self.built.items()
                   if self.specs[name].get("result", id(t) not in consumed)]
        return build_graph(results)[0]

    def source(self, owner: str, ref) -> tasks.Task:
        """'@name' is another task's output, '@name/file' the output ``file`` of a task
        with several; anything else is a file path."""
        if not isinstance(ref, str) or not ref:
            self.fail(owner, f"input {ref!r} must be '@task', '@task/file' or a file path")
        if ref.startswith("@"):
            name, sep, output = ref[1:].partition("/")
            task = self.task(name, owner)
            if not sep:
                return task
            outputs = self.specs[name].get("outputs", [None])
            if output not in outputs:
                listed = ", ".join(repr(o) for o in outputs if o is not None) or "none (it gives its standard output)"
                self.fail(owner, f"input {ref!r}: task {name!r} has no output {output!r}; its outputs: {listed}")
            if len(outputs) == 1:
                return task
            key = (name, output)
            if key not in self.picks:
                self.picks[key] = tasks.get(task, outputs.index(output))
            return self.picks[key]
        path = os.path.normpath(os.path.join(self.base, ref))
        if path not in self.files:
            self.files[path] = tasks.open(path)
        return self.files[path]

    def task(self, name: str, wanted_by: str | None = None) -> tasks.Task:
        if name in self.built:
            return self.built[name]
        spec = self.specs.get(name)
        if not isinstance(spec, dict):
            self.fail(wanted_by or name, f"depends on unknown task {name!r}")
        if name in self.building:
            self.fail(name, "is part of a dependency cycle")
        unknown = set(spec) - _TOML_KEYS
        if unknown:
            self.fail(name, f"unknown key(s) {', '.join(sorted(unknown))}")
        self.building.add(name)
        if ("command" in spec) == ("args" in spec):
            self.fail(name, "needs exactly one of 'command' (a shell line) or 'args' (a list)")
        if "command" in spec:
            if not isinstance(spec["command"], str):
                self.fail(name, "'command' must be a string")
            args = ["sh", "-c", spec["command"]]
        else:
            args = spec["args"]
            if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
                self.fail(name, "'args' must be a non-empty list of strings")
        pairs = []
        if "stdin" in spec:
            pairs.append((self.source(name, spec["stdin"]), None))
        inputs = spec.get("inputs", {})
        if not isinstance(inputs, dict):
            self.fail(name, "'inputs' must be a table of file name = '@task' or path")
        for filename, ref in inputs.items():
            if "/" in filename or not filename:
                self.fail(name, f"input file name {filename!r} must be a plain name")
            pairs.append((self.source(name, ref), filename))
        after = spec.get("after", [])
        if not isinstance(after, list):
            self.fail(name, "'after' must be a list of task names")
        for k, other in enumerate(after):
            pairs.append((self.task(str(other), name), f"$_after{k}"))
        outputs = spec.get("outputs", [None])
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs) and outputs != [None]:
            self.fail(name, "'outputs' must be a list of file names")
        task = tasks.run(args, pairs, outputs)
        task.label = str(spec.get("label", name))
        cpus = spec.get("cpus", 1)
        if not isinstance(cpus, int) or cpus < 0:
            self.fail(name, "'cpus' must be a non-negative integer")
        task.resource_request = tasks.cpus(cpus) if cpus else None
        if "checkpoint" in spec:
            task.checkpoint_path = os.path.normpath(os.path.join(self.base, spec["checkpoint"]))
        self.building.discard(name)
        self.built[name] = task
        return task
