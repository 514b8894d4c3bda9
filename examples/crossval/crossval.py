"""k-fold cross-validation of a support vector machine, the pipeline of the HyperLoom
paper, with the programs of libsvm (Debian/Ubuntu: apt-get install libsvm-tools).

    loomctl run examples/crossval/crossval.py
    loomctl run -n 4 examples/crossval/crossval.py -p folds=10 -p C=0.1,1,10,100

The data set is Fisher's iris data (150 flowers, 4 measurements, 3 species) in
libsvm's text format, shipped next to this script as iris.libsvm. The plan:

    open(iris.libsvm) -> shuf (seeded) -> split into lines -> k slices (folds)
    for every cost C and fold i:
        svm-train -c C  on the other k-1 folds merged   -> model
        svm-predict     on fold i with that model        -> "Accuracy = ..."
    for every C: add up the correct predictions of its k folds

The result is one line per C with the cross-validated accuracy, and the best C.

Parameters (-p KEY=VALUE):
    folds   number of folds k (default 5)
    C       comma-separated costs to try (default 1,10,100)
    seed    text that seeds the shuffle, so runs are repeatable (default loomctl)
    data    a data file in libsvm format (default: iris.libsvm next to this script;
            on a cluster it must be on a file system every worker can read)
"""

import hashlib
import os

from graphfmt import tasks

params = globals().get("params", {})   # set by `loomctl build/run -p KEY=VALUE`
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.abspath(params.get("data", os.path.join(HERE, "iris.libsvm")))
FOLDS = int(params.get("folds", "5"))
COSTS = [c.strip() for c in params.get("C", "1,10,100").split(",") if c.strip()]
SEED = params.get("seed", "loomctl").encode()
if FOLDS < 2 or not COSTS:
    raise ValueError("cross-validation needs folds >= 2 and at least one C")


@tasks.py_task(label="accuracy", n_direct_args=1)
def accuracy(cost, reports):
    """Add up the "Accuracy = 96.6667% (29/30) (classification)" lines of all folds."""
    import re
    correct = total = 0
    for a, b in re.findall(rb"\((\d+)/(\d+)\)", reports.read()):
        correct, total = correct + int(a), total + int(b)
    return f"C={cost:<8} {100 * correct / total:6.2f}% ({correct}/{total})\n"


@tasks.py_task(label="best")
def best(table):
    lines = table.read().decode().splitlines()
    top = max(lines, key=lambda line: float(line.split()[1].rstrip("%")))
    return table.read().decode() + f"best: {top.split()[0]}\n"


# shuf reads its randomness from a file: give it a fixed one, so folds are repeatable
random_bytes = b"".join(hashlib.sha256(SEED + b"%d" % i).digest() for i in range(64))
shuffled = tasks.run("shuf --random-source=seed data",
                     [(tasks.const(random_bytes), "seed"), (tasks.open(DATA), "data")])
shuffled.label = "shuffle"
lines = tasks.split(shuffled)

with open(DATA, "rb") as f:     # the plan is built here, so count the rows now
    n_rows = sum(1 for line in f if line.strip())
bounds = [n_rows * k // FOLDS for k in range(FOLDS + 1)]
folds = [tasks.slice(lines, a, b) for a, b in zip(bounds, bounds[1:])]

per_cost = []
for cost in COSTS:
    reports = []
    for i, test in enumerate(folds):
        train = tasks.merge(folds[:i] + folds[i + 1:])
        model = tasks.run(["svm-train", "-q", "-c", cost, "train", "model"],
                          [(train, "train")], ["model"])
        model.label = f"svm-train:C={cost} fold={i}"
        predict = tasks.run("svm-predict test model predictions",
                            [(test, "test"), (model, "model")])
        predict.label = f"svm-predict:C={cost} fold={i}"
        reports.append(predict)
    per_cost.append(accuracy(cost, tasks.merge(reports)))

results = [best(tasks.merge(per_cost))]
