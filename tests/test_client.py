"""The Client against a scripted server on 127.0.0.1: message orders a real server
produces only rarely (timing), made certain here."""

import socket
import threading

import pytest
import zmq

from graphfmt import tasks
from loomctl import protocol as P
from loomctl.client import Client, Future
from loomctl.downloads import WorkerGone, WorkerLinks
from loomctl.worker import data as D
from loomctl.worker.stream import CHUNK


def scripted_server(script):
    """A ROUTER on a free port that answers HELLO with WELCOME, then calls
    script(send, kind, body) for every later message; stops when stop is set."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        try:
            while not stop.is_set():
                if not router.poll(50):
                    continue
                ident, *frames = router.recv_multipart()
                kind, body, _ = P.decode(frames)

                def send(kind, body, *blobs):
                    router.send_multipart([ident, *P.encode(kind, body, *blobs)])
                if kind == P.HELLO:
                    send(P.WELCOME, {})
                else:
                    script(send, kind, body)
        finally:
            router.close(0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, stop, thread


def test_result_ready_read_together_with_the_submit_reply_is_not_lost():
    # The notice for a one-task job can be read in the same drain of the socket as the
    # SUBMIT reply, before the client has made the future it belongs to.
    def script(send, kind, body):
        if kind == P.SUBMIT:
            send(P.RESULTS_READY, {"ids": P.ids_to_bytes([7]), "addresses": ["tcp://127.0.0.1:1"]})
            send(P.REPLY, {"req": body["req"], "job": 1, "base": 7})

    port, stop, thread = scripted_server(script)
    client = Client("127.0.0.1", port, secret=None, timeout=5)
    try:
        future = client.submit_one(tasks.const(b"x"))
        assert future.task_id == 7
        assert future.finished()
        assert future.address == "tcp://127.0.0.1:1"
        assert client.early_addresses == {}
    finally:
        client.ctx.destroy(linger=0)
        stop.set()
        thread.join(5)


def test_job_records_do_not_grow_with_the_jobs_a_client_runs():
    from loomctl.client import JOB_RECORDS, Client, Future
    c = Client.__new__(Client)   # no server: the records are fed in directly
    c.futures, c.job_status, c.job_errors, c.early_addresses, c.replies = {}, {}, {}, {}, {}
    c.futures[5] = Future(c, 5, 3)   # a live future of job 3
    for job in range(1, 10 * JOB_RECORDS):
        c._apply(P.JOB_DONE, {"job": job, "status": "finished"})
        c._apply(P.TASK_FAILED, {"job": job, "id": job, "message": "x"})
    for records in (c.job_status, c.job_errors):
        assert len(records) <= 2 * JOB_RECORDS
        assert 3 in records and 10 * JOB_RECORDS - 1 in records and 10 not in records


def test_a_plan_too_big_for_one_message_is_refused_before_sending(monkeypatch):
    import graphfmt
    from loomctl import client as C
    graph = graphfmt.build_graph([tasks.const("x" * 200_000)])[0]
    assert C._graph_bytes(graph) == graphfmt.to_bytes(graph)
    monkeypatch.setattr(P, "MAX_MESSAGE", 1 << 17)   # what the server would drop unread
    with pytest.raises(C.LoomError, match="submit it in parts"):
        C._graph_bytes(graph)


def test_a_worker_that_refuses_the_connection_is_gone_at_once():
    """Nothing listens at the address: the monitor tells (not the 60 s timeout)."""
    # A port bound but not listening refuses every connection, and while it stays bound no
    # other process can listen on it, nor can the kernel pick it as our own source port (a
    # port merely freed a moment ago could be taken by a parallel test's server, or could
    # connect to itself, and then the link is made and closed: CI saw that once).
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    links = WorkerLinks(zmq.Context.instance(), None, timeout_ms=60_000)
    try:
        with pytest.raises(WorkerGone, match=r"could not be reached \(refused"):
            links.download(f"tcp://127.0.0.1:{port}", [7], moved=lambda: False)
        assert len(links) == 0
    finally:
        links.close()
        probe.close()


def test_fetch_asks_the_server_again_when_a_worker_no_longer_holds_the_data():
    """Worker A answers that it lacks task 7; the server, asked again, places it on worker
    B, which sends it: fetch returns B's value and follows the job (WAIT_JOB)."""
    value = D.Plain(b"from B")

    def worker(holds):
        def script(send, kind, body):
            if kind == P.FETCH:
                if holds:
                    parts = D.encode_parts(value)
                    send(P.DATA, {"req": body["req"], "ids": P.ids_to_bytes([7]), "parts": [len(parts)],
                                  "missing": P.ids_to_bytes([])}, *parts)
                else:
                    send(P.DATA, {"req": body["req"], "ids": P.ids_to_bytes([]), "parts": [],
                                  "missing": P.ids_to_bytes([7])})
        return scripted_server(script)

    asked = []

    def server_script(send, kind, body):
        if kind == P.WAIT_JOB:
            asked.append(body["job"])
            send(P.REPLY, {"req": body["req"], "job": body["job"], "status": "finished",
                           "ids": P.ids_to_bytes([7]), "addresses": [f"tcp://127.0.0.1:{port_b}"]})

    port_a, stop_a, _ = worker(False)
    port_b, stop_b, _ = worker(True)
    port, stop, _ = scripted_server(server_script)
    client = Client("127.0.0.1", port, secret=None, timeout=5)
    try:
        future = Future(client, 7, 3)
        future.address = f"tcp://127.0.0.1:{port_a}"
        assert client.fetch([future]) == [b"from B"]
        assert asked == [3] and future.address == f"tcp://127.0.0.1:{port_b}"
    finally:
        client.close()
        for s in (stop, stop_a, stop_b):
            s.set()


def test_a_download_streamed_slowly_goes_on_while_chunks_keep_coming():
    """The timeout is for silence: 8 chunks 0.25 s apart take 2 s in all, past a 1.5 s
    timeout, and the object still arrives whole."""
    import time
    content = bytes(range(256)) * 64
    encoded = D.encode(D.Plain(content))
    pieces = [encoded[k:k + len(encoded) // 8 + 1] for k in range(0, len(encoded), len(encoded) // 8 + 1)]

    def script(send, kind, body):
        if kind == P.FETCH:
            send(P.DATA, {"req": body["req"], "ids": P.ids_to_bytes([]), "parts": [],
                          "missing": P.ids_to_bytes([]), "streams": [[7, len(encoded)]]})
            offset = 0
            for piece in pieces:
                time.sleep(0.25)
                send(CHUNK, {"req": body["req"], "id": 7, "offset": offset}, piece)
                offset += len(piece)

    port, stop, _ = scripted_server(script)
    links = WorkerLinks(zmq.Context.instance(), None, timeout_ms=1500)
    try:
        started = time.monotonic()
        found, missing, parts = links.download(f"tcp://127.0.0.1:{port}", [7], moved=lambda: False)
        assert time.monotonic() - started > 1.5   # (the premise: longer in all than the timeout)
        assert found == [7] and missing == [] and D.decode_parts(parts[0]) == D.Plain(content)
    finally:
        links.close()
        stop.set()
