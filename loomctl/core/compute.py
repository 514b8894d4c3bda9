"""COMPUTE commands: the rows that give tasks to a worker.

``compute(core, worker, ids)`` builds one COMPUTE for ``ids`` (rows, in that order):
per row its global id, symbol, config, inputs (global ids), cpus, named resources,
checkpoint path, label, whether a client waits for it (its small result comes inline)
and whether it is given *ahead* (some input not computed yet, ``core.speculation``);
``locations`` names, for each input held by another worker, where to fetch it (the
owner or a copy, spread).

Invariants:
- Both ways of building it give the same message: column-wise for many rows
  (``_compute_columns``), row by row for a few (``_compute_few``: numpy's per-call cost
  rules there); ``tests/test_core_properties.py`` compares them on every random state,
  ``tests/test_core.py`` on one with copies, ahead inputs, large configs and checkpoints.
- A config longer than ``messages.LARGE_CONFIG`` is a view, not a copy, and its row is
  listed in ``large`` (a frame of its own on the wire).
- The column-wise way keeps the rows as ``messages.ComputeColumns`` unless a config is
  large or a task was replaced (``core.dynamic``); iterated, they are the same rows
  (``tests/test_core.py``: also off the wire, and as the worker's tasks).
"""

from __future__ import annotations

import numpy as np

from loomctl import messages as M
from loomctl.core.tasktable import FLAG_CHECKPOINT, FLAG_LOADED, FLAG_OVERRIDE, FLAG_RESULT, distinct

FEW = 16   # (rows of a COMPUTE below which Python beats a numpy call)


def compute(core, worker, ids: np.ndarray) -> M.Compute:
    """The COMPUTE command giving ``ids`` to ``worker`` (rows in the order of ``ids``)."""
    return _compute_few(core, worker, ids) if len(ids) <= FEW else _compute_columns(core, worker, ids)


def _compute_few(core, worker, ids: np.ndarray) -> M.Compute:
    """Row by row: per row a few scalar reads of the columns and its segment's CSR."""
    g = core.graph
    c = g.cols
    segs = g.segs
    owner, flags_of = c.owner, c.flags
    wid = worker.id
    rows, large, locations, watched = [], [], {}, {}
    address = None
    for p, t in enumerate(ids.tolist()):
        seg, local = segs.locate(t)
        info = seg.graph
        flags = int(flags_of[t])
        if flags & FLAG_OVERRIDE:
            symbol, config, inputs = g.overrides[t]
        else:
            symbol = g.symbols[c.symbol[t]]
            a, b = int(info.configs.offsets[local]), int(info.configs.offsets[local + 1])
            config = memoryview(info.configs.data)[a:b] if b - a > M.LARGE_CONFIG else bytes(info.configs.data[a:b])
            inputs = seg.inputs[seg.input_offsets[local]:seg.input_offsets[local + 1]]
        if type(config) is memoryview:
            large.append(p)
        input_rows = inputs.tolist()
        ahead = False
        for i in input_rows:
            h = int(owner[i])
            if h < 0:
                ahead = True
            elif h != wid and i not in locations:
                source = _source(core, wid, i, h)
                if source is not None:
                    if address is None:
                        address = {w.id: w.data_address for w in core.workers.values()}
                    locations[i] = address[source]
        inline = False
        if flags & FLAG_RESULT:
            job_id = int(c.segment_job[c.segment[t]])
            if job_id not in watched:
                job = core.jobs.get(job_id)
                watched[job_id] = job is not None and bool(job.watchers)
            inline = watched[job_id]
        checkpoint = info.checkpoint(local) if flags & FLAG_CHECKPOINT and not flags & FLAG_LOADED else None
        rows.append(M.ComputeRow(segs.id_of(t), symbol, config, [segs.id_of(i) for i in input_rows] if input_rows else [],
                                 int(c.cpus[t]), g.named_request(t) or None if g.any_named_requests else None,
                                 checkpoint, info.label(local), inline, ahead))
    if locations:
        locations = {segs.id_of(i): a for i, a in locations.items()}
    return M.Compute(worker.key, rows, locations, c.job[ids].astype(np.int64), large)


def _source(core, wid: int, i: int, owner: int) -> int | None:
    """The worker that worker ``wid`` fetches input ``i`` from (held by ``owner``, another
    worker): the owner or one of its copies, spread over them; None when ``wid`` holds a
    copy itself."""
    copies = core.replicas.get(i, ()) if core.replicas else ()
    if wid in copies:
        return None
    if copies and core.options.spill:
        holders = [owner, *sorted(copies)]
        return holders[(wid + i) % len(holders)]
    return owner


def _compute_columns(core, worker, ids: np.ndarray) -> M.Compute:
    """Built column-wise: a row costs a few list operations, not a walk of the graph. It
    names global ids already (its tasks' and inputs'; ``core.edge`` leaves it as it is).
    Without large configs or replaced tasks the rows stay columns (``ComputeColumns``)."""
    g = core.graph
    c = g.cols
    n = len(ids)
    flags = c.flags[ids]
    configs: list = [None] * n
    labels: list = [None] * n
    any_labels = False
    span = None   # (one segment's configs, small and close together: (bytes, starts, ends))
    seg_of = g.segs.of(ids)
    segments = g.segs.segments
    single = not n or (seg_of == seg_of[0]).all()   # (the usual case: one segment)
    # (a large config is a view: a frame of its own; so may be one that replaced a task's)
    replaced = bool(g.overrides) and bool(np.count_nonzero(flags & FLAG_OVERRIDE))
    any_large = replaced
    for s in ([int(seg_of[0])] if n and single else distinct(seg_of).tolist()):
        pos = range(n) if single else np.flatnonzero(seg_of == s).tolist()
        seg = segments[s]
        graph = seg.graph
        local = (ids if single else ids[pos]) - seg.base
        offsets, data = graph.configs.offsets, graph.configs.data
        begin, end = offsets[local], offsets[local + 1]
        many = False
        if len(local) > FEW:
            lengths = end - begin
            lo, hi = int(begin.min()), int(end.max())
            many = hi - lo <= 2 * int(lengths.sum()) + 4096 and int(lengths.max()) <= M.LARGE_CONFIG
        if many and single and not any_large:   # (one copy of their span, sent as it is)
            span = (bytes(data[lo:hi]), (begin - lo).astype(np.int64), (end - lo).astype(np.int64))
        elif many:   # (one copy of their span, sliced)
            whole = bytes(data[lo:hi])
            texts = [whole[a:b] for a, b in zip((begin - lo).tolist(), (end - lo).tolist())]
            if single:
                configs = texts
            else:
                for p, text in zip(pos, texts):
                    configs[p] = text
        else:
            for p, a, b in zip(pos, begin.tolist(), end.tolist()):
                # (a large one: no copy here, none into the body, a frame of its own)
                if b - a > M.LARGE_CONFIG:
                    configs[p], any_large = memoryview(data)[a:b], True
                else:
                    configs[p] = bytes(data[a:b])
        if graph.label_codes is not None:
            names = graph.labels
            for p, code in zip(pos, graph.label_codes[local].tolist()):
                if code:
                    labels[p], any_labels = names[code - 1], True
    # inputs, per slot: those not computed yet make the task "ahead" (core.speculation);
    # those held by other workers get a location (an owner or a copy, spread)
    order = np.argsort(ids, kind="stable")
    inputs, consumer = g.slots(ids[order])
    if len(consumer) > 1 and (consumer[1:] < consumer[:-1]).any():   # (segments whose rows are not in order)
        by_consumer = np.argsort(consumer, kind="stable")
        inputs, consumer = inputs[by_consumer], consumer[by_consumer]
    starts = np.searchsorted(consumer, ids[order], "left")
    ends = np.searchsorted(consumer, ids[order], "right")
    holder = c.owner[inputs]
    ids_of = g.segs.ids_of   # (the rows of the message are global ids, core.edge)
    in_order = n < 2 or bool((ids[1:] > ids[:-1]).all())
    pending = np.concatenate(([0], np.cumsum(holder < 0)))   # (an input not computed yet: given ahead)
    waits = pending[ends] > pending[starts]
    rank = None
    if not in_order:   # (row p is the rank of ids[p] among the ids)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
    locations = {}
    elsewhere = (holder >= 0) & (holder != worker.id)
    if elsewhere.any():
        address = {w.id: w.data_address for w in core.workers.values()}
        for i, h in zip(inputs[elsewhere].tolist(), holder[elsewhere].tolist()):
            if i not in locations:
                source = _source(core, worker.id, i, h)
                if source is not None:
                    locations[i] = address[source]
    if locations:
        locations = dict(zip(ids_of(np.fromiter(locations, dtype=np.int64, count=len(locations))).tolist(),
                             locations.values()))
    checkpoints: dict = {}
    marked = int(np.bitwise_or.reduce(flags)) if n else 0   # (flags on any row: the loops below)
    for p in np.flatnonzero((flags & (FLAG_CHECKPOINT | FLAG_LOADED)) == FLAG_CHECKPOINT).tolist() \
            if marked & FLAG_CHECKPOINT else ():
        seg = segments[int(seg_of[p])]
        path = seg.graph.checkpoint(int(ids[p]) - seg.base)
        if path:
            checkpoints[p] = path
    inline: list = []
    watched: dict = {}
    jobs_of = c.job[ids]
    for p in np.flatnonzero(flags & FLAG_RESULT).tolist() if marked & FLAG_RESULT else ():
        job_id = int(jobs_of[p])
        if job_id not in watched:
            job = core.jobs.get(job_id)
            watched[job_id] = job is not None and bool(job.watchers)
        if watched[job_id]:
            inline.append(p)
    named = {p: r for p, r in enumerate(g.named_request(t) for t in ids.tolist()) if r} \
        if g.any_named_requests else {}
    if not any_large:   # (nothing replaced either)
        if span is None:   # (the configs one after another)
            lengths = np.fromiter(map(len, configs), np.int64, n)
            config_ends = np.cumsum(lengths)
            span = (b"".join(configs), config_ends - lengths, config_ends)
        columns = _columns(g, ids, ids_of(inputs), starts, ends, rank, waits, span, inline, named, checkpoints,
                           {p: name for p, name in enumerate(labels) if name is not None} if any_labels else {})
        return M.Compute(worker.key, columns, locations, jobs_of.astype(np.int64), [])
    symbol_of = g.symbols
    symbols = [symbol_of[k] for k in c.symbol[ids].tolist()]
    if replaced:
        for p in np.flatnonzero(flags & FLAG_OVERRIDE).tolist():
            symbols[p], configs[p], _ = g.overrides[int(ids[p])]
    flat = ids_of(inputs).tolist() if len(inputs) else []
    waits = waits.tolist()
    lists = [flat[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
    if in_order:
        input_lists, ahead = lists, waits
    else:
        rank = rank.tolist()
        input_lists, ahead = [lists[k] for k in rank], [waits[k] for k in rank]
    flag_inline = [False] * n
    for p in inline:
        flag_inline[p] = True
    new, make = tuple.__new__, M.ComputeRow   # (a ComputeRow built as the tuple it is: fast)
    rows = [new(make, row) for row in zip(ids_of(ids).tolist(), symbols, configs, input_lists, c.cpus[ids].tolist(),
                                           [named.get(p) for p in range(n)] if named else [None] * n,
                                           [checkpoints.get(p) for p in range(n)] if checkpoints else [None] * n,
                                           labels, flag_inline, ahead)]
    large = [p for p, config in enumerate(configs) if type(config) is memoryview] if any_large else []
    return M.Compute(worker.key, rows, locations, jobs_of.astype(np.int64), large)


def _columns(g, ids, inputs, starts, ends, rank, waits, span, inline, named, checkpoints, labels) -> M.ComputeColumns:
    """The rows of ``ids`` as columns: ``inputs`` (global ids) and ``waits`` per slot and per
    row in id order (``starts``, ``ends``), ``rank`` the id order of each row (None: the
    same), ``span`` the configs (bytes, where each starts, where it ends)."""
    if rank is None:
        input_ends = ends.astype(np.int64)
    else:   # (each row's slots, gathered in row order)
        lengths = (ends - starts)[rank]
        input_ends = np.cumsum(lengths)
        inputs = inputs[np.repeat(starts[rank] - (input_ends - lengths), lengths) + np.arange(int(input_ends[-1]))] \
            if len(lengths) and input_ends[-1] else inputs[:0]
        waits = waits[rank]
    codes = g.cols.symbol[ids]
    used = distinct(codes)
    flags = waits.astype(np.uint8) * np.uint8(M.ComputeColumns.AHEAD)
    flags[inline] |= np.uint8(M.ComputeColumns.INLINE)
    return M.ComputeColumns(g.segs.ids_of(ids).astype(np.int64), [g.symbols[k] for k in used.tolist()],
                            np.searchsorted(used, codes).astype(np.uint16), span[0], span[1], span[2],
                            inputs.astype(np.int64), input_ends, g.cols.cpus[ids].astype(np.int64), flags,
                            named, checkpoints, labels)
