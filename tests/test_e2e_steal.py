"""End to end: work stealing between real worker processes (``server start --steal``).

A 1-cpu worker is given two tasks that wait for a file (one runs, one is queued) while a
third waits in the server; a second worker with 2 cpus joins, takes the third, and its
idle cpu makes the server ask the first worker for its queued task (STEAL_TASKS), which
it gives back (UPDATE returned) and which then runs on the second worker. Every wait is
for an event; the file lets the tasks end only once the move was seen."""

import json
import os
import subprocess
import sys

import pytest

from graphfmt import tasks
from cluster import Cluster, wait_until


def gated(gate: str, k: int):
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo task{k}"
    return tasks.run(["sh", "-c", script])


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1, server_args=["--steal"])
    yield c
    c.stop()


def status_json(cluster) -> dict:
    out = subprocess.run([sys.executable, "-m", "loomctl", "status", "--json"], env=cluster.env,
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_a_worker_that_joins_takes_queued_tasks_from_a_loaded_one(cluster, tmp_path):
    gate = str(tmp_path / "go")
    with cluster.client() as client:
        futures = client.submit([gated(gate, k) for k in range(3)])
        wait_until(lambda: sum(w["running"] or 0 for w in client.status()["workers"]) == 1,
                   "the first task to run", step=0.05)
        cluster.add_worker(cpus=2, name="w1")
        cluster.wait_workers(2)
        stats = wait_until(lambda: (lambda s: s if s.get("stolen") else None)(cluster.stats()),
                           "a task given back by the loaded worker")
        assert stats["stolen"] == 1 and stats["steal_requests"] >= 1
        open(gate, "w").close()
        assert client.gather(futures) == [b"task0\n", b"task1\n", b"task2\n"]
    status = status_json(cluster)
    assert status["server"]["steal"] is True and status["stats"]["stolen"] == 1
    done = {w["name"]: w["tasks_done"] for w in status["workers"]}
    assert done == {"w0": 1, "w1": 2}, done


def test_without_steal_the_queued_task_waits_for_its_worker(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1)
    try:
        gate = str(tmp_path / "go")
        with c.client() as client:
            futures = client.submit([gated(gate, k) for k in range(3)])
            wait_until(lambda: sum(w["running"] or 0 for w in client.status()["workers"]) == 1,
                       "the first task to run", step=0.05)
            c.add_worker(cpus=2, name="w1")
            c.wait_workers(2)
            # the new worker runs the task that waited in the server, and nothing else
            wait_until(lambda: sum(w["running"] or 0 for w in client.status()["workers"]) == 2,
                       "the second worker to run the task that waited", step=0.05)
            open(gate, "w").close()
            assert client.gather(futures) == [b"task0\n", b"task1\n", b"task2\n"]
            status = client.status()
        assert "stolen" not in status["stats"] and not status["server"]["steal"]
        assert {w["name"]: w["tasks_done"] for w in status["workers"]} == {"w0": 2, "w1": 1}
    finally:
        c.stop()
