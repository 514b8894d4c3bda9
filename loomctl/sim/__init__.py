"""Discrete-event simulation of loomctl clusters on the real server core.

``simulate(graph, cpus, ...)`` runs a plan on simulated workers (``sim.worker``) and
network links (``sim.network``) against the real ``ServerCore`` and scheduler
(``sim.engine``), with task durations and sizes from rules (``sim.model``), and returns
the figures ``loomctl simulate`` prints. ``sim.families`` generates benchmark plans.

Invariants: see each module; the simulator never changes task states itself, the core
does, through its own events.
"""

from __future__ import annotations

from loomctl.sim.engine import Simulation, Stalled
from loomctl.sim.model import TaskModel
from loomctl.sim.spec import SpecError

__all__ = ["simulate", "Simulation", "Stalled", "SpecError", "TaskModel"]


def simulate(graph, cpus: list[int], durations: dict | None = None, sizes: dict | None = None, seed: int = 0,
             bandwidth: float = 1e9, latency: float = 100e-6, observed: dict | None = None,
             server_time="measured", trace_dir: str | None = None, check_every: int = 0, configure=None,
             simulation: list | None = None) -> dict:
    """Simulate ``graph`` on workers with ``cpus`` each; returns the result figures.
    ``configure(core)`` may set the core's scheduler options before the run;
    ``simulation``, a list, receives the Simulation object (for tests)."""
    model = TaskModel(graph, durations or {}, sizes or {}, seed, observed)
    trace = None
    if trace_dir is not None:
        from loomctl.sim.tracefile import SimTrace
        trace = lambda workers, addresses, names: SimTrace(trace_dir, workers, addresses, names)  # noqa: E731
    sim = Simulation(graph, cpus, model, bandwidth, latency, server_time, trace, check_every, configure)
    if simulation is not None:
        simulation.append(sim)
    return sim.run()
