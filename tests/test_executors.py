"""Built-in task types and extensions executed directly (no worker, no network)."""

import logging
import os
import sys

import cloudpickle
import numpy as np
import pytest

from graphfmt import symbols as S
from loomctl.worker import extensions
from loomctl.worker.data import Array, FileObj, Index, Plain, PyObj, TaskError, to_client
from loomctl.worker.executors import (ExecContext, Redirect, WrappedData, _BUILTINS,
                                      execute, split_cuts)
from loomctl.worker.runs import substitute_variables
from programhelp import remove_spares, run_config


@pytest.fixture
def ctx(tmp_path):
    return ExecContext(task_id=7, work_dir=str(tmp_path / "work"))


def ex(ctx, symbol, config=b"", inputs=()):
    return execute(symbol, config, list(inputs), ctx)


def run(ctx, args, inputs=(), map_inputs=(), outputs=(None,)):
    return run_config(ctx.work_dir, S.encode_run(args, list(map_inputs), list(outputs)), inputs,
                      ctx.keep_failed_dirs, ctx.task_id)


def nothing_left(work_dir) -> bool:
    """No run directory left once the spare (empty) ones are removed, as at worker exit."""
    remove_spares(work_dir)
    return os.listdir(work_dir) == []


def index_of(text: bytes) -> Index:
    return Index(Plain(text), split_cuts(text, ord("\n")))


# ------------------------------------------------------------------ simple built-ins

def test_const(ctx):
    assert ex(ctx, S.CONST, b"abc") == Plain(b"abc")


def test_merge_with_delimiter_and_mixed_inputs(ctx, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"F")
    inputs = [Plain(b"a"), FileObj(str(f)), index_of(b"x\ny\n").slice(1, 2)]
    assert ex(ctx, S.MERGE, b", ", inputs) == Plain(b"a, F, y\n")
    assert ex(ctx, S.MERGE, b"", [Plain(b"a"), Plain(b"b")]) == Plain(b"ab")
    assert ex(ctx, S.MERGE, b"-", []) == Plain(b"")


def test_merge_rejects_arrays(ctx):
    with pytest.raises(TaskError, match="merge input 1 is an array"):
        ex(ctx, S.MERGE, b"", [Plain(b"a"), Array([])])


def test_open_existing_and_missing(ctx, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_bytes(b"hi")
    monkeypatch.chdir(tmp_path)
    obj = ex(ctx, S.OPEN, b"data.txt")
    assert isinstance(obj, FileObj) and obj.path == str(tmp_path / "data.txt")
    assert obj.read() == b"hi" and obj.size() == 2
    with pytest.raises(TaskError, match="no such file"):
        ex(ctx, S.OPEN, str(tmp_path / "missing").encode())
    with pytest.raises(TaskError, match="not a regular file"):
        ex(ctx, S.OPEN, str(tmp_path).encode())


@pytest.mark.parametrize("text,pieces", [
    (b"A\nB", [b"A\n", b"B"]), (b"A\nB\n", [b"A\n", b"B\n"]), (b"", []),
    (b"\n\n", [b"\n", b"\n"]), (b"abc", [b"abc"]),
])
def test_split_keeps_delimiters(ctx, text, pieces):
    idx = ex(ctx, S.SPLIT, b"", [Plain(text)])
    assert isinstance(idx, Index)
    assert [idx.get(i).read() for i in range(idx.length())] == pieces
    assert idx.read() == text


def test_split_custom_delimiter_file_and_index_input(ctx, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"a,b,c")
    idx = ex(ctx, S.SPLIT, b",", [FileObj(str(f))])
    assert isinstance(idx.base, FileObj)
    assert [idx.get(i).read() for i in range(3)] == [b"a,", b"b,", b"c"]
    again = ex(ctx, S.SPLIT, b",", [idx.slice(1, 3)])
    assert to_client(ex(ctx, S.ARRAY_MAKE, b"", [again.get(0), again.get(1)])) == [b"b,", b"c"]


def test_split_large_input_is_vectorised(ctx):
    text = b"line of text\n" * 800_000  # ~10 MB
    idx = ex(ctx, S.SPLIT, b"", [Plain(text)])
    assert idx.length() == 800_000 and idx.get(799_999).read() == b"line of text\n"
    assert idx.cuts.dtype == np.uint64


def test_split_cuts_are_the_same_across_the_stretches_it_scans_at_a_time(monkeypatch):
    # the content is compared with the delimiter a stretch (SCAN_STEP bytes) at a time:
    # delimiters on either side of a stretch's edge, a last piece without one, content
    # of exactly one stretch, are cut as one scan of the whole would cut them
    import random
    from loomctl.worker import executors
    rng = random.Random(5)
    for step in (1, 2, 7, 64):
        monkeypatch.setattr(executors, "SCAN_STEP", step)
        for n in (1, step - 1, step, step + 1, 3 * step, 200):
            if n <= 0:
                continue
            text = bytes(rng.choice(b"ab\n") for _ in range(n))
            expected = [i + 1 for i, b in enumerate(text) if b == 10]
            if not expected or expected[-1] != n:
                expected.append(n)
            assert split_cuts(text, 10).tolist() == expected, (step, text)
            assert split_cuts(memoryview(text), 10).tolist() == expected


def test_save_writes_atomically(ctx, tmp_path):
    target = tmp_path / "out.bin"
    assert ex(ctx, S.SAVE, str(target).encode(), [Plain(b"content")]) == Plain(b"")
    assert target.read_bytes() == b"content"
    ex(ctx, S.SAVE, str(target).encode(), [index_of(b"a\nb\n").slice(1, 2)])
    assert target.read_bytes() == b"b\n"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_save_copies_a_file_object(ctx, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 3_000_000)
    ex(ctx, S.SAVE, str(tmp_path / "dst").encode(), [FileObj(str(src))])
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()


def test_save_fails_on_relative_name_and_directory(ctx, tmp_path):
    with pytest.raises(TaskError, match="must be absolute"):
        ex(ctx, S.SAVE, b"relative.txt", [Plain(b"x")])
    (tmp_path / "adir").mkdir()
    with pytest.raises(TaskError, match="cannot save"):
        ex(ctx, S.SAVE, str(tmp_path / "adir").encode(), [Plain(b"x")])
    with pytest.raises(TaskError, match="cannot save"):
        ex(ctx, S.SAVE, str(tmp_path / "nodir" / "f").encode(), [Plain(b"x")])
    assert sorted(os.listdir(tmp_path)) == ["adir"]
    assert os.listdir(tmp_path / "adir") == []


def test_array_make_get_slice(ctx):
    arr = ex(ctx, S.ARRAY_MAKE, b"", [Plain(b"a"), Plain(b"b"), Plain(b"c")])
    assert to_client(arr) == [b"a", b"b", b"c"]
    assert ex(ctx, S.GET, S.encode_u64(2), [arr]) == Plain(b"c")
    assert to_client(ex(ctx, S.SLICE, S.encode_slice(1, 99), [arr])) == [b"b", b"c"]
    assert to_client(ex(ctx, S.SLICE, S.encode_slice(2, 1), [arr])) == []
    assert to_client(ex(ctx, S.ARRAY_MAKE, b"", [])) == []


def test_get_out_of_range_and_on_plain(ctx):
    with pytest.raises(TaskError, match="out of range"):
        ex(ctx, S.GET, S.encode_u64(3), [Array([Plain(b"")] * 3)])
    with pytest.raises(TaskError, match="out of range"):
        ex(ctx, S.GET, S.encode_u64(2**64 - 1), [index_of(b"a\n")])
    with pytest.raises(TaskError, match="plain"):
        ex(ctx, S.GET, S.encode_u64(0), [Plain(b"abc")])


def test_slice_of_index_fetched_is_concatenated_bytes(ctx):
    idx = ex(ctx, S.SPLIT, b"", [Plain(b"1\n2\n3\n4\n")])
    part = ex(ctx, S.SLICE, S.encode_slice(1, 3), [idx])
    assert isinstance(part, Index) and to_client(part) == b"2\n3\n"
    assert to_client(ex(ctx, S.GET, S.encode_u64(1), [part])) == b"3\n"


def test_size_and_length(ctx):
    arr = Array([Plain(b"abc"), Plain(b"de")])
    u64 = lambda obj, sym: S.decode_u64(ex(ctx, sym, b"", [obj]).read())
    assert (u64(arr, S.SIZE), u64(arr, S.LENGTH)) == (5, 2)
    assert (u64(Plain(b"abcd"), S.SIZE), u64(Plain(b"abcd"), S.LENGTH)) == (4, 0)
    idx = index_of(b"a\nb\nc")
    assert (u64(idx, S.SIZE), u64(idx, S.LENGTH)) == (5, 3)
    assert len(ex(ctx, S.SIZE, b"", [arr]).read()) == 8


def test_wrong_arity_and_config_are_task_errors(ctx):
    with pytest.raises(TaskError, match="takes 1 input"):
        ex(ctx, S.GET, S.encode_u64(0), [])
    with pytest.raises(TaskError, match="malformed config"):
        ex(ctx, S.GET, b"\x00", [Array([])])


def test_non_executable_symbols(ctx):
    for symbol in (S.DSLICE, S.DGET):
        with pytest.raises(TaskError, match="expanded by the server"):
            ex(ctx, symbol, b"", [Array([])])
    for symbol in (S.FUTURE, S.TASK_INPUT):
        with pytest.raises(TaskError, match="not an executable task"):
            ex(ctx, symbol, S.encode_u64(0))
    with pytest.raises(TaskError, match="unknown task type 'nobody/knows'"):
        ex(ctx, "nobody/knows")


# ------------------------------------------------------------------ run

def test_run_stdout_and_stdin(ctx):
    assert run(ctx, ["echo", "hello"]) == Plain(b"hello\n")
    out = run(ctx, ["tr", "a-z", "A-Z"], [Plain(b"abc")], [None])
    assert out == Plain(b"ABC")
    # the (empty) run directory is kept for the next run, then removed when the worker stops
    assert len(os.listdir(ctx.work_dir)) <= 1
    assert all(os.listdir(os.path.join(ctx.work_dir, d)) == [] for d in os.listdir(ctx.work_dir))
    assert nothing_left(ctx.work_dir)


def test_run_directories_are_empty_and_reused_only_when_left_empty(ctx):
    first = run(ctx, ["sh", "-c", "ls -A | wc -l; pwd; echo junk > left-behind"])
    count, first_dir = first.read().decode().split()
    assert count == "0"
    second = run(ctx, ["sh", "-c", "ls -A | wc -l; pwd"])
    count, second_dir = second.read().decode().split()
    assert count == "0"
    assert second_dir != first_dir   # a directory with files in it is removed, not reused
    assert not os.path.exists(first_dir)
    third = run(ctx, ["pwd"]).read().decode().strip()
    assert third == second_dir       # an empty one is handed to the next run
    assert nothing_left(ctx.work_dir)


def test_run_string_args_are_split(ctx):
    cfg = S.encode_run("echo  a   b", [], [None])
    assert run_config(ctx.work_dir, cfg) == Plain(b"a b\n")


def test_run_input_files_and_fresh_directory(ctx):
    out = run(ctx, ["sh", "-c", "ls; cat in1 in2"], [Plain(b"A"), Plain(b"B")],
              ["in1", "in2"])
    assert out.read() == b"in1\nin2\nAB"


def test_run_variables_whole_and_inside_args(ctx):
    out = run(ctx, ["printf", "%s|%s|%s|%s|%s", "$X", "pre-$X-post", "${X}y", "$UNKNOWN", "$"],
              [Plain(b"val")], ["$X"])
    assert out.read() == b"val|pre-val-post|valy|$UNKNOWN|$"


def test_substitute_variables_longest_name_and_bytes():
    got = substitute_variables(["$AB", "$A", b"x$A"], {"A": b"1", "AB": b"2"})
    assert got == ["2", "1", b"x1"]
    assert substitute_variables(["$A"], {}) == ["$A"]


def test_run_several_outputs_in_order(ctx):
    out = run(ctx, ["sh", "-c", "echo one > a; echo two > b; echo std"],
              outputs=["b", None, "a"])
    assert isinstance(out, Array)
    assert to_client(out) == [b"two\n", b"std\n", b"one\n"]


def test_run_non_zero_exit_reports_status_and_stderr(ctx):
    with pytest.raises(TaskError) as info:
        run(ctx, ["sh", "-c", "echo some diagnostics >&2; exit 3"])
    msg = str(info.value)
    assert "status 3" in msg and "some diagnostics" in msg
    assert nothing_left(ctx.work_dir)


def test_run_stderr_tail_is_bounded(ctx):
    script = "i=0; while [ $i -lt 200 ]; do echo line$i >&2; i=$((i+1)); done; exit 1"
    with pytest.raises(TaskError) as info:
        run(ctx, ["sh", "-c", script])
    msg = str(info.value)
    assert "line199" in msg and "line150" not in msg and len(msg) < 2600


def test_run_killed_by_signal(ctx):
    with pytest.raises(TaskError, match="signal 9"):
        run(ctx, ["sh", "-c", "kill -9 $$"])


def test_run_missing_output_file(ctx):
    with pytest.raises(TaskError) as info:
        run(ctx, ["sh", "-c", "echo warn >&2"], outputs=["result.txt"])
    msg = str(info.value)
    assert "status 0" in msg and "result.txt" in msg and "warn" in msg


def test_run_program_that_cannot_start(ctx):
    with pytest.raises(TaskError, match="cannot start program 'no-such-program-x'"):
        run(ctx, ["no-such-program-x"])
    assert nothing_left(ctx.work_dir)


def test_run_keeps_failed_dir_when_asked(tmp_path):
    ctx = ExecContext(task_id=1, work_dir=str(tmp_path), keep_failed_dirs=True)
    with pytest.raises(TaskError, match="working directory kept"):
        run(ctx, ["sh", "-c", "touch marker; exit 1"])
    (kept,) = os.listdir(tmp_path)
    assert os.listdir(tmp_path / kept) == ["marker"]
    run(ctx, ["true"])
    nothing_left(str(tmp_path))   # (removes the successful run's spare directory)
    assert os.listdir(tmp_path) == [kept]


def test_run_file_object_input(ctx, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"from file")
    assert run(ctx, ["cat", "x"], [FileObj(str(src))], ["x"]) == Plain(b"from file")


# ------------------------------------------------------------------ python tasks

def py_call(ctx, fn, inputs=(), direct_args=(), context=False):
    config = cloudpickle.dumps((tuple(direct_args), context))
    return ex(ctx, S.PY_CALL, config, [PyObj(fn), *inputs])


def test_py_value(ctx):
    obj = ex(ctx, S.PY_VALUE, cloudpickle.dumps({"a": 1}))
    assert isinstance(obj, PyObj) and obj.obj == {"a": 1}


def test_py_call_direct_args_and_wrapped_inputs(ctx):
    def fn(prefix, n, a, b, c):
        return prefix + a.read() * n + b.read() + str(c.size()).encode() + str(b.length()).encode()

    out = py_call(ctx, fn, [Plain(b"x"), index_of(b"p\nq\n"), Array([Plain(b"zz")])],
                  direct_args=(b">", 2))
    assert out == Plain(b">xxp\nq\n22")


def test_wrapped_inputs_read_and_unwrap(ctx):
    seen = {}

    def fn(a, p):
        seen.update(read_array=a.read(), read_py=p.read(), length=a.length(), obj=p.unwrap())
        try:
            a.unwrap()
        except TaskError as e:
            seen["err"] = str(e)
        return "ok"

    assert py_call(ctx, fn, [Array([Plain(b"1")]), PyObj([1, 2])]) == Plain(b"ok")
    assert seen["read_array"] == b"" and seen["read_py"] == b"" and seen["length"] == 1
    assert seen["obj"] == [1, 2] and "array" in seen["err"]


def test_py_call_with_context_logs_and_wrap(ctx, caplog):
    def fn(context, a):
        context.log_info("starting " + str(context.task_id))
        context.log_error("careful")
        return [context.wrap({"n": a.size()}), "s", (b"t",)]

    with caplog.at_level(logging.DEBUG, logger="loomctl.task"):
        out = py_call(ctx, fn, [Plain(b"abc")], context=True)
    assert isinstance(out, Array)
    assert to_client(out) == [{"n": 3}, b"s", [b"t"]]
    assert ctx.logs == [("info", "starting 7"), ("error", "careful")]
    assert "careful" in caplog.text


def test_py_call_returning_an_input_returns_its_data(ctx):
    data = Array([Plain(b"1")])
    assert py_call(ctx, lambda a: a, [data]) is data


def test_py_call_redirect_keeps_wrapped_inputs(ctx):
    class FakeTask:
        def __init__(self, task_type, inputs):
            self.task_type, self.inputs = task_type, inputs

    def fn(a, b):
        return FakeTask(S.MERGE, (b, a))

    x, y = Plain(b"x"), Plain(b"y")
    out = py_call(ctx, fn, [x, y])
    assert isinstance(out, Redirect)
    second, first = out.task.inputs
    assert isinstance(first, WrappedData) and first.data is x and first.input_index == 1
    assert second.data is y and second.input_index == 2


def test_py_call_redirect_with_graphfmt_task(ctx):
    tasks = pytest.importorskip("graphfmt.tasks")
    out = py_call(ctx, lambda a: tasks.run("cat", stdin=a), [Plain(b"z")])
    assert isinstance(out, Redirect) and out.task.task_type == S.RUN


def test_py_call_exception_gives_traceback(ctx):
    def broken(a):
        return helper_that_fails(a)

    with pytest.raises(TaskError) as info:
        py_call(ctx, broken, [Plain(b"")])
    msg = str(info.value)
    assert "Traceback" in msg and "ZeroDivisionError" in msg and "helper_that_fails" in msg
    assert "loomctl/worker/executors.py" not in msg and "in broken" in msg


def helper_that_fails(a):
    return 1 / 0


@pytest.mark.parametrize("value,name", [(None, "NoneType"), (3, "int"), ({"a": 1}, "dict"),
                                        ([b"ok", 2.5], "float")])
def test_py_call_bad_return_type(ctx, value, name):
    with pytest.raises(TaskError, match=f"returned '{name}'"):
        py_call(ctx, lambda: value)


def test_py_call_needs_a_callable(ctx):
    with pytest.raises(TaskError, match="Python callable, got a Python int"):
        ex(ctx, S.PY_CALL, cloudpickle.dumps(((), False)), [PyObj(5)])
    with pytest.raises(TaskError, match="got a plain object"):
        ex(ctx, S.PY_CALL, cloudpickle.dumps(((), False)), [Plain(b"")])


def test_py_call_wrong_argument_count_is_task_error(ctx):
    with pytest.raises(TaskError, match="TypeError"):
        py_call(ctx, lambda a: a, [])


# ------------------------------------------------------------------ extensions

@pytest.fixture
def clean_registry():
    before = extensions.registered_symbols()
    yield
    for symbol in extensions.registered_symbols() - before:
        extensions.unregister(symbol)


def test_builtin_table_matches_announced_builtins():
    assert frozenset(_BUILTINS) | {S.RUN} == extensions.EXECUTABLE_BUILTINS   # (programs: worker.programs)
    assert S.DSLICE not in extensions.supported_symbols()


def test_registered_extension_is_executed(ctx, clean_registry):
    @extensions.register("test/count")
    def count(config, inputs):
        return Plain(str(inputs[0].read().count(config)).encode())

    assert "test/count" in extensions.supported_symbols()
    assert S.RUN in extensions.supported_symbols()
    assert ex(ctx, "test/count", b"a", [Plain(b"banana")]) == Plain(b"3")


def test_extension_errors(ctx, clean_registry):
    with pytest.raises(extensions.ExtensionError, match="reserved"):
        extensions.register("loom/mine")

    @extensions.register("test/bad")
    def bad(config, inputs):
        return 42

    with pytest.raises(TaskError, match="returned int"):
        ex(ctx, "test/bad")

    @extensions.register("test/raise")
    def raising(config, inputs):
        raise KeyError("boom")

    with pytest.raises(TaskError, match="KeyError"):
        ex(ctx, "test/raise")
    with pytest.raises(extensions.ExtensionError, match="already registered"):
        extensions.register("test/bad")(raising)


def test_load_extensions_from_module(ctx, clean_registry, tmp_path, monkeypatch):
    (tmp_path / "loomext_sample.py").write_text(
        "from loomctl.worker.extensions import register\n"
        "from loomctl.worker.data import Plain\n"
        "@register('sample/rev')\n"
        "def rev(config, inputs):\n"
        "    return Plain(inputs[0].read()[::-1])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "loomext_sample", raising=False)
    assert extensions.load_extensions(["loomext_sample"]) == ["sample/rev"]
    assert ex(ctx, "sample/rev", b"", [Plain(b"abc")]) == Plain(b"cba")
    with pytest.raises(extensions.ExtensionError, match="no_such_ext_module"):
        extensions.load_extensions(["no_such_ext_module"])


def test_entry_points_are_discovered(clean_registry, monkeypatch):
    calls = []

    class FakeEntryPoint:
        name, value = "fake", "fake.module:setup"

        def load(self):
            def setup():
                calls.append(1)
                extensions.register("fake/task")(lambda config, inputs: Plain(b""))
            return setup

    monkeypatch.setattr(extensions.metadata, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == "loomctl.tasks" else [])
    assert extensions.load_entry_points() == ["fake/task"]
    assert calls == [1]


def test_a_split_scans_a_large_const_where_it_arrived_and_its_pieces_are_right(ctx):
    """A large const is a read-only view of its COMPUTE frame; splitting it must not copy
    it whole (10 MB of fresh memory: thousands of page faults before the first piece)."""
    text = b"".join(b"line %d\n" % i for i in range(5000)) + b"tail"
    frame = bytes(text)
    const = ex(ctx, S.CONST, memoryview(frame))
    index = ex(ctx, S.SPLIT, b"", [const])
    assert type(const.content) is not bytes
    assert np.shares_memory(np.frombuffer(const.content, np.uint8), np.frombuffer(frame, np.uint8))
    assert index.length() == 5001
    assert index.get(17).read() == b"line 17\n" and index.get(5000).read() == b"tail"
    assert index.read() == text
