"""Where the server's CPU goes: a loomctl server + 2 one-cpu workers on 127.0.0.1 (as
../shared/peers/sbs.py starts them), driven with N identical jobs while py-spy samples the
server; prints server CPU per job and per task from /proc (per thread: the main thread
and zmq's I/O thread) and the top functions by own and cumulative samples.

    python bench/profile_server.py latency --jobs 2000          # submit_one(const) + gather
    python bench/profile_server.py tree --k 10 --jobs 80         # merge tree of 2^k leaves
    python bench/profile_server.py latency --jobs 2000 --no-spy  # /proc figures only
    python bench/profile_server.py mapreduce --m 1000 --jobs 10 --spy-on workers   # 10 MB in m slices
    python bench/profile_server.py pyfn --m 1000 --jobs 10 --spy-on workers        # m trivial Python functions
    python bench/profile_server.py mapreduce --jobs 1 --warmup 0                    # the first job of a fresh cluster

py-spy (``pip install py-spy``; ``--py-spy PATH``) runs with ``--gil``: only samples that
hold the GIL count, so time pyzmq spends in send/poll with the GIL released (often the
thread preempted by the zmq I/O thread it just woke, not CPU) stays out. Shares are of
those samples; "us" columns scale them by the main thread's user CPU per job (or task).
``--raw FILE`` keeps the collapsed stacks (``--lines``: per line, not per function).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CLK = os.sysconf("SC_CLK_TCK")
PREFIX = re.compile(r"/work/venv/lib/python3\.\d+/site-packages/|" + re.escape(ROOT + "/") + r"|/\S*/lib/python3\.\d+/")
OUTER = ("_run_module_as_main", "_run_code", "<module>", "main (", "TyperGroup", "Command.invoke", "Context.invoke",
         "get_callback", "start (loomctl/cli", "Server.serve")


def thread_cpu(pid: int) -> dict:
    """CPU seconds per (thread name, usr|sys) of a process."""
    out = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            raw = f.read()
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[(name, "usr")] += int(fields[11]) / CLK
        out[(name, "sys")] += int(fields[12]) / CLK
    return out


def tally(path: str):
    own, cum, total = collections.Counter(), collections.Counter(), 0
    with open(path) as f:
        for line in f:
            stack, n = line.rstrip("\n").rsplit(" ", 1)
            frames = [PREFIX.sub("", x) for x in stack.split(";")]
            if frames[-1].startswith("Poller.poll ("):
                continue
            total += int(n)
            own[frames[-1]] += int(n)
            for fr in set(frames):
                cum[fr] += int(n)
    return own, cum, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=["latency", "tree", "mapreduce", "pyfn", "true"])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10, help="tree: 2^k leaves")
    ap.add_argument("--m", type=int, default=1000, help="mapreduce: slices of 10 MB; pyfn, true: tasks per job")
    ap.add_argument("--spy-on", choices=["server", "workers"], default="server",
                    help="the process(es) py-spy samples (workers: both, their samples added up)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=20, help="jobs run before the measured ones (0: a cold cluster)")
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"))
    ap.add_argument("--no-spy", action="store_true")
    ap.add_argument("--server-args", default="", help="more options for 'loomctl server start' (e.g. --no-journal)")
    ap.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    ap.add_argument("--lines", action="store_true", help="sample per line, not per function")
    args = ap.parse_args()

    from graphfmt import tasks
    from loomctl.client import Client
    tmp = tempfile.mkdtemp(prefix="loomprof-")
    env = dict(os.environ, LOOM_SERVER_DIR=tmp, PYTHONPATH=ROOT)
    quiet = {"env": env, "stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen([sys.executable, "-m", "loomctl", "server", "start", "--host", "127.0.0.1",
                               "--port", "0", *args.server_args.split()], **quiet)
    procs = [server]
    spy = None
    try:
        while not os.path.exists(os.path.join(tmp, "access.json")):
            time.sleep(0.02)
        procs += [subprocess.Popen([sys.executable, "-m", "loomctl", "worker", "start", "--cpus", "1"], **quiet)
                  for _ in range(2)]
        client = Client(server_dir_path=tmp, timeout=600)
        while client.get_stats()["n_workers"] < 2:
            time.sleep(0.05)
        if args.shape == "latency":
            def job():
                client.submit_one(tasks.const(b"x")).gather()
            per_job = 1
        elif args.shape == "mapreduce":
            line = (bytes(range(32, 127)) * (10_000_000 // args.m // 95 + 1))[:10_000_000 // args.m - 1] + b"\n"
            lines = tasks.split(tasks.const(line * args.m))

            @tasks.py_task()
            def process(piece):
                return piece.read().upper()
            root, per_job = tasks.merge([process(tasks.get(lines, i)) for i in range(args.m)]), 2 * args.m + 2

            def job():
                client.submit_one(root).gather()
        elif args.shape == "true":
            roots, per_job = [tasks.run("true") for _ in range(args.m)], args.m

            def job():
                client.gather(client.submit(roots))
        elif args.shape == "pyfn":
            @tasks.py_task()
            def one():
                return b"1"
            roots, per_job = [one() for _ in range(args.m)], args.m

            def job():
                client.gather(client.submit(roots))
        else:
            level = [tasks.const(b"x") for _ in range(2 ** args.k)]
            while len(level) > 1:
                level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
            root, per_job = level[0], 2 ** (args.k + 1) - 1

            def job():
                client.submit_one(root).gather()
        for _ in range(args.warmup):
            job()
        raw = args.raw or os.path.join(tmp, "stacks.raw")
        sampled = [server] if args.spy_on == "server" else procs[1:]
        spies = []
        if not args.no_spy:
            spies = [subprocess.Popen([args.py_spy, "record", "--pid", str(p.pid), "--rate", str(args.rate),
                                       "--format", "raw", *([] if args.lines else ["--function"]), "--gil",
                                       "--nonblocking", "-o", f"{raw}.{k}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for k, p in enumerate(sampled)]
            spy = spies[0]
            time.sleep(1.5)
        cpu0 = thread_cpu(server.pid)
        workers0 = [thread_cpu(p.pid) for p in procs[1:]]
        samples = []
        t_all = time.perf_counter()
        for _ in range(args.jobs):
            t0 = time.perf_counter()
            job()
            samples.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_all
        cpu1 = thread_cpu(server.pid)
        workers1 = [thread_cpu(p.pid) for p in procs[1:]]
        main_by_target = sum((b - a)[("python", "usr")] for a, b in
                             ([(cpu0, cpu1)] if args.spy_on == "server" else zip(workers0, workers1)))
        for one in spies:
            one.send_signal(signal.SIGINT)
            one.wait(60)
        if spies:
            with open(raw, "w") as out:
                for k in range(len(spies)):
                    with open(f"{raw}.{k}") as part:
                        out.write(part.read())
        client.terminate()
    finally:
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    own, cum, total = tally(raw) if spy is not None else (None, None, 0)
    shutil.rmtree(tmp, ignore_errors=True)
    n = args.jobs * per_job
    unit = "job" if args.shape == "latency" else "task"
    d = {k: (cpu1[k] - cpu0.get(k, 0)) / n * 1e6 for k in cpu1}
    size = {"latency": "", "tree": f" 2^{args.k}", "mapreduce": f" {args.m} slices", "pyfn": f" {args.m}",
            "true": f" {args.m}"}[args.shape]
    print(f"{args.shape}{size}: {args.jobs} jobs x {per_job} tasks, "
          f"median job {statistics.median(samples) * 1e3:.3f} ms, {n / wall:,.0f} tasks/s"
          f"{' (under py-spy)' if spy is not None else ''}")
    print(f"server CPU per {unit}: {sum(d.values()):.2f} us = " +
          ", ".join(f"{name} {kind} {v:.2f}" for (name, kind), v in sorted(d.items()) if v))
    for k, (a, b) in enumerate(zip(workers0, workers1)):
        w = {key: (b[key] - a.get(key, 0)) / n * 1e6 for key in b}
        print(f"worker {k} CPU per {unit}: {sum(w.values()):.2f} us = " +
              ", ".join(f"{name} {kind} {v:.2f}" for (name, kind), v in sorted(w.items()) if v))
    main_usr = main_by_target / n * 1e6 if spy is not None else 0.0
    if spy is None:
        return
    if not total:
        print("py-spy recorded nothing (permissions? try as root, or --no-spy)")
        return
    print(f"\n{total} GIL samples of the {args.spy_on}; us = share x main-thread user CPU per {unit} "
          f"({main_usr:.2f} us{', both workers' if args.spy_on == 'workers' else ''})")
    print(f"\ntop {args.top} by own samples:")
    for i, (fr, k) in enumerate(own.most_common(args.top), 1):
        print(f"{i:3d}. own {100 * k / total:5.1f}% {k / total * main_usr:8.2f} us  "
              f"cum {100 * cum[fr] / total:5.1f}%  {fr}")
    print(f"\ntop {args.top} by cumulative samples:")
    rows = [(fr, k) for fr, k in cum.most_common() if not fr.startswith(OUTER)][:args.top]
    for i, (fr, k) in enumerate(rows, 1):
        print(f"{i:3d}. cum {100 * k / total:5.1f}% {k / total * main_usr:8.2f} us  "
              f"own {100 * own[fr] / total:5.1f}%  {fr}")


if __name__ == "__main__":
    main()
