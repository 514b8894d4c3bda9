"""A HyperLoom pipeline runs unchanged: wrapped arrays and indexes in Python tasks,
``wrap`` of a wrapped input, the builders' signatures and defaults, per-task errors at
submit as ``TaskFailed``, plan scripts whose tasks call the script's own helpers, and
Python-object results on the command line."""

import inspect
import json
import os
import pickle
import re
import subprocess
import sys

import cloudpickle
import numpy as np
import pytest

from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.sources import load_script
from loomctl.worker.data import Array, Index, Plain, PyObj, TaskError, to_client
from loomctl.worker.executors import ExecContext, Redirect, execute, split_cuts
from programhelp import run_config
from loomctl.worker.redirect import redirect_graph_bytes
from clihelp import ROOT, loomctl
from cluster import Cluster


@pytest.fixture
def ctx(tmp_path):
    return ExecContext(task_id=3, work_dir=str(tmp_path / "work"))


def py_call(ctx, fn, inputs=(), context=False):
    return execute(S.PY_CALL, cloudpickle.dumps(((), context)), [PyObj(fn), *inputs], ctx)


def index_of(text: bytes) -> Index:
    return Index(Plain(text), split_cuts(text, ord("\n")))


# ------------------------------------------------------------------ wrapped arrays and indexes

def test_array_input_has_len_items_and_iteration(ctx):
    seen = {}

    def fn(x):
        seen["len"] = len(x)
        seen["first"] = (x[0].read(), x[0].size(), x[0].length())
        seen["last"] = x[-1].unwrap()
        seen["nested"] = [len(x[1]), x[1][0].read()]
        seen["iterated"] = [item.size() for item in x]
        for bad in (3, -4):
            try:
                x[bad]
            except IndexError as e:
                seen.setdefault("errors", []).append(str(e))
        return "ok"

    inner = Array([Plain(b"in")])
    assert py_call(ctx, fn, [Array([Plain(b"abc"), inner, PyObj((1, 2))])]) == Plain(b"ok")
    assert seen["len"] == 3 and seen["first"] == (b"abc", 3, 0) and seen["last"] == (1, 2)
    assert seen["nested"] == [1, b"in"]
    assert seen["iterated"][:2] == [3, 2]
    assert len(seen["errors"]) == 2 and "out of range" in seen["errors"][0]


def test_index_input_behaves_like_an_array_of_pieces(ctx):
    seen = {}

    def fn(lines):
        seen["len"] = len(lines)
        seen["pieces"] = [piece.read() for piece in lines]
        seen["second"] = (lines[1].read(), lines[1].size())
        seen["all"] = lines.read()
        return [piece.read().upper() for piece in lines]

    out = py_call(ctx, fn, [index_of(b"a\nbb\nccc")])
    assert seen == {"len": 3, "pieces": [b"a\n", b"bb\n", b"ccc"], "second": (b"bb\n", 3),
                    "all": b"a\nbb\nccc"}
    assert to_client(out) == [b"A\n", b"BB\n", b"CCC"]


def test_objects_without_elements_have_length_zero(ctx):
    def fn(x, p):
        try:
            x[0]
        except IndexError:
            return [str(len(x)), str(len(p)), str(list(p))]
        return "no error"

    assert to_client(py_call(ctx, fn, [Plain(b"abc"), PyObj([1, 2])])) == [b"0", b"0", b"[]"]


def test_read_of_an_index_and_of_a_slice_of_an_index_is_the_viewed_bytes(ctx):
    lines = index_of(b"one\ntwo\nthree\nfour\n")
    part = execute(S.SLICE, S.encode_slice(1, 3), [lines], ctx)
    assert part.read() == b"two\nthree\n" and to_client(part) == b"two\nthree\n"
    empty = execute(S.SLICE, S.encode_slice(3, 1), [lines], ctx)
    assert empty.read() == b""
    seen = py_call(ctx, lambda a, b: [a.read(), b.read(), str(len(b))], [lines, part])
    assert to_client(seen) == [b"one\ntwo\nthree\nfour\n", b"two\nthree\n", b"2"]
    # every other reader of a content sees the same bytes (see loomctl(1), "data object")
    assert execute(S.MERGE, b"", [part, part], ctx).read() == b"two\nthree\ntwo\nthree\n"
    cat = run_config(ctx.work_dir, S.encode_run(["cat", "-", "f"], [None, "f"], [None]), [part, part])
    assert cat.read() == b"two\nthree\ntwo\nthree\n"
    assert to_client(execute(S.SPLIT, b"", [part], ctx).get(1)) == b"three\n"


def test_element_of_an_input_in_a_redirection_is_a_get_of_that_input(ctx):
    """x[i] in a returned sub-plan stays a reference to the input (no copy of its data)."""
    out = py_call(ctx, lambda x: tasks.merge(list(x)), [Array([Plain(b"a"), Plain(b"b")])])
    assert isinstance(out, Redirect)
    import graphfmt
    graph = graphfmt.read(redirect_graph_bytes(out.task))
    assert [graph.symbol(i) for i in range(len(graph))] == [S.TASK_INPUT, S.GET, S.GET, S.MERGE]


# ------------------------------------------------------------------ wrap

def test_wrap_of_a_wrapped_input_passes_it_through(ctx):
    text = PyObj("hello")
    out = py_call(ctx, lambda c, a: c.wrap(a), [text], context=True)
    assert out is text
    out = py_call(ctx, lambda c, a: [c.wrap(a[0]), c.wrap(c.wrap(7))], [Array([Plain(b"p")])], context=True)
    assert to_client(out) == [b"p", 7]


# ------------------------------------------------------------------ builders

# HyperLoom's builders (loom.client.tasks), their parameters and defaults
HYPERLOOM = {
    "const": "(data)",
    "merge": "(inputs, delimiter='')",
    "open": "(filename)",
    "split": "(input, char=None)",
    "save": "(input, filename)",
    "array_make": "(inputs)",
    "get": "(input, index)",
    "slice": "(input, start, end)",
    "size": "(input)",
    "length": "(input)",
    "run": "(args, inputs=(), outputs=(None,), stdin=None, request=cpu1)",
    "py_call": "(obj, inputs=(), direct_args=())",
    "py_value": "(obj)",
    "py_task": "(label=None, request=cpu1, context=False, n_direct_args=0)",
    "dslice": "(input)",
    "dget": "(input)",
    "cpus": "(n)",
}


def default_text(p) -> str:
    return "cpu1" if p.default is tasks.cpu1 else repr(p.default)


def signature_text(fn, hyperloom_only=False) -> str:
    """A builder's parameters as written in the README (no annotations); with
    ``hyperloom_only``, without the keyword-only extras that are loomctl's own."""
    parts, star = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY:
            if hyperloom_only:
                continue
            if not star:
                parts.append("*")
                star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={default_text(p)}")
    return "(" + ", ".join(parts) + ")"


@pytest.mark.parametrize("name", sorted(HYPERLOOM))
def test_builder_has_hyperloom_signature(name):
    assert signature_text(getattr(tasks, name), hyperloom_only=True) == HYPERLOOM[name]


def test_readme_table_lists_every_builder_with_its_signature():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for name in HYPERLOOM:
        row = f"| `{name}{signature_text(getattr(tasks, name))}` |"
        assert row in readme, f"README: no table row starting {row}"


def test_run_request_and_defaults():
    assert tasks.run("ls").resource_request == tasks.cpus(1)
    assert tasks.run("ls", request=tasks.cpus(4)).resource_request == tasks.cpus(4)
    assert tasks.run("ls", request=None).resource_request is None
    stdin = tasks.const("x")
    t = tasks.run("cat", [(tasks.const("y"), "f")], stdin=stdin)
    assert t.inputs[0] is stdin        # stdin comes first, as in HyperLoom
    for light in (tasks.const("a"), tasks.merge(()), tasks.split(stdin), tasks.get(stdin, 0)):
        assert light.resource_request is None
    for heavy in (tasks.save(stdin, "/tmp/x"), tasks.py_value(1), tasks.py_call(len, (stdin,))):
        assert heavy.resource_request == tasks.cpus(1)


@pytest.mark.parametrize("call,argument", [
    (lambda: tasks.const(5), "data"),
    (lambda: tasks.const(None), "data"),
    (lambda: tasks.const([b"a"]), "data"),
    (lambda: tasks.merge((), 5), "delimiter"),
    (lambda: tasks.open(3), "filename"),
    (lambda: tasks.save(tasks.const("a"), 7), "filename"),
    (lambda: tasks.split(tasks.const("a"), 10), "char"),
])
def test_non_text_arguments_are_type_errors_naming_the_argument(call, argument):
    with pytest.raises(TypeError, match=rf"\b{argument} must be bytes or str, not "):
        call()


def test_const_takes_bytes_and_str():
    assert tasks.const(b"\x00a").config == b"\x00a"
    assert tasks.const("é").config == "é".encode()


# ------------------------------------------------------------------ a cluster

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("compat"), workers=2, cpus=2)
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    with cluster.client() as c:
        yield c


def test_error_of_one_task_found_at_submit_is_task_failed(client):
    from loomctl.client import LoomError, TaskFailed
    ok = tasks.const("fine")
    bad = tasks.save(ok, "relative-name")
    bad.label = "save:relative"
    with pytest.raises(TaskFailed) as info:
        client.submit([ok, bad])
    e = info.value
    assert (e.id, e.label, e.worker) == (1, "save:relative", "")
    assert "relative-name" in e.error_msg and "not absolute" in e.error_msg and "task 1" in str(e)
    outputs = tasks.run("true", outputs=["sub/dir"])
    with pytest.raises(TaskFailed, match="bad file name 'sub/dir'"):
        client.submit_one(outputs)
    late = tasks.const("x")
    late.checkpoint_path = "relative/checkpoint"
    with pytest.raises(TaskFailed, match="checkpoint path is not absolute"):
        client.submit_one(tasks.merge((ok, late)))
    with pytest.raises(LoomError):               # not the error of a task
        client.submit(client.submit_one(ok))
    assert client.submit_one(tasks.merge((ok, ok))).gather() == b"finefine"


def test_wrapped_arrays_and_indexes_on_real_workers(client):
    @tasks.py_task()
    def reverse(lines):
        return tasks.merge(list(lines)[::-1])      # a sub-plan of gets of the input

    @tasks.py_task(context=True)
    def describe(ctx, parts, lines):
        return ctx.wrap((len(parts), parts[1].read(), [len(p) for p in parts], len(lines), lines[-1].read()))

    lines = tasks.split(tasks.const("a\nb\nc\n"))
    parts = tasks.array_make((tasks.const("x"), tasks.array_make((tasks.const("y"), tasks.const("z")))))
    light = describe(parts, lines)
    light.resource_request = None                  # runs in the worker's thread, not a child
    values = client.gather(client.submit([reverse(lines), describe(parts, lines), light]))
    assert values[0] == b"c\nb\na\n"
    assert values[1] == values[2] == (2, b"", [0, 2], 3, b"c\n")


# ------------------------------------------------------------------ plan scripts

HELPERS = '''
def double(data):
    return data + b"|" + data
'''

PLAN = '''
import cloudpickle
from graphfmt import tasks
import plan_helpers                          # a module next to this script
cloudpickle.register_pickle_by_value(plan_helpers)   # its code travels with the plan

SCALE = 3


class Words:
    def __init__(self, text):
        self.words = text.split()

    def count(self):
        return len(self.words)


def shout(text):
    return text.upper()


@tasks.py_task()
def describe(x):
    text = x.read().decode()
    return f"{shout(text)} {Words(text).count() * SCALE}\\n"


@tasks.py_task()
def later(x):
    return describe(x)                       # a sub-plan with another builder of this script


@tasks.py_task(context=True)
def as_object(ctx, x):
    return ctx.wrap(Words(x.read().decode()))


@tasks.py_task()
def count(words):
    return str(words.unwrap().count()) + "\\n"


@tasks.py_task()
def local(x):
    return plan_helpers.double(x.read())


text = tasks.const("hello plan world")
results = [describe(text), later(text), count(as_object(text)), local(text)]
'''


def test_plan_script_tasks_call_the_scripts_own_functions_and_classes(tmp_path):
    plans = tmp_path / "plans"
    plans.mkdir()
    (plans / "plan_helpers.py").write_text(HELPERS)
    (plans / "plan.py").write_text(PLAN)
    elsewhere = tmp_path / "elsewhere"       # the workers cannot import plan_helpers from here
    elsewhere.mkdir()
    proc = loomctl("run", "-q", "-n", "2", plans / "plan.py", cwd=elsewhere, check=0)   # -q: results bare
    assert proc.stdout == b"HELLO PLAN WORLD 9\nHELLO PLAN WORLD 9\n3\nhello plan world|hello plan world"
    assert "__plan__" not in sys.modules


def test_plan_script_module_is_gone_after_loading(tmp_path):
    (tmp_path / "plan.py").write_text("from graphfmt import tasks\n"
                                      "def f(x):\n    return x\n"
                                      "results = [tasks.py_call(f, (tasks.const('a'),))]\n")
    graph = load_script(str(tmp_path / "plan.py"))
    assert "__plan__" not in sys.modules
    fn = cloudpickle.loads(graph.config(0))       # by value: loads without the script
    assert fn.__name__ == "f" and fn(5) == 5


# ------------------------------------------------------------------ Python objects on the command line

OBJECTS_PLAN = '''
from graphfmt import tasks


@tasks.py_task(context=True)
def numbers(ctx):
    import numpy
    return ctx.wrap(numpy.arange(5000))


@tasks.py_task(context=True)
def pair(ctx):
    return ctx.wrap({"set", "of"})            # not JSON-able


results = [numbers(), tasks.const("text\\n"), pair()]
'''


@pytest.fixture
def objects_plan(tmp_path):
    path = tmp_path / "objects.py"
    path.write_text(OBJECTS_PLAN)
    return path


def test_python_object_results_are_written_as_pickles(objects_plan, tmp_path):
    out = tmp_path / "out"
    loomctl("run", "-n", "1", objects_plan, "-o", out, check=0)
    assert sorted(os.listdir(out)) == ["result-1.pickle", "result-2", "result-4.pickle"]
    with open(out / "result-1.pickle", "rb") as f:
        assert np.array_equal(pickle.load(f), np.arange(5000))
    assert (out / "result-2").read_bytes() == b"text\n"
    with open(out / "result-4.pickle", "rb") as f:
        assert pickle.load(f) == {"set", "of"}


def test_python_object_result_on_a_pipe_is_its_pickle(tmp_path):
    plan = tmp_path / "one.py"
    plan.write_text(OBJECTS_PLAN.replace("results = [numbers(), tasks.const(\"text\\n\"), pair()]",
                                         "results = [numbers()]"))
    proc = loomctl("run", "-n", "1", plan, check=0)
    assert np.array_equal(pickle.loads(proc.stdout), np.arange(5000))


def test_results_as_json(objects_plan):
    proc = loomctl("run", "-n", "1", "--json", objects_plan, check=0)
    document = json.loads(proc.stdout)
    assert document["status"] == "finished"
    first, second, third = document["results"]
    assert first == {"task": 1, "value": list(range(5000))}
    assert second == {"task": 2, "text": "text\n"}
    assert third["task"] == 4 and third["repr"] in ("{'set', 'of'}", "{'of', 'set'}")


def test_python_object_result_on_a_terminal_is_readable(objects_plan):
    import pty
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "loomctl", "run", "-n", "1", "-q", str(objects_plan)],
                            stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:          # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    text = b"".join(chunks).decode().replace("\r\n", "\n")
    assert re.search(r"array\(\[ *0, +1, +2, .*4999\]", text, re.S), text
    assert "text\n" in text and ("{'set', 'of'}" in text or "{'of', 'set'}" in text)
