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


def test_configs_that_are_most_of_a_read_only_buffer_stay_a_view_of_it_and_others_are_copied():
    big = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge([tasks.const(b"x" * 100_000), tasks.const(b"y")])])[0])
    graph = graphfmt.read(big)
    assert graph.configs.data.obj is big and graph.config(0) == b"x" * 100_000   # (not copied)
    mutable = bytearray(big)
    copied = graphfmt.read(mutable)
    mutable[mutable.index(b"xxxx"):][:4] = b"zzzz"   # the caller may change its buffer afterwards
    assert type(copied.configs.data) is bytes and copied.config(0) == b"x" * 100_000
    leaves = [tasks.const(b"%d" % i) for i in range(200)]   # columns outweigh the configs: a view
    small = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge(leaves)])[0])   # would keep them alive
    assert type(graphfmt.read(small).configs.data) is bytes


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


# ------------------------------------------------------------ hand-made files
_NP_TYPES = {"u1": "<u1", "u2": "<u2", "u4": "<u4", "u8": "<u8"}


def chunk(kind, payload):
    return struct.pack("<4sIQ", kind, 0, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def part_header(features=0):
    return MAGIC + struct.pack("<HHI", 1, 0, features)


def end_chunk(n):
    return chunk(b"END!", struct.pack("<Q", n))


def table_chunk(kind, values):
    import msgpack
    return chunk(kind, msgpack.packb(values, use_bin_type=True))


def col(name, values, code=None):
    """A column (id, type code, data); the type code defaults to the documented one."""
    default = {b"TYPE": "u2", b"RCOD": "u2", b"CFGD": "u1", b"FLAG": "u1", b"CKPD": "u1", b"METD": "u1"}
    code = code or default.get(name, "u4")
    raw = values if isinstance(values, bytes) else np.array(values, dtype=_NP_TYPES.get(code, "<u4")).tobytes()
    return name, code.encode().ljust(4, b"\0"), raw


def task_chunk(n, columns):
    directory, body = b"", b""
    offset = 16 + 24 * len(columns)
    for name, code, raw in columns:
        gap = -offset % 8
        body += b"\0" * gap
        offset += gap
        directory += struct.pack("<4s4sQQ", name, code, offset, len(raw))
        body += raw
        offset += len(raw)
    return chunk(b"TASK", struct.pack("<QQ", n, len(columns)) + directory + body)


def merge_of_two_consts(**replace):
    """Columns of: const "a", const "b", merge(0, 1); ``replace`` swaps or drops columns."""
    columns = {b"TYPE": col(b"TYPE", [0, 0, 1]), b"NINP": col(b"NINP", [0, 0, 2]),
               b"INPS": col(b"INPS", [0, 1]), b"CLEN": col(b"CLEN", [1, 1, 0]),
               b"CFGD": col(b"CFGD", b"ab"), b"FLAG": col(b"FLAG", [0, 0, 1])}
    for name, column in replace.items():
        if column is None:
            columns.pop(name.encode(), None)
        else:
            columns[name.encode()] = column
    return (part_header() + table_chunk(b"SYMB", [S.CONST, S.MERGE])
            + task_chunk(3, list(columns.values())) + end_chunk(3))


def test_hand_made_file_reads():
    g = graphfmt.read(merge_of_two_consts())
    assert [g.symbol(i) for i in range(3)] == [S.CONST, S.CONST, S.MERGE]
    assert g.task_inputs(2).tolist() == [0, 1] and g.config(1) == b"b"


# ------------------------------------------------------------ appending
def test_append_to_concatenated_parts_stores_part_local_inputs(tmp_path):
    path = tmp_path / "ab.loom"
    a = to_bytes([tasks.merge((tasks.const("p"), tasks.const("q")))])      # tasks 0-2
    b = to_bytes([tasks.merge((tasks.const("x"), tasks.const("y")), ",")])  # tasks 3-5
    path.write_bytes(a + b)
    assert graphfmt.append(str(path), one_task(S.MERGE, b"-", [3, 5])) == 6
    assert graphfmt.append(str(path), one_task(S.MERGE, b"", [6, 4])) == 7
    g = graphfmt.read(str(path))
    assert len(g) == 8
    assert g.task_inputs(6).tolist() == [3, 5] and g.task_inputs(7).tolist() == [6, 4]
    assert g.task_inputs(5).tolist() == [3, 4] and g.task_inputs(2).tolist() == [0, 1]


def test_append_refuses_inputs_that_do_not_exist_and_leaves_the_file(tmp_path):
    path = tmp_path / "a.loom"
    path.write_bytes(to_bytes([tasks.const("x")]))
    before = path.read_bytes()
    for bad in (5, -1):
        with pytest.raises(GraphError, match=f"input {bad} does not exist"):
            graphfmt.append(str(path), one_task(S.MERGE, b"", [bad]))
    assert path.read_bytes() == before


def test_append_after_a_table_holding_a_value_twice(tmp_path):
    path = tmp_path / "dup.loom"
    data = (part_header() + table_chunk(b"SYMB", [S.CONST, S.CONST, S.MERGE])
            + task_chunk(3, [col(b"TYPE", [0, 1, 2]), col(b"NINP", [0, 0, 2]), col(b"INPS", [0, 1]),
                             col(b"CLEN", [1, 1, 0]), col(b"CFGD", b"ab"), col(b"FLAG", [0, 0, 1])])
            + end_chunk(3))
    path.write_bytes(data)
    assert [graphfmt.read(data).symbol(i) for i in range(3)] == [S.CONST, S.CONST, S.MERGE]
    assert graphfmt.append(str(path), one_task(S.SIZE, b"", [2])) == 3
    assert graphfmt.append(str(path), one_task(S.LENGTH, b"", [2])) == 4
    g = graphfmt.read(str(path))
    assert [g.symbol(i) for i in range(5)] == [S.CONST, S.CONST, S.MERGE, S.SIZE, S.LENGTH]
    assert g.task_inputs(3).tolist() == [2]


def test_append_refuses_an_unknown_critical_chunk(tmp_path):
    path = tmp_path / "z.loom"
    data = to_bytes([tasks.const("x")])
    path.write_bytes(data[:16] + chunk(b"ZZZZ", b"") + data[16:])
    before = path.read_bytes()
    with pytest.raises(GraphError, match="chunk ZZZZ that this loomctl does not know"):
        graphfmt.append(str(path), one_task(S.CONST, b"y", []))
    assert path.read_bytes() == before
    path.write_bytes(data[:16] + chunk(b"note", b"abc") + data[16:])   # ancillary: kept
    graphfmt.append(str(path), one_task(S.CONST, b"y", []))
    assert len(graphfmt.read(str(path))) == 2


@pytest.mark.parametrize("cut", [1, 8, 20, 30])
def test_append_refuses_a_truncated_file(tmp_path, cut):
    path = tmp_path / "t.loom"
    data = to_bytes([tasks.const("x")])
    path.write_bytes(data[:-cut])
    with pytest.raises(GraphError, match="truncated|malformed END"):
        graphfmt.append(str(path), one_task(S.CONST, b"y", []))
    assert path.read_bytes() == data[:-cut]


def test_a_failed_append_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "a.loom"
    path.write_bytes(to_bytes([tasks.const("x")]))
    before = path.read_bytes()
    huge = one_task(S.CONST, b"", [])
    huge.configs = VarBytes(np.array([0, 1 << 32]), b"")   # a 4 GiB config, without the bytes
    with pytest.raises(GraphError, match="config length 4294967296 does not fit column CLEN"):
        graphfmt.append(str(path), huge)
    assert path.read_bytes() == before
    assert len(graphfmt.read(str(path))) == 1


# ------------------------------------------------------------ column widths
COLUMN_TYPES = {b"TYPE": "u2", b"NINP": "u4", b"INPS": "u4", b"CLEN": "u4", b"CFGD": "u1",
                b"FLAG": "u1", b"RCOD": "u2", b"LCOD": "u4", b"CKPL": "u4", b"CKPD": "u1",
                b"METL": "u4", b"METD": "u1"}


@pytest.mark.parametrize("name", sorted(COLUMN_TYPES))
def test_a_column_of_another_width_is_refused(name):
    wrong = "u8" if COLUMN_TYPES[name] != "u8" else "u4"
    if name in (b"CFGD", b"CKPD", b"METD"):
        column = col(name, b"", "u2")   # empty: only the type is wrong
        wrong = "u2"
    else:
        values = {b"TYPE": [0, 0, 1], b"NINP": [0, 0, 2], b"INPS": [0, 1], b"CLEN": [1, 1, 0],
                  b"FLAG": [0, 0, 1]}.get(name, [0, 0, 0])
        column = col(name, values, wrong)
    data = merge_of_two_consts(**{name.decode(): column})
    with pytest.raises(GraphError, match=rf"column {name.decode()} has type {wrong}, but must have type "
                                         rf"{COLUMN_TYPES[name]}$"):
        graphfmt.read(data)


def test_a_wide_column_is_not_narrowed_silently():
    # TYPE stored as u4 with code 65536 used to be read as code 0 (a const)
    data = merge_of_two_consts(TYPE=col(b"TYPE", [65536, 0, 1], "u4"))
    with pytest.raises(GraphError, match="column TYPE has type u4"):
        graphfmt.read(data)


def test_writer_refuses_values_that_do_not_fit():
    g = one_task(S.CONST, b"", [])
    g.symbols = [f"ext/s{i}" for i in range(65537)]
    g.types = np.array([65536], np.int64)
    with pytest.raises(GraphError, match="at most 65536 symbols"):
        graphfmt.write(io.BytesIO(), g)
    for bad in (1 << 32, -1):
        g = Graph.concat([one_task(S.CONST, b"x", []), one_task(S.MERGE, b"", [0])])
        g.inputs[:] = bad
        with pytest.raises(GraphError, match=f"task 1 of the graph: input id .*{bad} does not fit column INPS"):
            graphfmt.write(io.BytesIO(), g)
    g = one_task(S.CONST, b"", [])
    g.configs = VarBytes(np.array([0, 1 << 32]), b"")
    with pytest.raises(GraphError, match="config length 4294967296 does not fit column CLEN"):
        graphfmt.write(io.BytesIO(), g)
    g = one_task(S.CONST, b"", [])
    g.requests = [{"cpus": i} for i in range(65536)]
    with pytest.raises(GraphError, match="at most 65535 resource requests"):
        graphfmt.write(io.BytesIO(), g)


# ------------------------------------------------------------ missing columns, bad codes
@pytest.mark.parametrize("data_column,length_column,values", [
    (b"INPS", b"NINP", None), (b"CFGD", b"CLEN", None),
    (b"CKPD", b"CKPL", [0, 0, 5]), (b"METD", b"METL", [1, 0, 0]),
])
def test_a_missing_data_column_is_refused(data_column, length_column, values):
    replace = {data_column.decode(): None}
    if values is not None:
        replace[length_column.decode()] = col(length_column, values)
    with pytest.raises(GraphError, match=rf"at task 0: column {data_column.decode()} is missing, "
                                         rf"but {length_column.decode()} says it has \d+ entries"):
        graphfmt.read(merge_of_two_consts(**replace))


def test_data_columns_may_be_absent_when_empty():
    data = merge_of_two_consts(NINP=col(b"NINP", [0, 0, 0]), INPS=None,
                               CLEN=col(b"CLEN", [0, 0, 0]), CFGD=None, TYPE=col(b"TYPE", [1, 1, 1]))
    g = graphfmt.read(data)
    assert len(g) == 3 and len(g.inputs) == 0


def test_cycle_with_a_label_code_outside_its_table_is_a_graph_error():
    # two merges feeding each other, task 0 labelled with a code the (empty) table lacks
    data = (part_header() + table_chunk(b"SYMB", [S.MERGE])
            + task_chunk(2, [col(b"TYPE", [0, 0]), col(b"NINP", [1, 1]), col(b"INPS", [1, 0]),
                             col(b"CLEN", [0, 0]), col(b"CFGD", b""), col(b"FLAG", [1, 1]),
                             col(b"LCOD", [5, 0])])
            + end_chunk(2))
    with pytest.raises(GraphError, match="task 0: label code 5 is not in the label table"):
        graphfmt.read(data)
    with pytest.raises(GraphError, match="task 0: label code 5 is not in the label table"):
        graphfmt.read(data, validate=False)


def test_validate_checks_codes_before_naming_tasks():
    g = Graph.concat([one_task(S.MERGE, b"", [1]), one_task(S.MERGE, b"", [0])])
    g.inputs[:] = [1, 0]                       # a cycle
    g.label_codes = np.array([3, 0], np.uint32)
    with pytest.raises(GraphError, match="task 0: label code 3 is not in the label table"):
        g.validate()
    g.label_codes = np.zeros(2, np.uint32)
    g.request_codes = np.array([0, 2], np.uint16)
    with pytest.raises(GraphError, match="task 1: request code 2 is not in the request table"):
        g.validate()


def test_validate_reads_only_the_configs_whose_content_it_checks(monkeypatch):
    """A const's config (a map-reduce's 10 MB input) is checked by its length, seen
    through a view: validating it copied and hashed it (8 ms of a 10 ms read)."""
    seen = []
    check = S.check_config
    monkeypatch.setattr(S, "check_config", lambda symbol, n, config: seen.append((symbol, type(config))) or
                        check(symbol, n, config))
    graph = graphfmt.build_graph([tasks.merge([tasks.const(b"x" * 100_000), tasks.run("true")])])[0]
    graph.validate()
    assert sorted(seen) == sorted([(S.CONST, memoryview), (S.MERGE, memoryview), (S.RUN, bytes)])
    split = Graph.concat([one_task(S.CONST, b"x", []), one_task(S.SPLIT, b"ab", [0])])
    split.inputs[:] = [0]
    with pytest.raises(GraphError, match="delimiter must be one byte"):   # (a length check, on a view)
        split.validate()


# ------------------------------------------------------------ messages
def test_task_chunk_errors_name_whole_file_ids():
    good = to_bytes(sample_plan())                       # 6 tasks
    bad = merge_of_two_consts(FLAG=col(b"FLAG", [0, 1]))
    with pytest.raises(GraphError, match=r"malformed TASK chunk at task 6: column FLAG has 2 entries, expected 3"):
        graphfmt.read(good + bad)


def test_kinds_and_type_codes_print_as_text():
    data = to_bytes(sample_plan())
    absurd = struct.pack("<4sIQ", b"ABCD", 0, 1 << 41)
    with pytest.raises(GraphError, match=r"^malformed ABCD chunk: length 2199023255552 exceeds 2\^40 bytes$"):
        graphfmt.read(data[:16] + absurd + data[16:])
    weird = merge_of_two_consts(FLAG=(b"FLAG", b"x9\0\0", b"\0\0\x01"))
    with pytest.raises(GraphError, match=r"^malformed TASK chunk at task 0: column FLAG has unknown type code 'x9'$"):
        graphfmt.read(weird)
    with pytest.raises(GraphError, match=r"^graph file uses column Q\\x00Z\\x89 that this loomctl does not know$"):
        graphfmt.read(merge_of_two_consts(Q=(b"Q\0Z\x89", b"u1\0\0", b"")))


@pytest.mark.parametrize("length", [0, 4, 7])
def test_short_end_chunk(length):
    data = to_bytes([tasks.const("x")])
    end = data.rindex(b"END!")
    short = data[:end] + chunk(b"END!", struct.pack("<Q", 1)[:length])
    with pytest.raises(GraphError, match=rf"^malformed END chunk: payload is {length} bytes, expected 8$"):
        graphfmt.read(short)


def test_a_header_cut_short_on_a_stream_is_truncated_not_empty(monkeypatch):
    data = to_bytes([tasks.const("x")])
    for cut in (1, 5, 15):
        with pytest.raises(GraphError, match="^truncated file: header"):
            graphfmt.read(io.BytesIO(data[:cut]))
    with pytest.raises(GraphError, match="^empty file"):
        graphfmt.read(io.BytesIO(b""))

    class Stdin:
        buffer = io.BytesIO(data[:5])
    monkeypatch.setattr(sys, "stdin", Stdin)
    with pytest.raises(GraphError, match="^truncated file: header"):
        graphfmt.read("-")


def test_features_error_names_only_unknown_bits(monkeypatch):
    from graphfmt import fileformat
    monkeypatch.setattr(fileformat, "KNOWN_FEATURES", 0x1)
    data = bytearray(to_bytes([tasks.const("x")]))
    data[12:16] = struct.pack("<I", 0x7)
    with pytest.raises(GraphError, match="^graph file needs features 0x6 that this loomctl does not know$"):
        graphfmt.read(bytes(data))


@pytest.mark.parametrize("requests", [[[1]], [{"cpus": -1}], [{"cpus": "1"}], [{"cpus": [1]}], [{1: 2}]])
def test_malformed_request_tables(requests):
    import msgpack
    data = to_bytes([tasks.const("x")])
    payload = msgpack.packb(requests, use_bin_type=True, strict_types=False)
    with pytest.raises(GraphError, match="malformed RREQ chunk"):
        graphfmt.read(data[:16] + chunk(b"RREQ", payload) + data[16:])


# ---------------------------------------------------------------- the small-file fast path
def _random_plan(rng):
    """A random small plan: every kind of column (labels, requests, checkpoints,
    metadata, priorities) now and then, raw Task objects with odd configs too."""
    made = []
    for _ in range(int(rng.integers(1, 12))):
        kind = int(rng.integers(0, 7))
        pick = [made[int(i)] for i in rng.integers(0, len(made), size=int(rng.integers(1, 4)))] if made else []
        if kind == 0 or not made:
            t = tasks.const(bytes(rng.integers(0, 256, size=int(rng.integers(0, 5))).astype(np.uint8)))
        elif kind == 1:
            t = tasks.merge(pick, delimiter=",")
        elif kind == 2:
            t = tasks.run("wc -c", [(pick[0], None)])
        elif kind == 3:
            t = tasks.get(tasks.split(pick[0]), int(rng.integers(0, 3)))
        elif kind == 4:   # a config the checks may refuse (a wrong length, an arity)
            t = tasks.Task(S.GET, pick[:int(rng.integers(0, 3))], bytes(int(rng.integers(0, 10))))
        elif kind == 5:
            t = tasks.Task(["my/ext", "loom/nope", S.MERGE][int(rng.integers(0, 3))], pick)
        else:
            t = tasks.py_value(int(rng.integers(0, 100)))
        if rng.random() < 0.3:
            t.label = f"l{int(rng.integers(0, 3))}"
        if rng.random() < 0.2:
            t.resource_request = tasks.cpus(int(rng.integers(1, 3)))
        if rng.random() < 0.15:
            t.checkpoint_path = ["/tmp/ck", "relative", "/x/\u00e9"][int(rng.integers(0, 3))]
        if rng.random() < 0.15:
            t.metadata = {"k": int(rng.integers(0, 5))}
        if rng.random() < 0.15:
            t.priority = int(rng.integers(-5, 5))
        made.append(t)
    return [made[-1]] + [made[int(i)] for i in rng.integers(0, len(made), size=int(rng.integers(0, 3)))]


def _general(data):
    from graphfmt import fileformat as F
    try:
        return F.Graph.concat(list(F.iter_parts(F._as_source(data)))), None
    except Exception as exc:   # noqa: BLE001 (compared below)
        return None, exc


def _same_graph(a, b):
    assert a.symbols == b.symbols and a.labels == b.labels and a.requests == b.requests
    for name in ("types", "input_offsets", "inputs", "flags", "request_codes", "label_codes", "priorities"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in ("configs", "checkpoints", "metadata"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.offsets.dtype == y.offsets.dtype and np.array_equal(x.offsets, y.offsets), name
            assert bytes(x.data) == bytes(y.data), name


def test_the_small_file_fast_path_reads_exactly_what_the_general_reader_reads():
    from graphfmt.smallread import read_small
    rng = np.random.default_rng(18)
    taken = 0
    for case in range(600):
        data = graphfmt.to_bytes(graphfmt.build_graph(_random_plan(rng))[0])
        if case % 3 == 1:   # a corrupt byte somewhere (header, tables, columns, END)
            raw = bytearray(data)
            raw[int(rng.integers(0, len(raw)))] ^= 1 << int(rng.integers(0, 8))
            data = bytes(raw)
        elif case % 3 == 2:   # cut short, or a second part
            data = data[:int(rng.integers(0, len(data)))] if rng.random() < 0.5 else data + data
        fast = read_small(data)
        general, error = _general(data)
        if general is not None:
            try:
                general.validate()
            except GraphError as exc:
                general, error = None, exc
        if fast is None:
            if general is not None:   # declined: the general reader gives the same graph
                _same_graph(graphfmt.read(data), general)
            else:
                with pytest.raises(GraphError):
                    graphfmt.read(data)
            continue
        assert general is not None, f"case {case}: the fast path took what the general reader refuses: {error}"
        _same_graph(fast, general.deduplicated())
        taken += 1
    assert taken > 100   # the fast path is taken for most valid files


def test_the_small_graph_fast_writer_writes_exactly_the_general_writers_bytes():
    from graphfmt.smallwrite import to_bytes_small
    rng = np.random.default_rng(1818)
    taken = 0
    for _ in range(400):
        graph = graphfmt.build_graph(_random_plan(rng))[0]
        general = io.BytesIO()
        graphfmt.write(general, graph)
        fast = to_bytes_small(graph)
        assert fast is None or fast == general.getvalue()
        taken += fast is not None
    assert taken == 400
    # a value the general writer refuses: the fast path declines and the error is the writer's
    bad = graphfmt.build_graph([tasks.merge([tasks.const("a")])])[0]
    bad.types[:] = 7
    assert to_bytes_small(bad) is None
    with pytest.raises(GraphError, match="symbol code"):
        graphfmt.to_bytes(bad)
    big = graphfmt.build_graph([tasks.merge([tasks.const(str(i)) for i in range(100)])])[0]
    assert to_bytes_small(big) is None and graphfmt.read(graphfmt.to_bytes(big)).symbols == big.symbols


def test_the_reader_gives_int32_ids_and_offsets_where_they_fit_and_int64_beyond():
    from graphfmt.graph import offsets_from_lengths
    g = graphfmt.build_graph([tasks.merge([tasks.const(str(i)) for i in range(5)]) for _ in range(3)])[0]
    buffer = io.BytesIO()
    graphfmt.write(buffer, g, block_tasks=4)   # several blocks: the general reader
    for data in (buffer.getvalue(), graphfmt.to_bytes(g)):   # (and the small-graph path)
        r = graphfmt.read(data)
        assert r.inputs.dtype == r.input_offsets.dtype == r.configs.offsets.dtype == np.int32
        assert r.inputs.tolist() == g.inputs.tolist() and r.input_offsets.tolist() == g.input_offsets.tolist()
        source = bytearray(data)   # nothing of the Graph is a view of the buffer it was read from
        r = graphfmt.read(memoryview(source))
        source[:] = bytes(len(source))
        assert r.inputs.tolist() == g.inputs.tolist() and r.types.tolist() == g.types.tolist()
        assert r.flags.tolist() == g.flags.tolist() and [r.config(i) for i in range(len(g))] == \
            [g.config(i) for i in range(len(g))]
    both = graphfmt.read(graphfmt.to_bytes(g) * 2)   # two parts: the second's ids are widened, then offset
    assert both.inputs.tolist() == g.inputs.tolist() + (g.inputs + len(g)).tolist()
    wide = offsets_from_lengths(np.array([2**31 - 1, 5], np.uint32), compact=True)
    assert wide.dtype == np.int64 and wide.tolist() == [0, 2**31 - 1, 2**31 + 4]
    assert offsets_from_lengths(np.array([3, 4], np.uint32), compact=True).dtype == np.int32


def test_to_bytes_gives_the_bytes_a_file_gets(tmp_path):
    """to_bytes joins the writer's pieces once (no BytesIO): the same bytes as a file."""
    graph = graphfmt.build_graph([tasks.merge([tasks.const(b"x" * 300_000), tasks.run("true"), tasks.const(b"")])])[0]
    path = tmp_path / "g.loom"
    graphfmt.write(str(path), graph)
    data = graphfmt.to_bytes(graph)
    assert type(data) is bytes and data == path.read_bytes()
    assert graphfmt.read(data).configs.total() == graph.configs.total()


def test_the_first_of_each_arity_and_length_pair_is_what_a_unique_over_both_gives():
    """Validation checks one task per (arity, config length) of a type; the positions it
    picks are those of np.unique over both columns, first occurrences, in order."""
    from graphfmt.graph import _first_of_each_pair
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        a, b = rng.integers(0, 3, n), rng.integers(0, 5, n)
        expected = np.sort(np.unique(np.stack([a, b]), axis=1, return_index=True)[1])
        assert _first_of_each_pair(a, b).tolist() == expected.tolist()


def test_a_large_const_goes_into_the_file_by_reference_and_the_file_is_the_same():
    """Building a graph does not copy a large config into one joined buffer, and writing
    it passes the config's own bytes on: a 10 MB const was copied twice into fresh memory
    before it left the client."""
    from graphfmt.fileformat import to_pieces
    from graphfmt.graph import LARGE_ITEM
    big = bytes(range(256)) * (LARGE_ITEM // 256 + 3)
    pieces_of = [tasks.const(b"a"), tasks.const(big), tasks.const(b"bc")]
    graph, _ = graphfmt.build_graph([tasks.merge(pieces_of)])
    assert graph.configs._items is not None   # not joined yet
    assert any(type(p) is memoryview and p.obj is big for p in to_pieces(graph))
    data = graphfmt.to_bytes(graph)
    assert graph.configs._items is not None   # still not joined: written from the items
    assert graph.configs.data == b"a" + big + b"bc" and graph.configs._items is None
    assert graphfmt.to_bytes(graph) == data   # the same file from the joined buffer
    back = graphfmt.read(data)
    assert [back.configs[i] for i in range(len(back.configs))] == [b"a", big, b"bc", b""]
