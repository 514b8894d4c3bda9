"""The server core and memory: a worker near its memory limit is given no task that
brings it data while another has room."""

import numpy as np

from graphfmt import tasks
import pytest

from loomctl.core.server import SubmitError
from test_core import Env, Ref


def near(env, wid, flag=True):
    env.core.heartbeat(wid, {"memory_near": flag, "memory_used": 90, "running": 0}, env.now)


def test_a_worker_near_its_limit_gets_only_tasks_of_its_own_data_while_another_has_room():
    env = Env(2, 2)
    w0, w1 = env.wids
    job, (x, y) = env.submit([tasks.const("x"), tasks.const("y")])
    env.schedule()
    on = {w: list(env.assigned[w]) for w in env.wids}
    env.finish(w0)
    env.finish(w1)
    x_on = w0 if x in on[w0] else w1
    y_on = w1 if x_on == w0 else w0
    assert y in on[y_on]
    near(env, x_on)
    mine = tasks.size(Ref(x))                              # all its data is on the near worker
    both = tasks.merge([Ref(x), Ref(y)])                   # would bring y to it
    sources = [tasks.const(str(i)) for i in range(3)]       # new data
    job2, ids = env.submit([mine, both, *sources])
    env.schedule()
    assert ids[0] in env.assigned[x_on]
    assert set(ids[1:]) <= set(env.assigned[y_on])
    assert not set(ids[1:]) & set(env.assigned[x_on])


def test_when_every_worker_is_near_its_limit_placement_is_as_usual():
    env = Env(1, 1)
    for w in env.wids:
        near(env, w)
    job, ids = env.submit([tasks.const(str(i)) for i in range(2)])
    env.schedule()
    assert sorted(len(env.assigned[w]) for w in env.wids) == [1, 1]
    near(env, env.wids[0], False)
    env.run_all()
    assert job.status == "finished"


def test_tasks_that_would_bring_data_wait_for_the_worker_with_room():
    env = Env(1, 1)
    w0, w1 = env.wids
    near(env, w0)
    job, ids = env.submit([tasks.run(f"true {i}") for i in range(6)])   # 1 cpu each
    env.schedule()
    assert not env.assigned[w0] and len(env.assigned[w1]) == 2   # (w1's queue: 2 x its cpus)
    assert len(env.core.pool) == 4
    env.run_all()
    assert job.status == "finished"


def test_a_task_only_a_near_limit_worker_can_run_still_goes_there():
    env = Env()
    from test_core import register
    w0 = env.core.add_worker(b"w0", register(1, "addr0", {"gpu": 1}), 0.0)
    w1 = env.core.add_worker(b"w1", register(1, "addr1"), 0.0)
    env.wids = [w0, w1]
    env.assigned = {w0: [], w1: []}
    near(env, w0)
    gpu_task = tasks.run("true")
    gpu_task.resource_request = tasks.ResourceRequest(1, gpu=1)
    job, (t,) = env.submit([gpu_task])
    env.schedule()
    assert env.assigned[w0] == [t]


# ---------------------------------------------------------------------- rows and global ids
def run_job(env, results):
    job, ids = env.submit(results)
    env.run_all()
    assert job.status == "finished"
    return job, ids


def retire_all(env, ids):
    env.core.release(np.array(ids, dtype=np.int64))
    env.drain()
    env.now += 10
    retired = env.core.retire_jobs(env.now)
    env.check()
    return retired


def rows(env, ids):
    return env.core.graph.rows_of(np.array(ids, dtype=np.int64))


def test_rows_of_retired_jobs_are_reused_and_ids_are_never_reused():
    from test_core import merge_tree
    env = Env(1, 1)
    core = env.core
    bases = []
    for k in range(5):
        job, (root,) = run_job(env, [merge_tree(32)])
        assert root == job.base + job.n - 1
        bases.append(job.base)
        assert core.cols.owner[rows(env, [root])[0]] >= 0     # the root's data is held
        assert retire_all(env, [root]) == 1
        assert rows(env, [root])[0] == -1                      # a retired id names no task
        assert core.cols.used == 0 and core.cols.n == 0        # every row is free again
    assert bases == [k * job.n for k in range(5)]              # ids went on growing


def test_a_row_handed_out_again_has_zeroed_columns():
    env = Env(1)
    core = env.core
    c = core.cols
    job, ids = env.submit([tasks.const("a"), tasks.const("b")])
    env.run_all()
    r = rows(env, ids)
    assert (c.owner[r] >= 0).all() and (c.size[r] > 0).all() and (c.holds[r] > 0).all()
    c.length[r] = [7, 0]                                       # (as if arrays were reported)
    c.attempts[r] = 2
    retire_all(env, ids)
    job2, ids2 = env.submit([tasks.run("x"), tasks.run("y")])
    r2 = rows(env, ids2)
    assert sorted(r2.tolist()) == sorted(r.tolist()) and min(ids2) > max(ids)   # same rows, new ids
    assert (c.owner[r2] == -1).all() and (c.worker[r2] == -1).all() and not c.size[r2].any()
    assert not c.attempts[r2].any() and not c.length[r2].any()
    assert (c.job[r2] == job2.id).all()


def test_stale_ids_of_a_retired_job_change_nothing_for_the_task_that_took_its_row():
    from loomctl import protocol as P
    env = Env(1)
    core = env.core
    job, (a,) = env.submit([tasks.run("a")])
    env.schedule()
    (w,) = env.wids
    assert env.assigned[w] == [a]
    core.cancel(job.id, env.now)                               # the worker is told to stop it
    env.drain()
    env.assigned[w].clear()
    env.now += 10
    assert core.retire_jobs(env.now) == 1
    job2, (b,) = env.submit([tasks.run("b")])                   # takes a's row
    assert rows(env, [b])[0] == 0 and b != a
    env.schedule()
    assert env.assigned[w] == [b]
    row = rows(env, [b])[0]
    # a late finish, a late failure, a replica, a redirection, a release: all of a, none counts for b
    core.tasks_finished(w, np.array([a]), np.array([5]), np.zeros(1, np.int64), env.now)
    core.tasks_failed(w, [(a, "late")], env.now)
    core.replicas_added(w, np.array([a]), env.now)
    core.task_redirected(w, a, env.core.graph.segs.segments[0].graph, env.now)
    core.release(np.array([a]))
    env.drain()
    env.check()
    assert core.cols.state[row] == 2 and job2.status == "running"   # b is still ASSIGNED
    assert env.messages(P.RELEASE_DATA)[-1][1]["ids"] == P.ids_to_bytes([a])   # a's late data goes
    with pytest.raises(SubmitError):                            # a client asking for it
        env.submit([tasks.merge([Ref(a)])])
    assert core.job_results(job.id)["ids"].tolist() == []        # (its row in the history)
    env.finish(w)
    assert job2.status == "finished"


def test_ids_beyond_2_to_the_31_work():
    from test_core import merge_tree
    env = Env(1, 1)
    env.core.graph.segs.skip_to((1 << 31) - 7)
    job, (root,) = run_job(env, [merge_tree(16)])
    assert job.base == (1 << 31) - 7 and root > 1 << 31
    assert env.core.job_results(job.id)["ids"].tolist() == [root]
    later, (x,) = run_job(env, [tasks.merge([Ref(root), tasks.const("!")])])
    assert x > root
    env.core.graph.segs.skip_to(1 << 40)
    retire_all(env, [root, x])
    big, ids = run_job(env, [merge_tree(8)])
    assert big.base == 1 << 40 and env.core.cols.n == big.n    # the old rows again
    assert env.core.job_results(big.id)["ids"].tolist() == [ids[-1]]


def test_a_live_old_job_keeps_its_rows_while_later_ones_come_and_go():
    from test_core import merge_tree
    env = Env(1)
    core = env.core
    old, (old_root,) = run_job(env, [merge_tree(8)])               # kept: its result is wanted
    for k in range(4):
        job, ids = run_job(env, [merge_tree(16), tasks.merge([Ref(old_root), tasks.const("!")])])
        retire_all(env, ids)
    assert core.cols.used == old.n and core.cols.n <= old.n + 64
    assert core.job_results(old.id)["ids"].tolist() == [old_root]
    later, ids = run_job(env, [tasks.merge([Ref(old_root), tasks.const("?")])])
    assert core.ids_of(rows(env, ids)).tolist() == ids and ids[0] > old_root


def test_the_graph_a_snapshot_writes_is_the_one_submitted_futures_included():
    import graphfmt
    from graphfmt import symbols as S
    from test_core import merge_tree
    env = Env(1)
    first, (x,) = run_job(env, [tasks.const("x")])
    retire_all(env, [])                                           # (rows and ids differ from here on)
    env.core.graph.segs.skip_to(1 << 33)
    t = tasks.merge([Ref(x), merge_tree(4), Ref(x)])
    t.label = "top"
    graph, _ = graphfmt.build_graph([t], external=lambda f: tasks.Task(S.FUTURE, (), S.encode_u64(f.task_id)))
    job = env.core.submit(b"c", graph, env.now)
    seg = env.core.graph.segs.segments[job.segments[0]]
    again = env.core.graph.submitted_graph(seg)
    assert [again.symbol(i) for i in range(len(graph))] == [graph.symbol(i) for i in range(len(graph))]
    assert again.input_offsets.tolist() == graph.input_offsets.tolist()
    def resolved(g):   # an input that is a FUTURE task stands for the id it names
        return [("future", g.config(i)) if g.symbol(i) == S.FUTURE else i for i in g.inputs.tolist()]
    assert resolved(again) == resolved(graph)
    assert [again.config(i) for i in range(len(graph))] == [graph.config(i) for i in range(len(graph))]
    assert again.flags.tolist() == graph.flags.tolist() and again.label(len(graph) - 1) == "top"
    assert resolved(graphfmt.read(graphfmt.to_bytes(again))) == resolved(graph)


def test_rows_are_handed_out_zeroed_whether_fresh_reused_or_moved_by_a_resize():
    from loomctl.core.tasktable import _COLUMNS, TaskColumns
    cols = TaskColumns(capacity=8)

    def dirty(lo, hi):
        for name in _COLUMNS:
            getattr(cols, name)[lo:hi] = 7

    def zeroed(lo, hi):
        for name in _COLUMNS:
            if name != "state":
                want = -1 if name in ("owner", "worker") else 0
                assert (getattr(cols, name)[lo:hi] == want).all(), name

    a = cols.allocate(5)            # fresh rows: only owner and worker written
    zeroed(a, a + 5)
    dirty(a, a + 5)
    cols.release(a + 3, 2)          # the end is free again: the table ends earlier
    b = cols.allocate(2)            # the same rows, written before: zeroed again
    assert b == a + 3 and cols.clean == 5
    zeroed(b, b + 2)
    dirty(b, b + 2)
    c = cols.allocate(20)           # a resize: old rows kept, new ones fresh
    assert cols.capacity >= 25 and cols.clean == 25
    assert (cols.size[:5] == 7).all()
    zeroed(c, c + 20)
