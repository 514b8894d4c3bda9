"""Run the real loomctl command in a subprocess (exit codes and stderr as users see them)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loomctl(*args, input=None, cwd=None, env=None, timeout=60, check=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "loomctl", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-2000:], proc.stderr.decode()[-2000:])
    return proc


def one_line_error(proc, code=3):
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert err.startswith("loomctl: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def final_error(proc, code):
    """Progress lines may come first; the last stderr line is the one-line error."""
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("loomctl: error: "), err
    return last
