"""Jobs through the command line, end to end with real server and worker processes:
listing, info, results and cancel as loomctl-job(1) says; results on stdout; Ctrl-C on
`run` and `submit --wait`; a dead server; the server's log; terminal-safe output."""

import json
import os
import signal
import subprocess
import sys

import pytest

from clihelp import ROOT, final_error, loomctl, one_line_error
from cluster import Cluster, wait_until

FAIL = ("from graphfmt import tasks\nt = tasks.run(['sh', '-c', 'echo broken >&2; exit 7'])\n"
        "t.label = 'step:one'\nresults = [t]\n")
THREE = "echo one\nprintf two\necho three\n"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("jobs"), workers=1, cpus=2)
    yield c
    c.stop()


def submit(cluster, path, *args):
    return int(loomctl("submit", "-q", path, *args, env=cluster.env, check=0).stdout)


def job_row(cluster, job):
    with cluster.client() as c:
        return next((j for j in c.status()["jobs"] if j["id"] == job), None)


def ended(cluster, job):
    row = job_row(cluster, job)
    return row if row and row["status"] != "running" else None


def test_job_list_is_in_id_order(cluster, tmp_path):
    (tmp_path / "c.txt").write_text("echo hi\n")
    kept = submit(cluster, tmp_path / "c.txt")
    dropped = submit(cluster, tmp_path / "c.txt")
    wait_until(lambda: ended(cluster, kept) and ended(cluster, dropped), "both jobs to end")
    before = cluster.stats()["retired_jobs"]
    loomctl("job", "cancel", dropped, env=cluster.env, check=0)
    # the job whose results were dropped is retired into the server's history, which the
    # STATUS reply lists before the live jobs
    wait_until(lambda: cluster.stats()["retired_jobs"] > before, "the dropped job to be retired")
    ids = [j["id"] for j in json.loads(loomctl("job", "list", "--json", env=cluster.env, check=0).stdout)]
    assert ids == sorted(ids) and {kept, dropped} <= set(ids)
    text = loomctl("status", env=cluster.env, check=0).stdout.decode()
    rows = [int(line.split()[0]) for line in text.split("seconds\n", 1)[1].splitlines()[1:] if line.strip()]
    assert rows == sorted(rows)


def test_a_failed_job_reads_well(cluster, tmp_path):
    (tmp_path / "bad.py").write_text(FAIL)
    job = submit(cluster, tmp_path / "bad.py")
    wait_until(lambda: ended(cluster, job), "the job to fail")
    info = loomctl("job", "info", job, env=cluster.env, check=0).stdout.decode()
    assert "status       failed" in info and "step:one" in info and "exited with status 7" in info, info
    assert "{" not in info and "None" not in info, info
    err = one_line_error(loomctl("job", "results", job, env=cluster.env), code=1)
    assert f"job {job} failed: task" in err and "is failed" not in err
    ok = loomctl("job", "info", submit(cluster, tmp_path / "bad.py"), env=cluster.env, check=0)
    (tmp_path / "one.txt").write_text("echo hi\n")
    assert b"(1 task)" in loomctl("submit", tmp_path / "one.txt", env=cluster.env, check=0).stdout
    assert b"None" not in ok.stdout


def test_results_of_a_job_without_results_is_an_error(cluster, tmp_path):
    (tmp_path / "c.txt").write_text("echo hi\n")
    job = submit(cluster, tmp_path / "c.txt")
    assert loomctl("job", "results", "--wait", job, env=cluster.env, check=0).stdout == b"hi\n"
    loomctl("job", "cancel", job, env=cluster.env, check=0)
    proc = loomctl("job", "results", job, "-o", tmp_path / "out", env=cluster.env)
    err = one_line_error(proc, code=3)
    assert f"job {job}" in err and "no results" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_cancel_several_jobs_and_select_by_state(cluster, tmp_path):
    (tmp_path / "c.txt").write_text("echo hi\n")
    (tmp_path / "bad.py").write_text(FAIL)
    jobs = [submit(cluster, tmp_path / "c.txt") for _ in range(2)]
    failed = submit(cluster, tmp_path / "bad.py")
    for job in [*jobs, failed]:
        wait_until(lambda: ended(cluster, job), f"job {job} to end")
    listed = loomctl("job", "list", "-q", "--state", "failed", env=cluster.env, check=0).stdout.decode().split()
    assert str(failed) in listed and not set(map(str, jobs)) & set(listed)
    assert "--state 'done'" in one_line_error(loomctl("job", "list", "--state", "done", env=cluster.env), code=2)
    proc = loomctl("job", "cancel", *jobs, 99999, "--json", env=cluster.env)
    assert json.loads(proc.stdout) == {"cancelled": jobs}
    err = one_line_error(proc, code=3)
    assert "no job 99999" in err and f"cancelled jobs {jobs[0]}, {jobs[1]}" in err
    for job in jobs:
        one_line_error(loomctl("job", "results", job, env=cluster.env), code=3)


def test_several_results_on_stdout_are_framed(cluster, tmp_path):
    (tmp_path / "three.txt").write_text(THREE)
    job = submit(cluster, tmp_path / "three.txt")
    framed = loomctl("job", "results", "--wait", job, env=cluster.env, check=0).stdout.decode()
    first = int(framed.split()[2])
    assert framed == (f"==> task {first} <==\none\n\n==> task {first + 1} <==\ntwo\n\n"
                      f"==> task {first + 2} <==\nthree\n")
    assert loomctl("job", "results", "-q", job, env=cluster.env, check=0).stdout == b"one\ntwothree\n"
    document = json.loads(loomctl("job", "results", "--json", job, env=cluster.env, check=0).stdout)
    assert [r["text"] for r in document["results"]] == ["one\n", "two", "three\n"]
    assert document["job"] == job and document["status"] == "finished"


def test_run_json_prints_json_and_frames_several_results(tmp_path):
    (tmp_path / "three.txt").write_text(THREE)
    (tmp_path / "bytes.py").write_text("from graphfmt import tasks\nresults = [tasks.const(b'\\xff\\x00')]\n")
    document = json.loads(loomctl("run", "-n", "1", "--json", tmp_path / "three.txt", check=0).stdout)
    assert [r["text"] for r in document["results"]] == ["one\n", "two", "three\n"]
    document = json.loads(loomctl("run", "-n", "1", "--json", tmp_path / "bytes.py", check=0).stdout)
    assert document["results"] == [{"task": 0, "base64": "/wA="}]
    assert loomctl("run", "-n", "1", tmp_path / "three.txt", check=0).stdout.decode().count("==> task ") == 3


def test_a_closed_stdout_ends_run_with_the_sigpipe_status(tmp_path):
    (tmp_path / "many.txt").write_text("seq 20000\n" * 20)    # ~2 MB of results
    line = f"{sys.executable} -m loomctl run -q -n 1 {tmp_path / 'many.txt'} | head -2; echo \"status ${{PIPESTATUS[0]}}\""
    proc = subprocess.run(["bash", "-c", line], capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.decode().splitlines() == ["1", "2", "status 141"], proc.stderr
    assert proc.stderr == b""


def test_status_shows_running_and_queued_tasks_apart(tmp_path):
    (tmp_path / "cluster").mkdir()
    c = Cluster(tmp_path / "cluster", workers=1, cpus=1)
    try:
        (tmp_path / "slow.txt").write_text("sleep 60\n" * 3)
        loomctl("submit", tmp_path / "slow.txt", env=c.env, check=0)
        def one_running():
            (w,) = json.loads(loomctl("status", "--json", env=c.env, check=0).stdout)["workers"]
            return w if w["running"] == 1 and w["assigned"] >= 2 else None
        wait_until(one_running, "one task running and more queued on the 1-cpu worker")
        text = loomctl("status", env=c.env, check=0).stdout.decode()
        header, _, row = text.split("\n\n")[1].splitlines()
        cells = dict(zip(header.split(), row.split()))
        assert cells["running"] == "1" and int(cells["queued"]) >= 1, text
    finally:
        c.stop()


# ---------------------------------------------------------------------------- Ctrl-C


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_on_run_kills_its_programs_and_their_children(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    # each program is a shell that ignores SIGINT, running a child that ignores it too
    # (as many programs do); only the worker can end them
    lines = [f"trap '' INT; sh -c 'echo $$ > {pids}/{k}.tmp; mv {pids}/{k}.tmp {pids}/{k}; exec sleep 600'"
             for k in range(2)]
    (tmp_path / "plan.txt").write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "loomctl", "run", "-n", "1", "-c", "2", str(tmp_path / "plan.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        started = wait_until(lambda: len(os.listdir(pids)) == 2 and sorted(os.listdir(pids)) == ["0", "1"]
                           or proc.poll() is not None, "both programs to start", timeout=60)
        assert started and proc.poll() is None, proc.communicate()
        children = [int((pids / name).read_text()) for name in ("0", "1")]
        assert all(alive(pid) for pid in children)
        os.killpg(proc.pid, signal.SIGINT)    # what Ctrl-C on a terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and err.decode().strip().endswith("loomctl: error: interrupted"), err
    try:
        wait_until(lambda: not any(alive(pid) for pid in children), "the programs to be gone", timeout=20)
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_on_submit_wait_says_the_job_goes_on(tmp_path):
    (tmp_path / "cluster").mkdir()
    c = Cluster(tmp_path / "cluster", workers=1, cpus=1)
    try:
        (tmp_path / "slow.txt").write_text("sleep 600\n")
        proc = subprocess.Popen([sys.executable, "-m", "loomctl", "submit", "--wait", str(tmp_path / "slow.txt")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=c.env)
        try:
            def running():
                with c.client() as client:
                    return [j for j in client.status()["jobs"] if j["status"] == "running" and j.get("assigned")]
            (row,) = wait_until(running, "the job to run")
            first = proc.stderr.readline()   # a progress line: the command follows the job now
            assert first.startswith(b"progress:"), first
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        job = row["id"]
        last = err.decode().strip().splitlines()[-1]
        assert proc.returncode == 130, err
        assert last.startswith(f"loomctl: error: interrupted; job {job} goes on") and \
            f"loomctl job cancel {job}" in last, last
        assert job_row(c, job)["status"] == "running"
        loomctl("job", "cancel", job, env=c.env, check=0)
    finally:
        c.stop()


# ---------------------------------------------------------------------------- the server


def test_a_dead_servers_access_file_is_reported_at_once(tmp_path):
    (tmp_path / "cluster").mkdir()
    c = Cluster(tmp_path / "cluster", workers=0)
    try:
        pid = c.access["pid"]
        c.server.kill()
        c.server.wait()
        assert os.path.exists(os.path.join(c.server_dir, "access.json"))   # left behind
        (tmp_path / "c.txt").write_text("echo hi\n")
        for command in (["status"], ["job", "list"], ["submit", tmp_path / "c.txt"], ["server", "stop"],
                        ["worker", "start", "--server-dir", c.server_dir]):
            err = one_line_error(loomctl(*command, env=c.env, timeout=20), code=4)
            assert f"the server (pid {pid})" in err and "is gone" in err, (command, err)
    finally:
        c.stop()


def test_the_server_logs_its_start_and_a_normal_stop(tmp_path):
    server_dir = tmp_path / "server"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "loomctl", "server", "start", "--port", "0", "--verbose",
                                 "--server-dir", str(server_dir)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        access = wait_until(lambda: (server_dir / "access.json").exists() and json.loads(
            (server_dir / "access.json").read_text()), "the access file")
        first = wait_until(lambda: log_path.read_text(), "the first log line")
        assert f" INFO listening on 127.0.0.1:{access['port']} (pid {proc.pid}" in first, first
        assert f"server directory {server_dir}" in first
        # a worker's name is printed escaped in the server's log (with --verbose: every event)
        worker = subprocess.Popen([sys.executable, "-m", "loomctl", "worker", "start", "--server-dir", str(server_dir),
                                   "--cpus", "1", "--name", EVIL + "w"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
        try:
            wait_until(lambda: "\\x1b]0;pwned" in log_path.read_text(), "the worker's registration in the log")
        finally:
            worker.terminate()
            worker.wait(20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "loomctl.cli.server INFO stopped (SIGTERM)" in text and "cli.server WARNING" not in text, text
    assert "\x1b" not in text and "\x07" not in text
    assert access["hostname"] and isinstance(access["start_time"], float)


# ---------------------------------------------------------------------------- terminal safety

EVIL = "\x1b]0;pwned\x07\x1b[2J"


def test_text_a_plan_controls_is_escaped_and_cut(cluster, tmp_path):
    long_label = EVIL + "x" * 100_000
    (tmp_path / "evil.py").write_text(
        "from graphfmt import tasks\n"
        f"t = tasks.run(['sh', '-c', 'printf \"\\\\033[2Jgone\" >&2; exit 3'])\nt.label = {long_label!r}\n"
        "results = [t]\n")
    err = final_error(loomctl("run", "-n", "1", tmp_path / "evil.py"), code=1)
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in err and "more characters)" in err and len(err) < 1200
    job = submit(cluster, tmp_path / "evil.py", "--name", EVIL + "name")
    wait_until(lambda: ended(cluster, job), "the job to fail")
    for command in (["job", "list"], ["status"], ["job", "info", job]):
        out = loomctl(*command, env=cluster.env, check=0).stdout.decode()
        assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned" in out, command
    err = one_line_error(loomctl("job", "results", job, env=cluster.env), code=1)
    assert "\x1b" not in err and len(err) < 1200
    rows = json.loads(loomctl("job", "list", "--json", env=cluster.env, check=0).stdout)
    assert any(j["name"] == EVIL + "name" for j in rows)        # the whole text in JSON
    info = json.loads(loomctl("job", "info", "--json", job, env=cluster.env, check=0).stdout)
    assert info["error"]["label"] == long_label
