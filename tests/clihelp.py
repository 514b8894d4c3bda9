"""Run the real loomctl command in a subprocess (exit codes and stderr as users see them),
and walk its --help texts to find every command and option."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loomctl(*args, input=None, cwd=None, env=None, timeout=60, check=None, prefix=()):
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    proc = subprocess.run([*prefix, sys.executable, "-m", "loomctl", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-2000:], proc.stderr.decode()[-2000:])
    return proc


def one_line_error(proc, code=3):
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert err.startswith("loomctl: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def final_error(proc, code):
    """Progress lines may come first; the last stderr line is the one-line error."""
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("loomctl: error: "), err
    return last


PLAIN_ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "_TYPER_FORCE_DISABLE_TERMINAL": "1"}


_HELP_TEXTS = """
import contextlib, io, json, sys
from loomctl.cli import main
out = []
for path in json.loads(sys.stdin.read()):
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf):
        try:
            main([*path, "--help"])
        except SystemExit as exc:
            code = exc.code
    out.append([code, buf.getvalue()])
sys.stdout.write(json.dumps(out))
"""


def help_texts(paths: list) -> list[str]:
    """The ``loomctl PATH --help`` text of each path, as a terminal of 200 columns without
    colours shows it, from one process (``main`` of the CLI, imported once: a process per
    command spent ~0.5 s of CPU importing it)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **PLAIN_ENV)
    proc = subprocess.run([sys.executable, "-c", _HELP_TEXTS], input=json.dumps([list(p) for p in paths]),
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answers = json.loads(proc.stdout)
    for path, (code, _) in zip(paths, answers):
        assert code in (0, None), (path, code)
    return [text for _, text in answers]


_BOX = str.maketrans({c: " " for c in "│╭╮╰╯─┃━┏┓┗┛"})


def parse_help(text: str) -> tuple[set[str], list[str]]:
    """(long options, subcommands) of one --help text, rich boxes or click's plain layout."""
    options, commands, section = set(), [], None
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)    # colours, should a terminal be forced
    for raw in text.splitlines():
        stripped = raw.strip()
        heading = re.match(r"^[╭┏]─+\s*(\w+)", stripped) or re.match(r"^(\w+):$", stripped)
        if heading:
            section = heading.group(1).lower()
            continue
        line = raw.translate(_BOX).strip()
        if not line:
            continue
        if section == "options":
            tokens = line.lstrip("* ").split()
            for token in tokens:
                if not token.startswith("-"):
                    break       # the option names end where the metavar/description starts
                options.update(re.findall(r"--[a-z][a-z0-9-]*", token))
        elif section == "commands" and re.match(r"^[a-z][a-z0-9-]*\s{2,}\S", line):
            commands.append(line.split()[0])
    return options, commands


def walk_tree() -> dict[tuple[str, ...], tuple[set[str], list[str]]]:
    """Every command path (root included) -> (the long options its --help shows, its
    subcommands)."""
    found: dict[tuple[str, ...], tuple[set[str], list[str]]] = {}
    level = [()]
    while level:
        texts = help_texts(level)
        next_level = []
        for path, text in zip(level, texts):
            options, commands = parse_help(text)
            assert options, f"no options parsed from `loomctl {' '.join(path)} --help`:\n{text}"
            found[path] = (options, commands)
            next_level.extend(path + (c,) for c in commands)
        level = next_level
    return found


def walk_commands() -> dict[tuple[str, ...], set[str]]:
    """Every command path (root included) -> the long options its --help shows."""
    return {path: options for path, (options, _) in walk_tree().items()}
