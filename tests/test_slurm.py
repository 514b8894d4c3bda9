"""loomctl in Slurm allocations, on a real Slurm, and the PBS script with a stand-in pbsdsh.

The real-Slurm tests start their own cluster in a temporary directory: munged on a
socket of its own, slurmctld and two slurmd emulating nodes n1 and n2 on this host
(NodeAddr 127.0.0.1, free ports), no accounting. They need root (slurmd starts job
steps as their users) and Debian's slurm-wlm and munge packages; nothing is installed
when this module is imported. When slurmctld is missing, the fixture installs the
packages with apt-get only as root with LOOMCTL_SLURM_TESTS=1, and skips otherwise;
LOOMCTL_SLURM_TESTS=0 skips them always. Every daemon started here is stopped in the
fixture's finalizer (jobs are cancelled first). Traffic stays on 127.0.0.1: the nodes'
NodeAddr is 127.0.0.1 and loomctl's server gets --host 127.0.0.1 (the Slurm daemons
listen on free ports of every interface: Slurm has no setting to narrow that).

The other tests need no Slurm: batch scripts, argument errors, the worker command line,
and examples/slurm/loomctl.pbs run with a pbsdsh that runs its program on this host.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from clihelp import ROOT, loomctl, one_line_error

EXAMPLES = os.path.join(ROOT, "examples")
NODES_PLAN = os.path.join(EXAMPLES, "slurm", "nodes.py")
WORDCOUNT = os.path.join(EXAMPLES, "wordcount", "wordcount.py")
SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def clean_env(**extra) -> dict:
    """This environment without the variables of a Slurm job pytest may run in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "PBS_"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    env.update(extra)
    return env


def expected_top_words(path: str, top: int) -> str:
    import collections
    with open(path, encoding="utf-8") as f:
        counts = collections.Counter(re.findall(r"[a-z]+", f.read().lower()))
    best = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    return "".join(f"{n:7d} {word}\n" for word, n in best)


def read_results(directory) -> list[str]:
    names = sorted(os.listdir(directory), key=lambda n: int(n.split("-")[1]))
    out = []
    for name in names:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            out.append(f.read())
    return out


def check_nodes_result(text: str, tasks: int) -> set[str]:
    """nodes.py's result: one line per task in order; returns the nodes that ran tasks."""
    lines = text.splitlines()
    assert [int(line.split()[1]) for line in lines] == list(range(tasks)), text
    return {line.split()[4] for line in lines}


# ---------------------------------------------------------------- no Slurm needed

def test_print_shows_a_batch_script(tmp_path):
    proc = loomctl("slurm", "submit", NODES_PLAN, "-N", "3", "--time", "10:00", "--partition", "debug",
                   "--sbatch-arg=--account=proj", "--sbatch-arg", "--mem=1G", "-p", "tasks=4",
                   "-o", "out", "--trace", "tr", "--worker-arg=--memory-limit=2G", "-J", "my job",
                   "--print", cwd=tmp_path, env=clean_env(), check=0)
    script = proc.stdout.decode()
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert directives == ['#SBATCH --job-name="my job"', "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --exclusive", "#SBATCH --time=10:00", "#SBATCH --partition=debug",
                          "#SBATCH --account=proj", "#SBATCH --mem=1G"]
    # sbatch reads #SBATCH lines only before the first command
    assert lines.index(directives[-1]) < min(i for i, line in enumerate(lines) if not line.startswith("#"))
    last = lines[-1]
    assert last.startswith(f"exec {sys.executable} -m loomctl slurm run-allocation {NODES_PLAN} ")
    assert f"--output {tmp_path / 'out'}" in last and f"--trace {tmp_path / 'tr'}" in last
    assert "--param tasks=4" in last and "--worker-arg=--memory-limit=2G" in last
    proc = subprocess.run(["bash", "-n"], input=script.encode(), capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_cpus_per_node_replaces_exclusive(tmp_path):
    proc = loomctl("slurm", "submit", NODES_PLAN, "--cpus-per-node", "8", "--print", cwd=tmp_path,
                   env=clean_env(), check=0)
    script = proc.stdout.decode()
    assert "#SBATCH --cpus-per-task=8" in script and "--exclusive" not in script
    assert "#SBATCH --nodes=1" in script


@pytest.mark.parametrize("args, code, words", [
    (["missing.py"], 3, "no such file"),
    (["-"], 2, "not -"),
    ([NODES_PLAN, "-J", "a\nb"], 2, "line break"),
    ([NODES_PLAN, "-p", "novalue"], 2, "KEY=VALUE"),
])
def test_submit_argument_errors(tmp_path, args, code, words):
    proc = loomctl("slurm", "submit", *args, cwd=tmp_path, env=clean_env())
    assert words in one_line_error(proc, code)


def test_submit_without_sbatch_is_one_line(tmp_path):
    proc = loomctl("slurm", "submit", NODES_PLAN, cwd=tmp_path, env=clean_env(PATH=str(tmp_path)))
    assert "sbatch not found" in one_line_error(proc, 4)


def test_run_allocation_outside_slurm_is_one_line(tmp_path):
    proc = loomctl("slurm", "run-allocation", NODES_PLAN, cwd=tmp_path, env=clean_env())
    assert "not inside a Slurm allocation" in one_line_error(proc, 2)


def test_worker_command_takes_cpus_and_name_from_the_node(tmp_path):
    """The srun line's shell expands the node's cpus and name on the node; options
    given by the user come last (and so win)."""
    from loomctl.cluster import slurm
    cmd = slurm.srun_command(2, "/py", "/shared/server", ["--memory-limit=1G"], ["--mpi=none"])
    assert cmd[:8] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--whole",
                       "--kill-on-bad-exit=0", "--label", "--job-name=loomctl-workers"]
    assert cmd[8] == "--mpi=none"
    shell = cmd[cmd.index("sh"):]
    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    shell[shell.index("/py")] = str(fake)
    env = {"PATH": os.environ.get("PATH", ""), "SLURM_CPUS_ON_NODE": "6", "SLURMD_NODENAME": "n7"}
    out = subprocess.run(shell, capture_output=True, text=True, env=env, check=True).stdout.split("\n")
    assert out[:-1] == ["-m", "loomctl", "worker", "start", "--cpus", "6", "--name", "n7",
                        "--server-dir", "/shared/server", "--memory-limit=1G"]


def test_server_address():
    from loomctl.cluster import slurm
    assert slurm.server_address("127.0.0.1") == "127.0.0.1"
    assert slurm.server_address("localhost").startswith("127.")
    with pytest.raises(slurm.SlurmError):
        slurm.server_address("no-such-host.invalid")
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", slurm.server_address())


def test_sbatch_reads_the_job_id_past_warnings(tmp_path):
    from loomctl.cluster import slurm
    stub = tmp_path / "sbatch"
    stub.write_text(f'#!/bin/sh\ncat > {tmp_path}/script\necho "sbatch: warning: odd" >&2\necho "77;cluster"\n')
    stub.chmod(0o755)
    assert slurm.sbatch("#!/bin/bash\ntrue\n", command=str(stub)) == "77"
    assert (tmp_path / "script").read_text() == "#!/bin/bash\ntrue\n"
    stub.write_text('#!/bin/sh\necho "sbatch: error: Batch job submission failed: Invalid partition" >&2\nexit 1\n')
    with pytest.raises(slurm.SlurmError, match="exit status 1.*Invalid partition"):
        slurm.sbatch("#!/bin/bash\n", command=str(stub))


def test_wait_job_polls_until_a_final_state():
    from loomctl.cluster import slurm
    answers = iter([{"JobState": "PENDING"}, slurm.SlurmError("timed out"), {"JobState": "RUNNING"},
                    {"JobState": "COMPLETING"}, {"JobState": "COMPLETED", "ExitCode": "0:0"}])

    def info(job_id):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer
    slept = []
    assert slurm.wait_job("5", info=info, sleep=slept.append)["JobState"] == "COMPLETED"
    assert slept == [0.5, 0.75, 1.125, 1.6875]
    assert slurm.wait_job("5", info=lambda j: None, sleep=slept.append)["JobState"] == "UNKNOWN"

    def broken(job_id):
        raise slurm.SlurmError("slurmctld is down")
    with pytest.raises(slurm.SlurmError, match="down"):
        slurm.wait_job("5", info=broken, sleep=lambda s: None)


def test_pbs_script_with_a_stand_in_pbsdsh(tmp_path):
    """examples/slurm/loomctl.pbs, with a pbsdsh that runs its program here: one worker
    per distinct host of the node file, with as many cpus as the host's lines."""
    if shutil.which("bash") is None or shutil.which("getent") is None:
        pytest.skip("needs bash and getent")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pbsdsh.calls"
    stub = bin_dir / "pbsdsh"
    stub.write_text('#!/bin/sh\necho "$*" >> "$PBSDSH_CALLS"\n'
                    'while [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    stub.chmod(0o755)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("hostA\nhostA\nhostB\n")
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PBSDSH_CALLS=str(calls),
                    PBS_JOBID="42.pbs-server", PBS_O_WORKDIR=str(work), PBS_NODEFILE=str(nodefile),
                    LOOMCTL=f"{sys.executable} -m loomctl", LOOMCTL_PLAN=NODES_PLAN, LOOMCTL_HOST="127.0.0.1",
                    LOOMCTL_SUBMIT_ARGS="-p tasks=6 -p seconds=0.1", LOOMCTL_START_TIMEOUT="60")
    proc = subprocess.run(["bash", os.path.join(EXAMPLES, "slurm", "loomctl.pbs")], capture_output=True,
                          env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, (proc.stdout.decode()[-2000:], proc.stderr.decode()[-2000:])
    job_dir = work / "loomctl-42"
    (result,) = read_results(job_dir / "results")
    check_nodes_result(result, 6)
    lines = sorted(calls.read_text().splitlines())
    assert len(lines) == 2 and lines[0].startswith("-n 0 -- /bin/sh -c") and lines[1].startswith("-n 2 -- /bin/sh -c")
    assert lines[0].split()[-2:] == [str(job_dir / "server"), "2"]     # hostA: 2 lines, 2 cpus
    assert lines[1].split()[-2:] == [str(job_dir / "server"), "1"]
    assert not (job_dir / "server" / "access.json").exists()             # the server stopped
    assert "terminate requested" in (job_dir / "server" / "server.log").read_text()


# ---------------------------------------------------------------- a real Slurm

def _binary(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun",
                  "munged")


def ensure_slurm() -> None:
    """Skip (or, as root with LOOMCTL_SLURM_TESTS=1, install Slurm and munge first)."""
    wanted = os.environ.get("LOOMCTL_SLURM_TESTS", "")
    if wanted == "0":
        pytest.skip("LOOMCTL_SLURM_TESTS=0")
    is_root = os.geteuid() == 0
    if _binary("slurmctld") is None:
        if not (is_root and wanted == "1"):
            pytest.skip("Slurm is not installed (no slurmctld); as root with LOOMCTL_SLURM_TESTS=1 this test "
                        "installs slurm-wlm and munge with apt-get")
        apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
        proc = subprocess.run(install, capture_output=True, text=True, env=apt_env, timeout=900)
        if proc.returncode != 0:   # a stale package list: update it once
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=apt_env, timeout=900)
            proc = subprocess.run(install, capture_output=True, text=True, env=apt_env, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"apt-get install slurm-wlm munge failed: {(proc.stdout + proc.stderr)[-1500:]}")
    missing = [b for b in SLURM_BINARIES if _binary(b) is None]
    if missing:
        pytest.skip(f"Slurm is incomplete here: {', '.join(missing)} missing")
    if not is_root:
        pytest.skip("the Slurm daemons need root (slurmd starts job steps as their users)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd n1, n2 on this host, all under ``root``."""

    def __init__(self, root):
        self.root = str(root)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.logs = []
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = clean_env(SLURM_CONF=self.conf)

    # ------------------------------------------------------------ set-up
    def start(self) -> None:
        munge_dir = os.path.join(self.root, "munge")
        os.makedirs(munge_dir)
        os.chmod(self.root, 0o755)
        os.chmod(munge_dir, 0o755)      # munged refuses group/world-writable socket dirs
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        socket_path = os.path.join(munge_dir, "munge.socket")
        self._spawn("munged", [_binary("munged"), "-F", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                               f"--seed-file={munge_dir}/munged.seed"])
        self._wait(lambda: os.path.exists(socket_path), 20, "munged did not create its socket")
        self._write_conf(socket_path)
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", self.conf])
        for node in ("n1", "n2"):
            self._spawn(f"slurmd-{node}", [_binary("slurmd"), "-D", "-N", node, "-f", self.conf])
        self._wait(self._nodes_idle, 60, "the nodes did not become idle")

    def _write_conf(self, munge_socket: str) -> None:
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        p1, p2 = free_port(), free_port()
        conf = f"""\
ClusterName=loomtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
KillWait=5
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=2
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=2
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "wb")
        self.logs.append(log)
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, env=self.env)))

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [(n, p.returncode) for n, p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{message}: {dead[0][0]} exited with status {dead[0][1]}: "
                                   f"{self.log(dead[0][0])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} within {timeout} s: {self.log('slurmctld')}")
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
        return states.get("n1") == "idle" and states.get("n2") == "idle"

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, f"{name}.out"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    # ------------------------------------------------------------ use
    def run(self, *args, check=True, cwd=None, env=None, timeout=60) -> subprocess.CompletedProcess:
        proc = subprocess.run([_binary(args[0]), *args[1:]], capture_output=True, text=True,
                              env=env or self.env, cwd=cwd, timeout=timeout)
        if check:
            assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float = 120) -> dict:
        """Poll scontrol until the job reaches a final state."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout} s")
            time.sleep(0.3)

    # ------------------------------------------------------------ tear-down
    def stop(self) -> None:
        if os.path.exists(self.conf) and any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.3)
        # slurmd, then slurmctld, then munged (the others use it while they stop)
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def slurm():
    ensure_slurm()
    # not under pytest's temporary directory: munged wants every directory above its
    # socket searchable by all, and pytest's base directory has mode 0700
    root = tempfile.mkdtemp(prefix="loomctl-slurm-")
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def test_submit_runs_the_plan_on_both_nodes(slurm, tmp_path):
    out = tmp_path / "out"
    proc = loomctl("slurm", "submit", NODES_PLAN, "-N", "2", "--output", out, "--trace", tmp_path / "trace",
                   "-p", "tasks=16", "-p", "seconds=0.3", "--host", "127.0.0.1", "--wait", cwd=tmp_path, env=slurm.env, timeout=180)
    text = proc.stdout.decode()
    assert proc.returncode == 0, (text, proc.stderr.decode())
    job_id = re.match(r"Submitted Slurm job (\d+) \(2 nodes, 18 tasks\); results: (.*)$", text.splitlines()[0])
    assert job_id and job_id.group(2) == str(out), text
    job_id = job_id.group(1)
    assert text.splitlines()[1] == f"Slurm job {job_id} finished; results: {out}"
    info = slurm.wait_job(job_id)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", info
    (result,) = read_results(out)
    assert check_nodes_result(result, 16) == {"n1", "n2"}, result   # both nodes ran tasks
    server_dir = tmp_path / f"loomctl-{job_id}" / "server"
    assert not (server_dir / "access.json").exists()                # the server stopped
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert f"Slurm job {job_id}: server on n1 at " in log and "exited with status" not in log, log
    assert "error" not in (server_dir / "workers.log").read_text().lower()
    assert not processes_mentioning(str(server_dir)), "a worker outlived its job"


def test_submit_prints_the_job_id_and_the_results_come_back(slurm, tmp_path):
    proc = loomctl("slurm", "submit", WORDCOUNT, "-N", "2", "-p", "top=12", "--host", "127.0.0.1", "-q", cwd=tmp_path, env=slurm.env,
                   check=0)
    job_id = proc.stdout.decode().strip()
    assert job_id.isdigit(), proc.stdout
    info = slurm.wait_job(job_id)
    assert info["JobState"] == "COMPLETED", (info, (tmp_path / f"slurm-{job_id}.out").read_text())
    (result,) = read_results(tmp_path / f"loomctl-{job_id}" / "results")
    assert result == expected_top_words(os.path.join(EXAMPLES, "wordcount", "plan-life.txt"), 12)


def test_the_example_batch_script(slurm, tmp_path):
    """examples/slurm/loomctl.sbatch, as a user would sbatch it (the #SBATCH lines ask for
    two whole nodes); the job is followed with scontrol."""
    env = dict(slurm.env, LOOMCTL=f"{sys.executable} -m loomctl", LOOMCTL_HOST="127.0.0.1",
               LOOMCTL_TRACE=str(tmp_path / "trace"))
    proc = slurm.run("sbatch", "--parsable", os.path.join(EXAMPLES, "slurm", "loomctl.sbatch"), NODES_PLAN,
                     "-p", "tasks=12", "-p", "seconds=0.3", cwd=tmp_path, env=env)
    job_id = proc.stdout.strip().split(";")[0]
    info = slurm.wait_job(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", (info, log)
    job_dir = tmp_path / f"loomctl-{job_id}"
    (result,) = read_results(job_dir / "results")
    assert check_nodes_result(result, 12) == {"n1", "n2"}, result
    assert not (job_dir / "server" / "access.json").exists()
    assert "terminate requested" in (job_dir / "server" / "server.log").read_text()
    workers = (job_dir / "server" / "workers.log").read_text()
    assert "error" not in workers.lower() and "CANCELLED" not in log, (workers, log)


def test_a_failed_task_fails_the_job_and_stops_everything(slurm, tmp_path):
    plan = tmp_path / "commands.txt"
    plan.write_text('echo fine\nsh -c "echo broken >&2; exit 3"\n')
    proc = loomctl("slurm", "submit", plan, "-N", "2", "--host", "127.0.0.1", "--wait", cwd=tmp_path, env=slurm.env, timeout=180)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    job_id = re.match(rb"Submitted Slurm job (\d+)", proc.stdout).group(1).decode()
    err = proc.stderr.decode()
    assert err.startswith(f"loomctl: error: Slurm job {job_id} ended FAILED, exit code 1:0") and err.count("\n") == 1, err
    info = slurm.wait_job(job_id)
    assert info["JobState"] == "FAILED", info
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "loomctl: error: job 1 failed: task 1 (line:2)" in log and "broken" in log, log
    server_dir = tmp_path / f"loomctl-{job_id}" / "server"
    assert not (server_dir / "access.json").exists() and "exited with status" not in log.replace(
        "program 'sh' exited with status 3", "")
    assert not processes_mentioning(str(server_dir))


def test_a_worker_that_cannot_start_ends_the_job_at_once(slurm, tmp_path):
    proc = loomctl("slurm", "submit", NODES_PLAN, "-N", "2", "--host", "127.0.0.1",
                   "--worker-arg=--memory-limit=lots", "-q", cwd=tmp_path, env=slurm.env, check=0)
    job_id = proc.stdout.decode().strip()
    info = slurm.wait_job(job_id, timeout=60)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0", (info, log)
    assert "loomctl: error: a worker failed while the workers started (0 of 2 joined): " in log, log
    assert "--memory-limit 'lots' is not a size" in log, log
    server_dir = tmp_path / f"loomctl-{job_id}" / "server"
    assert not (server_dir / "access.json").exists()
    assert not processes_mentioning(str(server_dir))
