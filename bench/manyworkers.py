"""Many workers on one machine: a real server with 32 worker processes of 1 cpu, and
tasks that sleep (so that 32 "cpus" fit on a 2-core machine); against the same tasks on
2 workers. Reports how busy the workers' cpus were and the server's CPU per task.

    /work/venv/bin/python bench/manyworkers.py                        # 32 workers x 100k tasks
    /work/venv/bin/python bench/manyworkers.py --tasks 20000 --json
    /work/venv/bin/python bench/manyworkers.py --workers 8 --tasks 2000 --steal   # work stealing on

Each task is a Python function that sleeps --sleep seconds (default 0.05) and returns a
few bytes; every result is gathered. Busy = tasks x sleep / (workers x wall time): 1.0
means no cpu ever waited for the server. The goal: busy close to 1 at 32 workers, and
the server's CPU per task there within 2x of its figure at 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from runtime import LoomCluster  # noqa: E402

from graphfmt import tasks  # noqa: E402


def _nap(seconds):
    time.sleep(seconds)
    return b"z"


def run(workers: int, n: int, sleep: float, steal: bool = False, uneven: int = 0) -> dict:
    cluster = LoomCluster(workers=workers, cpus=1, steal=steal)
    try:
        before = cluster.cpu()
        fn = tasks.py_value(_nap)   # one function object, 1 cpu per call
        naps = [sleep * (uneven if uneven and k % uneven == 0 else 1) for k in range(n)]
        plan = [tasks.py_call(fn, direct_args=(nap,)) for nap in naps]
        t0 = time.perf_counter()
        results = cluster.client.submit(plan)
        values = cluster.client.gather(results)
        wall = time.perf_counter() - t0
        assert len(values) == n and all(v == b"z" for v in values), "wrong results"
        after = cluster.cpu()
        stats = cluster.client.get_stats()
    finally:
        cluster.close()
    work = sum(naps)
    return {"workers": workers, "tasks": n, "sleep_s": sleep, "steal": steal, "wall_s": round(wall, 2),
            "lower_bound_s": round(work / workers, 2), "busy": round(work / (workers * wall), 3),
            "stolen": stats.get("stolen", 0), "steal_requests": stats.get("steal_requests", 0),
            "server_us_per_task": round((after["server"] - before["server"]) / n * 1e6, 1),
            "worker_us_per_task": round((after["workers"] - before["workers"]) / n * 1e6, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--small-tasks", type=int, default=2000, help="tasks of the 2-worker run")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steal", action="store_true", help="the server steals work (server start --steal)")
    parser.add_argument("--uneven", type=int, default=0, metavar="K",
                        help="every K-th task sleeps K times as long (work stealing's case)")
    args = parser.parse_args()
    rows = [run(2, args.small_tasks, args.sleep, args.steal, args.uneven),
            run(args.workers, args.tasks, args.sleep, args.steal, args.uneven)]
    rows[1]["server_cpu_vs_2_workers"] = round(rows[1]["server_us_per_task"] / rows[0]["server_us_per_task"], 2)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    keys = list(rows[1])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
