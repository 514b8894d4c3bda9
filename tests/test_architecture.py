"""The promises of the layout (docs/architecture.md), checked on the source."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SANS_IO = [*sorted((ROOT / "loomctl" / "core").glob("*.py")), ROOT / "loomctl" / "worker" / "state.py",
           ROOT / "loomctl" / "worker" / "taskqueue.py", ROOT / "loomctl" / "server" / "dispatch.py",
           ROOT / "loomctl" / "messages.py"]
FORBIDDEN = {"zmq", "socket", "threading", "time", "select", "subprocess", "asyncio"}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: p.name)
def test_sans_io_modules_use_no_sockets_threads_or_clock(path):
    assert not set(_imports(path)) & FORBIDDEN
    tree = ast.parse(path.read_text())
    opened = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "open"]
    assert not opened, f"{path.name} opens files"


def test_the_sans_io_core_loads_no_zmq():
    code = ("import sys, loomctl.core.server, loomctl.worker.state, loomctl.server.dispatch; "
            "print(sorted(m for m in ('zmq', 'typer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_only_transitions_writes_the_task_state():
    """``cols.state[...] = ...`` appears in core.transitions alone (transition, and the
    birth of new rows in add_tasks)."""
    writers = {}
    for path in (ROOT / "loomctl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AugAssign) else []
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Attribute) \
                        and target.value.attr == "state":
                    writers.setdefault(path.relative_to(ROOT).as_posix(), []).append(node.lineno)
    assert list(writers) == ["loomctl/core/transitions.py"], writers
    assert len(writers["loomctl/core/transitions.py"]) == 3   # two in transition(), the birth


@pytest.mark.parametrize("folder", ["core", "worker", "server"])
def test_modules_are_small_and_state_their_invariants(folder):
    for path in sorted((ROOT / "loomctl" / folder).glob("*.py")):
        if path.name == "__init__.py":
            continue
        lines = len(path.read_text().splitlines())
        assert lines <= 520, f"{path.name} has {lines} lines"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert doc, f"{path.name} has no top comment"
        assert "Invariant" in doc or "invariant" in doc, f"{path.name}'s top comment states no invariants"
