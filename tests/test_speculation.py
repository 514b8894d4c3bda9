"""Speculative assignment (core.speculation): tasks given to the worker computing their
inputs ahead of time, bounded, and taken back when their producer does not finish; the
worker's side (a task given ahead starts only once its input is made there); and a real
cluster running chains, with a worker killed mid-chain."""

import signal

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from loomctl import protocol as P
from loomctl.core import speculation
from loomctl.core.tasktable import ASSIGNED, CANCELLED, FAILED, FINISHED, WAITING
from loomctl.worker import state as W
from loomctl.worker.data import Plain
from loomctl.worker.outcome import Outcome
from test_core import Env
from test_worker_state import reports, row


def chain(n, head=None):
    t = head or tasks.const(b"x")
    for _ in range(n - 1):
        t = tasks.merge([t])
    return t


def rows_of(env, kind=P.COMPUTE):
    return [r for _, body in env.messages(kind) for r in body["tasks"]]


# ---------------------------------------------------------------------- the server core
def test_a_chain_goes_to_its_worker_ahead_of_time_in_one_compute():
    env = Env(1)
    job, (last,) = env.submit([chain(20)])
    env.schedule()
    rows = rows_of(env)
    assert [r[0] for r in rows] == list(range(job.base, job.base + 20))   # producers first
    assert [r[9] for r in rows] == [False] + [True] * 19                  # the rest given ahead
    c = env.core.cols
    assert (c.state[job.base:job.base + 20] == ASSIGNED).all()
    env.finish(env.wids[0])   # the worker reports them in the order it ran them
    assert job.status == "finished" and c.state[last] == FINISHED
    assert env.core.stats["speculated"] == 19 and env.core.stats["rounds"] == 1


def test_a_source_of_many_consumers_gives_them_ahead_over_columns_as_task_by_task(monkeypatch):
    # a split's thousand pieces: more than SMALL_WALK consumers are looked at over columns;
    # what goes ahead is what the task-by-task walk gives when it may look at them all
    def given(small_walk):
        monkeypatch.setattr(speculation, "SMALL_WALK", small_walk)
        walks = []
        for name in ("small", "large"):
            original = getattr(speculation._Walk, name)
            monkeypatch.setattr(speculation._Walk, name,
                                lambda self, seeds, _o=original, _n=name: walks.append(_n) or _o(self, seeds))
        env = Env(1)
        lines = tasks.split(tasks.const(b"a\n" * 100))
        pieces = [tasks.get(lines, i) for i in range(100)]
        job, _ = env.submit([tasks.merge([p]) for p in pieces])
        env.schedule()
        speculation.check(env.core)
        monkeypatch.undo()
        return sorted(int(t) - job.base for t in env.assigned[env.wids[0]]), walks
    by_columns, walks = given(32)
    task_by_task, walks_tbt = given(10_000)
    assert walks[0] == walks_tbt[0] == "small"   # (the split's consumers; the generations after it
    assert walks.count("large") == walks_tbt.count("large") + 1   # are many seeds: over columns anyway)
    assert by_columns == task_by_task == list(range(2 + 100 + 100))   # all of it ahead


def test_a_walk_over_columns_takes_consumers_of_earlier_generations_once_their_inputs_are_taken():
    # generations over columns (more than 8 seeds): d_i has inputs from the two generations
    # before it; late_i is a consumer of the first generation whose other input (d_i) is
    # taken only two generations later: it is left out until then, and taken once
    leaves = [tasks.const(b"%d" % i) for i in range(12)]
    b = [tasks.merge([x]) for x in leaves]
    c = [tasks.merge([y, x]) for y, x in zip(b, leaves)]
    d = [tasks.merge([z, y]) for z, y in zip(c, b)]
    late = [tasks.merge([y, w]) for y, w in zip(b, d)]
    env = Env(1)
    job, results = env.submit(late)
    env.schedule()
    speculation.check(env.core)
    rows = [r[0] for r in rows_of(env)]
    assert sorted(rows) == list(range(job.base, job.base + 60)) and len(rows) == 60   # each once
    position = {t: k for k, t in enumerate(rows)}
    g = env.core.graph
    for t in rows:   # producers before consumers
        assert all(position[int(i)] < position[t] for i in g.inputs(t).tolist())
    env.finish(env.wids[0])
    assert job.status == "finished" and env.core.stats["rounds"] == 1


def test_the_lookahead_is_bounded_and_later_rounds_go_on_from_the_frontier(monkeypatch):
    monkeypatch.setattr(speculation, "SPECULATE_LIGHT", 8)
    env = Env(1)
    job, (last,) = env.submit([chain(30)])
    env.schedule()
    given = env.assigned[env.wids[0]]
    assert len(given) == 8   # the head, and ahead of their inputs up to 8 light tasks assigned
    assert env.core.frontier
    rounds = 0
    while job.status == "running":
        env.finish(env.wids[0], given[:5])   # part of what it was given
        env.schedule()
        assert len(env.assigned[env.wids[0]]) <= 8
        rounds += 1
        assert rounds < 20
    assert env.core.cols.state[last] == FINISHED
    assert max(len(body["tasks"]) for _, body in env.messages(P.COMPUTE)) <= 8


def test_a_consumer_with_an_input_elsewhere_is_not_given_ahead():
    env = Env(1, 1)
    a, b = tasks.const(b"a"), tasks.const(b"b")
    job, (top,) = env.submit([tasks.merge([a, b])])
    env.schedule()
    w0, w1 = env.wids
    if set(env.assigned[w0]) == {job.base, job.base + 1} or set(env.assigned[w1]) == {job.base, job.base + 1}:
        assert top in env.assigned[w0] + env.assigned[w1]   # both inputs on one worker: given ahead there
    else:
        assert top not in env.assigned[w0] + env.assigned[w1]
        assert env.core.cols.state[top] == WAITING


def test_finished_inputs_elsewhere_are_fetched_by_a_task_given_ahead():
    env = Env(1, 1)
    job, (done,) = env.submit([tasks.const(b"far")])
    env.schedule()
    holder = next(w for w in env.wids if env.assigned[w])
    env.finish(holder)
    other = next(w for w in env.wids if w != holder)
    head = tasks.const(b"near")
    job2, (top,) = env.submit([tasks.merge([tasks.merge([head]), Ref(done)])])
    env.sent.clear()
    env.schedule()
    c = env.core.cols
    (target, body), = [(t, b) for t, b in env.messages(P.COMPUTE) if top in [r[0] for r in b["tasks"]]]
    (r,) = [r for r in body["tasks"] if r[0] == top]
    assert r[9] and r[3][1] == done   # given ahead of its first input, with the far one finished
    if c.owner[done] != env.wids[int(target[1:])]:
        assert done in {int(k) for k in body["locations"]}   # fetched from its holder, as usual
    env.run_all()
    assert job2.status == "finished" and other in env.wids


def test_the_last_branch_of_a_reduction_gets_the_root_ahead_when_the_other_branch_finishes():
    env = Env(1, 1)
    job, (top,) = env.submit([tasks.merge([chain(4), chain(4)])])
    env.schedule()
    w0, w1 = env.wids
    c = env.core.cols
    assert env.assigned[w0] and env.assigned[w1] and c.state[top] == WAITING   # a branch each
    first, last = (w0, w1) if top - 1 in env.assigned[w1] else (w1, w0)
    env.sent.clear()
    env.finish(first)   # one branch is done; the other is still computed on ``last``
    env.schedule()
    assert c.state[top] == ASSIGNED and c.worker[top] == last
    (target, body), = [(t, b) for t, b in env.messages(P.COMPUTE)]
    assert target == f"w{last}".encode()
    (r,) = body["tasks"]
    assert r[0] == top and r[9]   # given ahead of its input made there
    assert {int(k) for k in body["locations"]} == {t for t in r[3] if c.owner[t] == first}   # the other, fetched
    env.check()
    env.run_all()
    assert job.status == "finished"
    assert [t for _, b in env.messages(P.COMPUTE) for t in [r[0] for r in b["tasks"]]].count(top) == 1


def test_a_consumer_waiting_for_inputs_on_two_workers_is_not_given_ahead_when_a_third_finishes():
    env = Env(1, 1)
    heads = [tasks.merge([tasks.run("true")]) for _ in range(2)]   # (a cpu task each: one per worker)
    job, (top,) = env.submit([tasks.merge([chain(3, heads[0]), chain(3, heads[1]), tasks.const(b"c")])])
    env.schedule()
    c = env.core.cols
    g = env.core.graph
    *branch_ends, const = sorted(g.inputs(top).tolist(), key=lambda t: g.symbols[c.symbol[t]] == S.CONST)
    assert all(c.state[t] == ASSIGNED for t in branch_ends)
    holders = {int(c.worker[t]) for t in branch_ends}
    assert len(holders) == 2   # a chain each (placement spreads them)
    env.finish(int(c.worker[const]), [const])
    env.schedule()
    assert c.state[top] == WAITING   # two workers still compute its inputs: the rounds decide
    env.check()
    env.run_all()
    assert job.status == "finished"


class Ref:
    def __init__(self, task_id):
        self.task_id = task_id


def test_a_failed_producer_takes_its_consumers_back_with_cancel_tasks():
    env = Env(1)
    head = tasks.run("false")
    job, (last,) = env.submit([chain(5, tasks.merge([head]))])
    env.schedule()
    w = env.wids[0]
    head_id = job.base
    assert len(env.assigned[w]) == 6
    env.core.tasks_failed(w, [(head_id, "exit 1")], env.now)
    env.drain()
    env.check()
    c = env.core.cols
    assert job.status == "failed" and c.state[head_id] == FAILED
    assert (c.state[job.base + 1:job.base + 6] == CANCELLED).all()
    cancelled = {t for _, body in env.messages(P.CANCEL_TASKS) for t in P.ids_from_bytes(body["ids"]).tolist()}
    assert cancelled == set(range(job.base + 1, job.base + 6))


def test_a_consumer_of_another_job_given_ahead_waits_again_when_its_producer_is_cancelled():
    env = Env(1)
    job, (mid,) = env.submit([chain(3)], client=b"a")
    env.schedule()
    env.finish(env.wids[0])
    # a second job: a chain whose head uses the first job's result, its tail given ahead
    head = tasks.merge([Ref(mid)])
    job2, (last,) = env.submit([chain(4, head)], client=b"b")
    job3, (other,) = env.submit([chain(3, tasks.merge([tasks.run("sleep")]))], client=b"c")
    env.schedule()
    c = env.core.cols
    ahead = [t for t in env.assigned[env.wids[0]] if c.state[t] == ASSIGNED and t >= job3.base + 2]
    assert ahead   # the consumers of job 3's run task, given ahead
    env.core.cancel(job3.id, env.now)
    env.drain()
    env.check()
    assert (c.state[job3.base:job3.base + job3.n] == CANCELLED).all()
    cancelled = {t for _, body in env.messages(P.CANCEL_TASKS) for t in P.ids_from_bytes(body["ids"]).tolist()}
    assert set(range(job3.base, job3.base + job3.n)) <= cancelled   # the whole chain, not only its tail
    env.run_all()
    assert job2.status == "finished"


def test_a_worker_lost_mid_chain_gives_everything_back_and_the_chain_still_ends():
    env = Env(1, 1)
    job, (last,) = env.submit([chain(12)])
    env.schedule()
    w = next(w for w in env.wids if env.assigned[w])
    given = list(env.assigned[w])
    env.finish(w, given[:4])
    env.core.remove_worker(w, env.now)
    env.assigned[w] = []
    env.drain()
    env.check()
    c = env.core.cols
    assert not (c.state[job.base:job.base + 12] == ASSIGNED).any()
    assert not [t for t, m, _ in env.sent if m == P.CANCEL_TASKS and t == f"w{w}".encode()]
    env.run_all()
    assert job.status == "finished" and c.state[last] == FINISHED


def test_the_property_machine_sees_speculation():
    """(A guard for the fuzzing: the machine's plans do make tasks that go ahead.)"""
    env = Env(2)
    job, _ = env.submit([chain(3), chain(2)])
    env.schedule()
    assert env.core.stats.get("speculated", 0) >= 3


# ---------------------------------------------------------------------- the worker
def ahead(tid, inputs, cpus=0):
    return [*row(tid, inputs, cpus), True]


def test_a_task_given_ahead_starts_only_after_its_input_is_made_here():
    s = W.WorkerState(cpus=1)
    out = s.handle([W.Compute([row(1, [], cpus=1), ahead(2, [1], cpus=1), ahead(3, [2])], {})], 0.0)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [1]
    s.check()
    out = s.handle([W.TaskDone(Outcome(1, Plain(b"a"), 1))], 0.01)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [2]
    assert 1 in s.store
    out = s.handle([W.TaskDone(Outcome(2, Plain(b"b"), 1))], 0.02)
    (execute,) = [i for i in out if isinstance(i, W.Execute)]
    assert execute.spec.id == 3 and execute.inputs == [Plain(b"b")]
    out = s.handle([W.TaskDone(Outcome(3, Plain(b"c"), 1))], 0.03)
    finished = [t for body in reports(out) for t in P.ids_from_bytes(body["finished"]).tolist()]
    s.check()
    assert set(finished) <= {1, 2, 3} and finished[-1] == 3


def test_tasks_given_ahead_of_a_failed_producer_are_dropped_without_a_report():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(1, [], cpus=1), ahead(2, [1]), ahead(3, [2])], {})], 0.0)
    out = s.handle([W.TaskDone(Outcome(1, error="boom"))], 0.01)
    assert not [i for i in out if isinstance(i, W.Execute)]
    failed = [f[0] for body in reports(out) for f in body.get("failed", [])]
    assert failed == [1]   # only the producer: the server takes the others back
    assert not s.queue.queued and s.queue.dropped == 2
    s.check()


def test_tasks_given_ahead_of_a_cancelled_producer_never_start():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(1, [], cpus=1), row(4, [], cpus=1), ahead(2, [4]), ahead(3, [2])], {})], 0.0)
    out = s.handle([W.CancelTasks([4])], 0.01)   # queued behind 1: dropped, and so are 2 and 3
    assert not s.queue.queued and not reports(out)
    out = s.handle([W.TaskDone(Outcome(1, Plain(b"a"), 1))], 0.02)
    assert not [i for i in out if isinstance(i, W.Execute)]
    s.check()
    # a running producer cancelled: its result is not kept, what was given ahead of it never starts
    s.handle([W.Compute([row(5, [], cpus=1), ahead(6, [5])], {})], 0.03)
    out = s.handle([W.CancelTasks([5, 6])], 0.04)
    assert [type(i) for i in out if isinstance(i, W.Kill)] == [W.Kill]
    out = s.handle([W.TaskDone(Outcome(5, Plain(b"late"), 1))], 0.05)
    assert not [i for i in out if isinstance(i, W.Execute)] and 5 not in s.store
    s.check()


def test_a_task_given_ahead_of_a_producer_already_gone_is_dropped():
    s = W.WorkerState(cpus=1)
    out = s.handle([W.Compute([ahead(7, [3])], {})], 0.0)   # 3 failed here before this COMPUTE came
    assert not reports(out) and not s.queue.queued and s.queue.dropped == 1
    out = s.handle([W.Compute([row(8, [3])], {})], 0.0)     # (not given ahead: that is an error)
    assert [f[0] for body in reports(out) for f in body.get("failed", [])] == [8]


# ---------------------------------------------------------------------- a real cluster
def test_e2e_chains_run_ahead_and_survive_a_worker_killed_mid_chain(tmp_path):
    from cluster import Cluster, wait_until
    c = Cluster(tmp_path, workers=2, cpus=1, heartbeat_timeout=2.0)
    try:
        with c.client() as client:
            graph = graphfmt.build_graph([chain(3000)])[0]
            _, futures = client.submit_graph(graph)
            assert client.gather(futures) == [b"x"]
            assert client.get_stats()["n_data_objects"] == 0
            # a chain of Python tasks (each adds one), long enough to kill a worker in it
            add = tasks.py_value(lambda x: str(int(x.read()) + 1).encode())
            t = tasks.const(b"0")
            for _ in range(3000):
                t = tasks.py_call(add, [t])
                t.resource_request = None
            before = {r["name"]: r["tasks_done"] for r in client.status()["workers"]}
            future = client.submit_one(t)

            def running_on():   # the worker the chain went to, once it finished a few links
                return [r["name"] for r in client.status()["workers"] if r["tasks_done"] > before[r["name"]] + 50]
            wait_until(lambda: running_on() or future.finished(), "a worker to run the chain")
            assert not future.finished(), "the chain ended before a worker could be killed in it"
            busy = running_on()[0]
            victim = c.workers[int(busy[1:])]
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            assert future.gather() == b"3000"
            assert len(client.status()["lost_workers"]) == 1
    finally:
        c.stop()
