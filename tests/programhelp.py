"""Run tasks (``loom/run/run``) in tests through the worker's own path: started by
``Programs``, their pipes served from a poll loop until the outcome comes."""

import zmq

from graphfmt import symbols as S
from loomctl.worker.data import TaskError
from loomctl.worker.programs import Programs
from loomctl.worker.taskqueue import TaskSpec

_programs: dict = {}   # (work dir, keep failed dirs) -> the Programs that ran its tasks


def programs_for(work_dir: str, keep_failed_dirs: bool = False) -> Programs:
    key = (work_dir, keep_failed_dirs)
    if key not in _programs:
        _programs[key] = Programs(zmq.Poller(), work_dir, keep_failed_dirs)
    return _programs[key]


def run_config(work_dir: str, config: bytes, inputs=(), keep_failed_dirs: bool = False, task_id: int = 7):
    """The result of a run task with this config, or TaskError with its message."""
    programs = programs_for(work_dir, keep_failed_dirs)
    outcome = programs.start(TaskSpec(task_id, S.RUN, config, []), list(inputs))
    while outcome is None:
        ready = [fd for fd in dict(programs.poller.poll(10000)) if isinstance(fd, int)]
        assert ready or programs.reaping, "a program never finished"
        done = programs.on_ready(ready)
        if done:
            (outcome,) = done
    if outcome.error is not None:
        raise TaskError(outcome.error)
    return outcome.result


def remove_spares(work_dir: str) -> None:
    """Remove the spare (empty) run directories kept for ``work_dir``, as at worker exit."""
    for (directory, _), programs in _programs.items():
        if directory == work_dir:
            programs.dirs.remove_spares()
