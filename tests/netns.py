"""Several hosts on one machine: network namespaces joined by a bridge, with a loomctl
server and workers each in its own namespace (root only).

Layout of a ``NetnsCluster`` (``ID`` = "<pid>-<counter>-<random>", so parallel runs never
clash):

    namespace lb-ID:  bridge br0, ports p1..pN (the "switch")
    namespace ln1-ID: eth0 10.77.0.1/24 <-veth-> p1   the server
    namespace lnK-ID: eth0 10.77.0.K/24 <-veth-> pK   worker K-2 (named wK-2)

Only these namespaces carry traffic. ``cut_command(k)`` disables node k's switch port
(bridge port state "disabled"): every frame to and from the node is dropped silently
while both ends of its link stay up, as with a failed switch port or an iptables DROP
(this machine has neither iptables nor netem); without the ``bridge`` tool it sets the
node's eth0 down instead.

``NetnsCluster.stop`` (always called by the fixtures) terminates, then kills, every
process started here and deletes every namespace (which deletes the veths and the
bridge with them)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time

from clihelp import ROOT
from cluster import terminate_all, wait_access

SUBNET = "10.77.0"
_counter = itertools.count(1)


class NetnsUnavailable(Exception):
    """This machine cannot make network namespaces (not root, no ``ip``, no netns)."""


def _ip(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def netns_inode(name: str) -> int:
    """The inode of a namespace (what ``readlink /proc/self/ns/net`` shows inside it)."""
    return os.stat(f"/run/netns/{name}").st_ino


class Network:
    """A bridge namespace and ``n`` node namespaces, node k (1-based) at 10.77.0.k."""

    def __init__(self, n: int):
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` tool (iproute2) is not installed")
        tag = f"{os.getpid()}-{next(_counter)}-{os.urandom(2).hex()}"
        self.bridge_ns = f"lb-{tag}"
        self.nodes = [f"ln{k}-{tag}" for k in range(1, n + 1)]
        self.created: list[str] = []
        proc = _ip("netns", "add", self.bridge_ns, check=False)
        if proc.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {proc.stderr.strip()}")
        self.created.append(self.bridge_ns)
        try:
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for k, ns in enumerate(self.nodes, 1):
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{k}",
                    "netns", self.bridge_ns)
                _ip("-n", self.bridge_ns, "link", "set", f"p{k}", "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", f"p{k}", "up")
                _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def address(k: int) -> str:
        return f"{SUBNET}.{k}"

    def exec_prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[k - 1]]

    def cut_command(self, k: int) -> list[str]:
        """The command that drops every frame to and from node k (run it from anywhere)."""
        if shutil.which("bridge") is not None:
            return ["bridge", "-n", self.bridge_ns, "link", "set", "dev", f"p{k}", "state", "0"]
        return ["ip", "-n", self.nodes[k - 1], "link", "set", "eth0", "down"]

    def mend_command(self, k: int) -> list[str]:
        """The command that undoes ``cut_command(k)``."""
        if shutil.which("bridge") is not None:
            return ["bridge", "-n", self.bridge_ns, "link", "set", "dev", f"p{k}", "state", "3"]
        return ["ip", "-n", self.nodes[k - 1], "link", "set", "eth0", "up"]

    def cut(self, k: int) -> None:
        subprocess.run(self.cut_command(k), check=True, capture_output=True, timeout=10)

    def close(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)   # deletes its veths (and the bridge)
        self.created = []

    def leftovers(self) -> list[str]:
        names = set(_ip("netns", "list", check=False).stdout.split())
        return [ns for ns in [self.bridge_ns, *self.nodes] if ns in names]


class NetnsCluster:
    """A server in node 1 and ``workers`` workers in nodes 2.. (one cpu each, named w0,
    w1, ...; ``worker_args`` maps a name to extra ``worker start`` options), and with
    ``client_host`` one more node for clients of their own (``client_node``)."""

    def __init__(self, directory, workers: int = 2, heartbeat_timeout: float = 2.0,
                 worker_args: dict | None = None, client_host: bool = False):
        self.dir = str(directory)
        self.server_dir = os.path.join(self.dir, "server")
        self.env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        LOOM_SERVER_DIR=self.server_dir)
        self.logs: list = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.net = Network(1 + workers + int(client_host))
        self.client_node = workers + 2 if client_host else 1
        try:
            self.server = self._spawn(1, "server", ["server", "start", "--host", self.net.address(1),
                                                    "--port", "0", "--verbose",
                                                    "--heartbeat-timeout", str(heartbeat_timeout)])
            self.access = wait_access(self.server_dir, self.server, lambda: self.log("server"))
            for w in range(workers):
                self._spawn(w + 2, f"w{w}", ["worker", "start", "--cpus", "1", "--name", f"w{w}",
                                             "--host", self.net.address(w + 2), "--verbose",
                                             "--work-dir", os.path.join(self.dir, f"work-w{w}"),
                                             *(worker_args or {}).get(f"w{w}", ())])
            self._wait_registered(workers)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, node: int, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.log"), "wb")
        self.logs.append(log)
        # `ip netns exec` execs the command: the Popen pid is the loomctl process itself
        proc = subprocess.Popen([*self.net.exec_prefix(node), sys.executable, "-m", "loomctl", *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        self.procs[name] = proc
        return proc

    def _wait_registered(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log("server", tail=None).count(" registered: ") >= count:
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)}")
            time.sleep(0.05)
        raise RuntimeError(f"expected {count} workers: {self.log('server')}")

    def run_client(self, script: str, args: dict, node: int = 1, timeout: float = 60) -> dict:
        """Run ``script`` (Python source; ``ARGS`` is ``args`` plus "server_dir") in node
        ``node``; it prints one JSON object as its last stdout line, which is returned."""
        payload = json.dumps({**args, "server_dir": self.server_dir})
        code = f"import json, sys\nARGS = json.loads(sys.argv[1])\n{script}"
        proc = subprocess.run([*self.net.exec_prefix(node), sys.executable, "-c", code, payload],
                              capture_output=True, text=True, env=self.env, timeout=timeout)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise AssertionError(f"client failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                                 f"--- server log:\n{self.log('server')}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def log(self, name: str, tail: int | None = 3000) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def stop(self) -> None:
        try:
            terminate_all(list(self.procs.values()))
            for log in self.logs:
                log.close()
        finally:
            self.net.close()
