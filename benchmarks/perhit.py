"""Per-hit cost of a counting probe, by kind of displaced instruction.

    python -m benchmarks.perhit [--calls N] [--runs R] [KIND ...]

For each kind, times `hot KIND N` untraced and under `emuprobe trace --count`
R times and reports the median of (traced - untraced) / N, in microseconds.
The fixture is compiled here with gcc; nothing is cached between runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KINDS = {"push": "h_push", "endbr": "h_endbr", "riprel": "h_riprel",
         "addsd": "h_addsd", "lockxadd": "h_lockxadd"}


def build(out: Path) -> Path:
    exe = out / "hot"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "fixtures" / "hot.c")], check=True)
    return exe


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def per_hit_us(exe: Path, kind: str, calls: int, runs: int) -> tuple[float, float]:
    """(median µs per hit, median untraced µs per call) over `runs` paired runs."""
    base = [timed([str(exe), kind, str(calls)]) for _ in range(runs)]
    traced = [
        timed([sys.executable, "-m", "emuprobe", "trace", "--count", KINDS[kind], "--",
               str(exe), kind, str(calls)])
        for _ in range(runs)
    ]
    # Start-up (Python, ELF parsing) is measured with 0 calls and taken off.
    startup = [
        timed([sys.executable, "-m", "emuprobe", "trace", "--count", KINDS[kind], "--",
               str(exe), kind, "0"])
        for _ in range(runs)
    ]
    cost = (statistics.median(traced) - statistics.median(startup)) / calls * 1e6
    return cost, statistics.median(base) / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("kinds", nargs="*", default=["push", "riprel", "addsd", "lockxadd"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        exe = build(Path(d))
        print(f"{'kind':<10} {'µs/hit (traced)':>16} {'µs/call (untraced)':>19}")
        for kind in args.kinds:
            cost, base = per_hit_us(exe, kind, args.calls, args.runs)
            print(f"{kind:<10} {cost:>16.2f} {base:>19.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
