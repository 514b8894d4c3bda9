"""The simulated network: one full-duplex link per worker, flows sharing links max-min fairly.

A flow moves ``nbytes`` from worker ``src`` to worker ``dst``. It uses ``src``'s uplink
and ``dst``'s downlink, each of capacity ``bandwidth`` bytes/s. Rates are max-min fair
(progressive filling: the most contended link sets the rate of its flows, its capacity
is spent, the rest is shared again), recomputed whenever a flow starts or ends.
Latency is not the network's business: the engine adds it around each flow.

Invariants (``check``):
- Every active flow has remaining bytes > 0 and a rate > 0; the rates of the flows on
  one link add up to at most its capacity (up to rounding).
- ``advance(t)`` never moves time backwards; the bytes a flow has moved never exceed
  its size, and a flow is reported done exactly once, at the time its last byte moved.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-9


class Network:
    def __init__(self, n_workers: int, bandwidth: float):
        self.n = n_workers
        self.bandwidth = bandwidth
        self.now = 0.0
        self.src = np.zeros(0, np.int64)
        self.dst = np.zeros(0, np.int64)
        self.left = np.zeros(0, np.float64)
        self.rate = np.zeros(0, np.float64)
        self.tokens: list = []        # the caller's handle of each active flow
        self.dirty = False            # flows changed since the rates were computed
        self.moved = 0                # bytes of finished flows

    def __len__(self) -> int:
        return len(self.tokens)

    def start(self, now: float, src: int, dst: int, nbytes: float, token) -> None:
        """A flow begins at ``now`` (call ``advance(now)`` first)."""
        self.src = np.append(self.src, src)
        self.dst = np.append(self.dst, dst)
        self.left = np.append(self.left, float(max(nbytes, 1.0)))
        self.rate = np.append(self.rate, 0.0)
        self.tokens.append(token)
        self.dirty = True

    def advance(self, now: float) -> list:
        """Move the flows on to ``now``; returns the tokens of the flows that ended."""
        if now < self.now - EPS:
            raise ValueError(f"network time goes back from {self.now} to {now}")
        dt = max(0.0, now - self.now)
        self.now = max(self.now, now)
        if not len(self.tokens) or dt == 0.0 and not (self.left <= 0).any():
            return []
        self.left -= self.rate * dt
        done = self.left <= np.maximum(EPS * self.rate, 1e-6)
        if not done.any():
            return []
        ended = [t for t, d in zip(self.tokens, done.tolist()) if d]
        keep = ~done
        self.src, self.dst, self.left, self.rate = self.src[keep], self.dst[keep], self.left[keep], self.rate[keep]
        self.tokens = [t for t, d in zip(self.tokens, done.tolist()) if not d]
        self.dirty = True
        return ended

    def next_end(self) -> float:
        """When the next flow ends at the current rates (recomputed if needed); inf if none."""
        if self.dirty:
            self._rates()
        if not len(self.tokens):
            return math.inf
        return self.now + float(np.min(self.left / self.rate))

    def _rates(self) -> None:
        self.dirty = False
        f = len(self.tokens)
        if not f:
            return
        if math.isinf(self.bandwidth):
            self.rate = np.full(f, 1e30)
            return
        n = self.n
        links = np.concatenate([self.src, n + self.dst])        # flow k uses links[k] and links[f + k]
        capacity = np.full(2 * n, self.bandwidth)
        rate = np.zeros(f)
        open_ = np.ones(f, dtype=bool)
        while open_.any():
            using = np.bincount(links[np.concatenate([open_, open_])], minlength=2 * n)
            with np.errstate(divide="ignore", invalid="ignore"):
                share = np.where(using > 0, capacity / np.maximum(using, 1), np.inf)
            level = share.min()
            tight = share <= level * (1 + 1e-9)
            fixed = open_ & (tight[self.src] | tight[n + self.dst])
            rate[fixed] = level
            spent = np.bincount(links[np.concatenate([fixed, fixed])], minlength=2 * n) * level
            capacity = np.maximum(0.0, capacity - spent)
            open_ &= ~fixed
        self.rate = np.maximum(rate, 1e-3)

    def check(self) -> None:
        if self.dirty:
            self._rates()
        assert (self.left > 0).all() and (self.rate > 0).all(), "active flows move bytes"
        if len(self.tokens) and not math.isinf(self.bandwidth):
            up = np.bincount(self.src, weights=self.rate, minlength=self.n)
            down = np.bincount(self.dst, weights=self.rate, minlength=self.n)
            assert up.max() <= self.bandwidth * (1 + 1e-6) and down.max() <= self.bandwidth * (1 + 1e-6), \
                "a link carries more than its bandwidth"
