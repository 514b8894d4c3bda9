"""Word count as map-reduce: split a text into lines, count the words of each slice of
lines in parallel (map), add the counts up (reduce), keep the most frequent words.

    loomctl run examples/wordcount/wordcount.py
    loomctl run examples/wordcount/wordcount.py -p chunks=8 -p top=20
    loomctl run examples/wordcount/wordcount.py -p text=/shared/book.txt

Parameters (-p KEY=VALUE):
    text    the text file (default: plan-life.txt next to this script); it must be
            readable by every worker, so on a cluster put it on a shared file system
    chunks  cut the lines into this many slices when building the plan (static
            slicing, loom/base/slice); without it the plan uses a dynamic slice
            (loom/scheduler/dslice): the server cuts the lines when they are known,
            into about four slices per cpu of the cluster
    top     how many words to report (default 10)

The result is one line per word, "COUNT WORD", most frequent first (ties in
alphabetical order), like `tr -cs a-z '\\n' | sort | uniq -c | sort -rn | head`.
"""

import os

from graphfmt import tasks

params = globals().get("params", {})   # set by `loomctl build/run -p KEY=VALUE`
HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.abspath(params.get("text", os.path.join(HERE, "plan-life.txt")))
CHUNKS = int(params.get("chunks", "0"))
TOP = int(params.get("top", "10"))


@tasks.py_task(label="map")
def count_words(piece):
    """Map: the words of some lines -> "WORD COUNT" lines."""
    import collections
    import re
    counts = collections.Counter(re.findall(r"[a-z]+", piece.read().decode().lower()))
    return "".join(f"{word} {n}\n" for word, n in sorted(counts.items()))


@tasks.py_task(label="reduce", n_direct_args=1)
def add_up(top, counted):
    """Reduce: "WORD COUNT" lines of every slice -> the top words."""
    import collections
    total = collections.Counter()
    for line in counted.read().decode().splitlines():
        word, n = line.split()
        total[word] += int(n)
    best = sorted(total.items(), key=lambda item: (-item[1], item[0]))[:top]
    return "".join(f"{n:7d} {word}\n" for word, n in best)


@tasks.py_task(label="gather")
def merge_gathered(gathered):
    """The slices of a dynamic slice come back as an array; return a sub-plan
    (a redirection) that merges its elements into one text for the reduce."""
    return tasks.merge([tasks.get(gathered, i) for i in range(gathered.length())])


lines = tasks.split(tasks.open(TEXT))
if CHUNKS > 0:
    # static slicing: the plan script counts the lines now
    with open(TEXT, "rb") as f:
        n_lines = len(f.read().splitlines(keepends=True))
    bounds = [n_lines * k // CHUNKS for k in range(CHUNKS + 1)]
    counted = tasks.merge([count_words(tasks.slice(lines, a, b))
                           for a, b in zip(bounds, bounds[1:])])
else:
    # dynamic slicing: dslice -> one consumer -> array_make, expanded at run time
    counted = merge_gathered(tasks.array_make([count_words(tasks.dslice(lines))]))

results = [add_up(TOP, counted)]
