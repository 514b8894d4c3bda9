"""loomctl build / add / inspect / cat, run as a user runs them."""

import json

import pytest

import graphfmt
from graphfmt import symbols as S
from clihelp import loomctl, one_line_error

PLAN = """
from graphfmt import tasks
n = int(params.get("n", "2"))
parts = [tasks.const(f"part{i}") for i in range(n)]
results = [tasks.merge(parts, ",")]
"""


def test_build_plan_script_with_parameters(tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    out = tmp_path / "plan.loom"
    proc = loomctl("build", tmp_path / "plan.py", "-o", out, "-p", "n=5", check=0)
    assert b"wrote 6 tasks (1 result) to" in proc.stdout
    g = graphfmt.read(str(out))
    assert len(g) == 6 and g.config(5) == b","


def test_build_to_stdout_pipes_into_inspect(tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    built = loomctl("build", tmp_path / "plan.py", "-o", "-", check=0)
    proc = loomctl("inspect", "-", "--json", input=built.stdout, check=0)
    stats = json.loads(proc.stdout)
    assert stats["tasks"] == 3 and stats["depth"] == 2 and stats["types"] == {S.CONST: 2, S.MERGE: 1}


@pytest.mark.parametrize("script,message", [
    ("raise ValueError('boom')", "raised ValueError at line 1: boom"),
    ("x = 1", "defines no 'results'"),
    ("from graphfmt import tasks\nresults = [tasks.const('a'), 42]", r"results[1] is a int, not a Task"),
    ("import sys\nsys.exit(3)", "exited (3)"),
])
def test_bad_plan_scripts(tmp_path, script, message):
    (tmp_path / "bad.py").write_text(script)
    err = one_line_error(loomctl("build", tmp_path / "bad.py", "-o", tmp_path / "x.loom"))
    assert message in err
    assert not (tmp_path / "x.loom").exists()


def test_build_command_list_and_toml(tmp_path):
    (tmp_path / "cmds.txt").write_text("# comment\necho one\n\necho two\n")
    loomctl("build", tmp_path / "cmds.txt", "-o", tmp_path / "c.loom", check=0)
    g = graphfmt.read(str(tmp_path / "c.loom"))
    assert len(g) == 2 and len(g.result_ids()) == 2
    assert S.decode_run(g.config(1))["args"] == ["sh", "-c", "echo two"]
    (tmp_path / "data.txt").write_text("b\na\n")
    (tmp_path / "tasks.toml").write_text("""
[task.sort]
command = "sort"
stdin = "data.txt"
label = "sort:data"

[task.count]
args = ["wc", "-l", "sorted.txt"]
inputs = { "sorted.txt" = "@sort" }
cpus = 2
""")
    loomctl("build", tmp_path / "tasks.toml", "-o", tmp_path / "t.loom", check=0)
    g = graphfmt.read(str(tmp_path / "t.loom"))
    symbols = [g.symbol(i) for i in range(len(g))]
    assert symbols == [S.OPEN, S.RUN, S.RUN]
    assert g.config(0) == str(tmp_path / "data.txt").encode()
    assert g.request(2) == {"cpus": 2} and g.label(1) == "sort:data"
    assert [g.symbol(int(i)) for i in g.result_ids()] == [S.RUN]   # only the sink


def test_bad_toml_names_the_task(tmp_path):
    (tmp_path / "t.toml").write_text('[task.a]\ncommand = "x"\nstdin = "@missing"\n')
    assert "task 'a': depends on unknown task 'missing'" in one_line_error(loomctl("build", tmp_path / "t.toml", "-o", "-"))
    (tmp_path / "t.toml").write_text('[task.a]\ncommand = "x"\nstdin = "@b"\n[task.b]\ncommand = "y"\nstdin = "@a"\n')
    assert "dependency cycle" in one_line_error(loomctl("build", tmp_path / "t.toml", "-o", "-"))


def test_add_builds_a_plan_step_by_step(tmp_path):
    f = tmp_path / "s.loom"
    a = loomctl("add", f, "const", "hello ", check=0).stdout.decode().strip()
    b = loomctl("add", f, "const", "world", check=0).stdout.decode().strip()
    m = loomctl("add", f, "merge", a, b, "--label", "greet", check=0).stdout.decode().strip()
    r = loomctl("add", f, "run", "wc -c", "--stdin", m, "--result", check=0).stdout.decode().strip()
    assert (a, b, m, r) == ("0", "1", "2", "3")
    g = graphfmt.read(str(f))
    assert g.task_inputs(2).tolist() == [0, 1] and g.label(2) == "greet"
    assert g.result_ids().tolist() == [3]
    assert S.decode_run(g.config(3)) == {"args": ["sh", "-c", "wc -c"], "map_inputs": [None], "map_outputs": [None]}
    err = one_line_error(loomctl("add", f, "merge", "0", "17"), code=2)
    assert "task 17 does not exist" in err
    assert len(graphfmt.read(str(f))) == 4


def test_inspect_text_dot_and_cat(tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    loomctl("build", tmp_path / "plan.py", "-o", tmp_path / "a.loom", check=0)
    text = loomctl("inspect", tmp_path / "a.loom", check=0).stdout.decode()
    assert "tasks" in text and "loom/data/merge" in text and "critical path  2 tasks" in text
    dot = loomctl("inspect", tmp_path / "a.loom", "--dot", check=0).stdout.decode()
    assert dot.startswith("digraph") and "t0 -> t2;" in dot and "t1 -> t2;" in dot
    loomctl("cat", tmp_path / "a.loom", tmp_path / "a.loom", "-o", tmp_path / "b.loom", check=0)
    g = graphfmt.read(str(tmp_path / "b.loom"))
    assert len(g) == 6 and g.task_inputs(5).tolist() == [3, 4]


def test_inspect_bad_files(tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    good = loomctl("build", tmp_path / "plan.py", "-o", "-", check=0).stdout
    (tmp_path / "t.loom").write_bytes(good[:-5])
    assert "truncated" in one_line_error(loomctl("inspect", tmp_path / "t.loom"))
    (tmp_path / "m.loom").write_bytes(b"\x89LOOMGX\n" + good[8:])
    assert "wrong magic" in one_line_error(loomctl("inspect", "-", input=(tmp_path / "m.loom").read_bytes()))
    assert "no such file" in one_line_error(loomctl("inspect", tmp_path / "none.loom"))


def test_inspect_into_a_closed_pipe_prints_no_traceback(tmp_path):
    import subprocess, sys, os
    from clihelp import ROOT
    (tmp_path / "plan.py").write_text(PLAN.replace('"2"', '"3000"'))
    loomctl("build", tmp_path / "plan.py", "-o", tmp_path / "a.loom", check=0)
    cmd = f"{sys.executable} -m loomctl inspect {tmp_path / 'a.loom'} --dot | head -1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.decode().strip() == "digraph loom {"
    assert b"Traceback" not in proc.stderr and b"Error" not in proc.stderr


def test_add_run_takes_a_shell_line_or_a_program_with_its_arguments(tmp_path):
    f = tmp_path / "s.loom"
    numbers = loomctl("add", f, "const", "3\n1\n2\n", check=0).stdout.decode().strip()
    loomctl("add", f, "run", "sort -n | head -1", "--stdin", numbers, "--result", check=0)
    loomctl("add", f, "run", "--result", "--", "printf", "%s|%s", "a b", "c", check=0)
    g = graphfmt.read(str(f))
    assert S.decode_run(g.config(1))["args"] == ["sh", "-c", "sort -n | head -1"]
    assert S.decode_run(g.config(2))["args"] == ["printf", "%s|%s", "a b", "c"]
    proc = loomctl("run", "-n", "1", "--json", f, check=0)
    assert [r["text"] for r in json.loads(proc.stdout)["results"]] == ["1\n", "a b|c"]


TOML_OUTPUTS = """
[task.split]
command = "printf 'a\\n' > a.txt; printf 'b\\nc\\n' > b.txt"
outputs = ["a.txt", "b.txt"]

[task.count]
command = "wc -l"
stdin = "@split/b.txt"

[task.first]
command = "cat in"
inputs = { "in" = "@split/a.txt" }
"""


def test_toml_picks_one_output_of_a_task_with_several(tmp_path):
    (tmp_path / "t.toml").write_text(TOML_OUTPUTS)
    proc = loomctl("run", "-n", "1", "--json", tmp_path / "t.toml", check=0)
    assert sorted(r["text"].strip() for r in json.loads(proc.stdout)["results"]) == ["2", "a"]
    (tmp_path / "bad.toml").write_text(TOML_OUTPUTS.replace("@split/a.txt", "@split/c.txt"))
    err = one_line_error(loomctl("build", tmp_path / "bad.toml"))
    assert "task 'first': input '@split/c.txt': task 'split' has no output 'c.txt'; its outputs: 'a.txt', 'b.txt'" in err
