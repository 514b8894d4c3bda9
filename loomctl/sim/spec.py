"""What a simulation is given, parsed from text: clusters, links, duration and size rules.

Syntax (documented in loomctl-simulate(1)):
  workers     NxC           N workers of C cpus (``8x4``); several specs add up
  bandwidth   NUMBER[UNIT]  bytes per second; K, M, G, T multiply by 10^3 ... 10^12;
                            a ``bit`` suffix (``10Gbit``) divides by 8
  latency     NUMBER[UNIT]  seconds; ``s``, ``ms``, ``us``, ``ns``
  size        NUMBER[UNIT]  bytes; K, M, G, T are 10^3 ...; Ki, Mi, Gi, Ti are 2^10 ...
  duration    SECONDS | uniform:A:B | normal:MEAN:SD | lognormal:MEAN:SD
  rule        GROUP=VALUE   GROUP is a label group (the label up to its first ``:``), a
                            task type (``loom/run/run``), or ``*`` for every other task

Invariants: every parser returns a value or raises SpecError with one line naming the
text at fault; a parsed duration rule never yields a negative or non-finite duration
(``normal`` and ``lognormal`` samples are clipped at 0).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np


class SpecError(ValueError):
    """Text that does not parse; the message is for a person."""


_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{what}: {text!r} must be a finite number >= 0")
    return value


def parse_workers(specs: list[str]) -> list[int]:
    """The cpus of each worker, from specs like ``8x4``."""
    cpus: list[int] = []
    for spec in specs:
        m = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", spec)
        if not m:
            raise SpecError(f"--workers {spec!r}: expected NxC (N workers of C cpus), e.g. 8x4")
        n, c = int(m.group(1)), int(m.group(2))
        if n < 1 or c < 1:
            raise SpecError(f"--workers {spec!r}: need at least 1 worker of at least 1 cpu")
        cpus.extend([c] * n)
    if not cpus:
        raise SpecError("give the cluster with --workers NxC, e.g. --workers 8x4")
    if len(cpus) > 100_000:
        raise SpecError(f"--workers: {len(cpus)} workers is more than this simulator handles (100,000)")
    return cpus


_DECIMAL = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}


def parse_bandwidth(text: str) -> float:
    """Bytes per second (``inf`` for ``inf``: transfers take only their latency)."""
    if text.strip().lower() in ("inf", "infinite", "unlimited"):
        return math.inf
    m = re.fullmatch(_NUMBER + r"\s*([kKmMgGtT]?)(bit|b|B|bytes?)?(/s)?", text.strip())
    if not m:
        raise SpecError(f"--bandwidth {text!r}: expected bytes per second such as 1G, 125M or 10Gbit")
    value = _number(m.group(1), "--bandwidth") * _DECIMAL[m.group(2).lower()]
    if m.group(3) in ("bit", "b"):
        value /= 8
    if value <= 0:
        raise SpecError(f"--bandwidth {text!r} must be more than 0")
    return value


def parse_seconds(text: str, what: str = "--latency") -> float:
    m = re.fullmatch(_NUMBER + r"\s*(s|ms|us|µs|ns)?", text.strip())
    if not m:
        raise SpecError(f"{what} {text!r}: expected a time such as 100us, 1ms or 0.002")
    scale = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}[m.group(2)]
    return _number(m.group(1), what) * scale


def parse_bytes(text: str, what: str = "--size") -> int:
    m = re.fullmatch(_NUMBER + r"\s*([kKmMgGtT]i?)?[bB]?", text.strip())
    if not m:
        raise SpecError(f"{what} {text!r}: expected a size in bytes such as 4096, 10M or 1Gi")
    unit = (m.group(2) or "").lower()
    scale = _BINARY[unit] if unit in _BINARY else _DECIMAL[unit]
    return int(round(_number(m.group(1), what) * scale))


@dataclass(frozen=True)
class Dist:
    """A distribution of task durations (seconds)."""
    kind: str                  # const | uniform | normal | lognormal | empirical
    a: float = 0.0
    b: float = 0.0
    values: tuple = ()         # empirical: observed durations, drawn with replacement

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "const":
            return np.full(n, self.a)
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b, n)
        if self.kind == "normal":
            return np.maximum(0.0, rng.normal(self.a, self.b, n))
        if self.kind == "lognormal":   # a = mean, b = standard deviation of the durations
            if self.a <= 0:
                return np.zeros(n)
            sigma2 = math.log(1 + (self.b / self.a) ** 2)
            return rng.lognormal(math.log(self.a) - sigma2 / 2, math.sqrt(sigma2), n)
        values = np.asarray(self.values, dtype=np.float64)
        return values[rng.integers(0, len(values), n)] if len(values) else np.zeros(n)

    @property
    def mean(self) -> float:
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind in ("normal", "lognormal"):
            return self.a
        return float(np.mean(self.values)) if self.values else 0.0


def parse_duration(text: str, what: str = "--duration") -> Dist:
    parts = text.strip().split(":")
    kind = parts[0].lower()
    if len(parts) == 1:
        return Dist("const", parse_seconds(text, what))
    if kind in ("uniform", "normal", "lognormal") and len(parts) == 3:
        a, b = (parse_seconds(p, what) for p in parts[1:])
        if kind == "uniform" and b < a:
            raise SpecError(f"{what} {text!r}: uniform:A:B needs A <= B")
        return Dist(kind, a, b)
    raise SpecError(f"{what} {text!r}: expected SECONDS, uniform:A:B, normal:MEAN:SD or lognormal:MEAN:SD")


def parse_rules(pairs: list[str], parse, what: str) -> dict:
    """GROUP=VALUE pairs into {GROUP: parsed value} (a later rule for a group wins)."""
    rules = {}
    for pair in pairs:
        group, sep, value = pair.rpartition("=")
        if not sep or not group:
            raise SpecError(f"{what} {pair!r}: expected GROUP=VALUE (a label group, a task type or *)")
        rules[group] = parse(value, what)
    return rules


def label_group(label: str | None) -> str:
    """A label's group: the part before its first ``:``."""
    return label.split(":", 1)[0] if label else ""
