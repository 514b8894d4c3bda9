"""Export a trace as Chrome Trace Event JSON (opened by Perfetto and chrome://tracing).

Mapping (documented in loomctl-trace(1)):
- pid: 0 is the server, 1.. the workers in name order; ``M`` events name processes
  (``process_name``) and rows (``thread_name``) and order them (``*_sort_index``).
- tid: the cpu slot for tasks holding cpus (0..cpus-1); ``INLINE_TID`` for inline
  tasks, ``LIGHT_TID + k`` for light row k, ``FETCH_TID`` for the fetches a worker
  made, tid 0 of the server for its scheduler rounds.
- ``X`` events (complete): tasks (name: label, else type; cat: label group; args: task
  id, job, label, type, status, result bytes, inputs count), fetches (cat "transfer";
  args: from, to, bytes, objects) and scheduler rounds (cat "scheduler"; args: placed).
- ``C`` events (counters) per worker sample: "cpu %", "memory" (rss bytes), "data"
  (objects, bytes held).
- ``i`` events (instant, thread scope) for messages logged by tasks.
- ts and dur are microseconds since the first record of the trace.
"""

from __future__ import annotations

import re

from loomctl.trace import format as F
from loomctl.trace.reader import Trace
from loomctl.trace.report import label_group

INLINE_TID = 1000
LIGHT_TID = 1001
FETCH_TID = 2000


def _tid(slot: int) -> int:
    if slot >= 0:
        return slot
    if slot == F.INLINE_SLOT:
        return INLINE_TID
    return LIGHT_TID + (F.FIRST_LIGHT_SLOT - slot)


def _thread_name(tid: int) -> str:
    if tid == INLINE_TID:
        return "inline"
    if tid == FETCH_TID:
        return "fetches"
    if tid >= LIGHT_TID:
        return f"light {tid - LIGHT_TID + 1}"
    return f"cpu {tid}"


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def chrome_events(trace: Trace) -> dict:
    starts = [t["t0"] for t in trace.tasks] + [x["t0"] for x in trace.transfers] + \
             [r["t"] for r in trace.rounds] + [s["t"] for s in trace.samples]
    origin = min(starts) if starts else 0.0

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    names = sorted({*trace.workers, *(t["worker"] for t in trace.tasks if t["worker"]),
                    *(x["dst"] for x in trace.transfers if x["dst"])}, key=_natural)
    pid = {name: k + 1 for k, name in enumerate(names)}
    events: list[dict] = []
    threads: set[tuple[int, int]] = set()

    def meta(name: str, p: int, args: dict, tid: int = 0) -> None:
        events.append({"ph": "M", "name": name, "pid": p, "tid": tid, "args": args})

    if trace.rounds:
        meta("process_name", 0, {"name": "server"})
        meta("process_sort_index", 0, {"sort_index": 0})
        threads.add((0, 0))
    for name, p in pid.items():
        cpus = trace.workers.get(name, {}).get("cpus")
        meta("process_name", p, {"name": f"worker {name}" + (f" ({cpus} cpus)" if cpus else "")})
        meta("process_sort_index", p, {"sort_index": p})
    for t in trace.tasks:
        p = pid.get(t["worker"], 0)
        args = {"id": t["id"], "job": t.get("job"), "label": t["label"], "type": t["sym"], "status": t["status"],
                "bytes": t.get("size", 0), "inputs": len(t["in"]), "cpus": t["cpus"]}
        for slot in t.get("slots") or [t["slot"]]:
            tid = _tid(slot)
            threads.add((p, tid))
            events.append({"ph": "X", "name": t["label"] or t["sym"], "cat": label_group(t["label"]),
                           "ts": us(t["t0"]), "dur": round(max(0.0, t["t1"] - t["t0"]) * 1e6, 3),
                           "pid": p, "tid": tid, "args": args})
    for x in trace.transfers:
        p = pid.get(x["dst"], 0)
        threads.add((p, FETCH_TID))
        events.append({"ph": "X", "name": f"fetch from {x['src']}", "cat": "transfer", "ts": us(x["t0"]),
                       "dur": round(max(0.0, x["t1"] - x["t0"]) * 1e6, 3), "pid": p, "tid": FETCH_TID,
                       "args": {"from": str(x["src"]), "to": str(x["dst"]), "bytes": x["bytes"],
                                "objects": int(x.get("n") or 0)}})
    for r in trace.rounds:
        events.append({"ph": "X", "name": "schedule", "cat": "scheduler", "ts": us(r["t"]),
                       "dur": round(max(0.0, r["dur"]) * 1e6, 3), "pid": 0, "tid": 0,
                       "args": {"placed": r["placed"], "ready": r.get("ready", 0)}})
    for s in trace.samples:
        p = pid.get(s["worker"], 0)
        ts = us(s["t"])
        events.append({"ph": "C", "name": "cpu %", "ts": ts, "pid": p, "args": {"cpu": s.get("cpu", 0)}})
        events.append({"ph": "C", "name": "memory", "ts": ts, "pid": p, "args": {"rss": s.get("rss", 0)}})
        events.append({"ph": "C", "name": "data", "ts": ts, "pid": p,
                       "args": {"objects": s.get("objects", 0), "bytes": s.get("bytes", 0)}})
    slot_of = {(t["worker"], t["id"]): t["slot"] for t in trace.tasks}
    for entry in trace.logs:
        p = pid.get(entry["worker"], 0)
        tid = _tid(slot_of.get((entry["worker"], entry["id"]), F.INLINE_SLOT))
        events.append({"ph": "i", "name": entry["msg"][:80], "cat": "log", "ts": us(entry["t"]), "pid": p,
                       "tid": tid, "s": "t", "args": {"task": entry["id"], "level": entry.get("level", "info"),
                                                       "message": entry["msg"]}})
    for p, tid in sorted(threads):
        meta("thread_name", p, {"name": "scheduler" if p == 0 else _thread_name(tid)}, tid)
        meta("thread_sort_index", p, {"sort_index": tid}, tid)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "loomctl", "trace": trace.directory, "origin_unix_s": origin,
                          "notes": list(trace.notes)}}
