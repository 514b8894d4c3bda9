"""Runtime benchmark: loomctl against Dask distributed in the same run, same shape:
a server/scheduler plus 2 worker processes with 1 cpu each, on this machine.

    python bench/runtime.py                 # all shapes, table
    python bench/runtime.py --json --only trivial,true
    python bench/runtime.py --no-dask --only trivial --trace /tmp/trace   # tracing overhead

Shapes:
  trivial   N independent trivial tasks, all N results gathered by the client
            (loomctl: const; Dask: a Python function)
  pytrivial the same with Python function tasks on both sides
  tree      binary merge tree over 2^K leaves
  true      M external programs `true` (1 cpu each), all results gathered
  latency   submit + gather of one const, median over R repetitions

Figures are tasks per second (higher is better) except latency (ms, lower is better);
the ratio column is loomctl / Dask (for latency: Dask / loomctl).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphfmt import tasks  # noqa: E402


class LoomCluster:
    def __init__(self, workers=2, cpus=1, trace=None):
        self.tmp = tempfile.mkdtemp(prefix="loombench-")
        env = dict(os.environ, LOOM_SERVER_DIR=self.tmp, PYTHONPATH=ROOT)
        self.server = subprocess.Popen([sys.executable, "-m", "loomctl", "server", "start", "--port", "0"],
                                       env=env, stderr=subprocess.DEVNULL)
        while not os.path.exists(os.path.join(self.tmp, "access.json")):
            time.sleep(0.02)
        self.workers = [subprocess.Popen([sys.executable, "-m", "loomctl", "worker", "start", "--cpus", str(cpus)],
                                         env=env, stderr=subprocess.DEVNULL) for _ in range(workers)]
        from loomctl.client import Client
        self.client = Client(server_dir_path=self.tmp)
        while self.client.get_stats()["n_workers"] < workers:
            time.sleep(0.05)
        if trace:
            self.client.set_trace(trace)

    def close(self):
        try:
            self.client.terminate()
        except Exception:
            pass
        for p in [*self.workers, self.server]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()


def _inc(x):
    return x + 1


def _true(_):
    subprocess.run(["true"], check=True)
    return 0


def loom_trivial(c, n):
    leaves = [tasks.const(b"%d" % i) for i in range(n)]
    return _timed(lambda: c.gather(c.submit(leaves)), n)


def loom_pytrivial(c, n):
    fn = tasks.py_value(lambda: b"1")
    leaves = [tasks.py_call(fn) for _ in range(n)]
    for leaf in leaves:
        leaf.resource_request = None   # trivial: light, like a Dask task that holds no slot
    return _timed(lambda: c.gather(c.submit(leaves)), n)


def loom_tree(c, k):
    level = [tasks.const(b"x") for _ in range(2 ** k)]
    n = len(level)
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
        n += len(level)
    return _timed(lambda: c.submit_one(tasks.size(level[0])).gather(), n + 1)


def loom_true(c, m):
    runs = [tasks.run("true") for _ in range(m)]
    return _timed(lambda: c.gather(c.submit(runs)), m)


def loom_latency(c, reps):
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.submit_one(tasks.const(b"x")).gather()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1000


def _timed(fn, n):
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def dask_run(shapes, sizes):
    from dask.distributed import Client, LocalCluster
    import dask
    results = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for shape in shapes:
            size = sizes[shape]
            if shape in ("trivial", "pytrivial"):
                def go():
                    client.gather(client.map(_inc, range(size), pure=False))
                results[shape] = _timed(go, size)
            elif shape == "tree":
                def go():
                    level = client.map(_inc, range(2 ** size), pure=False)
                    n = len(level)
                    while len(level) > 1:
                        level = [client.submit(lambda a, b: a + b, level[i], level[i + 1], pure=False)
                                 for i in range(0, len(level), 2)]
                        n += len(level)
                    level[0].result()
                    return n
                t0 = time.perf_counter()
                n = go()
                results[shape] = n / (time.perf_counter() - t0)
            elif shape == "true":
                def go():
                    client.gather(client.map(_true, range(size), pure=False))
                results[shape] = _timed(go, size)
            elif shape == "latency":
                samples = []
                for i in range(size):
                    t0 = time.perf_counter()
                    client.submit(_inc, i, pure=False).result()
                    samples.append(time.perf_counter() - t0)
                results[shape] = statistics.median(samples) * 1000
        del dask
    return results


SHAPES = {"trivial": (loom_trivial, 10_000), "pytrivial": (loom_pytrivial, 10_000),
          "tree": (loom_tree, 15), "true": (loom_true, 1000), "latency": (loom_latency, 200)}
TARGETS = {"trivial": 10.0, "pytrivial": None, "tree": None, "true": 1.5, "latency": None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SHAPES))
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace", metavar="DIR", help="trace the loomctl jobs into DIR (client.set_trace)")
    for shape, (_, size) in SHAPES.items():
        parser.add_argument(f"--{shape}-size", type=int, default=size)
    args = parser.parse_args()
    shapes = args.only.split(",")
    sizes = {s: getattr(args, f"{s}_size") for s in shapes}
    loom = {}
    cluster = LoomCluster(trace=args.trace)
    try:
        for shape in shapes:
            loom[shape] = SHAPES[shape][0](cluster.client, sizes[shape])
    finally:
        cluster.close()
    dask = {} if args.no_dask else dask_run(shapes, sizes)
    rows = []
    for shape in shapes:
        l, d = loom[shape], dask.get(shape)
        ratio = None if d is None else (d / l if shape == "latency" else l / d)
        rows.append({"shape": shape, "size": sizes[shape], "loomctl": round(l, 2),
                     "dask": None if d is None else round(d, 2), "ratio": None if ratio is None else round(ratio, 2),
                     "unit": "ms" if shape == "latency" else "tasks/s"})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        from tabulate import tabulate
        print(tabulate([[r["shape"], r["size"], r["loomctl"], r["dask"], r["ratio"], r["unit"]] for r in rows],
                       headers=["shape", "size", "loomctl", "dask", "loomctl/dask", "unit"]))


if __name__ == "__main__":
    main()
