"""The worker: queue/resource accounting, fetch batching and redirect conversion without
sockets; then real Worker threads against an in-test server on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from graphfmt.graph import FLAG_RESULT
from loomctl import protocol as P
from loomctl.cli.output import CliError
from loomctl.cli.worker import parse_resources, parse_size
from loomctl.worker import data
from loomctl.worker.data import Plain, PyObj
from loomctl.worker.executors import WrappedData
from loomctl.worker.fetchplan import FetchPlan
from loomctl.worker.process import Worker, run_worker, split_address
from loomctl.worker.redirect import redirect_graph_bytes
from loomctl.worker.running import run_task
from loomctl.worker.taskqueue import TaskQueue, TaskSpec


def spec(tid, inputs=(), cpus=0, symbol=S.CONST, **resources):
    return TaskSpec(tid, symbol, b"", list(inputs), cpus, resources)


def started(q):
    out = [s.id for s in q.take_startable()]
    q.check_invariants()
    return out


# ---------------------------------------------------------------- TaskQueue


def test_two_cpu_tasks_never_overlap_on_two_cpus():
    q = TaskQueue(cpus=2)
    fetch, failed = q.assign([spec(1, cpus=2), spec(2, cpus=2), spec(3, cpus=1)], set(), {})
    assert fetch == [] and failed == []
    assert started(q) == [1]
    assert started(q) == []          # nothing fits while 1 runs
    assert q.finished(1) == []
    assert started(q) == [2]
    q.finished(2)
    assert started(q) == [3]
    q.finished(3)
    q.check_invariants()
    assert q.free_cpus == 2


def test_first_fit_in_arrival_order_and_light_tasks_always_start():
    q = TaskQueue(cpus=3)
    q.assign([spec(1, cpus=2), spec(2, cpus=2), spec(3, cpus=1), spec(4), spec(5, cpus=1)], set(), {})
    assert started(q) == [1, 3, 4]   # 2 does not fit, 3 does; light 4 always; 5 waits
    q.finished(3)
    assert started(q) == [5]
    q.finished(1)
    assert started(q) == [2]


def test_light_tasks_start_when_cpus_are_all_taken():
    q = TaskQueue(cpus=1)
    q.assign([spec(1, cpus=1), spec(2, cpus=1), spec(3), spec(4, cpus=1), spec(5)], set(), {})
    assert started(q) == [1, 3, 5]
    q.finished(1)
    assert started(q) == [2]


def test_task_bigger_than_the_worker_fails_instead_of_waiting():
    q = TaskQueue(cpus=2, resources={"gpu": 1})
    _, failed = q.assign([spec(1, cpus=3), spec(2, cpus=1, gpu=2), spec(3, cpus=1, fpga=1),
                          spec(4, cpus=1, gpu=1)], set(), {})
    assert [t for t, _ in failed] == [1, 2, 3]
    assert "requests 3 cpus but this worker has only 2" in failed[0][1]
    assert "'gpu'" in failed[1][1] and "'fpga'" in failed[2][1]
    assert started(q) == [4]


def test_named_resources_are_accounted():
    q = TaskQueue(cpus=4, resources={"gpu": 1})
    q.assign([spec(1, cpus=1, gpu=1), spec(2, cpus=1, gpu=1), spec(3, cpus=1)], set(), {})
    assert started(q) == [1, 3]
    q.finished(1)
    assert started(q) == [2]


def test_inputs_gate_the_start_and_fetches_are_requested_once():
    q = TaskQueue(cpus=1)
    have = {10}
    fetch, failed = q.assign([spec(1, [10, 11, 11], cpus=1), spec(2, [11, 12])], have,
                             {11: "tcp://a:1", 12: "tcp://b:2"})
    assert failed == [] and fetch == [(11, "tcp://a:1"), (12, "tcp://b:2")]
    assert started(q) == []
    q.inputs_arrived([11])
    assert started(q) == [1]
    q.inputs_arrived([12])
    assert started(q) == [2]


def test_tasks_start_in_the_order_received_among_ready_ones():
    q = TaskQueue(cpus=1)
    q.assign([spec(1, [7], cpus=1), spec(2, [8], cpus=1)], set(), {7: "tcp://a:1", 8: "tcp://a:1"})
    q.inputs_arrived([8])
    q.inputs_arrived([7])
    assert started(q) == [1]
    q.finished(1)
    assert started(q) == [2]


def test_unavailable_input_fails_its_waiters_only():
    q = TaskQueue(cpus=1)
    q.assign([spec(1, [7, 8]), spec(2, [8]), spec(3, [9])], set(),
             {7: "tcp://a:1", 8: "tcp://a:1", 9: "tcp://b:1"})
    failed = q.inputs_unavailable([7], "peer gone")
    assert failed == [(1, "input 7 is unavailable: peer gone")]
    q.check_invariants()
    q.inputs_arrived([8, 9])
    assert started(q) == [2, 3]


def test_input_with_no_location_fails_unless_produced_here():
    q = TaskQueue(cpus=1)
    _, failed = q.assign([spec(1, [5])], set(), {})
    assert failed and "no location" in failed[0][1]
    q.assign([spec(5, cpus=1), spec(6, [5])], set(), {})
    assert started(q) == [5]
    assert q.finished(5, ok=True) == []
    assert started(q) == [6]
    q.assign([spec(8, cpus=1), spec(9, [8])], set(), {})
    assert started(q) == [8]
    assert [t for t, _ in q.finished(8, ok=False)] == [9]


def test_duplicate_assignment_is_ignored():
    q = TaskQueue(cpus=1)
    q.assign([spec(1, cpus=1)], set(), {})
    q.assign([spec(1, cpus=1)], set(), {})
    assert started(q) == [1]
    q.assign([spec(1, cpus=1)], set(), {})
    assert started(q) == []


def test_taskspec_from_wire_checks_fields():
    s = TaskSpec.from_wire([3, S.RUN, b"cfg", [1, 2], 1, {"gpu": 1}, "/tmp/x", "lab"])
    assert (s.id, s.inputs, s.cpus, s.resources, s.checkpoint, s.label) == (3, [1, 2], 1, {"gpu": 1}, "/tmp/x", "lab")
    assert TaskSpec.from_wire([0, S.CONST, b"", [], 0]).resources == {}
    for bad in ([], [1, 2, 3], ["x", S.CONST, b"", [], 0], [1, S.CONST, b"", ["a"], 0],
                [1, S.CONST, b"", [], -1], [1, S.CONST, b"", [], 0, {"gpu": "x"}]):
        with pytest.raises(P.ProtocolError):
            TaskSpec.from_wire(bad)


# ---------------------------------------------------------------- FetchPlan


def test_fetch_requests_are_batched_per_peer():
    plan = FetchPlan()
    for i, addr in [(1, "A"), (2, "B"), (3, "A"), (4, "A")]:
        plan.want(i, addr)
    out = plan.take(now=0.0, can_send=lambda a: a == "A")
    assert [(a, ids) for a, _, ids in out] == [("A", [1, 3, 4])]
    assert plan.take(now=0.0, can_send=lambda a: a == "A") == []
    plan.want(5, "A")
    (a1, req1, _), = [r for r in out]
    second = plan.take(now=1.0)
    assert sorted((a, ids) for a, _, ids in second) == [("A", [5]), ("B", [2])]
    assert plan.answered(req1, "B") is None          # answered by the wrong peer
    assert plan.answered(req1, "A") == ("A", [1, 3, 4])
    assert plan.answered(req1, "A") is None
    assert [(a, ids) for a, ids in plan.expired(now=100.0, timeout=10.0)] in (
        [("A", [5]), ("B", [2])], [("B", [2]), ("A", [5])])
    plan.want(6, "C")
    plan.take(now=0.0)
    plan.want(7, "C")
    assert sorted(plan.give_up("C")) == [6, 7]
    assert plan.addresses() == set()


# ---------------------------------------------------------------- redirect


def test_redirect_maps_inputs_and_wrapped_objects():
    a, b = WrappedData(Plain(b"a"), 1), WrappedData(Plain(b"b"), 2)
    made = WrappedData(PyObj({"k": 1}))
    root = tasks.merge([a, tasks.const("x"), b, a, tasks.py_call(len, [made])])
    graph = graphfmt.read(redirect_graph_bytes(root))
    names = [graph.symbols[c] for c in graph.types]
    assert names.count(S.TASK_INPUT) == 2
    inputs = {S.decode_u64(graph.configs[i]) for i, n in enumerate(names) if n == S.TASK_INPUT}
    assert inputs == {1, 2}
    assert S.PY_VALUE in names
    results = np.flatnonzero(graph.flags & FLAG_RESULT).tolist()
    assert results == [len(names) - 1] and names[-1] == S.MERGE


def test_redirect_outcome_from_py_call(tmp_path):
    import cloudpickle

    def fn(x):
        return tasks.run("cat", stdin=x)

    s = TaskSpec(1, S.PY_CALL, cloudpickle.dumps(((), False)), [0, 1], 1)
    out = run_task(s, [PyObj(fn), Plain(b"hi")], str(tmp_path), False)
    assert out.error is None and out.result is None
    graph = graphfmt.read(out.redirect)
    assert sorted(graph.symbols) == sorted([S.TASK_INPUT, S.RUN])


def test_checkpoint_is_written_and_a_failed_write_fails_the_task(tmp_path):
    target = tmp_path / "ck.bin"
    s = TaskSpec(1, S.CONST, b"data", [], 0, {}, str(target))
    out = run_task(s, [], str(tmp_path), False)
    assert out.error is None and target.read_bytes() == b"data"
    s = TaskSpec(2, S.CONST, b"data", [], 0, {}, str(tmp_path / "no" / "dir" / "ck"))
    out = run_task(s, [], str(tmp_path), False)
    assert out.result is None and "cannot write checkpoint" in out.error
    assert os.listdir(tmp_path) == ["ck.bin"]


# ---------------------------------------------------------------- with sockets


class FakeServer:
    """A ROUTER on 127.0.0.1 that plays the server for worker threads."""

    def __init__(self, secret=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.gate = P.Gatekeeper(secret)
        self.secret = secret
        self.workers = {}      # identity -> REGISTER body
        self.inbox = []        # (identity, kind, body)
        self.threads = []

    def start_worker(self, **kw):
        box = {}
        kw.setdefault("cpus", 2)

        def target():
            box["reason"] = run_worker(self.address, self.secret, work_dir=kw.pop("work_dir"),
                                       resources={}, name=None, extensions=[], keep_failed_dirs=False,
                                       host="127.0.0.1", heartbeat_s=0.2, **kw)
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append((thread, box))
        return thread, box

    def poll(self, timeout=5.0):
        """Serve the handshake and REGISTER; return the next other message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            identity, *frames = self.sock.recv_multipart()
            kind, body, blobs = P.decode(frames)
            admitted, reply = self.gate.handle(identity, kind, body)
            if reply:
                self.sock.send_multipart([identity, *reply])
            if not admitted:
                continue
            if kind == P.REGISTER:
                self.workers[identity] = body
                self.sock.send_multipart([identity, *P.encode(P.REPLY, {"worker_id": len(self.workers) - 1})])
                continue
            return identity, kind, body
        raise AssertionError("no message from the worker")

    def wait_registered(self, n):
        while len(self.workers) < n:
            msg = self.poll()
            self.inbox.append(msg)

    def send(self, identity, kind, body):
        self.sock.send_multipart([identity, *P.encode(kind, body)])

    def collect_updates(self, identity, until, timeout=5.0):
        """Merged UPDATE bodies from ``identity`` until ``until(merged)`` holds."""
        heartbeats = []
        merged = {"finished": [], "sizes": [], "lengths": [], "failed": [], "redirects": [],
                  "replicas": [], "logs": [], "heartbeats": heartbeats, "answers": []}
        deadline = time.monotonic() + timeout
        pending, self.inbox = self.inbox, []
        while not until(merged):
            assert time.monotonic() < deadline, merged
            ident, kind, body = pending.pop(0) if pending else self.poll()
            if ident != identity:
                self.inbox.append((ident, kind, body))
                continue
            if kind == P.HEARTBEAT:
                heartbeats.append(body)
            elif kind == P.UPDATE:
                for k in ("finished", "sizes", "lengths", "replicas"):
                    merged[k] += P.ids_from_bytes(body[k]).tolist()
                for k in ("failed", "redirects", "logs"):
                    merged[k] += body[k]
                if "returned" in body:   # the answer to a steal request
                    merged["answers"].append(P.ids_from_bytes(body["returned"]).tolist())
        return merged

    def stop_all(self):
        for identity in self.workers:
            self.send(identity, P.STOP, {})
        for thread, _ in self.threads:
            thread.join(5)
        alive = [t for t, _ in self.threads if t.is_alive()]
        self.sock.close(0)
        self.ctx.term()
        assert not alive, "a worker did not stop"


def fetch(ctx, address, ids, secret=None, handshake=True):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        if handshake:
            P.client_handshake(sock, "peer", secret, timeout_ms=3000)
        sock.send_multipart(P.encode(P.FETCH, {"req": 7, "ids": P.ids_to_bytes(ids)}))
        kind = P.PING
        while kind == P.PING:   # (the worker pings a peer that is slow to answer: not the answer)
            if not sock.poll(5000 if handshake else 300):
                return None
            kind, body, blobs = P.decode(sock.recv_multipart())
        assert kind == P.DATA and body["req"] == 7
        return (P.ids_from_bytes(body["ids"]).tolist(), P.ids_from_bytes(body["missing"]).tolist(),
                [data.decode_parts(parts) for parts in data.data_parts(blobs, body["parts"])])
    finally:
        sock.close(0)


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.stop_all()


def test_worker_computes_reports_serves_and_stops(server, tmp_path):
    work = tmp_path / "work"
    thread, box = server.start_worker(work_dir=str(work))
    server.wait_registered(1)
    (identity, reg), = server.workers.items()
    assert reg["cpus"] == 2 and S.MERGE in reg["symbols"] and reg["data_address"].startswith("tcp://127.0.0.1:")
    assert reg["work_dir"].startswith(str(work))
    run_cfg = S.encode_run(["cat"], [None], [None])
    server.send(identity, P.COMPUTE, {"tasks": [
        [0, S.CONST, b"hello ", [], 0, None, None, None],
        [1, S.CONST, b"world", [], 0, None, None, None],
        [2, S.MERGE, b"", [0, 1], 0, None, None, "merge"],
        [3, S.RUN, run_cfg, [2], 1, None, None, "cat"],
        [4, S.RUN, S.encode_run(["false"], [], [None]), [], 1, None, None, "bad"],
    ], "locations": {}})
    # consumers arrive before their inputs are computed: 2 and 3 wait for local results
    up = server.collect_updates(identity, lambda m: len(m["finished"]) == 4 and m["failed"] and m["heartbeats"])
    sizes = dict(zip(up["finished"], up["sizes"]))
    assert sizes == {0: 6, 1: 5, 2: 11, 3: 11}
    assert [f[0] for f in up["failed"]] == [4] and "exited with status 1" in up["failed"][0][1]
    hb = up["heartbeats"][0]
    assert {"n_data", "data_bytes", "rss", "cpu_percent", "running"} <= set(hb)

    ctx = zmq.Context()
    try:
        found, missing, objs = fetch(ctx, reg["data_address"], [2, 3, 99])
        assert found == [2, 3] and missing == [99]
        assert objs == [Plain(b"hello world"), Plain(b"hello world")]
        assert fetch(ctx, reg["data_address"], [2], handshake=False) is None   # unauthenticated: dropped
        # garbage on the data socket, before and after a handshake, changes nothing
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(reg["data_address"])
        raw.send(b"x")
        raw.send_multipart([b"FETCH", b"\xc1\xc1"])
        P.client_handshake(raw, "peer", None, timeout_ms=3000)
        for body in ({"req": "x"}, {"req": 1, "ids": b"123"}, {"ids": P.ids_to_bytes([2])}):
            raw.send_multipart(P.encode(P.FETCH, body))
        raw.send_multipart(P.encode(P.COMPUTE, {}))
        assert not raw.poll(200), raw.recv_multipart()   # (what came, should it ever)
        raw.close(0)
        assert fetch(ctx, reg["data_address"], [2])[0] == [2]
        # garbage from the server: ignored, or the malformed task fails
        server.sock.send_multipart([identity, b"GARBAGE", b"\xc1"])
        server.send(identity, P.COMPUTE, {"tasks": "nope"})
        server.send(identity, P.COMPUTE, {"tasks": [[50, S.CONST, 123, [], 0], ["bad"]]})
        bad = server.collect_updates(identity, lambda m: m["failed"])
        assert [f[0] for f in bad["failed"]] == [50] and "malformed" in bad["failed"][0][1]
        server.send(identity, P.RELEASE_DATA, {"ids": P.ids_to_bytes([2, 1234])})
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if fetch(ctx, reg["data_address"], [2])[1] == [2]:
                break
        else:
            raise AssertionError("released data is still served")
    finally:
        ctx.destroy(0)
    assert thread.is_alive()
    server.send(identity, P.STOP, {})
    thread.join(5)
    assert not thread.is_alive() and box["reason"] == "stop"
    assert not os.path.exists(reg["work_dir"]) and not work.exists()


def test_a_compute_sent_as_columns_runs_its_tasks_and_malformed_columns_are_ignored(server, tmp_path):
    import numpy as np
    from loomctl import messages as M
    server.start_worker(work_dir=str(tmp_path / "work"), cpus=1)
    server.wait_registered(1)
    (identity, reg), = server.workers.items()
    n = 20   # consts 0..19 "c0".."c19", then task 20 merges them all in reverse, labelled
    configs = b"".join(b"c%d" % i for i in range(n))
    ends = np.cumsum([len(b"c%d" % i) for i in range(n)] + [0])
    cols = M.ComputeColumns(np.arange(n + 1), [S.CONST, S.MERGE], np.array([0] * n + [1], np.uint16), configs,
                            np.concatenate([[0], ends[:-1]]), ends, np.arange(n)[::-1].copy(),
                            np.array([0] * n + [n]), np.zeros(n + 1, np.int64), np.array([0] * n + [2], np.uint8),
                            labels={n: "all"})
    target, frames = P.encode_command(M.Compute(identity, cols, {}, np.ones(n + 1, np.int64)))
    server.sock.send_multipart([target, *frames])
    up = server.collect_updates(identity, lambda m: len(m["finished"]) == n + 1)
    assert dict(zip(up["finished"], up["sizes"]))[n] == len(configs) and not up["failed"]
    ctx = zmq.Context()
    try:
        found, _, objs = fetch(ctx, reg["data_address"], [n, 3])
        assert found == [n, 3] and objs == [Plain(b"".join(b"c%d" % i for i in reversed(range(n)))), Plain(b"c3")]
        body = P.decode(frames)[1]
        for broken in ({**body["columns"], "flags": b"\x00"}, {**body["columns"], "input_ends": b"\x01"},
                       {**body["columns"], "symbol": b"\x05\x00" * (n + 1)}, "nope"):
            server.send(identity, P.COMPUTE, {**body, "columns": broken})
        server.send(identity, P.COMPUTE, {"tasks": [[99, S.CONST, b"after", [], 0]], "locations": {}})
        up = server.collect_updates(identity, lambda m: 99 in m["finished"])
        assert up["finished"] == [99] and not up["failed"]   # (nothing of the broken ones ran)
    finally:
        ctx.destroy(0)


def test_worker_gives_back_queued_tasks_and_ignores_malformed_steal_requests(server, tmp_path):
    gate = tmp_path / "go"
    server.start_worker(work_dir=str(tmp_path / "work"), cpus=1)
    server.wait_registered(1)
    (identity, _), = server.workers.items()
    wait = S.encode_run(["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"], [], [None])
    server.send(identity, P.COMPUTE, {"tasks": [[t, S.RUN, wait, [], 1, None, None, None] for t in range(4)],
                                      "locations": {}})
    server.collect_updates(identity, lambda m: any(h["running"] for h in m["heartbeats"]))   # 0 runs
    for body in ({"ids": b"123", "count": 1}, {"ids": P.ids_to_bytes([1])}, {"ids": P.ids_to_bytes([1]), "count": -1},
                 {"ids": P.ids_to_bytes([1]), "count": "2"}, {"count": 1}):
        server.send(identity, P.STEAL_TASKS, body)   # malformed: ignored, not answered
    server.send(identity, P.STEAL_TASKS, {"ids": P.ids_to_bytes([0, 1, 2, 3, 77]), "count": 2})
    up = server.collect_updates(identity, lambda m: m["answers"])
    assert up["answers"] == [[3, 2]]
    server.send(identity, P.STEAL_TASKS, {"ids": P.ids_to_bytes([0]), "count": 1})   # running: none
    assert server.collect_updates(identity, lambda m: m["answers"])["answers"] == [[]]
    gate.touch()
    up = server.collect_updates(identity, lambda m: len(m["finished"]) == 2)
    assert sorted(up["finished"]) == [0, 1] and not up["failed"]


def test_workers_fetch_from_each_other_with_authentication(tmp_path):
    secret = P.new_secret()
    server = FakeServer(secret)
    try:
        server.start_worker(work_dir=str(tmp_path / "a"))
        server.start_worker(work_dir=str(tmp_path / "b"), cpus=1)
        server.wait_registered(2)
        (ida, rega), (idb, regb) = server.workers.items()
        server.send(ida, P.COMPUTE, {"tasks": [[0, S.CONST, b"abc", [], 0, None, None, None],
                                               [1, S.CONST, b"de", [], 0, None, None, None]],
                                     "locations": {}})
        server.collect_updates(ida, lambda m: len(m["finished"]) == 2)
        server.send(idb, P.COMPUTE, {"tasks": [
            [2, S.MERGE, b"-", [0, 1], 0, None, None, None],
            [3, S.SIZE, b"", [0], 0, None, None, None],
            [4, S.CONST, b"", [77], 0, None, None, None]],
            "locations": {0: rega["data_address"], 1: rega["data_address"], 77: rega["data_address"]}})
        up = server.collect_updates(idb, lambda m: len(m["finished"]) == 2 and m["failed"])
        assert sorted(up["replicas"]) == [0, 1]
        assert dict(zip(up["finished"], up["sizes"])) == {2: 6, 3: 8}
        assert up["failed"][0][0] == 4 and "does not hold it" in up["failed"][0][1]
        ctx = zmq.Context()
        try:
            assert fetch(ctx, regb["data_address"], [2], secret=secret)[2] == [Plain(b"abc-de")]
            with pytest.raises(ConnectionError):
                fetch(ctx, regb["data_address"], [2], secret=P.new_secret())
        finally:
            ctx.destroy(0)
    finally:
        server.stop_all()


def test_worker_stops_when_the_server_is_gone(tmp_path):
    server = FakeServer()
    thread, box = server.start_worker(work_dir=str(tmp_path / "w"), server_grace_s=0.5)
    server.wait_registered(1)
    server.sock.close(0)
    thread.join(5)
    server.ctx.term()
    assert not thread.is_alive() and box["reason"] == "server lost"


def test_unreachable_server_is_a_connection_error(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")   # bound, never answers
    try:
        w = Worker(f"127.0.0.1:{port}", None, 1, str(tmp_path / "w"), connect_timeout_s=0.3)
        with pytest.raises(ConnectionError, match="no answer"):
            w.start()
        assert not (tmp_path / "w").exists()
    finally:
        sock.close(0)
        ctx.term()


def test_split_address():
    assert split_address("tcp://h.example:123") == ("h.example", 123)
    assert split_address("10.0.0.1:9") == ("10.0.0.1", 9)
    with pytest.raises(ValueError):
        split_address("nohost")


# ---------------------------------------------------------------- command line


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runs `loomctl worker ...` whether or not the sub-app is registered in loomctl.cli yet
CLI = ("from loomctl.cli import app, main\n"
       "from loomctl.cli.worker import app as worker\n"
       "if not any(g.name == 'worker' for g in app.registered_groups):\n"
       "    app.add_typer(worker, name='worker')\n"
       "main()\n")


def worker_cli(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.Popen([sys.executable, "-c", CLI, "worker", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_cli_option_parsing():
    assert parse_size("4G") == 4 << 30 and parse_size("512m") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("1000") == 1000
    assert parse_resources(["gpu=2", "mem=0"]) == {"gpu": 2, "mem": 0}
    for bad in (lambda: parse_size("lots"), lambda: parse_resources(["gpu"]),
                lambda: parse_resources(["gpu=-1"])):
        with pytest.raises(CliError):
            bad()


def test_cli_without_server_is_one_line_and_unavailable(tmp_path):
    proc = worker_cli("start", "--server-dir", str(tmp_path))
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 4, err
    assert err.decode().startswith("loomctl: error: no server access file") and err.count(b"\n") == 1


def test_cli_worker_registers_and_exits_cleanly_on_sigterm(tmp_path):
    server = FakeServer()
    proc = worker_cli("start", f"127.0.0.1:{server.port}", "--cpus", "1", "--resource", "gpu=2",
                      "--memory-limit", "1G", "--name", "w1", "--work-dir", str(tmp_path / "w"), "--verbose",
                      env={"LOOM_SERVER_DIR": str(tmp_path / "none")})
    try:
        server.wait_registered(1)
        (reg,) = server.workers.values()
        assert (reg["name"], reg["cpus"], reg["resources"], reg["memory_limit"]) == ("w1", 1, {"gpu": 2}, 1 << 30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert b"registered as worker 0" in err and not (tmp_path / "w").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.sock.close(0)
        server.ctx.term()


def test_rss_follows_the_memory_this_process_touches_and_a_forked_child_reads_its_own():
    from loomctl.worker.hostinfo import rss
    before = rss()
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])   # (every page touched)
    assert rss() >= before + (60 << 20)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: its own statm, not the parent's open file
        del block
        os.write(write, str(os.getpid() == int(open("/proc/self/stat").read().split()[0]) and rss() > 0
                            and rss() < before + (60 << 20)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"True"


def test_a_ready_peer_link_silent_while_a_fetch_waits_is_given_up_and_an_idle_one_is_kept():
    """fetch.PeerLinks.expired: a path that died under an open connection (frames
    dropped: the eager links of a small cluster make that the usual case) is noticed
    after SILENT_LINK_S of silence with a FETCH waiting, not after the fetch timeout;
    an idle link is never expired for being quiet."""
    from loomctl.worker import fetch
    ctx = zmq.Context()
    poller = zmq.Poller()
    links = fetch.PeerLinks(ctx, poller, None)
    try:
        now = time.monotonic()
        for address in ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", "tcp://127.0.0.1:3"):
            links.ensure(address, now)
        waiting, idle, handshaking = (links.links[a] for a in ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                                                               "tcp://127.0.0.1:3"))
        waiting.state = idle.state = "ready"   # (as after WELCOME)
        links.send_fetch(waiting.address, 7, [1, 2])
        assert waiting.asked == 1 and not idle.asked
        later = now + fetch.SILENT_LINK_S + 1
        waiting.heard = idle.heard = now
        gone = dict(links.expired(later, timeout=fetch.SILENT_LINK_S + 5))
        assert set(gone) == {waiting.address} and "sent nothing" in gone[waiting.address]
        assert waiting.address not in links.links and idle.address in links.links
        gone = dict(links.expired(now + fetch.SILENT_LINK_S + 10, timeout=fetch.SILENT_LINK_S + 5))
        assert set(gone) == {handshaking.address} and "no answer" in gone[handshaking.address]
        assert set(links.links) == {idle.address}
    finally:
        links.close()
        ctx.term()


def test_an_executor_thread_keeps_no_task_inputs_while_it_waits_for_the_next(tmp_path):
    """A finished task's inputs may leave memory: its thread must not hold them (a large
    input stayed alive until the same thread ran another task)."""
    import queue
    import weakref
    from graphfmt import symbols as S
    from loomctl.worker.data import PyObj
    from loomctl.worker.running import Pool
    from loomctl.worker.taskqueue import TaskSpec

    class Big:
        pass
    big = Big()
    gone = weakref.ref(big)
    outcomes = queue.SimpleQueue()
    pool = Pool(1, "test-exec", outcomes.put)
    try:
        pool.submit(TaskSpec.from_wire([1, S.SIZE, b"", [7], 1]), [PyObj(big)], str(tmp_path), False)
        outcomes.get(timeout=10)
        del big
        deadline = time.monotonic() + 10
        while gone() is not None and time.monotonic() < deadline:   # (the thread drops it right after)
            time.sleep(0.01)
        assert gone() is None
    finally:
        pool.close()


def test_the_spill_thread_keeps_no_object_it_read_back(tmp_path):
    """An object read back from its file is the loop's once handed over: the spill thread
    kept the last one alive until its next job (a 240 MB const read back for its split
    stayed beside the pieces cut from it: 776 MB peak on a 300 MB worker, 535 after)."""
    import queue
    from loomctl.worker.data import Plain
    from loomctl.worker.spill import SpillFiles, SpillThread
    from loomctl.worker.store import SpillRead, SpillWrite
    answers = queue.SimpleQueue()
    spill = SpillThread(SpillFiles(str(tmp_path / "spill")), answers.put)
    try:
        spill.submit(SpillWrite(3, Plain(b"x" * 1000)))
        assert answers.get(timeout=10).error is None
        spill.submit(SpillRead(3))
        loaded = answers.get(timeout=10)
        assert loaded.obj == Plain(b"x" * 1000)
        refs = sys.getrefcount(loaded.obj)   # (the answer holds the object; nothing else may)
        deadline = time.monotonic() + 10
        while sys.getrefcount(loaded.obj) > 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = sys.getrefcount(loaded.obj)   # (the answer's reference, and getrefcount's own)
        assert held == 2, (held, refs)
    finally:
        spill.close()
