"""The Python API, as a HyperLoom user knows it: a Client, tasks, futures.

Start a server and a worker, then run this script:

    loomctl server start &
    loomctl worker start &
    python examples/client_api.py              # finds the server via $LOOM_SERVER_DIR
    python examples/client_api.py HOST PORT    # or at an address (then the secret still
                                               # comes from the access file, if any)
    loomctl server stop

Porting from HyperLoom changes only the imports:
    from loom.client import Client, tasks   ->  from loomctl.client import Client
                                                 from graphfmt import tasks
"""

import sys

from graphfmt import tasks
from loomctl.client import Client, TaskFailed

client = Client(sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else Client()

# 1. HyperLoom's first pipeline
task1 = tasks.const("Hello ")
task2 = tasks.const("world!")
task3 = tasks.merge((task1, task2))
future = client.submit_one(task3)
print(future.gather())                                   # b'Hello world!'

# 2. Programs: inputs go to stdin (None), to files (a name) or into the
#    arguments ("$NAME"); outputs are stdout (None) or files the program writes
numbers = tasks.const("3\n1\n2\n")
sort = tasks.run("sort -n", [(numbers, None)])
head = tasks.run("head -n $N data", [(tasks.const("2"), "$N"), (sort, "data")])
tee = tasks.run(["sh", "-c", "tee copy.txt | wc -l"], [(sort, None)], [None, "copy.txt"])
print(client.gather(client.submit([head, tee])))        # [b'1\n2\n', [b'3\n', b'1\n2\n3\n']]


# 3. Python tasks: functions run on the workers; inputs arrive wrapped
@tasks.py_task()
def shout(text):
    return text.read().decode().upper()


@tasks.py_task(context=True, n_direct_args=1)
def repeat(ctx, times, text):
    ctx.log_info(f"repeating {text.size()} bytes {times} times")
    return ctx.wrap([text.read()] * times)               # a Python object (pyobj)


loud = shout(task3)
loud.label = "shout"                                     # labels name tasks in reports
loud.resource_request = tasks.cpus(1)                    # cpus it reserves (the default)
print(client.submit_one(repeat(2, loud)).gather())       # [b'HELLO WORLD!', b'HELLO WORLD!']

# 4. Futures: results stay on the workers until released, and can feed later tasks
a = client.submit_one(tasks.const("abc"))
b = client.submit_one(tasks.merge((a, tasks.const("!"), a)))
print(b.gather(), a.fetch())                             # b'abc!abc' b'abc'
a.release()
print(client.get_stats()["n_data_objects"])              # 0: nothing left on the workers

# 5. A failing task fails its submission; the cluster goes on
try:
    client.submit_one(tasks.run(["sh", "-c", "echo no such thing >&2; exit 3"])).gather()
except TaskFailed as exc:
    print("task", exc.id, "failed:", exc.error_msg.splitlines()[0])

client.close()
