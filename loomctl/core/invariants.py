"""Every invariant the core's modules state, recomputed from scratch (slow: for tests).

``check(core)`` raises AssertionError naming the first invariant that does not hold.
The property-based tests call it after every event of random event sequences.
"""

from __future__ import annotations

import numpy as np

from loomctl.core import priority, speculation, stealing
from loomctl.core.tasktable import (ALIAS, ASSIGNED, FINISHED, FLAG_QUEUED, FLAG_RESULT, LIVE, N_STATES, READY, SKIPPED,
                                    WAITING)


def check(core) -> None:
    g = core.graph
    c = g.cols
    n = c.n
    g.check()
    held = g.held_ids()
    state = c.state[:n]
    # data
    assert core.n_data == int(np.count_nonzero(c.owner[:n] >= 0)), "n_data counts the tasks with data"
    assert not np.any((c.owner[:n] >= 0) & (state != FINISHED)), "only finished tasks have data"
    assert not np.any((state == FINISHED) & (c.owner[:n] >= 0) & (c.holds[:n] <= 0)), "unheld data is released"
    for t, holders in core.replicas.items():
        assert c.owner[t] >= 0 and holders and c.owner[t] not in holders, f"replicas of {t}"
        assert all(w in core.workers for w in holders), f"replicas of {t} on a lost worker"
    assert set(np.unique(c.owner[:n][c.owner[:n] >= 0]).tolist()) <= set(core.workers), "data on a lost worker"
    # holds: live input slots + the client's
    expected = np.zeros(n, dtype=np.int64)
    live = held[LIVE[state[held]]]
    if len(live):
        np.add.at(expected, g.inputs_of(live), 1)
    expected[held] += (c.flags[held] & FLAG_RESULT) > 0
    assert np.array_equal(expected[held], c.holds[held]), \
        f"holds of tasks {held[expected[held] != c.holds[held]][:5].tolist()}"
    # remaining, and READY exactly when nothing is left to wait for
    waiting = held[(state[held] == WAITING) | (state[held] == READY)]
    if len(waiting):
        counts = g.unfinished_inputs(waiting, FINISHED)
        assert np.array_equal(counts, c.remaining[waiting]), \
            f"remaining of tasks {waiting[counts != c.remaining[waiting]][:5].tolist()}"
        stuck = waiting[(state[waiting] == WAITING) & (c.remaining[waiting] == 0)]
        assert not len(stuck), f"tasks {stuck[:5].tolist()} wait for nothing"
        assert not np.any((state[waiting] == READY) & (c.remaining[waiting] != 0)), "READY with inputs missing"
    queued = np.concatenate([*core.ready, core.pool.all()])
    ready = np.flatnonzero(state == READY)
    assert np.isin(ready, queued).all(), "every READY task is in the ready list or the pool"
    listed = np.concatenate(core.ready) if core.ready else np.zeros(0, np.int64)
    assert len(np.unique(listed)) == len(listed), "a task is in the ready list once"
    flagged = np.flatnonzero(c.flags[:n] & FLAG_QUEUED)
    assert set(flagged.tolist()) == set(listed.tolist()), "FLAG_QUEUED marks the ready list"
    priority.check(core)
    stealing.check(core)
    speculation.check(core)
    # workers' load
    assert not np.any((c.worker[:n] >= 0) != (state == ASSIGNED)), "worker set exactly for ASSIGNED tasks"
    for w in core.workers.values():
        mine = np.flatnonzero((state == ASSIGNED) & (c.worker[:n] == w.id))
        assert w.assigned_cpus == int(c.cpus[mine].sum()), f"assigned cpus of worker {w.id}"
        light = [t for t in mine[c.cpus[mine] == 0].tolist() if not g.named_request(t)]
        assert w.assigned_light == len(light), f"assigned light tasks of worker {w.id}"
        used: dict = {}
        for t in mine.tolist():
            for name, amount in g.named_request(t).items():
                used[name] = used.get(name, 0) + amount
        assert {k: v for k, v in w.assigned_resources.items() if v} == used, f"resources of worker {w.id}"
    assert set(c.worker[:n][c.worker[:n] >= 0].tolist()) <= set(core.workers), "tasks on a lost worker"
    # jobs
    for job in core.jobs.values():
        segs = g.segs.segments
        ids = np.concatenate([np.arange(segs[k].base, segs[k].base + segs[k].n) for k in job.segments])
        counts = np.bincount(state[ids], minlength=N_STATES)
        assert job.finished == counts[FINISHED], f"finished count of job {job.id}"
        assert job.active == len(ids) - counts[ALIAS] - counts[SKIPPED], f"active count of job {job.id}"
        assert (c.job[ids] == job.id).all(), f"job column of job {job.id}"
        if job.status == "running":
            assert job.finished < job.active or job.active == 0, f"job {job.id} is done but running"
        elif job.status != "finished":   # aborted: what waits is needed by another job
            pending = ids[(state[ids] == WAITING) | (state[ids] == READY)]
            assert (c.holds[pending] > 0).all(), f"aborted job {job.id} has tasks waiting for nothing"
