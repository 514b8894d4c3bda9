"""The core's edge: global ids in, global ids out.

Inside the core a task is its row (``core.tasktable``); workers, clients, journals and
traces know it by its global id (``core.segments``). ``ServerCore`` maps the ids of every
event to rows (``rows``: an id of no live task, a retired one included, becomes -1 and
the modules ignore it) and the commands the modules made to global ids when they leave
(``to_global``).

Invariants:
- Every command taken from the core names global ids only; ``ServerCore.commands[:sealed]``
  are mapped already, the rest name rows, but for COMPUTEs: ``core.compute`` builds
  them with global ids (a tree of 2^10 tasks spent 7% of the server's time mapping its
  rows a second time).
- Commands are mapped before any row they name can be given to another task: the
  retirement of a job seals the commands made until then (``ServerCore.seal``).
- Mapping makes new arrays, lists and rows: arrays a command shares with the core's
  state (steal requests, results) keep naming rows.
"""

from __future__ import annotations

import numpy as np

from loomctl import messages as M

MAX_ID = (1 << 63) - 1


def rows(core, ids) -> np.ndarray:
    """The rows of the global ids in ``ids`` (-1 for ids of no live task or no int64)."""
    if isinstance(ids, np.ndarray) and ids.dtype == np.int64:
        return core.graph.rows_of(ids)
    values = [t if type(t) is int and 0 <= t <= MAX_ID else -1 for t in np.asarray(ids).tolist()] \
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" else ids.astype(np.int64)
    return core.graph.rows_of(np.asarray(values, dtype=np.int64))


def to_global(core, commands: list) -> None:
    """Map, in place, the rows every command in ``commands`` names to global ids."""
    segs = core.graph.segs
    if segs.identity:   # every live row is its own global id (nothing was reused yet)
        return
    ids_of = segs.ids_of
    for k, cmd in enumerate(commands):
        kind = type(cmd)
        if kind in (M.ReleaseData, M.CancelTasks):
            commands[k] = kind(cmd.target, ids_of(cmd.ids))
        elif kind is M.StealTasks:
            commands[k] = M.StealTasks(cmd.target, ids_of(cmd.ids), cmd.count)
        elif kind is M.ResultsReady:
            ids = ids_of(cmd.ids)
            inline = cmd.inline
            if inline:
                where = dict(zip(np.asarray(cmd.ids).tolist(), ids.tolist()))
                inline = {where[r]: v for r, v in inline.items()}
            commands[k] = M.ResultsReady(cmd.target, cmd.job, ids, cmd.addresses, inline)

