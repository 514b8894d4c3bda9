"""The server's CPU per one-task job without sockets: a Dispatch (the server's sans-I/O
half, journal records included) fed the messages of the latency shape, as a real client
and worker send them: SUBMIT of one const, the worker's UPDATE with the result inline,
the client's RELEASE; timers every 0.25 s of simulated time (4 jobs per ms).

    python bench/core_latency.py                    # us per job, best of 5 x 2000 jobs
    python bench/core_latency.py --profile 20       # cProfile, top 20 by own time
    python bench/core_latency.py --client           # also the client's side (build, encode, decode)
    python bench/core_latency.py --tree 10,13,16    # us per task of merge-tree jobs of 2^K leaves
    python bench/core_latency.py --worker           # the worker's state machine instead (WorkerState)

What it leaves out: zmq recv/send (~15-20% of a live server's main thread) and the
journal file writes; bench/profile_server.py measures a live server.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import graphfmt                                      # noqa: E402
from graphfmt import tasks                           # noqa: E402
from loomctl import protocol as P                    # noqa: E402
from loomctl.server.dispatch import Dispatch         # noqa: E402
from loomctl.worker.extensions import supported_symbols   # noqa: E402

SECRET = P.new_secret()


class Rig:
    def __init__(self, journal: bool = True):
        self.d = Dispatch(SECRET, {"host": "127.0.0.1", "port": 1, "pid": 1, "started": 0.0})
        if journal:
            self.d.core.record = []
        self.now = 0.0
        self.last_tick = 0.0
        self.workers = {}
        for name in (b"w1", b"w2"):
            self._join(name, "worker")
            self._send(name, P.REGISTER, {"name": name.decode(), "cpus": 1, "symbols": sorted(supported_symbols()),
                                          "data_address": f"tcp://127.0.0.1:{len(self.workers) + 5000}"})
            self.workers[name] = True
        self._join(b"c1", "client")
        self.graph = graphfmt.to_bytes(graphfmt.build_graph([tasks.const(b"x")])[0])
        self.req = 0

    def _send(self, identity, kind, body, *blobs):
        return self._send_frames(identity, P.encode(kind, body, *blobs))

    def _send_frames(self, identity, frames):
        self.d.message(identity, frames, self.now)
        return self._flush()

    def _flush(self):
        out = self.d.flush(self.now)
        self.d.journal_records()
        return out

    def _join(self, identity, role):
        (_, frames), = self._send(identity, P.HELLO, {"role": role, "version": P.PROTOCOL_VERSION})
        nonce = P.decode(frames)[1]["nonce"]
        self._send(identity, P.AUTH, {"proof": P.proof(SECRET, nonce, role)})

    def job(self, graph: bytes | None = None) -> None:
        self.req += 1
        out = self._send(b"c1", P.SUBMIT, {"load": False, "notify": True, "trace": None, "req": self.req},
                         graph or self.graph)   # (the graph file as its blob frame, as the client sends it)
        for target, frames in out:
            if frames[0] == P.COMPUTE:
                body = P.decode(frames)[1]
                t = body["tasks"][0][0]
                ids = P.ids_to_bytes([t])
                self._send(target, P.UPDATE, {"finished": ids, "sizes": P.ids_to_bytes([1]),
                                              "lengths": P.ids_to_bytes([1]), "failed": [], "redirects": [],
                                              "replicas": b"", "logs": [], "inline": ids, "blobs": [b"\x00x"]})
                self._send(b"c1", P.RELEASE, {"ids": ids})
        self.now += 0.00025
        if self.now - self.last_tick > 0.25:
            self.last_tick = self.now
            self.d.tick(self.now, 120.0)
            self._flush()


def tree_job(rig: Rig, k: int) -> tuple[int, float]:
    """One merge tree of 2^k leaves through the rig: each worker in turn reports, in one
    UPDATE, every task its COMPUTEs gave it that can run (a task given ahead waits until
    its inputs are reported), as a worker does with light tasks in one step; the client
    gathers the root and releases it.
    Returns the tasks and the CPU seconds the Dispatch took (the rig's own work left out)."""
    level = [tasks.const(b"leaf%d" % i) for i in range(1 << k)]
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    graph = graphfmt.to_bytes(graphfmt.build_graph(level)[0])
    rig.req += 1
    queues: dict = {name: {} for name in rig.workers}   # task -> its inputs, in the order given
    done: set = set()
    root = None
    spent = 0.0

    def send(identity, kind, body, *blobs):
        nonlocal root, spent
        frames = P.encode(kind, body, *blobs)
        t0 = time.process_time()
        out = rig._send_frames(identity, frames)
        spent += time.process_time() - t0
        for target, frames in out:
            kind, body, blobs = P.decode(frames)
            if kind == P.COMPUTE:
                queues[target].update((row[0], row[3]) for row in P.compute_rows(body, blobs))
            elif kind == P.RESULTS_READY:
                root = P.ids_from_bytes(body["ids"])
    send(b"c1", P.SUBMIT, {"load": False, "notify": True, "trace": None, "req": rig.req}, graph)
    while root is None:
        for name, queue in queues.items():
            ready = []
            for t, inputs in queue.items():
                if all(i in done for i in inputs):
                    ready.append(t)
            if not ready:
                continue
            for t in ready:
                del queue[t]
            done.update(ready)
            n = len(ready)
            send(name, P.UPDATE, {"finished": P.ids_to_bytes(ready), "sizes": P.ids_to_bytes([8] * n),
                                  "lengths": P.ids_to_bytes([0] * n), "failed": [], "redirects": [],
                                  "replicas": b"", "logs": [], "inline": b"", "blobs": []})
    send(b"c1", P.RELEASE, {"ids": P.ids_to_bytes(root)})
    rig.now += 0.25
    t0 = time.process_time()
    rig.d.tick(rig.now, 120.0)
    rig._flush()
    spent += time.process_time() - t0
    return (2 << k) - 1, spent


def worker_side(n: int, repeat: int) -> None:
    """The worker's sans-I/O state (WorkerState.handle) on what the server sends it: per
    one-const job (its COMPUTE, run inline and reported, then its RELEASE_DATA) and per
    task of one worker's half of a 2^10 merge tree (one COMPUTE of 1,023 rows, leaves and
    merges given ahead, all run in one step)."""
    from graphfmt import symbols as S
    from loomctl.worker import state as W
    from loomctl.worker.running import run_inline

    def fresh():
        s = W.WorkerState(cpus=1)
        s.run_inline = lambda spec, inputs: run_inline(spec, inputs)
        return s

    def jobs(s, first: int) -> float:
        t0 = time.process_time()
        for t in range(first, first + n):
            s.handle([W.Compute([[t, S.CONST, b"x", [], 0, None, None, None, True]], {})], 0.0)
            s.handle([W.ReleaseData([t])], 0.0)
        return (time.process_time() - t0) / n * 1e6
    s = fresh()
    jobs(s, 0)
    best = min(jobs(s, (k + 1) * n) for k in range(repeat))
    print(f"worker state: {best:.1f} us per one-const job (best of {repeat} x {n})")
    rig = Rig(journal=False)
    level = [tasks.const(b"leaf%d" % i) for i in range(1024)]
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    out = rig._send(b"c1", P.SUBMIT, {"load": False, "notify": True, "trace": None, "req": 1},
                    graphfmt.to_bytes(graphfmt.build_graph(level)[0]))
    frames = next(f for _, f in out if f[0] == P.COMPUTE)
    spent = []
    for _ in range(repeat):
        kind, body, blobs = P.decode(frames)
        rows = P.compute_rows(body, blobs)
        s = fresh()
        t0 = time.process_time()
        s.handle([W.Compute(rows, {})], 0.0)
        spent.append((time.process_time() - t0) / len(rows) * 1e6)
    print(f"worker state: {min(spent):.2f} us per task of a 2^10 tree's half ({len(rows)} rows in one COMPUTE, "
          f"best of {repeat})")


def client_side(n: int) -> float:
    """us per job of the client's own work: build + encode the graph, decode 4 replies."""
    from loomctl.client import _graph_bytes
    from graphfmt.plan import build_graph
    reply = P.encode(P.REPLY, {"req": 1, "job": 1, "base": 5, "n": 1, "results": P.ids_to_bytes([5])})
    t0 = time.perf_counter()
    for _ in range(n):
        graph, _ = build_graph([tasks.const(b"x")])
        _graph_bytes(graph)
        P.decode(reply)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, metavar="TOP")
    ap.add_argument("--no-journal", action="store_true")
    ap.add_argument("--client", action="store_true")
    ap.add_argument("--tree", metavar="K,K...", help="merge-tree jobs of 2^K leaves instead: us per task")
    ap.add_argument("--worker", action="store_true", help="the worker's state machine instead")
    args = ap.parse_args()
    if args.worker:
        worker_side(args.jobs, args.repeat)
        return
    rig = Rig(journal=not args.no_journal)
    if args.tree:
        for k in [int(x) for x in args.tree.split(",")]:
            tree_job(rig, k)   # (warm)
            jobs = max(1, (1 << 14) >> k)
            best = min(_timed_tree(rig, k, jobs) for _ in range(args.repeat))
            print(f"tree 2^{k}: server dispatch+core {best:.2f} us per task (best of {args.repeat} x {jobs} jobs)")
        return
    for _ in range(200):
        rig.job()
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.jobs):
            rig.job()
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"calls per job: {stats.total_calls / args.jobs:.0f}")
        stats.sort_stats("tottime").print_stats(args.profile)
        return
    best = min(_timed(rig, args.jobs) for _ in range(args.repeat))
    print(f"server dispatch+core: {best:.1f} us per one-const job (best of {args.repeat} x {args.jobs}; "
          f"{len(rig.d.core.jobs)} jobs live)")
    if args.client:
        print(f"client build+encode+decode: {min(client_side(args.jobs) for _ in range(3)):.1f} us per job")


def _timed_tree(rig: Rig, k: int, jobs: int) -> float:
    """Server CPU per task: the rig's own work (the workers' bookkeeping) is left out."""
    spent = 0.0
    n = 0
    for _ in range(jobs):
        count, seconds = tree_job(rig, k)
        n += count
        spent += seconds
    return spent / n * 1e6


def _timed(rig: Rig, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        rig.job()
    return (time.process_time() - t0) / n * 1e6


if __name__ == "__main__":
    main()
