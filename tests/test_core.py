"""The server core driven by events, without sockets; invariants checked after every step."""

import numpy as np
import pytest

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from loomctl import messages as M
from loomctl import protocol as P
from loomctl.core.server import ServerCore, SubmitError
from loomctl.core.tasktable import CANCELLED, READY, SKIPPED, WAITING
from loomctl.core import placement


class Ref:
    """What a client future looks like to the builder: something with a task_id."""

    def __init__(self, task_id):
        self.task_id = task_id


def register(cpus=1, address="addr", resources=None, symbols=()):
    return M.Register("", "", cpus, resources or {}, list(symbols), address)


def wire(commands):
    """(target, kind, body) of each command, as the protocol sends it."""
    for cmd in commands:
        target, frames = P.encode_command(cmd)
        kind, body, blobs = P.decode(frames)
        if kind == P.COMPUTE and "columns" in body:   # (many rows go as columns: read back as rows)
            body = {**body, "tasks": [list(row) for row in P.compute_rows(body, blobs)]}
        yield target, kind, body


class Env:
    """A core plus simulated workers that 'run' what they are told."""

    def __init__(self, *cpus, sizes=None):
        self.core = ServerCore()
        self.now = 0.0
        self.wids = [self.core.add_worker(f"w{k}".encode(), register(c, f"addr{k}"), 0.0)
                     for k, c in enumerate(cpus)]
        self.sizes = sizes or {}
        self.assigned = {w: [] for w in self.wids}
        self.sent = []

    def submit(self, results, client=b"c", **kw):
        graph, ids = graphfmt.build_graph(results, external=lambda f: tasks.Task(S.FUTURE, (), S.encode_u64(f.task_id)))
        job = self.core.submit(client, graph, self.now, **kw)
        self.check()
        return job, [job.base + i for i in ids]

    def schedule(self):
        self.core.schedule(self.now)
        self.drain()
        self.check()

    def drain(self):
        for target, message, body in wire(self.core.take_commands()):
            self.sent.append((target, message, body))
            if message == P.COMPUTE:
                wid = self.wids[int(target[1:])]
                self.assigned[wid].extend(t[0] for t in body["tasks"])

    def finish(self, wid, ids=None, size=None):
        ids = list(self.assigned[wid] if ids is None else ids)
        for t in ids:
            self.assigned[wid].remove(t)
        sizes = np.array([self.sizes.get(t, size or 10) for t in ids], dtype=np.int64)
        self.core.tasks_finished(wid, np.array(ids, dtype=np.int64), sizes, np.zeros(len(ids), np.int64), self.now)
        self.drain()
        self.check()

    def run_all(self, rounds=100):
        for _ in range(rounds):
            self.schedule()
            busy = [w for w in self.wids if self.assigned[w]]
            if not busy:
                return
            for w in busy:
                self.finish(w)
        raise AssertionError("did not finish")

    def check(self):
        self.core.check_invariants()

    def replace_worker(self, k: int) -> int:
        """Worker k is lost (what it was given, with it) and a new one-cpu worker joins;
        returns the new worker's id."""
        self.core.remove_worker(self.wids[k], self.now)
        self.assigned[self.wids[k]].clear()
        w = self.core.add_worker(f"w{len(self.wids)}".encode(), register(1, f"addr{len(self.wids)}"), self.now)
        self.wids.append(w)
        self.assigned[w] = []
        self.drain()
        self.check()
        return w

    def messages(self, kind):
        return [(t, b) for t, m, b in self.sent if m == kind]


def merge_tree(leaves):
    level = [tasks.const(str(i)) for i in range(leaves)]
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    return level[0]


def test_merge_tree_runs_to_the_end_and_frees_intermediates():
    env = Env(1, 1)
    job, (root,) = env.submit([merge_tree(64)])
    env.run_all()
    assert job.status == "finished"
    assert env.core.n_data == 1 and env.core.cols.owner[root] >= 0
    done = env.messages(P.JOB_DONE)
    assert done and done[-1][1]["status"] == "finished"
    env.core.release(np.array([root]))
    env.drain()
    assert env.core.n_data == 0



def test_small_results_a_client_waits_for_are_sent_along_with_the_finish():
    env = Env(1)
    job, (root,) = env.submit([tasks.merge([tasks.const("a"), tasks.const("b")])])
    env.core.submit(None, graphfmt.build_graph([tasks.const("nobody waits")])[0], 0.0)   # no watcher
    env.core.schedule(0.0)
    rows = [row for _, message, body in wire(env.core.take_commands()) if message == P.COMPUTE
            for row in body["tasks"]]
    inline = {row[0]: row[8] for row in rows}
    assert inline == {root - 2: False, root - 1: False, root: True, root + 1: False}   # the client's result
    assert [row[0] for row in rows if row[9]] == [root]   # (given ahead of its inputs: core.speculation)
    env.core.tasks_finished(env.wids[0], np.array([root - 2, root - 1, root + 1]), np.ones(3, np.int64),
                            np.zeros(3, np.int64), 0.0)
    env.core.tasks_finished(env.wids[0], np.array([root]), np.ones(1, np.int64), np.zeros(1, np.int64), 0.0,
                            inline={root: b"encoded ab"})
    ready = [body for _, message, body in wire(env.core.take_commands()) if message == P.RESULTS_READY]
    assert len(ready) == 1
    body = ready[0]
    assert P.ids_from_bytes(body["ids"]).tolist() == [root]
    assert P.ids_from_bytes(body["inline"]).tolist() == [root] and body["blobs"] == [b"encoded ab"]
    assert env.core.cols.owner[root] == env.wids[0]   # the worker keeps it: others may fetch it

def test_light_tasks_spread_over_workers():
    env = Env(1, 1)
    env.submit([tasks.const(str(i)) for i in range(100)])
    env.schedule()
    assert len(env.assigned[0]) == 50 and len(env.assigned[1]) == 50


def test_consumer_goes_where_its_big_input_is():
    env = Env(1, 1, sizes={})
    a, b = tasks.const("a"), tasks.const("b")
    c = tasks.run("cat", [(a, "x"), (b, "y")])
    job, ids = env.submit([c])
    env.schedule()
    on0, on1 = list(env.assigned[0]), list(env.assigned[1])
    env.sizes = {on0[0]: 5_000_000, on1[0]: 10}
    env.finish(0)
    env.finish(1)
    env.schedule()
    assert env.assigned[0] == [ids[0]]
    compute = env.messages(P.COMPUTE)[-1][1]
    assert compute["locations"] == {on1[0]: "addr1"}


def test_cpu_requests_respect_worker_size_with_a_short_queue():
    env = Env(2)
    work = [tasks.run("true") for _ in range(6)]
    for w in work:
        w.resource_request = tasks.cpus(2)
    env.submit(work)
    env.schedule()
    # 2 cpus + a queue of the same size: two 2-cpu tasks may be assigned, not more
    assert len(env.assigned[0]) == 2
    env.finish(0, env.assigned[0][:1])
    env.schedule()
    assert len(env.assigned[0]) == 2



def test_a_batch_of_one_cpu_tasks_is_placed_as_one_at_a_time_would_be():
    rng = np.random.default_rng(7)
    for _ in range(200):
        shape = [(int(rng.integers(0, 5)), int(rng.integers(0, 9)), int(rng.integers(1, 4)))
                 for _ in range(int(rng.integers(1, 5)))]   # (cpus, assigned, queue factor)
        n = int(rng.integers(8, 40))
        rooms = lambda: [placement.WorkerRoom(k, c, a, 0, queue_factor=q) for k, (c, a, q) in enumerate(shape)]
        none = np.full(n, -1, dtype=np.int64)
        batch, single = rooms(), rooms()
        at_once = placement.place(np.ones(n, np.int64), np.zeros(n, np.int64), none, np.zeros(n, np.int64), batch)
        one_by_one = np.concatenate([placement.place(np.ones(1, np.int64), np.zeros(1, np.int64), none[:1],
                                                     np.zeros(1, np.int64), single) for _ in range(n)])
        assert at_once.tolist() == one_by_one.tolist(), shape
        assert [w.assigned_cpus for w in batch] == [w.assigned_cpus for w in single]


def test_queue_grows_for_a_worker_that_finishes_short_tasks_fast():
    from loomctl.core import placement
    fast, slow = Env(1), Env(1)
    for env, step in ((fast, 0.0001), (slow, 0.5)):   # 10,000 tasks/s against 2 tasks/s
        env.submit([tasks.run("true") for _ in range(400)])
        env.schedule()
        assert len(env.assigned[0]) == placement.QUEUE_FACTOR   # a short queue to begin with
        for _ in range(150):
            env.now += step
            env.finish(0, env.assigned[0][:1])
            env.schedule()
            assert len(env.assigned[0]) <= placement.MAX_QUEUE_FACTOR
    # (a queue is refilled once half of it is used up: placement.wants_work)
    assert fast.core.workers[fast.wids[0]].queue_factor == placement.MAX_QUEUE_FACTOR
    assert placement.MAX_QUEUE_FACTOR // 2 < len(fast.assigned[0]) <= placement.MAX_QUEUE_FACTOR
    assert len(slow.assigned[0]) == placement.QUEUE_FACTOR
    fast.core.check_invariants()
    # the fast worker's tasks turn long: after a second without a finish its queue is short
    worker = fast.core.workers[fast.wids[0]]
    fast.now += 1.0
    fast.submit([tasks.run("true")])
    fast.schedule()
    assert worker.queue_factor <= 2 * placement.QUEUE_FACTOR
    fast.finish(0, fast.assigned[0])
    fast.schedule()
    assert len(fast.assigned[0]) <= 2 * placement.QUEUE_FACTOR


def test_the_queue_grows_within_milliseconds_once_many_short_tasks_finished():
    """Before a whole RATE_WINDOW has passed: RATE_TASKS finishes over a tenth of it are
    rate enough (a job of short tasks is not run a round trip per task for 50 ms)."""
    from loomctl.core import placement
    from loomctl.core.workers import Worker
    env = Env(1)
    env.submit([tasks.run("true") for _ in range(400)])
    env.schedule()
    worker = env.core.workers[env.wids[0]]
    finished = 0
    while worker.queue_factor == placement.QUEUE_FACTOR:
        env.now += 0.0005
        env.finish(0, env.assigned[0][:1])
        env.schedule()
        finished += 1
    assert finished == Worker.RATE_TASKS and env.now < Worker.RATE_WINDOW / 2
    assert len(env.assigned[0]) > placement.QUEUE_FACTOR


def test_a_report_of_short_cpu_tasks_deepens_the_queue_at_once_and_one_of_long_tasks_or_quiet_shortens_it():
    """UPDATE cpu_busy: a worker that says its cpu tasks ran 10 us each gets a queue twice
    as deep per report, up to QUEUE_SECONDS of them (not after RATE_TASKS finishes two at
    a time); a report of long tasks, or two rate windows without finishes, bring it back."""
    from loomctl.core import placement
    from loomctl.core.workers import Worker
    env = Env(1)
    env.submit([tasks.run("true") for _ in range(400)])
    env.schedule()
    worker = env.core.workers[env.wids[0]]
    assert len(env.assigned[0]) == placement.QUEUE_FACTOR
    depths = []
    while worker.queue_factor < placement.MAX_QUEUE_FACTOR:
        env.core.cpu_tasks_ran(worker.id, 2, 0.00002)
        env.now += 0.0001
        env.finish(0, env.assigned[0][:2])
        env.schedule()
        depths.append(worker.queue_factor)
        assert len(depths) < 10
    assert depths == [2 ** k for k in range(2, 2 + len(depths))]   # 4, 8, ... MAX_QUEUE_FACTOR
    assert len(env.assigned[0]) == placement.MAX_QUEUE_FACTOR
    env.core.cpu_tasks_ran(worker.id, 1, 2.0)   # its tasks turned long: at once
    assert worker.queue_factor == placement.QUEUE_FACTOR
    env.core.cpu_tasks_ran(worker.id, 4, 0.0001)   # short again: twice as deep
    assert worker.queue_factor == 2 * placement.QUEUE_FACTOR
    env.now += 1.0   # then no finish for a second (two rate windows and more)
    env.schedule()
    assert worker.queue_factor == worker.busy_factor == placement.QUEUE_FACTOR
    env.core.check_invariants()


def test_zero_cpu_task_with_a_named_resource_goes_only_where_it_is():
    env = Env(1)
    gpu = env.core.add_worker(b"w1", register(1, "addr-g", {"gpu": 1}), 0.0)
    env.wids.append(gpu)
    env.assigned[gpu] = []
    work = [tasks.const(f"t{i}") for i in range(4)]
    for w in work:
        w.resource_request = tasks.ResourceRequest(0, gpu=1)
    env.submit(work)
    env.schedule()
    assert env.assigned[env.wids[0]] == []          # the worker without the resource gets none
    assert len(env.assigned[gpu]) == 1              # one at a time: there is one gpu
    sent = [body for target, kind, body in env.sent if kind == P.COMPUTE]
    assert sent[-1]["tasks"][0][5] == {"gpu": 1}    # and the worker is told what it reserves
    env.finish(gpu)
    env.schedule()
    assert len(env.assigned[gpu]) == 1
    assert env.core.workers[gpu].assigned_resources == {"gpu": 1}
    env.core.check_invariants()


def test_unsatisfiable_request_fails_the_job():
    env = Env(2)
    t = tasks.run("true")
    t.resource_request = tasks.cpus(3)
    job, _ = env.submit([t])
    assert job.status == "failed"
    assert "requests 3 cpus" in job.error["message"] and "largest connected worker has 2" in job.error["message"]


def test_task_failure_fails_the_job_cancels_the_rest_and_releases_data():
    env = Env(1)
    env.core.options.speculate = False   # (one round at a time: nothing is given ahead)
    a = tasks.const("a")
    bad = tasks.run("false", [(a, None)])
    after = tasks.merge((bad, a))
    job, _ = env.submit([after])
    env.schedule()
    env.finish(0)              # a
    env.schedule()
    (bad_id,) = env.assigned[0]
    env.core.tasks_failed(0, [(bad_id, "exit status 1")], env.now)
    env.assigned[0].clear()
    env.drain()
    env.check()
    assert job.status == "failed" and job.error["id"] == bad_id
    assert env.core.cols.state[job.base + 2] == CANCELLED
    assert env.core.n_data == 0
    failed = env.messages(P.TASK_FAILED)
    assert failed[0][1]["message"] == "exit status 1"
    # the next job runs normally
    job2, _ = env.submit([tasks.const("x")])
    env.run_all()
    assert job2.status == "finished"


def test_futures_as_inputs_and_release_after_use():
    env = Env(1)
    job1, (a,) = env.submit([tasks.const("a")])
    env.run_all()
    job2, (m,) = env.submit([tasks.merge([Ref(a), Ref(a)])])   # a future, used twice
    assert env.core.cols.holds[a] == 3               # client + two slots
    env.run_all()
    assert job2.status == "finished"
    env.core.release(np.array([a, m]))
    env.drain()
    env.check()
    assert env.core.n_data == 0


def test_released_or_unknown_future_is_refused():
    env = Env(1)
    _, (a,) = env.submit([tasks.const("a")])
    env.run_all()
    env.core.release(np.array([a]))
    with pytest.raises(SubmitError, match="unknown, failed or released"):
        env.submit([tasks.merge([Ref(a)])])
    with pytest.raises(SubmitError):
        env.submit([tasks.merge([Ref(12345)])])


def test_same_task_in_two_submissions_is_computed_twice():
    env = Env(1)
    t = tasks.const("a")
    j1, (x,) = env.submit([t])
    j2, (y,) = env.submit([t])
    assert x != y
    env.run_all()
    assert j1.status == j2.status == "finished"


def test_worker_loss_reruns_tasks_and_recomputes_lost_data():
    env = Env(1, 1)
    a, b = tasks.const("a"), tasks.const("b")
    ma = tasks.run("cat", [(a, None)])
    mb = tasks.run("cat", [(b, None)])
    top = tasks.merge((ma, mb))
    job, _ = env.submit([top])
    env.schedule()
    env.finish(0)
    env.finish(1)
    env.schedule()
    # worker 1 dies holding data and running a task
    env.core.remove_worker(1, env.now)
    env.assigned[1].clear()
    env.drain()
    env.check()
    env.run_all()
    assert job.status == "finished"


def test_a_copy_fetched_just_before_its_source_was_lost_is_kept_for_the_task_that_fetched_it():
    # (chaos in CI) a const's holder was killed after a consumer's worker had fetched a
    # copy but before its replica report came; the const was being computed again, so the
    # report's copy was released under the queued consumer ("input 258 was released from
    # this worker before the task started"). That copy is the data: it is taken as held
    env = Env()
    here = env.core.add_worker(b"w0", register(1, "addr-y", {"y": 1}), 0.0)
    there = env.core.add_worker(b"w1", register(1, "addr-z", {"z": 1}), 0.0)
    env.wids = [here, there]
    env.assigned = {here: [], there: []}
    source = tasks.const("on the worker that will be lost")
    source.resource_request = tasks.ResourceRequest(1, y=1)
    consumer = tasks.merge([source])
    consumer.resource_request = tasks.ResourceRequest(1, z=1)
    job, (m,) = env.submit([consumer])
    a = m - 1
    env.schedule()
    env.finish(here)
    env.schedule()
    assert env.assigned[there] == [m]
    env.core.remove_worker(here, env.now)       # killed; its const is to be computed again
    env.assigned[here].clear()
    env.drain()
    env.check()
    env.core.replicas_added(there, np.array([a]), env.now)   # the copy it fetched before
    env.drain()
    env.check()
    released = [P.ids_from_bytes(body["ids"]).tolist() for target, kind, body in env.sent
                if kind == P.RELEASE_DATA and target == b"w1"]
    assert not any(a in ids for ids in released)
    assert env.core.cols.owner[a] == there
    env.finish(there)
    assert job.status == "finished"


def test_a_task_whose_input_could_not_be_fetched_from_a_live_peer_runs_again_then_fails():
    # a blip between two workers (a peer's data port unreachable for a while, a link that
    # timed out) costs an attempt, not the job; a path that stays broken fails it
    env = Env(1, 1)
    source = tasks.const("made on one worker")
    job, (a,) = env.submit([source])
    env.schedule()
    env.finish(next(w for w in env.wids if env.assigned[w]))
    consumer = tasks.merge([Ref(a)])
    job2, (m,) = env.submit([consumer])
    for attempt in range(3):
        env.schedule()
        (w,) = [w for w in env.wids if m in env.assigned[w]]
        env.assigned[w].remove(m)
        env.core.tasks_failed(w, [(m, f"input {a} is unavailable: peer addr0 did not answer within 10 s")],
                              env.now, unfetched=np.array([m]))
        env.drain()
        env.check()
        if attempt < 2:   # (waiting again, to be placed anew)
            assert job2.status == "running" and env.core.cols.state[m] in (WAITING, READY)
    assert job2.status == "failed" and "did not answer" in job2.error["message"]
    assert "3 times" in job2.error["message"]
    other, (t,) = env.submit([tasks.run("false")])   # a failure of the task itself: no second try
    env.schedule()
    (w,) = [w for w in env.wids if t in env.assigned[w]]
    env.core.tasks_failed(w, [(t, "exit status 1")], env.now, unfetched=np.array([m]))
    assert other.status == "failed"


def test_a_task_computed_again_for_another_jobs_sake_that_fails_fails_that_job():
    # (found by the core's property test) job 1 finished; job 2 reads its result z; z's
    # worker was lost, so z and what it came from are computed again as tasks of job 1;
    # one of them failed: job 1 had ended, and job 2 waited for ever on z
    env = Env(1)
    x = tasks.const("x")
    y = tasks.run("cat", [(x, None)])
    z = tasks.merge([y])
    job1, (zid,) = env.submit([z])
    env.run_all()
    assert job1.status == "finished"
    job2, (m,) = env.submit([tasks.merge([Ref(zid)])], client=b"c2")
    w = env.replace_worker(0)    # before job 2's task ran: z is computed again
    env.schedule()
    env.finish(w, [zid - 2])                          # x again
    env.schedule()
    assert zid - 1 in env.assigned[w]   # (z and job 2's task may be given ahead of it)
    env.core.tasks_failed(w, [(zid - 1, "exit status 1")], env.now)   # y fails this time
    env.assigned[w].clear()
    env.drain()
    env.check()
    assert job2.status == "failed", job2.status
    assert "did not finish" in job2.error["message"]
    assert env.core.cols.state[zid] == CANCELLED


def test_a_failure_computing_again_for_a_chain_of_ended_jobs_fails_the_job_at_its_end():
    # (found by the core's property test) job 1 finished with z; job 2 finished with
    # z2 = merge(z), through a future; job 3 reads z2. z2's worker was lost, so z2 (job
    # 2's) and z, y, x (job 1's) are computed again; y fails. z is cancelled with job 1,
    # and z2 must be too: job 2 had ended as well, and job 3 waited on z2 for ever
    env = Env(1)
    x = tasks.const("x")
    y = tasks.run("cat", [(x, None)])
    job1, (zid,) = env.submit([tasks.merge([y])])
    env.run_all()
    job2, (z2,) = env.submit([tasks.merge([Ref(zid)])], client=b"c2")
    env.run_all()
    assert job1.status == job2.status == "finished"
    job3, (m,) = env.submit([tasks.merge([Ref(z2)])], client=b"c3")
    w = env.replace_worker(0)    # before job 3's task ran: all computed again
    env.schedule()
    env.finish(w, [zid - 2])                          # x again
    env.schedule()
    assert zid - 1 in env.assigned[w]
    env.core.tasks_failed(w, [(zid - 1, "exit status 1")], env.now)   # y fails this time
    env.assigned[w].clear()
    env.drain()
    env.check()
    c = env.core.cols
    assert c.state[zid] == CANCELLED and c.state[z2] == CANCELLED
    assert job3.status == "failed", job3.status
    assert "did not finish" in job3.error["message"]


def test_a_task_that_kills_its_worker_three_times_fails():
    env = Env(1)
    t = tasks.run("crash")
    job, (tid,) = env.submit([t])
    for k in range(3):
        env.schedule()
        assert env.assigned[env.wids[-1]] == [tid]
        env.core.remove_worker(env.wids[-1], env.now)
        env.wids.append(env.core.add_worker(f"w{len(env.wids)}".encode(), register(1), env.now))
        env.assigned[env.wids[-1]] = []
        env.drain()
        env.check()
    assert job.status == "failed" and "lost 3 times" in job.error["message"]


def test_checkpoint_load_skips_the_task_and_its_private_inputs(tmp_path):
    path = tmp_path / "ckpt"
    path.write_bytes(b"saved")
    a = tasks.const("expensive")
    b = tasks.run("cat", [(a, None)])
    b.checkpoint_path = str(path)
    c = tasks.merge((b, tasks.const("!")))
    env = Env(1)
    job, _ = env.submit([c], load=True)
    assert env.core.cols.state[job.base + 0] == SKIPPED          # a: needed only by b
    env.schedule()
    compute = [t for _, body in env.messages(P.COMPUTE) for t in body["tasks"]]
    loaded = [t for t in compute if t[0] == job.base + 1]
    assert loaded and loaded[0][1] == S.OPEN and loaded[0][2] == str(path).encode() and loaded[0][3] == []
    assert loaded[0][6] is None   # (loaded from its checkpoint: not written back to it)
    env.run_all()
    assert job.status == "finished"


def test_dslice_expands_into_slices_feeding_copies():
    env = Env(1, 1)
    x = tasks.const("abcdefgh")
    f = tasks.run("wc -c", [(tasks.dslice(x), None)])
    result = tasks.array_make((f,))
    job, (rid,) = env.submit([result])
    env.schedule()
    env.core.tasks_finished(env.wids[0] if env.assigned[0] else 1, np.array([job.base]), np.array([8]),
                            np.array([8]), env.now)
    for w in env.wids:
        env.assigned[w] = [t for t in env.assigned[w] if t != job.base]
    env.drain()
    env.schedule()
    compute = [t for _, body in env.messages(P.COMPUTE) for t in body["tasks"]]
    slices = [t for t in compute if t[1] == S.SLICE]
    assert len(slices) == 8           # 4 per cpu, but never more pieces than the length
    env.run_all()
    assert job.status == "finished"
    gather = [t for _, body in env.messages(P.COMPUTE) for t in body["tasks"] if t[0] == rid]
    assert gather[0][1] == S.ARRAY_MAKE and len(gather[0][3]) == 8


def test_redirection_runs_the_subplan_in_place_of_the_task():
    env = Env(1)
    env.core.options.speculate = False   # (one round at a time: nothing is given ahead)
    a = tasks.const("a")
    p = tasks.py_call(lambda x: x, [a])
    top = tasks.merge((p, tasks.const("!")))
    job, _ = env.submit([top])
    env.run_all_but = None
    env.schedule()
    env.finish(0)        # a, the function value, "!"
    env.schedule()
    (pid,) = [t for t in env.assigned[0]]
    sub = graphfmt.build_graph([tasks.merge((tasks.Task(S.TASK_INPUT, (), S.encode_u64(1)), tasks.const("b")))])[0]
    env.assigned[0].clear()
    env.core.task_redirected(0, pid, sub, env.now)
    env.drain()
    env.check()
    env.run_all()
    assert job.status == "finished"
    assert env.core.n_data == 1


def test_preferences_pick_the_worker_with_most_bytes():
    best, nbytes = placement.preferences(np.array([0, 0, 0, 1]), np.array([0, 1, 1, -1]),
                                         np.array([5, 3, 3, 9]), 2)
    assert best.tolist() == [1, -1] and nbytes.tolist() == [6, 0]


def test_results_of_a_cancelled_job_arriving_late_are_dropped():
    env = Env(1)
    job, _ = env.submit([tasks.merge([tasks.run("sleep 1") for _ in range(2)])])
    env.schedule()
    assert env.assigned[0]
    env.core.cancel(job.id, env.now)
    env.finish(0)                 # the running tasks end after the cancellation
    assert env.core.n_data == 0
    assert any(m == P.RELEASE_DATA for _, m, _ in env.sent)


def test_an_ended_job_that_holds_nothing_is_retired_and_kept_as_a_status_row():
    env = Env(1)
    job, (root,) = env.submit([merge_tree(8)])
    keeper, (kept,) = env.submit([tasks.const("kept")])
    env.run_all()
    assert job.status == keeper.status == "finished"
    assert env.core.retire_jobs(env.now + 0.5) == 0          # too recent
    assert env.core.retire_jobs(env.now + 5) == 0            # both still hold their results
    # a later job uses the kept result as a future: it must survive its own release
    user, (m,) = env.submit([tasks.merge([Ref(kept), tasks.const("!")])])
    env.core.release(np.array([root, kept]))
    env.drain()
    assert env.core.retire_jobs(env.now + 5) == 1            # the tree's job; kept is held by `user`
    assert job.id not in env.core.jobs and keeper.id in env.core.jobs
    assert env.core.segs.segments[job.segments[0]] is None
    env.run_all()
    env.core.release(np.array([m]))
    env.drain()
    env.check()
    assert env.core.retire_jobs(env.now + 5) == 2 and env.core.jobs == {}
    rows = {row["id"]: row for row in env.core.status(env.now)["jobs"]}
    assert rows[job.id]["status"] == "finished" and rows[job.id]["finished"] == 15
    assert env.core.retired_row(user.id)["total"] == 2
    # the ids of retired jobs are refused as futures; new work is unaffected
    with pytest.raises(SubmitError):
        env.submit([tasks.merge([Ref(root)])])
    job2, (r2,) = env.submit([merge_tree(4)])
    env.run_all()
    assert job2.status == "finished" and env.core.cols.owner[r2] >= 0


def test_a_failed_job_stops_its_running_tasks_and_is_retired():
    env = Env(1, 1)
    job, _ = env.submit([tasks.merge([tasks.run("a"), tasks.run("b")])])
    env.schedule()
    (w0, ids0), (w1, ids1) = [(w, list(env.assigned[w])) for w in env.wids]
    env.core.tasks_failed(w0, [(ids0[0], "boom")], env.now)
    env.drain()
    assert job.status == "failed"
    cancels = env.messages(P.CANCEL_TASKS)   # the other run is stopped on its worker
    assert [P.ids_from_bytes(body["ids"]).tolist() for _, body in cancels] == [ids1]
    assert env.core.cols.state[ids1[0]] == CANCELLED
    assert env.core.retire_jobs(env.now + 5) == 1 and env.core.jobs == {}
    assert env.core.retired_row(job.id)["status"] == "failed"
    env.finish(w1)                                            # a late result is released there
    assert env.messages(P.RELEASE_DATA)[-1][1]["ids"] == P.ids_to_bytes(ids1)


def test_a_task_is_never_pinned_to_a_worker_that_cannot_run_it():
    env = Env(1)
    env.core.options.speculate = False   # (one round at a time: nothing is given ahead)
    gpu = env.core.add_worker(b"w1", register(1, "addr-g", {"gpu": 1}), 0.0)
    env.wids.append(gpu)
    env.assigned[gpu] = []
    big = tasks.const("x")
    job, (use,) = env.submit([tasks.merge([big])])
    env.schedule()
    holder = next(w for w in env.wids if env.assigned[w])
    env.finish(holder, size=5 << 20)   # 5 MiB on whichever worker made it
    # a consumer asking for the resource that only the other worker has
    t = tasks.merge([Ref(job.base)])
    t.resource_request = tasks.ResourceRequest(1, gpu=1)
    job2, (tid,) = env.submit([t])
    env.schedule()
    assert tid in env.assigned[gpu]   # (it used to wait for ever where its input is)


def test_only_tasks_that_were_running_on_a_lost_worker_count_as_attempts():
    env = Env(1)
    job, ids = env.submit([tasks.run(f"t{i}") for i in range(8)])
    env.schedule()
    wid = env.wids[0]
    given = sorted(env.assigned[wid])
    assert len(given) == 2                         # one running, one queued (a queue as long as the cpus)
    env.core.heartbeat(wid, {"running_ids": given[:1]}, env.now)
    env.core.remove_worker(wid, env.now)
    attempts = env.core.cols.attempts
    assert attempts[given[0]] == 1 and attempts[given[1]] == 0
    assert (attempts[job.base:job.base + 8] == 0).sum() == 7
    env.check()


def test_a_task_killing_its_worker_fails_its_job_and_the_rest_is_cancelled():
    env = Env(2)
    job, ids = env.submit([tasks.run(f"t{i}") for i in range(8)])
    for k in range(3):
        env.schedule()
        wid = env.wids[-1]
        env.core.remove_worker(wid, env.now)       # no heartbeat: its 2 oldest count
        env.wids.append(env.core.add_worker(f"w{len(env.wids)}".encode(), register(2), env.now))
        env.assigned[env.wids[-1]] = []
        env.drain()
        env.check()
    assert job.status == "failed" and "lost 3 times" in job.error["message"]
    assert job.error["id"] == job.base and (env.core.cols.attempts[job.base + 2:job.base + 8] == 0).all()


def test_a_worker_that_joins_again_brings_its_data_back():
    env = Env(1, 1)
    a, b = tasks.const("a"), tasks.const("b")
    top = tasks.merge((tasks.run("cat", [(a, None)]), tasks.run("cat", [(b, None)])))
    job, (root,) = env.submit([top])
    env.schedule()
    env.finish(0)
    env.finish(1)
    held_by_1 = [t for t in range(job.base, job.base + 5) if env.core.cols.owner[t] == 1]
    assert held_by_1
    env.core.remove_worker(1, env.now)            # dropped (silent too long); its data is recomputed
    env.wids.remove(1)
    del env.assigned[1]
    env.drain()
    env.check()
    back = env.core.add_worker(b"w1", register(1, "addr1"), env.now)
    env.wids.append(back)
    env.assigned[back] = []
    held = np.array(held_by_1, dtype=np.int64)
    env.core.data_returned(back, held, np.full(len(held), 10), np.zeros(len(held), np.int64), env.now)
    env.drain()
    env.check()
    assert (env.core.cols.owner[held] == back).all() and (env.core.cols.state[held] == 3).all()
    env.run_all()
    assert job.status == "finished"


def test_a_compute_of_tasks_whose_segments_are_out_of_row_order_gives_each_its_inputs():
    """Rows and segment slots are reused: a segment may lie below one with a lower slot.
    One COMPUTE holding tasks of both still gives every task its own inputs, in order."""
    from loomctl.core import compute
    env = Env(1)

    def job(*names):
        return env.submit([tasks.merge([tasks.const(x) for x in names])])

    old = [job("a", "b"), job("c", "d")]
    keep = job("e", "f")
    env.run_all()
    for _, (root,) in old:
        env.core.release(np.array([root]))
    env.drain()
    assert env.core.retire_jobs(env.now + 5) == 2   # their rows and slots are free again
    new = [job("g", "h"), job("i", "j")]
    g = env.core.graph
    merges = [int(g.rows_of(np.array([j.base + 2]))[0]) for j, _ in (keep, *new)]
    slots = [int(g.segs.of(np.array([m]))[0]) for m in merges]
    assert any((s1 < s2) != (m1 < m2) for s1, m1 in zip(slots, merges) for s2, m2 in zip(slots, merges))
    worker = env.core.workers[env.wids[0]]
    ids = merges + [merges[0] - 1]
    cmd = compute.compute(env.core, worker, np.array(ids, dtype=np.int64))
    assert [r.id for r in cmd.rows] == g.segs.ids_of(ids).tolist()   # (a COMPUTE names global ids)
    for row in cmd.rows:
        symbol, config, inputs = g.task(int(g.rows_of(np.array([row.id]))[0]))
        assert (row.symbol, row.config, row.inputs) == (symbol, bytes(config), g.segs.ids_of(inputs).tolist())


def test_a_worker_joining_a_small_cluster_and_the_others_are_told_each_others_data_addresses():
    """PEERS: links made before the first fetch (in a cluster of at most EAGER_PEERS)."""
    from loomctl import messages as M
    from loomctl.core import workers
    env = Env(1)
    env.core.take_commands()
    wid = env.core.add_worker(b"late", M.Register("late", "", 1, {}, [], "tcp://late"), env.now)
    peers = [c for c in env.core.take_commands() if isinstance(c, M.Peers)]
    assert {(c.target, tuple(c.addresses)) for c in peers} == {(b"late", ("addr0",)), (b"w0", ("tcp://late",))}
    for k in range(workers.EAGER_PEERS):   # a larger cluster: links on first use only
        env.core.add_worker(b"x%d" % k, M.Register(f"x{k}", "", 1, {}, [], f"tcp://x{k}"), env.now)
    assert len(env.core.workers) > workers.EAGER_PEERS and wid in env.core.workers
    told = [c for c in env.core.take_commands() if isinstance(c, M.Peers)]
    assert told and all(len(c.addresses) < workers.EAGER_PEERS for c in told)
    assert not any(c.target == b"x%d" % (workers.EAGER_PEERS - 1) for c in told)


def test_a_compute_of_a_few_rows_is_the_one_built_column_wise(tmp_path):
    """A few rows are built one by one, many column-wise: the same message for the same
    rows, with inputs to fetch from an owner or a copy (spread), inputs not computed yet
    (ahead), a large config (a view, listed), labels, checkpoint paths, a task replaced by
    its checkpoint's load (other inputs than in its segment) and results a client waits for."""
    from loomctl.core import compute
    saved = tmp_path / "saved"
    saved.write_bytes(b"saved")
    big = tasks.const(b"x" * 70000)
    big.label = "big"
    b, c = tasks.const("b"), tasks.const("c")
    m = tasks.merge((big, b))
    m.checkpoint_path = str(tmp_path / "m")
    r = tasks.run("cat", [(c, None)])
    top = tasks.merge((m, r, b))
    env = Env(1, 1, 1)
    job, ids = env.submit([top, b])
    env.core.job_results(job.id, b"c")   # (the client waits: results come inline)
    a2 = tasks.const("a2")
    loaded = tasks.run("cat", [(a2, None)])
    loaded.checkpoint_path = str(saved)
    env.submit([tasks.merge((loaded, tasks.const("!")))], load=True)
    env.schedule()
    b_id, c_id = ids[1], job.base + 3   # (b and c: finished; the large const stays assigned)
    for w in env.wids:
        env.finish(w, [t for t in env.assigned[w] if t in (b_id, c_id)])
    rows = env.core.graph.rows_of(np.array([b_id]))
    holder = int(env.core.cols.owner[rows[0]])
    copy = next(w for w in env.wids if w != holder)
    env.core.replicas_added(copy, rows, env.now)   # a copy of b
    c_ = env.core.cols
    live = np.flatnonzero(c_.state[:c_.n] != 3)[::-1]
    assert len(live) >= 6
    sent_as_columns = 0
    for worker in env.core.workers.values():
        for k in range(len(live)):
            for n in (1, 2, 3):
                ids_ = live[k:k + n]
                few, columns = compute._compute_few(env.core, worker, ids_), compute._compute_columns(env.core, worker, ids_)
                assert (few.rows, few.locations, few.jobs.tolist(), few.large) == \
                    (list(columns.rows), columns.locations, columns.jobs.tolist(), columns.large)
                # without a large config the rows stay columns, and read back the same off the wire
                if type(columns.rows) is M.ComputeColumns:
                    sent_as_columns += 1
                    _, body, blobs = P.decode(P.encode_command(columns)[1])
                    assert list(P.compute_rows(body, blobs)) == few.rows
    assert sent_as_columns
    every = compute._compute_few(env.core, env.core.workers[next(w for w in env.wids if w not in (holder, copy))], live)
    assert any(row.ahead for row in every.rows) and every.large and every.locations
    assert any(row.label == "big" for row in every.rows) and any(row.checkpoint for row in every.rows)
    assert any(row.inline for row in every.rows) and any(row.symbol == S.OPEN for row in every.rows)


def test_many_rows_go_as_columns_and_read_back_as_the_rows_they_stand_for(tmp_path):
    """A COMPUTE of more than compute.FEW rows and no large config is ComputeColumns: the
    same rows as the row-by-row builder makes, in the order given, off the wire too, and
    the same tasks for the worker (labels, a checkpoint, a result a client waits for,
    tasks given ahead, inputs held elsewhere, rows of two jobs)."""
    from loomctl.core import compute
    from loomctl.worker.taskqueue import TaskSpec
    env = Env(1, 1)
    leaves = [tasks.const(b"x%d" % i) for i in range(40)]
    for i, t in enumerate(leaves[:5]):
        t.label = f"leaf{i}"
    level = leaves
    while len(level) > 1:
        level = [tasks.merge(level[i:i + 2]) for i in range(0, len(level), 2)]
    level[0].checkpoint_path = str(tmp_path / "root")
    job, (root,) = env.submit([level[0]])
    env.core.job_results(job.id, b"c")   # (a client waits: the root comes inline)
    env.schedule()
    env.finish(env.wids[1])   # what w1 was given is held there: inputs elsewhere for w0
    env.submit([tasks.merge([tasks.const(str(i)) for i in range(20)])])   # (a second segment)
    from loomctl.core.tasktable import LIVE
    c = env.core.cols
    live = np.flatnonzero(LIVE[c.state[:c.n]])
    worker = env.core.workers[env.wids[0]]
    rng = np.random.default_rng(3)
    for chosen in (live, live[::-1], rng.permutation(live), live[:compute.FEW + 1]):
        few, columns = compute._compute_few(env.core, worker, chosen), compute._compute_columns(env.core, worker, chosen)
        assert type(columns.rows) is M.ComputeColumns and len(columns.rows) == len(chosen)
        assert (list(columns.rows), columns.locations, columns.jobs.tolist()) == (few.rows, few.locations, few.jobs.tolist())
        _, body, blobs = P.decode(P.encode_command(columns)[1])
        sent = P.compute_rows(body, blobs)
        assert list(sent) == few.rows
        assert TaskSpec.from_columns(sent) == [TaskSpec.from_wire(list(row)) for row in few.rows]
    every = compute._compute_few(env.core, worker, live)
    rows = every.rows
    assert any(r.label for r in rows) and any(r.checkpoint for r in rows) and any(r.inline for r in rows)
    assert any(r.ahead for r in rows) and every.locations and len(set(c.job[live].tolist())) == 2


def test_ranges_concatenates_each_range_whatever_their_lengths():
    """segments.ranges (CSR gathers): rows all of one, all of two or of mixed lengths,
    none, int32 or int64 bounds; always int64, in order."""
    from loomctl.core.segments import ranges
    rng = np.random.default_rng(7)
    for _ in range(500):
        n = int(rng.integers(0, 9))
        starts = rng.integers(0, 100, n)
        ends = starts + (int(rng.integers(0, 4)) if rng.random() < 0.6 else rng.integers(0, 4, n))
        expected = [x for a, b in zip(starts.tolist(), ends.tolist()) for x in range(a, b)]
        for dtype in (np.int32, np.int64):
            got = ranges(starts.astype(dtype), ends.astype(dtype))
            assert got.dtype == np.int64 and got.tolist() == expected


def test_add_at_counts_every_occurrence_of_a_row():
    """tasktable.add_at is np.add.at: repeated rows count once each, few or many rows,
    narrow, sparse or huge spans, int32 or int64 rows, into int32 columns."""
    from loomctl.core.tasktable import BINCOUNT_SPAN, add_at
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.choice([0, 1, 5, 63, 64, 200, 3000, 40000]))
        span = int(rng.choice([10, 1000, 100000, 2 * BINCOUNT_SPAN]))
        rows = rng.integers(0, span, n).astype(rng.choice([np.int32, np.int64]))
        delta = int(rng.choice([1, -1, 3]))
        got, expected = np.zeros(span, np.int32), np.zeros(span, np.int32)
        add_at(got, rows, delta)
        np.add.at(expected, rows, delta)
        assert (got == expected).all()
