"""Benchmark: the binary graph file on a million-task plan, against one msgpack dict per task.

The plan is a binary merge tree: 2**N ``loom/data/const`` leaves (each config a short
distinct string, e.g. b"leaf12345") merged pairwise until one root remains, so it has
2**(N+1) - 1 tasks (1,048,575 for the default N = 19). Measured, in one process:

  build    making the Task objects with graphfmt.tasks (shared by both formats)
  write    graphfmt.write(path, [root]): linearise the Tasks and write the file
  read     graphfmt.read(path), validation included
  size     file bytes per task, in total and without the config bytes
  inspect  wall time of ``loomctl inspect FILE`` as a subprocess

The baseline stores the same plan as a msgpack list with one dict per task
({"type", "inputs", "config", "label", "flags"}): write = linearise + pack to a file,
read = unpack the file. Run: /work/venv/bin/python bench/graphfile.py [--leaves-log2 N] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
from tabulate import tabulate  # noqa: E402

import graphfmt  # noqa: E402
from graphfmt import tasks  # noqa: E402
from graphfmt.fileformat import GraphWriter  # noqa: E402
from graphfmt.tasks import Task  # noqa: E402

# Targets for the default size (about one million tasks).
TARGETS = {"write_s": 10.0, "read_s": 0.5, "bytes_per_task_excl_config": 40.0, "inspect_s": 2.0}


def build_tree(leaves_log2: int) -> Task:
    """A binary merge tree over 2**leaves_log2 const leaves; returns the root."""
    level = [tasks.const(f"leaf{i}") for i in range(1 << leaves_log2)]
    while len(level) > 1:
        level = [tasks.merge((level[k], level[k + 1])) for k in range(0, len(level), 2)]
    return level[0]


def timed(fn, repeat: int = 1):
    """(best wall seconds, last result) over ``repeat`` runs."""
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# --------------------------------------------------------------------- baseline
def linearise(root: Task) -> tuple[list[Task], dict[int, int]]:
    """Depth-first post-order of the Tasks reachable from root (inputs first)."""
    order: list[Task] = []
    index: dict[int, int] = {}
    stack = [(root, iter(root.inputs))]
    while stack:
        task, pending = stack[-1]
        for child in pending:
            if id(child) not in index:
                stack.append((child, iter(child.inputs)))
                break
        else:
            stack.pop()
            if id(task) not in index:
                index[id(task)] = len(order)
                order.append(task)
    return order, index


def baseline_write(root: Task, path: str) -> int:
    order, index = linearise(root)
    last = len(order) - 1
    records = [{"type": t.task_type, "inputs": [index[id(x)] for x in t.inputs], "config": t.config,
                "label": t.label, "flags": int(i == last)} for i, t in enumerate(order)]
    with open(path, "wb") as f:
        f.write(msgpack.packb(records, use_bin_type=True))
    return len(records)


def baseline_read(path: str) -> list:
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False)


# --------------------------------------------------------------------- measuring
def loomctl_command() -> list[str]:
    script = Path(sys.executable).with_name("loomctl")
    if script.exists():
        return [str(script)]
    found = shutil.which("loomctl")
    return [found] if found else [sys.executable, "-m", "loomctl"]


def run_inspect(path: str, repeat: int) -> float:
    def once():
        done = subprocess.run([*loomctl_command(), "inspect", path], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"loomctl inspect {path} failed: {done.stderr.strip()}")
        return done.stdout
    return timed(once, repeat)[0]


def measure(leaves_log2: int, repeat: int, workdir: str) -> dict:
    loom_path = os.path.join(workdir, "tree.loom")
    base_path = os.path.join(workdir, "tree.msgpack")
    tiny_path = os.path.join(workdir, "tiny.loom")
    graphfmt.write(tiny_path, [tasks.merge((tasks.const("a"), tasks.const("b")))])

    build_s, root = timed(lambda: build_tree(leaves_log2), repeat)
    write_s, graph = timed(lambda: graphfmt.write(loom_path, [root]), repeat)
    n = len(graph)
    config_bytes = graph.configs.total()
    # write, split in its two halves: Task objects -> columns, columns -> file
    plan_s, _ = timed(lambda: graphfmt.build_graph([root]), repeat)

    def encode_only():
        with open(loom_path, "wb") as out:
            writer = GraphWriter(out)
            writer.write_graph(graph)
            writer.close()
    encode_s, _ = timed(encode_only, repeat)
    read_s, loaded = timed(lambda: graphfmt.read(loom_path), repeat)
    if len(loaded) != n:
        raise SystemExit(f"read {len(loaded)} tasks, wrote {n}")
    read_novalidate_s, _ = timed(lambda: graphfmt.read(loom_path, validate=False), repeat)
    validate_s, _ = timed(loaded.validate, repeat)
    stats_s, _ = timed(loaded.stats, repeat)
    file_bytes = os.path.getsize(loom_path)
    inspect_s = run_inspect(loom_path, repeat)
    inspect_tiny_s = run_inspect(tiny_path, repeat)

    base_write_s, base_n = timed(lambda: baseline_write(root, base_path), repeat)
    base_read_s, records = timed(lambda: baseline_read(base_path), repeat)
    if base_n != n or len(records) != n:
        raise SystemExit(f"baseline has {base_n} tasks, graph file {n}")
    base_bytes = os.path.getsize(base_path)

    return {
        "leaves_log2": leaves_log2, "tasks": n, "config_bytes": config_bytes, "repeat": repeat,
        "graphfile": {
            "build_s": build_s, "write_s": write_s, "read_s": read_s,
            "file_bytes": file_bytes, "bytes_per_task": file_bytes / n,
            "bytes_per_task_excl_config": (file_bytes - config_bytes) / n,
            "inspect_s": inspect_s,
            "breakdown": {
                "write.build_graph_s": plan_s, "write.encode_s": encode_s,
                "read.parse_s": read_novalidate_s, "read.validate_s": validate_s,
                "inspect.stats_s": stats_s, "inspect.startup_tiny_file_s": inspect_tiny_s,
            },
        },
        "msgpack_baseline": {
            "build_s": build_s, "write_s": base_write_s, "read_s": base_read_s,
            "file_bytes": base_bytes, "bytes_per_task": base_bytes / n,
            "bytes_per_task_excl_config": (base_bytes - config_bytes) / n,
        },
    }


# --------------------------------------------------------------------- reporting
def verdicts(result: dict) -> dict:
    g = result["graphfile"]
    return {key: g[key] <= limit for key, limit in TARGETS.items()}


def render(result: dict) -> str:
    g, b = result["graphfile"], result["msgpack_baseline"]
    met = verdicts(result)

    def mark(key):
        return "yes" if met[key] else "NO"

    rows = [
        ["build Task objects (s)", f"{g['build_s']:.2f}", f"{b['build_s']:.2f}", "", ""],
        ["write (s)", f"{g['write_s']:.2f}", f"{b['write_s']:.2f}", "<= 10", mark("write_s")],
        ["read (s)", f"{g['read_s']:.3f}", f"{b['read_s']:.3f}", "<= 0.5", mark("read_s")],
        ["file size (MB)", f"{g['file_bytes'] / 1e6:.1f}", f"{b['file_bytes'] / 1e6:.1f}", "", ""],
        ["bytes/task", f"{g['bytes_per_task']:.1f}", f"{b['bytes_per_task']:.1f}", "", ""],
        ["bytes/task excl. config", f"{g['bytes_per_task_excl_config']:.1f}",
         f"{b['bytes_per_task_excl_config']:.1f}", "<= 40", mark("bytes_per_task_excl_config")],
        ["loomctl inspect (s)", f"{g['inspect_s']:.2f}", "-", "<= 2", mark("inspect_s")],
    ]
    head = (f"binary merge tree, 2^{result['leaves_log2']} const leaves: {result['tasks']:,} tasks, "
            f"{result['config_bytes']:,} config bytes; best of {result['repeat']}")
    main = tabulate(rows, headers=["", "graph file", "msgpack dicts", "target", "met"],
                    colalign=("left", "right", "right", "right", "left"), disable_numparse=True)
    parts = [(k, f"{v:.3f}") for k, v in g["breakdown"].items()]
    detail = tabulate(parts, headers=["graph file breakdown", "s"], colalign=("left", "right"),
                      disable_numparse=True)
    return f"{head}\n\n{main}\n\n{detail}"


def environment() -> dict:
    return {
        "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__,
        "msgpack": ".".join(map(str, msgpack.version)), "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves-log2", type=int, default=19, metavar="N",
                        help="the tree has 2**N const leaves and 2**(N+1)-1 tasks (default 19)")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run each measurement K times and keep the best (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--dir", default=None, help="directory for the temporary files (default: the system temp dir)")
    args = parser.parse_args(argv)
    if not 1 <= args.leaves_log2 <= 24:
        parser.error("--leaves-log2 must be between 1 and 24")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="loom-bench-") as workdir:
        result = measure(args.leaves_log2, max(1, args.repeat), workdir)
    result["targets"] = TARGETS
    result["met"] = verdicts(result)
    result["environment"] = environment()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        env = result["environment"]
        print(render(result))
        print(f"\n{env['date']}, {env['cpus']} cpus, Python {env['python']}, numpy {env['numpy']}, "
              f"msgpack {env['msgpack']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
