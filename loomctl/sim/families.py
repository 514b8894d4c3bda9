"""Generated plans for simulations and benchmarks, built as columns (a million tasks in a
second): fork-join, merge trees, map-reduce, cross-validation (folds x parameters),
a Montage-like workflow, random layered DAGs, chains beside independent tasks, and a
model of the seed's pipeline.

Every family returns a ``Family``: the graph, duration rules and size rules per label
group (the group names are the task labels). Cpu tasks are ``loom/data/merge`` tasks that
request 1 cpu (they run for real too, quickly); light tasks request nothing.

Invariants: a generated graph validates (``Graph.validate``), its inputs point to
earlier tasks only, and the same arguments (and seed) give the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphfmt import symbols as S
from graphfmt.graph import Graph, VarBytes, offsets_from_lengths
from loomctl.sim.spec import Dist


@dataclass
class Family:
    name: str
    graph: Graph
    durations: dict = field(default_factory=dict)   # label group -> Dist
    sizes: dict = field(default_factory=dict)       # label group -> bytes


class Builder:
    """Appends groups of tasks; inputs are given per task as CSR (counts, flat ids)."""

    def __init__(self):
        self.labels: list[str] = []
        self.parts: list[tuple] = []   # (n, label code, cpus, counts, inputs)
        self.n = 0

    def add(self, label: str, n: int, inputs=None, counts=None, cpus: int = 1) -> np.ndarray:
        """n tasks labelled ``label``; ``inputs`` is (n, k) ids, or flat ids with ``counts``."""
        if label not in self.labels:
            self.labels.append(label)
        if inputs is None:
            flat, counts = np.zeros(0, np.int64), np.zeros(n, np.int64)
        elif counts is None:
            inputs = np.asarray(inputs, np.int64).reshape(n, -1)
            flat, counts = inputs.ravel(), np.full(n, inputs.shape[1], np.int64)
        else:
            flat, counts = np.asarray(inputs, np.int64), np.asarray(counts, np.int64)
        assert len(counts) == n and counts.sum() == len(flat)
        assert not len(flat) or flat.max() < self.n, "inputs point to earlier tasks"
        self.parts.append((n, self.labels.index(label) + 1, cpus, counts, flat))
        ids = np.arange(self.n, self.n + n, dtype=np.int64)
        self.n += n
        return ids

    def graph(self, results: np.ndarray | None = None) -> Graph:
        n = self.n
        counts = np.concatenate([p[3] for p in self.parts])
        requests = [{"cpus": 1}]
        request_codes = np.concatenate([np.full(p[0], 1 if p[2] else 0, np.uint16) for p in self.parts])
        flags = np.zeros(n, np.uint8)
        if results is not None:
            flags[results] = 1
        return Graph([S.MERGE], np.zeros(n, np.uint16), offsets_from_lengths(counts),
                     np.concatenate([p[4] for p in self.parts]), VarBytes.empty(n), flags, request_codes,
                     requests, np.concatenate([np.full(p[0], p[1], np.uint32) for p in self.parts]),
                     list(self.labels))


def fork_join(n: int = 15360, seconds: float = 1.0, size: int = 0) -> Family:
    b = Builder()
    root = b.add("root", 1, cpus=0)
    work = b.add("work", n, np.repeat(root, n))
    b.add("join", 1, work, [n], cpus=0)
    return Family(f"fork-join {n}", b.graph(), {"work": Dist("const", seconds)}, {"work": size})


def merge_tree(leaves: int = 4096, arity: int = 2, seconds: float = 1.0, size: int = 1 << 20) -> Family:
    b = Builder()
    level = b.add("leaf", leaves)
    while len(level) > 1:
        groups = np.array_split(level, max(1, -(-len(level) // arity)))
        level = b.add("merge", len(groups), np.concatenate(groups), [len(g) for g in groups])
    return Family(f"merge tree {leaves}/{arity}", b.graph(),
                  {"leaf": Dist("uniform", 0.5 * seconds, 1.5 * seconds), "merge": Dist("const", seconds)},
                  {"leaf": size, "merge": size})


def map_reduce(maps: int = 256, reduces: int = 64, seconds: float = 2.0, size: int = 16 << 20) -> Family:
    """Each map's output is cut into ``reduces`` partitions (light tasks); reduce r takes
    partition r of every map."""
    b = Builder()
    m = b.add("map", maps)
    parts = b.add("part", maps * reduces, np.repeat(m, reduces), cpus=0).reshape(maps, reduces)
    r = b.add("reduce", reduces, parts.T.ravel(), np.full(reduces, maps))
    b.add("collect", 1, r, [reduces], cpus=0)
    return Family(f"map-reduce {maps}x{reduces}", b.graph(),
                  {"map": Dist("normal", seconds, seconds / 4), "reduce": Dist("normal", seconds, seconds / 4)},
                  {"map": size, "part": size // reduces, "reduce": 1 << 10})


def crossv(folds: int = 5, params: int = 64, seconds: float = 10.0, size: int = 64 << 20) -> Family:
    """HyperLoom's cross-validation: data, one split per fold, a training per (fold,
    parameter), a score per parameter over its folds, one choice."""
    b = Builder()
    data = b.add("data", 1)
    splits = b.add("split", folds, np.repeat(data, folds))
    train = b.add("train", folds * params, np.repeat(splits, params))
    score = b.add("score", params, train.reshape(folds, params).T.ravel(), np.full(params, folds))
    b.add("choose", 1, score, [params], cpus=0)
    return Family(f"crossv {folds}x{params}", b.graph(),
                  {"data": Dist("const", 2.0), "split": Dist("const", 1.0),
                   "train": Dist("lognormal", seconds, seconds / 2), "score": Dist("const", 0.2)},
                  {"data": size, "split": size, "train": 1 << 16, "score": 1 << 10})


def montage(images: int = 1024, seconds: float = 1.0, size: int = 4 << 20, seed: int = 0) -> Family:
    """Montage's shape: project each image, fit the differences of overlapping pairs,
    one background model, correct each image, one table and one co-add (a mosaic)."""
    rng = np.random.default_rng(seed)
    b = Builder()
    project = b.add("mProject", images)
    pairs = np.stack([np.arange(images), (np.arange(images) + 1 + rng.integers(0, 8, images)) % images], 1)
    diff = b.add("mDiffFit", len(pairs), project[pairs])
    concat = b.add("mConcatFit", 1, diff, [len(diff)])
    model = b.add("mBgModel", 1, concat)
    background = b.add("mBackground", images, np.stack([project, np.repeat(model, images)], 1))
    table = b.add("mImgtbl", 1, background, [images], cpus=0)
    b.add("mAdd", 1, np.concatenate([background, table]), [images + 1])
    return Family(f"montage {images}", b.graph(),
                  {"mProject": Dist("uniform", 0.5 * seconds, 1.5 * seconds), "mDiffFit": Dist("const", 0.3 * seconds),
                   "mConcatFit": Dist("const", 2 * seconds), "mBgModel": Dist("const", 5 * seconds),
                   "mBackground": Dist("uniform", 0.5 * seconds, 1.5 * seconds), "mAdd": Dist("const", 10 * seconds)},
                  {"mProject": size, "mDiffFit": 1 << 10, "mConcatFit": 1 << 14, "mBgModel": 1 << 14,
                   "mBackground": size, "mImgtbl": 1 << 14, "mAdd": size})


def layered(layers: int = 16, width: int = 256, fan_in: int = 3, seconds: float = 1.0, size: int = 1 << 20,
            seed: int = 0) -> Family:
    """A random layered DAG: each task takes ``fan_in`` random tasks of the layer before."""
    rng = np.random.default_rng(seed)
    b = Builder()
    level = b.add("layer", width)
    for _ in range(layers - 1):
        picks = level[rng.integers(0, len(level), (width, fan_in))]
        level = b.add("layer", width, picks)
    return Family(f"layered {layers}x{width}", b.graph(),
                  {"layer": Dist("lognormal", seconds, seconds)}, {"layer": size})


def chains(chains: int = 16, length: int = 100, filler: int = 1500, seconds: float = 1.0) -> Family:
    """Long chains of dependent tasks next to a bag of independent ones (submitted
    first): the chains are the critical path, so which ready task starts first matters."""
    b = Builder()
    b.add("filler", filler)
    level = b.add("chain", chains)
    for _ in range(length - 1):
        level = b.add("chain", chains, level)
    return Family(f"chains {chains}x{length} + {filler}", b.graph(),
                  {"filler": Dist("const", seconds), "chain": Dist("const", seconds)}, {"chain": 1 << 10})


# ---------------------------------------------------------------------- the seed's pipeline
PIPELINE_TASKS_PER_TARGET = 498


def pipeline(targets: int = 924, folds: int = 5, params: int = 45, seconds: float = 20.0) -> Family:
    """A model of HyperLoom's pharmaceutical machine-learning pipeline (see bench/README.md
    for the assumptions): per target, load its data, cut it into folds, train and
    predict for every (fold, hyper-parameter), score each parameter over its folds and
    choose one; 2 + 2 x folds x params + params + 1 = 498 tasks per target."""
    b = Builder()
    t = targets
    load = b.add("load", t)
    split = b.add("split", t, load, cpus=0)
    per = folds * params
    train = b.add("train", t * per, np.repeat(split, per))
    predict = b.add("predict", t * per, train)
    scores = predict.reshape(t, folds, params).transpose(0, 2, 1).reshape(t * params, folds)
    score = b.add("score", t * params, scores)
    b.add("choose", t, score.reshape(t, params))
    return Family(f"pipeline {t} targets", b.graph(),
                  {"load": Dist("const", 5.0), "train": Dist("lognormal", seconds, seconds),
                   "predict": Dist("lognormal", 2.0, 1.0), "score": Dist("const", 0.05),
                   "choose": Dist("const", 0.05)},
                  {"load": 20 << 20, "split": 20 << 20, "train": 2 << 20, "predict": 256 << 10,
                   "score": 1 << 10, "choose": 1 << 10})


FAMILIES = {"fork-join": fork_join, "merge-tree": merge_tree, "map-reduce": map_reduce, "crossv": crossv,
            "montage": montage, "layered": layered, "chains": chains, "pipeline": pipeline}
