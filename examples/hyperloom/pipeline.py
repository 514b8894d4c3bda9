"""A pipeline written for HyperLoom's Python client, run by loomctl with only its
import changed (HyperLoom: ``from loom.client import Client, TaskFailed, tasks``).

Word frequencies of a text: cut its lines into chunks in a Python task, count the
words of each chunk with shell programs, add the counts up in Python, and sort the
most frequent words with a program that reserves two cpus.

    loomctl server start &
    loomctl worker start --cpus 2 &
    python examples/hyperloom/pipeline.py localhost 9010 [TEXT] [CHUNKS]
    loomctl server stop

The secret of the server comes from its access file ($LOOM_SERVER_DIR or
~/.loomctl/server). TEXT must be readable by every worker (default: the text of the
wordcount example); the words are runs of ASCII letters, lower-cased.
"""

import os
import sys

from loomctl.client import Client, TaskFailed, tasks

HERE = os.path.dirname(os.path.abspath(__file__))
address, port = sys.argv[1], int(sys.argv[2])
text_path = os.path.abspath(sys.argv[3] if len(sys.argv) > 3 else
                            os.path.join(HERE, "..", "wordcount", "plan-life.txt"))
n_chunks = int(sys.argv[4]) if len(sys.argv) > 4 else 4


@tasks.py_task(n_direct_args=1)
def chunk(n, lines):
    # lines is an index (from split): len() and iteration give its pieces
    pieces = [line.read() for line in lines]
    bounds = [len(lines) * k // n for k in range(n + 1)]
    return [b"".join(pieces[a:b]) for a, b in zip(bounds, bounds[1:])]   # an array


@tasks.py_task(context=True)
def add_up(ctx, counted):
    # counted is an array: one "COUNT WORD" text per chunk
    totals = {}
    for part in counted:
        for line in part.read().decode().splitlines():
            n, word = line.split()
            totals[word] = totals.get(word, 0) + int(n)
    ctx.log_info("%d chunks, %d distinct words" % (len(counted), len(totals)))
    return ctx.wrap(totals)                 # a Python object


@tasks.py_task(context=True)
def largest(ctx, parts):
    # wrapping an input passes it through: the result is that chunk's data object
    return ctx.wrap(max(parts, key=lambda part: part.size()))


@tasks.py_task()
def as_lines(totals):
    return "".join("%d %s\n" % (n, word) for word, n in totals.unwrap().items())


client = Client(address, port)

lines = tasks.split(tasks.open(text_path))
chunks = chunk(n_chunks, lines)
count_words = "tr -cs A-Za-z '\\n' | tr A-Z a-z | grep . | sort | uniq -c"
counted = tasks.array_make([tasks.run(["sh", "-c", count_words], stdin=tasks.get(chunks, k))
                            for k in range(n_chunks)])

# futures: the totals stay on the workers and feed the next submission
totals = client.submit_one(add_up(counted))
print("distinct words:", len(totals.fetch()))

top = tasks.run("sort -k1,1nr -k2,2 --parallel=2", stdin=as_lines(totals),
                request=tasks.cpus(2))
head = tasks.run("head -n 5", stdin=top)
biggest = tasks.size(largest(chunks))
top5, biggest_size = client.gather(client.submit([head, biggest]))
print(top5.decode(), end="")
print("largest chunk:", int.from_bytes(biggest_size, "little"), "bytes")
totals.release()

# an error of one task, found when the plan is submitted, is that task's failure
try:
    client.submit_one(tasks.save(tasks.const(top5), "relative-name.txt")).gather()
except TaskFailed as e:
    print("save failed:", e.error_msg)

client.close()
