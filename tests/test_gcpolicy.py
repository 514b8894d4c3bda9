"""The long-running processes' garbage collection (loomctl.gcpolicy), in a fresh
interpreter: rarer young collections, start-up objects frozen, cycles still freed."""

import subprocess
import sys

CHECK = """
import gc, weakref
from loomctl import gcpolicy
before = gc.get_threshold()
gcpolicy.tune()
after = gc.get_threshold()
assert after == (gcpolicy.GEN0, before[1], before[2]), (before, after)
assert gc.get_freeze_count() > 0
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
keep = [[None] for _ in range(3 * gcpolicy.GEN0)]   # young containers: the collector runs on its own
assert gone() is None, "a cycle made after tune() was not collected"
print("ok")
"""


def test_tune_makes_young_collections_rarer_and_still_frees_cycles():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
