"""The command-line contract, for every subcommand (found by walking --help, so a new
command must join the tables here): a usage error is one line and status 2; a file
operand that is a directory, a fifo or an unreadable file is one line and status 3; a
closed stdout ends a command with status 141. Also: how plan sources are recognised,
what build/cat write, and that the trace reader does not load the CLI."""

import json
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import graphfmt
from graphfmt import symbols as S
from clihelp import ROOT, loomctl, one_line_error, walk_tree
from loomctl.trace import format as F


@pytest.fixture(scope="module")
def tree():
    return walk_tree()


def leaves(tree):
    return sorted(path for path, (_, subcommands) in tree.items() if path and not subcommands)


def groups(tree):
    return sorted(path for path, (_, subcommands) in tree.items() if subcommands)


def run_all(calls):
    """Run loomctl for each (key, args) pair, four at a time: {key: CompletedProcess}."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = pool.map(lambda c: loomctl(*c[1], **c[2] if len(c) > 2 else {}), calls)
        return {c[0]: p for c, p in zip(calls, procs)}


# Every leaf command: whether it has a required operand, and argument lists in which
# FILE stands for a path where an input file is expected, DIR for an input directory,
# OUTFILE for an output file and OUTDIR for an output directory.
CONTRACT = {
    ("add",): (True, [["FILE", "const", "x"]]),
    ("build",): (True, [["FILE"], ["plan.py", "-o", "OUTFILE"]]),
    ("cat",): (True, [["FILE"], ["plan.py", "-o", "OUTFILE"]]),
    ("inspect",): (True, [["FILE"]]),
    ("run",): (True, [["FILE"], ["plan.py", "-o", "OUTDIR"]]),
    ("submit",): (True, [["FILE"]]),
    ("status",): (False, []),
    ("job", "list"): (False, []),
    ("job", "info"): (True, []),
    ("job", "results"): (True, [["1", "-o", "OUTDIR"]]),
    ("job", "cancel"): (True, []),
    ("server", "start"): (False, []),
    ("server", "stop"): (False, []),
    ("worker", "start"): (False, []),
    ("simulate",): (True, [["FILE", "-w", "2x1"]]),
    ("slurm", "submit"): (True, [["FILE", "--print"]]),
    ("slurm", "run-allocation"): (True, []),
    ("trace", "summary"): (True, [["DIR"]]),
    ("trace", "timeline"): (True, [["DIR", "-o", "x.svg"], ["TRACE", "-o", "OUTFILE"]]),
    ("trace", "export"): (True, [["DIR", "-o", "x.json"], ["TRACE", "-o", "OUTFILE"]]),
}


def test_the_contract_table_names_every_command(tree):
    assert set(CONTRACT) == set(leaves(tree))


def test_an_unknown_option_is_one_line_for_every_command(tree):
    procs = run_all([(path, [*path, "--no-such-option"]) for path in tree])
    for path, proc in procs.items():
        err = one_line_error(proc, code=2)
        assert "no such option: --no-such-option" in err, (path, err)
        assert f"'{' '.join(('loomctl',) + path)} --help'" in err, (path, err)


def test_a_mistyped_command_or_option_suggests_the_right_one(tree):
    calls = [((path, f"'{subs[0]}'"), [*path, subs[0] + "z"]) for path, (_, subs) in tree.items() if subs]
    calls.append(((("build",), "--json"), ["build", "--jsn", "x.py"]))
    for (path, right), proc in run_all(calls).items():
        err = one_line_error(proc, code=2)
        assert "did you mean" in err and right in err.split("did you mean")[1], (path, err)


def test_a_missing_operand_is_one_line_for_every_command(tree):
    procs = run_all([(path, list(path)) for path, (required, _) in CONTRACT.items() if required])
    for path, proc in procs.items():
        err = one_line_error(proc, code=2)
        assert "missing argument" in err, (path, err)


def test_a_bare_group_prints_its_help(tree):
    for path in groups(tree):
        proc = loomctl(*path, env={"COLUMNS": "100"})
        assert proc.returncode == 2 and b"Usage: loomctl" in proc.stdout, (path, proc.stderr)


# ---------------------------------------------------------------------------- files


def unreadable_prefix():
    """What makes a mode-000 file unreadable to the loomctl under test: nothing for a
    normal user; for root, setpriv without the capabilities that bypass file modes."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def write_small_trace(directory, tasks=1):
    os.makedirs(directory, exist_ok=True)
    t0 = 1_700_000_000.0
    server = F.TraceWriter(os.path.join(directory, F.SERVER_FILE), F.header("server"))
    server.add({"k": F.WORKER, "t": t0, "worker": 0, "name": "w0", "address": "tcp://h:1", "cpus": 1, "host": "h"})
    server.close()
    w0 = F.TraceWriter(os.path.join(directory, F.worker_file("w0")),
                       F.header("worker", name="w0", worker=0, address="tcp://h:1", cpus=1))
    rows = [{"id": i, "job": 1, "slot": 0, "cpus": 1, "sym": "loom/run/run", "label": f"step:{i}",
             "t0": t0 + i, "t1": t0 + i + 0.5, "status": "ok", "size": 1, "in": []} for i in range(tasks)]
    w0.add({"k": F.TASKS, "w": 0, **{c: [r[c] for r in rows] for c in F.TASK_COLUMNS}})
    w0.close()


@pytest.fixture
def bad_paths(tmp_path):
    """Directory -> {kind: path} of things that are not what a command expects."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "plan.py").write_text("from graphfmt import tasks\nresults = [tasks.const('x')]\n")
    (tmp_path / "a-dir").mkdir()
    os.mkfifo(tmp_path / "a-fifo")
    (tmp_path / "unreadable.loom").write_bytes(b"")
    os.chmod(tmp_path / "unreadable.loom", 0)
    (tmp_path / "unreadable-dir").mkdir()
    os.chmod(tmp_path / "unreadable-dir", 0)
    (tmp_path / "a-file").write_text("text\n")
    write_small_trace(tmp_path / "trace")
    return {
        "FILE": {"directory": "a-dir", "fifo": "a-fifo", "unreadable file": "unreadable.loom"},
        "DIR": {"file": "a-file", "fifo": "a-fifo", "unreadable directory": "unreadable-dir"},
        "OUTFILE": {"directory": "a-dir", "fifo": "a-fifo"},
        "OUTDIR": {"file": "a-file", "fifo": "a-fifo"},
    }


def test_a_path_of_the_wrong_kind_is_one_line_for_every_command(tmp_path, bad_paths):
    prefix = unreadable_prefix()
    calls = []
    for path, (_, templates) in CONTRACT.items():
        for template in templates:
            slot = next(a for a in template if a in bad_paths)
            for kind, name in bad_paths[slot].items():
                args = [*path, *(name if a == slot else "trace" if a == "TRACE" else a for a in template)]
                calls.append(((path, tuple(template), kind), args, {"cwd": tmp_path, "prefix": prefix, "timeout": 30}))
    procs = run_all(calls)
    problems = []
    for (path, template, kind), proc in procs.items():
        err = proc.stderr.decode()
        if proc.returncode != 3 or not err.startswith("loomctl: error: ") or err.count("\n") != 1:
            problems.append(f"loomctl {' '.join(path)} {' '.join(template)} with {kind}: "
                            f"status {proc.returncode}: {err[-300:]!r}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- plan sources


def test_build_reads_a_command_list_from_stdin(tmp_path):
    proc = loomctl("build", "-", "-o", tmp_path / "x.loom", input=b"hostname\nuname -r\n", check=0)
    assert b"wrote 2 tasks (2 results)" in proc.stdout
    g = graphfmt.read(str(tmp_path / "x.loom"))
    assert S.decode_run(g.config(0))["args"] == ["sh", "-c", "hostname"]


def test_a_loom_file_without_the_magic_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "text.loom").write_text(f"touch {marker}\n")
    for command in (["run", "-n", "1"], ["inspect"], ["build"], ["cat"]):
        err = one_line_error(loomctl(*command, tmp_path / "text.loom"))
        assert "text.loom: not a graph file (wrong magic number)" in err
    assert not marker.exists()
    (tmp_path / "random.loom").write_bytes(os.urandom(3000))
    assert "random.loom: not a graph file" in one_line_error(loomctl("inspect", tmp_path / "random.loom"))
    # a command list comes from its own extension or --as
    (tmp_path / "cmds").write_text("echo hi\n")
    assert "--as" in one_line_error(loomctl("build", tmp_path / "cmds"))
    built = loomctl("build", "--as", "commands", tmp_path / "cmds", check=0).stdout
    assert len(graphfmt.read(built)) == 1
    # standard input claimed as a graph
    err = one_line_error(loomctl("inspect", "-", input=b"echo hi\n"))
    assert "standard input: not a loomctl graph file" in err


def test_a_graph_file_is_known_by_its_magic_whatever_its_name(tmp_path):
    built = loomctl("build", "-", input=b"echo hi\n", check=0).stdout
    (tmp_path / "plan.txt").write_bytes(built)
    stats = json.loads(loomctl("inspect", "--json", tmp_path / "plan.txt", check=0).stdout)
    assert stats["tasks"] == 1


def test_params_are_for_plan_scripts_only(tmp_path):
    (tmp_path / "x.loom").write_bytes(loomctl("build", "-", input=b"echo hi\n", check=0).stdout)
    (tmp_path / "c.txt").write_text("echo hi\n")
    for source in ("x.loom", "c.txt"):
        for command in ("build", "run", "submit"):
            err = one_line_error(loomctl(command, tmp_path / source, "-p", "n=1"), code=2)
            assert "-p/--param is for plan scripts" in err


def test_build_and_cat_write_stdout_by_default_and_respect_the_umask(tmp_path):
    (tmp_path / "plan.py").write_text("from graphfmt import tasks\nresults = [tasks.const('x')]\n")
    one = loomctl("build", tmp_path / "plan.py", check=0).stdout
    (tmp_path / "one.loom").write_bytes(one)
    two = loomctl("cat", tmp_path / "one.loom", tmp_path / "plan.py", check=0).stdout
    assert len(graphfmt.read(two)) == 2
    for command in ("build {src} -o {dst}", "cat {src} -o {dst}"):
        dst = tmp_path / f"out-{command.split()[0]}.loom"
        line = f"umask 027; {sys.executable} -m loomctl " + command.format(src=tmp_path / "plan.py", dst=dst)
        subprocess.run(["sh", "-c", line], check=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
        assert stat.S_IMODE(os.stat(dst).st_mode) == 0o640, command


# ---------------------------------------------------------------------------- modules


def test_the_trace_reader_and_reports_do_not_load_the_cli():
    code = ("import sys, loomctl.trace.reader, loomctl.trace.report, loomctl.trace.chrome\n"
            "loaded = sorted(m for m in sys.modules if m == 'typer' or m.startswith('loomctl.cli'))\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------- closed stdout

# Every leaf command: the arguments with which it writes to stdout (None: it never does,
# with the reason). Run with a stdout whose reader is gone, each must end quietly with
# 141 (128 + SIGPIPE), what a shell shows for `yes | head -1`'s yes.
STDOUT = {
    ("add",): ["add", "new.loom", "const", "x"],
    ("build",): ["build", "plan.py"],
    ("cat",): ["cat", "plan.py", "plan.py"],
    ("inspect",): ["inspect", "plan.py"],
    ("run",): ["run", "-n", "1", "-q", "plan.py"],
    ("submit",): ["submit", "--wait", "plan.py"],
    ("status",): ["status"],
    ("job", "list"): ["job", "list"],
    ("job", "info"): ["job", "info", "JOB"],
    ("job", "results"): ["job", "results", "JOB"],
    ("job", "cancel"): ["job", "cancel", "OTHER"],
    ("server", "start"): None,          # logs to stderr only
    ("server", "stop"): ["server", "stop"],
    ("worker", "start"): None,          # logs to stderr only
    ("simulate",): ["simulate", "plan.py", "-w", "2x1"],
    ("slurm", "submit"): ["slurm", "submit", "--print", "plan.py"],
    ("slurm", "run-allocation"): None,  # needs an allocation; writes what `run` writes
    ("trace", "summary"): ["trace", "summary", "trace"],
    ("trace", "timeline"): ["trace", "timeline", "trace", "-o", "-"],
    ("trace", "export"): ["trace", "export", "trace", "-o", "-"],
}


def closed_stdout_run(args, cwd, env):
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "loomctl", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, cwd=cwd, env=env, timeout=120)
    finally:
        os.close(write)


def test_a_closed_stdout_ends_every_command_with_the_sigpipe_status(tree, tmp_path):
    from cluster import Cluster
    assert set(STDOUT) == set(leaves(tree))
    (tmp_path / "plan.py").write_text("from graphfmt import tasks\nresults = [tasks.const('x')]\n")
    write_small_trace(tmp_path / "trace", tasks=50)
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster", workers=1, cpus=1)
    try:
        jobs = [int(loomctl("submit", "-q", tmp_path / "plan.py", env=cluster.env, check=0).stdout) for _ in range(2)]
        for job in jobs:
            loomctl("job", "results", "--wait", job, env=cluster.env, check=0)
        calls = []
        for path, args in STDOUT.items():
            if args is not None:
                args = [str(jobs[0]) if a == "JOB" else str(jobs[1]) if a == "OTHER" else a for a in args]
                calls.append((path, args))
        calls.sort(key=lambda c: c[0] == ("server", "stop"))   # last: it stops the cluster
        problems = []
        for path, args in calls:
            proc = closed_stdout_run(args, tmp_path, cluster.env)
            if proc.returncode != 141 or proc.stderr:
                problems.append(f"loomctl {' '.join(args)}: status {proc.returncode}, stderr {proc.stderr[-300:]!r}")
        assert not problems, "\n".join(problems)
    finally:
        cluster.stop()
