"""Traces of jobs: the record format, the writers used by the server and workers, the
reader, and the reports built from a trace directory (summary tables, a timeline
picture, Chrome Trace Event export).

Layout:
  format.py    record kinds, the format version, ``TraceWriter`` (buffered appends)
  hooks.py     ``ServerTracer`` / ``WorkerTracer``: what the processes record and when
  reader.py    ``read_trace(directory)`` -> ``Trace`` (tolerates a truncated tail)
  report.py    ``summary(trace)``: tables per task type, label group, worker, transfers,
               scheduler, and the critical path
  timeline.py  Gantt chart as SVG / HTML (our own code) or PNG (matplotlib, optional)
  chrome.py    Chrome Trace Event JSON (Perfetto, chrome://tracing)

The record format is documented in loom-trace(5); the commands in loomctl-trace(1).
"""

from loomctl.trace.format import FORMAT, VERSION  # noqa: F401
