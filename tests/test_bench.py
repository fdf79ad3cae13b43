"""The benchmark suite's parts, small and real: the C floor tracer, the kernel
baseline's counts and clean-up, the MAP_FIXED demo, the report.  The timings
themselves are benchmarks/' business, never asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report, scenarios
from benchmarks.build import SITES, build_all
from benchmarks.perhit import Cell
from benchmarks.targets import evaluate, targets_table
from emuprobe.perfbridge import kcount, kernel

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("bench"))


@pytest.mark.parametrize("kind", ["push", "endbr"])
def test_floor_tracer_counts_every_hit_and_keeps_the_program_exact(built, kind):
    func = SITES[kind][0]
    addr = built.symbol(built.hot, func)
    op, length = ("push", 1) if kind == "push" else ("skip", 4)
    done = subprocess.run(
        [str(built.floor), op, hex(addr), str(length), str(built.hot), kind, "3000"],
        capture_output=True, text=True, timeout=60,
    )
    plain = subprocess.run([str(built.hot), kind, "3000"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == plain.stdout
    assert "hits=3000" in done.stderr


@pytest.mark.skipif(bool(kcount.unavailable()), reason=kcount.unavailable() or "available")
def test_kernel_count_is_exact_and_cleans_up(built):
    offsets = {f: built.file_offset(built.hot, f) for f in ("h_push", "h_riprel", "h_lockxadd")}
    with kcount.KernelCount(str(built.hot), offsets) as k:
        group = k.probes.group
        push = k.run([str(built.hot), "push", "2500"])
        riprel = k.run([str(built.hot), "riprel", "1500"])
        lock = k.run([str(built.hot), "lockxadd", "100"])
    assert push.counts["h_push"] == 2500 and push.counts["h_riprel"] == 0
    assert riprel.counts["h_riprel"] == 1500
    assert lock.counts.get("h_lockxadd", 0) == 0  # the kernel never fires on lock
    text = Path(kernel.tracefs_dir(), "uprobe_events").read_text()
    assert f"{group}/" not in text


def test_map_fixed_noreplace_fails_only_under_xol(built):
    """The tracee maps the page xol took: EEXIST under xol, fine under emulate."""
    r = scenarios.map_fixed_conflict(built, kernel_why="not in this test")
    assert "error" not in r, r
    assert r["untraced"] == "mmap ok" and r["emulate"] == "mmap ok"
    assert r["xol"] == "mmap failed: EEXIST"


def test_report_and_targets_from_results():
    cells = [
        Cell("floor", "push", 10.0), Cell("emulate", "push", 12.0), Cell("xol", "push", 30.0),
        Cell("ltrace", "push", 60.0), Cell("gdb", "push", 50.0),
        Cell("kernel", "lockxadd", None, note="kernel counted 0 of 100 hits"),
    ]
    from dataclasses import asdict

    results = {"perhit": {"cells": [asdict(c) for c in cells]},
               "attach": {"seconds": 0.5, "rss_mb": 60.0}}
    rows = {r["target"]: r for r in evaluate(results)}
    assert rows["emulate on push / C floor"]["value"] == pytest.approx(1.2)
    assert rows["emulate on push / C floor"]["met"] is True
    assert rows["xol / emulate on push"]["met"] is True
    assert rows["gdb / emulate on push"]["met"] is False  # 50/12 < 4.5
    assert rows["emulate on riprel / C floor"]["met"] is None
    table = report.perhit_table(cells)
    assert "| push (`push %rbp`) | 10.0 (1.00x) | 12.0 (1.20x) | 30.0 (3.00x)" in table
    assert "**no**" in targets_table(evaluate(results))


def test_bench_runs_from_the_checkout_and_not_from_the_package():
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout
    gone = subprocess.run([sys.executable, "-m", "emuprobe", "bench"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert gone.returncode == 2 and "invalid choice: 'bench'" in gone.stderr
