"""Summary of a trace: plain data (for --json) and its text tables.

Definitions (also in loomctl-trace(1)):
- span: from the first task start to the last task end in the trace.
- label group: a task's label up to its first ``:`` ("(no label)" without a label).
- worker busy time: the sum over its tasks that hold cpus of duration x cpus held;
  utilisation = busy / (cpus x span). Light tasks (slot < 0) are counted apart.
- critical path: the chain of dependent tasks (through the inputs each task record
  lists) with the largest sum of task durations; inputs that the trace does not hold
  (results of earlier jobs) end a chain. A task run twice (its worker was lost) counts
  with its last successful run.
"""

from __future__ import annotations

from collections import defaultdict

from loomctl.textfmt import human_bytes as fmt_bytes
from loomctl.textfmt import key_values, shorten, table
from loomctl.trace.reader import Trace

NO_LABEL = "(no label)"


def label_group(label) -> str:
    if not label:
        return NO_LABEL
    return str(label).split(":", 1)[0] or NO_LABEL


def duration(task: dict) -> float:
    return max(0.0, task["t1"] - task["t0"])


def task_span(trace: Trace) -> tuple[float, float]:
    if not trace.tasks:
        return trace.span
    return min(t["t0"] for t in trace.tasks), max(t["t1"] for t in trace.tasks)


def _stats(rows: dict) -> list:
    out = []
    for key, durations in rows.items():
        total = sum(durations)
        out.append({"count": len(durations), "total_s": total, "mean_s": total / len(durations),
                    "max_s": max(durations), "_key": key})
    out.sort(key=lambda r: (-r["total_s"], str(r["_key"])))
    return out


def summary(trace: Trace, path_limit: int | None = None) -> dict:
    start, end = task_span(trace)
    span = max(0.0, end - start)
    by_type, failed_by_type, by_label = defaultdict(list), defaultdict(int), defaultdict(list)
    for t in trace.tasks:
        d = duration(t)
        by_type[t["sym"]].append(d)
        by_label[label_group(t["label"])].append(d)
        if t["status"] == "failed":
            failed_by_type[t["sym"]] += 1
    types = []
    for row in _stats(by_type):
        key = row.pop("_key")
        types.append({"type": key, "failed": failed_by_type.get(key, 0), **row})
    labels = [{"group": row.pop("_key"), **row} for row in _stats(by_label)]
    return {
        "directory": trace.directory,
        "files": [vars(f) for f in trace.files],
        "notes": list(trace.notes),
        "span": {"start": start, "end": end, "seconds": span},
        "jobs": [{"job": j["job"], "name": j.get("name", ""), "tasks": j.get("n"), "status": j.get("status"),
                  "seconds": (j["t_end"] - j["t"]) if j.get("t_end") is not None else None}
                 for j in sorted(trace.jobs.values(), key=lambda j: j["job"])],
        "tasks": {"count": len(trace.tasks), "distinct": len({t["id"] for t in trace.tasks}),
                  "failed": sum(1 for t in trace.tasks if t["status"] == "failed")},
        "by_type": types,
        "by_label": labels,
        "workers": _workers(trace, span),
        "transfers": _transfers(trace),
        "scheduler": _scheduler(trace, span),
        "critical_path": critical_path(trace, path_limit),
        "logs": _logs(trace),
    }


def _workers(trace: Trace, span: float) -> list:
    rows = {}
    names = sorted(set(trace.workers) | {t["worker"] for t in trace.tasks if t["worker"]})
    for name in names:
        info = trace.workers.get(name, {})
        rows[name] = {"worker": name, "cpus": int(info.get("cpus") or 0), "tasks": 0, "busy_s": 0.0,
                      "utilisation": None, "light_tasks": 0, "light_busy_s": 0.0,
                      "fetches": 0, "bytes_in": 0}
    for t in trace.tasks:
        row = rows.get(t["worker"])
        if row is None:
            continue
        row["tasks"] += 1
        if t["slot"] >= 0:
            row["busy_s"] += duration(t) * max(1, t["cpus"])
        else:
            row["light_tasks"] += 1
            row["light_busy_s"] += duration(t)
    for x in trace.transfers:
        row = rows.get(x["dst"])
        if row is not None:
            row["fetches"] += 1
            row["bytes_in"] += x["bytes"]
    for row in rows.values():
        if row["cpus"] and span > 0:
            row["utilisation"] = row["busy_s"] / (row["cpus"] * span)
    return list(rows.values())


def _transfers(trace: Trace) -> dict:
    pairs = defaultdict(lambda: {"count": 0, "objects": 0, "bytes": 0, "seconds": 0.0})
    for x in trace.transfers:
        p = pairs[(str(x["src"]), str(x["dst"]))]
        p["count"] += 1
        p["objects"] += int(x.get("n") or 0)
        p["bytes"] += x["bytes"]
        p["seconds"] += max(0.0, x["t1"] - x["t0"])
    return {"count": len(trace.transfers), "objects": sum(int(x.get("n") or 0) for x in trace.transfers),
            "bytes": sum(x["bytes"] for x in trace.transfers),
            "seconds": sum(max(0.0, x["t1"] - x["t0"]) for x in trace.transfers),
            "pairs": [{"from": a, "to": b, **v} for (a, b), v in sorted(pairs.items())]}


def _scheduler(trace: Trace, span: float) -> dict:
    total = sum(r["dur"] for r in trace.rounds)
    return {"rounds": len(trace.rounds), "placed": sum(r["placed"] for r in trace.rounds),
            "total_s": total, "mean_s": total / len(trace.rounds) if trace.rounds else 0.0,
            "max_s": max((r["dur"] for r in trace.rounds), default=0.0),
            "share_of_span": total / span if span > 0 else None}


def _logs(trace: Trace) -> dict:
    levels = defaultdict(int)
    for entry in trace.logs:
        levels[entry.get("level", "info")] += 1
    ordered = sorted(trace.logs, key=lambda e: e["t"])
    return {"count": len(trace.logs), "by_level": dict(levels),
            "messages": [{"t": e["t"], "task": e["id"], "worker": e["worker"], "level": e.get("level", "info"),
                          "message": e["msg"]} for e in ordered]}


def critical_path(trace: Trace, limit: int | None = None) -> dict:
    """See the module docstring; ``path`` lists the chain from its first task on
    (``limit``: at most that many entries, the first and last ones)."""
    best_run = {}
    for t in trace.tasks:   # the last successful run of each task
        old = best_run.get(t["id"])
        if old is None or (t["status"] == "ok", t["t1"]) >= (old["status"] == "ok", old["t1"]):
            best_run[t["id"]] = t
    tasks = best_run
    preds = {tid: [i for i in dict.fromkeys(t["in"]) if i in tasks and i != tid] for tid, t in tasks.items()}
    indegree = {tid: len(p) for tid, p in preds.items()}
    consumers = defaultdict(list)
    for tid, ps in preds.items():
        for p in ps:
            consumers[p].append(tid)
    order = [tid for tid, n in indegree.items() if n == 0]
    length, via = {}, {}
    k = 0
    while k < len(order):   # Kahn's order: every input comes before its consumers
        tid = order[k]
        k += 1
        before = max(preds[tid], key=lambda p: length[p], default=None)
        length[tid] = duration(tasks[tid]) + (length[before] if before is not None else 0.0)
        via[tid] = before
        for c in consumers[tid]:
            indegree[c] -= 1
            if indegree[c] == 0:
                order.append(c)
    result = {"method": "dependencies", "seconds": 0.0, "elapsed_s": 0.0, "tasks": 0, "path": [],
              "cyclic": len(order) < len(tasks)}
    if not length:
        return result
    last = max(length, key=lambda t: (length[t], -t))
    chain = []
    while last is not None:
        chain.append(last)
        last = via[last]
    chain.reverse()
    path = [{"id": tid, "type": tasks[tid]["sym"], "label": tasks[tid]["label"], "worker": tasks[tid]["worker"],
             "start": tasks[tid]["t0"], "seconds": duration(tasks[tid])} for tid in chain]
    result.update(seconds=length[chain[-1]], tasks=len(chain),
                  elapsed_s=tasks[chain[-1]]["t1"] - tasks[chain[0]]["t0"])
    if limit is not None and len(path) > limit:
        half = limit // 2
        result["omitted"] = len(path) - 2 * half
        path = path[:half] + path[-half:]
    result["path"] = path
    return result


# ---------------------------------------------------------------------------- text

def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    if s >= 100:
        return f"{seconds:.0f} s"
    if s >= 1:
        return f"{seconds:.2f} s"
    if s >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    if s == 0:
        return "0"
    return f"{seconds * 1e6:.3g} µs"


def fmt_percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def render(data: dict, max_rows: int = 30) -> str:
    out = []
    span = data["span"]
    tasks = data["tasks"]
    out.append(key_values([
        ("trace", data["directory"]),
        ("files", ", ".join(f["name"] for f in data["files"])),
        ("span", fmt_time(span["seconds"])),
        ("tasks", f"{tasks['count']} records, {tasks['distinct']} distinct tasks, {tasks['failed']} failed"),
        ("jobs", ", ".join(f"{j['job']} ({j['status']}, {fmt_time(j['seconds'])})" for j in data["jobs"]) or "-"),
    ]))

    def section(title, rows, headers, colalign=None):
        body = rows[:max_rows]
        text = table(body, headers, colalign=colalign) if body else "(none)"
        if len(rows) > max_rows:
            text += f"\n... {len(rows) - max_rows} more rows (--json shows all)"
        out.append(f"{title}\n{text}")

    right5 = ("left", "right", "right", "right", "right")
    section("Tasks per type", [[r["type"], r["count"], r["failed"], fmt_time(r["total_s"]), fmt_time(r["mean_s"]),
                                fmt_time(r["max_s"])] for r in data["by_type"]],
            ["type", "count", "failed", "total", "mean", "max"], ("left", "right", "right", "right", "right", "right"))
    section("Tasks per label group", [[r["group"], r["count"], fmt_time(r["total_s"]), fmt_time(r["mean_s"]),
                                       fmt_time(r["max_s"])] for r in data["by_label"]],
            ["label group", "count", "total", "mean", "max"], right5)
    section("Workers", [[w["worker"], w["cpus"], w["tasks"], fmt_time(w["busy_s"]), fmt_percent(w["utilisation"]),
                         w["light_tasks"], fmt_time(w["light_busy_s"]), w["fetches"], fmt_bytes(w["bytes_in"])]
                        for w in data["workers"]],
            ["worker", "cpus", "tasks", "cpu busy", "utilisation", "light tasks", "light busy", "fetches",
             "bytes in"], ("left",) + ("right",) * 8)
    x = data["transfers"]
    section(f"Transfers: {x['count']} fetches, {x['objects']} objects, {fmt_bytes(x['bytes'])}, "
            f"{fmt_time(x['seconds'])} in total",
            [[p["from"], p["to"], p["count"], p["objects"], fmt_bytes(p["bytes"]), fmt_time(p["seconds"])]
             for p in x["pairs"]],
            ["from", "to", "fetches", "objects", "bytes", "time"], ("left", "left", "right", "right", "right", "right"))
    s = data["scheduler"]
    out.append("Scheduler\n" + key_values([
        ("rounds", s["rounds"]), ("tasks placed", s["placed"]), ("total time", fmt_time(s["total_s"])),
        ("mean / max round", f"{fmt_time(s['mean_s'])} / {fmt_time(s['max_s'])}"),
        ("share of span", fmt_percent(s["share_of_span"]))]))
    cp = data["critical_path"]
    head = (f"Critical path (by task dependencies): {cp['tasks']} tasks, {fmt_time(cp['seconds'])} of task time, "
            f"{fmt_time(cp['elapsed_s'])} from its first start to its last end (span {fmt_time(span['seconds'])})")
    rows = [[p["id"], p["type"], p["label"] or "", p["worker"], fmt_time(p["seconds"])] for p in cp["path"]]
    if cp.get("omitted"):
        half = len(rows) // 2
        rows.insert(half, ["...", f"{cp['omitted']} more", "", "", ""])
    out.append(head + ("\n" + table(rows, ["task", "type", "label", "worker", "time"]) if rows else ""))
    logs = data["logs"]
    if logs["count"]:
        shown = min(max_rows, 10)
        lines = [f"{m['level']:>8}  task {m['task']} on {shorten(m['worker'], 60)}: {shorten(m['message'], 200)}"
                 for m in logs["messages"][:shown]]
        more = f"\n... {logs['count'] - shown} more (--json shows all)" if logs["count"] > shown else ""
        out.append(f"Task messages ({logs['count']})\n" + "\n".join(lines) + more)
    if data["notes"]:
        out.append("Notes\n" + "\n".join(f"- {shorten(n)}" for n in data["notes"]))
    return "\n\n".join(out)
