"""The worker's sans-I/O state machine driven by events, without sockets or threads.

A model plays the process around it: it starts what ``Execute`` says (the tasks end
when the test says), answers fetches from peers, and takes the reports. Random event
sequences (hypothesis) check after every step that the state's invariants hold, that
every task given ends in exactly one report, and that reported data is held.
"""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from graphfmt import symbols as S
from loomctl import protocol as P
from loomctl.worker import state as W
from loomctl.worker import taskqueue
from loomctl.worker.data import Plain
from loomctl.worker.outcome import Outcome
from loomctl.worker.running import run_inline

EXAMPLES = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "60"))
PEERS = ("tcp://peer-a:1", "tcp://peer-b:1")


def row(tid, inputs=(), cpus=0, symbol=S.MERGE, inline=False):
    return [tid, symbol, b"", list(inputs), cpus, None, None, f"t{tid}", inline]


def reports(instructions):
    return [i.body for i in instructions if isinstance(i, W.SendUpdate)]


def test_a_task_waits_for_its_fetched_input_then_runs_and_is_reported():
    s = W.WorkerState(cpus=1)
    out = s.handle([W.Compute([row(5, [1], cpus=1)], {1: PEERS[0]})], 0.0)
    assert [type(i) for i in out] == [W.Connect] and out[0].address == PEERS[0]
    out = s.handle([W.LinkReady(PEERS[0])], 0.0)
    (fetch,) = out
    assert isinstance(fetch, W.SendFetch) and fetch.ids == [1]
    out = s.handle([W.Fetched(PEERS[0], fetch.req, [1], [], [Plain(b"in")])], 0.0)
    (execute,) = [i for i in out if isinstance(i, W.Execute)]
    assert execute.spec.id == 5 and execute.inputs == [Plain(b"in")] and execute.route == "pool"
    (update,) = reports(out)   # the replica goes at once
    assert P.ids_from_bytes(update["replicas"]).tolist() == [1]
    out = s.handle([W.TaskDone(Outcome(5, Plain(b"result"), 6))], 0.01)
    (update,) = reports(out)
    assert P.ids_from_bytes(update["finished"]).tolist() == [5] and s.store[5] == Plain(b"result")
    s.check()


def test_a_report_of_a_batch_of_finishes_goes_at_once_even_while_busy():
    # many light tasks (a split's pieces) finish while a cpu task runs with more queued:
    # their consumers may be waiting to run on another worker, so such a report is not held
    n = W.REPORT_BATCH
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(t, cpus=1) for t in range(3)] + [row(100 + k) for k in range(n)], {})], 0.0)
    out = s.handle([W.TaskDone(Outcome(100 + k, Plain(b"x"), 1)) for k in range(n - 1)], 0.001)
    assert not reports(out)   # (fewer: held, the worker is busy)
    (update,) = reports(s.handle([W.TaskDone(Outcome(100 + n - 1, Plain(b"x"), 1))], 0.002))
    assert P.ids_from_bytes(update["finished"]).tolist() == [100 + k for k in range(n)]
    s.check()


def test_a_busy_worker_holds_finish_reports_for_one_update():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(t, cpus=1) for t in range(4)], {})], 0.0)   # one runs, three queued
    out = s.handle([W.TaskDone(Outcome(0, Plain(b"x"), 1))], 0.001)
    assert not reports(out) and s.hold_deadline() == 0.001 + W.REPORT_HOLD_S
    out = s.handle([W.TaskDone(Outcome(1, Plain(b"y"), 1))], 0.002)
    assert not reports(out)
    (update,) = reports(s.handle([W.Tick()], 0.001 + W.REPORT_HOLD_S))   # due: both in one
    assert P.ids_from_bytes(update["finished"]).tolist() == [0, 1]
    out = s.handle([W.TaskDone(Outcome(2, error="boom"))], 0.03)           # failures go at once
    assert reports(out)[0]["failed"] == [[2, "boom"]]


def test_a_peer_gone_fails_the_tasks_waiting_on_it_and_closes_the_link():
    s = W.WorkerState(cpus=2)
    s.handle([W.Compute([row(5, [1], cpus=1), row(6, [2], cpus=1)], {1: PEERS[0], 2: PEERS[1]})], 0.0)
    out = s.handle([W.PeerGone(PEERS[0], "the server lost that worker")], 0.0)
    assert W.CloseLink(PEERS[0]) in out
    (update,) = reports(out)
    assert [t for t, _ in update["failed"]] == [5]
    assert "input 1 is unavailable: the server lost that worker" in update["failed"][0][1]
    assert P.ids_from_bytes(update["unfetched"]).tolist() == [5]
    assert not s.queue.is_known(5) and s.queue.is_known(6)
    assert s.handle([W.PeerGone("tcp://never-used:1", "x")], 0.0) == []   # nothing to give up


def test_a_fetch_that_is_not_answered_in_time_fails_its_task():
    s = W.WorkerState(cpus=1, fetch_timeout_s=5.0)
    s.handle([W.Compute([row(5, [1], cpus=1)], {1: PEERS[0]})], 0.0)
    s.handle([W.LinkReady(PEERS[0])], 0.0)
    assert not reports(s.handle([W.Tick()], 4.0))
    (update,) = reports(s.handle([W.Tick()], 6.0))
    assert update["failed"][0][0] == 5 and "did not answer within 5 s" in update["failed"][0][1]
    assert P.ids_from_bytes(update["unfetched"]).tolist() == [5]   # (the server may run it again)


def test_an_input_released_before_its_task_started_fails_the_task():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(1, cpus=1)], {})], 0.0)
    s.handle([W.TaskDone(Outcome(1, Plain(b"a"), 1))], 0.0)
    s.handle([W.Compute([row(2, cpus=1)], {})], 0.0)                    # keeps the cpu busy
    s.handle([W.Compute([row(3, [1], cpus=1)], {})], 0.0)               # waits for the cpu
    s.handle([W.ReleaseData([1])], 0.0)
    out = s.handle([W.TaskDone(Outcome(2, Plain(b"b"), 1))], 0.0)
    failed = [f for body in reports(out) for f in body["failed"]]
    assert failed and failed[0][0] == 3 and "released" in failed[0][1]
    assert not any("unfetched" in body for body in reports(out))   # (this worker's own affair)
    s.check()


# ---------------------------------------------------------------------- work stealing
def returned(update):
    return P.ids_from_bytes(update["returned"]).tolist()


def test_a_steal_request_gives_back_the_tasks_that_would_start_last_at_once():
    s = W.WorkerState(cpus=1)
    out = s.handle([W.Compute([row(t, cpus=1) for t in range(5)], {})], 0.0)   # 0 runs, 1-4 queued
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [0]
    out = s.handle([W.StealTasks([0, 1, 2, 3, 4], 2)], 0.001)
    (update,) = reports(out)   # at once, though the worker is busy with work queued
    assert returned(update) == [4, 3] and P.ids_from_bytes(update["finished"]).tolist() == []
    assert sorted(s.queue.queued) == [1, 2] and not s.queue.is_known(4)
    s.check()
    started = []
    for t, when in [(0, 0.1), (1, 0.2), (2, 0.3)]:
        out = s.handle([W.TaskDone(Outcome(t, Plain(b"x"), 1))], when)
        started += [i.spec.id for i in out if isinstance(i, W.Execute)]
    assert started == [1, 2]
    assert not s.queue.queued and not s.queue.running
    out = s.handle([W.Compute([row(4, cpus=1)], {})], 0.4)   # placed here again: it runs
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [4]
    s.check()


def test_a_steal_request_is_answered_even_when_nothing_can_go():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(1, cpus=1)], {})], 0.0)       # running
    for ids, count in [([1], 1), ([7, 8], 2), ([], 3), ([1], 0)]:   # running, unknown, none, count 0
        (update,) = reports(s.handle([W.StealTasks(ids, count)], 0.01))
        assert returned(update) == [] and update["returned"] == b""
    assert s.queue.is_known(1)
    (update,) = reports(s.handle([W.TaskDone(Outcome(1, Plain(b"x"), 1))], 0.02))
    assert "returned" not in update   # (only an answer carries the field)


def test_a_steal_never_takes_a_task_being_fetched_for_or_a_producer_of_a_task_given_ahead():
    s = W.WorkerState(cpus=1)
    rows = [row(1, cpus=1), row(2, cpus=1), [3, S.MERGE, b"", [2], 0, None, None, None, False, True],
            row(4, [50], cpus=1), row(5, cpus=1)]
    s.handle([W.Compute(rows, {50: PEERS[0]})], 0.0)   # 1 runs; 2 made for 3 (ahead); 4 fetches 50
    (update,) = reports(s.handle([W.StealTasks([1, 2, 3, 4, 5], 5)], 0.01))
    assert returned(update) == [5]
    assert sorted(s.queue.queued) == [2, 3, 4]
    s.check()
    out = s.handle([W.LinkReady(PEERS[0])], 0.02)
    (fetch,) = [i for i in out if isinstance(i, W.SendFetch)]
    s.handle([W.Fetched(PEERS[0], fetch.req, [50], [], [Plain(b"in")])], 0.03)
    (update,) = reports(s.handle([W.StealTasks([2, 3, 4], 5)], 0.04))
    assert returned(update) == [4]   # its input came: it can go now; 2 still makes 3's input
    s.check()


def test_a_steal_answer_goes_with_the_reports_that_wait():
    s = W.WorkerState(cpus=1)
    s.handle([W.Compute([row(t, cpus=1) for t in range(4)], {})], 0.0)
    assert not reports(s.handle([W.TaskDone(Outcome(0, Plain(b"x"), 1))], 0.001))   # held: busy
    (update,) = reports(s.handle([W.StealTasks([1, 2, 3], 1)], 0.002))
    assert returned(update) == [3] and P.ids_from_bytes(update["finished"]).tolist() == [0]


def short(outcome, seconds=0.01):   # (short: not tiny, taskqueue.TINY_TASK_S)
    outcome.started, outcome.ended = 100.0, 100.0 + seconds
    return outcome


def test_short_pool_tasks_are_overbooked_and_a_long_one_ends_that():
    """After SHORT_STREAK short Python tasks a 1-cpu worker starts the next two at once
    (one waits in the executor's queue); a program waits until the cpu is free; a long
    task ends the overbooking."""
    from loomctl.worker import taskqueue
    s = W.WorkerState(cpus=1)
    n = taskqueue.SHORT_STREAK
    started = [i.spec.id for i in s.handle([W.Compute([row(t, cpus=1, symbol=S.PY_CALL) for t in range(n + 4)]
                                                      + [row(50, cpus=1, symbol=S.RUN)], {})], 0.0)
               if isinstance(i, W.Execute)]
    assert started == [0]
    for t in range(n):   # one at a time while the streak grows
        out = s.handle([W.TaskDone(short(Outcome(t, Plain(b"x"), 1)))], 0.001)
        started = [i.spec.id for i in out if isinstance(i, W.Execute)]
        assert started == ([t + 1, t + 2] if t == n - 1 else [t + 1])
    assert len(s.queue.running) == 2 and s.queue.free_cpus == -1
    s.check()
    out = s.handle([W.TaskDone(short(Outcome(n, Plain(b"x"), 1), seconds=1.0))], 0.002)   # a long one
    assert s.queue.overbook == 0 and not [i for i in out if isinstance(i, W.Execute)]   # the cpu is booked
    out = s.handle([W.TaskDone(short(Outcome(n + 1, Plain(b"x"), 1)))], 0.003)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [n + 2]   # one at a time again
    s.check()


def test_tiny_pool_tasks_are_overbooked_deeper_and_a_short_one_brings_it_back_to_the_cpus():
    """After SHORT_STREAK pool tasks under TINY_TASK_S a 1-cpu worker keeps TINY_OVERBOOK
    more waiting for its thread; one that ran longer than that (but short) goes back to
    one more than the cpus."""
    s = W.WorkerState(cpus=1)
    n = taskqueue.SHORT_STREAK
    s.handle([W.Compute([row(t, cpus=1, symbol=S.PY_CALL) for t in range(40)], {})], 0.0)
    for t in range(n):
        s.handle([W.TaskDone(short(Outcome(t, Plain(b"x"), 1), seconds=0.0001))], 0.001)
    assert s.queue.overbook == taskqueue.TINY_OVERBOOK
    assert len(s.queue.running) == 1 + taskqueue.TINY_OVERBOOK and s.queue.free_cpus == -taskqueue.TINY_OVERBOOK
    s.check()
    first = min(s.queue.running)
    s.handle([W.TaskDone(short(Outcome(first, Plain(b"x"), 1), seconds=0.01))], 0.002)   # short, not tiny
    assert s.queue.overbook == 1
    started = len(s.queue.running)
    for t in sorted(s.queue.running)[:started - 1]:   # the running ones end: one at a time beside the cpu again
        s.handle([W.TaskDone(short(Outcome(t, Plain(b"x"), 1), seconds=0.01))], 0.003)
    assert len(s.queue.running) == 2
    s.check()


def test_a_report_says_how_long_its_cpu_tasks_ran():
    """UPDATE cpu_busy: the finished cpu tasks that were timed and their run time
    together (light and inline tasks are not counted)."""
    s = W.WorkerState(cpus=2, run_inline=run_merge)
    out = s.handle([W.Compute([row(1, cpus=1, symbol=S.PY_CALL), row(2, cpus=1, symbol=S.PY_CALL),
                               row(3, symbol=S.CONST)], {})], 0.0)
    (update,) = reports(out)
    assert "cpu_busy" not in update   # (the const only)
    out = s.handle([W.TaskDone(short(Outcome(1, Plain(b"x"), 1), seconds=0.003)),
                    W.TaskDone(short(Outcome(2, Plain(b"y"), 1), seconds=0.005))], 0.01)
    (update,) = reports(out)
    count, seconds = update["cpu_busy"]
    assert count == 2 and abs(seconds - 0.008) < 1e-9
    event = P.decode_worker_event(P.UPDATE, update)
    assert event.cpu_busy == (2, seconds)


def test_a_malformed_cpu_busy_is_ignored_not_the_report():
    for bad in ([1], [0, 1.0], [-1, 1.0], [2, -1.0], ["2", 1.0], [True, 1.0], [2, float("nan")], "x"):
        event = P.decode_worker_event(P.UPDATE, {"finished": P.ids_to_bytes([5]), "sizes": P.ids_to_bytes([1]),
                                                 "lengths": P.ids_to_bytes([0]), "cpu_busy": bad})
        assert event.cpu_busy is None and event.finished.tolist() == [5]


def test_a_program_does_not_start_on_an_overbooked_cpu():
    from loomctl.worker import taskqueue
    s = W.WorkerState(cpus=1)
    s.queue.short_streak, s.queue.overbook = taskqueue.SHORT_STREAK, 1
    out = s.handle([W.Compute([row(1, cpus=1, symbol=S.PY_CALL), row(2, cpus=1, symbol=S.RUN),
                               row(3, cpus=1, symbol=S.PY_CALL)], {})], 0.0)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [1, 3]   # the program waits for a free cpu
    out = s.handle([W.TaskDone(short(Outcome(1, Plain(b"x"), 1)))], 0.001)
    assert not [i for i in out if isinstance(i, W.Execute)]                 # 3 still holds the cpu
    out = s.handle([W.TaskDone(short(Outcome(3, Plain(b"x"), 1)))], 0.002)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [2]
    s.check()


def test_no_python_task_is_overbooked_onto_the_cpus_of_a_running_program():
    # (found by the worker's property test) a 2-cpu worker overbooking short Python tasks
    # ran a 1-cpu program and then two Python tasks beside it: three busy on two cpus
    from loomctl.worker import taskqueue
    s = W.WorkerState(cpus=2)
    s.queue.short_streak, s.queue.overbook = taskqueue.SHORT_STREAK, 2
    out = s.handle([W.Compute([row(1, cpus=1, symbol=S.RUN)], {})], 0.0)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [1]
    out = s.handle([W.Compute([row(t, cpus=1, symbol=S.PY_CALL) for t in (2, 3, 4)], {})], 0.001)
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [2]   # the free cpu only
    s.check()
    out = s.handle([W.TaskDone(Outcome(1, Plain(b"x"), 1))], 0.002)   # the program ends: overbooked again
    assert [i.spec.id for i in out if isinstance(i, W.Execute)] == [3, 4]
    s.check()


def test_routes():
    assert W.route(W.TaskSpec(1, S.RUN, b"", [], 1)) == "program"
    assert W.route(W.TaskSpec(1, S.MERGE, b"", [])) == "inline"
    assert W.route(W.TaskSpec(1, S.MERGE, b"", [], checkpoint="/x")) == "light"
    assert W.route(W.TaskSpec(1, S.PY_CALL, b"", [], 1)) == "pool"
    assert W.route(W.TaskSpec(1, "ext/thing", b"", [])) == "light"


def run_merge(spec, inputs):
    """What the process's run_inline does (a built-in run where it is)."""
    return run_inline(spec, inputs)


def test_a_task_is_overbooked_only_if_it_goes_to_the_pool_and_names_no_resources():
    for symbol in (S.RUN, S.MERGE, S.CONST, S.PY_CALL, S.PY_VALUE, "ext/thing"):
        for cpus in (0, 1, 2):
            for resources in ({}, {"gpu": 1}):
                for checkpoint in (None, "/x"):
                    spec = W.TaskSpec(1, symbol, b"", [], cpus, resources, checkpoint)
                    assert taskqueue._poolable(spec) == (W.route(spec) == "pool" and not resources), spec


def test_an_inline_built_in_gives_its_result_or_its_error_and_is_timed_only_when_asked():
    ok = run_inline(W.TaskSpec(7, S.MERGE, b"-", [1, 2]), [Plain(b"ab"), Plain(b"c")])
    assert (ok.task_id, ok.result, ok.size, ok.length, ok.error) == (7, Plain(b"ab-c"), 4, 0, None)
    assert ok.started == ok.ended == 0.0
    timed = run_inline(W.TaskSpec(7, S.CONST, b"x", []), [], timed=True)
    assert 0 < timed.started <= timed.ended and timed.result == Plain(b"x") and timed.size == 1
    bad = run_inline(W.TaskSpec(8, S.GET, b"\x05" + b"\0" * 7, [1]), [Plain(b"abc")])
    assert bad.result is None and bad.error and "get" in bad.error.lower()
    wrong = run_inline(W.TaskSpec(9, S.GET, b"", [1, 2]), [Plain(b"a"), Plain(b"b")])
    assert wrong.error and "input" in wrong.error


def test_a_chain_run_inline_ends_in_one_step_and_one_report():
    s = W.WorkerState(cpus=1, run_inline=run_merge)
    rows = [row(0, symbol=S.CONST)] + [row(t, [t - 1]) + [True] for t in range(1, 50)]   # (given ahead)
    rows[0][2] = b"x"
    out = s.handle([W.Compute(rows, {})], 0.0)
    assert not [i for i in out if isinstance(i, W.Execute)]
    (update,) = reports(out)
    assert P.ids_from_bytes(update["finished"]).tolist() == list(range(50))
    assert s.store[49] == Plain(b"x") and not s.queue.queued and not s.queue.running
    s.check()


def test_a_chain_run_inline_stops_at_the_pause_threshold_until_data_is_spilled():
    s = W.WorkerState(cpus=1, memory_limit=10_000, run_inline=run_merge)
    rows = [row(1, symbol=S.CONST), row(2, symbol=S.CONST)] + [row(t, [t - 1 if t > 3 else 1, 2]) + [True]
                                                              for t in range(3, 43)]
    rows[0][2], rows[1][2] = b"y" * 1000, b"z" * 10   # each link a new object of ~1-1.4 kB: 48 kB in all
    out = s.handle([W.Compute(rows, {})], 0.0)
    writes = [i for i in out if isinstance(i, W.SpillWrite)]
    assert writes and s.queue.queued, "the chain stopped while memory was above the pause threshold"
    assert s.store.used() <= 10_000
    for _ in range(200):   # the process writes what it is told; the chain goes on
        out = s.handle([W.Spilled(w.id, 2000) for w in writes], 0.0)
        writes = [i for i in out if isinstance(i, W.SpillWrite)]
        assert s.store.used() <= 10_000
        s.check()
        if not writes:
            break
    assert not s.queue.queued and s.store.get(42) == Plain(b"y" * 1000 + b"z" * 400)
    s.check()


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.s = W.WorkerState(cpus=2, resources={"gpu": 1}, fetch_timeout_s=1.0)
        self.now = 0.0
        self.next_id = 100
        self.given: set = set()          # tasks given and not released or reported
        self.reported: set = set()
        self.running: set = set()        # Execute'd, not ended
        self.fetches: dict = {}          # req -> (address, ids)
        self.remote: dict = {}           # id -> the peer that holds it
        self.asked = None                # (ids, count) of a steal request not answered yet

    @initialize(inline=st.booleans())
    def runner(self, inline):
        """The process may run inline built-ins within the state's step."""
        if inline:
            self.s.run_inline = self.run_here

    def run_here(self, spec, inputs):
        assert spec.id in self.given and spec.id not in self.running, "ran a task not given, or twice"
        assert W.route(spec) == "inline" and all(obj is not None for obj in inputs)
        return Outcome(spec.id, Plain(b"i"), 1) if spec.id % 5 else Outcome(spec.id, error="boom")

    def apply(self, events, dt=0.001):
        self.now += dt
        for instruction in self.s.handle(events, self.now):
            self.carry(instruction)

    def carry(self, instruction):
        """Play the process for one instruction."""
        if isinstance(instruction, W.Execute):
            assert instruction.spec.id in self.given, "started a task it was not given"
            assert instruction.spec.id not in self.running, "started twice"
            assert all(obj is not None for obj in instruction.inputs)
            self.running.add(instruction.spec.id)
        elif isinstance(instruction, W.SendFetch):
            assert instruction.address in self.s.ready_links
            self.fetches[instruction.req] = (instruction.address, instruction.ids)
        elif isinstance(instruction, W.SendUpdate):
            body = instruction.body
            for t in P.ids_from_bytes(body["finished"]).tolist() + P.ids_from_bytes(body["replicas"]).tolist():
                assert t in self.s.store, "reported data is held"
            ended = P.ids_from_bytes(body["finished"]).tolist() + [t for t, _ in body["failed"]] \
                + [t for t, _ in body["redirects"]]
            if "returned" in body:
                assert self.asked is not None, "a steal answer without a request"
                back = P.ids_from_bytes(body["returned"]).tolist()
                ids, count = self.asked
                assert len(back) <= count and set(back) <= set(ids), "gave back what was not asked for"
                assert not set(back) & self.running, "gave back a task that runs"
                ended += back
                self.asked = None
            for t in ended:
                assert t not in self.reported, f"task {t} reported twice"
                assert t in self.given, f"task {t} reported but never given"
                self.reported.add(t)
                self.given.discard(t)

    @rule(data=st.data(), n=st.integers(1, 4))
    def compute(self, data, n):
        rows, locations = [], {}
        known = sorted(set(self.s.store) | set(self.remote) | self.given)
        for _ in range(n):
            tid = self.next_id
            self.next_id += 1
            inputs = data.draw(st.lists(st.sampled_from(known), max_size=2)) if known else []
            for i in inputs:
                if i in self.remote and i not in self.s.store:
                    locations[i] = self.remote[i]
            cpus = data.draw(st.integers(0, 3))
            gpu = data.draw(st.booleans())
            rows.append([tid, data.draw(st.sampled_from([S.MERGE, S.RUN, S.PY_CALL])), b"", inputs, cpus,
                         {"gpu": 1} if gpu else None, None, None, False])
            self.given.add(tid)
        if data.draw(st.booleans()):   # an input held by a peer
            rid = self.next_id
            self.next_id += 1
            self.remote[rid] = data.draw(st.sampled_from(PEERS))
            tid = self.next_id
            self.next_id += 1
            rows.append(row(tid, [rid]))
            locations[rid] = self.remote[rid]
            self.given.add(tid)
        self.apply([W.Compute(rows, locations)])

    @precondition(lambda self: self.running)
    @rule(data=st.data(), how=st.sampled_from(["ok", "ok", "error", "redirect"]),
          seconds=st.sampled_from([0.0, 0.001, 0.001, 1.0]))
    def end_task(self, data, how, seconds):
        """(ran ``seconds``: short runs of pool tasks make the worker overbook them)"""
        t = data.draw(st.sampled_from(sorted(self.running)))
        self.running.discard(t)
        outcome = Outcome(t, Plain(b"r"), 1) if how == "ok" else \
            Outcome(t, error="boom") if how == "error" else Outcome(t, redirect=b"graph")
        outcome.started, outcome.ended = 100.0, 100.0 + seconds
        self.apply([W.TaskDone(outcome)])

    @precondition(lambda self: self.given)
    @rule(data=st.data(), count=st.integers(0, 4))
    def steal(self, data, count):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.given) + [99]), max_size=6, unique=True))
        self.asked = (ids, count)
        self.apply([W.StealTasks(ids, count)])
        assert self.asked is None, "a steal request was not answered at once"

    @rule(address=st.sampled_from(PEERS))
    def link_ready(self, address):
        if address in self.s.connecting:
            self.apply([W.LinkReady(address)])

    @precondition(lambda self: self.fetches)
    @rule(data=st.data(), answer=st.sampled_from(["all", "some", "garbage"]))
    def answer_fetch(self, data, answer):
        req = data.draw(st.sampled_from(sorted(self.fetches)))
        address, ids = self.fetches.pop(req)
        found = ids if answer != "some" else ids[:len(ids) // 2]
        objects = [Plain(b"f") if answer != "garbage" else "malformed" for _ in found]
        self.apply([W.Fetched(address, req, found, [i for i in ids if i not in found], objects)])

    @rule(address=st.sampled_from(PEERS))
    def peer_gone(self, address):
        self.fetches = {r: v for r, v in self.fetches.items() if v[0] != address}
        self.apply([W.PeerGone(address, "gone")])

    def released_may_be(self):
        """What the server may release: data it was told of (not what an unsent report has)."""
        return sorted(set(self.s.store) - set(self.s.report.finished) - set(self.s.report.replicas))

    @precondition(lambda self: self.released_may_be())
    @rule(data=st.data())
    def release(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.released_may_be()), min_size=1, max_size=3))
        self.apply([W.ReleaseData(ids)])

    @rule(dt=st.sampled_from([0.005, 0.05, 2.0]))
    def tick(self, dt):
        if dt > 1.0:
            self.fetches.clear()   # they time out
        self.apply([W.Tick()], dt)

    @invariant()
    def holds(self):
        self.s.check()
        pending = self.s.report
        unsent = set(pending.finished) | {t for t, _ in pending.failed} | {t for t, _ in pending.redirects}
        waiting = set(self.s.queue.queued) | set(self.s.queue.running)
        assert self.given <= waiting | unsent, f"tasks {sorted(self.given - waiting - unsent)} were lost"


WorkerMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                                           suppress_health_check=list(HealthCheck))
test_worker_state_under_random_events = WorkerMachine.TestCase


def test_peers_named_by_the_server_are_linked_to_once_before_any_fetch():
    s = W.WorkerState(cpus=1)
    out = s.handle([W.PeersKnown(["tcp://a:1", "tcp://b:2", 7, "tcp://a:1"])], 0.0)
    assert [i.address for i in out if isinstance(i, W.Connect)] == ["tcp://a:1", "tcp://b:2"]
    out = s.handle([W.LinkReady("tcp://a:1"), W.PeersKnown(["tcp://a:1", "tcp://b:2", "tcp://c:3"])], 0.01)
    assert [i.address for i in out if isinstance(i, W.Connect)] == ["tcp://c:3"]
    s.check()
    out = s.handle([W.Compute([row(5, [1])], {1: "tcp://a:1"})], 0.02)   # the first fetch: no handshake to wait for
    assert [(i.address, i.ids) for i in out if isinstance(i, W.SendFetch)] == [("tcp://a:1", [1])]
    assert not [i for i in out if isinstance(i, W.Connect)]


def test_a_large_consts_frame_is_counted_once_when_memory_is_sampled_before_it_runs():
    """The RSS sampled right after a COMPUTE arrives holds a large const's frame; the const
    becomes data later in that step: counting the frame in both the process's rest and the
    data spilled the const at once (a 240 MB const on a 300 MB worker)."""
    big = memoryview(bytes(50 << 20)).toreadonly()
    s = W.WorkerState(cpus=1, run_inline=run_inline, memory_limit=150 << 20)   # spill above 90 MB
    base = 20 << 20   # what the process holds besides
    out = s.handle([W.Compute([[1, S.CONST, big, [], 0]], {}), W.MemorySample(base + big.nbytes)], 0.0)
    assert s.store.used() == base + big.nbytes   # 70 MB: the frame once
    assert not [i for i in out if type(i).__name__ == "SpillWrite"] and 1 in s.store.memory
    s.queue.check_invariants()
