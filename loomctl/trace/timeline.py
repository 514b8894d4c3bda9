"""The timeline picture of a trace: a Gantt chart with one row per worker cpu slot (plus
rows for inline and light tasks, fetches, and the server's scheduler rounds), bars
coloured by label group, and the utilisation over time beneath.

``layout(trace)`` computes rows, bars, colours and the utilisation series once;
``to_svg`` / ``to_html`` draw them with our own code (no dependencies); ``to_png`` uses
matplotlib when it is importable (``MissingDependency`` otherwise).

Invariants:
- Times on the picture are seconds since the first task start (or first record).
- Bars narrower than a pixel that touch a neighbour of the same colour are merged (the
  tooltip says how many tasks), so the file size follows the picture, not the task count.
- Everything a task record carries in text (labels, types) is escaped before it enters
  SVG/HTML.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from html import escape

import numpy as np

from loomctl.trace import format as F
from loomctl.trace.reader import Trace
from loomctl.trace.report import fmt_bytes, fmt_time, label_group, task_span

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#17becf", "#bcbd22", "#8c6d31"]
OTHER_COLOUR = "#a0a0a0"
FETCH_COLOUR = "#6b6b6b"
ROUND_COLOUR = "#333333"
OTHER = "other"


class MissingDependency(Exception):
    pass


@dataclass
class Row:
    worker: str          # "" for the server row
    name: str            # "cpu 0", "inline", "light 1", "fetches", "scheduler"
    kind: str            # cpu | inline | light | fetch | round


@dataclass
class Bar:
    row: int
    t0: float            # seconds since the origin
    t1: float
    colour: str
    tip: str
    failed: bool = False
    count: int = 1


@dataclass
class Layout:
    origin: float
    span: float
    rows: list = field(default_factory=list)
    bars: list = field(default_factory=list)
    groups: list = field(default_factory=list)      # (name, colour, count, total seconds)
    edges: np.ndarray | None = None                 # utilisation bins (seconds)
    cpu_util: np.ndarray | None = None              # fraction of all cpu slots busy per bin
    light_load: np.ndarray | None = None            # light tasks running per worker per bin
    total_cpus: int = 0
    title: str = ""
    notes: list = field(default_factory=list)
    lost: list = field(default_factory=list)        # (worker name, seconds, reason): workers the server lost


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def colour_group(task: dict) -> str:
    """Label group; tasks without a label are grouped by their type."""
    if task.get("label"):
        return label_group(task["label"])
    return f"[{task['sym']}]"


def layout(trace: Trace, bins: int = 400) -> Layout:
    start, end = task_span(trace)
    if trace.rounds or trace.transfers:
        s2, e2 = trace.span
        start, end = min(start, s2) if trace.tasks else s2, max(end, e2)
    origin, span = start, max(end - start, 1e-6)
    lay = Layout(origin, span, title=f"loomctl trace: {trace.directory}", notes=list(trace.notes))

    # colours: the label groups with the most task time first; the rest share grey
    totals: dict[str, list] = {}
    for t in trace.tasks:
        g = totals.setdefault(colour_group(t), [0, 0.0])
        g[0] += 1
        g[1] += max(0.0, t["t1"] - t["t0"])
    ordered = sorted(totals.items(), key=lambda kv: (-kv[1][1], kv[0]))
    colour = {}
    for k, (name, (count, total)) in enumerate(ordered):
        colour[name] = PALETTE[k] if k < len(PALETTE) else OTHER_COLOUR
    lay.groups = [(name, colour[name], count, total) for name, (count, total) in ordered[:len(PALETTE)]]
    rest = ordered[len(PALETTE):]
    if rest:
        lay.groups.append((f"{OTHER} ({len(rest)} groups)", OTHER_COLOUR, sum(c for _, (c, _) in rest),
                           sum(s for _, (_, s) in rest)))

    # rows
    index: dict[tuple, int] = {}

    def row(worker: str, key, name: str, kind: str) -> int:
        if (worker, key) not in index:
            index[(worker, key)] = len(lay.rows)
            lay.rows.append(Row(worker, name, kind))
        return index[(worker, key)]

    if trace.rounds:
        row("", "round", "scheduler", "round")
    by_worker: dict[str, list] = {}
    for t in trace.tasks:
        by_worker.setdefault(t["worker"] or "?", []).append(t)
    fetches: dict[str, list] = {}
    for x in trace.transfers:
        fetches.setdefault(x["dst"] or "?", []).append(x)
    workers = sorted(set(by_worker) | set(fetches) | set(trace.workers), key=_natural)
    for w in workers:
        cpus = int(trace.workers.get(w, {}).get("cpus") or 0)
        tasks = by_worker.get(w, [])
        slots = {s for t in tasks for s in t.get("slots") or [t["slot"]]}
        for s in sorted({*range(cpus), *(s for s in slots if s >= 0)}):
            row(w, s, f"cpu {s}", "cpu")
        if F.INLINE_SLOT in slots:
            row(w, F.INLINE_SLOT, "inline", "inline")
        for s in sorted((s for s in slots if s <= F.FIRST_LIGHT_SLOT), reverse=True):
            row(w, s, f"light {F.FIRST_LIGHT_SLOT - s + 1}", "light")
        if w in fetches:
            row(w, "fetch", "fetches", "fetch")
        lay.total_cpus += cpus

    # bars
    for t in trace.tasks:
        g = colour_group(t)
        d = max(0.0, t["t1"] - t["t0"])
        tip = (f"task {t['id']}  {t['label'] or ''}  [{t['sym']}]\n{t['worker']} {'cpus ' if t['cpus'] > 1 else ''}"
               f"{fmt_time(d)}, started at {t['t0'] - origin:.6f} s, result {fmt_bytes(t.get('size'))}"
               f"{'  FAILED' if t['status'] == 'failed' else ''}")
        for s in t.get("slots") or [t["slot"]]:
            lay.bars.append(Bar(index[(t["worker"] or "?", s)], t["t0"] - origin, t["t1"] - origin,
                                colour.get(g, OTHER_COLOUR), tip, t["status"] == "failed"))
    for w, xs in fetches.items():
        r = index[(w, "fetch")]
        for x in xs:
            tip = f"fetch {x.get('n', '?')} object(s), {fmt_bytes(x['bytes'])} from {x['src']} to {w} in {fmt_time(x['t1'] - x['t0'])}"
            lay.bars.append(Bar(r, x["t0"] - origin, x["t1"] - origin, FETCH_COLOUR, tip))
    if trace.rounds:
        r = index[("", "round")]
        for x in trace.rounds:
            tip = f"scheduler round: {x['placed']} task(s) placed in {fmt_time(x['dur'])}"
            lay.bars.append(Bar(r, x["t"] - origin, x["t"] + x["dur"] - origin, ROUND_COLOUR, tip))

    lay.lost = [(str(x.get("name", x["worker"])), x["t"] - origin, str(x.get("reason", "")))
                for x in trace.lost if 0 <= x["t"] - origin <= span]

    # utilisation
    edges = np.linspace(0.0, span, bins + 1)
    cpu = [(t["t0"] - origin, t["t1"] - origin, max(1, t["cpus"])) for t in trace.tasks if t["slot"] >= 0]
    light = [(t["t0"] - origin, t["t1"] - origin, 1) for t in trace.tasks if t["slot"] < 0]
    lay.edges = edges
    lay.cpu_util = _occupancy(cpu, edges) / lay.total_cpus if lay.total_cpus else np.zeros(bins)
    lay.light_load = _occupancy(light, edges) / max(1, len(workers)) if light else None
    return lay


def _occupancy(intervals: list, edges: np.ndarray) -> np.ndarray:
    """Average sum of weights of the intervals covering each bin."""
    if not intervals:
        return np.zeros(len(edges) - 1)
    a = np.array(intervals, dtype=float)
    times = np.concatenate([a[:, 0], a[:, 1]])
    deltas = np.concatenate([a[:, 2], -a[:, 2]])
    order = np.argsort(times, kind="stable")
    times, deltas = times[order], deltas[order]
    level = np.cumsum(deltas)                   # level after each event
    area = np.concatenate([[0.0], np.cumsum(level[:-1] * np.diff(times))])
    cumulative = np.interp(edges, times, area, left=0.0, right=area[-1])
    widths = np.diff(edges)
    return np.diff(cumulative) / np.where(widths > 0, widths, 1)


def time_ticks(span: float, target: int = 10) -> tuple[list, str, float]:
    """Tick positions (seconds), their unit and its scale, at 1/2/5 x 10^k steps."""
    raw = span / target
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    unit, scale = ("s", 1.0) if span >= 2 else ("ms", 1e3) if span >= 2e-3 else ("µs", 1e6)
    ticks = [k * step for k in range(int(span / step + 1e-9) + 1)]
    return ticks, unit, scale


def _tick_label(t: float, scale: float) -> str:
    v = t * scale
    return f"{v:.0f}" if abs(v - round(v)) < 1e-6 else f"{v:.3g}"


# ---------------------------------------------------------------------------- SVG

ROW_H, ROW_GAP, GROUP_GAP = 14, 3, 10
LEFT, RIGHT, TOP = 170, 24, 70
UTIL_H = 130


def to_svg(lay: Layout, width: int = 1400) -> str:
    plot_w = width - LEFT - RIGHT
    xs = plot_w / lay.span

    def x(t):
        return LEFT + t * xs

    # row positions: a gap between workers
    ys, y, last = [], TOP, None
    for r in lay.rows:
        if last is not None and r.worker != last:
            y += GROUP_GAP
        ys.append(y)
        y += ROW_H + ROW_GAP
        last = r.worker
    gantt_bottom = y
    util_top = gantt_bottom + 50
    legend_top = util_top + UTIL_H + 50
    per_line = max(1, plot_w // 330)
    legend_lines = math.ceil((len(lay.groups) + 2) / per_line)
    height = legend_top + legend_lines * 22 + 16 + 16 * len(lay.notes) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{escape(lay.title)}</text>']
    n_tasks = sum(b.count for b in lay.bars if lay.rows[b.row].kind in ("cpu", "inline", "light"))
    out.append(f'<text x="{LEFT}" y="44" fill="#555">{n_tasks} task bars over {fmt_time(lay.span)}; '
               f'{lay.total_cpus} cpu slots; hover a bar for details</text>')
    ticks, unit, scale = time_ticks(lay.span)

    # worker bands and row labels
    bands: dict[str, list] = {}
    for r, y0 in zip(lay.rows, ys):
        bands.setdefault(r.worker, []).append(y0)
    for k, (worker, y0s) in enumerate(bands.items()):
        top, bottom = min(y0s) - 2, max(y0s) + ROW_H + 2
        fill = "#f3f3f3" if k % 2 == 0 else "#fafafa"
        out.append(f'<rect x="4" y="{top}" width="{width - 8}" height="{bottom - top}" fill="{fill}"/>')
        out.append(f'<text x="10" y="{top + 14}" font-weight="bold">{escape(worker or "server")}</text>')
    for r, y0 in zip(lay.rows, ys):
        out.append(f'<text x="{LEFT - 8}" y="{y0 + ROW_H - 3}" text-anchor="end" fill="#444" '
                   f'font-size="11">{escape(r.name)}</text>')
    # grid and axis
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{TOP - 6}" x2="{x(t):.1f}" y2="{gantt_bottom}" stroke="#d8d8d8"/>')
        out.append(f'<text x="{x(t):.1f}" y="{TOP - 10}" text-anchor="middle" fill="#444">'
                   f'{_tick_label(t, scale)}</text>')
    out.append(f'<text x="{LEFT - 8}" y="{TOP - 10}" text-anchor="end" fill="#444">time ({unit})</text>')
    # bars
    for b in _merge_bars(lay.bars, xs):
        y0 = ys[b.row]
        w = max((b.t1 - b.t0) * xs, 0.8)
        tip = b.tip if b.count == 1 else f"{b.count} tasks (zoom in with a Chrome trace export for each)"
        # a thin white edge tells apart back-to-back bars of one colour; failed: red
        stroke = ' stroke="#b00000" stroke-width="1.5"' if b.failed else \
            ' stroke="#ffffff" stroke-width="0.7"' if w >= 4 else ""
        out.append(f'<rect x="{x(b.t0):.2f}" y="{y0}" width="{w:.2f}" height="{ROW_H}" fill="{b.colour}"{stroke}>'
                   f'<title>{escape(tip)}</title></rect>')
    # workers the server lost: a red line across their rows
    for worker, t, reason in lay.lost:
        y0s = bands.get(worker)
        if not y0s:
            continue
        top, bottom = min(y0s) - 2, max(y0s) + ROW_H + 2
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" stroke="#d00000" '
                   f'stroke-width="2"><title>{escape(f"{worker} lost: {reason}")}</title></line>')
        out.append(f'<text x="{x(t) + 4:.1f}" y="{top + 11}" fill="#d00000" font-size="11" font-weight="bold">'
                   f'{escape(worker)} lost ({escape(reason)})</text>')
    # utilisation
    out.extend(_svg_util(lay, x, util_top, plot_w, ticks, scale, unit))
    # legend
    items = [(name, col, _group_text(name, count, total)) for name, col, count, total in lay.groups]
    if any(r.kind == "fetch" for r in lay.rows):
        items.append(("fetches", FETCH_COLOUR, "data fetched from other workers"))
    if any(r.kind == "round" for r in lay.rows):
        items.append(("scheduler", ROUND_COLOUR, "scheduler rounds"))
    out.append(f'<text x="{LEFT}" y="{legend_top - 12}" font-weight="bold">Colours: label group '
               f'(tasks without a label: [their type])</text>')
    for k, (_, col, text) in enumerate(items):
        lx = LEFT + (k % per_line) * 330
        ly = legend_top + (k // per_line) * 22
        out.append(f'<rect x="{lx}" y="{ly}" width="14" height="14" fill="{col}"/>')
        out.append(f'<text x="{lx + 20}" y="{ly + 11}">{escape(_clip(text, 48))}</text>')
    ny = legend_top + legend_lines * 22 + 12
    for note in lay.notes:
        out.append(f'<text x="{LEFT}" y="{ny}" fill="#a05000" font-size="11">note: {escape(note)}</text>')
        ny += 16
    out.append("</svg>")
    return "\n".join(out)


def _group_text(name: str, count: int, total: float) -> str:
    return f"{name}: {count} task{'s' if count != 1 else ''}, {fmt_time(total)}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _merge_bars(bars: list, xs: float) -> list:
    """Merge sub-pixel bars that touch a neighbour of the same colour on their row."""
    out: list[Bar] = []
    last: dict[int, Bar] = {}
    for b in sorted(bars, key=lambda b: (b.row, b.t0)):
        prev = last.get(b.row)
        tiny = (b.t1 - b.t0) * xs < 1.0
        if prev is not None and tiny and prev.colour == b.colour and not b.failed and not prev.failed \
                and (b.t0 - prev.t1) * xs < 1.0 and (prev.t1 - prev.t0) * xs < 3.0:
            prev.t1 = max(prev.t1, b.t1)
            prev.count += b.count
            continue
        b = Bar(b.row, b.t0, b.t1, b.colour, b.tip, b.failed, b.count)
        out.append(b)
        last[b.row] = b
    return out


def _svg_util(lay: Layout, x, top: int, plot_w: int, ticks, scale, unit) -> list:
    mean = f", mean {100 * float(np.mean(lay.cpu_util)):.1f} %" if lay.total_cpus else ""
    out = [f'<text x="{LEFT}" y="{top - 12}" font-weight="bold">Utilisation: share of the '
           f'{lay.total_cpus} cpu slots busy (blue area{mean})'
           + ('; light and inline tasks running per worker (red line)' if lay.light_load is not None else '')
           + '</text>']
    top_val = 1.0
    if lay.light_load is not None and len(lay.light_load):
        top_val = max(1.0, float(np.max(lay.light_load)))

    def y(v):
        return top + UTIL_H - (v / top_val) * UTIL_H

    out.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{UTIL_H}" fill="#fafafa" stroke="#ccc"/>')
    for frac in (0.25, 0.5, 0.75, 1.0):
        v = frac * top_val
        out.append(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{LEFT + plot_w}" y2="{y(v):.1f}" stroke="#e2e2e2"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#444" font-size="11">'
                   f'{100 * v:.0f} %</text>')
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{top + UTIL_H}" stroke="#e2e2e2"/>')
        out.append(f'<text x="{x(t):.1f}" y="{top + UTIL_H + 16}" text-anchor="middle" fill="#444">'
                   f'{_tick_label(t, scale)}</text>')
    out.append(f'<text x="{LEFT + plot_w}" y="{top + UTIL_H + 32}" text-anchor="end" fill="#444">time ({unit})</text>')
    edges = lay.edges
    mids = (edges[:-1] + edges[1:]) / 2
    if lay.total_cpus:
        pts = [f"{x(edges[0]):.1f},{y(0):.1f}"]
        for a, b, v in zip(edges[:-1], edges[1:], lay.cpu_util):
            pts.append(f"{x(a):.1f},{y(v):.1f} {x(b):.1f},{y(v):.1f}")
        pts.append(f"{x(edges[-1]):.1f},{y(0):.1f}")
        out.append(f'<polygon points="{" ".join(pts)}" fill="#4e79a7" fill-opacity="0.45" stroke="#4e79a7"/>')
    if lay.light_load is not None:
        pts = " ".join(f"{x(m):.1f},{y(v):.1f}" for m, v in zip(mids, lay.light_load))
        out.append(f'<polyline points="{pts}" fill="none" stroke="#e15759" stroke-width="1.5"/>')
    return out


# ---------------------------------------------------------------------------- HTML

def to_html(lay: Layout, svg: str, summary: dict | None = None) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{escape(lay.title)}</title>",
             "<style>body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:16px;color:#222}"
             "table{border-collapse:collapse;margin:8px 0 20px}td,th{padding:3px 10px;border-bottom:1px solid #ddd;"
             "text-align:right}td:first-child,th:first-child{text-align:left}h2{font-size:16px;margin-top:24px}"
             ".chart{overflow-x:auto}rect:hover{opacity:.75}</style></head><body>",
             f'<div class="chart">{svg}</div>']
    if summary is not None:
        parts.append(_html_table("Tasks per label group", ["label group", "count", "total", "mean", "max"],
                                 [[r["group"], r["count"], fmt_time(r["total_s"]), fmt_time(r["mean_s"]),
                                   fmt_time(r["max_s"])] for r in summary["by_label"]]))
        parts.append(_html_table("Workers", ["worker", "cpus", "tasks", "cpu busy", "utilisation", "fetches",
                                             "bytes in"],
                                 [[w["worker"], w["cpus"], w["tasks"], fmt_time(w["busy_s"]),
                                   "-" if w["utilisation"] is None else f"{100 * w['utilisation']:.1f} %",
                                   w["fetches"], fmt_bytes(w["bytes_in"])] for w in summary["workers"]]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(title: str, headers: list, rows: list) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


# ---------------------------------------------------------------------------- PNG

def to_png(lay: Layout, path: str, width: int = 1400) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingDependency("a PNG timeline needs matplotlib (pip install 'loomctl[trace]'); "
                                "write .svg or .html instead") from None
    n = max(1, len(lay.rows))
    legend_h = 0.22 * math.ceil((len(lay.groups) + 2) / 3)
    gantt_h = 0.22 * n + 0.6
    fig = plt.figure(figsize=(width / 100, gantt_h + 1.8 + legend_h + 1.2), dpi=100)
    grid = fig.add_gridspec(3, 1, height_ratios=[gantt_h, 1.8, legend_h], hspace=0.3)
    ax = fig.add_subplot(grid[0])
    ticks, unit, scale = time_ticks(lay.span)
    px = 0.8 * width / lay.span    # pixels per second, roughly
    rows_by_colour: dict[tuple, list] = {}
    for b in _merge_bars(lay.bars, px):
        rows_by_colour.setdefault((b.row, b.colour), []).append((b.t0 * scale, max(b.t1 - b.t0, 1 / px) * scale))
    for (r, col), spans in rows_by_colour.items():
        # white edges part back-to-back bars; thin bars get none (it would hide them)
        edges = [0.5 if w / scale * px >= 4 else 0.0 for _, w in spans]
        ax.broken_barh(spans, (n - 1 - r - 0.4, 0.8), facecolors=col, edgecolors="white", linewidths=edges)
    for worker, t, reason in lay.lost:
        rows = [k for k, r in enumerate(lay.rows) if r.worker == worker]
        if rows:
            ax.plot([t * scale] * 2, [n - 1 - max(rows) - 0.5, n - 1 - min(rows) + 0.5], color="#d00000", linewidth=2)
            ax.text(t * scale, n - 1 - min(rows) + 0.1, f" {worker} lost ({reason})", color="#d00000",
                    fontsize=8, va="bottom")
    ax.set_yticks([n - 1 - k for k in range(n)])
    ax.set_yticklabels([f"{r.worker or 'server'}  {r.name}" for r in lay.rows], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(0, lay.span * scale)
    ax.grid(axis="x", color="#dddddd")
    ax.set_axisbelow(True)
    ax.set_title(lay.title, loc="left", fontsize=11)
    ax.xaxis.set_ticks_position("top")
    ux = fig.add_subplot(grid[1], sharex=ax)
    mids = (lay.edges[:-1] + lay.edges[1:]) / 2 * scale
    mean = 100 * float(np.mean(lay.cpu_util)) if lay.total_cpus else 0.0
    ux.fill_between(mids, lay.cpu_util * 100, step="mid", color="#4e79a7", alpha=0.45,
                    label=f"cpu slots busy ({lay.total_cpus} slots, mean {mean:.1f} %)")
    if lay.light_load is not None:
        ux.plot(mids, lay.light_load * 100, color="#e15759", linewidth=1,
                label="light/inline tasks running per worker")
    ux.set_ylabel("%")
    ux.set_xlabel(f"time ({unit})")
    ux.set_ylim(bottom=0)
    ux.grid(color="#e2e2e2")
    ux.legend(loc="upper right", fontsize=8)
    lx = fig.add_subplot(grid[2])
    lx.axis("off")
    handles = [Patch(color=col, label=_clip(_group_text(name, count, total), 48))
               for name, col, count, total in lay.groups]
    if any(r.kind == "fetch" for r in lay.rows):
        handles.append(Patch(color=FETCH_COLOUR, label="fetches"))
    if any(r.kind == "round" for r in lay.rows):
        handles.append(Patch(color=ROUND_COLOUR, label="scheduler rounds"))
    if handles:
        lx.legend(handles=handles, loc="upper left", ncol=3, fontsize=8, frameon=False,
                  title="colours: label group (tasks without a label: [their type])", title_fontsize=8,
                  alignment="left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
