"""Runtime benchmark: loomctl against Dask distributed in the same run, same shape:
a server/scheduler plus 2 worker processes with 1 cpu each, on this machine.

    python bench/runtime.py                       # every shape, table
    python bench/runtime.py --json --only trivial,true
    python bench/runtime.py --no-dask --only trivial --trace /tmp/trace   # tracing overhead
    python bench/runtime.py --only true --true-size 3000 --repeat 3        # best of 3

Shapes (the issue's targets in brackets):
  trivial    N independent trivial tasks, every result gathered by the client
             (loomctl: const; Dask: a Python function)            [>= 50x Dask tasks/s]
  pytrivial  N Python function tasks on both sides, results gathered
  tree       binary merge tree over 2^K small leaves              [>= 50x Dask tasks/s]
  mapreduce  a 10 MB object cut into M slices, each processed by a Python function,
             the pieces merged into one 10 MB result and gathered  [>= 5x Dask]
  true       M external programs `true` (1 cpu each), results gathered  [>= 2,000/s;
             >= 65% of the spawn limit: what two Python processes reach starting and
             reaping `true` in a bare posix_spawn loop, measured right after]
  locality   8 chains of L Python tasks, each turning a 4 MB object into the next
             [zero worker-to-worker transfers, time <= Dask's]
  scale      a binary merge tree of 2^K leaves (1M tasks for K=19), on a fresh server;
             loomctl only                               [completes, server peak RSS <= 150 MB]
  chain      N tasks, const -> merge -> merge ..., each the next one's only input; loomctl
             only (default 100k; --chain-size 1000000 for the issue's) [1M in <= 30 s]
  latency    submit + gather of one const, median over R repetitions   [<= 2 ms]

For every loomctl shape the table also says where CPU time went, per task: in the
server, in the worker processes, and in the programs they started (from /proc).
Rates are tasks per second (higher is better), times are seconds and latency is
milliseconds (lower is better); the ratio column is always "how many times better
loomctl is" (loomctl / Dask for rates, Dask / loomctl for times).
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

import graphfmt  # noqa: E402
from graphfmt import tasks  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MB = 1 << 20


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process, from /proc. Its own is the sum
    of its threads' time on a cpu in nanoseconds (schedstat): /proc's user and system
    times count clock ticks (10 ms), as much as a whole 2^10 tree's server CPU. Where
    those ticks say more than the threads alive now account for (a thread ended, and
    its time left schedstat with it), the ticks are taken."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    ticks = (utime + stime) / CLOCK_TICKS
    precise, threads = 0.0, 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                precise += int(f.read().split()[0]) / 1e9
            threads += 1
    except (OSError, ValueError, IndexError):   # (a thread ended meanwhile; no schedstat)
        precise = 0.0
    own = precise if ticks - precise <= (threads + 1) / CLOCK_TICKS else ticks
    return own, (cutime + cstime) / CLOCK_TICKS


SPAWN_LOOP = """
import os, sys, time
n = int(sys.argv[1]); path = sys.argv[2]
t0 = time.perf_counter()
for _ in range(n):
    os.waitpid(os.posix_spawn(path, [path], os.environ), 0)
print(n / (time.perf_counter() - t0))
"""


def spawn_limit(n: int = 2000) -> float:
    """Programs `true` per second that two Python processes start and reap in a bare
    loop (posix_spawn + waitpid), together: the machine's limit for the true shape."""
    import shutil
    path = shutil.which("true")
    loops = [subprocess.Popen([sys.executable, "-c", SPAWN_LOOP, str(n), path], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    return sum(float(p.communicate()[0]) for p in loops)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class LoomCluster:
    def __init__(self, workers=2, cpus=1, trace=None, journal=True, steal=False):
        self.tmp = tempfile.mkdtemp(prefix="loombench-")
        env = dict(os.environ, LOOM_SERVER_DIR=self.tmp, PYTHONPATH=ROOT)
        self.server = subprocess.Popen([sys.executable, "-m", "loomctl", "server", "start", "--port", "0",
                                        *([] if journal else ["--no-journal"]), *(["--steal"] if steal else [])],
                                       env=env, stderr=subprocess.DEVNULL)
        while not os.path.exists(os.path.join(self.tmp, "access.json")):
            time.sleep(0.02)
        self.workers = [subprocess.Popen([sys.executable, "-m", "loomctl", "worker", "start", "--cpus", str(cpus)],
                                         env=env, stderr=subprocess.DEVNULL) for _ in range(workers)]
        from loomctl.client import Client
        self.client = Client(server_dir_path=self.tmp, timeout=600)
        while self.client.get_stats()["n_workers"] < workers:
            time.sleep(0.05)
        if trace:
            self.client.set_trace(trace)

    def cpu(self) -> dict:
        server = cpu_seconds(self.server.pid)[0]
        workers = [cpu_seconds(w.pid) for w in self.workers]
        return {"server": server, "workers": sum(w[0] for w in workers), "programs": sum(w[1] for w in workers)}

    def transfers(self) -> tuple[int, int]:
        """(objects, bytes) moved between workers so far."""
        stats = self.client.get_stats()
        return stats["transfers"], stats["transfer_bytes"]

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


# ---------------------------------------------------------------- the work itself
# (plain functions: the same code runs inside loomctl Python tasks and Dask tasks)

def _inc(x):
    return x + 1


def _one():
    return b"1"


def _true(_):
    subprocess.run(["true"], check=True)
    return 0


ROT13 = bytes.maketrans(bytes(range(256)), bytes((b + 13) % 256 for b in range(256)))


def _process(piece: bytes) -> bytes:
    return piece.translate(ROT13)


def _read_then(fn):
    """fn over the bytes of a loomctl task input (loomctl passes wrapped data objects)."""
    return lambda obj: fn(obj.read())


def _big(seed: int) -> bytes:
    return bytes([seed % 256]) * (4 * MB)


def _rotate(block: bytes) -> bytes:
    return block[1:] + block[:1]


def _mapreduce_data(m: int) -> bytes:
    """About 10 MB in m newline-terminated lines."""
    line = (bytes(range(32, 127)) * (10 * MB // m // 95 + 1))[:10 * MB // m - 1] + b"\n"
    return line * m


# ---------------------------------------------------------------- loomctl side
# Each returns (number of tasks, seconds, extra figures).

def _timed(fn):
    t0 = time.perf_counter()
    extra = fn()
    return time.perf_counter() - t0, extra or {}


def loom_trivial(cluster, n):
    c = cluster.client
    leaves = [tasks.const(b"%d" % i) for i in range(n)]
    seconds, _ = _timed(lambda: c.gather(c.submit(leaves)))
    return n, seconds, {}


def loom_pytrivial(cluster, n):
    c = cluster.client
    fn = tasks.py_value(_one)
    leaves = [tasks.py_call(fn) for _ in range(n)]
    for leaf in leaves:
        leaf.resource_request = None   # trivial: light, like a Dask task that holds no slot
    seconds, _ = _timed(lambda: c.gather(c.submit(leaves)))
    return n + 1, seconds, {}


def _merge_tree(k):
    level = [tasks.const(b"x") for _ in range(2 ** k)]
    n = len(level)
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
        n += len(level)
    return tasks.size(level[0]), n + 1


def loom_tree(cluster, k):
    c = cluster.client
    root, n = _merge_tree(k)
    seconds, _ = _timed(lambda: c.submit_one(root).gather())
    return n, seconds, {}


def loom_mapreduce(cluster, m):
    c = cluster.client
    data = _mapreduce_data(m)
    lines = tasks.split(tasks.const(data))
    process = tasks.py_value(_read_then(_process))
    pieces = [tasks.py_call(process, [tasks.get(lines, i)]) for i in range(m)]
    total = tasks.merge(pieces)

    def go():
        result = c.submit_one(total).gather()
        assert result == _process(data), "map-reduce result is wrong"
    seconds, _ = _timed(go)
    return 2 * m + 4, seconds, {}


def loom_true(cluster, m):
    c = cluster.client
    runs = [tasks.run("true") for _ in range(m)]
    seconds, _ = _timed(lambda: c.gather(c.submit(runs)))
    limit = spawn_limit()
    return m, seconds, {"spawn_limit": round(limit), "of_spawn_limit": round(m / seconds / limit, 3)}


def loom_locality(cluster, length):
    c = cluster.client
    make, rotate = tasks.py_value(_big), tasks.py_value(_read_then(_rotate))
    ends = []
    for chain in range(8):
        t = tasks.py_call(make, direct_args=(chain,))
        for _ in range(length):
            t = tasks.py_call(rotate, [t])
        ends.append(tasks.size(t))
    before = cluster.transfers()

    def go():
        sizes = c.gather(c.submit(ends))
        assert all(int.from_bytes(s, "little") == 4 * MB for s in sizes), sizes
    seconds, _ = _timed(go)
    after = cluster.transfers()
    return 8 * (length + 2) + 2, seconds, {"transfers": after[0] - before[0],
                                           "transfer_bytes": after[1] - before[1]}


def loom_scale(cluster, k):
    c = cluster.client
    root, n = _merge_tree(k)
    seconds, _ = _timed(lambda: c.submit_one(root).gather())
    return n, seconds, {"server_peak_rss_mb": round(peak_rss_mb(cluster.server.pid), 1)}


def _chain_graph(n):
    """const -> merge -> merge -> ... : n tasks, each the next one's only input."""
    t = tasks.const(b"x")
    for _ in range(n - 1):
        t = tasks.merge([t])
    return graphfmt.build_graph([t])[0]


def loom_chain(cluster, n):
    """A chain of n tasks (each the next's input): the graph is built before the clock
    starts; the time is submit to the last result gathered."""
    c = cluster.client
    graph = _chain_graph(n)

    def go():
        _, futures = c.submit_graph(graph)
        assert c.gather(futures) == [b"x"], "chain result is wrong"
    seconds, _ = _timed(go)
    return n, seconds, {}


def loom_latency(cluster, reps):
    c = cluster.client
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        c.submit_one(tasks.const(b"x")).gather()
        samples.append(time.perf_counter() - t0)
    return reps, statistics.median(samples), {}


# ---------------------------------------------------------------- Dask side
# Each returns (number of tasks, seconds).

def dask_trivial(client, n):
    seconds, _ = _timed(lambda: client.gather(client.map(_inc, range(n), pure=False)))
    return n, seconds


dask_pytrivial = dask_trivial


def dask_tree(client, k):
    def go():
        level = client.map(_inc, range(2 ** k), pure=False)
        count = len(level)
        while len(level) > 1:
            level = [client.submit(lambda a, b: a + b, level[i], level[i + 1], pure=False)
                     for i in range(0, len(level), 2)]
            count += len(level)
        level[0].result()
        return {"n": count}
    seconds, extra = _timed(go)
    return extra["n"], seconds


def dask_mapreduce(client, m):
    data = _mapreduce_data(m)
    step = len(data) // m

    def piece(d, i):
        return _process(d[i * step:(i + 1) * step])

    def go():
        source = client.scatter(data)
        parts = [client.submit(piece, source, i, pure=False) for i in range(m)]
        result = client.submit(lambda *ps: b"".join(ps), *parts, pure=False).result()
        assert result == _process(data)
    seconds, _ = _timed(go)
    return m + 2, seconds


def dask_true(client, m):
    seconds, _ = _timed(lambda: client.gather(client.map(_true, range(m), pure=False)))
    return m, seconds


def dask_locality(client, length):
    def go():
        ends = []
        for chain in range(8):
            t = client.submit(_big, chain, pure=False)
            for _ in range(length):
                t = client.submit(_rotate, t, pure=False)
            ends.append(client.submit(len, t, pure=False))
        assert client.gather(ends) == [4 * MB] * 8
    seconds, _ = _timed(go)
    return 8 * (length + 2), seconds


def dask_latency(client, reps):
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        client.submit(_inc, i, pure=False).result()
        samples.append(time.perf_counter() - t0)
    return reps, statistics.median(samples)


# ---------------------------------------------------------------- table
# name: (loomctl fn, Dask fn or None, default size, unit, target as text, check(row) -> bool)
# unit "rate": tasks/s; "s": seconds for the whole shape; "ms": median milliseconds.

SHAPES = {
    "trivial": (loom_trivial, dask_trivial, 100_000, "rate", ">= 50x Dask", lambda r: r["ratio"] >= 50),
    "pytrivial": (loom_pytrivial, dask_pytrivial, 10_000, "rate", "", None),
    "tree": (loom_tree, dask_tree, 15, "rate", ">= 50x Dask", lambda r: r["ratio"] >= 50),
    "mapreduce": (loom_mapreduce, dask_mapreduce, 1000, "s", ">= 5x Dask", lambda r: r["ratio"] >= 5),
    "true": (loom_true, dask_true, 1000, "rate", ">= 2,000/s, >= 65% of spawn limit",
             lambda r: r["loomctl"] >= 2000 and r["of_spawn_limit"] >= 0.65),
    "locality": (loom_locality, dask_locality, 50, "s", "no 4 MB transfer, <= Dask's time",
                 lambda r: r["transfer_bytes"] < MB and r["ratio"] >= 1),
    "scale": (loom_scale, None, 19, "rate", "completes, server RSS <= 150 MB",
              lambda r: r["server_peak_rss_mb"] <= 150),
    "chain": (loom_chain, None, 100_000, "rate", "1M tasks in <= 30 s (--chain-size 1000000)",
              lambda r: None if r["tasks"] < 1_000_000 else r["loomctl"] >= 1_000_000 / 30),   # (judged at 1M)
    "latency": (loom_latency, dask_latency, 200, "ms", "<= 2 ms", lambda r: r["loomctl"] <= 2),
}
def figure(unit, n, seconds):
    if unit == "rate":
        return n / seconds
    return seconds * 1000 if unit == "ms" else seconds


def run_loom(shapes, sizes, repeat, trace, journal=True, steal=False):
    results = {}
    for shape in shapes:
        fn, _, _, unit, _, _ = SHAPES[shape]
        best = None
        for _ in range(repeat):   # each run on a fresh server and workers (a peak RSS is its own)
            cluster = LoomCluster(trace=trace, journal=journal, steal=steal)
            try:
                cpu0 = cluster.cpu()
                n, seconds, extra = fn(cluster, sizes[shape])
                cpu1 = cluster.cpu()
                if steal:
                    extra = {**(extra or {}), "stolen": cluster.client.get_stats().get("stolen", 0)}
            finally:
                cluster.close()
            value = figure(unit, n, seconds)
            if best is None or (value > best[0] if unit == "rate" else value < best[0]):
                cpu = {k: round((cpu1[k] - cpu0[k]) / n * 1e6, 1) for k in cpu0}
                best = (value, n, extra, cpu)
        results[shape] = best
    return results


def run_dask(shapes, sizes, repeat):
    from dask.distributed import Client, LocalCluster
    results = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        for shape in shapes:
            fn, unit = SHAPES[shape][1], SHAPES[shape][3]
            if fn is None:
                continue
            values = [figure(unit, *fn(client, sizes[shape])) for _ in range(repeat)]
            results[shape] = max(values) if unit == "rate" else min(values)
            client.restart()   # every shape starts from clean workers, like loomctl's
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per shape; the best is kept")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trace", metavar="DIR", help="trace the loomctl jobs into DIR (client.set_trace)")
    parser.add_argument("--no-journal", action="store_true", help="servers keep no journal (its cost: compare)")
    parser.add_argument("--steal", action="store_true", help="servers steal work (server start --steal)")
    for shape, spec in SHAPES.items():
        parser.add_argument(f"--{shape}-size", type=int, default=spec[2])
    args = parser.parse_args()
    shapes = args.only.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s): {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    sizes = {s: getattr(args, f"{s}_size") for s in shapes}
    loom = run_loom(shapes, sizes, args.repeat, args.trace, journal=not args.no_journal, steal=args.steal)
    dask = {} if args.no_dask else run_dask(shapes, sizes, args.repeat)
    rows = []
    for shape in shapes:
        _, _, _, unit, target, check = SHAPES[shape]
        value, n, extra, cpu = loom[shape]
        d = dask.get(shape)
        ratio = None if d is None else (value / d if unit == "rate" else d / value)
        row = {"shape": shape, "size": sizes[shape], "tasks": n, "unit": {"rate": "tasks/s"}.get(unit, unit),
               "loomctl": round(value, 3), "dask": None if d is None else round(d, 3),
               "ratio": None if ratio is None else round(ratio, 2), **extra,
               "cpu_us_per_task": cpu, "target": target}
        try:
            met = None if check is None else check(row)
            row["met"] = None if met is None else bool(met)
        except TypeError:   # a figure the check needs is missing (e.g. --no-dask)
            row["met"] = None
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from tabulate import tabulate
    table = []
    for r in rows:
        cpu = r["cpu_us_per_task"]
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k in ("transfers", "transfer_bytes", "server_peak_rss_mb",
                                                                   "spawn_limit", "of_spawn_limit"))
        table.append([r["shape"], r["size"], r["tasks"], r["unit"], r["loomctl"], r["dask"], r["ratio"],
                      f"{cpu['server']:.0f}/{cpu['workers']:.0f}/{cpu['programs']:.0f}", notes, r["target"],
                      {True: "yes", False: "NO", None: ""}[r["met"]]])
    print(tabulate(table, headers=["shape", "size", "tasks", "unit", "loomctl", "dask", "x better",
                                   "cpu us/task srv/wrk/prog", "", "target", "met"]))


if __name__ == "__main__":
    main()
