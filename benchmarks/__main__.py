"""emuprobe's benchmark suite: python -m benchmarks [--quick] (or make bench).

Compiles its fixtures, measures the per-hit cost of every strategy, the C
ptrace floors (emulating and out-of-line), kernel uprobes and the peers on
each kind of displaced instruction in build.SITES, then lost events, VMAs,
the MAP_FIXED conflict, a real workload, attaching 1,000 probes and the
tracer's RSS; writes JSON, markdown and a PNG to benchmarks/results/.
Missing peers and kernel uprobes are skipped with the reason.  Nothing here is run by `make test`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from emuprobe.perfbridge import kcount

from . import report, scenarios
from .build import SITES, XOL_FLOOR, build_all
from .perhit import Cell, measure, untraced_us
from .progress import Progress
from .targets import evaluate, targets_table
from .text import extras_markdown
from .tools import (
    STRATEGIES,
    Tool,
    bpftrace_tool,
    floor_tool,
    gdb_tool,
    kernel_tool,
    ltrace_tool,
    strategy_tool,
    xol_floor_tool,
)

RESULTS = Path(__file__).resolve().parent / "results"
TRUST_ENV = "EMUPROBE_TRUST_FILE"  # emuprobe/x86/trust.py reads it
SECTIONS = ("perhit", "lost_events", "vma", "map_fixed", "workload", "attach")


def _check(tool: Tool, func: str):  # type: ignore[no-untyped-def]
    """A run's output must show that it made `calls` calls and, where the tool
    counts, that it saw every one."""

    def check(out: str, calls: int) -> str:
        if f"calls={calls} " not in out:
            return "the traced program did not complete its calls"
        if tool.name == "kernel":
            got = kcount.parse_counts(out).get(func, 0)
            if got != calls:
                return f"kernel counted {got} of {calls} hits (it refuses this instruction)"
        if tool.name in ("floor", XOL_FLOOR) and f"hits={calls}\n" not in out:
            return "the C floor tracer did not see every hit"
        if tool.name == "bpftrace" and f"@hits: {calls}" not in out:
            return "bpftrace did not count every hit"
        return ""

    return check


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and runs (a smoke run)")
    ap.add_argument("--runs", type=int, help="runs per figure (median); default 5, quick 2")
    ap.add_argument("--calls", type=int, help="hits per ptrace run; default 20000, quick 3000")
    ap.add_argument("--lost-calls", type=int, help="calls per thread; default 100000")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin tracer and tracee to CPU 0 for the per-hit figures")
    ap.add_argument("--no-peers", action="store_true", help="skip ltrace, gdb and bpftrace")
    ap.add_argument("--wall", action="store_true",
                    help="per-hit figures from wall time (default: CPU time, see perhit.py)")
    ap.add_argument("--kinds", nargs="*", default=list(SITES), choices=list(SITES))
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS),
                    help="which parts to run (default: all)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--trust-file", type=Path,
                    help="the trust table emulate uses (default: the packaged one), e.g. one"
                    " written by `emuprobe difftest --update-trust --trust-file FILE`")
    args = ap.parse_args(argv)
    if args.trust_file is not None:
        os.environ[TRUST_ENV] = str(args.trust_file.resolve())  # for every emuprobe run
    runs = args.runs or (2 if args.quick else 5)
    calls = args.calls or (3000 if args.quick else 20000)
    lost_calls = args.lost_calls or (5000 if args.quick else 100_000)
    pin = not args.no_pin
    now = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "machine": report.machine(),
        "command": "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "runs": runs, "calls": calls, "pinned_to_cpu0": pin, "engine": _engine(),
        "measure": "wall time" if args.wall else "CPU time (user+system, all processes)",
        "loadavg_at_start": _loadavg(),
    }
    kernel_why = kcount.unavailable()
    with tempfile.TemporaryDirectory(prefix="emuprobe-bench-") as tmp, Progress() as progress:
        built = build_all(Path(tmp))
        counter = None
        if not kernel_why:
            offsets = {f: built.file_offset(built.hot, f) for f, _ in SITES.values()}
            counter = kcount.KernelCount(str(built.hot), offsets).__enter__()
        try:
            tools = [floor_tool(built), xol_floor_tool(built),
                     *(strategy_tool(built, s) for s in STRATEGIES),
                     kernel_tool(built, counter, kernel_why)]
            if not args.no_peers:
                tools += [ltrace_tool(built), gdb_tool(built, Path(tmp)), bpftrace_tool(built)]
            kinds = args.kinds if "perhit" in args.sections else []
            cells = _perhit(tools, kinds, calls, runs, pin, args.wall, built, progress)
        finally:
            if counter is not None:
                counter.__exit__(None, None, None)
        results["perhit"] = {"cells": [asdict(c) for c in cells],
                             "skipped": {t.name: t.missing for t in tools if t.missing}}
        steps = [
            ("lost events", "lost_events",
             lambda: scenarios.lost_events(built, 8, lost_calls, kernel_why)),
            ("VMA diff", "vma", lambda: scenarios.vma_diff(built, kernel_why)),
            ("MAP_FIXED conflict", "map_fixed",
             lambda: scenarios.map_fixed_conflict(built, kernel_why)),
            ("real workload", "workload", lambda: scenarios.real_workload(runs, kernel_why)),
            ("attach 1000 probes", "attach", lambda: scenarios.attach_many(1000)),
        ]
        steps = [s for s in steps if s[1] in args.sections]
        task = progress.task("scenarios", len(steps))
        for label, key, fn in steps:
            progress.say(task, label)
            results[key] = fn()
            progress.advance(task)
    results["targets"] = evaluate(results)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    markdown = _markdown(results, cells)
    for path in report.write(args.out, stamp, results, markdown):
        print(f"wrote {path}")
    print(markdown)
    return 0


def _perhit(tools: list[Tool], kinds: list[str], calls: int, runs: int, pin: bool,
            wall: bool, built: Any, progress: Progress) -> list[Cell]:
    jobs = [(t, k) for k in kinds for t in tools if k in t.kinds]
    task = progress.task("per-hit cost", len(jobs))
    cells: list[Cell] = []
    base = {}
    for tool, kind in jobs:
        progress.say(task, f"{tool.name} on {kind}")
        if tool.missing:
            cells.append(Cell(tool.name, kind, None, note=tool.missing))
        else:
            if kind not in base:
                base[kind] = untraced_us(built, kind, calls, runs, pin, wall)
            cells.append(measure(tool, kind, calls, runs, base[kind], pin,
                                 _check(tool, SITES[kind][0]), wall))
        progress.advance(task)
    return cells


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _engine() -> dict[str, Any]:
    """What the emulate strategy could use in this run."""
    from emuprobe.engine.hotloop import HotLoop

    try:
        from emuprobe.x86 import trust

        classes = len(trust.table().classes)
    except ImportError:
        classes = -1
    return {"compiled_hot_loop": HotLoop.load() is not None, "trusted_classes": classes,
            "trust_file": os.environ.get(TRUST_ENV, "packaged")}


def _markdown(results: dict[str, Any], cells: list[Cell]) -> str:
    m = results["machine"]
    eng = results["engine"]
    head = [
        f"# emuprobe benchmarks, {results['date']}",
        "",
        f"Machine: {m['cpu']} ({m['cpus']} CPUs), Linux {m['kernel']}, Python {m['python']}.  ",
        f"Command: `{results['command']}`; median of {results['runs']} runs; "
        f"{'tracer and tracee pinned to CPU 0' if results['pinned_to_cpu0'] else 'not pinned'}; "
        f"per-hit figures are {results['measure']}; load average at start "
        f"{results['loadavg_at_start']}.  ",
        f"Engine: compiled hot loop {'built' if eng['compiled_hot_loop'] else 'NOT built'}; "
        f"trust table: {eng['trusted_classes']} instruction classes ({eng['trust_file']}).",
        "",
        "## Per-hit cost: µs per hit (multiple of the C floor on the push site)",
        "",
        report.perhit_table(cells),
        "",
        *report.notes(cells),
        "",
        "## Targets",
        "",
        targets_table(results["targets"]),
        "",
    ]
    return "\n".join(head) + extras_markdown(results)


if __name__ == "__main__":
    sys.exit(main())
