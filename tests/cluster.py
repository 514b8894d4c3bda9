"""Real loomctl server and worker processes on 127.0.0.1 for end-to-end tests.

Every process started here is stopped by ``Cluster.stop`` (terminate, then kill), which
the fixtures call in their finalizers."""

import json
import os
import signal
import subprocess
import sys
import time

from clihelp import ROOT


class Cluster:
    def __init__(self, directory, workers=2, cpus=1, auth=True, heartbeat_timeout=5.0, worker_args=(),
                 shared_work_dir=False, server_args=()):
        self.dir = str(directory)
        self.server_dir = os.path.join(self.dir, "server")
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        LOOM_SERVER_DIR=self.server_dir)
        self.logs = []
        self.workers = []
        self.shared_work_dir = os.path.join(self.dir, "work") if shared_work_dir else None
        cmd = ["server", "start", "--port", "0", "--verbose", "--heartbeat-timeout", str(heartbeat_timeout)]
        if not auth:
            cmd.append("--no-auth")
        cmd += list(server_args)
        self.server = self._spawn(cmd, "server")
        try:
            self.access = wait_access(self.server_dir, self.server, lambda: self.log("server"))
            for k in range(workers):
                self.add_worker(cpus=cpus, name=f"w{k}", extra=worker_args)
            self.wait_workers(workers)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, args, name):
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")
        self.logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "loomctl", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=self.env)

    def add_worker(self, cpus=1, name=None, extra=()):
        name = name or f"w{len(self.workers)}"
        work_dir = self.shared_work_dir or os.path.join(self.dir, f"work-{name}")
        proc = self._spawn(["worker", "start", "--cpus", str(cpus), "--name", name, "--work-dir", work_dir,
                            *extra], name)
        self.workers.append(proc)
        return proc

    def client(self, **kw):
        from loomctl.client import Client
        return Client(server_dir_path=self.server_dir, **kw)

    def stats(self):
        with self.client() as c:
            return c.get_stats()

    def wait_workers(self, count, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.stats()["n_workers"] == count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"expected {count} workers: {self.log('server')}")

    def log(self, name):
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self):
        terminate_all([p for p in [*self.workers, getattr(self, "server", None)] if p is not None])
        for log in self.logs:
            log.close()


def wait_access(server_dir: str, server: subprocess.Popen, server_log, timeout: float = 20) -> dict:
    """The access file a starting server writes; RuntimeError with its log if it exits
    or does not write one in time."""
    path = os.path.join(server_dir, "access.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        if server.poll() is not None:
            raise RuntimeError(f"server exited: {server_log()}")
        time.sleep(0.02)
    raise RuntimeError(f"server did not write its access file: {server_log()}")


def terminate_all(procs) -> None:
    """SIGTERM to every process still running, then up to 5 s for all to exit, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until(predicate, what: str, timeout: float = 30, step: float = 0.05):
    """The first true value of ``predicate()``, polled every ``step`` seconds;
    AssertionError naming ``what`` when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
