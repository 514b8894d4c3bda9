"""Jobs that do what they say, end to end on a long-lived server: cancel stops running
programs and starts nothing more, results and errors use the plan's own task ids, the
counts of dynamic plans add up."""

import json
import os
import subprocess
import sys

from graphfmt import tasks
import graphfmt
from cluster import Cluster
from test_reliability import wait_until


def loomctl(c, *args, check=True):
    out = subprocess.run([sys.executable, "-m", "loomctl", *args], env=c.env, capture_output=True, text=True,
                         timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def pids_alive(pids) -> list:
    return [p for p in pids if os.path.exists(f"/proc/{p}") and
            open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] != "Z"]


def test_cancel_kills_running_programs_and_starts_nothing_more(tmp_path):
    c = Cluster(tmp_path, workers=2, cpus=1)
    marks = tmp_path / "pids"
    marks.mkdir()
    try:
        plan = tmp_path / "plan.loom"
        graphfmt.write(str(plan), [tasks.run(["sh", "-c", f"echo $$ > {marks}/{i}; sleep 60"]) for i in range(6)])
        job = json.loads(loomctl(c, "submit", str(plan), "--json").stdout)["job"]
        wait_until(lambda: len(os.listdir(marks)) >= 2, 30)          # two are running (one per cpu)
        pids = [int((marks / name).read_text()) for name in os.listdir(marks)]
        loomctl(c, "job", "cancel", str(job))
        wait_until(lambda: not pids_alive(pids), 20)                  # killed, not left to run 60 s
        info = json.loads(loomctl(c, "job", "info", str(job), "--json").stdout)
        assert info["status"] == "cancelled"
        with c.client() as client:                                    # nothing of it runs any more
            wait_until(lambda: all(w["assigned"] == 0 for w in client.status()["workers"]), 20)
            assert client.submit_one(tasks.const("next")).gather() == b"next"
        assert len(os.listdir(marks)) == 2                            # the queued four never started
        assert loomctl(c, "job", "results", str(job), check=False).returncode != 0
    finally:
        c.stop()


def test_results_and_errors_use_the_plans_own_ids_on_a_long_lived_server(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1)
    try:
        first = tmp_path / "first.loom"
        graphfmt.write(str(first), [tasks.merge([tasks.const(str(i)) for i in range(20)])])
        loomctl(c, "submit", "--wait", str(first), "-o", str(tmp_path / "out1"))
        plan = tmp_path / "plan.loom"
        a = tasks.const("a")
        graphfmt.write(str(plan), [tasks.merge([a, tasks.const("b")]), a])
        ids = graphfmt.read(str(plan)).result_ids().tolist()   # the plan's own ids
        loomctl(c, "submit", "--wait", str(plan), "-o", str(tmp_path / "out2"))
        assert sorted(os.listdir(tmp_path / "out2")) == [f"result-{i}" for i in ids]
        bad = tmp_path / "bad.loom"
        graphfmt.write(str(bad), [tasks.run(["sh", "-c", "exit 3"], [(tasks.const("x"), None)])])
        out = loomctl(c, "submit", "--wait", str(bad), check=False)
        assert out.returncode == 1 and "failed: task 1 " in out.stderr, out.stderr   # its id in the plan
    finally:
        c.stop()


def test_the_counts_of_a_dynamic_plan_add_up(tmp_path):
    c = Cluster(tmp_path, workers=2, cpus=1)
    try:
        with c.client() as client:
            text = tasks.const("".join(f"line {i}\n" for i in range(40)))
            lines = tasks.split(text)
            count = tasks.array_make([tasks.run(["wc", "-l"], [(tasks.dslice(lines), None)])])
            future = client.submit_one(count)
            client.wait([future])
            (job,) = [j for j in client.status()["jobs"] if j["status"] == "finished"]
            assert job["finished"] == job["total"] and job["total"] > 5, job   # the pieces counted
            parts = future.gather()
            assert sum(int(p) for p in parts) == 40
    finally:
        c.stop()
