"""What emuprobe's rewritten-code check costs per hit, at the C ptrace floor.

    python -m benchmarks.readback [--reps 11] [--calls 200000]

Runs the C floor tracer on hot.c's endbr64 site (4 bytes: the check reads
the 3 after the int3) with and without FLOOR_READBACK=1, interleaved, and
prints the median µs per hit of each and their ratio.  Per hit = (time for
CALLS calls - time for 5,000 calls) / (CALLS - 5,000), so start-up cancels.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .build import FLOOR_OPS, SITES, build_all

SMALL = 5_000


def _seconds(floor: Path, hot: Path, addr: int, calls: int, readback: bool) -> float:
    env = dict(os.environ, FLOOR_READBACK="1" if readback else "0")
    kind, length = FLOOR_OPS["endbr"]
    argv = [str(floor), kind, hex(addr), str(length), str(hot), "endbr", str(calls)]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0 or f"hits={calls}" not in done.stderr:
        raise SystemExit(f"readback: the floor tracer failed: {done.stderr.strip()[-200:]}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="emuprobe-readback-") as tmp:
        built = build_all(Path(tmp))
        addr = built.symbol(built.hot, SITES["endbr"][0])
        per_hit: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.reps):
            for readback in (False, True):
                big = _seconds(built.floor, built.hot, addr, args.calls, readback)
                small = _seconds(built.floor, built.hot, addr, SMALL, readback)
                per_hit[readback].append((big - small) / (args.calls - SMALL) * 1e6)
    plain, checked = (statistics.median(per_hit[r]) for r in (False, True))
    print(f"C floor, endbr64 site:        {plain:.2f} µs/hit (median of {args.reps})")
    print(f"  + reading the code back:    {checked:.2f} µs/hit")
    print(f"  the check costs {checked - plain:.2f} µs/hit ({checked / plain:.3f}x the floor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
