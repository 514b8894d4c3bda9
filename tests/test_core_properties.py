"""The server core under random event sequences (hypothesis), with every invariant
recomputed from scratch after every step (core.invariants.check), and every command
the core emits consumed by a model of the workers and clients (nothing is left over,
nothing goes to a peer that is not there).

The model workers do what a worker does: keep the tasks they were given, report some
finished (a task given ahead of its inputs only after they were produced there) (with random sizes and lengths), some failed, some redirected to a sub-plan,
hold the data the server did not release, and vanish. Clients submit random plans
(const, merge, programs with cpu and named-resource requests, Python calls, dslice
expansions, futures of earlier results, chains that rounds give out ahead of time),
release results, cancel jobs and go away. Jobs are retired often, so rows are reused;
the global id counter may start beyond 2^31. The model knows global ids only (as
workers and clients do).

LOOMCTL_FUZZ_EXAMPLES sets the number of sequences (default 60). A failing sequence is
shrunk only with LOOMCTL_FUZZ_SHRINK=1 (shrinking one has taken hypothesis more than
five minutes, longer than the whole CI run may take); unshrunk, the report still shows
every step and the @reproduce_failure blob that replays it.
"""

import os

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import graphfmt
from graphfmt import symbols as S
from graphfmt import tasks
from loomctl import messages as M
from loomctl.core import compute
from loomctl.core.server import ServerCore, SubmitError
from loomctl.core.tasktable import ASSIGNED, FINISHED, LIVE

EXAMPLES = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "60"))
PHASES = tuple(Phase) if os.environ.get("LOOMCTL_FUZZ_SHRINK") else tuple(p for p in Phase if p != Phase.shrink)
CLIENTS = (b"client-a", b"client-b")


class Ref:
    def __init__(self, task_id):
        self.task_id = task_id


def build(results):
    return graphfmt.build_graph(results, external=lambda f: tasks.Task(S.FUTURE, (), S.encode_u64(f.task_id)))[0]


@st.composite
def plans(draw, futures):
    """A random plan: its tasks in order, and the results it marks (maybe none)."""
    made = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["const", "const", "merge", "run", "gpu", "py", "dslice", "future"]))
        pick = lambda: draw(st.sampled_from(made))   # noqa: E731
        if kind == "const" or not made and kind not in ("future",):
            made.append(tasks.const(draw(st.binary(max_size=3))))
        elif kind == "merge":
            made.append(tasks.merge([pick() for _ in range(draw(st.integers(0, 3)))]))
        elif kind == "run":
            t = tasks.run("cat", [(pick(), None)] if draw(st.booleans()) else [])
            t.resource_request = tasks.cpus(draw(st.integers(0, 3)))
            made.append(t)
        elif kind == "gpu":
            t = tasks.merge([pick()])
            t.resource_request = tasks.ResourceRequest(0, gpu=1)
            made.append(t)
        elif kind == "py":
            made.append(tasks.py_call(tasks.py_value(len), [pick()]))
        elif kind == "dslice":
            made.append(tasks.array_make([tasks.merge([tasks.dslice(pick())])]))
        elif kind == "future" and futures:
            made.append(tasks.merge([Ref(draw(st.sampled_from(futures)))]))
        else:
            made.append(tasks.const(b"f"))
    marked = draw(st.lists(st.sampled_from(made), max_size=3, unique_by=id))
    return made, marked


class CoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.core = ServerCore()
        self.now = 0.0
        self.keys = 0
        self.given: dict[bytes, set] = {}      # worker key -> tasks it was given (its queue)
        self.holds: dict[bytes, set] = {}      # worker key -> data objects it holds
        self.wid: dict[bytes, int] = {}
        self.fetch: dict[bytes, dict] = {}     # worker key -> task -> inputs it fetches from peers
        self.futures: list[int] = []           # results a client may still use
        self.asked: dict[bytes, tuple] = {}    # worker key -> (ids, count) of a steal request
        self.inputs: dict[int, list] = {}      # global id -> its inputs, as COMPUTE named them

    # ------------------------------------------------------------------ model
    def consume(self):
        """Every command goes to a peer that is there, and is acted on."""
        for cmd in self.core.take_commands():
            if isinstance(cmd, M.WORKER_COMMANDS):
                assert cmd.target in self.given, f"{type(cmd).__name__} to a worker that is gone"
                if isinstance(cmd, M.Compute):
                    ids = [row.id for row in cmd.rows]
                    every = ids + [i for row in cmd.rows for i in row.inputs] + list(cmd.locations)
                    assert (self.core.graph.rows_of(every) >= 0).all(), "a COMPUTE names an id of no live task"
                    assert not self.given[cmd.target] & set(ids), "a task given twice"
                    g = self.core.graph
                    for row in cmd.rows:   # the task as it runs (symbol, config, inputs in order)
                        symbol, config, inputs = g.task(int(g.rows_of(np.array([row.id]))[0]))
                        assert (row.symbol, bytes(row.config), list(row.inputs)) == \
                            (symbol, bytes(config), g.ids_of(np.asarray(inputs, dtype=np.int64)).tolist()), row
                    for row in cmd.rows:   # (given ahead: its producer is given here before it)
                        self.inputs[row.id] = list(row.inputs)
                        for i in row.inputs:
                            assert i in self.holds[cmd.target] or i in cmd.locations \
                                or i in self.given[cmd.target], f"input {i} of {row.id} cannot be found"
                        assert any(i in self.given[cmd.target] and i not in cmd.locations for i in row.inputs) \
                            if row.ahead else all(i in self.holds[cmd.target] or i in cmd.locations
                                                  for i in row.inputs), f"task {row.id} marked ahead wrongly"
                        self.given[cmd.target].add(row.id)
                    for row in cmd.rows:
                        self.fetch[cmd.target][row.id] = [i for i in row.inputs if i in cmd.locations]
                elif isinstance(cmd, M.ReleaseData):
                    self.holds[cmd.target] -= set(cmd.ids.tolist())
                elif isinstance(cmd, M.StealTasks):
                    assert cmd.target not in self.asked, "a second steal request before the answer"
                    assert set(cmd.ids.tolist()) <= self.given[cmd.target], "asked for tasks it was not given"
                    self.asked[cmd.target] = (cmd.ids.tolist(), cmd.count)
                elif isinstance(cmd, M.CancelTasks):   # the worker stops them, says nothing
                    self.given[cmd.target] -= set(cmd.ids.tolist())
            else:
                assert isinstance(cmd, M.CLIENT_COMMANDS) and cmd.target in CLIENTS

    def tick(self):
        self.now += 0.01
        self.consume()

    def workers_with_tasks(self):
        return sorted(k for k, given in self.given.items() if given)

    def runnable(self, key, ids):
        """Of ``ids`` (given to ``key``), those the worker can run, in an order it could
        finish them: a task given ahead of its inputs runs after they are produced here."""
        have = self.holds[key] | {i for t in self.given[key] for i in self.fetch[key].get(t, ())}
        order, left = [], list(dict.fromkeys(ids))
        while left:
            ready = [t for t in left if t not in self.given[key] or all(
                i in have or i not in self.given[key] for i in self.inputs.get(t, ()))]
            if not ready:
                break
            order += ready
            have |= set(ready)
            left = [t for t in left if t not in ready]
        return order
    # ------------------------------------------------------------------ workers
    @rule(cpus=st.integers(0, 3), gpu=st.booleans())
    def add_worker(self, cpus, gpu):
        key = b"w%d" % self.keys
        self.keys += 1
        self.given[key], self.holds[key], self.fetch[key] = set(), set(), {}
        reg = M.Register(key.decode(), "h", cpus, {"gpu": 1} if gpu else {}, [], f"tcp://{key.decode()}:1")
        self.wid[key] = self.core.add_worker(key, reg, self.now)
        self.tick()

    @precondition(lambda self: self.given)
    @rule(data=st.data())
    def lose_worker(self, data):
        key = data.draw(st.sampled_from(sorted(self.given)))
        del self.given[key], self.holds[key], self.fetch[key]
        self.asked.pop(key, None)
        self.core.remove_worker(self.wid.pop(key), self.now)
        self.tick()

    @initialize(steal=st.booleans(), first_id=st.sampled_from([0, 0, (1 << 31) - 3, 1 << 40]))
    def stealing(self, steal, first_id):
        self.core.options.steal = steal
        self.core.graph.segs.skip_to(first_id)   # (ids beyond 2^31: rows and ids differ from the start)

    @precondition(lambda self: self.asked)
    @rule(data=st.data())
    def give_back(self, data):
        """A worker answers a steal request with some of the tasks it still has (or none)."""
        key = data.draw(st.sampled_from(sorted(self.asked)))
        ids, count = self.asked.pop(key)
        still = sorted(set(ids) & self.given[key])
        back = data.draw(st.lists(st.sampled_from(still), max_size=count, unique=True)) if still else []
        self.given[key] -= set(back)
        for t in back:
            self.fetch[key].pop(t, None)
        self.core.tasks_returned(self.wid[key], np.array(back, dtype=np.int64), self.now)
        self.tick()

    @precondition(lambda self: self.given)
    @rule(data=st.data())
    def worker_joins_again(self, data):
        """A worker the server dropped comes back with the data it still holds."""
        key = data.draw(st.sampled_from(sorted(self.given)))
        held = sorted(self.holds[key])
        self.core.remove_worker(self.wid.pop(key), self.now)
        self.asked.pop(key, None)
        self.given[key], self.fetch[key] = set(), {}
        self.tick()
        reg = M.Register(key.decode(), "h", 2, {}, [], f"tcp://{key.decode()}:1")
        self.wid[key] = self.core.add_worker(key, reg, self.now)
        n = len(held)
        self.core.data_returned(self.wid[key], np.array(held, dtype=np.int64), np.full(n, 5), np.zeros(n, np.int64),
                                self.now)
        self.tick()

    @rule()
    def schedule(self):
        self.core.schedule(self.now)
        self.tick()

    @precondition(lambda self: self.workers_with_tasks())
    @rule(data=st.data())
    def finish(self, data):
        key = data.draw(st.sampled_from(self.workers_with_tasks()))
        ids = self.runnable(key, data.draw(st.lists(st.sampled_from(sorted(self.given[key])), min_size=1,
                                                    max_size=6)))
        top = self.core.segs.next_gid
        ids.extend(data.draw(st.lists(st.integers(-2, top + 2) | st.integers(max(0, top - 40), top + 2), max_size=2)))
        self.given[key] -= set(ids)
        n = len(ids)
        sizes = np.array(data.draw(st.lists(st.integers(0, 3 << 20), min_size=n, max_size=n)), dtype=np.int64)
        lengths = np.array(data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n)), dtype=np.int64)
        self.report(key, ids, sizes, lengths)

    def report(self, key, ids, sizes, lengths):
        """An UPDATE: finished tasks, then the inputs they fetched (now held here too)."""
        fetched = sorted({i for t in ids for i in self.fetch[key].pop(t, ())} - self.holds[key])
        self.holds[key] |= set(ids) | set(fetched)
        self.core.tasks_finished(self.wid[key], np.array(ids, dtype=np.int64), sizes, lengths, self.now)
        self.core.replicas_added(self.wid[key], np.array(fetched, dtype=np.int64), self.now)
        self.tick()

    @precondition(lambda self: self.workers_with_tasks())
    @rule(data=st.data())
    def fail(self, data):
        key = data.draw(st.sampled_from(self.workers_with_tasks()))
        t = data.draw(st.sampled_from(sorted(self.given[key])))
        self.given[key].discard(t)
        self.core.tasks_failed(self.wid[key], [(t, "boom")], self.now)
        self.tick()

    @precondition(lambda self: self.workers_with_tasks())
    @rule(data=st.data())
    def redirect(self, data):
        key = data.draw(st.sampled_from(self.workers_with_tasks()))
        t = data.draw(st.sampled_from(sorted(self.given[key])))
        c = self.core.cols
        row = self.core.graph.segs.row_of(t)
        if row < 0 or c.state[row] != ASSIGNED or self.core.graph.symbols[c.symbol[row]] != S.PY_CALL \
                or not self.runnable(key, [t]):
            return
        self.given[key].discard(t)
        sub = tasks.merge((tasks.Task(S.TASK_INPUT, (), S.encode_u64(1)), tasks.const("r")))
        self.core.task_redirected(self.wid[key], t, build([sub]), self.now)
        self.tick()

    # ------------------------------------------------------------------ clients
    @rule(data=st.data(), client=st.sampled_from(CLIENTS))
    def submit(self, data, client):
        made, marked = data.draw(plans(self.futures))
        try:
            job = self.core.submit(client, build(marked or made[-1:]), self.now)
        except SubmitError:
            return
        self.futures.extend(self.core.ids_of(job.results).tolist())   # (the client knows global ids)
        self.tick()

    @rule(n=st.integers(2, 8), client=st.sampled_from(CLIENTS))
    def submit_work(self, n, client):
        """Several 1-cpu tasks at once: queues fill, and idle workers may steal."""
        work = [tasks.run("true") for _ in range(n)]
        for t in work:
            t.resource_request = tasks.cpus(1)
        self.futures.extend(self.core.ids_of(self.core.submit(client, build(work), self.now).results).tolist())
        self.tick()

    @rule(data=st.data(), client=st.sampled_from(CLIENTS))
    def submit_chain(self, data, client):
        """A chain (each task the next one's input, some links also taking an earlier
        result or being Python calls or programs): rounds give it out ahead of time."""
        t = tasks.const(b"c")
        for _ in range(data.draw(st.integers(2, 12))):
            kind = data.draw(st.sampled_from(["merge", "merge", "merge2", "py", "run"]))
            if kind == "merge2" and self.futures:
                t = tasks.merge([t, Ref(data.draw(st.sampled_from(self.futures)))])
            elif kind == "py":
                t = tasks.py_call(tasks.py_value(len), [t])
            elif kind == "run":
                t = tasks.run("cat", [(t, None)])
                t.resource_request = tasks.cpus(data.draw(st.integers(0, 1)))
            else:
                t = tasks.merge([t])
        try:
            job = self.core.submit(client, build([t]), self.now)
        except SubmitError:   # (a future of a cancelled job)
            return
        self.futures.extend(self.core.ids_of(job.results).tolist())
        self.tick()

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def release(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.futures), min_size=1, max_size=3))
        self.futures = [f for f in self.futures if f not in ids]
        self.core.release(np.array(ids, dtype=np.int64))
        self.tick()

    @precondition(lambda self: self.core.jobs)
    @rule(data=st.data())
    def cancel(self, data):
        self.core.cancel(data.draw(st.sampled_from(sorted(self.core.jobs))), self.now)
        self.tick()

    @rule(client=st.sampled_from(CLIENTS))
    def client_gone(self, client):
        self.core.client_gone(client, self.now)
        self.tick()

    @precondition(lambda self: self.wid)
    @rule(data=st.data(), near=st.booleans())
    def memory_pressure(self, data, near):
        """A worker's heartbeat says it is near its memory limit (or no longer is)."""
        key = data.draw(st.sampled_from(sorted(self.wid)))
        self.core.heartbeat(self.wid[key], {"memory_near": near}, self.now)
        self.tick()

    @rule()
    def retire(self):
        self.now += 2.0
        self.core.retire_jobs(self.now)
        self.tick()

    @rule(data=st.data())
    def release_and_retire(self, data):
        """Clients let go of most results and ended jobs retire: their rows are free for
        the next submissions (a late report naming them must not reach the new tasks)."""
        keep = data.draw(st.lists(st.sampled_from(self.futures), max_size=2)) if self.futures else []
        gone = [f for f in self.futures if f not in keep]
        self.futures = [f for f in self.futures if f in keep]
        self.core.release(np.array(gone, dtype=np.int64))
        self.tick()
        self.retire()

    @rule()
    def run_to_the_end(self):
        """With a worker left, every job ends: finish everything given, for a while."""
        for _ in range(200):
            self.core.schedule(self.now)
            self.tick()
            for key in sorted(self.asked):   # steal requests: give back what they ask
                ids, count = self.asked.pop(key)
                back = sorted(set(ids) & self.given[key])[-count:] if count else []
                self.given[key] -= set(back)
                for t in back:
                    self.fetch[key].pop(t, None)
                self.core.tasks_returned(self.wid[key], np.array(back, dtype=np.int64), self.now)
                self.tick()
            busy = self.workers_with_tasks()
            if not busy:
                if self.core.recheck_at is None:
                    if self.core.ready or len(self.core.pool):   # (given back: placed again)
                        continue
                    break
                self.now = max(self.now, self.core.recheck_at)   # (what no worker can run fails then)
                continue
            for key in busy:
                ids = self.runnable(key, sorted(self.given[key]))
                self.given[key] -= set(ids)
                self.report(key, ids, np.full(len(ids), 10), np.full(len(ids), 3))
        if self.given:
            running = [j.id for j in self.core.jobs.values() if j.status == "running"]
            c = self.core.cols
            assert not running, (f"jobs {running} did not end although workers are there: states "
                                 f"{c.state[:c.n].tolist()}, remaining {c.remaining[:c.n].tolist()}, "
                                 f"ready {self.core.ready}, workers {self.core.workers}")

    # ------------------------------------------------------------------ invariants
    @invariant()
    def invariants_hold(self):
        self.core.check_invariants()
        assert not self.core.commands, "every command was taken"
        c = self.core.cols
        ids_of = self.core.ids_of
        for key, wid in self.wid.items():   # the server's view agrees with the workers'
            assigned = np.flatnonzero((c.state[:c.n] == ASSIGNED) & (c.worker[:c.n] == wid))
            assert set(ids_of(assigned).tolist()) <= self.given[key], "assigned to a worker that was not told"
            owned = np.flatnonzero(c.owner[:c.n] == wid)
            assert set(ids_of(owned).tolist()) <= self.holds[key], "the server thinks a worker holds what it does not"
            assert (c.state[owned] == FINISHED).all()

    @invariant()
    def both_ways_of_building_a_compute_agree(self):
        c = self.core.cols
        live = np.flatnonzero(LIVE[c.state[:c.n]])[::-1]   # (not in row order: rows keep the order given)
        for worker in list(self.core.workers.values())[:2]:
            for k in range(0, len(live), 5):
                ids = live[k:k + 5]
                few, columns = compute._compute_few(self.core, worker, ids), compute._compute_columns(self.core, worker, ids)
                assert (few.rows, few.locations, few.jobs.tolist(), few.large) == \
                    (list(columns.rows), columns.locations, columns.jobs.tolist(), columns.large)


CoreMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None, phases=PHASES,
                                         suppress_health_check=list(HealthCheck))
test_core_under_random_events = CoreMachine.TestCase
