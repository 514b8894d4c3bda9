"""A restarted server's core, rebuilt from its journal, and the journal's live state.

``restore(core, records, now, hold_s)`` replays a journal (see server/journal.py) into an
empty core: every job not retired is submitted again from its graph at its own ids
(workers that come back hold data by id), the tasks that had finished are FINISHED
again (without data: no worker is known yet), results no client wants stay unwanted,
and jobs that had ended end again. Scheduling waits ``hold_s`` seconds
(``core.hold_until``) so that workers joining again bring back the data they hold;
then what is still missing and needed is computed again (``recompute_lost``).
``snapshot(core, server)`` is the inverse: the records of the live state, for a
compaction.

Invariants:
- Restored jobs keep their ids and task ids (global ids; the journal names no rows);
  ids handed out later never collide with ids a worker may still hold
  (``segs.next_gid`` is at least the journal's last "ids").
- Restored jobs are detached: they complete whatever became of their clients.
- The core's invariants hold after ``restore`` (tests check them).
"""

from __future__ import annotations

import numpy as np

import graphfmt
from graphfmt.graph import GraphError
from loomctl.core import jobs
from loomctl.core import transitions as T
from loomctl.core.tasktable import FINISHED, FLAG_RESULT, READY, WAITING


def _ids(raw) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i8").astype(np.int64) if isinstance(raw, bytes) and len(raw) % 8 == 0 \
        else np.zeros(0, np.int64)


def restore(core, records: list, now: float, hold_s: float) -> dict:
    """Replay ``records``; returns {server, jobs, tasks_finished, skipped} (see the module
    docstring). A record that does not make sense is skipped and counted."""
    server: dict = {}
    live: dict[int, dict] = {}
    finished: list[tuple] = []
    unwanted: list[np.ndarray] = []
    next_id = 0
    skipped = 0
    for record in records:
        kind = record[0]
        try:
            if kind == "server":
                server = dict(record[1])
            elif kind == "job":
                _, job_id, base, graph_bytes, options = record
                live[int(job_id)] = {"base": int(base), "graph": graph_bytes, "options": dict(options),
                                     "end": None}
            elif kind == "ids":
                next_id = max(next_id, int(record[1]))
            elif kind == "finished":
                ids, sizes, lengths = (_ids(x) for x in record[1:4])
                if len(ids) == len(sizes) == len(lengths):
                    finished.append((ids, sizes, lengths))
                else:
                    skipped += 1
            elif kind == "unwanted":
                unwanted.append(_ids(record[1]))
            elif kind == "end":
                if int(record[1]) in live:
                    live[int(record[1])]["end"] = (str(record[2]), record[3])
            elif kind == "retire":
                live.pop(int(record[1]), None)
            else:
                skipped += 1
        except (ValueError, TypeError, KeyError, IndexError):
            skipped += 1
    c = core.graph.cols
    segs = core.graph.segs
    restored = finished_count = 0
    f_ids, f_sizes, f_lengths = (np.concatenate([f[k] for f in finished]) if finished else np.zeros(0, np.int64)
                                 for k in range(3))
    order = np.argsort(f_ids, kind="stable")   # (a later record of an id wins below)
    f_ids, f_sizes, f_lengths = f_ids[order], f_sizes[order], f_lengths[order]
    u_ids = np.sort(np.concatenate(unwanted)) if unwanted else np.zeros(0, np.int64)
    for job_id, entry in sorted(live.items(), key=lambda kv: kv[1]["base"]):
        if entry["base"] < segs.next_gid:
            skipped += 1
            continue
        try:
            graph = graphfmt.read(entry["graph"])
        except GraphError:
            skipped += 1
            continue
        segs.skip_to(entry["base"])
        core.next_job = job_id
        options = entry["options"]
        try:
            job = jobs.submit(core, None, graph, now, load=bool(options.get("load")), name=str(options.get("name") or ""),
                              notify=False, detached=True)
        except jobs.SubmitError:
            skipped += 1
            continue
        restored += 1
        lo, hi = job.base, job.base + job.n
        a, b = np.searchsorted(f_ids, [lo, hi])
        if b > a:
            ids, sizes, lengths = f_ids[a:b], f_sizes[a:b], f_lengths[a:b]
            last = np.concatenate([ids[1:] != ids[:-1], [True]])   # each id once, its last record
            ids, sizes, lengths = core.graph.rows_of(ids[last]), sizes[last], lengths[last]
            state = c.state[ids]
            pending = (state == WAITING) | (state == READY)
            ids, sizes, lengths = ids[pending], sizes[pending], lengths[pending]
            c.size[ids], c.length[ids] = sizes, lengths
            T.transition(core, ids, FINISHED)
            finished_count += len(ids)
        a, b = np.searchsorted(u_ids, [lo, hi])
        if b > a:
            T.set_wanted(core, core.graph.rows_of(T.small_unique(u_ids[a:b])), False)
        if entry["end"] is not None:
            status, error = entry["end"]
            if job.status == "running":
                if status == "finished":
                    jobs.end(core, job, "finished", now)
                else:
                    job.error = error if isinstance(error, dict) else None
                    jobs.abort(core, job, status if status in ("failed", "cancelled") else "cancelled", now)
        elif job.status == "running" and job.finished >= job.active:
            jobs.end(core, job, "finished", now)
        core.next_job = max(core.next_job, job_id + 1)
    segs.skip_to(next_id)
    core.hold_until = now + hold_s
    return {"server": server, "jobs": restored, "tasks_finished": finished_count, "skipped": skipped}


def snapshot(core, server: dict) -> list:
    """The journal records of the live state (jobs not retired); a job's graph is the
    Graph it was submitted as (server/journal.py writes it as its graph file)."""
    c = core.graph.cols
    out = [["server", server], ["ids", int(core.graph.segs.next_gid)]]
    for job in sorted(core.jobs.values(), key=lambda j: j.base):
        seg = core.graph.segs.segments[job.segments[0]]
        # (the Graph, not its file: the journal's thread encodes it, off the server's loop)
        out.append(["job", job.id, job.base, core.graph.submitted_graph(seg), {"name": job.name, "detached": True}])
        lo, hi = seg.base, seg.base + seg.n   # (rows)
        done = lo + np.flatnonzero(c.state[lo:hi] == FINISHED)
        if len(done):
            out.append(["finished", core.graph.ids_of(done).astype("<i8").tobytes(), c.size[done].astype("<i8").tobytes(),
                        c.length[done].astype("<i8").tobytes()])
        unwanted = job.results[(c.flags[job.results] & FLAG_RESULT) == 0] if len(job.results) else job.results
        if len(unwanted):
            out.append(["unwanted", core.graph.ids_of(unwanted).astype("<i8").tobytes()])
        if job.status != "running":
            out.append(["end", job.id, job.status, job.error])
    return out
