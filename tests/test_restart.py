"""A server that comes back: the journal, restore after SIGKILL, workers and the CLI that
find it again (real processes on 127.0.0.1), and the journal read byte for byte.

LOOMCTL_FAULT_ROUNDS sets how many random SIGKILLs the restart test makes (default 2;
the issue asks 20)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import graphfmt
from graphfmt import tasks
from loomctl import messages as M
from loomctl.core.restore import restore, snapshot
from loomctl.core.server import ServerCore
from loomctl.server import journal as J
from cluster import Cluster, wait_access
from test_reliability import wait_until

ROUNDS = int(os.environ.get("LOOMCTL_FAULT_ROUNDS", "2"))


# ---------------------------------------------------------------------- the journal file
def test_a_torn_tail_or_garbage_is_dropped_and_the_complete_records_kept(tmp_path):
    path = str(tmp_path / "journal")
    j = J.Journal(path)
    for k in range(5):
        j.add(["ids", k])
    j.flush(0.0)
    j.close()
    whole = open(path, "rb").read()
    for cut in (len(whole) - 1, len(whole) - 7):
        open(path, "wb").write(whole[:cut])
        records, end, dropped = J.load(path)
        assert [r[1] for r in records] == [0, 1, 2, 3] and dropped > 0
    open(path, "wb").write(whole + os.urandom(300))
    records, end, dropped = J.load(path)
    assert [r[1] for r in records] == [0, 1, 2, 3, 4] and dropped == 300 and end == len(whole)
    j = J.Journal(path, end)       # appending goes on where the good records end
    j.add(["ids", 5])
    j.close()
    assert [r[1] for r in J.load(path)[0]] == [0, 1, 2, 3, 4, 5]


def test_small_records_go_out_in_one_write_and_a_large_item_by_itself(tmp_path, monkeypatch):
    """A flush of many small records is one write (a system call each cost a busy server
    ~5 records' worth per job); a large item goes from where it is, between two writes."""
    writes = []
    real = os.write
    monkeypatch.setattr(J.os, "write", lambda fd, data: writes.append(len(data)) or real(fd, data))
    path = str(tmp_path / "journal")
    j = J.Journal(path)
    writes.clear()
    for k in range(100):
        j.add(["ids", k])
    j.flush(0.0)
    assert len(writes) == 1
    writes.clear()
    big = os.urandom(J.BIG_ITEM + 1)
    j.add(["ids", 100])
    j.add(["job", 2, 7, memoryview(big), {}])
    j.add(["ids", 101])
    j.flush(1.0)
    assert len(writes) == 3 and len(big) in writes
    j.close()
    records = J.load(path)[0]
    assert [r[1] for r in records if r[0] == "ids"] == list(range(102)) and records[101][3] == big


def test_a_large_graph_file_is_journaled_from_its_frame_byte_for_byte(tmp_path):
    path = str(tmp_path / "journal")
    big = os.urandom(J.BIG_ITEM + 12345)
    small = [["job", 1, 0, b"tiny", {"name": "a"}], ["job", 2, 7, memoryview(big), {"name": "b"}], ["ids", 9]]
    j = J.Journal(path)
    for record in small:
        j.add(record)
    assert any(isinstance(piece, memoryview) and len(piece) == len(big) for piece in j.pending)
    j.write()                      # (written at once, made durable by the next flush)
    assert not j.pending and j.unsynced and j.due(1.0) and not j.due(0.0)
    j.flush(1.0)
    assert not j.unsynced and not j.due(5.0)
    j.close()
    records, end, dropped = J.load(path)
    assert records == [["job", 1, 0, b"tiny", {"name": "a"}], ["job", 2, 7, big, {"name": "b"}], ["ids", 9]]
    assert dropped == 0 and end == os.path.getsize(path)
    whole = open(path, "rb").read()   # a flipped byte of the large item fails its record's crc
    k = whole.index(big[:64]) + 100
    open(path, "wb").write(whole[:k] + bytes([whole[k] ^ 1]) + whole[k + 1:])
    assert [r[1] for r in J.load(path)[0]] == [1]


def test_a_compaction_encodes_a_live_jobs_graph_in_the_journal_thread_without_joining_it(tmp_path, monkeypatch):
    """A snapshot holds a live job's Graph, not its file: the compaction, in the journal's
    thread, writes the file's pieces one after another (a 10 MB graph is never joined
    into one copy on the server's loop); the journal then gives back the same bytes."""
    writes = []
    real = os.write
    monkeypatch.setattr(J.os, "write", lambda fd, data: writes.append(len(data)) or real(fd, data))
    core = ServerCore()
    big = os.urandom(3 * J.BIG_ITEM)
    leaves = [tasks.const(big)] + [tasks.const(b"%d" % i) for i in range(100)]   # (not a tiny file)
    job = core.submit(b"c", graphfmt.read(graphfmt.to_bytes(graphfmt.build_graph([tasks.merge(leaves)])[0])), 0.0)
    records = snapshot(core, {})
    (graph,) = [r[3] for r in records if r[0] == "job"]
    assert isinstance(graph, graphfmt.Graph)
    path = str(tmp_path / "journal")
    writer = J.JournalWriter(J.Journal(path))
    writer.compact(records, 1.0)
    writer.close()
    assert len(big) < max(writes) < len(big) + 1000 < os.path.getsize(path)   # (the configs, by themselves)
    (back,) = [r for r in J.load(path)[0] if r[0] == "job"]
    assert back[1:3] == [job.id, job.base] and back[3] == graphfmt.to_bytes(graph)
    assert graphfmt.read(back[3]).config(0) == big


def test_a_journal_of_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "journal"
    path.write_bytes(J.MAGIC + (J.VERSION + 1).to_bytes(2, "little"))
    with pytest.raises(J.JournalError, match="newer"):
        J.load(str(path))


# ---------------------------------------------------------------------- the core, restored
def test_a_restored_core_finishes_what_survived_and_computes_the_rest():
    """A job half done, its journal replayed into a new core: the workers that come back
    bring data, only the missing tasks run again, the result is complete."""
    def register(address):
        return M.Register("w", "h", 1, {}, [], address)

    leaves = [tasks.const(f"{i}") for i in range(6)]
    mids = [tasks.merge(leaves[i:i + 2]) for i in range(0, 6, 2)]
    graph_bytes = graphfmt.to_bytes(graphfmt.build_graph([tasks.merge(mids)])[0])
    a = ServerCore()
    a.record = []
    w = a.add_worker(b"w0", register("tcp://w0:1"), 0.0)
    job = a.submit(None, graphfmt.read(graph_bytes), 0.0, detached=True)
    a.record.insert(0, ["job", job.id, job.base, graph_bytes, {"detached": True}])
    ids = np.arange(job.base, job.base + job.n)
    root = int(job.results[0])
    leaf_ids = ids[[len(a.graph.inputs(int(t))) == 0 for t in ids]]
    mid_ids = np.array([t for t in ids if t != root and t not in leaf_ids])
    a.schedule(0.0)
    a.tasks_finished(w, leaf_ids, np.full(6, 1), np.zeros(6, np.int64), 0.0)
    a.schedule(0.0)
    a.tasks_finished(w, mid_ids[:2], np.full(2, 2), np.zeros(2, np.int64), 0.0)   # two of three done
    records = [["server", {"port": 1}], *a.record, ["ids", int(a.cols.n)]]
    held = np.flatnonzero(a.cols.owner[:a.cols.n] >= 0)     # what the worker holds at the crash

    b = ServerCore()
    summary = restore(b, records, 10.0, hold_s=5.0)
    b.check_invariants()
    assert summary["jobs"] == 1 and summary["tasks_finished"] == 8
    back = b.add_worker(b"w0", register("tcp://w0:1"), 11.0)
    b.data_returned(back, held, np.full(len(held), 1), np.zeros(len(held), np.int64), 11.0)
    b.check_invariants()
    assert b.schedule(12.0) == 0                             # still waiting for workers
    b.take_commands()
    assert b.schedule(16.0) > 0
    given = {row.id: row.ahead for cmd in b.take_commands() if isinstance(cmd, M.Compute) for row in cmd.rows}
    assert given == {int(mid_ids[2]): False, root: True}     # only the missing mid (its leaves came back),
    #                                                          and the root, given ahead of it (core.speculation)
    b.check_invariants()
    # the live state written as records and read again gives the same core
    c = ServerCore()
    records = snapshot(b, {})
    assert all(isinstance(r[3], graphfmt.Graph) for r in records if r[0] == "job")   # (encoded by the journal)
    restore(c, [[*r[:3], graphfmt.to_bytes(r[3]), *r[4:]] if r[0] == "job" else r for r in records], 20.0, 0.0)
    c.check_invariants()
    assert (c.cols.state[:b.cols.n] == b.cols.state[:b.cols.n])[b.cols.state[:b.cols.n] != 2].all()


# ---------------------------------------------------------------------- real processes
def _restart(c: Cluster):
    """Start the server again on the same server directory (its journal), like a user."""
    c.server = c._spawn(["server", "start", "--port", "0", "--verbose", "--heartbeat-timeout", "5",
                         "--restore-wait", "2"], f"server-{len(c.logs)}")
    # (the killed server's access file is still there: wait for the new server's own)
    return wait_until(lambda: (lambda a: a if a.get("pid") == c.server.pid else None)(
        wait_access(c.server_dir, c.server, lambda: "")), 20)


COUNTED = r"""import os, sys
with open(sys.argv[1], "a") as f:
    f.write(sys.argv[2] + "\n")
import time; time.sleep(float(sys.argv[3]))
sys.stdout.write(sys.stdin.read() + sys.argv[2] + ";")
"""


def test_a_killed_server_comes_back_and_its_detached_job_completes(tmp_path):
    c = Cluster(tmp_path, workers=2, cpus=1, heartbeat_timeout=5.0)
    runs = tmp_path / "runs.txt"
    script = tmp_path / "step.py"
    script.write_text(COUNTED)
    rng = random.Random(3)
    reruns = []
    try:
        for round_ in range(ROUNDS):
            runs.write_text("")
            chain = None
            for i in range(8):   # a chain with data dependencies, one step every ~0.2 s
                step = tasks.run([sys.executable, str(script), str(runs), f"s{i}", "0.2"],
                                 [(chain, None)] if chain is not None else [])
                chain = step
            plan = tmp_path / f"plan{round_}.loom"
            graphfmt.write(str(plan), [chain])
            out = subprocess.run([sys.executable, "-m", "loomctl", "submit", str(plan), "--json"], env=c.env,
                                 capture_output=True, text=True, check=True)
            job = json.loads(out.stdout)["job"]
            wait_until(lambda: len(runs.read_text().split()) >= rng.randint(1, 5), 30)
            old_port = c.access["port"]
            c.server.send_signal(signal.SIGKILL)
            c.server.wait()
            c.access = _restart(c)
            assert c.access["port"] == old_port
            with c.client() as client:
                wait_until(lambda: len(client.status()["workers"]) == 2, 30)   # they joined again
                assert client.status()["server"]["restored"]["jobs"] >= 1
            with c.client() as client:
                wait_until(lambda: any(j["id"] == job and j["status"] == "finished" for j in client.status()["jobs"]),
                           60)
            got = subprocess.run([sys.executable, "-m", "loomctl", "job", "results", str(job), "-q"], env=c.env,
                                 capture_output=True, text=True, timeout=60)
            assert got.returncode == 0, got.stderr
            assert got.stdout == "".join(f"s{i};" for i in range(8))
            ran = runs.read_text().split()
            # every step ran; one ran twice at most: the one running at the kill (and its
            # successors only if the kill lost its input)
            assert sorted(set(ran)) == [f"s{i}" for i in range(8)]
            assert len(ran) - 8 <= 2, ran
            reruns.append(len(ran) - 8)
        print(f"\nserver SIGKILLed {ROUNDS} times mid-job: every job right, steps run again per kill: {reruns}")
    finally:
        c.stop()


def test_restart_with_no_worker_left_and_garbage_after_the_journal(tmp_path):
    """Server and workers all SIGKILLed, the journal's tail damaged: the restarted server
    keeps the complete records, says what it dropped, and its job completes once a new
    worker joins."""
    c = Cluster(tmp_path, workers=1, cpus=1)
    try:
        plan = tmp_path / "plan.loom"
        graphfmt.write(str(plan), [tasks.merge([tasks.run(["sh", "-c", f"sleep 0.3; echo {i}"]) for i in range(6)])])
        out = subprocess.run([sys.executable, "-m", "loomctl", "submit", str(plan), "--json"], env=c.env,
                             capture_output=True, text=True, check=True)
        job = json.loads(out.stdout)["job"]
        time.sleep(0.2)   # (any moment will do: the job is in the journal once submit answered)
        for p in [*c.workers, c.server]:
            p.send_signal(signal.SIGKILL)
            p.wait()
        with open(os.path.join(c.server_dir, "journal"), "ab") as f:
            f.write(b"\x40\x00\x00\x00garbage that is no record")
        c.access = _restart(c)
        c.add_worker(cpus=1, name="new")
        with c.client() as client:
            wait_until(lambda: any(j["id"] == job and j["status"] == "finished" for j in client.status()["jobs"]), 60)
        got = subprocess.run([sys.executable, "-m", "loomctl", "job", "results", str(job), "-q"], env=c.env,
                             capture_output=True, text=True, timeout=60)
        assert got.stdout == "".join(f"{i}\n" for i in range(6)), got.stderr
        log = open(os.path.join(c.dir, f"server-{len(c.logs) - 2}.log")).read()
        assert "dropped 29 bytes after its last complete record" in log, log
        assert "restored 1 jobs" in log
        status = subprocess.run([sys.executable, "-m", "loomctl", "status"], env=c.env, capture_output=True,
                                text=True, timeout=30)
        assert "restored" in status.stdout and "1 jobs from the journal" in status.stdout, status.stdout
    finally:
        c.stop()


def test_a_journal_from_a_newer_loomctl_is_refused_at_start(tmp_path):
    directory = tmp_path / "server"
    directory.mkdir()
    (directory / "journal").write_bytes(J.MAGIC + (J.VERSION + 1).to_bytes(2, "little"))
    out = subprocess.run([sys.executable, "-m", "loomctl", "server", "start", "--port", "0", "--server-dir",
                          str(directory)], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 3
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "newer" in errors[0], out.stderr


def test_a_python_client_waits_through_a_restart_within_its_grace(tmp_path):
    c = Cluster(tmp_path, workers=1, cpus=1)
    try:
        client = c.client(server_grace=60)
        step = None
        for i in range(6):
            step = tasks.run(["sh", "-c", f"sleep 0.3; cat; echo {i}"], [(step, None)] if step is not None else [])
        future = client.submit_one(step)
        time.sleep(0.5)   # (some steps done: any moment would do)
        c.server.send_signal(signal.SIGKILL)
        c.server.wait()
        c.access = _restart(c)
        assert future.gather() == b"".join(f"{i}\n".encode() for i in range(6))
        client.close()
    finally:
        c.stop()


# ---------------------------------------------------------------------- a full disk
FULL_DISK_KB = 256


class FullDiskCluster(Cluster):
    """A cluster whose server journals onto a FULL_DISK_KB tmpfs of its own (a private
    mount namespace: ``unshare --mount``, root only): the journal fills that disk."""

    def __init__(self, directory, **kw):
        self.journal_dir = os.path.join(str(directory), "journal-disk")
        os.makedirs(self.journal_dir, exist_ok=True)
        super().__init__(directory, server_args=["--journal", os.path.join(self.journal_dir, "journal")], **kw)

    def _spawn(self, args, name):
        if name != "server":
            return super()._spawn(args, name)
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")
        self.logs.append(log)
        script = f'mount -t tmpfs -o size={FULL_DISK_KB}k tmpfs "$0" && exec "$@"'
        return subprocess.Popen(["unshare", "--mount", "sh", "-c", script, self.journal_dir, sys.executable, "-m",
                                 "loomctl", *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env)


def _can_mount_a_private_tmpfs(tmp_path) -> bool:
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(tmp_path)],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_under_the_journal_does_not_stop_the_server(tmp_path):
    """The journal's disk fills up (a real ENOSPC): the server says so in its log and goes
    on serving; jobs before, during and after complete with their results."""
    if not _can_mount_a_private_tmpfs(tmp_path):
        pytest.skip("needs root: a private mount namespace with a tmpfs (unshare --mount)")
    c = FullDiskCluster(tmp_path, workers=2, cpus=1)
    try:
        with c.client() as client:
            assert client.gather([client.submit_one(tasks.const(b"before"))]) == [b"before"]
            big = os.urandom((FULL_DISK_KB + 64) * 1024)   # its graph file alone does not fit
            many = [tasks.merge([tasks.const(big), tasks.const(b"!")])] + [tasks.const(b"%d" % i) for i in range(50)]
            results = client.gather(client.submit(many))
            assert results[0] == big + b"!" and results[1:] == [b"%d" % i for i in range(50)]
            # (the journal is written within FLUSH_S: wait for the server to meet the full disk)
            wait_until(lambda: "No space left on device" in c.log("server") or c.server.poll() is not None, 30)
            assert c.server.poll() is None, c.log("server")
            for k in range(3):   # the disk is still full: later records do not fit either
                assert client.gather([client.submit_one(tasks.const(b"after%d" % k))]) == [b"after%d" % k]
            assert client.get_stats()["n_workers"] == 2
        assert c.server.poll() is None, c.log("server")
        (line,) = [x for x in c.log("server").splitlines() if "No space left on device" in x]
        assert "journal" in line and c.journal_dir in line
    finally:
        c.stop()


def test_the_journal_thread_writes_in_order_and_a_failed_write_leaves_only_complete_records(tmp_path, monkeypatch):
    """JournalWriter: what is handed over is written in order; a write that fails midway
    (ENOSPC after some bytes) is cut back to the last complete record, said once, and
    later records are dropped until a compaction writes the live state whole again."""
    import errno
    path = str(tmp_path / "journal")
    writer = J.JournalWriter(J.Journal(path))
    writer.add([["ids", 1], ["ids", 2]])
    writer.write_now([["ids", 3]])
    assert [r[1] for r in J.load(path)[0]] == [1, 2, 3]
    wait_until(lambda: not writer.journal.unsynced, 10)   # fsynced within FLUSH_S, unasked
    real, budget = os.write, [10]

    def full_disk(fd, data):   # room for 10 more bytes, then ENOSPC
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(memoryview(data)[:budget[0]]))
        budget[0] -= n
        return n
    monkeypatch.setattr(J.os, "write", full_disk)
    errors = []
    monkeypatch.setattr(J.log, "error", lambda *a: errors.append(a[0] % a[1:]))
    writer.write_now([["ids", 4, b"x" * 100]])
    writer.write_now([["ids", 5]])   # broken: dropped, not written after a gap
    assert writer.broken and len(errors) == 1 and "No space left on device" in errors[0] and path in errors[0]
    records, end, dropped = J.load(path)
    assert [r[1] for r in records] == [1, 2, 3] and dropped == 0   # no torn record left behind
    assert writer.wants_compaction(time.monotonic() + J.RETRY_S, retired=False)
    writer.compact([["ids", 9]], time.monotonic())   # the disk is still full: still broken
    writer.write_now([])
    assert writer.broken and [r[1] for r in J.load(path)[0]] == [1, 2, 3]
    monkeypatch.setattr(J.os, "write", real)   # space again
    writer.compact([["ids", 10]], time.monotonic())
    writer.add([["ids", 11]])
    writer.close()
    assert not writer.broken and [r[1] for r in J.load(path)[0]] == [10, 11] and len(errors) == 1


def test_a_new_job_is_written_at_once_and_other_records_are_gathered_first(tmp_path, monkeypatch):
    """A server killed right after it acknowledged a job must not forget it (found by the
    restart test: a job submitted ~50 ms before a SIGKILL was not in the journal): a batch
    with a job record is written without the BATCH_S gathering, which is held here until
    the job is on file, and so is one the loop waits for (write_now); a batch of other
    records still waits for it."""
    import threading
    import types
    held, slept = threading.Event(), []

    def sleep(seconds):   # (the thread's gathering, held)
        slept.append(seconds)
        held.wait(60)
    monkeypatch.setattr(J, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    path = str(tmp_path / "journal")
    writer = J.JournalWriter(J.Journal(path))
    try:
        writer.add([["job", 1, 0, b"a graph file", {"name": "plan"}]])
        wait_until(lambda: [r[0] for r in J.load(path)[0]] == ["job"], 30)
        writer.write_now([["ids", 9]])   # (the loop waits for it: not gathered either)
        assert [r[0] for r in J.load(path)[0]] == ["job", "ids"] and slept == []
        writer.add([["end", 1, "finished", None]])
        wait_until(lambda: slept == [J.BATCH_S], 30)   # gathered first
        held.set()
        wait_until(lambda: [r[0] for r in J.load(path)[0]] == ["job", "ids", "end"], 30)
    finally:
        held.set()
        writer.close()


def test_a_journal_thread_that_stops_on_a_bug_is_said_once_and_holds_nothing_back(tmp_path, monkeypatch):
    path = str(tmp_path / "journal")
    writer = J.JournalWriter(J.Journal(path))
    errors = []
    monkeypatch.setattr(J.log, "error", lambda *a: errors.append(a[0] % a[1:]))
    monkeypatch.setattr(writer, "_apply", lambda items: 1 / 0)   # (a bug in the thread)
    writer.write_now([["ids", 1]])   # returns: it does not wait for a dead thread
    wait_until(lambda: writer.dead, 10)
    writer.add([["ids", 2]])
    writer.compact([["ids", 3]], time.monotonic())
    assert writer._items == [] and len(errors) == 1 and "thread stopped" in errors[0] and path in errors[0]
    writer.close()   # (joins a thread that is gone)
