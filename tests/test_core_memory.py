"""The server core and memory: a worker near its memory limit is given no task that
brings it data while another has room."""

import numpy as np

from graphfmt import tasks
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
