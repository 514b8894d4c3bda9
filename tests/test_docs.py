"""The documentation stays true to the program.

- Every command and subcommand of ``loomctl`` (found by walking ``--help``) has a man
  page, man/loomctl.1 for the root and man/loomctl-NAME.1 for ``loomctl NAME ...``.
- Every long option that ``--help`` shows appears in that page, and every option a page
  documents (a ``.TP`` item) still exists: no drift either way.
- Every page in man/ renders with groff without a warning.
- A wheel built from the source tree carries the man pages and the examples, which
  pip installs under <prefix>/share.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from clihelp import ROOT, parse_help, walk_commands

MAN = os.path.join(ROOT, "man")
@pytest.fixture(scope="module")
def commands():
    return walk_commands()


def page_path(path: tuple[str, ...]) -> str:
    name = "loomctl" if not path else f"loomctl-{path[0]}"
    return os.path.join(MAN, f"{name}.1")


def roff_text(page: str) -> str:
    """The page's source with font escapes and roff dashes made plain."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    return text.replace("\\-", "-").replace("\\(en", "-").replace("\\&", "")


def documented_options(page: str) -> set[str]:
    """Long options named by the tag line of a .TP item (what the page documents)."""
    lines = roff_text(page).splitlines()
    found = set()
    for prev, line in zip(lines, lines[1:]):
        if prev.startswith(".TP") and re.match(r"^(\.B[IR]?\s+)?-", line):
            found.update(re.findall(r"--[a-z][a-z0-9-]*", line))
    return found


def test_help_parser_reads_both_layouts():
    rich = ("╭─ Options ─────╮\n│ *  --output  -o  <str>  Graph file; see --json. │\n"
            "│    --json        <bool> Print JSON.     │\n╰───────────────╯\n"
            "╭─ Commands ────╮\n│ start  Start it.  │\n╰───────────────╯\n")
    plain = "Options:\n  -o, --output TEXT  Graph file; see --json.\n  --json  Print JSON.\n\nCommands:\n  start  Start it.\n"
    for text in (rich, plain):
        assert parse_help(text) == ({"--output", "--json"}, ["start"])


def test_every_command_has_a_man_page(commands):
    missing = sorted({page_path(p) for p in commands if not os.path.exists(page_path(p))})
    assert not missing, f"commands without a man page: {missing}"
    assert {("server", "start"), ("server", "stop"), ("worker", "start"), ("job", "list"),
            ("build",), ("run",), ("submit",)} <= set(commands)


def test_every_option_in_help_is_in_its_man_page(commands):
    problems = []
    for path, options in sorted(commands.items()):
        page = page_path(path)
        if not os.path.exists(page):
            continue    # reported by test_every_command_has_a_man_page
        text = roff_text(page)
        for option in sorted(options):
            if not re.search(re.escape(option) + r"(?![a-z0-9-])", text):
                problems.append(f"`loomctl {' '.join(path)}` has {option}, {os.path.basename(page)} does not")
    assert not problems, "\n".join(problems)


def test_every_documented_option_exists(commands):
    per_page: dict[str, set[str]] = {}
    for path, options in commands.items():
        per_page.setdefault(page_path(path), set()).update(options)
        # loomctl(1) also describes the options most commands share
        per_page.setdefault(page_path(()), set()).update(options)
    problems = []
    for page, options in sorted(per_page.items()):
        if os.path.exists(page):
            stale = documented_options(page) - options - {"--help"}
            problems.extend(f"{os.path.basename(page)} documents {o}, which its command does not have"
                            for o in sorted(stale))
    assert not problems, "\n".join(problems)


def test_no_page_without_a_command(commands):
    expected = {os.path.basename(page_path(p)) for p in commands}
    pages = {f for f in os.listdir(MAN) if f.endswith(".1")}
    assert pages - expected == set(), f"pages of commands that do not exist: {sorted(pages - expected)}"


def man_pages():
    return sorted(f for f in os.listdir(MAN) if re.search(r"\.[1-8]$", f))


@pytest.mark.parametrize("page", man_pages())
def test_man_page_renders_without_warnings(page):
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (Debian/Ubuntu: apt-get install groff-base)")
    path = os.path.join(MAN, page)
    proc = subprocess.run([groff, "-man", "-Tutf8", "-ww", path], capture_output=True,
                          env=dict(os.environ, LC_ALL="C.UTF-8"), timeout=60)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr.decode()
    text = proc.stdout.decode("utf-8", "replace")
    text = re.sub(r".\x08", "", text)   # overstrike bold/underline
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION"):
        assert re.search(rf"^{section}$", text, re.M), f"{page} has no {section} section"
    name = page.rsplit(".", 1)[0]
    assert re.search(rf"^\s+{re.escape(name)}\s+[-\u2010\u2212]\s", text, re.M), \
        f"the NAME section of {page} does not start with '{name} - '"


def test_man_page_works_with_man_l():
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed (Debian/Ubuntu: apt-get install man-db)")
    proc = subprocess.run([man, "-l", os.path.join(MAN, "loomctl.1")], capture_output=True,
                          env=dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="80"), timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"EXIT STATUS" in proc.stdout.replace(b"\x08", b"")


def test_exit_codes_in_loomctl_1_match_the_enum():
    from loomctl.cli.output import ExitCode
    text = roff_text(os.path.join(MAN, "loomctl.1"))
    section = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    documented = {int(n) for n in re.findall(r"^\.B (\d+)$", section, re.M)}
    assert documented == {int(code) for code in ExitCode}


# ---------------------------------------------------------------------------- packaging

def data_files() -> dict[str, list[str]]:
    try:
        import tomllib
    except ImportError:   # Python 3.10
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["data-files"]


def test_pyproject_installs_every_man_page_and_example():
    import glob
    listed = {}
    for target, patterns in data_files().items():
        for pattern in patterns:
            for path in glob.glob(os.path.join(ROOT, pattern)):
                listed[os.path.relpath(path, ROOT)] = target
    for page in man_pages():
        assert listed.get(f"man/{page}") == f"share/man/man{page[-1]}", page
    skip = {".gitignore"}
    for directory, dirs, files in os.walk(os.path.join(ROOT, "examples")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            rel = os.path.relpath(os.path.join(directory, name), ROOT)
            if name in skip or name.endswith(".pyc") or name.startswith("."):
                continue
            expected = "share/loomctl/" + os.path.dirname(rel)
            assert listed.get(rel) == expected, f"{rel} is not installed to {expected} (pyproject data-files)"


def test_wheel_carries_man_pages_and_examples(tmp_path):
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed; pip install '.[test]' brings it")
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            import wheel  # noqa: F401  (older setuptools build wheels with it)
        except ImportError:
            pytest.skip(f"setuptools {setuptools.__version__} needs the 'wheel' package to build wheels; "
                        "pip install '.[test]' brings setuptools>=70.1")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".hypothesis", ".pytest_cache", "build", "dist", "*.egg-info", "__pycache__", "results",
        ".venv"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel_path,) = (tmp_path / "dist").glob("loomctl-*.whl")
    names = zipfile.ZipFile(wheel_path).namelist()
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    for page in man_pages():
        assert f"share/man/man{page[-1]}/{page}" in data, f"{page} is not in {wheel_path.name}"
    for example in ("hello.py", "client_api.py", "wordcount/wordcount.py", "wordcount/plan-life.txt",
                    "crossval/crossval.py", "crossval/iris.libsvm", "pipeline/Makefile",
                    "pipeline/tasks.toml", "shell/count-lines.sh"):
        assert f"share/loomctl/examples/{example}" in data, f"examples/{example} is not in {wheel_path.name}"
    assert "loomctl/cli/__init__.py" in names and "graphfmt/tasks.py" in names


# ---------------------------------------------------------------------------- README

def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    section = readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert "pip install ." in commands[0] and commands[0].endswith("loomctl run examples/hello.py")
    assert "pip install '.[test]'" in commands[1] and commands[1].endswith("-m pytest -q")
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "python3 -m venv" in ci and "install --quiet '.[test]'" in ci and "-m pytest -q" in ci


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme(), re.S)


def test_readme_graph_file_example_runs(tmp_path):
    code = readme_python_blocks()[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3 2\n" and (tmp_path / "hello.loom").exists()


def test_readme_python_api_example_runs(tmp_path):
    from cluster import Cluster
    shared = tmp_path / "shared"
    (shared / "ck").mkdir(parents=True)
    (shared / "data.txt").write_text("5\n3\n12\n1\n")
    code = readme_python_blocks()[1].replace("/shared/", f"{shared}/")
    code = code.replace('Client("localhost", 9010)', "Client()")   # the cluster's access file
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster", workers=1, cpus=2)
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                              env=cluster.env, timeout=120)
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["[b'1\\n3\\n5\\n12\\n', [b'4\\n', b'1\\n3\\n5\\n12\\n'], b'21', [3, 9, 15, 36]]",
                         "b'21'", "b'21!'"], proc.stdout
    assert "program 'false' exited with status 1" in lines[3]
    assert (shared / "ck" / "sum").read_bytes() == b"21"


# what the installed `loomctl` script does (completion is keyed to the program's name)
LOOMCTL_SCRIPT = "import sys; sys.argv[0] = 'loomctl'; from loomctl.cli import main; main()"


def test_shell_completion_of_commands_and_options():
    env = dict(os.environ, PYTHONPATH=ROOT, _LOOMCTL_COMPLETE="complete_bash")

    def complete(words: str) -> list[str]:
        parts = words.split(" ")
        proc = subprocess.run([sys.executable, "-c", LOOMCTL_SCRIPT], capture_output=True, text=True, timeout=60,
                              env=dict(env, COMP_WORDS=words, COMP_CWORD=str(len(parts) - 1)))
        return proc.stdout.split()

    assert complete("loomctl wor") == ["worker"]
    assert "start" in complete("loomctl server ")
    assert complete("loomctl worker start --memory-l") == ["--memory-limit"]
