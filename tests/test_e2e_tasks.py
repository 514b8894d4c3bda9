"""End to end: every task type through the Python client, against real server and
worker processes on 127.0.0.1 (two workers with two cpus each)."""

import os

import pytest

from graphfmt import tasks
from loomctl.client import LoomError, TaskFailed
from cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("e2e"), workers=2, cpus=2)
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    with cluster.client() as c:
        yield c


def test_hello_world(client):
    t = tasks.merge((tasks.const("Hello "), tasks.const("world!")))
    assert client.submit_one(t).gather() == b"Hello world!"


def test_large_consts_and_python_functions_go_as_frames_of_their_own_and_arrive_whole(client):
    # configs above messages.LARGE_CONFIG travel as COMPUTE frames, received without a
    # copy (loomctl.frames); split, sliced and processed on both workers
    data = bytes(range(11, 256)) * 12289 + b"\n" + os.urandom(1 << 20).replace(b"\n", b"_")
    big = b"k" * (200 << 10)

    @tasks.py_task()
    def tagged(piece):
        return piece.read() + big[:3]
    lines = tasks.split(tasks.const(data))
    out = client.submit([tasks.merge([tagged(tasks.get(lines, i)) for i in range(2)]), tasks.const(big)])
    first, rest = data.split(b"\n", 1)
    assert client.gather(out) == [first + b"\n" + b"kkk" + rest + b"kkk", big]


def test_what_is_no_task_cannot_be_submitted_and_says_why(client):
    future = client.submit(tasks.const("x"))
    with pytest.raises(LoomError, match="a future cannot be submitted"):
        client.submit([tasks.const("y"), future])
    with pytest.raises(LoomError, match="cannot submit a str; expected Task objects"):
        client.submit([tasks.const("y"), "y"])
    assert future.gather() == b"x"


def test_data_tasks(client, tmp_path):
    text = tmp_path / "in.txt"
    text.write_bytes(b"A\nBB\nCCC")
    f = tasks.open(str(text))
    parts = tasks.split(f)
    results = client.submit([
        tasks.merge((tasks.const("a"), tasks.const("b"), tasks.const("c")), "--"),
        tasks.merge(()),
        f,
        tasks.get(parts, 1),
        tasks.slice(parts, 1, 10),
        tasks.slice(parts, 2, 1),
        tasks.size(f), tasks.length(parts),
        tasks.array_make((tasks.const("x"), tasks.array_make((tasks.const("y"),)))),
        tasks.get(tasks.array_make((tasks.const("p"), tasks.const("q"))), 1),
        tasks.split(tasks.const("1,2,3"), ","),
    ])
    values = client.gather(results)
    assert values[0] == b"a--b--c" and values[1] == b"" and values[2] == b"A\nBB\nCCC"
    assert values[3] == b"BB\n" and values[4] == b"BB\nCCC" and values[5] == b""
    assert int.from_bytes(values[6], "little") == 8 and int.from_bytes(values[7], "little") == 3
    assert values[8] == [b"x", [b"y"]] and values[9] == b"q"
    assert values[10] == b"1,2,3"


def test_save_writes_and_fails_on_a_directory(client, tmp_path):
    target = tmp_path / "out.txt"
    client.submit_one(tasks.save(tasks.const("saved"), str(target))).gather()
    assert target.read_bytes() == b"saved"
    with pytest.raises(TaskFailed) as failure:
        client.submit_one(tasks.save(tasks.const("x"), str(tmp_path))).gather()
    assert failure.value.worker and failure.value.error_msg


def test_errors_of_data_tasks(client, tmp_path):
    with pytest.raises(TaskFailed, match="range"):
        client.submit_one(tasks.get(tasks.array_make((tasks.const("a"),)), 5)).gather()
    with pytest.raises(TaskFailed):
        client.submit_one(tasks.open(str(tmp_path / "missing"))).gather()
    with pytest.raises(TaskFailed, match="not absolute"):   # refused at submit, as the task's error
        client.submit_one(tasks.save(tasks.const("x"), "relative.txt"))


def test_run_mappings(client):
    data = tasks.const("hello\nworld\n")
    assert client.submit_one(tasks.run("wc -l", [(data, None)])).gather().split() == [b"2"]
    files = tasks.run(["sh", "-c", "cat a b > out1; echo $X > out2; echo done"],
                      [(tasks.const("A"), "a"), (tasks.const("B"), "b"), (tasks.const("v"), "$X")],
                      outputs=["out1", "out2", None])
    assert client.submit_one(files).gather() == [b"AB", b"v\n", b"done\n"]
    unknown = tasks.run("echo $UNKNOWN-x $X", [(tasks.const("v"), "$X")])
    assert client.submit_one(unknown).gather() == b"$UNKNOWN-x v\n"
    args = tasks.run("echo pre$Xpost $X", [(tasks.const("mid"), "$X")])
    assert client.submit_one(args).gather() == b"premidpost mid\n"


def test_run_failures_carry_status_and_stderr(client):
    with pytest.raises(TaskFailed) as failure:
        client.submit_one(tasks.run(["sh", "-c", "echo oops >&2; exit 3"])).gather()
    assert "3" in failure.value.error_msg and "oops" in failure.value.error_msg
    with pytest.raises(TaskFailed, match="missing-output"):
        client.submit_one(tasks.run("true", outputs=["missing-output"])).gather()
    with pytest.raises(TaskFailed):
        client.submit_one(tasks.run("/nonexistent/program")).gather()


def test_python_tasks(client):
    @tasks.py_task()
    def concat(a, b):
        return a.read() + b.read()

    @tasks.py_task(context=True, n_direct_args=1)
    def scaled(ctx, factor, a):
        ctx.log_info("scaling")
        return ctx.wrap(int(a.read()) * factor)

    @tasks.py_task()
    def add_one(obj):
        return str(obj.unwrap() + 1)

    @tasks.py_task()
    def redirect(a):
        return tasks.merge((a, tasks.const("+sub")))

    value = tasks.py_value({"k": [1, 2]})
    results = client.submit([concat(tasks.const("x"), tasks.const("y")),
                             add_one(scaled(3, tasks.const("7"))),
                             value,
                             redirect(tasks.const("base")),
                             tasks.py_call(lambda *xs: [x.read() for x in xs], [tasks.const("p"), tasks.const("q")])])
    assert client.gather(results) == [b"xy", b"22", {"k": [1, 2]}, b"base+sub", [b"p", b"q"]]


def test_python_task_exception_has_traceback(client):
    @tasks.py_task()
    def broken():
        raise ValueError("bad value here")
    with pytest.raises(TaskFailed) as failure:
        client.submit_one(broken()).gather()
    assert "ValueError" in failure.value.error_msg and "bad value here" in failure.value.error_msg


def test_python_tasks_run_in_processes_of_their_worker(client):
    @tasks.py_task()
    def where():
        import os
        import time
        time.sleep(0.3)   # long enough for both to run at once, on the worker's two cpus
        print("printed output goes to the worker's log, not into the result")
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().replace(b"\0", b" ")
        return f"{os.getpid()} {os.getppid()} {b'worker start' in parent}"

    answers = [r.decode().split() for r in client.gather(client.submit([where(), where()]))]
    for pid, parent, parent_is_worker in answers:
        assert pid != parent and parent_is_worker == "True"


def test_python_task_whose_process_dies_fails_alone(client):
    @tasks.py_task()
    def dies():
        import os
        os._exit(7)

    @tasks.py_task()
    def fine():
        return "still fine"

    with pytest.raises(TaskFailed) as failure:
        client.submit_one(dies()).gather()
    assert "exited with status 7" in failure.value.error_msg
    assert client.gather(client.submit([fine(), fine(), fine()])) == [b"still fine"] * 3


def test_python_task_result_that_cannot_leave_its_process(client):
    @tasks.py_task(context=True)
    def lock(ctx):
        import threading
        return ctx.wrap(threading.Lock())

    with pytest.raises(TaskFailed) as failure:
        client.submit_one(lock()).gather()
    assert "picklable" in failure.value.error_msg


def test_dslice_and_dget(client):
    lines = tasks.split(tasks.const("".join(f"{i}\n" for i in range(40))))

    @tasks.py_task()
    def count(piece):
        return str(piece.read().count(b"\n"))

    sliced = tasks.array_make((count(tasks.dslice(lines)),))
    got = tasks.array_make((tasks.run("cat", [(tasks.dget(lines), None)]),))
    sliced_value, got_value = client.gather(client.submit([sliced, got]))
    assert sum(int(x) for x in sliced_value) == 40 and len(sliced_value) > 1
    assert got_value == [f"{i}\n".encode() for i in range(40)]


def test_futures_as_inputs_then_nothing_left(client, cluster):
    baseline = client.get_stats()["n_data_objects"]   # 0 unless an earlier test failed
    a = client.submit_one(tasks.const("abc"))
    b = client.submit_one(tasks.merge((a, tasks.const("!"), a)))
    assert b.gather() == b"abc!abc"
    assert a.fetch() == b"abc"
    a.release()
    with pytest.raises(LoomError):
        client.submit_one(tasks.merge((a,)))
    with pytest.raises(LoomError):
        client.submit(a)
    assert client.get_stats()["n_data_objects"] == baseline


def test_failed_job_then_next_job_runs(client):
    baseline = client.get_stats()["n_data_objects"]
    with pytest.raises(TaskFailed):
        client.submit_one(tasks.merge((tasks.const("a"), tasks.run("false")))).gather()
    assert client.submit_one(tasks.const("fine")).gather() == b"fine"
    assert client.get_stats()["n_data_objects"] == baseline


def test_as_completed_and_shared_subgraph(client):
    shared = tasks.run(["sh", "-c", "echo $$"])
    futures = client.submit([tasks.merge((shared, shared)), shared])
    done = list(client.as_completed(futures))
    assert sorted(f.task_id for f in done) == sorted(f.task_id for f in futures)
    pair, single = client.gather(futures)
    assert pair == single * 2   # computed once within one submission


def test_resource_requests_never_overlap(client, tmp_path):
    stamp = 'python3 -c "import time; print(time.time())"'
    jobs = []
    for k in range(4):
        t = tasks.run(["sh", "-c", f"{stamp}; sleep 0.3; {stamp}"])
        t.resource_request = tasks.cpus(2)
        jobs.append(t)
    spans = []
    for value in client.gather(client.submit(jobs)):
        start, end = map(float, value.split())
        spans.append((start, end))
    spans.sort()
    # per worker at most one 2-cpu task at a time: with two workers, never 3 overlapping
    for i in range(len(spans) - 2):
        assert spans[i + 2][0] >= spans[i][1] - 0.01
    too_big = tasks.run("true")
    too_big.resource_request = tasks.cpus(3)
    with pytest.raises(TaskFailed, match="requests 3 cpus"):
        client.submit_one(too_big).gather()


def test_two_clients_at_once(cluster):
    with cluster.client() as c1, cluster.client() as c2:
        f1 = c1.submit([tasks.run(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(4)])
        f2 = c2.submit([tasks.run(["sh", "-c", f"sleep 0.2; echo {i + 10}"]) for i in range(4)])
        assert c2.gather(f2) == [f"{i + 10}\n".encode() for i in range(4)]
        assert c1.gather(f1) == [f"{i}\n".encode() for i in range(4)]


def test_data_moves_worker_to_worker_not_through_the_server(client):
    before = client.get_stats()
    big = [tasks.run(["python3", "-c", "import sys; sys.stdout.write('x' * 3_000_000)"]) for _ in range(4)]
    total = tasks.size(tasks.merge(big))
    value = client.submit_one(total).gather()
    assert int.from_bytes(value, "little") == 12_000_000
    after = client.get_stats()
    assert after["transfers"] > before["transfers"]                    # data did move between workers
    assert after["bytes_received"] - before["bytes_received"] < 200_000   # but not through the server


def test_checkpoint_written_atomically(client, tmp_path):
    path = tmp_path / "ckpt.bin"
    t = tasks.run(["sh", "-c", "echo computed"])
    t.checkpoint_path = str(path)
    assert client.submit_one(t).gather() == b"computed\n"
    assert path.read_bytes() == b"computed\n"
    assert os.listdir(tmp_path) == ["ckpt.bin"]   # no temporary file left
    # with load=True the file is taken instead of running the task
    path.write_bytes(b"from checkpoint")
    t2 = tasks.run(["sh", "-c", "echo computed"])
    t2.checkpoint_path = str(path)
    assert client.submit_one(tasks.merge((t2,)), load=True).gather() == b"from checkpoint"


def test_small_results_come_with_the_notice_large_ones_from_the_worker(cluster):
    from loomctl import protocol as P
    with cluster.client() as c:
        small = c.submit([tasks.const("s" * 100), tasks.py_value(42),
                          tasks.array_make([tasks.const("a"), tasks.const("b")])])
        assert c.gather(small) == [b"s" * 100, 42, [b"a", b"b"]]
        assert all(f.inline is not None for f in small)
        assert len(c.links) == 0   # no worker was asked for data
        others = c.submit([tasks.const("b" * (P.INLINE_BYTES + 1)),   # too big
                           tasks.py_value({"k": [1, 2]})])   # its size says nothing of its contents
        assert c.gather(others) == [b"b" * (P.INLINE_BYTES + 1), {"k": [1, 2]}]
        assert [f.inline for f in others] == [None, None] and len(c.links) >= 1


def test_jobs_done_with_are_retired_so_a_long_running_server_does_not_grow(cluster):
    import time
    with cluster.client() as c:
        retired = c.get_stats()["retired_jobs"]
        futures = [c.submit_one(tasks.const(str(i))) for i in range(300)]
        assert c.gather(futures) == [str(i).encode() for i in range(300)]
        kept = c.submit_one(tasks.const("kept"))
        kept.wait()
        deadline = time.time() + 10
        while c.get_stats()["retired_jobs"] < retired + 300 and time.time() < deadline:
            time.sleep(0.2)
        stats = c.get_stats()
        assert stats["retired_jobs"] >= retired + 300 and stats["n_jobs"] >= 1   # not the held one
        assert c.job_progress(futures[0].job)["status"] == "finished"   # a status row remains
        assert kept.gather() == b"kept"
        assert c.submit_one(tasks.merge([tasks.const("still "), tasks.const("fine")])).gather() == b"still fine"


def test_workers_link_to_each_other_when_they_join_before_any_job(tmp_path):
    """PEERS: each worker of a small cluster opens its data link to the others at once,
    so that the first job's first fetch does not wait for a handshake."""
    from test_reliability import wait_until
    c = Cluster(tmp_path, workers=3, cpus=1)
    try:
        with c.client() as client:
            # (each worker's data socket has a connection from each other worker; its
            # heartbeats say how many)
            workers = wait_until(lambda: (lambda ws: ws if len(ws) == 3 and all(
                (w.get("data_connections") or 0) >= 2 for w in ws) else None)(client.status()["workers"]), 30)
            assert client.get_stats()["n_tasks"] == 0 and len(workers) == 3
            leaves = [tasks.const(b"%d" % i) for i in range(64)]
            assert client.gather([client.submit_one(tasks.merge(leaves))]) == [b"".join(b"%d" % i for i in range(64))]
    finally:
        c.stop()
