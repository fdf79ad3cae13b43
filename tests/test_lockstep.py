"""Lockstep: a real program single-stepped, each instruction also taken through
the engine's per-hit path from the state before it and compared with the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emuprobe.difftest.lockstep import Lockstep
from emuprobe.exec import cmachine, machine
from emuprobe.x86.regs import CF, EMULATED_FLAGS

REPO = Path(__file__).resolve().parent.parent
TRUE = "/bin/true"


def test_lockstep_over_true_finds_no_mismatch() -> None:
    ls = Lockstep([TRUE])
    pid = ls.pid
    rep = ls.run()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert rep.exit_status == 0
    compared = sum(rep.compared.values())
    assert rep.steps > 50_000 and compared > rep.steps // 2
    assert len(rep.compared) >= 30  # mnemonics
    assert not rep.mismatched, rep.examples
    assert rep.skipped["syscall"] > 0  # policy-refused instructions are stepped, not compared


def test_lockstep_every_k_compares_a_sample() -> None:
    rep = Lockstep([TRUE], every=7).run()
    compared = sum(rep.compared.values())
    skipped = sum(rep.skipped.values())
    assert rep.exit_status == 0 and not rep.mismatched
    assert compared + skipped <= rep.steps // 7 + 2  # only every 7th step is even considered
    assert compared > rep.steps // 20


def test_lockstep_catches_cf_dropped_on_write_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # both machines take the flags they transfer from here (cmachine puts them in each plan)
    monkeypatch.setattr(machine, "EMULATED_FLAGS", EMULATED_FLAGS & ~CF)
    monkeypatch.setattr(cmachine, "EMULATED_FLAGS", EMULATED_FLAGS & ~CF)
    rep = Lockstep([TRUE], every=3).run()
    assert rep.mismatched, "a dropped CF went unnoticed"
    assert any(d.startswith("eflags") for diffs in rep.examples.values() for d in diffs)


def test_lockstep_cli() -> None:
    cmd = [sys.executable, "-m", "emuprobe", "difftest", "--lockstep", "--every", "5", "--", TRUE]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["MNEMONIC", "COMPARED", "MISMATCHES"]
    assert "0 mismatches" in lines[-1] and "exit status 0" in lines[-1]


def test_lockstep_needs_a_command() -> None:
    cmd = [sys.executable, "-m", "emuprobe", "difftest", "--lockstep"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 2 and "needs a command" in done.stderr


def test_lockstep_across_exec_compares_no_half_finished_execve() -> None:
    """The step after an exec event only finishes the execve and stops on the
    new entry point: comparing it showed a false mismatch (rax -ENOSYS)."""
    rep = Lockstep(["sh", "-c", "exec /bin/true"], every=1).run()
    assert rep.exit_status == 0
    assert not rep.mismatched, rep.examples
    assert sum(rep.compared.values()) > 100_000
