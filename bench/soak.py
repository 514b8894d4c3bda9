"""Soak: small jobs for a long time against one server and two workers; prints the RSS
of every process over time and its growth after the first minute.

    /work/venv/bin/python bench/soak.py                 # 10 minutes
    /work/venv/bin/python bench/soak.py --minutes 2 --json

Each job is one const, submitted, gathered and released by one client (the shape of an
interactive workflow). The figure to watch: growth after the first minute (goal: at
most 2 MB in total for the server and the workers together over 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphfmt import tasks  # noqa: E402
from loomctl.client import Client  # noqa: E402


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="loomctl-soak-")
    server_dir = os.path.join(work, "server")
    env = dict(os.environ, LOOM_SERVER_DIR=server_dir, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "loomctl"]
    procs = {"server": subprocess.Popen([*cmd, "server", "start", "--port", "0"], env=env,
                                        stderr=subprocess.DEVNULL)}
    while not os.path.exists(os.path.join(server_dir, "access.json")):
        time.sleep(0.05)
    for k in range(2):
        procs[f"w{k}"] = subprocess.Popen([*cmd, "worker", "start", "--cpus", "1", "--work-dir",
                                           os.path.join(work, "work")], env=env, stderr=subprocess.DEVNULL)
    samples = []
    jobs = 0
    try:
        with Client(server_dir_path=server_dir) as client:
            while client.get_stats()["n_workers"] < 2:
                time.sleep(0.05)
            start = time.monotonic()
            next_sample = start
            while time.monotonic() - start < args.minutes * 60:
                client.submit_one(tasks.const(b"x")).gather()
                jobs += 1
                if time.monotonic() >= next_sample:
                    samples.append({"t_s": round(time.monotonic() - start), "jobs": jobs,
                                    **{name: rss_kb(p.pid) for name, p in procs.items()}})
                    next_sample += args.sample
            samples.append({"t_s": round(time.monotonic() - start), "jobs": jobs,
                            **{name: rss_kb(p.pid) for name, p in procs.items()}})
            stats = client.get_stats()
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait()
    after_minute = next((s for s in samples if s["t_s"] >= 60), samples[0])
    last = samples[-1]
    growth = {name: last[name] - after_minute[name] for name in procs}
    result = {"minutes": args.minutes, "jobs": jobs, "jobs_per_s": round(jobs / (last["t_s"] or 1), 1),
              "growth_after_first_minute_kb": growth, "total_growth_kb": sum(growth.values()),
              "per_1000_jobs_kb": round(sum(growth.values()) / max(1, (last["jobs"] - after_minute["jobs"]) / 1000), 2),
              "retired_jobs": stats.get("retired_jobs"), "samples": samples}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{'t (s)':>6} {'jobs':>8} " + " ".join(f"{name + ' RSS kB':>14}" for name in procs))
    for s in samples:
        print(f"{s['t_s']:>6} {s['jobs']:>8} " + " ".join(f"{s[name]:>14}" for name in procs))
    print(f"\n{jobs} jobs ({result['jobs_per_s']}/s); RSS growth after the first minute: "
          + ", ".join(f"{name} {kb} kB" for name, kb in growth.items())
          + f"; total {result['total_growth_kb']} kB ({result['per_1000_jobs_kb']} kB per 1,000 jobs)")


if __name__ == "__main__":
    main()
