"""A short soak: small jobs one after another against a real server and two workers.
After a warm-up the server's tables stay the size of its live work (rows in use, jobs
kept) and its RSS and the workers' stay flat within a bound far below what a leak of a
few hundred bytes per job would cost. `bench/soak.py` runs the long version and prints
the curve.

LOOMCTL_SOAK_JOBS sets the measured jobs (default 3,000)."""

import os
import time

from graphfmt import tasks
from cluster import Cluster
from loomctl.core.jobs import JOB_HISTORY

JOBS = int(os.environ.get("LOOMCTL_SOAK_JOBS", "3000"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_jobs(client, n: int) -> None:
    for i in range(n):
        assert client.submit_one(tasks.const(b"%d" % i)).gather() == b"%d" % i


def test_small_jobs_leave_the_server_and_workers_flat(tmp_path):
    c = Cluster(tmp_path, workers=2, cpus=1)
    try:
        with c.client() as client:
            # warm-up: caches, allocator arenas, and the status history of retired jobs,
            # which grows to JOB_HISTORY rows (after 1,500 jobs it was still filling: the
            # test measured that, up to 2.7 MB, while bench/soak.py stays flat for minutes)
            # and the peaks of jobs kept RETIRE_AFTER_S after they ended (as many as the
            # machine runs in that time): "before" is the highest RSS of a second warm-up
            run_jobs(client, 1500)
            while client.get_stats()["retired_jobs"] < JOB_HISTORY + 200:
                run_jobs(client, 100)
            procs = [c.server, *c.workers]
            before = {p.pid: 0 for p in procs}
            for _ in range(6):
                run_jobs(client, 250)
                before = {p.pid: max(before[p.pid], rss_kb(p.pid)) for p in procs}
            warm = client.get_stats()["n_tasks"]
            run_jobs(client, JOBS)
            after = {p.pid: rss_kb(p.pid) for p in procs}
            live_at_end = client.get_stats().get("live_tasks")
            # every ended job is retired RETIRE_AFTER_S after it ended, its rows freed for
            # reuse: wait for that (how many are live at the last job depends only on how
            # many jobs a second this machine runs, ~1,000 here, so it proves nothing)
            deadline = time.monotonic() + 30
            stats = client.get_stats()
            while stats.get("live_tasks") and time.monotonic() < deadline:
                time.sleep(0.1)
                stats = client.get_stats()
        growth_kb = sum(after[p] - before[p] for p in before)
        print(f"{JOBS} jobs: RSS growth {growth_kb} kB in total "
              f"({growth_kb / JOBS * 1000:.0f} kB per 1,000 jobs); live tasks {live_at_end} at the last job")
        # all rows are free once the jobs retired, and the three processes grow by less
        # than the 2 MB for ten minutes of such jobs
        assert stats.get("live_tasks") == 0 and stats["n_tasks"] == warm + JOBS, stats
        assert growth_kb < 2048, f"RSS grew {growth_kb} kB over {JOBS} jobs"
    finally:
        c.stop()
