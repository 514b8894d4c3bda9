"""The simulator (loomctl.sim, ``loomctl simulate``) on small cases: deterministic for a
seed, every task runs once on the real core whose invariants hold throughout, makespan
never below the lower bound, the network and server models, the CLI's output and errors."""

import json
import math

import numpy as np
import pytest

import graphfmt
from graphfmt import tasks
from loomctl.sim import Simulation, families, simulate, spec
from loomctl.sim.network import Network

from clihelp import loomctl, one_line_error

SMALL = {
    "fork-join": lambda: families.fork_join(2000, 1.0),
    "merge-tree": lambda: families.merge_tree(512, 2, 1.0, 1 << 20),
    "map-reduce": lambda: families.map_reduce(48, 16, 2.0, 4 << 20),
    "crossv": lambda: families.crossv(5, 40, 5.0, 8 << 20),
    "montage": lambda: families.montage(256, 1.0, 1 << 20),
    "layered": lambda: families.layered(8, 128, 3, 1.0, 1 << 20),
    "pipeline": lambda: families.pipeline(3),
}
VARIANTS = {"default": {}, "steal": {"steal": True}, "fifo, wait": {"blevel": False, "spill": False}}


def configure(options):
    def apply(core):
        for k, v in options.items():
            setattr(core.options, k, v)
    return apply


def run(family, cpus=(4,) * 8, seed=0, options=None, check_every=0, **kw):
    sims = []
    result = simulate(family.graph, list(cpus), family.durations, family.sizes, seed=seed, server_time=20e-6,
                      check_every=check_every, configure=configure(options or {}), simulation=sims, **kw)
    return result, sims[0]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_task_runs_once_and_the_core_stays_consistent(name, variant):
    family = SMALL[name]()
    result, sim = run(family, options=VARIANTS[variant], check_every=29)
    assert result["status"] == "finished"
    assert (sim.runs == 1).all(), f"tasks run {np.unique(sim.runs)} times"
    assert result["tasks"] == len(family.graph)
    assert result["makespan_s"] >= result["lower_bound_s"] * (1 - 1e-9)
    assert 0 < result["efficiency"] <= 1 + 1e-9
    assert all(w.check() is None for w in sim.workers)
    assert not sim.network.tokens, "no transfer is left in flight"


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_generated_plans_validate_and_point_to_earlier_tasks(name):
    family = families.FAMILIES[name]() if name not in SMALL else SMALL[name]()
    family.graph.validate()
    owners = np.repeat(np.arange(len(family.graph)), np.diff(family.graph.input_offsets))
    assert (family.graph.inputs < owners).all()
    assert set(family.durations) <= set(family.graph.labels)


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    family = SMALL["layered"]()
    first, _ = run(family, seed=3)
    again, _ = run(family, seed=3)
    other, _ = run(family, seed=4)
    keep = ("makespan_s", "lower_bound_s", "transferred_bytes", "transfers", "server_busy_s", "rounds", "reports")
    assert {k: first[k] for k in keep} == {k: again[k] for k in keep}
    assert other["makespan_s"] != first["makespan_s"]


def test_stealing_moves_queued_tasks_to_idle_workers():
    # one long task per worker at first, then many short ones: queues build up unevenly
    family = families.crossv(4, 60, 5.0, 1 << 10)
    result, sim = run(family, cpus=(2,) * 6, options={"steal": True}, check_every=5)
    assert result["steal_requests"] > 0 and result["stolen"] > 0
    assert (sim.runs == 1).all()


def test_dynamic_slices_expand_and_their_pieces_run():
    x = tasks.array_make([tasks.const(b"%d" % i) for i in range(10)])
    f = tasks.merge([tasks.dslice(x)])
    f.resource_request = tasks.cpus(1)
    graph = graphfmt.build_graph([tasks.array_make([f])])[0]
    sims = []
    result = simulate(graph, [2, 2], {"*": spec.Dist("const", 1.0)}, server_time=0, check_every=1,
                      simulation=sims)
    assert result["status"] == "finished" and sims[0].extra_runs > 0
    assert result["tasks"] > len(graph)


def test_durations_and_server_time_follow_the_rules():
    family = families.fork_join(64, 2.0)
    fast, _ = run(family, cpus=(4,) * 4, latency=0.0)
    assert fast["lower_bound_s"] == pytest.approx(64 * 2.0 / 16)
    assert fast["work_s"] == pytest.approx(128.0)
    sims = []
    slow = simulate(family.graph, [4] * 4, family.durations, family.sizes, server_time=0.01, latency=0.0,
                    simulation=sims)
    assert slow["server_busy_s"] == pytest.approx(0.01 * (2 * len(family.graph)), rel=0.05)   # placed + finished
    assert slow["makespan_s"] > fast["makespan_s"]


def test_a_transfer_takes_its_bytes_over_the_bandwidth_and_shared_links_share():
    net = Network(3, bandwidth=100.0)
    net.start(0.0, 0, 1, 1000, "a")
    assert net.next_end() == pytest.approx(10.0)
    net.advance(5.0)
    net.start(5.0, 0, 2, 250, "b")          # shares worker 0's uplink from t=5
    assert net.next_end() == pytest.approx(10.0)   # b: 250 bytes at 50 B/s
    assert net.advance(10.0) == ["b"]
    net.check()
    assert net.next_end() == pytest.approx(12.5)   # a had 250 left at 50 B/s, then 0 at 100 B/s
    assert net.advance(12.5) == ["a"]


def test_max_min_fairness_gives_spare_capacity_to_the_unconstrained_flow():
    net = Network(4, bandwidth=90.0)
    net.start(0.0, 0, 1, 900, "x")   # 0 -> 1
    net.start(0.0, 0, 2, 900, "y")   # 0 -> 2: both share 0's uplink: 45 each
    net.start(0.0, 3, 1, 900, "z")   # 3 -> 1: shares 1's downlink with x: gets 90 - 45
    net.next_end()
    net.check()
    assert sorted(net.rate.tolist()) == pytest.approx([45.0, 45.0, 45.0])
    assert math.isinf(Network(2, math.inf).next_end())


def test_a_fetch_moves_the_input_once_per_worker():
    data = tasks.const(b"x")
    users = [tasks.merge([data]) for _ in range(8)]
    for u in users:
        u.resource_request = tasks.cpus(1)
    graph = graphfmt.build_graph(users)[0]
    result = simulate(graph, [1, 1], {}, {"loom/data/const": 10 << 20}, server_time=0, bandwidth=1e9)
    assert result["transfers"] == 1 and result["transferred_bytes"] == 10 << 20


@pytest.mark.parametrize("text,value", [("1G", 1e9), ("125M", 125e6), ("10Gbit", 1.25e9), ("inf", math.inf)])
def test_bandwidths_parse(text, value):
    assert spec.parse_bandwidth(text) == value


def test_specs_parse_and_bad_ones_say_what_is_wrong():
    assert spec.parse_workers(["2x4", "1x16"]) == [4, 4, 16]
    assert spec.parse_seconds("100us") == pytest.approx(1e-4)
    assert spec.parse_bytes("1Mi") == 1 << 20 and spec.parse_bytes("2K") == 2000
    d = spec.parse_duration("lognormal:10:5")
    rng = np.random.default_rng(0)
    draws = d.sample(rng, 20000)
    assert (draws >= 0).all() and draws.mean() == pytest.approx(10, rel=0.05)
    assert (spec.parse_duration("normal:1:5").sample(rng, 1000) >= 0).all()
    for bad, call in (("8", lambda: spec.parse_workers(["8"])), ("fast", lambda: spec.parse_duration("fast")),
                      ("uniform:2:1", lambda: spec.parse_duration("uniform:2:1")),
                      ("x=1", lambda: spec.parse_rules(["=1"], spec.parse_bytes, "--size"))):
        with pytest.raises(spec.SpecError):
            call()


def test_rules_match_label_group_then_task_type_then_star():
    t1 = tasks.merge([])
    t1.label = "train:3"
    t2 = tasks.merge([])
    t3 = tasks.const(b"abc")
    graph = graphfmt.build_graph([t1, t2, t3])[0]
    from loomctl.sim.model import TaskModel
    model = TaskModel(graph, {"train": spec.Dist("const", 5.0), "loom/data/merge": spec.Dist("const", 2.0),
                              "*": spec.Dist("const", 1.0)}, {}, 0)
    assert model.duration.tolist() == [5.0, 2.0, 1.0]
    assert model.size.tolist()[2] == 3    # a const's size is its config's length


# ---------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.loom"
    work = [tasks.run("sleep 1") for _ in range(40)]
    for i, t in enumerate(work):
        t.label = f"work:{i}"
    graphfmt.write(str(path), [tasks.merge(work)])
    return path


def test_the_command_prints_the_figures_and_writes_a_trace_the_trace_tools_read(plan_file, tmp_path):
    proc = loomctl("simulate", plan_file, "-w", "2x4", "-d", "work=uniform:0.5:1.5", "--size", "work=1M",
                   "--seed", "5", "--json", "--trace", tmp_path / "trace", check=0)
    result = json.loads(proc.stdout)
    for key in ("makespan_s", "lower_bound_s", "efficiency", "transferred_bytes", "server_busy_s", "tasks"):
        assert key in result
    assert result["tasks"] == 41 and result["makespan_s"] >= result["lower_bound_s"]
    assert result["transferred_bytes"] > 0            # the merge fetched 1 MB results
    summary = json.loads(loomctl("trace", "summary", tmp_path / "trace", "--json", check=0).stdout)
    assert summary["tasks"]["count"] == 41
    assert {row["group"] for row in summary["by_label"]} == {"work", "(no label)"}
    assert summary["span"]["seconds"] <= result["makespan_s"] + 1e-9
    loomctl("trace", "timeline", tmp_path / "trace", "-o", tmp_path / "t.svg", check=0)
    text = loomctl("simulate", plan_file, "-w", "2x4", "-d", "work=1", check=0).stdout.decode()
    assert "makespan" in text and "lower bound" in text and "efficiency" in text


def test_durations_from_a_trace_reproduce_the_run(plan_file, tmp_path):
    first = json.loads(loomctl("simulate", plan_file, "-w", "2x4", "-d", "work=1.5", "--json", "--trace",
                               tmp_path / "t", "--server-time", "0", check=0).stdout)
    again = json.loads(loomctl("simulate", plan_file, "-w", "2x4", "--durations-from", tmp_path / "t", "--json",
                               "--server-time", "0", check=0).stdout)
    assert again["work_s"] == pytest.approx(first["work_s"]) == pytest.approx(40 * 1.5)


@pytest.mark.parametrize("args,code,words", [
    (["-w", "2x"], 2, "NxC"),
    ([], 2, "--workers"),
    (["-w", "2x2", "-d", "work=soon"], 2, "--duration"),
    (["-w", "2x2", "--bandwidth", "fast"], 2, "--bandwidth"),
    (["-w", "2x2", "--durations-from", "/nonexistent/trace"], 3, "trace"),
])
def test_bad_arguments_end_in_one_line(plan_file, args, code, words):
    err = one_line_error(loomctl("simulate", plan_file, *args), code)
    assert words in err


def test_a_missing_plan_or_an_impossible_task_fails_cleanly(tmp_path):
    one_line_error(loomctl("simulate", tmp_path / "none.loom", "-w", "1x1"), 3)
    big = tasks.run("true")
    big.resource_request = tasks.cpus(8)
    graphfmt.write(str(tmp_path / "big.loom"), [big])
    proc = loomctl("simulate", tmp_path / "big.loom", "-w", "2x4", "--json")
    err = one_line_error(proc, 1)
    assert "8 cpus" in err
    assert json.loads(proc.stdout)["status"] == "failed"


def test_a_simulation_object_can_be_driven_directly():
    family = families.fork_join(10, 1.0)
    from loomctl.sim.model import TaskModel
    sim = Simulation(family.graph, [2], TaskModel(family.graph, family.durations, {}, 0), server_time=0)
    result = sim.run()
    assert result["makespan_s"] == pytest.approx(5.0, rel=0.01)


def test_a_simulated_worker_answers_a_steal_request_even_with_nothing_to_give():
    """As a real worker does (UPDATE ``returned``, maybe empty): the answer clears the
    server's outstanding request, so that the worker can be asked again."""
    from loomctl.sim.worker import SimWorker
    w = SimWorker(0, 1, b"w", 1)
    assert not w.has_report()
    assert w.give_back([5, 6], 1) == [] and w.has_report() and not w.may_hold()
    assert w.take_report()[4] == [] and not w.has_report()
    assert w.take_report()[4] is None   # (nothing asked: no answer)
