"""The worker's data store, sans-I/O: data objects in memory or spilled to files, and the
memory rules that decide between them (spill, pause, too big).

The store decides and the process does the file I/O (``worker.spill``): ``balance``
returns SpillWrite and SpillRemove instructions, ``load`` a SpillRead, ``drop`` a
SpillRemove; the process answers with ``written`` and ``loaded`` when the I/O is done.

Memory used = the bytes of the objects in memory (a buffer shared by several objects,
such as an array's item or an index's base, counted once) + the rest of the process
(``unmanaged``: its RSS at the last ``sample`` minus those bytes). With a limit:
- above ``spill_at`` x limit, objects are written to files least recently used first,
  and leave memory once their file is written (``balance``): first those that free
  memory alone, then those sharing their buffers (a frame's pieces), for their share;
- above ``pause_at`` x limit the worker starts no new task (``paused``);
- a result larger than the limit is refused (``too_big``).

Invariants (``check``):
- Every held id has a size and a length; it is in memory (``memory``), in a file
  (``files``), or both; ``data_bytes`` sums the sizes of the held ids.
- ``memory_bytes`` is the sum over the distinct buffers of the objects in memory;
  ``lru`` has exactly the ids in memory, least recently used first.
- An id leaves memory only once its file is written; a pinned id (an input of a task
  that runs or is about to) never does. An id has at most one write or read under way.
- A dropped id leaves no file behind: its file is removed at once, or when the write
  or read under way ends (``doomed``; an id held again meanwhile keeps its new object).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

from loomctl.textfmt import human_bytes as human
from loomctl.worker import data

DEFAULT_SPILL_AT = 0.6   # (Dask: 0.6 of managed memory "target", 0.7 of the process "spill")
DEFAULT_PAUSE_AT = 0.8   # (Dask: 0.8 "pause")
NEAR = 0.95              # "near its limit" (for the scheduler): at this share of the spill threshold


# ---------------------------------------------------------------------- instructions
@dataclass(slots=True)
class SpillWrite:
    """Write ``obj`` (its wire encoding) to the file of ``id``; answer ``written``."""
    id: int
    obj: data.DataObject


@dataclass(slots=True)
class SpillRead:
    """Read the object of ``id`` back from its file; answer ``loaded``."""
    id: int


@dataclass(slots=True)
class SpillRemove:
    id: int


@dataclass(slots=True)
class SpillRef:
    """What a peer's FETCH gets for an object only in a file: the process streams it."""
    id: int
    nbytes: int


def buffers(obj: data.DataObject) -> dict:
    """The distinct buffers an object keeps in memory: {key: bytes} (a file object keeps
    only its path). A view counts as the whole buffer it views (the frame of a large
    const, which the pieces of its split view too)."""
    if type(obj) is data.Plain and type(obj.content) is bytes:   # (most objects)
        return {id(obj.content): len(obj.content)}
    out: dict = {}
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, data.Plain):
            content = o.content
            if type(content) is memoryview:
                out[id(content.obj)] = memoryview(content.obj).nbytes
            else:
                out[id(content)] = len(content)
        elif isinstance(o, data.Array):
            stack.extend(o.items)
        elif isinstance(o, data.Index):
            out[id(o.cuts)] = o.cuts.nbytes
            stack.append(o.base)
        elif isinstance(o, data.PyObj):
            out[id(o.obj)] = sys.getsizeof(o.obj)
    return out


class DataStore:
    def __init__(self, limit: int | None = None, spill_at: float = DEFAULT_SPILL_AT,
                 pause_at: float = DEFAULT_PAUSE_AT):
        self.limit = int(limit) if limit else None
        self.spill_at = spill_at
        self.pause_at = pause_at
        self.memory: dict[int, data.DataObject] = {}
        self.sizes: dict[int, int] = {}
        self.lengths: dict[int, int] = {}
        self.files: dict[int, int] = {}          # id -> bytes of its written file
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.writing: set[int] = set()
        self.reading: set[int] = set()
        self.doomed: set[int] = set()            # dropped while written or read
        self.unwritable: set[int] = set()        # a write failed: kept in memory
        self.pins: dict[int, int] = {}
        self._buffers: dict[int, dict] = {}      # id in memory -> its buffers
        self._refs: dict[int, list] = {}         # buffer key -> [objects in memory using it, bytes]
        self.memory_bytes = 0
        self.file_bytes = 0
        self.data_bytes = 0
        self.unmanaged = 0
        self.spilled_total = [0, 0]              # objects, bytes written so far
        self.loaded_total = [0, 0]               # objects, bytes read back so far

    # ------------------------------------------------------------------ queries
    def __contains__(self, i) -> bool:
        return i in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return iter(self.sizes)

    def __getitem__(self, i) -> data.DataObject:
        return self.memory[i]

    def get(self, i, default=None):
        return self.memory.get(i, default)

    def on_disk_only(self, i) -> bool:
        return i in self.sizes and i not in self.memory

    def some_on_disk_only(self) -> bool:
        return len(self.memory) != len(self.sizes)

    def used(self) -> int:
        return self.memory_bytes + self.unmanaged

    def paused(self) -> bool:
        return self.limit is not None and self.used() > self.pause_at * self.limit

    def too_big(self, task_id: int, size: int) -> str | None:
        if self.limit is None or size <= self.limit:
            return None
        return (f"the result of task {task_id} ({human(size)}) is larger than this worker's memory limit "
                f"({human(self.limit)}, --memory-limit): it was dropped")

    def stats(self) -> dict:
        only_files = [i for i in self.files if i not in self.memory]
        near = self.limit is not None and self.used() >= NEAR * self.spill_at * self.limit
        return {"memory_used": self.used(), "memory_limit": self.limit, "memory_data": self.memory_bytes,
                "paused": self.paused(), "memory_near": near, "spilled_objects": len(only_files),
                "spilled_bytes": sum(self.sizes[i] for i in only_files), "spill_file_bytes": self.file_bytes,
                "spilled_total": list(self.spilled_total), "loaded_total": list(self.loaded_total)}

    # ------------------------------------------------------------------ changes
    def put(self, i: int, obj: data.DataObject, size: int, length: int = 0) -> list:
        """Hold ``obj`` in memory, most recently used; returns I/O instructions (a file
        of an older object of that id is removed)."""
        out = self.drop(i) if i in self.sizes else []
        self.sizes[i] = size
        self.lengths[i] = length
        self.data_bytes += size
        self._to_memory(i, obj)
        return out

    def touch(self, i) -> None:
        if i in self.lru:
            self.lru.move_to_end(i)

    def pin(self, ids) -> None:
        for i in ids:
            self.pins[i] = self.pins.get(i, 0) + 1

    def unpin(self, ids) -> None:
        for i in ids:
            n = self.pins.get(i, 0) - 1
            if n > 0:
                self.pins[i] = n
            else:
                self.pins.pop(i, None)

    def drop(self, i) -> list:
        """Forget ``i``; returns the instructions that remove its file."""
        size = self.sizes.pop(i, None)
        if size is None:
            return []
        self.data_bytes -= size
        del self.lengths[i]
        if i in self.memory:
            self._from_memory(i)
        if not (self.files or self.writing or self.reading or self.unwritable):   # (nothing spilled)
            return []
        self.unwritable.discard(i)
        has_file = i in self.files
        if has_file:
            self.file_bytes -= self.files.pop(i)
        if i in self.writing or i in self.reading:   # (removed when that ends)
            self.doomed.add(i)
            return []
        return [SpillRemove(i)] if has_file else []

    def clear(self) -> None:
        for i in list(self.sizes):
            self.drop(i)

    def sample(self, rss: int) -> None:
        """The process's RSS now: what is not data in memory is the unmanaged rest."""
        self.unmanaged = max(0, int(rss) - self.memory_bytes)

    def balance(self) -> list:
        """Objects leave memory, least recently used first, while use is above the spill
        threshold: those with a file at once, the others once written. First those that
        free memory alone; then those whose buffers others share too (the pieces of a
        frame: the frame leaves with the last), each counted for its share."""
        if self.limit is None:
            return []
        over = self.used() - self.spill_at * self.limit
        over -= sum(self._exclusive(i) or self._share(i) for i in self.writing if i in self.memory)
        if over <= 0:
            return []
        out = []
        for shared in (False, True):
            for i in list(self.lru):
                if over <= 0:
                    return out
                if i in self.pins or i in self.writing or i in self.unwritable:
                    continue
                free = self._exclusive(i)
                if (free == 0) != shared:
                    continue
                free = free or self._share(i)
                if free == 0:   # (a file object: nothing in memory to free)
                    continue
                if i in self.files:
                    self._from_memory(i)
                else:
                    self.writing.add(i)
                    out.append(SpillWrite(i, self.memory[i]))
                over -= free
        return out

    def written(self, i: int, nbytes: int, error: str | None = None) -> list:
        """The write of ``i`` ended (``error``: it failed, the file is gone)."""
        if i not in self.writing:   # (no write of it is under way)
            return []
        self.writing.discard(i)
        if i in self.doomed:
            self.doomed.discard(i)
            return [] if error else [SpillRemove(i)]
        if error is not None:
            self.unwritable.add(i)
            return []
        self.files[i] = nbytes
        self.file_bytes += nbytes
        self.spilled_total[0] += 1
        self.spilled_total[1] += nbytes
        return []

    def load(self, i: int) -> list:
        """``i`` is needed in memory: the read that brings it back (if one is needed)."""
        if i not in self.sizes or i in self.memory or i in self.reading:
            return []
        self.reading.add(i)
        return [SpillRead(i)]

    def loaded(self, i: int, obj: data.DataObject | None, error: str | None = None) -> list:
        """The read of ``i`` ended: it is in memory again (its file stays, so that it can
        leave memory again without a write), or ``error`` says why not (it is lost)."""
        if i not in self.reading:   # (no read of it is under way)
            return []
        self.reading.discard(i)
        if i in self.doomed:
            self.doomed.discard(i)
            return [SpillRemove(i)]
        if i not in self.sizes:
            return []
        if error is not None or obj is None:
            return self.drop(i)
        self.loaded_total[0] += 1
        self.loaded_total[1] += self.files.get(i, 0)
        self._to_memory(i, obj)
        return []

    # ------------------------------------------------------------------ helpers
    def _to_memory(self, i: int, obj: data.DataObject) -> None:
        self.memory[i] = obj
        self.lru[i] = None
        own = buffers(obj)
        self._buffers[i] = own
        for key, nbytes in own.items():
            ref = self._refs.get(key)
            if ref is None:
                self._refs[key] = [1, nbytes]
                self.memory_bytes += nbytes
            else:
                ref[0] += 1

    def _from_memory(self, i: int) -> None:
        del self.memory[i]
        del self.lru[i]
        for key in self._buffers.pop(i):
            ref = self._refs[key]
            ref[0] -= 1
            if ref[0] == 0:
                del self._refs[key]
                self.memory_bytes -= ref[1]

    def _exclusive(self, i: int) -> int:
        """Bytes that ``i`` leaving memory would free."""
        return sum(n for key, n in self._buffers[i].items() if self._refs[key][0] == 1)

    def _share(self, i: int) -> float:
        """``i``'s share of the bytes of its buffers (each split between its holders)."""
        return sum(n / self._refs[key][0] for key, n in self._buffers[i].items())

    def check(self) -> None:
        """The module's invariants (for tests)."""
        assert set(self.sizes) == set(self.lengths), "sizes and lengths"
        assert set(self.memory) | set(self.files) == set(self.sizes), "held in memory, in a file, or both"
        assert self.data_bytes == sum(self.sizes.values()), "data_bytes"
        assert set(self.lru) == set(self.memory), "lru"
        distinct: dict = {}
        for i in self.memory:
            distinct.update(buffers(self.memory[i]))
        assert self.memory_bytes == sum(distinct.values()), "memory_bytes counts each buffer once"
        assert self.file_bytes == sum(self.files.values()), "file_bytes"
        assert not (self.writing & self.reading), "one write or read at a time"
        assert self.doomed <= self.writing | self.reading, "doomed only while written or read"
        assert self.writing - self.doomed <= set(self.memory), "what is written is in memory"
