"""Tracing end to end: real server and worker processes run a traced job; the trace
holds every executed task exactly once, on the worker that ran it, and every data
transfer the run needed; the trace commands read it; an untraced job adds nothing."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from graphfmt import tasks
from loomctl.cli import app
from loomctl.trace.reader import read_trace
from cluster import Cluster
from clihelp import loomctl
from test_trace import validate_chrome


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("trace"), workers=2, cpus=2)
    yield c
    c.stop()


def plan():
    def _work(ctx, data):   # nested: pickled by value, the workers cannot import this module
        import time
        ctx.log_info(f"got {len(data.read())} bytes")
        time.sleep(0.05)
        return data.read().upper()

    leaves = [tasks.const(b"x" * (1000 + k)) for k in range(8)]
    work = tasks.py_value(_work)
    mids = []
    for k, leaf in enumerate(leaves):
        t = tasks.py_call(work, [leaf], context=True)
        t.label = f"work:{k}"
        mids.append(t)
    sleeps = [tasks.run(["sleep", "0.05"]) for _ in range(2)]
    for k, s in enumerate(sleeps):
        s.label = f"sleep:{k}"
    total = tasks.merge(mids + sleeps)
    total.label = "total"
    return total


def wait_closed(directory, files=3, timeout=10.0):
    """The trace once every file is complete (the TRACE-off reaches workers after the
    client has its results)."""
    deadline = time.time() + timeout
    while True:
        trace = read_trace(directory)
        if len(trace.files) == files and all(f.ended for f in trace.files) or time.time() > deadline:
            return trace
        time.sleep(0.05)


def test_traced_job_end_to_end(cluster, tmp_path):
    directory = str(tmp_path / "trace")
    with cluster.client() as client:
        client.set_trace(directory)
        future = client.submit_one(plan())
        assert len(future.gather()) == 8 * 1000 + 28
        job = future.job
        job_tasks = set(range(future.task_id - 19, future.task_id + 1))   # 8 const, value, 8 calls, 2 runs, merge
    trace = wait_closed(directory)
    assert trace.notes == [], trace.notes
    assert sorted(f.name for f in trace.files) == ["server.trace", "worker-w0.trace", "worker-w1.trace"]

    # every executed task exactly once, start <= end, on the worker the server chose
    ids = [t["id"] for t in trace.tasks]
    assert sorted(ids) == sorted(job_tasks), (sorted(ids), sorted(job_tasks))
    worker_id = {name: w["id"] for name, w in trace.workers.items()}
    for t in trace.tasks:
        assert t["t0"] <= t["t1"], t
        assert trace.assigned[t["id"]] == worker_id[t["worker"]], t
        assert t["status"] == "ok" and t["job"] == job, t
    # cpu tasks never overlap on one slot
    by_slot = {}
    for t in trace.tasks:
        if t["slot"] >= 0:
            by_slot.setdefault((t["worker"], t["slot"]), []).append((t["t0"], t["t1"]))
    for spans in by_slot.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert {t["slot"] for t in trace.tasks if t["sym"] == "loom/data/const"} == {-1}   # inline

    # every input produced on another worker arrived by a recorded transfer
    where = {t["id"]: t["worker"] for t in trace.tasks}
    fetched = {}
    for x in trace.transfers:
        assert x["t0"] <= x["t1"] and x["bytes"] > 0 and x["src"] in worker_id
        fetched.setdefault(x["dst"], set()).update(int.from_bytes(x["ids"][k:k + 8], "little")
                                                   for k in range(0, len(x["ids"]), 8))
    moved = {(t["worker"], i) for t in trace.tasks for i in t["in"] if where[i] != t["worker"]}
    assert all(i in fetched.get(w, ()) for w, i in moved), (moved, fetched)
    assert {t["worker"] for t in trace.tasks} == {"w0", "w1"} and moved and trace.transfers

    assert sorted(entry["msg"] for entry in trace.logs) == sorted(f"got {1000 + k} bytes" for k in range(8))
    assert trace.rounds and sum(r["placed"] for r in trace.rounds) >= len(job_tasks)
    assert trace.jobs[job]["status"] == "finished" and trace.jobs[job]["n"] == len(job_tasks)

    runner = CliRunner()
    data = json.loads(runner.invoke(app, ["trace", "summary", "--json", directory]).output)
    assert data["tasks"]["count"] == len(job_tasks) and data["transfers"]["count"] == len(trace.transfers)
    assert {r["group"] for r in data["by_label"]} >= {"work", "sleep", "total"}
    assert data["critical_path"]["tasks"] >= 2     # e.g. const or value -> call -> merge, or run -> merge
    picture = tmp_path / "timeline.svg"
    out = runner.invoke(app, ["trace", "timeline", directory, "-o", str(picture)])
    assert out.exit_code == 0, out.output
    svg = picture.read_text()
    assert svg.count("<title>task ") >= 8 + 2 + 1 and "work: 8 tasks" in svg    # inline consts may merge
    chrome = tmp_path / "chrome.json"
    assert runner.invoke(app, ["trace", "export", directory, "--chrome", str(chrome)]).exit_code == 0
    validate_chrome(json.loads(chrome.read_text()))

    # a later job without a trace adds nothing to the directory
    sizes = {f: os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)}
    with cluster.client() as client:
        assert client.submit_one(plan()).gather()
    time.sleep(0.6)
    assert {f: os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)} == sizes


def test_loomctl_run_with_trace(tmp_path):
    plan_file = tmp_path / "plan.txt"
    plan_file.write_text("echo one\necho two\n")
    proc = loomctl("run", "-q", "-n", "2", "--trace", tmp_path / "tr", plan_file, cwd=tmp_path, check=0)
    assert b"one" in proc.stdout
    trace = read_trace(str(tmp_path / "tr"))
    assert len(trace.tasks) >= 2 and any(f.name == "server.trace" for f in trace.files)
    summary = loomctl("trace", "summary", tmp_path / "tr", check=0).stdout.decode()
    assert "Tasks per type" in summary
