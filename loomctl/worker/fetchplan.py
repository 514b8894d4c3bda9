"""What to fetch from whom (sans-I/O: no sockets, no clock; time is a parameter).

Ids wanted from an address accumulate until ``take`` turns them into one FETCH per peer
(one request per peer per call, many ids).

Invariants:
- An id is requested at most once while a request for it is outstanding; every wanted
  id ends in exactly one of: answered (found or missing), or given up (peer refused,
  handshake or reply timed out) — ``take``/``answered``/``give_up``/``expired`` report it.
"""

from __future__ import annotations


class FetchPlan:
    def __init__(self):
        self.pending: dict[str, list[int]] = {}                 # address -> ids not yet asked
        self.inflight: dict[int, tuple[str, list[int], float]] = {}   # req -> (address, ids, sent at)
        self._next_req = 1

    def want(self, task_id: int, address: str) -> None:
        self.pending.setdefault(address, []).append(int(task_id))

    def take(self, now: float, can_send=lambda address: True) -> list:
        """One request per address whose link is ready: [(address, req, ids)]."""
        out = []
        for address in [a for a in self.pending if can_send(a)]:
            ids = self.pending.pop(address)
            req = self._next_req
            self._next_req += 1
            self.inflight[req] = (address, ids, now)
            out.append((address, req, ids))
        return out

    def answered(self, req: int, address: str | None = None):
        """The request ``req`` got its answer: returns (address, ids asked) or None for
        an unknown request (or one that ``address`` was not asked)."""
        entry = self.inflight.get(req)
        if entry is None or (address is not None and entry[0] != address):
            return None
        del self.inflight[req]
        return entry[0], entry[1]

    def give_up(self, address: str) -> list[int]:
        """Every id pending or in flight at ``address`` (the peer is unreachable)."""
        ids = self.pending.pop(address, [])
        for req in [r for r, (a, _, _) in self.inflight.items() if a == address]:
            ids.extend(self.inflight.pop(req)[1])
        return ids

    def expired(self, now: float, timeout: float) -> list:
        """Requests without an answer after ``timeout`` seconds: [(address, ids)]."""
        out = []
        for req in [r for r, (_, _, t) in self.inflight.items() if now - t > timeout]:
            address, ids, _ = self.inflight.pop(req)
            out.append((address, ids))
        return out

    def addresses(self) -> set:
        return set(self.pending) | {a for a, _, _ in self.inflight.values()}
