"""Spill and unspill throughput: the worker's spill files (worker/spill.py) written and
read back, as a worker under its memory limit does, objects of --size MB.

    /work/venv/bin/python bench/spill.py                    # 32 x 50 MB in a temporary dir
    /work/venv/bin/python bench/spill.py --dir /scratch --objects 8 --size 256

Write: the object's encoding to its file (os.write, no fsync: a spill file need not
survive the worker). Read: back into one bytes object. With --drop-cache the page cache
is dropped between the two (root only), so that reads come from the disk rather than
from memory, as they would once the written files outgrew the free RAM.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loomctl.worker import data              # noqa: E402
from loomctl.worker.spill import SpillFiles  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=32)
    ap.add_argument("--size", type=float, default=50.0, help="MB per object")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--drop-cache", action="store_true")
    args = ap.parse_args()
    nbytes = int(args.size * 1e6)
    objs = [data.Plain(os.urandom(1 << 20) * (nbytes >> 20) + bytes([k]) * (nbytes - ((nbytes >> 20) << 20)))
            for k in range(args.objects)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = SpillFiles(os.path.join(tmp, "spill"))
        t0 = time.perf_counter()
        total = sum(files.write(k, obj) for k, obj in enumerate(objs))
        os.sync()
        wrote = time.perf_counter() - t0
        if args.drop_cache:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        t0 = time.perf_counter()
        for k, obj in enumerate(objs):
            assert files.read(k) == obj, f"object {k} came back different"
        read = time.perf_counter() - t0
    mb = total / 1e6
    print(f"{args.objects} x {args.size:g} MB: spill {mb / wrote:,.0f} MB/s (write + sync, {wrote:.2f} s), "
          f"unspill {mb / read:,.0f} MB/s ({read:.2f} s{', page cache dropped' if args.drop_cache else ''})")


if __name__ == "__main__":
    main()
