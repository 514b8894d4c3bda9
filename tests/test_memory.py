"""Worker memory limits end to end, against real server and worker processes: data
beyond the limit is spilled to the worker's directory and read back, a task whose result
alone breaks the limit fails while its worker lives, and status shows memory."""

import glob
import json
import os
import subprocess
import sys

import pytest

from graphfmt import tasks
from loomctl.client import TaskFailed
from cluster import Cluster, wait_until

MB = 1 << 20
LIMIT = 300 * MB


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def spill_files(cluster) -> list:
    return glob.glob(os.path.join(cluster.dir, "work-*", "worker-*", "spill", "*"))


def status(cluster) -> dict:
    out = subprocess.run([sys.executable, "-m", "loomctl", "status", "--json"], env=cluster.env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def block(i: int) -> bytes:
    return i.to_bytes(4, "little") * (50 * MB // 4)


@pytest.fixture
def limited(tmp_path):
    c = Cluster(tmp_path, workers=2, cpus=1, worker_args=["--memory-limit", "300M"])
    yield c
    c.stop()


def test_two_workers_hold_1_6_gb_of_results_within_their_300_mb_limits(limited):
    @tasks.py_task(n_direct_args=1)
    def make(i):
        return i.to_bytes(4, "little") * (50 * (1 << 20) // 4)

    with limited.client() as client:
        futures = client.submit([make(i) for i in range(32)])
        client.wait(futures)
        workers = status(limited)["workers"]
        assert sum(w["data_objects"] for w in workers) == 32
        assert sum(w["spilled_objects"] for w in workers) >= 20, workers   # most of 1.6 GB is on disk
        assert all(w["memory_limit"] == LIMIT for w in workers)
        assert len(spill_files(limited)) >= 20
        for i, future in enumerate(futures):
            assert future.fetch() == block(i), f"result {i}"
            future.release()
        wait_until(lambda: not spill_files(limited), "the spill files to go")
        wait_until(lambda: client.get_stats()["n_data_objects"] == 0, "the data to go")
    peaks = [peak_rss(p.pid) for p in limited.workers]
    print("peak RSS of the workers (MiB):", [round(p / MB) for p in peaks])
    assert all(p <= 1.25 * LIMIT for p in peaks), peaks
