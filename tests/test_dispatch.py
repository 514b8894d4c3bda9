"""The server's dispatch without sockets: frames in, frames out (the wire regressions
that once needed a live cluster)."""

import weakref

import numpy as np
import pytest
import zmq

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from loomctl import protocol as P
from loomctl.server.dispatch import Dispatch

SECRET = P.new_secret()


class Wire:
    """A Dispatch and the peers talking to it; ``out[identity]`` collects what each got."""

    def __init__(self):
        self.d = Dispatch(SECRET, {"host": "127.0.0.1", "port": 1, "pid": 1, "started": 0.0})
        self.now = 0.0
        self.out: dict[bytes, list] = {}

    def send(self, identity, kind, body=None, *blobs, raw=None):
        self.d.message(identity, raw if raw is not None else P.encode(kind, body, *blobs), self.now)
        for target, frames in self.d.flush(self.now):
            kind, body, blobs = P.decode(frames)
            if kind == P.COMPUTE and "columns" in body:   # (many rows go as columns: read back as rows)
                body = {**body, "tasks": [list(row) for row in P.compute_rows(body, blobs)]}
            self.out.setdefault(target, []).append((kind, body, blobs))
        return [m for m in self.out.pop(identity, [])]

    def join(self, identity, role, secret=SECRET):
        (challenge,) = self.send(identity, P.HELLO, {"role": role, "version": P.PROTOCOL_VERSION})
        assert challenge[0] == P.CHALLENGE
        return self.send(identity, P.AUTH, {"proof": P.proof(secret, challenge[1]["nonce"], role)})

    def worker(self, identity=b"w1", cpus=1):
        assert self.join(identity, "worker")[0][0] == P.WELCOME
        reply, *rest = self.send(identity, P.REGISTER, {"name": identity.decode(), "cpus": cpus,
                                                         "data_address": f"tcp://127.0.0.1:{len(identity)}"})
        assert reply[0] == P.REPLY
        self.out.setdefault(identity, []).extend(rest)   # (what the round after gave it)
        return reply[1]["worker_id"]

    def client(self, identity=b"c1"):
        assert self.join(identity, "client")[0][0] == P.WELCOME
        return identity

    def submit(self, client, results):
        graph = graphfmt.to_bytes(graphfmt.build_graph(results)[0])
        (reply,) = [m for m in self.send(client, P.SUBMIT, {"req": 1, "graph": graph}) if m[0] == P.REPLY]
        return reply[1]


def test_a_submission_reaches_the_worker_before_its_client_hears_back():
    w = Wire()
    w.worker()
    c = w.client()
    graph = graphfmt.to_bytes(graphfmt.build_graph([tasks.const("x")])[0])
    w.d.message(c, P.encode(P.SUBMIT, {"req": 7, "graph": graph}), 0.0)
    order = [P.decode(frames)[0] for _, frames in w.d.flush(0.0)]
    assert order == [P.COMPUTE, P.REPLY]


def test_a_submitted_graph_frame_is_read_in_place_and_dropped_once_read():
    w = Wire()
    w.worker()
    c = w.client()
    graph = graphfmt.build_graph([tasks.merge([tasks.const(str(i)) for i in range(3000)])])[0]
    frame = zmq.Frame(graphfmt.to_bytes(graph))   # (as the server's ROUTER gives it: no copy)
    frames = P.encode(P.SUBMIT, {"req": 3}, frame)
    dropped = weakref.ref(frame)
    del frame
    w.d.message(c, frames, 0.0)
    assert frames == [] and dropped() is None   # the job is in, the frame is gone
    (reply,) = [b for t, f in w.d.flush(0.0) for k, b, _ in [P.decode(f)] if k == P.REPLY]
    assert reply["n"] == len(graph) == w.d.core.cols.used


@pytest.mark.parametrize("cut", [0, 5, 16, 40, -9, -1])
def test_a_cut_short_or_garbage_graph_frame_gets_a_one_line_error(cut):
    w = Wire()
    c = w.client()
    data = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge([tasks.const(str(i)) for i in range(100)])])[0])
    for blob in (zmq.Frame(data[:cut]), zmq.Frame(b"\x89LOOMGF\n" + b"\xff" * (len(data) - 8)), data[:cut]):
        (reply,) = w.send(c, P.SUBMIT, {"req": 4}, blob)
        assert reply[0] == P.ERROR and "\n" not in reply[1]["message"] and reply[1]["message"]
    assert w.d.core.cols.used == 0 and w.d.bad_messages == 0


def test_a_submit_with_its_graph_both_in_a_frame_and_in_the_body_is_refused():
    w = Wire()
    c = w.client()
    data = graphfmt.to_bytes(graphfmt.build_graph([tasks.const("x")])[0])
    for body, blobs in (({"req": 5, "graph": data}, [data]), ({"req": 6}, [data, data])):
        (reply,) = w.send(c, P.SUBMIT, body, *blobs)
        assert reply[0] == P.ERROR and "blob frame" in reply[1]["message"]
    assert w.d.core.cols.used == 0


def test_a_large_submission_is_journaled_before_its_job_is_added_and_a_failed_one_retired(monkeypatch):
    from loomctl.core.restore import restore
    from loomctl.server import dispatch as D
    monkeypatch.setattr(D, "EARLY_JOURNAL_BYTES", 0)
    w = Wire()
    w.worker()
    c = w.client()
    w.d.core.record = []
    handed = []
    w.d.journal_now = lambda records: handed.extend(   # (as the journal writes them: keeping no view)
        [[*r[:3], bytes(r[3]), r[4]] if r[0] == "job" else r for r in records])
    graph = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge([tasks.const(str(i)) for i in range(50)])])[0])
    frame = zmq.Frame(graph)
    gone = weakref.ref(frame)
    real_submit = w.d.core.submit
    seen = []

    def submit(*args, **kwargs):   # the frame is freed before the core adds the job
        seen.append(gone() is None)
        return real_submit(*args, **kwargs)
    monkeypatch.setattr(w.d.core, "submit", submit)
    frames = P.encode(P.SUBMIT, {"req": 1, "name": "big"}, frame)
    del frame
    w.d.message(c, frames, 0.0)
    assert seen == [True]
    (job,) = [r for r in handed if r[0] == "job"]
    assert job[1:3] == [1, 0] and job[3] == graph and job[4]["name"] == "big"
    bad = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge([tasks.Task(S.FUTURE, (), S.encode_u64(999))])])[0])
    (reply,) = [m for m in w.send(c, P.SUBMIT, {"req": 2}, bad) if m[0] == P.ERROR]
    assert "future 999" in reply[1]["message"]
    assert [r[:2] for r in handed if r[0] == "job"] == [["job", 1], ["job", 2]]
    assert ["retire", 2] in w.d.journal_records()
    (reply,) = [m for m in w.send(c, P.SUBMIT, {"req": 3}, graph) if m[0] == P.REPLY]
    assert reply[1]["job"] == 3                                  # (id 2 is the journal's failed one)
    records = handed + [["retire", 2]]
    from loomctl.core.server import ServerCore
    again = ServerCore()
    summary = restore(again, records, 0.0, 0.0)
    assert summary["jobs"] == 2 and sorted(again.jobs) == [1, 3]


def test_strangers_get_only_the_handshake_and_change_nothing():
    w = Wire()
    w.worker()
    graph = graphfmt.to_bytes(graphfmt.build_graph([tasks.const("x")])[0])
    got = w.send(b"stranger", P.SUBMIT, {"req": 1, "graph": graph})
    assert [k for k, _, _ in got] == [P.REFUSED]
    assert w.join(b"liar", "client", secret=P.new_secret())[0][0] == P.REFUSED
    got = w.send(b"liar", P.REGISTER, {"cpus": 1, "data_address": "tcp://x:1"})
    assert [k for k, _, _ in got] == [P.REFUSED]
    assert w.d.core.cols.n == 0 and len(w.d.core.workers) == 1 and w.d.gate.refused == 3


def test_raw_garbage_is_counted_and_dropped():
    w = Wire()
    for raw in ([b"\x00\xff" * 50], [b"UPDATE", b"\xc1\xc1"], [b"X" * 40, b"\x80"], [b"HELLO", b"\x81\xa4role"]):
        w.send(b"junk", None, raw=raw)
    assert w.d.bad_messages == 4 and w.d.running


def test_a_second_register_on_one_connection_is_refused():
    w = Wire()
    w.worker(b"w1")
    w.send(b"w1", P.REGISTER, {"name": "again", "cpus": 8, "data_address": "tcp://127.0.0.1:9"})
    assert len(w.d.core.workers) == 1 and w.d.bad_messages == 1


def test_a_register_with_absurd_resources_is_refused():
    w = Wire()
    w.join(b"w1", "worker")
    for resources in ({"gpu": 1 << 63}, {"gpu": -1}, {"gpu": "many"}, [1, 2]):
        w.send(b"w1", P.REGISTER, {"cpus": 1, "data_address": "tcp://127.0.0.1:9", "resources": resources})
    assert not w.d.core.workers and w.d.bad_messages == 4


def test_an_id_reported_twice_counts_once_and_sizes_are_clipped():
    w = Wire()
    w.worker(b"w1")
    c = w.client()
    job = w.submit(c, [tasks.merge([tasks.const("a"), tasks.const("b")])])
    (a, b) = job["base"], job["base"] + 1
    w.send(b"w1", P.UPDATE, {"finished": P.ids_to_bytes([a, a, b]), "sizes": P.ids_to_bytes([1, 2, 1 << 62]),
                             "lengths": P.ids_to_bytes([0, 0, -5])})
    core = w.d.core
    assert core.jobs[job["job"]].finished == 2 and core.cols.size[a] == 1
    assert core.cols.size[b] <= 1 << 48 and core.cols.length[b] == 0
    (stats,) = w.send(c, P.STATS, {"req": 2})
    assert stats[1]["finished"] == 2
    core.check_invariants()


def test_a_redirection_is_never_read_from_a_path(tmp_path):
    w = Wire()
    w.worker(b"w1")
    c = w.client()
    path = tmp_path / "plan.loom"
    graphfmt.write(str(path), [tasks.const("from a file")])
    job = w.submit(c, [tasks.py_call(tasks.py_value(len), [tasks.const("x")])])
    call = job["base"] + 2
    w.send(b"w1", P.UPDATE, {"finished": P.ids_to_bytes([job["base"], job["base"] + 1]),
                             "sizes": P.ids_to_bytes([1, 1]), "lengths": P.ids_to_bytes([0, 0])})
    assert w.d.core.cols.state[call] == 2   # ASSIGNED
    got = w.send(b"w1", P.UPDATE, {"redirects": [[call, str(path)]]})
    failed = [m for m in w.out.pop(c, []) + got if m[0] == P.TASK_FAILED]
    assert failed and "not graph file bytes" in failed[0][1]["message"]
    assert w.d.core.jobs[job["job"]].status == "failed"


def test_a_worker_that_disconnects_has_its_tasks_run_elsewhere():
    w = Wire()
    w.worker(b"w1")
    w.worker(b"w2")
    c = w.client()
    job = w.submit(c, [tasks.run("true") for _ in range(4)])
    core = w.d.core
    ids = np.arange(job["base"], job["base"] + 4)
    assert set(core.cols.worker[ids].tolist()) == {0, 1}
    w.d.peer_gone(b"w1", 1.0)
    told = [P.decode(frames)[0] for target, frames in w.d.flush(1.0) if target == b"w2"]
    assert told == [P.PEER_LOST]
    assert (core.cols.worker[ids] != 0).all() and len(core.workers) == 1   # w1's two wait for w2's cpu
    w.send(b"w2", P.UPDATE, {"finished": P.ids_to_bytes(ids[core.cols.worker[ids] == 1]),
                             "sizes": P.ids_to_bytes([0, 0]), "lengths": P.ids_to_bytes([0, 0])})
    assert (core.cols.worker[ids] == 1).sum() == 2 and (core.cols.state[ids] == 3).sum() == 2
    core.check_invariants()


def one_cpu(label):
    t = tasks.merge([])
    t.resource_request = tasks.cpus(1)
    t.label = label
    return t


def test_a_steal_request_goes_on_the_wire_and_its_answer_moves_the_tasks():
    w = Wire()
    core = w.d.core
    core.options.steal = True
    w.worker(b"w1", cpus=2)
    c = w.client()
    job = w.submit(c, [one_cpu(f"t{k}") for k in range(4)])   # all on w1: 2 run, 2 queued
    ids = list(range(job["base"], job["base"] + 4))
    assert w.out.pop(b"w1")[0][0] == P.COMPUTE
    w.worker(b"w22", cpus=2)
    (steal,) = [m for m in w.out.pop(b"w1") if m[0] == P.STEAL_TASKS]
    asked, count = P.decode_ids_command(P.STEAL_TASKS, steal[1])
    assert sorted(asked) == ids and count == 2 and core.stats["steal_requests"] == 1
    # a bogus answer (not the right field type) changes nothing; an unasked worker's neither
    w.send(b"w1", P.UPDATE, {"returned": "no"})
    w.send(b"w22", P.UPDATE, {"returned": P.ids_to_bytes(ids)})
    assert w.d.bad_messages == 1 and core.steals and "stolen" not in core.stats
    w.send(b"w1", P.UPDATE, {"returned": P.ids_to_bytes([ids[3], 10**9, -5])})
    assert core.stats["stolen"] == 1   # (and w1, still loaded, is asked again)
    (compute,) = [m for m in w.out.pop(b"w22") if m[0] == P.COMPUTE]
    assert [row[0] for row in compute[1]["tasks"]] == [ids[3]]
    core.check_invariants()


def test_an_empty_steal_answer_ends_the_request():
    w = Wire()
    core = w.d.core
    core.options.steal = True
    w.worker(b"w1")
    w.submit(w.client(), [one_cpu(f"t{k}") for k in range(2)])
    w.worker(b"w22")
    assert core.steals and core.stats["steal_requests"] == 1
    w.send(b"w1", P.UPDATE, {"returned": b""})   # nothing could go
    assert "stolen" not in core.stats and w.d.bad_messages == 0
    assert core.stats["steal_requests"] == 2 and core.steals   # asked again (the next round)
    core.check_invariants()


def test_a_large_config_goes_to_the_worker_as_a_frame_of_its_own():
    """A const of 256 KiB is not packed into the COMPUTE body (a copy on the server and
    one more on the worker): its row names a frame; the worker's rows have it back."""
    from loomctl.worker.executors import execute
    from loomctl.worker.taskqueue import TaskSpec
    w = Wire()
    w.worker()
    c = w.client()
    big = bytes(range(256)) * 1024
    w.submit(c, [tasks.merge([tasks.const(big), tasks.const("small")])])
    computes = [m for m in w.out[b"w1"] if m[0] == P.COMPUTE]
    rows = [row for _, body, _ in computes for row in body["tasks"]]
    blobs = [b for _, _, frames in computes for b in frames]
    assert sorted(type(row[2]).__name__ for row in rows) == ["bytes", "bytes", "int"]
    assert [bytes(b) for b in blobs] == [big]
    specs = [TaskSpec.from_wire(row) for _, body, frames in computes for row in P.compute_rows(body, frames)]
    assert sorted(bytes(s.config) for s in specs if s.symbol == S.CONST) == sorted([big, b"small"])
    (view,) = [s.config for s in specs if type(s.config) is not bytes]   # the big one: a view of its frame
    assert view.readonly and np.shares_memory(np.frombuffer(view, np.uint8), np.frombuffer(blobs[0], np.uint8))
    value = execute(S.CONST, view, [], None)
    assert value.read_range(1, 4) == big[1:4] and type(value.read_range(1, 4)) is bytes
    assert value.read() == big and type(value.read()) is bytes
    other = TaskSpec.from_wire([7, S.MERGE, view, [], 0])   # any other task's config is bytes
    assert type(other.config) is bytes and other.config == big


def test_a_compute_row_naming_a_frame_that_is_not_there_fails_only_that_task():
    from loomctl.worker.taskqueue import TaskSpec
    body = {"tasks": [[1, S.CONST, 3, [], 0], [2, S.CONST, b"ok", [], 0]]}
    first, second = P.compute_rows(body, [b"only one frame"])
    with pytest.raises(P.ProtocolError, match="config is not bytes"):
        TaskSpec.from_wire(first)
    assert TaskSpec.from_wire(second).config == b"ok"


def test_the_per_thread_packer_packs_as_msgpack_does_in_every_thread_and_after_a_refusal():
    """protocol.packb keeps one Packer per thread (msgpack.packb made one, with its 256 KiB
    buffer, per message: an mmap and a munmap each under the server's fixed threshold)."""
    import threading

    import msgpack
    body = {"req": 7, "ids": P.ids_to_bytes([1, 2, 3]), "name": "w", "nested": [1.5, None, {"k": b"v"}]}
    assert P.packb(body) == msgpack.packb(body, use_bin_type=True)
    with pytest.raises(TypeError):
        P.packb({"x": object()})                     # a half-packed message is dropped...
    assert P.packb(body) == msgpack.packb(body, use_bin_type=True)   # ...not sent with the next
    out = []
    threads = [threading.Thread(target=lambda i=i: out.append(all(
        P.packb({"i": i, "n": n}) == msgpack.packb({"i": i, "n": n}) for n in range(2000)))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [True] * 4
