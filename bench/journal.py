"""The journal's size and a restore's time, on the sans-I/O core (no processes).

    /work/venv/bin/python bench/journal.py                  # a 2^19-leaf merge tree (1M tasks)
    /work/venv/bin/python bench/journal.py --leaves-log2 12 --jobs 2000

Shape 1: one job of a merge tree whose leaves all finished (as after a crash half-way):
journal bytes per task, the time to write it, and the time ``restore`` takes to rebuild
the core from it. Shape 2: many one-task jobs run to the end: journal bytes per job
before and after a compaction (ended jobs that retired are dropped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import graphfmt  # noqa: E402
from graphfmt import tasks  # noqa: E402
from loomctl import messages as M  # noqa: E402
from loomctl.core import transitions as T  # noqa: E402
from loomctl.core.restore import restore, snapshot  # noqa: E402
from loomctl.core.tasktable import ASSIGNED  # noqa: E402
from loomctl.core.server import ServerCore  # noqa: E402
from loomctl.server import journal as J  # noqa: E402


def tree(log2: int):
    level = [tasks.const(f"leaf{i}") for i in range(1 << log2)]
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    return level[0]


def drain(core, journal, now):
    for record in core.record:
        journal.add(record)
    core.record = []
    journal.flush(now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves-log2", type=int, default=19)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        # shape 1: a big job, leaves finished
        path = os.path.join(d, "journal")
        journal = J.Journal(path)
        core = ServerCore()
        core.record = []
        wid = core.add_worker(b"w", M.Register("w", "h", 4, {}, [], "tcp://w:1"), 0.0)
        graph_bytes = graphfmt.to_bytes(graphfmt.build_graph([tree(args.leaves_log2)])[0])
        job = core.submit(None, graphfmt.read(graph_bytes), 0.0, detached=True)
        core.record.insert(0, ["job", job.id, job.base, graph_bytes, {"detached": True}])
        n = job.n
        leaves = job.base + np.flatnonzero(np.diff(graphfmt.read(graph_bytes).input_offsets) == 0)
        t0 = time.perf_counter()
        for k in range(0, len(leaves), 4096):   # finish reports as workers send them, in batches
            batch = leaves[k:k + 4096]
            T.transition(core, batch, ASSIGNED, wid)   # (as the scheduler would have)
            core.tasks_finished(wid, batch, np.full(len(batch), 8), np.zeros(len(batch), np.int64), 0.0)
        drain(core, journal, 1.0)
        write_s = time.perf_counter() - t0
        size = os.path.getsize(path)
        records, end, dropped = J.load(path)
        t0 = time.perf_counter()
        fresh = ServerCore()
        summary = restore(fresh, records, 0.0, 0.0)
        restore_s = time.perf_counter() - t0
        out["big_job"] = {"tasks": int(n), "finished": int(len(leaves)), "journal_bytes": size,
                          "graph_bytes": len(graph_bytes), "bytes_per_task": round(size / n, 1),
                          "record_and_write_s": round(write_s, 3), "load_and_restore_s": round(restore_s, 3),
                          "restored_finished": summary["tasks_finished"]}
        journal.close()
        # shape 2: many small jobs
        path = os.path.join(d, "journal2")
        journal = J.Journal(path)
        core = ServerCore()
        core.record = []
        wid = core.add_worker(b"w", M.Register("w", "h", 4, {}, [], "tcp://w:1"), 0.0)
        one = graphfmt.to_bytes(graphfmt.build_graph([tasks.const("x")])[0])
        for k in range(args.jobs):
            mark = len(core.record)
            job = core.submit(b"c", graphfmt.read(one), float(k))
            core.record.insert(mark, ["job", job.id, job.base, one, {}])
            core.schedule(float(k))
            core.take_commands()
            core.tasks_finished(wid, job.results.copy(), np.ones(1, np.int64), np.zeros(1, np.int64), float(k))
            core.release(job.results.copy())
            core.take_commands()
            core.retire_jobs(float(k) + 0.5)
        core.retire_jobs(float(args.jobs) + 5)
        drain(core, journal, 2.0)
        before = os.path.getsize(path)
        journal.compact(snapshot(core, {}), 3.0)
        after = os.path.getsize(path)
        out["small_jobs"] = {"jobs": args.jobs, "bytes_per_job": round(before / args.jobs, 1),
                             "bytes_after_compaction": after, "live_jobs": len(core.jobs)}
        journal.close()
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for shape, figures in out.items():
            print(shape + ": " + ", ".join(f"{k} {v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
