"""The worker's data store and memory rules, sans-I/O: spill order, thresholds, reading
back, shared buffers, and the WorkerState driven with memory events (no sockets, no
files: a model plays the spill thread)."""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from graphfmt import symbols as S
from loomctl import protocol as P
from loomctl.worker import state as W
from loomctl.worker.data import Array, FileObj, Plain
from loomctl.worker.outcome import Outcome
from loomctl.worker.store import DataStore, SpillRead, SpillRef, SpillRemove, SpillWrite
from test_worker_state import WorkerMachine, reports, row

EXAMPLES = int(os.environ.get("LOOMCTL_FUZZ_EXAMPLES", "60"))


def filled(n=4, size=20, limit=100, **kw):
    store = DataStore(limit, **kw)
    for i in range(1, n + 1):
        store.put(i, Plain(bytes([i]) * size), size)
    return store


def writes(instructions):
    return [x.id for x in instructions if isinstance(x, SpillWrite)]


def test_objects_leave_memory_least_recently_used_first_and_only_once_written():
    store = filled()                      # 80 bytes in memory, spill above 60
    store.touch(1)                        # 1 is the most recently used now
    assert writes(store.balance()) == [2]
    assert store.balance() == []          # (2's write is under way: it counts as freed)
    assert store.memory_bytes == 80 and store.get(2) is not None
    store.written(2, 21)
    store.balance()                       # written: 2 leaves memory without another write
    assert store.memory_bytes == 60 and store.get(2) is None and 2 in store and store.on_disk_only(2)
    assert store.stats()["spilled_objects"] == 1 and store.stats()["spilled_bytes"] == 20
    store.check()


def test_the_rest_of_the_process_counts_and_pausing_is_above_the_second_threshold():
    store = filled(n=2)                   # 40 bytes of data
    assert store.balance() == [] and not store.paused()
    store.sample(rss=75)                  # 35 bytes are the rest of the process: 75 in use
    assert store.used() == 75 and not store.paused()
    assert writes(store.balance()) == [1]
    store.sample(rss=85)
    assert store.paused()
    assert store.too_big(7, 100) is None
    assert "larger than this worker's memory limit (100 B" in store.too_big(7, 101)
    assert DataStore(None).balance() == [] and not DataStore(None).paused() and DataStore(None).too_big(1, 1 << 60) is None


def test_pinned_objects_stay_and_shared_buffers_count_once():
    store = filled(n=3, size=30)          # 90 bytes
    store.pin([1])
    assert writes(store.balance()) == [2]
    a = Plain(b"a" * 50)
    shared = DataStore(100)
    shared.put(1, a, 50)
    shared.put(2, Array([a, a]), 100)     # the same buffer: 50 bytes in memory, not 150
    shared.put(3, FileObj("/nonexistent"), 10)   # a path only
    assert shared.memory_bytes == 50 and shared.data_bytes == 160
    shared.put(4, Plain(b"b" * 20), 20)   # 70 > 60: but leaving memory alone, 1 or 2 frees nothing
    assert writes(shared.balance()) == [4]
    shared.drop(2)
    shared.written(4, 21)
    assert writes(shared.balance()) == [1]   # now 1 is alone with its buffer
    shared.check()


def test_read_back_keeps_the_file_so_it_can_leave_memory_again_for_free():
    store = filled()
    for i in writes(store.balance()):
        store.written(i, 21)
    store.balance()
    assert store.on_disk_only(1)
    assert store.load(1) == [SpillRead(1)] and store.load(1) == []   # one read at a time
    store.loaded(1, Plain(b"\x01" * 20))
    assert store.get(1) == Plain(b"\x01" * 20) and 1 in store.files and store.loaded_total == [1, 21]
    for i in (2, 3, 4):
        store.touch(i)
    assert writes(store.balance()) == [] and store.on_disk_only(1)    # evicted again, no write
    assert store.drop(1) == [SpillRemove(1)] and 1 not in store
    store.check()


def test_a_dropped_object_leaves_no_file_even_while_written_or_read():
    store = filled(n=5)
    (first, *_) = writes(store.balance())
    assert store.drop(first) == []                        # the write is under way
    assert store.written(first, 21) == [SpillRemove(first)]
    for i in list(store.writing):
        store.written(i, 21)
    store.balance()
    on_disk = next(i for i in store.files if store.on_disk_only(i))
    store.load(on_disk)
    assert store.drop(on_disk) == []
    assert store.loaded(on_disk, Plain(b"x")) == [SpillRemove(on_disk)] and on_disk not in store
    failing = filled()
    (i, *_) = writes(failing.balance())
    assert failing.written(i, 0, "No space left on device") == []
    assert i in failing.memory and i in failing.unwritable and i not in writes(failing.balance())
    store.check()
    failing.check()


def test_a_lost_spill_file_drops_its_object():
    store = filled()
    for i in writes(store.balance()):
        store.written(i, 21)
    store.balance()
    i = next(i for i in store.files if store.on_disk_only(i))
    store.load(i)
    assert store.loaded(i, None, "No such file or directory") == [SpillRemove(i)] and i not in store
    store.check()


# ---------------------------------------------------------------------- the state
def limited_state(limit=100):
    s = W.WorkerState(cpus=1, memory_limit=limit)
    s.handle([W.MemorySample(0)], 0.0)
    return s


def produce(s, tid, size, now=0.0):
    s.handle([W.Compute([row(tid, cpus=1)], {})], now)
    return s.handle([W.TaskDone(Outcome(tid, Plain(b"d" * size), size))], now)


def test_a_task_whose_input_is_on_disk_waits_for_it_to_be_read_back():
    s = limited_state()
    for t in range(1, 5):
        for x in produce(s, t, 30):
            if isinstance(x, SpillWrite):
                s.handle([W.Spilled(x.id, 31)], 0.0)
    assert s.handle([W.Spilled(1, 31)], 0.0) == [] and s.store.file_bytes == 31 * len(s.store.files)   # (a stray answer)
    assert s.store.on_disk_only(1)
    found, objects, missing = s.objects([1, 99])
    assert found == [1] and objects == [SpillRef(1, 31)] and missing == [99]
    out = s.handle([W.Compute([row(10, [1], cpus=1)], {})], 0.0)
    assert SpillRead(1) in out and not [x for x in out if isinstance(x, W.Execute)]
    assert 10 in s.loading and 10 in s.queue.running
    out = s.handle([W.Loaded(1, Plain(b"d" * 30))], 0.0)
    (execute,) = [x for x in out if isinstance(x, W.Execute)]
    assert execute.spec.id == 10 and execute.inputs == [Plain(b"d" * 30)]
    s.check()


def test_an_input_that_cannot_be_read_back_fails_its_task():
    s = limited_state()
    for t in range(1, 5):
        for x in produce(s, t, 30):
            if isinstance(x, SpillWrite):
                s.handle([W.Spilled(x.id, 31)], 0.0)
    s.handle([W.Compute([row(10, [1], cpus=1)], {})], 0.0)
    (update,) = reports(s.handle([W.Loaded(1, None, "Input/output error")], 0.0))
    assert update["failed"] == [[10, "input 1 could not be read back from its spill file: Input/output error"]]
    assert not s.queue.running and 1 not in s.store
    s.check()


def test_above_the_pause_threshold_no_task_starts_but_the_worker_never_stalls():
    s = W.WorkerState(cpus=2, memory_limit=100)
    s.handle([W.MemorySample(90)], 0.0)    # 90 of 100 used, nothing to spill
    out = s.handle([W.Compute([row(1, cpus=1), row(2, cpus=1)], {})], 0.0)
    started = [x.spec.id for x in out if isinstance(x, W.Execute)]
    assert started == [1]                  # nothing runs: one task at a time
    out = s.handle([W.TaskDone(Outcome(1, Plain(b"x"), 1))], 0.0)
    assert [x.id for x in out if isinstance(x, SpillWrite)] == [1] and not s.queue.running
    assert not [x for x in out if isinstance(x, W.Execute)]   # what can leave memory goes first
    out = s.handle([W.Spilled(1, 2)], 0.0)
    assert [x.spec.id for x in out if isinstance(x, W.Execute)] == [2]
    s.handle([W.Compute([row(3, cpus=1)], {})], 0.0)
    assert 3 in s.queue.queued             # task 2 runs: 3 waits while memory is high
    out = s.handle([W.MemorySample(30)], 0.0)
    assert [x.spec.id for x in out if isinstance(x, W.Execute)] == [3]
    s.check()


def test_a_result_larger_than_the_limit_fails_and_is_not_kept():
    s = limited_state(limit=1000)
    (update,) = reports(produce(s, 1, 1001))
    assert update["failed"][0][0] == 1 and "larger than this worker's memory limit" in update["failed"][0][1]
    assert 1 not in s.store and s.data_bytes == 0
    assert P.ids_from_bytes(reports(produce(s, 2, 1000))[0]["finished"]).tolist() == [2]


class SpillingWorkerMachine(WorkerMachine):
    """The random worker of test_worker_state with a memory limit of a few bytes: the
    model carries out the spill instructions (late, or failing), and no task may stall."""

    def __init__(self):
        super().__init__()
        self.s = W.WorkerState(cpus=2, resources={"gpu": 1}, fetch_timeout_s=1.0, memory_limit=4,
                               spill_at=0.5, pause_at=0.75)
        self.disk: dict = {}
        self.io: list = []

    def carry(self, instruction):
        if isinstance(instruction, SpillWrite):
            assert instruction.id in self.s.store.memory
            self.io.append(instruction)
        elif isinstance(instruction, SpillRead):
            assert instruction.id in self.disk, "reads a file that is not there"
            self.io.append(instruction)
        elif isinstance(instruction, SpillRemove):
            assert instruction.id in self.disk, "removes a file that is not there"
            del self.disk[instruction.id]
        else:
            super().carry(instruction)

    @precondition(lambda self: self.io)
    @rule(data=st.data(), fail=st.booleans())
    def finish_io(self, data, fail):
        job = self.io.pop(data.draw(st.integers(0, len(self.io) - 1)))
        if isinstance(job, SpillWrite):
            if not fail:
                self.disk[job.id] = job.obj
            self.apply([W.Spilled(job.id, 0 if fail else 2, "disk full" if fail else None)])
        else:
            self.apply([W.Loaded(job.id, None if fail else self.disk[job.id], "gone" if fail else None)])

    @rule(rss=st.integers(0, 6))
    def memory(self, rss):
        self.apply([W.MemorySample(rss)])

    @invariant()
    def files_and_progress(self):
        writes_under_way = {j.id for j in self.io if isinstance(j, SpillWrite)}
        assert set(self.disk) - self.s.store.doomed == set(self.s.store.files), "the files are the store's"
        assert writes_under_way == self.s.store.writing
        q = self.s.queue
        if q.n_ready and not q.running and not self.s.store.writing:
            raise AssertionError("ready tasks, nothing running and nothing being written: stalled")


SpillingWorkerMachine.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
                                                   suppress_health_check=list(HealthCheck))
test_spilling_worker_state_under_random_events = SpillingWorkerMachine.TestCase


def test_inline_merge_of_spilled_inputs_runs_once_they_are_back():
    s = limited_state()
    for t in (1, 2, 3):
        for x in produce(s, t, 40):
            if isinstance(x, SpillWrite):
                s.handle([W.Spilled(x.id, 41)], 0.0)
    on_disk = [i for i in (1, 2, 3) if s.store.on_disk_only(i)]
    assert on_disk
    out = s.handle([W.Compute([row(9, on_disk, symbol=S.MERGE)], {})], 0.0)
    reads = [x.id for x in out if isinstance(x, SpillRead)]
    assert reads == on_disk
    out = s.handle([W.Loaded(i, Plain(b"d" * 40)) for i in reads], 0.0)
    (execute,) = [x for x in out if isinstance(x, W.Execute)]
    assert execute.route == "inline" and len(execute.inputs) == len(on_disk)


def test_pieces_viewing_a_large_consts_frame_count_that_frame_once_while_one_is_held():
    """The pieces of a split of a large const are views of the frame it came in: held
    alone, a 10-byte piece still keeps (and is counted as) the whole frame."""
    import zmq
    from loomctl.worker.data import Index
    from loomctl.worker.executors import split_cuts
    text = b"".join(b"piece %03d\n" % i for i in range(100))   # 1,000 bytes
    frame = zmq.Frame(text)
    const = Plain.over(frame.buffer.toreadonly())
    index = Index(const, split_cuts(const.content, ord("\n")))
    pieces = [index.get(i) for i in range(3)]
    assert [p.read_range(0, 9) for p in pieces] == [b"piece 000", b"piece 001", b"piece 002"]
    assert all(type(p.content) is memoryview and p.content.obj is frame for p in pieces)
    store = DataStore(10_000)
    store.put(1, const, 1000)
    store.put(2, index, 1000)
    for k, p in enumerate(pieces):
        store.put(10 + k, p, 10)
    assert store.memory_bytes == 1000 + index.cuts.nbytes
    assert pieces[0].read() == b"piece 000\n" and type(pieces[0].content) is memoryview   # (no change:
    store.check()                                                                     #  still counted right)
    store.drop(1)
    store.drop(2)
    store.drop(10)
    assert store.memory_bytes == 1000   # two pieces left: the frame is still there
    store.check()
    store.drop(11)
    store.drop(12)
    assert store.memory_bytes == 0
    store.check()


def test_pieces_that_share_a_frame_are_spilled_too_and_the_frame_leaves_with_the_last():
    """Objects that free nothing alone (the pieces of one frame) still leave memory once
    nothing else can: else a worker holding only pieces of a large frame could never
    get below its spill threshold."""
    import zmq
    frame = zmq.Frame(b"p" * 1000)
    view = frame.buffer.toreadonly()
    store = DataStore(1000)   # spill above 600
    for k in range(4):
        store.put(k, Plain.over(view[250 * k:250 * (k + 1)]), 250)
    store.put(9, Plain(b"e" * 100), 100)   # frees memory alone: written first
    assert store.memory_bytes == 1100
    first = writes(store.balance())
    assert first[0] == 9 and set(first[1:]) <= {0, 1, 2, 3} and len(first) == 3   # 100 + 2 x 250 shares >= 500
    for i in first:
        store.written(i, 251)
    store.balance()
    store.check()
    assert store.memory_bytes == 1000   # two pieces still hold the frame
    for _ in range(4):   # (each balance counts the shares as they are now)
        for i in writes(store.balance()):
            store.written(i, 251)
        store.check()
    assert store.memory_bytes == 0 and all(store.on_disk_only(k) for k in range(4))
