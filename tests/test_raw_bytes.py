"""Raw bytes on every listening port: the server's and the workers' data ports get TCP
streams that are not zmq at all or only look like it (random bytes, truncated ZMTP
greetings, valid greetings followed by garbage, frames declaring huge lengths, streams
reset mid-way). Afterwards every process is up and a healthy client gets right results.

LOOMCTL_FUZZ_EXAMPLES sets the number of streams (default 300; the fuzz run used 10,000):

    LOOMCTL_FUZZ_EXAMPLES=10000 /work/venv/bin/pytest -q -s tests/test_raw_bytes.py
"""

import os
import random
import socket
import struct

import msgpack
import pytest

from graphfmt import tasks
from loomctl import protocol as P
from cluster import Cluster
from test_reliability import wait_until

STREAMS = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "300"))


def greeting(major=3, minor=1, mechanism=b"NULL", as_server=0) -> bytes:
    """A ZMTP 3 greeting: signature, version, mechanism, as-server, filler (64 bytes)."""
    return b"\xff" + b"\x00" * 7 + b"\x01\x7f" + bytes([major, minor]) + mechanism.ljust(20, b"\x00") \
        + bytes([as_server]) + b"\x00" * 31


def command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return (b"\x04" + bytes([len(data)]) if len(data) < 256 else b"\x06" + struct.pack(">Q", len(data))) + data


def ready(socket_type=b"DEALER") -> bytes:
    prop = b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return command(b"READY", prop)


def stream(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["random", "truncated", "garbage", "huge", "frames", "version", "command", "hello", "steal"])
    g = greeting()
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 4000))
    if kind == "truncated":
        return kind, g[:rng.randint(1, len(g) - 1)]
    if kind == "garbage":
        return kind, g + rng.randbytes(rng.randint(1, 3000))
    if kind == "huge":   # a frame claiming up to 2**63 bytes, then a little of them
        size = rng.choice([1 << 30, (1 << 31) + 5, 1 << 40, (1 << 63) - 1, rng.randint(65 << 20, 2 << 30)])
        return kind, g + ready() + b"\x02" + struct.pack(">Q", size) + rng.randbytes(rng.randint(0, 2000))
    if kind == "frames":   # well-formed framing, frames of random content (more flag set at random)
        body = b"".join(bytes([rng.choice([0, 1])]) + bytes([n]) + rng.randbytes(n)
                        for n in (rng.randint(0, 255) for _ in range(rng.randint(1, 8))))
        return kind, g + ready(rng.choice([b"DEALER", b"ROUTER", b"PUB", b"X" * 40])) + body
    if kind == "version":
        return kind, greeting(rng.randint(0, 255), rng.randint(0, 255), rng.choice([b"NULL", b"PLAIN", b"CURVE",
                                                                                   rng.randbytes(20)]))
    if kind == "hello":   # a real handshake begun, then the connection drops: its state must go too
        body = msgpack.packb({"role": rng.choice(["peer", "client", "worker"]), "version": P.PROTOCOL_VERSION})
        return kind, [g, ready() + b"\x01\x05HELLO" + bytes([0, len(body)]) + body]   # after the reply's greeting
    if kind == "steal":   # work stealing's messages, from a peer that never authenticated
        name, body = rng.choice([(P.STEAL_TASKS, {"ids": rng.randbytes(rng.randint(0, 40)), "count": rng.randint(-2, 9)}),
                                 (P.UPDATE, {"returned": rng.choice([rng.randbytes(16), "x", 7, b""])})])
        packed = msgpack.packb(body)[:rng.randint(1, 200)]
        return kind, g + ready() + b"\x01" + bytes([len(name)]) + name + b"\x00" + bytes([len(packed)]) + packed
    return kind, g + command(rng.randbytes(rng.randint(1, 20)), rng.randbytes(rng.randint(0, 300)))


def send(port: int, data: bytes, rng: random.Random) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        if rng.random() < 0.3:   # close with a reset instead of a FIN
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        try:
            for chunk in data if isinstance(data, list) else [data]:
                s.sendall(chunk)
                got = b""
                while isinstance(data, list) and len(got) < 64:   # the router's greeting first,
                    more = s.recv(64 - len(got))                 # as a zmq peer waits for it
                    if not more:
                        break
                    got += more
            if rng.random() < 0.3:
                s.recv(256)   # (a CHALLENGE may come back)
        except OSError:   # the peer closed first: fine
            pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("raw"), workers=2, cpus=1, server_args=["--steal"])
    yield c
    c.stop()


def healthy(c) -> None:
    assert c.server.poll() is None, c.log("server")
    assert all(w.poll() is None for w in c.workers), [c.log(f"w{k}") for k in range(2)]
    with c.client() as client:
        assert client.get_stats()["n_workers"] == 2
        inputs = [tasks.const(f"{i};") for i in range(20)]
        assert client.submit([tasks.merge(inputs)])[0].gather() == "".join(f"{i};" for i in range(20)).encode()
        # 1-cpu tasks that queue up on the workers (the server runs with --steal)
        runs = [tasks.run(["sh", "-c", f"sleep 0.0{k % 3}; echo {k}"]) for k in range(6)]
        assert client.gather(client.submit(runs)) == [f"{k}\n".encode() for k in range(6)]
        assert client.get_stats()["n_data_objects"] == 0


def test_raw_bytes_on_every_port_change_nothing(cluster):
    c = cluster
    with c.client() as client:
        ports = [c.access["port"]] + [int(w["address"].rsplit(":", 1)[1]) for w in client.status()["workers"]]
    rng = random.Random(20261201)
    kinds: dict = {}
    for k in range(STREAMS):
        kind, data = stream(rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        send(rng.choice(ports), data, rng)
        if (k + 1) % max(100, STREAMS // 5) == 0:
            healthy(c)
    healthy(c)
    # what was kept per connection went with the connections (server and workers; the
    # workers' figure comes with their heartbeats: only one sent after the flood counts)
    with c.client() as client:
        flooded = {w["name"]: w["heartbeat"] for w in client.status()["workers"]}

    def forgotten():
        with c.client() as client:
            stats, status = client.get_stats(), client.status()
        fresh = all(w["heartbeat"] > flooded[w["name"]] + 1 for w in status["workers"])
        return stats["connections"] + stats["handshakes"] <= 4 and fresh \
            and all(w["data_connections"] <= 2 for w in status["workers"])
    wait_until(forgotten, 15)
    log = c.log("server")
    assert "Traceback" not in log
    print(f"\n{STREAMS} raw streams over {len(ports)} ports: {kinds}")
