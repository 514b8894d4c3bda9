"""Benchmarks of the scheduler in simulation (``loomctl.sim``): plan families on clusters of
8x4 to 64x24 cpus per scheduler variant, and a model of HyperLoom's pipeline in strong
and weak scaling on 1 to 64 nodes of 24 cpus. Prints markdown tables (or --json).

    python bench/simulate.py families [--clusters 8x4,16x8,32x16,64x24] [--variants ...]
    python bench/simulate.py pipeline [--nodes 1,8,16,32,64] [--targets 924] [--weak-targets 25]
    python bench/simulate.py forkjoin            # 15,360 one-second tasks on 64x24
    python bench/simulate.py million             # a 1M-task simulation, timed
    python bench/simulate.py server              # server CPU per task, 2 workers vs 64x24

Figures are measured, never assumed: the server's time is the core's CPU time in this
process. See bench/README.md for the assumptions and the figures of the last run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from loomctl.sim import families, simulate

VARIANTS = {
    "wait": {"blevel": False, "spill": False, "steal": False},   # the locality rule before: wait for data
    "spill": {"blevel": False, "spill": True, "steal": False},
    "spill+blevel": {"blevel": True, "spill": True, "steal": False},
    "spill+blevel+steal": {"blevel": True, "spill": True, "steal": True},
}

# the plan families at the size the tables use (see bench/README.md)
FAMILIES = {
    "fork-join": lambda: families.fork_join(15360, 1.0),
    "merge-tree": lambda: families.merge_tree(4096, 2, 1.0, 1 << 20),
    "map-reduce": lambda: families.map_reduce(256, 64, 2.0, 16 << 20),
    "crossv": lambda: families.crossv(5, 64, 10.0, 64 << 20),
    "crossv-big": lambda: families.crossv(10, 256, 10.0, 64 << 20),
    "montage": lambda: families.montage(1024, 1.0, 4 << 20),
    "layered": lambda: families.layered(16, 256, 3, 1.0, 1 << 20),
    "layered-wide": lambda: families.layered(8, 2048, 3, 1.0, 1 << 20),
    "chains": lambda: families.chains(16, 100, 1500, 1.0),
}


def configure(options: dict):
    def apply(core):
        for key, value in options.items():
            setattr(core.options, key, value)
    return apply


def run(family, cpus: list[int], options: dict, seed: int = 0, **kw) -> dict:
    return simulate(family.graph, cpus, family.durations, family.sizes, seed=seed, configure=configure(options), **kw)


def cluster(text: str) -> list[int]:
    n, c = (int(x) for x in text.split("x"))
    return [c] * n


def bench_families(args) -> dict:
    clusters = args.clusters.split(",")
    variants = args.variants.split(",")
    out = {}
    for name in args.only.split(",") if args.only else FAMILIES:
        family = FAMILIES[name]()
        for shape in clusters:
            row = {}
            for variant in variants:
                r = run(family, cluster(shape), VARIANTS[variant], args.seed)
                row[variant] = r
                print(f"  {name:12s} {shape:6s} {variant:20s} makespan {r['makespan_s']:9.2f} s  bound "
                      f"{r['lower_bound_s']:9.2f} s  ratio {r['makespan_over_bound']:.3f}  ({r['wall_s']:.1f} s)",
                      file=sys.stderr, flush=True)
            out.setdefault(name, {})[shape] = row
    return out


def families_table(results: dict, variants: list[str]) -> str:
    lines = ["| family | tasks | cluster | " + " | ".join(variants) + " |",
             "|---|---:|---|" + "---:|" * len(variants)]
    medians: dict = {}
    for name, by_cluster in results.items():
        for shape, row in by_cluster.items():
            tasks = next(iter(row.values()))["tasks"]
            cells = []
            for v in variants:
                ratio = row[v]["makespan_over_bound"]
                medians.setdefault((shape, v), []).append(ratio)
                cells.append(f"{ratio:.3f}")
            lines.append(f"| {name} | {tasks:,} | {shape} | " + " | ".join(cells) + " |")
    shapes = list(dict.fromkeys(s for by in results.values() for s in by))
    for shape in shapes:
        lines.append(f"| **median** | | {shape} | " + " | ".join(
            f"**{statistics.median(medians[(shape, v)]):.3f}**" for v in variants) + " |")
    return "\n".join(lines)


def bench_pipeline(args) -> dict:
    nodes = [int(x) for x in args.nodes.split(",")]
    options = VARIANTS[args.variant]
    out = {"strong": {}, "weak": {}}
    if not args.weak_only:
        family = families.pipeline(args.targets)
        for n in nodes:
            r = run(family, [24] * n, options, args.seed)
            out["strong"][n] = r
            print(f"  strong {n:3d} nodes: makespan {r['makespan_s']:10.1f} s  efficiency {r['efficiency']:.3f} "
                  f"({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    if not args.strong_only:
        for n in nodes:
            family = families.pipeline(args.weak_targets * n)
            r = run(family, [24] * n, options, args.seed)
            out["weak"][n] = r
            print(f"  weak   {n:3d} nodes: {r['tasks']:,} tasks, makespan {r['makespan_s']:10.1f} s  "
                  f"efficiency {r['efficiency']:.3f} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return out


def pipeline_table(results: dict) -> str:
    lines = []
    for kind in ("strong", "weak"):
        rows = results.get(kind) or {}
        if not rows:
            continue
        base = rows[min(rows)]
        lines += [f"**{kind} scaling**", "",
                  "| nodes x 24 cpus | tasks | makespan (s) | lower bound (s) | efficiency | makespan / bound | "
                  f"{'speed-up' if kind == 'strong' else 'weak efficiency'} | transferred (GB) | server busy (s) | "
                  "server us/task | simulated in (s) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in rows.items():
            scale = base["makespan_s"] / r["makespan_s"] if kind == "strong" else \
                (base["makespan_s"] / r["makespan_s"]) * (r["work_s"] / r["tasks"]) / (base["work_s"] / base["tasks"])
            lines.append(f"| {n} | {r['tasks']:,} | {r['makespan_s']:.1f} | {r['lower_bound_s']:.1f} | "
                         f"{r['efficiency']:.3f} | {r['makespan_over_bound']:.3f} | {scale:.3f} | "
                         f"{r['transferred_bytes'] / 1e9:.1f} | {r['server_busy_s']:.1f} | "
                         f"{r['server_us_per_task']:.0f} | {r['wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def bench_forkjoin(args) -> dict:
    family = families.fork_join(15360, 1.0)
    return {v: run(family, [24] * 64, VARIANTS[v], args.seed) for v in args.variants.split(",")}


def bench_million(args) -> dict:
    t0 = time.perf_counter()
    family = families.pipeline(2008)   # 999,984 tasks
    built = time.perf_counter() - t0
    r = run(family, [24] * 64, VARIANTS[args.variant], args.seed)
    r["build_s"] = built
    return r


def bench_server(args) -> dict:
    """Server CPU per task: the same plan on 2 workers and on 64 x 24 cpus."""
    family = families.layered(8, 2048, 3, 1.0, 64 << 10)
    out = {}
    for shape in ("2x1", "2x24", "64x24"):
        out[shape] = run(family, cluster(shape), VARIANTS[args.variant], args.seed)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["families", "pipeline", "forkjoin", "million", "server"])
    p.add_argument("--clusters", default="8x4,16x8,32x16,64x24")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", default="spill+blevel", help="the variant of pipeline/million/server")
    p.add_argument("--only", default="", help="comma-separated family names")
    p.add_argument("--nodes", default="1,8,16,32,64")
    p.add_argument("--targets", type=int, default=924)
    p.add_argument("--weak-targets", type=int, default=25)
    p.add_argument("--strong-only", action="store_true")
    p.add_argument("--weak-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = {"families": bench_families, "pipeline": bench_pipeline, "forkjoin": bench_forkjoin,
              "million": bench_million, "server": bench_server}[args.what](args)
    if args.json:
        print(json.dumps(result, indent=1))
    elif args.what == "families":
        print(families_table(result, args.variants.split(",")))
    elif args.what == "pipeline":
        print(pipeline_table(result))
    else:
        rows = result if args.what in ("forkjoin", "server") else {"1M tasks": result}
        keys = ["tasks", "makespan_s", "lower_bound_s", "makespan_over_bound", "efficiency", "server_busy_s",
                "server_us_per_task", "rounds", "reports", "wall_s"]
        print("| | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else f"{r[k]:,}"
                                              for k in keys) + " |")


if __name__ == "__main__":
    main()
