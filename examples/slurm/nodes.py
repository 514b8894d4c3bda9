"""Which nodes run the tasks: a first plan for a new allocation.

    loomctl slurm submit examples/slurm/nodes.py -N 4
    sbatch -N 4 examples/slurm/loomctl.sbatch examples/slurm/nodes.py
    loomctl run examples/slurm/nodes.py            # on this machine: every line names it

Parameters (-p KEY=VALUE):
    tasks    how many tasks (default 16)
    seconds  how long each task works (default 0.5 s), so that every node gets some

The result is one line per task, "task K ran on NODE WORKER-HOST", in task order: NODE
is the Slurm node name ($SLURMD_NODENAME, which srun sets for every worker) or the
host name outside Slurm. Each task asks for one cpu, so with W workers of C cpus
about W*C of them run at a time.
"""

from graphfmt import tasks

params = globals().get("params", {})   # set by `loomctl build/run/slurm submit -p KEY=VALUE`
TASKS = int(params.get("tasks", "16"))
SECONDS = float(params.get("seconds", "0.5"))


@tasks.py_task(label="where", n_direct_args=2)
def where(k, seconds):
    import os
    import socket
    import time
    time.sleep(seconds)
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    return f"task {k} ran on {node} {socket.gethostname()}\n"


results = [tasks.merge([where(k, SECONDS) for k in range(TASKS)])]
