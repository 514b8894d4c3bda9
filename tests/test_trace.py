"""Traces without a cluster: the writer, the reader (truncated, foreign, partial files),
the summary and critical path, the timeline picture, the Chrome export (checked against
a JSON schema) and the ``loomctl trace`` commands' errors."""

import json
import os

import msgpack
import pytest
from typer.testing import CliRunner

from loomctl.cli import app
from loomctl.trace import format as F
from loomctl.trace.chrome import chrome_events
from loomctl.trace.hooks import WorkerTracer
from loomctl.trace.reader import TraceError, read_file, read_trace
from loomctl.trace.report import critical_path, label_group, render, summary
from loomctl.trace import timeline
from loomctl.worker.outcome import Outcome
from loomctl.worker.taskqueue import TaskSpec

T0 = 1_700_000_000.0


def task(tid, slot, t0, t1, inputs=(), label=None, sym="loom/py/call", cpus=1, status="ok", job=1, size=10):
    return {"id": tid, "job": job, "slot": slot, "cpus": cpus, "sym": sym, "label": label,
            "t0": T0 + t0, "t1": T0 + t1, "status": status, "size": size, "in": list(inputs)}


def batch(*tasks):
    """A columnar "tasks" record of these tasks."""
    record = {"k": F.TASKS, "w": 0, **{c: [t[c] for t in tasks] for c in F.TASK_COLUMNS}}
    if any("slots" in t for t in tasks):
        record["slots"] = [t.get("slots") for t in tasks]
    return record


def write_trace(directory, close=True):
    """A small run: a -> (b on w0, c on w1) -> d on w0; c's result fetched by w0."""
    server = F.TraceWriter(os.path.join(directory, F.SERVER_FILE), F.header("server"))
    server.add({"k": F.WORKER, "t": T0, "worker": 0, "name": "w0", "address": "tcp://h:1", "cpus": 2, "host": "h"})
    server.add({"k": F.WORKER, "t": T0, "worker": 1, "name": "w1", "address": "tcp://h:2", "cpus": 1, "host": "h"})
    server.add({"k": F.JOB, "t": T0, "job": 1, "name": "plan", "base": 0, "n": 4})
    server.add({"k": F.ROUND, "t": T0, "dur": 0.001, "placed": 3, "ready": 0})
    server.add({"k": F.ROUND, "t": T0 + 0.5, "dur": 0.002, "placed": 1, "ready": 0})
    server.add({"k": F.JOB_END, "t": T0 + 1.0, "job": 1, "status": "finished", "finished": 4, "failed": 0})
    w0 = F.TraceWriter(os.path.join(directory, F.worker_file("w0")),
                       F.header("worker", name="w0", worker=0, address="tcp://h:1", cpus=2))
    w0.add(batch(task(0, F.INLINE_SLOT, 0.0, 0.001, sym="loom/data/const", cpus=0)))
    w0.add(batch(task(1, 0, 0.01, 0.31, [0], label="fit:1")))
    w0.add({"k": F.XFER, "t0": T0 + 0.40, "t1": T0 + 0.45, "from": "tcp://h:2", "to": "tcp://h:1", "bytes": 5000,
            "n": 1, "ids": (2).to_bytes(8, "little")})
    w0.add(batch(task(3, 1, 0.5, 0.9, [1, 2], label="score", cpus=2) | {"slots": [1, 0]}))
    w0.add({"k": F.SAMPLE, "t": T0 + 0.5, "cpu": 95.0, "rss": 50_000_000, "objects": 3, "bytes": 6000, "running": 1})
    w0.add({"k": F.LOG, "t": T0 + 0.9, "id": 3, "job": 1, "level": "info", "msg": "scored"})
    w1 = F.TraceWriter(os.path.join(directory, F.worker_file("w1")),
                       F.header("worker", name="w1", worker=1, address="tcp://h:2", cpus=1))
    w1.add(batch(task(2, 0, 0.01, 0.41, [0], label="fit:2")))
    w1.add({"k": F.XFER, "t0": T0 + 0.002, "t1": T0 + 0.004, "from": "tcp://h:1", "to": "tcp://h:2", "bytes": 10,
            "n": 1, "ids": (0).to_bytes(8, "little")})
    writers = (server, w0, w1)
    for w in writers:
        w.close() if close else w.flush()
    return writers


@pytest.fixture
def trace_dir(tmp_path):
    write_trace(str(tmp_path))
    return str(tmp_path)


# ---------------------------------------------------------------------------- reader

def test_reader_merges_files(trace_dir):
    trace = read_trace(trace_dir)
    assert sorted(f.name for f in trace.files) == ["server.trace", "worker-w0.trace", "worker-w1.trace"]
    assert trace.notes == []
    assert sorted((t["id"], t["worker"]) for t in trace.tasks) == [(0, "w0"), (1, "w0"), (2, "w1"), (3, "w0")]
    assert {(x["src"], x["dst"]) for x in trace.transfers} == {("w1", "w0"), ("w0", "w1")}
    assert trace.workers["w0"]["cpus"] == 2 and trace.jobs[1]["status"] == "finished"
    assert len(trace.rounds) == 2 and len(trace.samples) == 1 and trace.logs[0]["worker"] == "w0"


def test_truncated_last_record_is_ignored_with_a_note(trace_dir):
    path = os.path.join(trace_dir, "worker-w0.trace")
    data = open(path, "rb").read()
    end = len(msgpack.packb({"k": F.END, "t": 0.5}, use_bin_type=True))   # the time is a float64
    assert msgpack.unpackb(data[-end:])["k"] == F.END
    open(path, "wb").write(data[:-end - 7])    # the end record and 7 bytes of the log record
    records, cut = read_file(path)
    assert cut > 0 and records[-1]["k"] == F.SAMPLE
    trace = read_trace(trace_dir)
    assert any("worker-w0.trace" in n and "cut short" in n for n in trace.notes), trace.notes
    assert len([t for t in trace.tasks if t["worker"] == "w0"]) == 3 and not trace.logs


def test_a_killed_writer_without_end_record_still_reports(tmp_path):
    write_trace(str(tmp_path), close=False)     # flushed, never closed: as if killed
    trace = read_trace(str(tmp_path))
    assert len(trace.tasks) == 4
    assert sum("no end record" in n for n in trace.notes) == 3


def test_worker_tracer_writes_a_readable_file(tmp_path):
    tracer = WorkerTracer("w/9", 4, "tcp://h:9", cpus=2)
    tracer.job_on(7, str(tmp_path))
    tracer.assigned([[10], [11], [12], [13]], (7).to_bytes(8, "little") * 4)
    specs = [TaskSpec(10, "loom/py/call", b"", [], cpus=1, label="a:1"),
             TaskSpec(11, "loom/py/call", b"", [10], cpus=1, label="a:2"),
             TaskSpec(12, "loom/data/const", b"", [], cpus=0),
             TaskSpec(13, "loom/run/run", b"", [], cpus=0)]
    tracer.started(specs[0])
    tracer.started(specs[1])
    tracer.started(specs[3])   # (an inline task, 12, only ends: it runs within the worker's step)
    for spec in specs:
        tracer.ended(spec.id, Outcome(spec.id, size=3, logs=[("info", "hi")] if spec.id == 10 else [],
                                      started=T0, ended=T0 + 0.1), spec)
    tracer.sample(100.0, {"cpu_percent": 12.5, "rss": 1, "n_data": 2, "data_bytes": 3, "running": 0})
    tracer.transfer("tcp://h:8", 99.0, 123, [5, 6])
    tracer.job_off(7)
    assert not tracer
    trace = read_trace(str(tmp_path))
    assert [f.name for f in trace.files] == ["worker-w_9.trace"]
    slots = {t["id"]: t["slot"] for t in trace.tasks}
    assert slots == {10: 0, 11: 1, 12: F.INLINE_SLOT, 13: F.FIRST_LIGHT_SLOT}
    assert {t["job"] for t in trace.tasks} == {7} and all(t["worker"] == "w/9" for t in trace.tasks)
    assert trace.logs[0]["msg"] == "hi" and trace.transfers[0]["bytes"] == 123 and len(trace.samples) == 1
    assert "no end record" not in " ".join(trace.notes)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"hello, this is a text file\n", "not a loomctl trace file"),
    (msgpack.packb({"k": "header", "format": "other"}), "not a loomctl trace file"),
    (msgpack.packb([1, 2, 3]), "not a loomctl trace file"),
    (msgpack.packb({"k": "header", "format": F.FORMAT, "version": 99, "role": "server"}), "version 99"),
    (msgpack.packb({"k": "header", "format": F.FORMAT, "version": 1, "role": "server"})[:-3], "truncated"),
    (msgpack.packb({"k": "header", "format": F.FORMAT, "version": 1, "role": "worker"})
     + msgpack.packb({"k": "tasks", "id": ["x"]}), "record 1 (tasks) has no valid 'id' column"),
    (msgpack.packb({"k": "header", "format": F.FORMAT, "version": 1, "role": "worker"})
     + msgpack.packb(batch(task(1, 0, 0, 1)) | {"t1": []}), "no valid 't1' column"),
    (msgpack.packb({"k": "header", "format": F.FORMAT, "version": 1, "role": "worker"})
     + msgpack.packb(17), "record 1 is not a trace record"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "worker-x.trace").write_bytes(content)
    with pytest.raises(TraceError) as err:
        read_trace(str(tmp_path))
    assert message in str(err.value) and "worker-x.trace" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(TraceError, match="no such trace directory"):
        read_trace(str(tmp_path / "nope"))
    with pytest.raises(TraceError, match="no trace files"):
        read_trace(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TraceError, match="no trace files"):
        read_trace(str(tmp_path))


def test_unknown_kinds_and_fields_are_ignored(tmp_path):
    w = F.TraceWriter(str(tmp_path / "worker-a.trace"), F.header("worker", name="a", cpus=1))
    w.add({"k": "future-kind", "x": 1})
    w.add(batch(task(1, 0, 0, 1) | {"extra": [1, 2]}))
    w.close()
    assert [t["id"] for t in read_trace(str(tmp_path)).tasks] == [1]


def test_reopened_file_starts_a_new_header(tmp_path):
    for k in range(2):
        w = F.TraceWriter(str(tmp_path / "worker-a.trace"), F.header("worker", name="a", cpus=1))
        w.add(batch(task(k, 0, k, k + 0.5)))
        w.close()
    trace = read_trace(str(tmp_path))
    assert [t["id"] for t in trace.tasks] == [0, 1]
    assert trace.notes == ["no server.trace: job records and scheduler rounds are missing"]


# ---------------------------------------------------------------------------- report

def test_summary_tables(trace_dir):
    data = summary(read_trace(trace_dir))
    assert data["tasks"] == {"count": 4, "distinct": 4, "failed": 0}
    groups = {r["group"]: r for r in data["by_label"]}
    assert groups["fit"]["count"] == 2 and groups["fit"]["max_s"] == pytest.approx(0.4)
    assert groups["(no label)"]["count"] == 1
    types = {r["type"]: r for r in data["by_type"]}
    assert types["loom/py/call"]["count"] == 3
    workers = {w["worker"]: w for w in data["workers"]}
    # w0: fit:1 0.3 s x 1 cpu + score 0.4 s x 2 cpus over a 0.9 s span on 2 cpus
    assert workers["w0"]["busy_s"] == pytest.approx(1.1)
    assert workers["w0"]["utilisation"] == pytest.approx(1.1 / 1.8)
    assert workers["w0"]["light_tasks"] == 1 and workers["w0"]["fetches"] == 1
    assert data["transfers"]["count"] == 2 and data["transfers"]["bytes"] == 5010
    assert {(p["from"], p["to"]) for p in data["transfers"]["pairs"]} == {("w1", "w0"), ("w0", "w1")}
    assert data["scheduler"]["rounds"] == 2 and data["scheduler"]["placed"] == 4
    assert data["scheduler"]["total_s"] == pytest.approx(0.003)
    assert data["jobs"][0]["status"] == "finished"
    text = render(data)
    for words in ("Tasks per type", "label group", "Workers", "Transfers", "Scheduler", "Critical path", "scored"):
        assert words in text
    json.dumps(data)


def test_critical_path_follows_dependencies(trace_dir):
    cp = critical_path(read_trace(trace_dir))
    assert cp["method"] == "dependencies"
    assert [p["id"] for p in cp["path"]] == [0, 2, 3]     # via the longer fit (0.4 s on w1)
    assert cp["seconds"] == pytest.approx(0.001 + 0.4 + 0.4)
    limited = critical_path(read_trace(trace_dir), limit=2)
    assert [p["id"] for p in limited["path"]] == [0, 3] and limited["omitted"] == 1


def test_critical_path_uses_the_last_successful_run_and_ignores_foreign_inputs(tmp_path):
    w = F.TraceWriter(str(tmp_path / "worker-a.trace"), F.header("worker", name="a", cpus=1))
    w.add(batch(task(5, 0, 0, 5, status="failed")))      # a failed first attempt
    w.add(batch(task(5, 0, 6, 7, inputs=[999])))          # 999: from an earlier job, not in the trace
    w.add(batch(task(6, 0, 7, 8, inputs=[5])))
    w.close()
    cp = critical_path(read_trace(str(tmp_path)))
    assert [p["id"] for p in cp["path"]] == [5, 6] and cp["seconds"] == pytest.approx(2)


def test_label_group():
    assert label_group("fit:3:x") == "fit" and label_group(None) == "(no label)" and label_group(":x") == "(no label)"


# ---------------------------------------------------------------------------- timeline

def test_timeline_svg_and_html(trace_dir):
    trace = read_trace(trace_dir)
    lay = timeline.layout(trace)
    names = [(r.worker, r.name) for r in lay.rows]
    assert names == [("", "scheduler"), ("w0", "cpu 0"), ("w0", "cpu 1"), ("w0", "inline"), ("w0", "fetches"),
                     ("w1", "cpu 0"), ("w1", "fetches")]
    svg = timeline.to_svg(lay)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "task 3" in svg and "fit: 2 tasks" in svg and "Utilisation" in svg
    assert svg.count("<rect") >= 4 + 2 + 2     # bars (score on two slots), fetches, rounds
    html = timeline.to_html(lay, svg, summary(trace))
    assert html.startswith("<!DOCTYPE html>") and "Tasks per label group" in html
    # utilisation: 3 cpus, busy 0.3 + 0.4 + 0.8 cpu-seconds over the 0.9 s span
    assert sum(lay.cpu_util) / len(lay.cpu_util) == pytest.approx(1.5 / (3 * 0.9), rel=0.02)


def test_timeline_escapes_labels_and_merges_tiny_bars(tmp_path):
    w = F.TraceWriter(str(tmp_path / "worker-a.trace"), F.header("worker", name="a", cpus=1))
    w.add(batch(task(0, 0, 0, 1, label="<script>&")))
    w.add(batch(*(task(k, F.INLINE_SLOT, 1 + k * 1e-5, 1 + k * 1e-5 + 5e-6, label="tiny", cpus=0)
                  for k in range(1, 2001))))
    w.close()
    svg = timeline.to_svg(timeline.layout(read_trace(str(tmp_path))))
    assert "<script>" not in svg and "&lt;script&gt;&amp;" in svg
    assert svg.count("<rect") < 200 and "tasks (zoom in" in svg


def test_lost_worker_is_noted_and_marked(tmp_path):
    write_trace(str(tmp_path))
    server = F.TraceWriter(os.path.join(str(tmp_path), F.SERVER_FILE), F.header("server"))
    server.add({"k": F.WORKER_LOST, "t": T0 + 0.6, "worker": 1, "name": "w1", "reason": "disconnected"})
    server.close()
    trace = read_trace(str(tmp_path))
    assert any("lost worker w1 0.600 s" in n and "disconnected" in n for n in trace.notes), trace.notes
    svg = timeline.to_svg(timeline.layout(trace))
    assert "w1 lost (disconnected)" in svg


def test_timeline_of_a_trace_without_tasks(tmp_path):
    F.TraceWriter(str(tmp_path / "server.trace"), F.header("server")).close()
    svg = timeline.to_svg(timeline.layout(read_trace(str(tmp_path))))
    assert "0 task bars" in svg


# ---------------------------------------------------------------------------- Chrome export

NUM = {"type": "number"}
INT = {"type": "integer"}
CHROME_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "traceEvents": {"type": "array", "items": {"oneOf": [
            {"type": "object", "required": ["ph", "name", "pid", "tid", "args"],
             "properties": {"ph": {"const": "M"},
                            "name": {"enum": ["process_name", "thread_name", "process_sort_index",
                                              "thread_sort_index"]},
                            "pid": INT, "tid": INT, "args": {"type": "object"}},
             "additionalProperties": False},
            {"type": "object", "required": ["ph", "name", "cat", "ts", "dur", "pid", "tid", "args"],
             "properties": {"ph": {"const": "X"}, "name": {"type": "string"}, "cat": {"type": "string"},
                            "ts": {"type": "number", "minimum": 0}, "dur": {"type": "number", "minimum": 0},
                            "pid": INT, "tid": INT, "args": {"type": "object"}},
             "additionalProperties": False},
            {"type": "object", "required": ["ph", "name", "ts", "pid", "args"],
             "properties": {"ph": {"const": "C"}, "name": {"type": "string"}, "ts": {"type": "number", "minimum": 0},
                            "pid": INT, "args": {"type": "object", "additionalProperties": NUM}},
             "additionalProperties": False},
            {"type": "object", "required": ["ph", "name", "ts", "pid", "tid", "s"],
             "properties": {"ph": {"const": "i"}, "name": {"type": "string"}, "cat": {"type": "string"},
                            "ts": {"type": "number", "minimum": 0}, "pid": INT, "tid": INT,
                            "s": {"enum": ["g", "p", "t"]}, "args": {"type": "object"}},
             "additionalProperties": False},
        ]}},
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int, "boolean": bool}


def check_schema(value, schema, where="$"):
    """A validator for the JSON Schema keywords used above (jsonschema is not a
    dependency); returns a list of problems."""
    problems = []
    if "type" in schema:
        want = _TYPES[schema["type"]]
        if not isinstance(value, want) or (isinstance(value, bool) and schema["type"] != "boolean"):
            return [f"{where}: expected {schema['type']}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: expected {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        problems.append(f"{where}: {value} < {schema['minimum']}")
    if "oneOf" in schema:
        matches = [s for s in schema["oneOf"] if not check_schema(value, s, where)]
        if len(matches) != 1:
            problems.append(f"{where}: matches {len(matches)} of the oneOf schemas: {value!r:.200}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}: missing {name!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                problems += check_schema(item, props[name], f"{where}.{name}")
            elif extra is False:
                problems.append(f"{where}: unexpected {name!r}")
            elif isinstance(extra, dict):
                problems += check_schema(item, extra, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for k, item in enumerate(value):
            problems += check_schema(item, schema["items"], f"{where}[{k}]")
    return problems


def validate_chrome(document):
    problems = check_schema(document, CHROME_SCHEMA)
    assert not problems, "\n".join(problems[:20])
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(document, CHROME_SCHEMA)


def test_schema_checker_catches_mistakes():
    good = {"traceEvents": [{"ph": "X", "name": "a", "cat": "c", "ts": 0, "dur": 1, "pid": 1, "tid": 0, "args": {}}]}
    assert check_schema(good, CHROME_SCHEMA) == []
    bad = {"traceEvents": [{"ph": "X", "name": "a", "cat": "c", "ts": -1, "dur": 1, "pid": "1", "tid": 0}]}
    assert check_schema(bad, CHROME_SCHEMA)
    assert check_schema({"traceEvents": [{"ph": "C", "name": "m", "ts": 0, "pid": 1, "args": {"x": "y"}}]},
                        CHROME_SCHEMA)


def test_chrome_export_matches_the_schema(trace_dir):
    document = chrome_events(read_trace(trace_dir))
    validate_chrome(document)
    events = document["traceEvents"]
    tasks = [e for e in events if e["ph"] == "X" and e["cat"] not in ("transfer", "scheduler")]
    assert sorted(e["args"]["id"] for e in tasks) == [0, 1, 2, 3, 3]    # task 3 holds two cpu slots
    score = [e for e in tasks if e["args"]["id"] == 3]
    assert {e["tid"] for e in score} == {0, 1} and score[0]["dur"] == pytest.approx(400_000, rel=1e-6)
    assert min(e["ts"] for e in events if "ts" in e) == 0
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "server"), (1, "worker w0 (2 cpus)"), (2, "worker w1 (1 cpus)")}
    threads = {(e["pid"], e["tid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    assert (1, 1000, "inline") in threads and (1, 2000, "fetches") in threads
    transfers = [e for e in events if e.get("cat") == "transfer"]
    assert {e["args"]["bytes"] for e in transfers} == {5000, 10}
    assert {e["name"] for e in events if e["ph"] == "C"} == {"cpu %", "memory", "data"}
    assert [e["args"]["message"] for e in events if e["ph"] == "i"] == ["scored"]


# ---------------------------------------------------------------------------- the commands

runner = CliRunner()


def test_trace_commands(trace_dir, tmp_path):
    out = runner.invoke(app, ["trace", "summary", trace_dir])
    assert out.exit_code == 0, out.output
    assert "Critical path" in out.output
    data = json.loads(runner.invoke(app, ["trace", "summary", "--json", trace_dir]).output)
    assert data["tasks"]["count"] == 4
    for name in ("t.svg", "t.html"):
        out = runner.invoke(app, ["trace", "timeline", trace_dir, "-o", str(tmp_path / name)])
        assert out.exit_code == 0, out.output
        assert (tmp_path / name).stat().st_size > 1000
    out = runner.invoke(app, ["trace", "export", trace_dir, "--chrome", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    validate_chrome(json.loads((tmp_path / "c.json").read_text()))


def test_trace_command_errors(tmp_path, trace_dir):
    from clihelp import loomctl, one_line_error
    assert "no such trace directory" in one_line_error(loomctl("trace", "summary", tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no trace files" in one_line_error(loomctl("trace", "timeline", tmp_path / "empty", "-o", "x.svg"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "server.trace").write_bytes(b"\x00\x01garbage")
    assert "not a loomctl trace file" in one_line_error(loomctl("trace", "export", tmp_path / "foreign",
                                                                "--chrome", "-"))
    assert "unknown picture type" in one_line_error(loomctl("trace", "timeline", trace_dir, "-o", "x.gif"), code=2)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "needs matplotlib" in one_line_error(
            loomctl("trace", "timeline", trace_dir, "-o", tmp_path / "x.png"), code=2)
