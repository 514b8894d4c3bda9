"""Programs started by the worker: posix_spawn (loomctl.worker.spawn) and, where libc
lacks it, subprocess.Popen behind the same Child interface, driven through Programs as
the worker's loop drives them."""

import os
import sys

import pytest
import zmq

from graphfmt import symbols as S
from loomctl.worker import spawn
from loomctl.worker.programs import Programs


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            os.close(fd)
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.mark.skipif(not spawn.available(), reason="this libc has no posix_spawn_file_actions_addchdir_np/closefrom_np")
def test_spawn_cwd_pipes_status_and_a_clean_child(tmp_path):
    script = ("import os, sys; print(os.getcwd()); print(sorted(os.listdir('/proc/self/fd')));"
              "sys.stderr.write(sys.stdin.read()); sys.exit(3)")
    child = spawn.spawn([sys.executable, "-c", script], str(tmp_path), stdin=True, stdout=True, stderr=True)
    os.write(child.stdin, b"via stdin")
    os.close(child.stdin)
    out, err = read_all(child.stdout).decode().splitlines(), read_all(child.stderr)
    assert child.wait() == 3
    assert out[0] == str(tmp_path)
    assert out[1] == "['0', '1', '2', '3']"   # 3 is listdir's own descriptor: nothing leaked
    assert err == b"via stdin"
    # the worker (Python) ignores SIGPIPE; its programs must not inherit that
    child = spawn.spawn(["grep", "SigIgn", "/proc/self/status"], str(tmp_path), stdin=False, stdout=True, stderr=False)
    ignored = int(read_all(child.stdout).split()[1], 16)
    assert child.wait() == 0
    assert not ignored & (1 << (13 - 1))


@pytest.mark.skipif(not spawn.available(), reason="this libc has no posix_spawn")
def test_spawn_of_a_missing_program_is_an_oserror_and_leaks_nothing(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as info:
        spawn.spawn(["no-such-program-here"], str(tmp_path), stdin=True, stdout=True, stderr=True)
    assert info.value.errno == 2
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("use_spawn", [True, False], ids=["posix_spawn", "popen"])
def test_programs_run_through_the_loop_either_way(tmp_path, monkeypatch, use_spawn):
    if use_spawn and not spawn.available():
        pytest.skip("this libc has no posix_spawn")
    if not use_spawn:
        monkeypatch.setattr(spawn, "available", lambda: False)
    poller = zmq.Poller()
    programs = Programs(poller, str(tmp_path), keep_failed_dirs=False)

    class Spec:
        def __init__(self, task_id, args):
            self.id, self.config, self.symbol = task_id, S.encode_run(args, [None], [None]), S.RUN
            self.checkpoint, self.label = None, ""

    from loomctl.worker.data import Plain
    specs = {1: (["tr", "a-z", "A-Z"], b"hello"), 2: (["sh", "-c", "cat >/dev/null; echo oops >&2; exit 5"], b"x"),
             # closes its pipes, then runs on: its exit must still be noticed (pidfd or polling)
             3: (["sh", "-c", "cat >/dev/null; echo early; exec >&- 2>&-; sleep 0.3; exit 4"], b"x")}
    for task_id, (args, stdin) in specs.items():
        assert programs.start(Spec(task_id, args), [Plain(stdin)]) is None
    outcomes = {}
    while len(outcomes) < 3:
        events = dict(poller.poll(5000))
        assert events or programs.reaping, "a program never finished"
        for outcome in programs.on_ready(list(events)):
            outcomes[outcome.task_id] = outcome
    assert outcomes[1].error is None and outcomes[1].result.read() == b"HELLO"
    assert "status 5" in outcomes[2].error and "oops" in outcomes[2].error
    assert "status 4" in outcomes[3].error
    assert outcomes[3].ended - outcomes[3].started >= 0.3
    assert len(programs) == 0
    programs.dirs.remove_spares()
    assert os.listdir(tmp_path) == []
