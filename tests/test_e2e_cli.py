"""End to end through the command line: server, workers, submit, status, jobs, run."""

import json
import os
import time

import pytest
import zmq

from graphfmt import tasks
from loomctl import protocol as P
from clihelp import final_error, loomctl, one_line_error
from cluster import Cluster

PLAN = """
from graphfmt import tasks
words = tasks.const("a b c d e f g h")
counts = [tasks.run(["sh", "-c", "wc -w"], [(words, None)]) for _ in range(int(params.get("n", "3")))]
results = [tasks.merge(counts, ",")]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cli"), workers=2, cpus=1)
    yield c
    c.stop()


def test_submit_wait_writes_results(cluster, tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    proc = loomctl("submit", tmp_path / "plan.py", "--wait", "-o", "-", "-p", "n=4", env=cluster.env, check=0)
    assert proc.stdout.decode().replace("\n", "") == "8,8,8,8"
    out = tmp_path / "out"
    loomctl("submit", tmp_path / "plan.py", "--wait", "-o", out, env=cluster.env, check=0)
    (result,) = os.listdir(out)
    assert (out / result).read_bytes().replace(b"\n", b"") == b"8,8,8"


def test_submit_without_wait_then_job_commands(cluster, tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    loomctl("build", tmp_path / "plan.py", "-o", tmp_path / "plan.loom", check=0)
    job = loomctl("submit", tmp_path / "plan.loom", "-q", env=cluster.env, check=0).stdout.decode().strip()
    assert job.isdigit()
    results = loomctl("job", "results", job, "--wait", "-o", "-", env=cluster.env, check=0)
    assert results.stdout.replace(b"\n", b"") == b"8,8,8"
    listing = json.loads(loomctl("job", "list", "--json", env=cluster.env, check=0).stdout)
    assert any(j["id"] == int(job) and j["status"] == "finished" for j in listing)
    info = json.loads(loomctl("job", "info", job, "--json", env=cluster.env, check=0).stdout)
    assert info["finished"] == 5 and info["total"] == 5
    loomctl("job", "cancel", job, env=cluster.env, check=0)
    assert "no job 999" in one_line_error(loomctl("job", "results", "999", env=cluster.env))


def test_status_shows_workers_and_jobs(cluster):
    data = json.loads(loomctl("status", "--json", env=cluster.env, check=0).stdout)
    assert len(data["workers"]) == 2 and all(w["cpus"] == 1 for w in data["workers"])
    assert data["server"]["auth"] is True
    text = loomctl("status", env=cluster.env, check=0).stdout.decode()
    assert "worker" in text and "w0" in text and "w1" in text


def test_failing_task_exit_code_and_message(cluster, tmp_path):
    (tmp_path / "bad.py").write_text(
        "from graphfmt import tasks\nt = tasks.run(['sh', '-c', 'echo broken >&2; exit 7'])\n"
        "t.label = 'step:one'\nresults = [t]\n")
    err = final_error(loomctl("submit", tmp_path / "bad.py", "--wait", env=cluster.env), code=1)
    assert "step:one" in err and "broken" in err and "7" in err and "worker w" in err


def test_bad_graph_file_is_refused_without_harm(cluster, tmp_path):
    (tmp_path / "bad.loom").write_bytes(b"\x89LOOMGF\n" + b"\x01\x00")
    assert "truncated" in one_line_error(loomctl("submit", tmp_path / "bad.loom", env=cluster.env))
    assert cluster.stats()["n_workers"] == 2


def test_unauthenticated_peers_are_refused(cluster, tmp_path):
    import graphfmt
    marker = tmp_path / "ran"
    plan = graphfmt.to_bytes(graphfmt.build_graph([tasks.run(["touch", str(marker)])])[0])
    tasks_before = cluster.stats()["n_tasks"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{cluster.access['port']}")
    try:
        with pytest.raises(ConnectionError, match="no secret"):
            P.client_handshake(sock, "client", None, 5000)
        sock2 = ctx.socket(zmq.DEALER)
        sock2.setsockopt(zmq.LINGER, 0)
        sock2.connect(f"tcp://127.0.0.1:{cluster.access['port']}")
        with pytest.raises(ConnectionError, match="refused"):
            P.client_handshake(sock2, "client", "00" * 32, 5000)
        sock2.send_multipart(P.encode(P.SUBMIT, {"req": 1, "graph": plan}))   # after the refusal
        # garbage and a submit without the handshake change nothing
        sock.send_multipart([b"garbage"])
        sock.send_multipart(P.encode(P.SUBMIT, {"req": 1, "graph": plan}))
        time.sleep(0.5)
        sock2.close()
    finally:
        sock.close()
        ctx.term()
    stats = cluster.stats()
    assert stats["refused"] >= 2 and stats["n_workers"] == 2
    assert stats["n_tasks"] == tasks_before and not marker.exists()   # no task was taken, none ran
    assert "wrong secret" in cluster.log("server")
    assert cluster.access["secret"] not in cluster.log("server")
    mode = os.stat(os.path.join(cluster.server_dir, "access.json")).st_mode & 0o777
    assert mode == 0o600


def test_chain_of_big_objects_causes_no_transfer(cluster):
    make = "import sys; sys.stdout.write('x' * 10_000_000)"
    step = "import sys; d = sys.stdin.buffer.read(); sys.stdout.buffer.write(d)"
    with cluster.client() as client:
        before = client.get_stats()["transfers"]
        chains = []
        for _ in range(2):
            t = tasks.run(["python3", "-c", make])
            for _ in range(3):
                t = tasks.run(["python3", "-c", step], [(t, None)])
            chains.append(tasks.size(t))
        values = client.gather(client.submit(chains))
        assert [int.from_bytes(v, "little") for v in values] == [10_000_000, 10_000_000]
        assert client.get_stats()["transfers"] == before


def test_run_embedded(tmp_path):
    (tmp_path / "plan.py").write_text(PLAN)
    proc = loomctl("run", tmp_path / "plan.py", "--workers", "2", check=0)
    assert proc.stdout.replace(b"\n", b"") == b"8,8,8"
    (tmp_path / "bad.py").write_text("from graphfmt import tasks\nresults = [tasks.run('false')]\n")
    assert "exited with status 1" in final_error(loomctl("run", tmp_path / "bad.py", "--workers", "1"), code=1)
    assert "exited with status 1" in one_line_error(loomctl("run", tmp_path / "bad.py", "-q", "--workers", "1"), code=1)


def test_server_stop_stops_workers(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1)
    try:
        loomctl("server", "stop", env=c.env, check=0)
        assert c.server.wait(10) == 0
        assert c.workers[0].wait(10) == 0
        assert not os.path.exists(os.path.join(c.server_dir, "access.json"))
    finally:
        c.stop()
    assert "no server access file" in one_line_error(loomctl("status", env=c.env), code=4)


def test_a_stranger_cannot_take_over_an_authenticated_connection(cluster, tmp_path):
    import graphfmt
    marker = tmp_path / "ran"
    plan = graphfmt.to_bytes(graphfmt.build_graph([tasks.run(["touch", str(marker)])])[0])
    ctx = zmq.Context()
    try:
        victim = ctx.socket(zmq.DEALER)
        victim.setsockopt(zmq.LINGER, 0)
        victim.setsockopt(zmq.ROUTING_ID, b"\x00\x00\x00\x00\x07")   # as zmq numbers peers
        victim.connect(f"tcp://127.0.0.1:{cluster.access['port']}")
        P.client_handshake(victim, "client", cluster.access["secret"], 5000)
        thief = ctx.socket(zmq.DEALER)
        thief.setsockopt(zmq.LINGER, 0)
        thief.setsockopt(zmq.ROUTING_ID, b"\x00\x00\x00\x00\x07")
        thief.connect(f"tcp://127.0.0.1:{cluster.access['port']}")
        time.sleep(0.3)
        thief.send_multipart(P.encode(P.SUBMIT, {"req": 1, "graph": plan}))
        time.sleep(1.0)
        assert not marker.exists()
        victim.send_multipart(P.encode(P.STATS, {"req": 2}))   # the victim is still served
        assert victim.poll(5000)
        kind, body, _ = P.decode(victim.recv_multipart())
        assert kind == P.REPLY and body["req"] == 2
    finally:
        ctx.destroy(linger=0)
