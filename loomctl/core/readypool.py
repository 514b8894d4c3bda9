"""The ready tasks a scheduling round chooses from, best first (sans-I/O, plain numpy).

Tasks that became READY land in ``core.ready`` (``transitions``); a round moves them
into the pool (``add``), keyed by ``priority.keys``, and takes the best light and the
best cpu tasks it has room for (``take``); those it could not place go back to the front
of their buckets (``put_back``). A bucket per (key, light) holds arrays in arrival
order, so a round costs what it takes, not what waits (a million ready tasks cost a
round nothing).

Invariants:
- Entries may be stale (the task left READY since); ``take`` returns only READY tasks,
  each once, in priority order (higher key first, then arrival), and drops the stale
  entries it meets.
- ``all()`` holds every entry; every READY task of the core is in ``core.ready`` or
  here (``core.invariants`` checks it).
"""

from __future__ import annotations

import bisect
from collections import deque

import numpy as np

from loomctl.core.tasktable import READY

EMPTY = np.zeros(0, dtype=np.int64)


class ReadyPool:
    def __init__(self):
        self.buckets: dict[tuple[int, bool], deque] = {}   # (key, light) -> deque of id arrays
        self.order: list[int] = []                         # keys present, ascending (best last)
        self.entries = 0

    def __len__(self) -> int:
        return self.entries

    def add(self, ids: np.ndarray, keys: np.ndarray, light: np.ndarray, front: bool = False) -> None:
        if not len(ids):
            return
        if len(ids) == 1 or ((keys == keys[0]).all() and (light == light[0]).all()):
            self._bucket(int(keys[0]), bool(light[0]), ids, front)
            return
        kind = keys * 2 + light   # (keys < 2^62: see priority.keys)
        order = np.argsort(kind, kind="stable")
        sorted_kind = kind[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_kind[1:] != sorted_kind[:-1])))
        for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(order)]):
            k = int(sorted_kind[lo])
            self._bucket(k >> 1, bool(k & 1), ids[order[lo:hi]], front)

    def _bucket(self, key: int, light: bool, ids: np.ndarray, front: bool) -> None:
        bucket = self.buckets.get((key, light))
        if bucket is None:
            bucket = self.buckets[(key, light)] = deque()
            if not self.buckets.get((key, not light)):
                i = bisect.bisect_left(self.order, key)
                if i == len(self.order) or self.order[i] != key:
                    self.order.insert(i, key)
        if front:
            bucket.appendleft(ids)
        else:
            bucket.append(ids)
        self.entries += len(ids)

    def take(self, state: np.ndarray, n_light: int, n_heavy: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to n_light light and n_heavy cpu tasks, READY, best first: (light, heavy)."""
        out = ([], [])
        want = [n_light, n_heavy]
        for key in reversed(list(self.order)):
            for light in (True, False):
                k = 1 - light
                if want[k] <= 0:
                    continue
                bucket = self.buckets.get((key, light))
                while bucket and want[k] > 0:
                    ids = bucket.popleft()
                    self.entries -= len(ids)
                    ids = ids[state[ids] == READY]
                    if len(ids) > want[k]:
                        bucket.appendleft(ids[want[k]:])
                        self.entries += len(ids) - want[k]
                        ids = ids[:want[k]]
                    if len(ids):
                        out[k].append(ids)
                        want[k] -= len(ids)
                if bucket is not None and not bucket:
                    del self.buckets[(key, light)]
            if not self.buckets.get((key, True)) and not self.buckets.get((key, False)):
                self.order.remove(key)
            if want[0] <= 0 and want[1] <= 0:
                break
        result = []
        for parts in out:
            ids = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else EMPTY
            if len(ids) > 1:   # a task READY again may have two entries: keep its first
                first = np.sort(np.unique(ids, return_index=True)[1])
                ids = ids[first]
            result.append(ids)
        return result[0], result[1]

    def all(self) -> np.ndarray:
        parts = [ids for bucket in self.buckets.values() for ids in bucket]
        return np.concatenate(parts) if parts else EMPTY

    def drain(self) -> np.ndarray:
        """Every entry, and the pool is empty."""
        ids = self.all()
        self.buckets.clear()
        self.order.clear()
        self.entries = 0
        return ids

    def forget(self, dead: np.ndarray) -> None:
        """Drop the entries of the rows where ``dead`` is true (rows given back: a stale
        entry must not stand for the task that takes the row next)."""
        for key in list(self.buckets):
            bucket = self.buckets[key]
            kept = [ids[~dead[ids]] for ids in bucket]
            self.entries -= sum(len(ids) for ids in bucket) - sum(len(ids) for ids in kept)
            bucket.clear()
            bucket.extend(ids for ids in kept if len(ids))
            if not bucket:
                del self.buckets[key]
        self.order = [k for k in self.order if self.buckets.get((k, True)) or self.buckets.get((k, False))]

    def has_light(self) -> bool:
        """Some light-task entry is waiting (maybe stale)."""
        return any(light and bucket for (_, light), bucket in self.buckets.items())

    def has_heavy(self) -> bool:
        """Some cpu-task entry is waiting (maybe stale)."""
        return any(not light and bucket for (_, light), bucket in self.buckets.items())
