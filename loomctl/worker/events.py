"""What the worker's state machine takes and gives (``worker.state``): its events and
its instructions, plain data (a leaf: nothing from the worker below it but the task
spec, outcome and data types they carry).

Invariants: every event and instruction is a slotted dataclass that holds plain values
(ids, addresses, data objects); none has behaviour, so the state machine and the process
agree on them by type alone (``WorkerState.handle`` dispatches on ``type(event)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from loomctl.worker import data
from loomctl.worker.outcome import Outcome
from loomctl.worker.taskqueue import TaskSpec

# ---------------------------------------------------------------------- events
@dataclass(slots=True)
class Compute:
    rows: list                 # COMPUTE task rows as they came
    locations: dict            # input id -> data address


@dataclass(slots=True)
class ReleaseData:
    ids: list


@dataclass(slots=True)
class CancelTasks:
    """The server gave these tasks up (their job ended)."""
    ids: list


@dataclass(slots=True)
class StealTasks:
    """Work stealing: give back up to ``count`` of ``ids`` that have not started."""
    ids: list
    count: int


@dataclass(slots=True)
class PeerGone:
    """Fetches from ``address`` cannot succeed (the server lost that peer, or the link failed)."""
    address: str
    reason: str


@dataclass(slots=True)
class LinkReady:   # the link to a peer completed its handshake
    address: str


@dataclass(slots=True)
class PeersKnown:
    """The server named other workers (PEERS): link to them before a fetch needs it."""
    addresses: list


@dataclass(slots=True)
class Fetched:
    """A peer's DATA answer: ``objects`` has a DataObject or an error message per id of ``found``."""
    address: str
    req: int
    found: list
    missing: list
    objects: list


@dataclass(slots=True)
class TaskDone:
    outcome: Outcome


@dataclass(slots=True)
class Tick:   # time passed: fetches may have expired, held reports may be due
    pass


@dataclass(slots=True)
class Spilled:
    """A SpillWrite ended (``error``: it failed)."""
    id: int
    nbytes: int
    error: str | None = None


@dataclass(slots=True)
class Loaded:
    """A SpillRead ended: the object, or why it could not be read."""
    id: int
    obj: data.DataObject | None
    error: str | None = None


@dataclass(slots=True)
class MemorySample:
    """The worker process's resident memory (bytes) now."""
    rss: int


# ---------------------------------------------------------------------- instructions
@dataclass(slots=True)
class Execute:
    spec: TaskSpec
    inputs: list               # the input DataObjects, in order
    route: str                 # "inline" (in the loop), "program", "pool" (cpus), "light" (light pool)


@dataclass(slots=True)
class SendUpdate:
    body: dict


@dataclass(slots=True)
class Connect:
    address: str


@dataclass(slots=True)
class SendFetch:
    address: str
    req: int
    ids: list


@dataclass(slots=True)
class CloseLink:
    address: str


@dataclass(slots=True)
class Kill:
    """Stop a running task (a program: kill its process group)."""
    task_id: int
