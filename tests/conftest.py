"""Shared test helpers: run emuprobe as a user would, and clean up every process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

EMUPROBE = [sys.executable, "-m", "emuprobe"]


@dataclass
class Traced:
    status: int
    stdout: str
    stderr: str
    events: list[str]
    stats: dict


def run_traced(
    tmp_path: Path, probes: list[str], argv: list[str], *opts: str, timeout: float = 240
) -> Traced:
    """`emuprobe trace` a command to completion; events and stats come from files."""
    events, stats = tmp_path / "events.txt", tmp_path / "stats.json"
    cmd = [*EMUPROBE, "trace", "-o", str(events), "--stats-json", str(stats), *opts, *probes]
    cmd += ["--", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = events.read_text().splitlines() if events.exists() else []
    data = json.loads(stats.read_text()) if stats.exists() else {}
    return Traced(done.returncode, done.stdout, done.stderr, lines, data)


def hits(t: Traced) -> dict[str, int]:
    return {name: p["hits"] for name, p in t.stats.get("probes", {}).items()}


class Procs:
    """Processes a test starts; all are killed by PID at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        p = subprocess.Popen(argv, **kw)
        self.started.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.kill_all()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []
