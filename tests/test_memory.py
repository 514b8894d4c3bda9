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
        # most of the 1.6 GB is on disk (as the workers' next heartbeats say)
        workers = wait_until(lambda: (lambda ws: ws if sum(w["spilled_objects"] for w in ws) >= 20 else None)(
            status(limited)["workers"]), "most results to be spilled")
        assert sum(w["data_objects"] for w in workers) == 32
        assert all(w["memory_limit"] == LIMIT and w["spilled_bytes"] >= 8 * 50 * MB for w in workers), workers
        assert len(spill_files(limited)) >= 20
        for i, future in enumerate(futures):
            assert future.fetch() == block(i), f"result {i}"
            future.release()
        wait_until(lambda: not spill_files(limited), "the spill files to go")
        wait_until(lambda: client.get_stats()["n_data_objects"] == 0, "the data to go")
    peaks = [peak_rss(p.pid) for p in limited.workers]
    print("peak RSS of the workers (MiB):", [round(p / MB) for p in peaks])
    assert all(p <= 1.25 * LIMIT for p in peaks), peaks


def test_spilled_objects_reach_another_worker_streamed_from_their_files(tmp_path):
    c = Cluster(tmp_path, workers=0)
    try:   # (named resources put the producers on w0 and the consumers on w1)
        c.add_worker(cpus=1, name="w0", extra=["--memory-limit", "300M", "-r", "side_a=1"])
        c.add_worker(cpus=1, name="w1", extra=["--memory-limit", "300M", "-r", "side_b=1"])
        c.wait_workers(2)

        @tasks.py_task(n_direct_args=1, request=tasks.ResourceRequest(1, side_a=1))
        def make(i):
            return i.to_bytes(4, "little") * (50 * (1 << 20) // 4)

        @tasks.py_task(request=tasks.ResourceRequest(1, side_b=1))
        def digest(block, _after_all_blocks):
            import hashlib
            return hashlib.sha256(block.read()).hexdigest()

        import hashlib
        blocks = [make(i) for i in range(12)]
        all_made = tasks.merge([tasks.size(b) for b in blocks])   # (the sizes run where the blocks are)
        with c.client() as client:
            results = client.gather(client.submit([digest(b, all_made) for b in blocks]))
            assert results == [hashlib.sha256(block(i)).hexdigest().encode() for i in range(12)]
            assert client.get_stats()["transfer_bytes"] >= 12 * 50 * MB
            # most blocks went from w0's spill files (as its next heartbeats say)
            wait_until(lambda: next(w for w in status(c)["workers"] if w["name"] == "w0")["streamed_bytes"]
                       >= 6 * 50 * MB, "w0 to have streamed most blocks from its spill files")
        peaks = [peak_rss(p.pid) for p in c.workers]
        print("peak RSS of the workers (MiB):", [round(p / MB) for p in peaks])
        assert all(p <= 1.25 * LIMIT for p in peaks), peaks
    finally:
        c.stop()


def test_a_result_larger_than_the_limit_fails_and_the_worker_runs_the_next_job(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1, worker_args=["--memory-limit", "100M"])
    try:
        @tasks.py_task()
        def huge():
            return b"x" * (150 * (1 << 20))

        with c.client() as client:
            with pytest.raises(TaskFailed) as failed:
                client.submit_one(huge()).gather()
            assert "larger than this worker's memory limit (100.0 MiB, --memory-limit)" in failed.value.error_msg
            with pytest.raises(TaskFailed) as failed:
                client.submit_one(tasks.run("head -c 200000000 /dev/zero")).gather()
            assert "standard output of program 'head' passed this worker's memory limit" in failed.value.error_msg
            assert client.submit_one(tasks.merge([tasks.const("still "), tasks.const("here")])).gather() \
                == b"still here"
            assert c.workers[0].poll() is None
            assert client.get_stats()["n_workers"] == 1
    finally:
        c.stop()


def test_status_shows_memory_per_worker(limited):
    out = subprocess.run([sys.executable, "-m", "loomctl", "status"], env=limited.env,
                         capture_output=True, text=True, check=True).stdout
    header = next(line for line in out.splitlines() if "worker" in line and "limit" in line)
    assert header.split()[-3:] == ["memory", "limit", "spilled"]
    rows = [line for line in out.splitlines() if line.split()[1:2] in (["w0"], ["w1"])]
    assert len(rows) == 2 and all("300.0 MiB" in row for row in rows), out


def test_the_pieces_of_a_large_consts_split_leave_memory_for_the_disk_and_come_back_right(limited):
    """A 240 MB const (above the 180 MB spill threshold) is written out when it arrives
    (its frame counted once: see test_worker_state), read back for its split, and the
    split's 240 pieces, kept as results, go to the disk and come back intact."""
    line = bytes(range(32, 127)) * (MB // 95) + b"\n"
    data = b"".join(bytes([65 + i % 26]) + line[1:] for i in range(240))
    with limited.client() as client:
        lines = tasks.split(tasks.const(data))
        futures = client.submit([tasks.get(lines, i) for i in range(240)])
        client.wait(futures)
        wait_until(lambda: len(spill_files(limited)) >= 120, "most pieces to be spilled")
        for i, future in enumerate(futures):
            assert future.fetch() == bytes([65 + i % 26]) + line[1:], f"piece {i}"
    peaks = [peak_rss(p.pid) for p in limited.workers]
    print("peak RSS of the workers (MiB):", [round(p / MB) for p in peaks])
    # the const must be whole in memory while it is cut: the limit, and it once (776 MB when
    # the spill thread kept the const it had read back: 535 MB now)
    assert all(p <= 1.25 * LIMIT + len(data) for p in peaks), peaks
