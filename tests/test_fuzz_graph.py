"""Fuzzing the graph file reader: damaged files end in GraphError, never in a traceback.

Valid graph files (with labels, resource requests, checkpoints, metadata, several task
blocks, several parts, ancillary chunks, a table holding a value twice, appended tasks)
are damaged by hypothesis: bytes overwritten, integer fields set to edge values, ranges
deleted, inserted or duplicated, pieces of other files spliced in, the file cut short.
``graphfmt.read`` must then either return a Graph that passes ``validate()`` and whose
``stats()`` works, or raise GraphError with a one-line message; any other exception is a
bug. Each input is read both from memory and as a stream.

The default of 300 examples keeps the test quick enough for every run. A fuzz run sets
the environment variable LOOMCTL_FUZZ_EXAMPLES, and the reader was fuzzed with 10000:

    LOOMCTL_FUZZ_EXAMPLES=10000 /work/venv/bin/pytest -q tests/test_fuzz_graph.py
"""

import io
import os
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.fileformat import MAGIC, GraphWriter
from graphfmt.graph import Graph, GraphError, VarBytes, offsets_from_lengths

EXAMPLES = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "300"))


def _bytes(results, block_tasks=None) -> bytes:
    graph = graphfmt.build_graph(results)[0] if not isinstance(results, Graph) else results
    out = io.BytesIO()
    writer = GraphWriter(out)
    writer.write_graph(graph, **({"block_tasks": block_tasks} if block_tasks else {}))
    writer.close()
    return out.getvalue()


def _rich_plan():
    a = tasks.const("Hello ")
    b = tasks.const(b"world")
    m = tasks.merge((a, b, a), delimiter=",")
    m.label = "greet:1"
    r = tasks.run("wc -c", [(m, None)])
    r.checkpoint_path = "/tmp/ckpt"
    r.metadata = {"k": [1, 2]}
    g = tasks.get(tasks.split(m), 1)
    g.resource_request = tasks.cpus(3)
    s = tasks.slice(g, 0, 2)
    s.label = "slice"
    s.metadata = "note"
    return [r, s, m, tasks.size(a)]


def _tree(leaves):
    level = [tasks.const(f"leaf{i}") for i in range(leaves)]
    for i, t in enumerate(level):
        t.label = f"leaf:{i % 3}"
        if i % 4 == 0:
            t.resource_request = tasks.cpus(1 + i % 2)
        if i % 5 == 0:
            t.checkpoint_path = f"/ckpt/{i}"
    while len(level) > 1:
        level = [tasks.merge(level[k:k + 2], "+") for k in range(0, len(level), 2)]
    return level


def _one_task(symbol, config, inputs):
    return Graph([symbol], np.zeros(1, np.uint16), offsets_from_lengths(np.array([len(inputs)])),
                 np.array(inputs, dtype=np.int64), VarBytes.from_list([config]),
                 np.ones(1, np.uint8), np.zeros(1, np.uint16))


def _duplicated_table() -> bytes:
    """A part whose symbol table holds loom/data/const twice, plus an ancillary chunk."""
    def chunk(kind, payload):
        return struct.pack("<4sIQ", kind, 0, len(payload)) + payload + b"\0" * (-len(payload) % 8)
    base = _bytes([tasks.merge((tasks.const("a"), tasks.const("b")))])
    symb = chunk(b"SYMB", msgpack.packb([S.CONST]))
    note = chunk(b"note", b"ancillary")
    length = struct.unpack_from("<Q", base, 24)[0]
    after = 16 + 16 + length + (-length % 8)   # after the SYMB chunk [const, merge]
    return base[:after] + symb + note + base[after:]


def _appended(tmp_dir) -> bytes:
    path = os.path.join(tmp_dir, "appended.loom")
    with open(path, "wb") as f:
        f.write(_bytes(_rich_plan()) + _bytes([tasks.const("z")]))
    first = graphfmt.append(path, _one_task(S.SIZE, b"", [len(graphfmt.read(path)) - 1]))
    graphfmt.append(path, _one_task(S.MERGE, b"", [first, first - 1]))
    with open(path, "rb") as f:
        return f.read()


def _seeds() -> list[bytes]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp_dir:
        appended = _appended(tmp_dir)
    rich = _bytes(_rich_plan())
    tree = _bytes(_tree(16), block_tasks=7)
    return [
        rich,
        tree,
        rich + tree + _bytes([tasks.const("last")]),   # three parts
        _duplicated_table(),
        appended,
        _bytes(Graph.empty()),                         # a part without tasks
    ]


SEEDS = _seeds()
INTERESTING = [0, 1, 2, 3, 7, 8, 16, 255, 256, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
               1 << 32, (1 << 40) + 1, (1 << 63), (1 << 64) - 1]

_position = st.integers(min_value=0, max_value=1 << 20)
_int64 = st.integers(-(1 << 63), (1 << 63) - 1)
_symbol = st.sampled_from(sorted(S.BUILTINS) + ["loom/data/nope", "ext/fft", ""])
_table_value = st.one_of(
    st.lists(st.one_of(_symbol, st.text(max_size=8)), max_size=6),
    st.lists(st.dictionaries(st.sampled_from(["cpus", "gpus", ""]),
                             st.one_of(st.integers(-2, (1 << 64) - 1), st.booleans(), st.none()), max_size=3),
             max_size=4),
    st.lists(st.one_of(_int64, st.binary(max_size=4), st.none()), max_size=3),
    _int64, st.text(max_size=4),
)
_mutation = st.one_of(
    st.tuples(st.just("byte"), _position, st.integers(0, 255)),
    st.tuples(st.just("int"), _position, st.sampled_from([1, 2, 4, 8]),
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("cut"), _position),
    st.tuples(st.just("delete"), _position, st.integers(1, 64)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("duplicate"), _position, st.integers(1, 96)),
    st.tuples(st.just("splice"), _position, st.integers(0, len(SEEDS) - 1), _position,
              st.integers(1, 128), st.booleans()),
    st.tuples(st.just("table"), st.integers(0, 15), _table_value),   # a well-formed msgpack payload
)


def _chunk_spans(buf: bytes) -> list[tuple[int, int]]:
    """(header offset, payload length) of the chunks of an intact prefix of ``buf``."""
    spans, at = [], 16
    while at + 16 <= len(buf):
        kind, length = bytes(buf[at:at + 4]), struct.unpack_from("<Q", buf, at + 8)[0]
        if kind == b"END!":
            at += 16 + length + (-length % 8) + 16   # skip the next part's header
            continue
        if at + 16 + length > len(buf):
            break
        spans.append((at, length))
        at += 16 + length + (-length % 8)
    return spans


def mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        at = m[1] % (len(buf) + 1)
        kind = m[0]
        if kind == "byte" and buf:
            buf[min(at, len(buf) - 1)] = m[2]
        elif kind == "int":
            size, value = m[2], m[3] % (1 << (8 * m[2]))
            at -= at % size   # fields are aligned
            if at + size <= len(buf):
                buf[at:at + size] = value.to_bytes(size, "little")
        elif kind == "cut":
            del buf[at:]
        elif kind == "delete":
            del buf[at:at + m[2]]
        elif kind == "insert":
            buf[at:at] = m[2]
        elif kind == "duplicate":
            buf[at:at] = buf[at:at + m[2]]
        elif kind == "splice":
            other = SEEDS[m[2]]
            start = m[3] % (len(other) + 1)
            piece = other[start:start + m[4]]
            if m[5]:
                buf[at:at + len(piece)] = piece   # overwrite
            else:
                buf[at:at] = piece                # insert
        elif kind == "table":   # the payload of the k-th chunk becomes a msgpack value
            spans = _chunk_spans(buf)
            if spans:
                start, length = spans[m[1] % len(spans)]
                payload = msgpack.packb(m[2], use_bin_type=True)
                new = struct.pack("<Q", len(payload)) + payload + b"\0" * (-len(payload) % 8)
                buf[start + 8:start + 16 + length + (-length % 8)] = new
    return bytes(buf)


def check_read(src) -> Graph | None:
    """The graph read from ``src``, or None when the reader refused it properly."""
    try:
        graph = graphfmt.read(src)
    except GraphError as exc:
        message = str(exc)
        assert message and "\n" not in message
        # the catch-all of read() ("malformed graph file: <exception>") hides a check
        # that is missing; every refusal found by fuzzing has its own message
        assert not message.startswith("malformed graph file:"), message
        return None
    graph.validate()
    stats = graph.stats()
    assert stats["tasks"] == len(graph)
    return graph


def test_seeds_are_valid():
    for data in SEEDS:
        graph = graphfmt.read(data)
        graph.stats()
    assert len(graphfmt.read(SEEDS[2]).stats()["types"]) >= 5


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(_mutation, min_size=1, max_size=4),
       stream=st.booleans())
def test_damaged_files_are_read_or_refused_with_graph_error(seed, mutations, stream):
    data = mutate(SEEDS[seed], mutations)
    check_read(io.BytesIO(data) if stream else data)


@settings(max_examples=max(1, EXAMPLES // 5), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, len(SEEDS) - 1), mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_append_to_damaged_files(seed, mutations):
    """append either refuses with GraphError and leaves the file as it was, or appends;
    it appends to every file that reads, and the result reads with the new task."""
    import tempfile
    data = mutate(SEEDS[seed], mutations)
    before = check_read(data) if data else Graph.empty()
    with tempfile.TemporaryDirectory() as tmp_dir:
        path = os.path.join(tmp_dir, "damaged.loom")
        with open(path, "wb") as f:
            f.write(data)
        try:
            new_id = graphfmt.append(path, _one_task(S.CONST, b"new", []))
        except GraphError:
            assert before is None, "append refused a file that reads"
            with open(path, "rb") as f:
                assert f.read() == data
            return
        after = check_read(path)
        if before is not None:
            assert after is not None and len(after) == len(before) + 1 == new_id + 1
            assert after.symbol(new_id) == S.CONST and after.config(new_id) == b"new"


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_every_truncation_of_every_seed_is_refused(seed):
    data = SEEDS[seed]
    for cut in range(len(data)):
        if cut and data[cut:cut + len(MAGIC)] == MAGIC:
            continue   # a cut between two parts leaves a valid file
        with pytest.raises(GraphError):
            graphfmt.read(data[:cut])
