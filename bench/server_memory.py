"""Server memory over a long life: the sans-I/O core (no sockets, no real workers) runs
many jobs one after another and its RSS is sampled as it goes.

    python bench/server_memory.py                                # 10^8 tasks in 10^5 jobs
    python bench/server_memory.py --jobs 10000 --tasks 1000      # 10^7 tasks, a minute or so
    python bench/server_memory.py --live 1000 --tasks 1000       # bytes per live task

A model worker with many cpus finishes every task it is given (the core's COMPUTE
commands, by global id, as a real worker would see them); each job is a merge tree of
``--tasks`` tasks (or ``--shape flat``: independent consts); its result is released as
soon as the job ends, and the job is retired once it may be (``RETIRE_AFTER_S`` of
simulated time later). ``--live`` jobs are kept whole at the start (their results are
never released): the live work the server must hold for ever.

Figures printed: RSS and the core's own count of the bytes it keeps (``graph.nbytes``)
after the live jobs are in (bytes per live task), then at checkpoints as the other jobs
come and go (bytes per retired task: how RSS grew per task run since the first
checkpoint). Runs against any loomctl core with the same event API (PYTHONPATH=an
older checkout gives the "before" figures).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import graphfmt  # noqa: E402
from graphfmt import tasks  # noqa: E402
from loomctl import messages as M  # noqa: E402
from loomctl.core.server import ServerCore  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plan(shape: str, n: int):
    """A graph of about n tasks: a merge tree (n rounded to 2^k - 1) or n consts."""
    if shape == "flat":
        return graphfmt.build_graph([tasks.const(str(i)) for i in range(n)])[0]
    leaves = max(1, (n + 1) // 2)
    level = [tasks.const(str(i)) for i in range(leaves)]
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    return graphfmt.build_graph([level[0]])[0]


class Model:
    """One worker that finishes whatever it is given at once."""

    def __init__(self, core: ServerCore, cpus: int):
        self.core = core
        self.wid = core.add_worker(b"w", M.Register("w", "h", cpus, {}, [], "tcp://w:1"), 0.0)
        self.given: list[np.ndarray] = []

    def drain(self) -> None:
        for cmd in self.core.take_commands():
            if isinstance(cmd, M.Compute):
                self.given.append(np.array([row.id for row in cmd.rows], dtype=np.int64))

    def run(self, now: float) -> int:
        """Schedule and finish until nothing is left to do; returns the tasks finished."""
        done = 0
        while True:
            self.core.schedule(now)
            self.drain()
            if not self.given:
                return done
            ids = np.concatenate(self.given)
            self.given = []
            self.core.tasks_finished(self.wid, ids, np.full(len(ids), 8, np.int64), np.zeros(len(ids), np.int64),
                                     now)
            self.drain()
            done += len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000, help="jobs run one after another")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per job")
    parser.add_argument("--shape", choices=("tree", "flat"), default="tree")
    parser.add_argument("--live", type=int, default=10, help="jobs kept whole from the start (live work)")
    parser.add_argument("--checkpoints", type=int, default=10)
    args = parser.parse_args()

    graph = plan(args.shape, args.tasks)
    blob = graphfmt.to_bytes(graph)
    n = len(graph)
    core = ServerCore()
    model = Model(core, cpus=64)
    ids_of = getattr(core, "ids_of", lambda rows: rows)
    gc.collect()
    rss0 = rss_mb()
    kept0 = core.graph.nbytes() if hasattr(core.graph, "nbytes") else None
    now = 0.0
    for _ in range(args.live):
        core.submit(b"c", graphfmt.read(blob), now)
        model.run(now)
        model.drain()
    gc.collect()
    rss_live = rss_mb()
    live_tasks = args.live * n
    kept = core.graph.nbytes() - kept0 if kept0 is not None else None
    print(f"{args.live} live jobs, {live_tasks} tasks: RSS {rss_live:.1f} MB (empty core {rss0:.1f} MB): "
          f"{(rss_live - rss0) * 2**20 / max(1, live_tasks):.0f} bytes per live task (RSS)"
          + (f", {kept / max(1, live_tasks):.0f} by the core's count" if kept is not None else ""))
    print(f"{'jobs':>9} {'tasks run':>12} {'rows':>9} {'capacity':>9} {'RSS MB':>8} {'s':>7}")
    every = max(1, args.jobs // args.checkpoints)
    start = time.perf_counter()
    run = 0
    first = None
    for k in range(1, args.jobs + 1):
        job = core.submit(b"c", graphfmt.read(blob), now)
        run += model.run(now)
        core.release(ids_of(job.results))
        model.drain()
        now += 0.5
        core.retire_jobs(now)
        model.drain()
        if k % every == 0 or k == args.jobs:
            gc.collect()
            rss = rss_mb()
            c = core.graph.cols
            rows = getattr(c, "used", c.n)
            print(f"{k:>9} {run:>12} {rows:>9} {c.capacity:>9} {rss:>8.1f} {time.perf_counter() - start:>7.1f}",
                  flush=True)
            if first is None:
                first = (run, rss)
    if first is not None and run > first[0]:
        grown = (rss - first[1]) * 2**20 / (run - first[0])
        print(f"after {run} tasks in {args.jobs} jobs: RSS {rss:.1f} MB; since the first checkpoint "
              f"{grown:.2f} bytes per task run (retired)")


if __name__ == "__main__":
    main()
