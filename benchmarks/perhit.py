"""Per-hit cost of a counting probe, by tool and by kind of displaced instruction.

    python -m benchmarks.perhit [--calls N] [--runs R] [KIND ...]   (emuprobe only)

Each figure is the median over R runs of (T(N) - T(0)) / N minus the untraced
cost of one call, where T is the time of `hot KIND N` under the tool: the
tool's start-up and the work itself cancel, what is left is the cost of a hit.

T is CPU time (user + system) of the tool and everything it ran and reaped —
the tracer, the tracee, perf, bpftrace — with all of it pinned to CPU 0.  On
an idle machine that equals the wall time (one CPU, nothing else runs on it);
unlike wall time it does not count other people's work on a shared machine,
which made wall-time medians swing 2-5x here.  Wall times are kept too
(`--wall` uses them).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .build import SITES, Built, build_all
from .tools import STRATEGIES, Tool, strategy_tool

PIN = ["taskset", "-c", "0"]


@dataclass
class Cell:
    tool: str
    kind: str
    us: float | None  # median µs per hit; None: not measured (see note)
    samples: list[float] = field(default_factory=list)
    calls: int = 0
    note: str = ""
    wall_us: float | None = None  # the same from wall times


class Failed(Exception):
    pass


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float  # user + system of the command and every process it waited for
    output: str

    def get(self, wall: bool) -> float:
        return self.wall if wall else self.cpu


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(argv: list[str], env: dict[str, str] | None = None) -> Timing:
    """Times and stdout+stderr of one run, which must succeed."""
    c0, t0 = _children_cpu(), time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if done.returncode != 0:
        raise Failed(f"{' '.join(argv[:6])}...: exit {done.returncode}: {done.stderr[-300:]}")
    return Timing(wall, cpu, done.stdout + done.stderr)


def untraced_us(
    built: Built, kind: str, calls: int, runs: int, pin: bool, wall: bool = False
) -> float:
    """The cost of one call of the probed function with nothing attached."""
    pre = PIN if pin else []
    full = [timed([*pre, str(built.hot), kind, str(calls)]).get(wall) for _ in range(runs)]
    zero = [timed([*pre, str(built.hot), kind, "0"]).get(wall) for _ in range(runs)]
    return max(0.0, (statistics.median(full) - statistics.median(zero)) / calls * 1e6)


def measure(
    tool: Tool,
    kind: str,
    calls: int,
    runs: int,
    base_us: float,
    pin: bool,
    check: Callable[[str, int], str] | None = None,
    wall: bool = False,
) -> Cell:
    """Per-hit cost of `tool` on `kind` (`base_us` is the untraced cost of a
    call, in the same measure); `check(output, calls)` returns a note when the
    run did not see `calls` hits (then nothing is timed)."""
    n = max(100, int(calls * tool.calls_scale))
    pre = PIN if pin else []
    samples, walls = [], []
    try:
        for _ in range(runs):
            t0 = timed([*pre, *tool.argv(kind, 0)], tool.env)
            t1 = timed([*pre, *tool.argv(kind, n)], tool.env)
            note = check(t1.output, n) if check is not None else ""
            if note:
                return Cell(tool.name, kind, None, calls=n, note=note)
            samples.append((t1.get(wall) - t0.get(wall)) / n * 1e6 - base_us)
            walls.append((t1.wall - t0.wall) / n * 1e6)
    except Failed as e:
        return Cell(tool.name, kind, None, calls=n, note=str(e))
    return Cell(tool.name, kind, statistics.median(samples), samples, n,
                wall_us=statistics.median(walls))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-pin", action="store_true", help="do not pin everything to CPU 0")
    ap.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    ap.add_argument("kinds", nargs="*", default=list(SITES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        built = build_all(Path(d))
        print(f"{'kind':<11}" + "".join(f"{s:>11}" for s in STRATEGIES) + "   µs per hit")
        for kind in args.kinds:
            pin = not args.no_pin
            base = untraced_us(built, kind, args.calls, args.runs, pin, args.wall)
            cells = [
                measure(strategy_tool(built, s), kind, args.calls, args.runs, base, pin,
                        wall=args.wall)
                for s in STRATEGIES
            ]
            print(f"{kind:<11}" + "".join(
                f"{c.us:>11.2f}" if c.us is not None else f"{'-':>11}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
