"""Task priorities: the user's (``task.priority``, higher first) and the b-level.

The order among ready tasks is (user priority, b-level), higher first, then arrival.
- ``blevel[t]`` is the number of tasks on the longest path from t to a sink, t included
  (durations are unknown to the server: every task counts 1), capped at MAX_LEVEL.
- ``priority[t]`` is the user's priority of t, raised to that of the tasks that need
  it: a producer is never behind its consumers (a high-priority task does not wait on a
  low-priority input).
Both are computed over the columns when a segment is added (``segment_added``: one
sweep per level, from the sinks), and raised when the graph grows at run time
(``raise_from``: the inputs of a task that got new consumers, and theirs, recursively,
live tasks only).

Invariants (``check``): for every live task t with a live consumer c, ``blevel[t] >=
min(blevel[c] + 1, MAX_LEVEL)`` and ``priority[t] >= priority[c]``; ``blevel >= 1``.
"""

from __future__ import annotations

import numpy as np

from loomctl.core.tasktable import FLAG_OVERRIDE, LIVE, add_at, distinct, ranges

MAX_LEVEL = 1 << 20     # b-levels beyond this count as equal (bounds the sweeps at submit)
SWEEPS = 4096           # level sweeps at submit; tasks further from a sink get MAX_LEVEL
PRIORITY_LIMIT = (1 << 31) - 1


def segment_added(core, segment, user: np.ndarray | None) -> None:
    """Levels and priorities of a new segment's tasks, from its own consumer edges; then
    the tasks it consumes (earlier segments) are raised for it."""
    c = core.graph.cols
    n = segment.n
    base = segment.base
    if not len(segment.inputs) and not core.graph.overrides:   # sources only: every task is a sink
        c.blevel[base:base + n] = 1
        c.priority[base:base + n] = 0 if user is None else np.clip(np.asarray(user, np.int64),
                                                                   -PRIORITY_LIMIT, PRIORITY_LIMIT)
        return   # (and nothing to raise: no task has an input)
    # (a large submission's memory peak is here: the levels are written in place, the
    # priorities are swept only when the user gave some, temporaries are per level)
    prio = None if user is None else np.clip(np.asarray(user, np.int64), -PRIORITY_LIMIT,
                                             PRIORITY_LIMIT).astype(np.int32)
    level = c.blevel[base:base + n]   # (a view: written in place)
    level[:] = MAX_LEVEL
    # the segment's own edges, grouped by consumer: its input CSR (rows), less the slots
    # that point elsewhere and those of tasks whose inputs were replaced
    offsets = segment.input_offsets
    inputs = segment.inputs
    inside = (inputs >= base) & (inputs < base + n)
    replaced = (c.flags[base:base + n] & FLAG_OVERRIDE) > 0
    if replaced.any():
        inside &= ~np.repeat(replaced, np.diff(offsets))
    del replaced
    finished_sweeps = True
    if inside.any():
        every = inside.all()
        if not segment.pruned and every:   # every edge is in the consumer CSR
            left = np.diff(segment.consumer_offsets)   # consumers not levelled yet
        else:
            left = np.bincount(inputs[inside] - base, minlength=n).astype(np.int32)
        # (a tree: no task with two consumers in the segment; a level's producers are
        # then distinct and each levelled once its one consumer is)
        single = every and prio is None and int(left.max()) <= 1
        frontier = np.flatnonzero(left == 0)
        depth = 1
        while len(frontier):
            if depth > SWEEPS:
                finished_sweeps = False
                break
            level[frontier] = depth
            starts, ends = offsets[frontier], offsets[frontier + 1]
            slots = ranges(starts, ends)
            if single:
                frontier = inputs[slots] - inputs.dtype.type(base)
                depth += 1
                continue
            keep = inside[slots]
            producers = inputs[slots[keep]] - inputs.dtype.type(base)
            if prio is not None:
                np.maximum.at(prio, producers, np.repeat(prio[frontier], ends - starts)[keep])
            add_at(left, producers, -1)
            del slots, keep, starts, ends
            producers = distinct(producers)
            frontier = producers[left[producers] == 0]
            depth += 1
        del left, inside
    else:
        level[:] = 1
    if prio is not None:
        c.priority[base:base + n] = prio
    # (else they stay 0, as rows are handed out)
    del level, prio
    if finished_sweeps:   # only the edges from other segments may need raising
        outside = np.flatnonzero((inputs < base) | (inputs >= base + n))
        raise_from(core, base + np.searchsorted(offsets, outside, side="right") - 1 if len(outside)
                   else np.zeros(0, np.int64))
    else:
        raise_from(core, np.arange(base, base + n, dtype=np.int64))


def raise_from(core, consumers: np.ndarray) -> None:
    """The inputs of ``consumers`` (and theirs, recursively) are raised to stay ahead of
    them; only live tasks are looked at."""
    g = core.graph
    c = g.cols
    frontier = np.asarray(consumers, np.int64)
    for _ in range(SWEEPS):
        frontier = frontier[LIVE[c.state[frontier]]]
        if not len(frontier):
            return
        inputs, owner = g.slots(distinct(frontier))
        if not len(inputs):
            return
        live = LIVE[c.state[inputs]]
        inputs, owner = inputs[live], owner[live]
        want_level = np.minimum(c.blevel[owner].astype(np.int64) + 1, MAX_LEVEL)
        want_prio = c.priority[owner].astype(np.int64)
        low = (c.blevel[inputs] < want_level) | (c.priority[inputs] < want_prio)
        if not low.any():
            return
        inputs, want_level, want_prio = inputs[low], want_level[low], want_prio[low]
        np.maximum.at(c.blevel, inputs, want_level.astype(c.blevel.dtype))
        np.maximum.at(c.priority, inputs, want_prio.astype(c.priority.dtype))
        frontier = distinct(inputs)


def keys(core, ids: np.ndarray) -> np.ndarray:
    """The order of ready tasks as one int64 per task (higher first; < 2^62)."""
    c = core.graph.cols
    key = (c.priority[ids].astype(np.int64) + (1 << 31)) << 30
    if core.options.blevel:
        key |= c.blevel[ids].astype(np.int64)
    return key


def check(core) -> None:
    g = core.graph
    c = g.cols
    held = g.held_ids()
    live = held[LIVE[c.state[held]]]
    if not len(live):
        return
    assert (c.blevel[live] >= 1).all(), "b-levels start at 1"
    inputs, owner = g.slots(np.sort(live))
    ok = LIVE[c.state[inputs]]
    inputs, owner = inputs[ok], owner[ok]
    assert (c.blevel[inputs] >= np.minimum(c.blevel[owner] + 1, MAX_LEVEL)).all(), "an input is behind its consumer"
    assert (c.priority[inputs] >= c.priority[owner]).all(), "an input has a lower priority than its consumer"
