"""graphfmt: build task graphs with a HyperLoom-compatible API and store them as
versioned, columnar, streamable binary graph files (see man/loom-graph.5)."""

from graphfmt import tasks
from graphfmt.fileformat import append, read, to_bytes, to_pieces, write
from graphfmt.graph import Graph, GraphError
from graphfmt.plan import build_graph
from graphfmt.tasks import Task, cpus

__all__ = ["tasks", "Task", "cpus", "Graph", "GraphError", "read", "write", "append",
           "to_bytes", "to_pieces", "build_graph"]
