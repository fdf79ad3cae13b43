"""What a campaign prints and writes: progress, the summary table, JSON, the
trust table and the discrepancy reproducers."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, TextIO

from emuprobe.difftest.cases import Case
from emuprobe.difftest.compare import FAULT, MATCH, MISMATCH, REFUSED
from emuprobe.difftest.runner import POLICY, ClassStats, Runner
from emuprobe.x86.cpu import this_cpu
from emuprobe.x86.decode import NativeStep, analyze
from emuprobe.x86.trust import TrustTable

UNTRUSTED_NOTE = "untrusted: the engine sends this class to the native fallback"


class ProgressBar:
    """A one-line bar on a terminal; elsewhere a line every tenth of the way."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.out = out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self._last = 0.0
        self._next_line = self.total // 10
        self.done = self.bad = 0

    def __call__(self, runner: Runner) -> None:
        """A campaign's progress (a worker holds a copy: the runner is the truth)."""
        if self._due(runner.cases):  # counting mismatches walks every class: not per case
            self.show(runner.cases, sum(s.mismatches for s in runner.stats.values()))

    def advance(self, cases: int, mismatches: int) -> None:
        self.done += cases
        self.bad += mismatches
        if self._due(self.done):
            self.show(self.done, self.bad)

    def _due(self, done: int) -> bool:
        if self.tty:
            return time.monotonic() - self._last >= 0.2
        return done >= self._next_line

    def show(self, done: int, bad: int) -> None:
        now = time.monotonic()
        total = max(self.total, done)  # top-ups run past the planned count
        if self.tty:
            self._last = now
            width = 30
            filled = width * done // total
            rate = done / max(now - self.start, 1e-9)
            bar = "#" * filled + "." * (width - filled)
            self.out.write(f"\r[{bar}] {done}/{total} {rate:5.0f}/s mismatches {bad} ")
        else:
            self._next_line = done + max(self.total // 10, 1)
            self.out.write(f"difftest: {done} cases, {now - self.start:.0f} s\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


Trusted = frozenset[str]  # the classes emulated on this CPU (trust.trusted_here())


def summary_rows(runner: Runner, trusted: Trusted) -> list[dict[str, Any]]:
    by_mnem: dict[str, list[tuple[str, ClassStats]]] = defaultdict(list)
    for key, s in runner.stats.items():
        by_mnem[s.mnemonic].append((key, s))
    rows = []
    for mnem, pairs in sorted(by_mnem.items()):
        group = [s for _, s in pairs]
        rows.append({
            "mnemonic": mnem,
            "cases": sum(s.cases for s in group),
            "match": sum(s.counts[MATCH] for s in group),
            "fault": sum(s.counts[FAULT] + s.counts[REFUSED] for s in group),
            "mismatch": sum(s.mismatches for s in group),
            "masked": sum(s.masked for s in group),
            "policy": sum(s.counts[POLICY] for s in group),
            "classes": len(group),
            "trusted": sum(1 for key, _ in pairs if key in trusted),
        })  # fmt: skip
    return rows


def totals(runner: Runner, trusted: Trusted) -> dict[str, int]:
    stats = runner.stats
    compared = {MATCH, FAULT, REFUSED, MISMATCH}
    return {
        "cases": runner.cases,
        "compared": sum(sum(s.counts[k] for k in compared) for s in stats.values()),
        "explored_policy": sum(s.counts[POLICY] for s in stats.values()),
        "mnemonics": len({s.mnemonic for s in stats.values()}),
        "mnemonics_compared": len(
            {s.mnemonic for s in stats.values() if s.cases > s.counts["noplan"]}
        ),
        "classes": len(stats),
        "mismatches": sum(s.mismatches for s in stats.values()),
        "mismatching_classes": sum(1 for s in stats.values() if s.mismatches),
        "trusted_mismatches": sum(s.mismatches for k, s in stats.items() if k in trusted),
        "trusted_classes_seen": sum(1 for k in stats if k in trusted),
        "masked": sum(s.masked for s in stats.values()),
    }


def print_summary(runner: Runner, trusted: Trusted, out: TextIO, all_rows: bool) -> None:
    rows = summary_rows(runner, trusted)
    shown = rows if all_rows or len(rows) <= 60 else [r for r in rows if r["mismatch"]]
    head = "MNEMONIC             CASES   MATCH  FAULT  MISM MASKED POLICY  TRUSTED"
    print(head, file=out)
    for r in shown:
        print(
            f"{r['mnemonic'][:17]:<18}{r['cases']:>8}{r['match']:>8}{r['fault']:>7}"
            f"{r['mismatch']:>6}{r['masked']:>7}{r['policy']:>7}  {r['trusted']}/{r['classes']}",
            file=out,
        )
    if len(shown) < len(rows):
        hidden = len(rows) - len(shown)
        print(f"({hidden} mnemonics without mismatches not shown; --all shows them)", file=out)
    t = totals(runner, trusted)
    lines = (
        f"{t['cases']} cases: {t['compared']} compared, {t['explored_policy']} with the policy off",
        f"{t['mnemonics_compared']} mnemonics compared, {t['classes']} classes, "
        f"{t['masked']} masked by SDM rules",
        f"{t['mismatches']} mismatches in {t['mismatching_classes']} classes, "
        f"{t['trusted_mismatches']} in trusted classes",
    )
    print("\n".join(lines), file=out)


def print_reproducers(runner: Runner, repro: dict[str, Case], out: TextIO) -> None:
    for key, case in repro.items():
        s = runner.stats[key]
        r = runner.check(case, record=False)
        diffs = r.verdict.diffs if r.verdict is not None else ()
        print(f"\nmismatch in {key}:", file=out)
        print("  " + case.describe().replace("\n", "\n  "), file=out)
        for d in diffs or (
            s.first_mismatch.verdict.diffs if s.first_mismatch and s.first_mismatch.verdict else ()
        ):
            print(f"  {d}", file=out)


def to_json(
    runner: Runner, trusted: Trusted, repro: dict[str, Case], config: dict[str, Any]
) -> dict[str, Any]:
    return {
        "config": config,
        "cpu": {"key": this_cpu().key, "name": this_cpu().name},
        "totals": totals(runner, trusted),
        "classes": {
            k: {**s.to_json(), "trusted": k in trusted} for k, s in sorted(runner.stats.items())
        },
        "reproducers": {k: c.to_json() for k, c in repro.items()},
    }


def update_trust(
    stats: dict[str, ClassStats], table: TrustTable, min_cases: int, campaign: dict[str, Any]
) -> TrustTable:
    """`table` plus what a campaign's `stats` proved on this CPU, and the
    classes it caught mismatching here marked disproved on this CPU.  Classes
    the policy refuses lose every proof (the policy holds on every CPU)."""
    new = TrustTable().merge(table)
    new.min_cases = min_cases
    cpu = this_cpu()
    new.note_cpu(cpu, campaigns=[campaign])
    for key, s in stats.items():
        if s.mismatches and s.first_mismatch is not None and s.first_mismatch.verdict:
            new.disprove(key, cpu, s.first_mismatch.verdict.diffs[0])
        elif s.counts[POLICY] == s.cases:
            new.forget(key)
        elif s.proven >= min_cases:
            new.add_proof(key, cpu, s.proven, s.masked)
    return new


_DIFF = re.compile(r"^(\S+): cpu (.+?) engine (.+)$")


def discrepancy(key: str, runner: Runner, case: Case) -> dict[str, Any]:
    """A reproducer file's content: bytes, state, expected (CPU) versus actual (engine)."""
    r = runner.check(case, record=False)
    diffs = list(r.verdict.diffs) if r.verdict is not None else []
    expected, actual = {}, {}
    for d in diffs:
        m = _DIFF.match(d)
        if m:
            expected[m.group(1)], actual[m.group(1)] = m.group(2), m.group(3)
    plan = analyze(case.code, case.site, trusted_only=False)
    if isinstance(plan, NativeStep):
        status = f"refused by policy: {plan.reason}"
    elif r.kind == MISMATCH:
        status = UNTRUSTED_NOTE
    else:
        status = f"no longer reproduces ({r.kind})"
    return {
        "class": key,
        "bytes": case.code.hex(),
        "status": status,
        "state": case.to_json(),
        "expected": expected,
        "actual": actual,
        "differences": diffs,
    }


def write_discrepancies(runner: Runner, repro: dict[str, Case], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, case in repro.items():
        name = re.sub(r"[^A-Za-z0-9]+", "_", key).strip("_") + ".json"
        path = directory / name
        path.write_text(json.dumps(discrepancy(key, runner, case), indent=1) + "\n")
        written.append(path)
    return written
