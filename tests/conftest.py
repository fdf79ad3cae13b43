"""Shared test helpers: run emuprobe as a user would, and clean up every process."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

EMUPROBE = [sys.executable, "-m", "emuprobe"]

# The user's own trust table (what `emuprobe difftest --prove` wrote in
# ~/.cache) must not decide what the tests see: every emuprobe in this
# session, in-process or spawned, reads its local table from here instead.
_CACHE = tempfile.mkdtemp(prefix="emuprobe-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)

# Classes the tests rely on being emulated (prologues as compilers emit them,
# and the first instructions of the firstinsn fixture): if this CPU has no
# proof for one of them, the session proves this CPU first, as a user would.
CORE_CODES = (
    "55", "4889e5", "4883ec18", "f30f1efa", "e800010000", "e900010000", "c3", "488b05d0ff0000",
    "48897c2408", "0f2807", "7410", "4889f8", "4801d8", "f20f58c1",
    "660f6f05d0ff0000", "64488b042528000000", "488b3f",
    # the prefixed forms real binaries contain (test_prefixed.EMULATED_FORMS)
    "f3c3", "f2c3", "f2e900010000", "f2e800010000", "3effe0", "2e7410", "3e7510", "f390",
    "6690", "660f1f440000", "662e0f1f840000000000", "66662e0f1f840000000000", "0f1f4000",
)  # fmt: skip


def _cpu_lacks_core_proofs() -> list[str]:
    from emuprobe.disasm import decode
    from emuprobe.x86 import trust
    from emuprobe.x86.classkey import class_key

    trust.clear_caches()
    keys = {class_key(decode(bytes.fromhex(h), 0x1000)) for h in CORE_CODES}
    return sorted(keys - trust.trusted_here())


@pytest.fixture(scope="session", autouse=True)
def cpu_proven() -> None:
    """Prove this CPU (`emuprobe difftest --prove`, into the session's cache)
    when the packaged table does not cover the classes the tests need here:
    trust is per CPU, and a test must not depend on which CPU it runs on."""
    missing = _cpu_lacks_core_proofs()
    if not missing:
        return
    done = subprocess.run([*EMUPROBE, "difftest", "--prove"], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    still = _cpu_lacks_core_proofs()
    assert not still, f"--prove left core classes untrusted on this CPU: {still}"


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


# -- observable process state, for tests that must wait for a process to get
# somewhere (they poll these with wait_for; none of them sleeps a fixed time)

SYS_PAUSE = 34  # x86-64


def proc_state(pid: int) -> str:
    """The state letter in /proc/PID/stat (R, S, t, T, Z...); "X" once it is gone."""
    from emuprobe.sys.tasks import thread_state

    return thread_state(pid) or "X"


def catches(pid: int, *signals: int) -> bool:
    """Whether the process has a handler installed for every one of `signals` (SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    except (OSError, StopIteration):
        return False
    return all(mask >> (s - 1) & 1 for s in signals)


def cpu_ns(pid: int) -> int:
    """CPU time the process's main thread has run, user and system, in ns (/proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def blocked_in(pid: int, nr: int) -> bool:
    """Whether the process's main thread is blocked in system call `nr` (/proc/PID/syscall)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == str(nr)
    except (OSError, IndexError):
        return False


def wait_looping(pid: int, exe: Path | None = None, timeout: float = 30.0) -> bool:
    """Wait until the loop fixture (fixtures/loop.c) runs its loop: it has
    installed its SIGTERM and SIGINT handlers, the last thing main does before
    the loop (so a signal now makes it print its line), and has run 1 ms of
    CPU since.  With `exe`, /proc/PID/exe must be that file (not the parent
    Python between fork and exec).  False if it died or the deadline passed."""

    def gone() -> bool:
        return proc_state(pid) in "ZX"

    def in_main() -> bool:
        if exe is not None:
            try:
                if os.readlink(f"/proc/{pid}/exe") != str(exe):
                    return False
            except OSError:
                return False
        return catches(pid, signal.SIGTERM, signal.SIGINT)

    if not wait_for(lambda: gone() or in_main(), timeout) or gone():
        return False
    try:
        start = cpu_ns(pid)
        return wait_for(lambda: gone() or cpu_ns(pid) >= start + 1_000_000, timeout) and not gone()
    except OSError:
        return False
