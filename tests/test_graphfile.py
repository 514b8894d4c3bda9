"""The binary graph file: round trips, streaming, composition, and every bad input."""

import io
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.fileformat import MAGIC, GraphWriter
from graphfmt.graph import Graph, GraphError, VarBytes, offsets_from_lengths


def sample_plan():
    a = tasks.const("Hello ")
    b = tasks.const(b"world")
    m = tasks.merge((a, b, a), delimiter=",")
    m.label = "greet:1"
    r = tasks.run("wc -c", [(m, None)])
    r.checkpoint_path = "/tmp/ckpt"
    r.metadata = {"k": [1, 2]}
    g = tasks.get(tasks.split(m), 1)
    g.resource_request = tasks.cpus(3)
    return [r, g, m]


def to_bytes(results):
    buf = io.BytesIO()
    graphfmt.write(buf, results)
    return buf.getvalue()


def test_round_trip_keeps_every_column():
    data = to_bytes(sample_plan())
    g = graphfmt.read(data)
    assert len(g) == 6
    by_symbol = {g.symbol(i): i for i in range(len(g))}
    m = by_symbol[S.MERGE]
    assert g.config(m) == b","
    assert [g.config(int(x)) for x in g.task_inputs(m)] == [b"Hello ", b"world", b"Hello "]
    assert g.label(m) == "greet:1"
    r = by_symbol[S.RUN]
    assert g.checkpoint(r) == "/tmp/ckpt"
    assert g.request(r) == {"cpus": 1}
    assert g.request(by_symbol[S.GET]) == {"cpus": 3}
    assert g.request(m) is None
    assert S.decode_run(g.config(r))["args"] == ["wc", "-c"]
    import msgpack
    assert msgpack.unpackb(g.metadata[r]) == {"k": [1, 2]}
    assert sorted(g.symbol(i) for i in g.result_ids()) == sorted([S.RUN, S.GET, S.MERGE])
    # every input precedes its consumer
    owners = np.repeat(np.arange(len(g)), np.diff(g.input_offsets))
    assert (g.inputs < owners).all()


def test_shared_subgraph_is_one_task_and_equal_objects_stay_two():
    shared = tasks.const("x")
    g, ids = graphfmt.build_graph([tasks.merge((shared, shared)), tasks.const("x"), shared])
    assert len(g) == 3
    assert ids[2] == 0


def test_columns_are_numpy_arrays_and_len_is_task_count():
    g = graphfmt.read(to_bytes(sample_plan()))
    for column in (g.types, g.input_offsets, g.inputs, g.flags, g.request_codes, g.label_codes):
        assert isinstance(column, np.ndarray)
    assert len(g) == len(g.types)


def test_write_to_path_and_stdout(tmp_path):
    path = tmp_path / "x.loom"
    graphfmt.write(str(path), sample_plan())
    assert len(graphfmt.read(str(path))) == 6
    code = "import graphfmt; from graphfmt import tasks; graphfmt.write('-', tasks.const('a'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert out.startswith(MAGIC)
    assert graphfmt.read(out).config(0) == b"a"


def test_stream_is_read_incrementally_from_a_pipe():
    # a producer writes two blocks; the reader gets them through a pipe
    r, w = os.pipe()
    leaves = [tasks.const(str(i)) for i in range(1000)]
    data = io.BytesIO()
    writer = GraphWriter(data)
    writer.write_graph(graphfmt.build_graph(leaves)[0], block_tasks=100)
    writer.close()
    with os.fdopen(w, "wb") as wf:
        wf.write(data.getvalue())
    with os.fdopen(r, "rb") as rf:
        g = graphfmt.read(rf)
    assert len(g) == 1000 and g.config(999) == b"999"


def test_concatenated_files_offset_ids():
    one = to_bytes(sample_plan())
    two = to_bytes([tasks.merge((tasks.const("p"), tasks.const("q")))])
    g = graphfmt.read(one + two)
    assert len(g) == 9
    assert list(g.task_inputs(8)) == [6, 7]
    assert g.symbol(8) == S.MERGE
    assert len(g.result_ids()) == 4


def test_graph_concat_matches_file_concatenation():
    a = graphfmt.build_graph(sample_plan())[0]
    b = graphfmt.build_graph([tasks.merge((tasks.const("p"), tasks.const("q")))])[0]
    joined = Graph.concat([a, b])
    from_file = graphfmt.read(to_bytes(a) + to_bytes(b))
    assert joined.inputs.tolist() == from_file.inputs.tolist()
    assert [joined.symbol(i) for i in range(9)] == [from_file.symbol(i) for i in range(9)]


def one_task(symbol, config, inputs, result=True):
    return Graph([symbol], np.zeros(1, np.uint16), offsets_from_lengths(np.array([len(inputs)])),
                 np.array(inputs, dtype=np.int64), VarBytes.from_list([config]),
                 np.array([int(result)], np.uint8), np.zeros(1, np.uint16))


def test_append_creates_and_extends_a_file(tmp_path):
    path = str(tmp_path / "a.loom")
    assert graphfmt.append(path, one_task(S.CONST, b"a", [])) == 0
    assert graphfmt.append(path, one_task(S.CONST, b"b", [])) == 1
    assert graphfmt.append(path, one_task(S.MERGE, b"", [0, 1])) == 2
    g = graphfmt.read(path)
    assert len(g) == 3 and g.symbols == [S.CONST, S.MERGE]
    assert g.task_inputs(2).tolist() == [0, 1]


def test_append_refuses_a_reference_into_an_earlier_part(tmp_path):
    path = tmp_path / "a.loom"
    path.write_bytes(to_bytes([tasks.const("x")]) * 2)
    with pytest.raises(GraphError, match="earlier part"):
        graphfmt.append(str(path), one_task(S.MERGE, b"", [0]))


def test_every_truncation_is_a_clean_error():
    data = to_bytes(sample_plan())
    for cut in range(len(data)):
        with pytest.raises(GraphError):
            graphfmt.read(data[:cut])


def test_byte_at_a_time_stream():
    data = to_bytes(sample_plan())

    class Trickle(io.RawIOBase):
        def __init__(self):
            self.pos = 0

        def read(self, n=-1):
            piece = data[self.pos:self.pos + 1]
            self.pos += len(piece)
            return piece
    assert len(graphfmt.read(Trickle())) == 6


def test_wrong_magic_and_newer_version():
    data = bytearray(to_bytes(sample_plan()))
    with pytest.raises(GraphError, match="magic"):
        graphfmt.read(b"PK\x03\x04" + bytes(data[4:]))
    data[8:10] = struct.pack("<H", 2)
    with pytest.raises(GraphError, match="version 2.0 is not supported"):
        graphfmt.read(bytes(data))
    with pytest.raises(GraphError, match="empty"):
        graphfmt.read(b"")


def test_unknown_critical_chunk_is_refused_and_ancillary_skipped():
    data = to_bytes(sample_plan())
    header, rest = data[:16], data[16:]
    ancillary = struct.pack("<4sIQ", b"note", 0, 3) + b"abc" + b"\0" * 5
    assert len(graphfmt.read(header + ancillary + rest)) == 6
    critical = struct.pack("<4sIQ", b"ZZZZ", 0, 0)
    with pytest.raises(GraphError, match="chunk ZZZZ"):
        graphfmt.read(header + critical + rest)


def corrupt(graph_fn):
    g = graphfmt.build_graph(sample_plan())[0]
    graph_fn(g)
    return to_bytes(g)


def test_dangling_input_names_the_task():
    def dangle(g):
        g.inputs[0] = 99
    with pytest.raises(GraphError, match=r"task \d+.*input 99 does not exist \(dangling input\)"):
        graphfmt.read(corrupt(dangle))


def test_cycle_names_a_task_on_it():
    a, b = one_task(S.MERGE, b"", [1]), one_task(S.MERGE, b"", [0])
    g = Graph.concat([a, b])
    g.inputs[:] = [1, 0]
    with pytest.raises(GraphError, match=r"cycle through task [01] \(loom/data/merge\)"):
        graphfmt.read(to_bytes(g))


def test_self_loop_is_a_cycle():
    g = one_task(S.MERGE, b"", [0])
    with pytest.raises(GraphError, match="cycle through task 0"):
        graphfmt.read(to_bytes(g))


def test_unknown_builtin_symbol_but_extension_symbols_pass():
    with pytest.raises(GraphError, match=r"task 0: unknown symbol 'loom/data/nope'"):
        graphfmt.read(to_bytes(one_task("loom/data/nope", b"", [])))
    assert len(graphfmt.read(to_bytes(one_task("myorg/fft", b"", [])))) == 1


@pytest.mark.parametrize("symbol,config,inputs,message", [
    (S.GET, b"\x01", [], "takes 1 input"),
    (S.SLICE, b"1234", [0], "expected 16"),
    (S.RUN, b"\xc1", [], "not msgpack"),
    (S.SAVE, b"relative/path", [0], "not absolute"),
    (S.SPLIT, b"ab", [0], "one byte"),
])
def test_malformed_config_names_the_task(symbol, config, inputs, message):
    g = Graph.concat([one_task(S.CONST, b"x", []), one_task(symbol, config, inputs)])
    g.inputs[:] = 0   # concat offset the second task's input; point it at task 0
    with pytest.raises(GraphError, match=rf"task 1 \({symbol}\).*{message}"):
        graphfmt.read(to_bytes(g))


def test_levels_and_stats_of_a_merge_tree():
    leaves = [tasks.const(str(i)) for i in range(8)]
    while len(leaves) > 1:
        leaves = [tasks.merge(leaves[i:i + 2]) for i in range(0, len(leaves), 2)]
    s = graphfmt.build_graph(leaves)[0].stats()
    assert s["tasks"] == 15 and s["depth"] == 4 and s["critical_path_length"] == 4
    assert s["types"] == {S.CONST: 8, S.MERGE: 7}
    assert s["sources"] == 8 and s["sinks"] == 1 and s["results"] == 1


def test_bytes_per_task_stay_small():
    leaves = [tasks.const(b"") for _ in range(4096)]
    while len(leaves) > 1:
        leaves = [tasks.merge(leaves[i:i + 2]) for i in range(0, len(leaves), 2)]
    data = to_bytes(leaves)
    assert len(data) / 8191 < 20
