"""Fuzzing the server's wire protocol: one real server (and 2 real workers) against
hypothesis-generated messages from strangers and from authenticated peers.

Four peers talk to the server, each over one DEALER that is reused from example to
example (and reconnected when the server forgets it, or when an example asks for a
fresh connection): a stranger claiming to be a client, a stranger claiming to be a
worker (neither ever proves the secret), an authenticated client and an authenticated
worker. Each example sends one to four inputs from one peer:

- random frames (a random count of random bytes);
- a known message kind with a random body (and random blob frames);
- valid msgpack maps with missing, extra, wrong-typed and edge-valued fields, built
  from the field names the server's handlers read (REGISTER, UPDATE, HEARTBEAT,
  SUBMIT, RELEASE, CANCEL, JOB_RESULTS, WAIT_JOB, SET_TRACE, HELLO, AUTH, ...), values
  including id columns of real task ids, deeply nested msgpack and huge declared
  lengths (bin32 / str32 / array32 / map32 / ext32 headers claiming up to 4 GB);
- valid messages cut short (SUBMIT of a real graph file cut inside the msgpack body or
  inside the graph file, REGISTER / UPDATE bodies cut anywhere) and graph files with a
  byte changed;
- deeply nested msgpack bodies (around and beyond the unpacker's depth limit);
- handshakes with bogus AUTH replies (HMAC over the wrong nonce, role or secret, proofs
  of the wrong length or type, AUTH without HELLO, a replayed proof); a stranger must
  never be welcomed, and never receive anything but CHALLENGE, REFUSED and PING;
- messages before or without the handshake (SUBMIT, REGISTER, TERMINATE, ... from
  strangers change nothing);
- REGISTER with bogus addresses, cpus, resources and symbols;
- an authenticated peer re-running the handshake (as another role: refused, the
  connection keeps its role);
- HELLOs with a role or version of up to 1 MB;
- the authenticated worker answering the COMPUTE messages it received with bogus
  UPDATEs (duplicated ids, wrong sizes, failures, invalid and valid redirections, answers
  to steal requests: the server runs with --steal).

TERMINATE is never sent by the authenticated client. Every 50 examples the server
must still answer STATS; every third of the run, and at the end, the fuzzing peers
disconnect and: the server process is alive, the two real workers (and only they) are
registered, a healthy client gets the right result of a small graph, the number of
data objects returns to 0, and the server log holds no traceback and no huge line.

A failure is reported after the run with the last inputs and the server log, and every
example since the last full check is saved (pickle) next to the server log: the server's
state depends on all of them, so hypothesis does not replay or shrink single examples.
The tests after the fuzz pin down what it found (each failed before its fix).

The default of 300 examples keeps the test quick enough for every run. A fuzz run sets
the environment variable LOOMCTL_FUZZ_EXAMPLES (the wire was fuzzed with 10000):

    LOOMCTL_FUZZ_EXAMPLES=10000 /work/venv/bin/pytest -q -s tests/test_fuzz_wire.py
"""

import collections
import os
import pickle
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from loomctl import protocol as P
from cluster import Cluster

EXAMPLES = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "300"))
CHEAP_CHECK_EVERY = 50                      # examples between STATS round trips
FULL_CHECK_EVERY = max(100, EXAMPLES // 3)  # examples between full health checks
REPLY_TIMEOUT_MS = 5000


def _graph_bytes(results) -> bytes:
    return graphfmt.to_bytes(graphfmt.build_graph(results)[0])


SMALL_GRAPH = _graph_bytes([tasks.merge((tasks.const("fuzz "), tasks.const("ok")))])
# six ready tasks: the fuzzing worker (when registered) is given some of them
JOB_GRAPH = _graph_bytes([tasks.merge([tasks.const(f"{k};") for k in range(6)])])
VALID_SUBMIT_BODY = P.encode(P.SUBMIT, {"req": 1, "graph": SMALL_GRAPH, "load": False, "name": "fuzz",
                                        "trace": None, "notify": True})[1]
VALID_REGISTER = {"name": "fuzz-worker", "hostname": "fuzz", "pid": 1, "cpus": 1, "resources": {},
                  "symbols": sorted(S.BUILTINS), "data_address": "tcp://127.0.0.1:9",
                  "work_dir": "/nonexistent"}
VALID_REGISTER_BODY = P.encode(P.REGISTER, VALID_REGISTER)[1]
VALID_UPDATE_BODY = P.encode(P.UPDATE, {"finished": P.ids_to_bytes([1, 2]), "sizes": P.ids_to_bytes([3, 4]),
                                        "lengths": P.ids_to_bytes([0, 0]), "failed": [[5, "x"]],
                                        "redirects": [], "replicas": b"", "logs": [[1, "info", "m"]]})[1]

# every kind the protocol knows, plus a few it does not
KINDS = [P.HELLO, P.CHALLENGE, P.AUTH, P.WELCOME, P.REFUSED, P.REGISTER, P.UPDATE, P.HEARTBEAT,
         P.COMPUTE, P.RELEASE_DATA, P.STOP, P.TRACE, P.SUBMIT, P.RELEASE, P.STATS, P.STATUS, P.CANCEL,
         P.TERMINATE, P.SET_TRACE, P.JOB_RESULTS, P.WAIT_JOB, P.REPLY, P.ERROR, P.RESULTS_READY,
         P.TASK_FAILED, P.JOB_DONE, P.FETCH, P.DATA, P.PING, b"PEER_LOST", P.STEAL_TASKS, P.CANCEL_TASKS, b"", b"submit", b"X" * 16,
         b"X" * 17, b"\xff\x00"]

# the fields each handler reads (loomctl/server/process.py, loomctl/protocol.py)
FIELDS = {
    P.REGISTER: ["name", "hostname", "pid", "cpus", "resources", "symbols", "data_address", "work_dir",
                 "memory_limit"],
    P.UPDATE: ["finished", "sizes", "lengths", "failed", "redirects", "replicas", "logs", "returned"],
    P.HEARTBEAT: ["n_data", "data_bytes", "rss", "cpu_percent", "running"],
    P.SUBMIT: ["req", "graph", "load", "name", "trace", "notify", "detach"],
    P.RELEASE: ["req", "ids"],
    P.STATS: ["req"],
    P.STATUS: ["req"],
    P.CANCEL: ["req", "job"],
    P.JOB_RESULTS: ["req", "job"],
    P.WAIT_JOB: ["req", "job"],
    P.SET_TRACE: ["req", "path"],
    P.TERMINATE: ["req"],
    P.HELLO: ["role", "version"],
    P.AUTH: ["proof"],
    P.FETCH: ["req", "ids"],
    P.COMPUTE: ["tasks", "locations", "jobs", "columns"],
    P.TRACE: ["path", "job", "on"],
    P.RELEASE_DATA: ["ids"],
    P.STEAL_TASKS: ["ids", "count"],
    P.REPLY: ["req", "worker_id"],
}
EXTRA_FIELDS = ["", "x", "REQ", "Graph", "\x00", "ids\x00"]


class Raw:
    """Pre-encoded msgpack bytes used as a field value (msgpack.packb cannot write
    nesting as deep as the fuzz wants, nor lengths that lie)."""

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self):
        return f"Raw({self.data[:24]!r}{'...' if len(self.data) > 24 else ''}, {len(self.data)} bytes)"


def pack_map(body: dict) -> bytes:
    items = list(body.items())[:15]
    out = bytearray([0x80 | len(items)])
    for key, value in items:
        out += msgpack.packb(key, use_bin_type=True)
        out += value.data if isinstance(value, Raw) else msgpack.packb(value, use_bin_type=True)
    return bytes(out)


# ------------------------------------------------------------------ values
INT64_EDGES = [0, 1, -1, 2, 7, 8, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -2**63]
INT_EDGES = INT64_EDGES + [2**64 - 1, 2**63]
ADDRESSES = ["", "tcp://", "tcp://127.0.0.1", "tcp://127.0.0.1:1", "tcp://127.0.0.1:0", "tcp://127.0.0.1:99999",
             "tcp://nowhere.invalid:5", "tcp://[::1]:5", "tcp://*:5", "tcp://127.0.0.1:-1", "ipc:///tmp/x",
             "inproc://x", "udp://1.2.3.4:5", "TCP://127.0.0.1:5", "tcp://127.0.0.1:5\x00", "tcp://" + "a" * 300]
STRINGS = ADDRESSES + ["client", "worker", "peer", "server", "-", "/nonexistent/x", "\x00", "é" * 5,
                       "\n\n", "x" * 2000, S.CONST, S.MERGE, "loom/nope", "loom/", "%s%s%n"]

small_id = st.integers(0, 400)   # hits real task ids
int64 = st.one_of(st.sampled_from(INT64_EDGES), small_id, st.integers(-2**63, 2**63 - 1))
any_int = st.one_of(st.sampled_from(INT_EDGES), small_id, st.integers(-2**63, 2**64 - 1))
text = st.one_of(st.sampled_from(STRINGS), st.text(max_size=12))
scalar = st.one_of(st.none(), st.booleans(), any_int, st.floats(), text, st.binary(max_size=24))
nested = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(text, any_int), inner, max_size=4)), max_leaves=10)


def _deep(depth: int, how: int) -> bytes:
    opener = [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\x81\x00"][how]
    return opener * depth + [b"\xc0", b"\x90", b"\x80", b""][how]   # the last one is cut short


deep = st.builds(_deep, st.one_of(st.integers(1, 40), st.sampled_from([510, 511, 512, 999, 1000, 1023, 1024,
                                                                          1025, 5000])),
                 st.integers(0, 3))
HUGE_HEADERS = [b"\xc6", b"\xdb", b"\xdd", b"\xdf", b"\xc5", b"\xda", b"\xdc", b"\xde", b"\xc9"]
huge = st.builds(
    lambda header, n, tail: header + (struct.pack(">H", n & 0xFFFF) if header in (b"\xc5", b"\xda", b"\xdc", b"\xde")
                                      else struct.pack(">I", n)) + (b"\x01" if header == b"\xc9" else b"") + tail,
    st.sampled_from(HUGE_HEADERS), st.sampled_from([2**32 - 1, 2**31, 2**31 - 1, 2**26 + 1, 2**20, 65535, 9]),
    st.binary(max_size=16))
raw_value = st.one_of(deep, huge).map(Raw)


def ids_column():
    return st.one_of(st.lists(int64, max_size=12).map(P.ids_to_bytes), st.binary(max_size=41),
                     st.just(b"\x00" * 8 * 1000))


def truncated(data: bytes):
    return st.integers(0, len(data) - 1).map(lambda k: data[:k])


def flipped(data: bytes):
    return st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)).map(
        lambda m: data[:m[0]] + bytes([m[1]]) + data[m[0] + 1:])


graph_value = st.one_of(truncated(SMALL_GRAPH), flipped(SMALL_GRAPH), st.just(SMALL_GRAPH), st.binary(max_size=64),
                        st.just(b"\x89LOOMGF\n\x01\x00\x00\x00"), text, any_int, st.none())
PLAUSIBLE = {
    "finished": ids_column(), "sizes": ids_column(), "lengths": ids_column(), "replicas": ids_column(),
    "ids": ids_column(), "jobs": ids_column(),
    "failed": st.lists(st.one_of(st.tuples(any_int, text).map(list), st.lists(nested, max_size=3), scalar), max_size=4),
    "redirects": st.lists(st.one_of(st.tuples(small_id, graph_value).map(list), st.lists(nested, max_size=3), scalar),
                          max_size=3),
    "logs": st.lists(st.one_of(st.tuples(any_int, text, text).map(list), st.lists(nested, max_size=4), scalar),
                     max_size=4),
    "graph": graph_value,
    "cpus": st.one_of(any_int, st.floats(), st.booleans(), text),
    "memory_limit": any_int,
    "data_address": st.one_of(st.sampled_from(ADDRESSES), text.map(lambda s: "tcp://" + s)),
    "resources": st.one_of(st.dictionaries(text, st.one_of(any_int, scalar), max_size=3),
                           st.lists(st.tuples(text, any_int).map(list), max_size=3), scalar),
    "symbols": st.one_of(st.lists(st.one_of(st.sampled_from(sorted(S.BUILTINS)), text, any_int), max_size=5),
                         st.just([]), text, st.dictionaries(text, scalar, max_size=2)),
    "job": st.one_of(st.integers(0, 60), any_int, scalar),
    "role": st.one_of(st.sampled_from(["client", "worker", "peer", "server", "", "CLIENT"]), scalar),
    "version": st.one_of(st.sampled_from([1, 0, 2, True, 1.0, "1", -1, 2**64 - 1]), scalar),
    "proof": st.one_of(st.binary(min_size=31, max_size=33), st.binary(max_size=64), text, scalar),
    "req": st.one_of(st.integers(0, 10**6), nested),
    "rss": st.one_of(any_int, nested), "cpu_percent": st.one_of(st.floats(), nested),
}


def value_for(name: str):
    plausible = PLAUSIBLE.get(name, scalar)
    return st.one_of(plausible, plausible, scalar, nested, raw_value)


@st.composite
def field_body(draw, kind: bytes, trace_dir: str) -> dict:
    names = FIELDS.get(kind, ["req"])
    chosen = draw(st.lists(st.sampled_from(names + EXTRA_FIELDS), unique=True, max_size=len(names) + 1))
    body = {name: draw(value_for(name)) for name in chosen}
    if "path" in body:   # SET_TRACE: only ever a directory of this test
        body["path"] = draw(st.one_of(st.just(trace_dir), st.just(""), any_int, st.none(), st.binary(max_size=8)))
    if "trace" in body and isinstance(body["trace"], (str, Raw)):   # no trace directories elsewhere
        body["trace"] = draw(st.sampled_from([None, False, True, 0, "", []]))
    if kind == P.SUBMIT and "graph" in body and "detach" in body:   # detached jobs would keep data
        body["detach"] = False
    return body


# ------------------------------------------------------------------ inputs
def frames(kind, body):
    return ("frames", [kind, body if isinstance(body, bytes) else pack_map(body)])


random_frames = st.lists(st.one_of(st.binary(max_size=64), st.binary(min_size=200, max_size=5000)),
                         min_size=1, max_size=6).map(lambda f: ("frames", f))
kind_random_body = st.tuples(st.sampled_from(KINDS), st.binary(max_size=200),
                             st.lists(st.binary(max_size=32), max_size=3)).map(
    lambda m: ("frames", [m[0], m[1], *m[2]]))
cut_message = st.one_of(
    truncated(VALID_SUBMIT_BODY).map(lambda b: frames(P.SUBMIT, b)),
    truncated(SMALL_GRAPH).map(lambda g: frames(P.SUBMIT, {"req": 7, "graph": g})),
    flipped(SMALL_GRAPH).map(lambda g: frames(P.SUBMIT, {"req": 8, "graph": g, "notify": False})),
    truncated(VALID_REGISTER_BODY).map(lambda b: frames(P.REGISTER, b)),
    truncated(VALID_UPDATE_BODY).map(lambda b: frames(P.UPDATE, b)),
)
huge_body = st.one_of(
    huge.map(lambda raw: ("frames", [P.UPDATE, raw])),
    st.tuples(st.sampled_from(list(FIELDS)), st.sampled_from(sum(FIELDS.values(), [])), huge).map(
        lambda m: ("frames", [m[0], b"\x81" + msgpack.packb(m[1]) + m[2]])),
    st.sampled_from(HUGE_HEADERS[:4]).map(lambda h: ("frames", [P.SUBMIT, b"\x82\xa3req\x01\xa5graph" + h +
                                                                  b"\xff\xff\xff\xf0" + SMALL_GRAPH[:40]])),
)
deep_body = st.tuples(st.sampled_from(list(FIELDS) + [b"?"]), deep, st.booleans()).map(
    lambda m: ("frames", [m[0], m[1]]) if m[2] else ("frames", [m[0], b"\x81\xa3req" + m[1]]))
register = st.builds(lambda extra: ("frames", [P.REGISTER, pack_map({**VALID_REGISTER, **extra})]),
                     st.dictionaries(st.sampled_from(FIELDS[P.REGISTER]),
                                     st.one_of(*[value_for(n) for n in ("cpus", "data_address", "symbols",
                                                                          "resources", "name")]), max_size=3))
valid_register = st.builds(lambda cpus, symbols: ("frames", P.encode(P.REGISTER, {
    **VALID_REGISTER, "cpus": cpus, "symbols": symbols})), st.integers(0, 3), st.sampled_from([[], sorted(S.BUILTINS)]))
valid_submit = st.builds(lambda graph, load, notify: ("frames", P.encode(P.SUBMIT, {
    "req": 99, "graph": graph, "load": load, "notify": notify, "name": "fuzz"})),
    st.sampled_from([JOB_GRAPH, SMALL_GRAPH]), st.booleans(), st.booleans())
AUTH_VARIANTS = ["wrong_secret", "wrong_role", "wrong_nonce", "short", "long", "empty", "text", "none", "missing",
                 "replayed", "no_hello", "twice"]
bogus_auth = st.tuples(st.just("auth"), st.sampled_from(["client", "worker", "peer"]), st.sampled_from(AUTH_VARIANTS))
rehandshake = st.tuples(st.just("auth"), st.sampled_from(["client", "worker"]), st.just("correct"))
answer = st.tuples(st.just("answer"), st.integers(1, 6), st.booleans(),
                   st.sampled_from(["ok", "negative", "huge", "short", "long"]),
                   st.sampled_from(["none", "fail", "redirect_bad", "redirect_ok", "redirect_text", "replica",
                                    "fail_and_finish", "log", "returned", "returned_bad", "returned_empty"]))
reconnect = st.just(("reconnect",))
# a stranger's hello with a role or version of up to 1 MB (must not reach the log whole)
big_hello = st.tuples(st.sampled_from([2**16, 2**18, 2**20]), st.booleans()).map(
    lambda m: frames(P.HELLO, {"role": "A" * m[0], "version": 1} if m[1] else {"role": "client", "version": "9" * m[0]}))


def weighted(*pairs):
    """One of the strategies, chosen with the given weights."""
    return st.sampled_from([strategy for strategy, weight in pairs for _ in range(weight)]).flatmap(lambda s: s)


WORKER_KINDS = [P.REGISTER, P.UPDATE, P.UPDATE, P.HEARTBEAT]
CLIENT_KINDS = [P.SUBMIT, P.RELEASE, P.STATS, P.STATUS, P.CANCEL, P.JOB_RESULTS, P.WAIT_JOB, P.SET_TRACE]


def inputs(trace_dir: str, authenticated: bool, role: str):
    def known(kinds):
        return st.sampled_from(kinds).flatmap(
            lambda kind: field_body(kind, trace_dir).map(lambda body: frames(kind, body)))

    common = [(random_frames, 2), (kind_random_body, 2), (known(list(FIELDS)), 3), (cut_message, 2),
              (huge_body, 1), (deep_body, 1), (register, 1), (bogus_auth, 1), (reconnect, 1), (big_hello, 1)]
    if not authenticated:   # also perfectly valid requests, but from a stranger
        extra = [(valid_submit, 1), (valid_register, 1), (st.just(frames(P.TERMINATE, {"req": 1})), 1),
                 (st.just(frames(P.STATS, {"req": 2})), 1)]
    elif role == "worker":
        extra = [(known(WORKER_KINDS), 4), (valid_register, 2), (answer, 5), (rehandshake, 1)]
    else:
        extra = [(known(CLIENT_KINDS), 4), (valid_submit, 3), (rehandshake, 1)]
    return st.lists(weighted(*common, *extra), min_size=1, max_size=4)


PEERS = [(False, "client"), (False, "worker"), (True, "client"), (True, "worker")]


# ------------------------------------------------------------------ the peers
class Violation(AssertionError):
    pass


class StopFuzzing(Exception):
    """Raised for every example after the first failure (hypothesis replays the
    failing one: it must fail again)."""


KEEPS_ROLE = "a connection keeps its role"   # the reason of the REFUSED to a change of role


class Peer:
    def __init__(self, wire, authenticated: bool, role: str):
        self.wire = wire
        self.authenticated = authenticated
        self.role = role
        self.name = ("" if authenticated else "stranger-") + role
        self.sock = None
        self.stale = False
        self.compute_ids = collections.deque(maxlen=64)
        self.asked = []        # the ids of the last steal request received
        self.nonces = collections.deque(maxlen=4)
        self.connections = 0

    def ensure(self):
        if self.sock is None or self.stale:
            self.connect()
        return self.sock

    def connect(self):
        self.close()
        sock = self.wire.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 100000)
        sock.connect(self.wire.address)
        self.sock = sock
        self.stale = False
        self.connections += 1
        if self.authenticated:
            try:
                P.client_handshake(sock, self.role, self.wire.secret, REPLY_TIMEOUT_MS)
            except ConnectionError as exc:
                raise Violation(f"{self.name}: the handshake failed: {exc}") from None

    def close(self):
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None
        self.compute_ids.clear()
        self.asked = []

    def send(self, message: list):
        self.ensure().send_multipart(message)
        self.wire.sent += 1
        self.wire.recent.append((self.name, [bytes(f[:60]) for f in message]))

    def drain(self, wait_ms: int = 0, until=None):
        """Read what the server sent; with ``until``, wait up to wait_ms for a message
        that matches (kind, body) -> bool and return its body."""
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left if until is not None else 0, zmq.POLLIN):
                return None
            raw = self.sock.recv_multipart()
            try:
                kind, body, _ = P.decode(raw)
            except P.ProtocolError as exc:
                raise Violation(f"{self.name}: the server sent an undecodable message: {exc}") from None
            self.wire.received += 1
            self.wire.kinds[kind.decode()] += 1
            self.observe(kind, body)
            if until is not None and until(kind, body):
                return body

    def observe(self, kind: bytes, body: dict):
        if not self.authenticated and (kind not in (P.CHALLENGE, P.REFUSED, P.PING)
                                       or body.get("reason") == KEEPS_ROLE):
            raise Violation(f"{self.name} (never authenticated) received {kind!r} {str(body)[:200]}")
        if kind == P.CHALLENGE:
            self.nonces.append(body.get("nonce"))
        elif kind == P.REFUSED and self.authenticated and "not authenticated" in str(body.get("reason")):
            self.stale = True   # the server forgot us (e.g. removed us as a worker): reconnect
        elif kind == P.COMPUTE:
            for task in body.get("tasks", []):
                self.compute_ids.append(task[0])
        elif kind == P.STEAL_TASKS:   # (the server runs with --steal)
            self.asked = P.ids_from_bytes(body["ids"]).tolist()

    # ---------------------------------------------------------------- actions
    def act(self, action):
        self.ensure()
        self.wire.actions[action[0] if action[0] != "auth" else "auth-" + action[2]] += 1
        if action[0] == "frames":
            self.send(action[1])
        elif action[0] == "reconnect":
            self.connect()
        elif action[0] == "auth":
            self.auth(action[1], action[2])
        elif action[0] == "answer":
            self.answer(*action[1:])
        if self.sock is not None:
            self.drain()

    def auth(self, role: str, variant: str):
        secret = self.wire.secret
        if variant == "no_hello":
            self.send(P.encode(P.AUTH, {"proof": os.urandom(32)}))
            return
        self.send(P.encode(P.HELLO, {"role": role, "version": P.PROTOCOL_VERSION}))
        # a welcome peer that asks for another role is refused (the refusal may also
        # answer an earlier HELLO of this example: replies are not matched to requests)
        other_role = self.authenticated and role != self.role
        challenge = self.drain(REPLY_TIMEOUT_MS, lambda k, b: k == P.CHALLENGE or (
            other_role and k == P.REFUSED and b.get("reason") == KEEPS_ROLE))
        if challenge is None:
            raise Violation(f"{self.name}: no CHALLENGE within {REPLY_TIMEOUT_MS} ms of a HELLO as {role}")
        if "nonce" not in challenge:
            return
        nonce = challenge.get("nonce")
        good = P.proof(secret, nonce, role)
        proof = {
            "correct": good,
            "wrong_secret": P.proof(P.new_secret(), nonce, role),
            "wrong_role": P.proof(secret, nonce, "client" if role != "client" else "worker"),
            "wrong_nonce": P.proof(secret, os.urandom(32), role),
            "short": good[:31], "long": good + b"\x00", "empty": b"", "text": good.hex(), "none": None,
            "replayed": P.proof(secret, self.nonces[0], role) if len(self.nonces) > 1 else good[::-1],
            "twice": good[::-1],
        }.get(variant)
        if variant == "replayed" and len(self.nonces) > 1 and self.nonces[0] == nonce:
            proof = good[::-1]
        if variant == "correct" and not self.authenticated:
            raise AssertionError("strangers never prove the secret")
        self.send(P.encode(P.AUTH, {} if variant == "missing" else {"proof": proof}))
        if variant == "twice":
            self.send(P.encode(P.AUTH, {"proof": good}))   # the nonce was used up by the first attempt
        if self.authenticated:
            # a welcome peer keeps its role: its HELLO is answered with a CHALLENGE, but
            # its AUTH is taken as an ordinary message (and refused by the handlers)
            return
        # a stranger's AUTH is refused (observe() fails the test on a WELCOME)
        answer = self.drain(REPLY_TIMEOUT_MS, lambda k, b: k == P.REFUSED and b.get("reason") == "authentication failed")
        if answer is None:
            raise Violation(f"{self.name}: no answer to AUTH within {REPLY_TIMEOUT_MS} ms")

    def answer(self, count: int, duplicate: bool, sizes_mode: str, extra: str):
        """An UPDATE about tasks the server sent us: bogus in the ways chosen."""
        ids = [self.compute_ids.pop() for _ in range(min(count, len(self.compute_ids)))] or [0]
        if ids != [0]:
            self.wire.actions["answer-to-compute"] += 1
        finished = ids + ids[:1] if duplicate else list(ids)
        n = len(finished)
        sizes = {"ok": [5] * n, "negative": [-1] * n, "huge": [2**63 - 1] * n, "short": [1] * (n - 1),
                 "long": [1] * (n + 1)}[sizes_mode]
        lengths = [0] * len(sizes)
        body = {"finished": P.ids_to_bytes(finished), "sizes": P.ids_to_bytes(sizes),
                "lengths": P.ids_to_bytes(lengths)}
        if extra in ("fail", "fail_and_finish"):
            body["failed"] = [[t, "fuzz failure\nsecond line"] for t in ids]
            if extra == "fail":
                del body["finished"]
        elif extra.startswith("redirect"):
            graph = {"redirect_bad": SMALL_GRAPH[:-3], "redirect_ok": SMALL_GRAPH, "redirect_text": "-"}[extra]
            body = {"redirects": [[t, graph] for t in ids]}
        elif extra == "replica":
            body["replicas"] = P.ids_to_bytes(ids + [10**9])
        elif extra == "returned":   # an answer to a steal request (asked or not), with a bogus id
            back, self.asked = (self.asked or ids)[:count], []
            body["returned"] = P.ids_to_bytes(back + [10**9])
            self.wire.actions["steal-answer"] += 1
        elif extra == "returned_bad":
            body["returned"] = b"\x01\x02\x03"
        elif extra == "returned_empty":
            body["returned"] = b""
        elif extra == "log":
            # [[id, "info", <a list nested 1000 deep>]]: decodes, but str() of it recurses too deep
            body["logs"] = Raw(bytes([0x90 | len(ids)]) + b"".join(
                b"\x93" + msgpack.packb(t) + msgpack.packb("info") + _deep(1000, 0) for t in ids))
        self.send([P.UPDATE, pack_map(body)])


class Wire:
    def __init__(self, cluster):
        self.cluster = cluster
        self.ctx = zmq.Context()
        self.address = f"tcp://127.0.0.1:{cluster.access['port']}"
        self.secret = cluster.access["secret"]
        self.trace_dir = os.path.join(cluster.dir, "traces")
        self.peers = [Peer(self, auth, role) for auth, role in PEERS]
        self.healthy = cluster.client(timeout=REPLY_TIMEOUT_MS / 1000)
        self.sent = 0
        self.received = 0
        self.examples = 0
        self.full_checks = 0
        self.recent = collections.deque(maxlen=12)
        self.failure = None
        self.stage = "fuzzing"
        self.since_check = []   # (peer, actions) since the last full check, saved on a failure
        self.actions = collections.Counter()
        self.kinds = collections.Counter()   # received from the server

    def close(self):
        for peer in self.peers:
            peer.close()
        self.healthy.close()
        self.ctx.destroy(linger=0)

    def context(self) -> str:
        lines = [f"{name}: {frames!r}" for name, frames in self.recent]
        return "last inputs:\n" + "\n".join(lines) + "\nserver log:\n" + self.cluster.log("server")

    def run_example(self, peer_index: int, actions: list):
        """Send one example. The first failure is kept and ends the run: the server's
        state depends on every earlier example, so hypothesis cannot replay or shrink
        one; the last inputs and the server log are the report."""
        if self.failure is not None:
            raise StopFuzzing(self.failure)
        peer = self.peers[peer_index]
        self.since_check.append((peer_index, actions))
        try:
            for action in actions:
                if peer.authenticated and peer.role == "client" and action[0] == "frames" \
                        and action[1] and action[1][0] == P.TERMINATE:
                    continue   # the one request that must stop the server
                peer.act(action)
            self.examples += 1
            if self.examples % CHEAP_CHECK_EVERY == 0:
                self.cheap_check()
            if self.examples % FULL_CHECK_EVERY == 0:
                self.full_check()
        except Exception as exc:   # the healthy client's errors too (no answer, ...)
            with open(os.path.join(self.cluster.dir, "inputs-since-check.pickle"), "wb") as f:
                pickle.dump(self.since_check, f)
            self.failure = (f"after {self.examples} examples, {self.sent} inputs, in {self.stage}: "
                            f"{type(exc).__name__}: {exc}\n"
                            f"{self.context()}")
            raise StopFuzzing(self.failure) from None

    # ---------------------------------------------------------------- checks
    def cheap_check(self):
        assert self.cluster.server.poll() is None, "the server process died"
        self.stage = "cheap check"
        stats = self.healthy.get_stats()   # raises when no answer within the timeout
        assert stats["n_workers"] >= 2, stats
        assert len(self.healthy.status()["workers"]) >= 2   # replies that carry what workers registered
        # the real workers and at most the one fuzzing worker (the server notices a
        # closed connection within milliseconds; a second worker registered on one
        # connection would stay until it missed heartbeats)
        wait_until(lambda: self.healthy.get_stats()["n_workers"] <= 3, 1.5, "at most one worker per connection")
        self.stage = "fuzzing"

    def full_check(self):
        """The fuzzing peers leave; everything they did must be undone."""
        self.full_checks += 1
        checked = len(self.since_check)
        for peer in self.peers:
            peer.close()
        c = self.cluster
        self.stage = "full check: processes alive"
        assert c.server.poll() is None, "the server process died"
        for worker in c.workers:
            assert worker.poll() is None, "a real worker died"
        self.stage = "full check: n_workers back to 2"
        wait_until(lambda: self.healthy.get_stats()["n_workers"] == 2, 15, "bogus workers to be dropped")
        names = sorted(w["name"] for w in self.healthy.status()["workers"])
        assert names == ["w0", "w1"], names
        self.stage = "full check: a new client connects"
        with c.client(timeout=10) as client:
            self.stage = "full check: a small graph is computed"
            leaves = [tasks.const(f"{k}:{self.full_checks};") for k in range(5)]
            value = client.submit_one(tasks.merge(leaves)).gather()
            assert value == "".join(f"{k}:{self.full_checks};" for k in range(5)).encode()
        self.stage = "full check: n_data_objects back to 0"
        try:
            wait_until(lambda: self.healthy.get_stats()["n_data_objects"] == 0, 15, "n_data_objects to return to 0")
        except AssertionError:
            status = self.healthy.status()
            jobs = [j for j in status["jobs"] if j["status"] not in ("cancelled",)]
            raise AssertionError(f"n_data_objects stays {status['n_data_objects']}; workers: "
                                 f"{[(w['name'], w['data_objects']) for w in status['workers']]}; "
                                 f"lost: {status['lost_workers'][-3:]}; jobs not cancelled: {jobs[-8:]}") from None
        self.stage = "full check: the server log"
        assert_no_traceback(c)
        del self.since_check[:checked]
        self.stage = "fuzzing"


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def server_log(cluster) -> str:
    with open(os.path.join(cluster.dir, "server.log"), errors="replace") as f:
        return f.read()


def assert_no_traceback(cluster):
    """No traceback in the server log, and no line a peer could make huge."""
    text = server_log(cluster)
    if "Traceback" in text:
        at = text.index("Traceback")
        raise AssertionError("traceback in the server log:\n" + text[max(0, at - 500):at + 3000])
    longest = max(text.splitlines(), key=len, default="")
    assert len(longest) < 20000, f"a server log line of {len(longest)} characters: {longest[:300]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("fuzzwire"), workers=2, cpus=2, heartbeat_timeout=3.0,
                server_args=["--steal"])   # (steal requests and answers are on the wire too)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def wire(cluster):
    w = Wire(cluster)
    yield w
    w.close()


def test_fuzz_the_wire(cluster, wire, capsys):
    started = time.monotonic()
    trace_dir = wire.trace_dir
    example = st.integers(0, len(PEERS) - 1).flatmap(
        lambda k: st.tuples(st.just(k), inputs(trace_dir, *PEERS[k])))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(example)
    def fuzz(case):
        wire.run_example(*case)

    try:
        fuzz()
    except StopFuzzing:
        pytest.fail(wire.failure, pytrace=False)
    if wire.examples % FULL_CHECK_EVERY:   # (else it has just run)
        wire.full_check()
    stats = wire.healthy.get_stats()
    with capsys.disabled():
        print(f"\nfuzz_wire: {wire.examples} examples, {wire.sent} inputs sent, {wire.received} messages received, "
              f"{wire.full_checks} full checks, {sum(p.connections for p in wire.peers)} connections, "
              f"server: {stats['messages_received']} messages, {stats['bad_messages']} dropped as malformed, "
              f"{stats['refused']} refused; {time.monotonic() - started:.1f} s\n"
              f"  actions: {dict(wire.actions)}\n  received: {dict(wire.kinds)}")
    assert wire.examples >= EXAMPLES
    assert wire.sent >= EXAMPLES
    assert stats["bad_messages"] > 0 and stats["refused"] > 0


# ------------------------------------------------------------------ what the fuzz found
# Each of these failed before its fix; they use the same server, which they leave with
# only the two real workers and no data.

def _peer(cluster, role: str, ctx) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{cluster.access['port']}")
    P.client_handshake(sock, role, cluster.access["secret"], REPLY_TIMEOUT_MS)
    return sock


def _fake_worker(cluster, ctx) -> zmq.Socket:
    sock = _peer(cluster, "worker", ctx)
    sock.send_multipart(P.encode(P.REGISTER, {**VALID_REGISTER, "cpus": 2, "symbols": []}))
    assert sock.poll(REPLY_TIMEOUT_MS) and P.decode(sock.recv_multipart())[0] == P.REPLY
    return sock


def _computed(sock, seconds=1.0) -> list:
    ids, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(50):
            kind, body, blobs = P.decode(sock.recv_multipart())
            if kind == P.COMPUTE:
                ids += [task[0] for task in P.compute_rows(body, blobs)]
    return ids


def _back_to_normal(cluster):
    with cluster.client() as client:
        wait_until(lambda: client.get_stats()["n_workers"] == 2, 10, "the fake worker to be dropped")
        wait_until(lambda: client.get_stats()["n_data_objects"] == 0, 10, "n_data_objects to return to 0")
    assert_no_traceback(cluster)


def test_a_second_register_on_one_connection_is_refused(cluster):
    """Before: a second worker on the same connection, a phantom that was given tasks
    until it missed heartbeats, and whose removal then dropped the real registration."""
    ctx = zmq.Context()
    try:
        sock = _fake_worker(cluster, ctx)
        sock.send_multipart(P.encode(P.REGISTER, VALID_REGISTER))
        time.sleep(0.3)
        assert cluster.stats()["n_workers"] == 3
        sock.close(0)
        _back_to_normal(cluster)
    finally:
        ctx.destroy(linger=0)


def _fake_worker_with_tasks(cluster, ctx):
    """A fake worker and a client whose job gave it tasks: (worker socket, client socket, task ids)."""
    sock = _fake_worker(cluster, ctx)
    client = _peer(cluster, "client", ctx)
    client.send_multipart(P.encode(P.SUBMIT, {"req": 1, "graph": JOB_GRAPH}))
    mine = _computed(sock)
    assert mine, "the fake worker was given no task"
    return sock, client, mine


def test_an_id_reported_twice_counts_once(cluster):
    """Before: UPDATE {finished: [t, t]} counted two data objects for t; one stayed
    counted forever."""
    ctx = zmq.Context()
    try:
        sock, client, mine = _fake_worker_with_tasks(cluster, ctx)
        t = mine[0]
        sock.send_multipart(P.encode(P.UPDATE, {"finished": P.ids_to_bytes([t, t, t]), "sizes": P.ids_to_bytes([1, 1, 1]),
                                                "lengths": P.ids_to_bytes([0, 0, 0])}))
        time.sleep(0.2)
        client.close(0)
        sock.close(0)
        _back_to_normal(cluster)
    finally:
        ctx.destroy(linger=0)


def test_a_redirection_is_never_read_from_a_path(cluster, tmp_path):
    """Before: a sub-plan given as a str was opened as a file by the server: a FIFO
    (or /dev/zero) hung it."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    ctx = zmq.Context()
    try:
        sock = _fake_worker(cluster, ctx)
        sock.send_multipart(P.encode(P.UPDATE, {"redirects": [[0, fifo], [1, "-"], [2, 7]]}))
        # a hung server does not answer within 1 s (and is freed below before the real
        # workers miss 3 s of heartbeats, so that the next tests still have them)
        with cluster.client(timeout=1) as client:
            assert client.get_stats()["n_workers"] == 3
        sock.close(0)
        _back_to_normal(cluster)
    finally:
        try:   # a hung server reads EOF from the FIFO and goes on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        ctx.destroy(linger=0)


@pytest.mark.parametrize("shape", ["redirection", "dget"])
def test_a_job_cancelled_mid_way_through_added_tasks_leaves_no_data(cluster, shape):
    """Before: the tasks added to a job after submission (a Python task's redirection
    sub-plan, the pieces of a dslice/dget) were outside the job's id range, so when the
    job was cancelled (here: its client disconnected) their data was never released."""
    if shape == "redirection":
        @tasks.py_task()
        def redirect(a):
            return tasks.merge((a, tasks.const("x"), tasks.const("y"), tasks.run(["sleep", "1"])))
        plan = redirect(tasks.const("base"))
    else:
        lines = tasks.split(tasks.const("".join(f"{i}\n" for i in range(12))))
        plan = tasks.array_make((tasks.run(["sh", "-c", "sleep 0.4; cat"], [(tasks.dget(lines), None)]),))
    client = cluster.client()
    client.submit(plan)
    wait_until(lambda: cluster.stats()["n_data_objects"] >= 3, 10, "the added tasks to start")
    client.close()
    time.sleep(1.2)   # the tasks that were running have ended
    _back_to_normal(cluster)


@pytest.mark.parametrize("auth", [False, True])
def test_a_connection_keeps_its_role(auth):
    """Before: without authentication, a welcome client's HELLO as a worker made it a
    worker, and its jobs were never cancelled when it left; with authentication, the
    HELLO got a CHALLENGE that its AUTH (taken as an ordinary message) never answered."""
    secret = P.new_secret() if auth else None
    gate = P.Gatekeeper(secret)
    admitted, reply = gate.handle(b"peer", P.HELLO, {"role": "client", "version": P.PROTOCOL_VERSION})
    if auth:
        nonce = P.decode(reply)[1]["nonce"]
        gate.handle(b"peer", P.AUTH, {"proof": P.proof(secret, nonce, "client")})
    assert gate.role(b"peer") == "client"
    admitted, reply = gate.handle(b"peer", P.HELLO, {"role": "worker", "version": P.PROTOCOL_VERSION})
    assert not admitted and P.decode(reply)[0] == P.REFUSED
    assert gate.role(b"peer") == "client"
    assert gate.handle(b"peer", P.STATS, {}) == (True, None)


def test_a_strangers_hello_is_logged_clipped():
    """Before: a 1 MB role (or version) in a stranger's HELLO became a 1 MB log line."""
    lines = []
    gate = P.Gatekeeper(P.new_secret(), log=lines.append)
    gate.handle(b"x", P.HELLO, {"role": "A" * 2**20, "version": 1})
    gate.handle(b"x", P.HELLO, {"role": "client", "version": "9" * 2**20})
    assert len(lines) == 2 and all(len(line) < 300 for line in lines)


def test_reported_sizes_cannot_break_the_statistics(cluster):
    """Before: sizes a worker reported were summed as they came: a size near 2**63
    pushed the transfer statistics past what msgpack encodes, and STATS was never
    answered again."""
    ctx = zmq.Context()
    try:
        sock, client, mine = _fake_worker_with_tasks(cluster, ctx)
        n = len(mine)
        sock.send_multipart(P.encode(P.UPDATE, {"finished": P.ids_to_bytes(mine), "sizes": P.ids_to_bytes([2**63 - 1] * n),
                                                "lengths": P.ids_to_bytes([-5] * n)}))
        for _ in range(4):   # one id at a time: an int64 sum of several would wrap around
            sock.send_multipart(P.encode(P.UPDATE, {"replicas": P.ids_to_bytes(mine[:1])}))
        with cluster.client(timeout=3) as healthy:
            assert healthy.get_stats()["n_workers"] == 3
            assert len(healthy.status()["workers"]) == 3
        client.close(0)
        sock.close(0)
        _back_to_normal(cluster)
    finally:
        ctx.destroy(linger=0)


def test_a_register_with_absurd_resources_is_refused(cluster):
    """Before: REGISTER {resources: {"gpu": 1e300}} was taken as int(1e300), which no
    STATUS reply could encode: STATUS went unanswered while that worker was there."""
    ctx = zmq.Context()
    try:
        for resources in ({"gpu": 1e300}, {"gpu": 2**64 - 1}, {"gpu": -1}, {"gpu": True}, [["gpu", 1]], {1: 1}):
            sock = _peer(cluster, "worker", ctx)
            sock.send_multipart([P.REGISTER, pack_map({**VALID_REGISTER, "resources": resources})])
            assert not sock.poll(150), "registered"
            with cluster.client(timeout=3) as client:
                assert len(client.status()["workers"]) == 2
            sock.close(0)
        _back_to_normal(cluster)
    finally:
        ctx.destroy(linger=0)


_any_value = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.binary(max_size=40),
                       st.text(max_size=8), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["ids", "count", "returned", "finished", "sizes", "lengths", "x"]),
                       _any_value, max_size=5))
def test_steal_requests_and_answers_decode_or_raise_a_protocol_error(body):
    """STEAL_TASKS and the other id commands (the worker's side) and UPDATE's
    ``returned`` (the server's side)."""
    for kind in (P.STEAL_TASKS, P.CANCEL_TASKS, P.RELEASE_DATA):
        try:
            ids, *count = P.decode_ids_command(kind, body)
        except P.ProtocolError:
            continue
        assert isinstance(ids, list) and all(type(i) is int for i in ids)
        assert count == [] if kind != P.STEAL_TASKS else (type(count[0]) is int and count[0] >= 0)
    try:
        update = P.decode_worker_event(P.UPDATE, body)
    except P.ProtocolError:
        return
    assert update.returned is None or update.returned.dtype == np.int64
