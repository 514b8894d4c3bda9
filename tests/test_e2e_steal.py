"""End to end: work stealing between real worker processes (``server start --steal``).

A 1-cpu worker is given two tasks that wait for a file (one runs, one is queued) while a
third waits in the server; a second worker with 2 cpus joins and takes the third. With
--steal its idle cpu makes the server ask the first worker for its queued task
(STEAL_TASKS), which it gives back (UPDATE returned) and which then runs on the second
worker; without, the queued task waits for its worker. Every wait is for an event; the
file lets the tasks end only once what is checked was seen."""

import json
import subprocess
import sys

import pytest

from graphfmt import tasks
from cluster import Cluster, wait_until


def gated(gate: str, k: int):
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo task{k}"
    return tasks.run(["sh", "-c", script])


def status_json(cluster) -> dict:
    out = subprocess.run([sys.executable, "-m", "loomctl", "status", "--json"], env=cluster.env,
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def running(client) -> int:
    return sum(w["running"] or 0 for w in client.status()["workers"])


@pytest.mark.parametrize("steal", [True, False], ids=["steal", "no-steal"])
def test_a_worker_that_joins_takes_queued_tasks_from_a_loaded_one_only_with_steal(tmp_path, steal):
    c = Cluster(tmp_path, workers=1, cpus=1, server_args=["--steal" if steal else "--no-steal"])
    gate = str(tmp_path / "go")
    try:
        with c.client() as client:
            futures = client.submit([gated(gate, k) for k in range(3)])
            wait_until(lambda: running(client) == 1, "the first task to run")
            c.add_worker(cpus=2, name="w1")
            c.wait_workers(2)
            if steal:
                wait_until(lambda: c.stats().get("stolen"), "a task given back by the loaded worker")
            # the new worker runs the task that waited in the server (and, stolen, the queued one)
            wait_until(lambda: running(client) == (3 if steal else 2), "the tasks to run")
            open(gate, "w").close()
            assert client.gather(futures) == [b"task0\n", b"task1\n", b"task2\n"]
        status = status_json(c)
        assert status["server"]["steal"] is steal
        assert status["stats"].get("stolen", 0) == (1 if steal else 0)
        done = {w["name"]: w["tasks_done"] for w in status["workers"]}
        assert done == ({"w0": 1, "w1": 2} if steal else {"w0": 2, "w1": 1}), done
    finally:
        c.stop()
