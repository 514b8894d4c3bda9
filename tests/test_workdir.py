"""A worker's directory: dead workers' directories are removed by the next worker in the
same work dir, live workers' never (real processes, SIGKILLed)."""

import os
import signal
import subprocess
import sys

from clihelp import ROOT
from loomctl.worker.workdir import LOCK, WorkDir

HOLDER = r"""
import os, sys, time
from loomctl.worker.workdir import WorkDir
d = WorkDir(sys.argv[1])
path = d.open()
os.makedirs(os.path.join(path, "run-7"))
print(path, flush=True)
time.sleep(60)
"""


def _holder(base):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(base)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    return proc, proc.stdout.readline().strip()


def test_a_killed_workers_directory_goes_a_live_ones_stays(tmp_path):
    dead, dead_dir = _holder(tmp_path)
    live, live_dir = _holder(tmp_path)
    old_style = tmp_path / "worker-999999999-abc"   # no lock file, a pid that is not running
    (old_style / "run-1").mkdir(parents=True)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert os.path.isdir(os.path.join(dead_dir, "run-7"))
        mine = WorkDir(str(tmp_path))
        path = mine.open()
        assert not os.path.exists(dead_dir) and not old_style.exists()
        assert os.path.isdir(os.path.join(live_dir, "run-7")) and os.path.exists(os.path.join(live_dir, LOCK))
        assert sorted(mine.removed) == sorted([dead_dir, str(old_style)])
        mine.close()
        assert not os.path.exists(path) and os.path.isdir(live_dir)
    finally:
        live.kill()
        live.wait()


def test_a_work_dir_it_made_is_removed_when_empty(tmp_path):
    d = WorkDir(str(tmp_path / "new"))
    d.open()
    d.close()
    assert not (tmp_path / "new").exists()
