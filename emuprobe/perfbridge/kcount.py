"""Kernel uprobes on the same probes, counted with perf events: the kernel baseline.

    with KernelCount(path, {"h_push": offset}) as k:
        run = k.run(["./hot", "push", "100000"])     # perf stat -e GROUP:h_push -- ...
    run.counts == {"h_push": 100000}; run.seconds is the wall time under perf

The events are registered in tracefs (kernel.KernelUprobes) but not enabled
there: `perf stat` enables them for the command alone, so other processes
that map the same file are not probed, and the counts are exact per run.
Every event is removed on leaving the block (also on an exception).
Unavailable (not root, no tracefs, no perf): `unavailable()` says why.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from types import TracebackType

from emuprobe.perfbridge import kernel


@dataclass(frozen=True)
class CountedRun:
    counts: dict[str, int]  # event name -> hits
    seconds: float  # wall time of `perf stat -- argv`
    returncode: int
    stdout: str


def unavailable() -> str:
    """Why the kernel baseline cannot run here, or "" if it can."""
    ok, why = kernel.available()
    if not ok:
        return why
    if perf_path() is None:
        return "perf is not installed"
    return ""


def perf_path() -> str | None:
    """perf by absolute path: as root, never whatever PATH finds first."""
    return next((p for p in ("/usr/bin/perf", "/usr/sbin/perf", "/usr/local/bin/perf")
                 if os.path.exists(p)), None)  # fmt: skip


class KernelCount:
    """Kernel uprobes at `offsets` (event name -> file offset) in the file `path`."""

    def __init__(self, path: str, offsets: dict[str, int], group: str | None = None) -> None:
        self.path = path
        self.offsets = dict(offsets)
        self.probes = kernel.KernelUprobes(group)
        self._events: list[str] = []

    def __enter__(self) -> KernelCount:
        try:
            for name, off in self.offsets.items():
                self.probes.add(self.path, off, name=name)
                self._events.append(f"{self.probes.group}:{name}")
        except BaseException:
            self.probes.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.probes.remove()

    def argv(self, argv: list[str]) -> list[str]:
        """The perf stat command line that counts our events in `argv` alone."""
        cmd = [perf_path() or "/usr/bin/perf", "stat", "-x", ",", "--no-big-num"]
        for e in self._events:
            cmd += ["-e", e]
        return [*cmd, "--", *argv]

    def run(self, argv: list[str], timeout: float = 600) -> CountedRun:
        t0 = time.perf_counter()
        done = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - t0
        return CountedRun(parse_counts(done.stderr), seconds, done.returncode, done.stdout)


def parse_counts(perf_stderr: str) -> dict[str, int]:
    """Event name -> count from `perf stat -x ,` output ("<not counted>" gives no entry)."""
    counts: dict[str, int] = {}
    for line in perf_stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and ":" in fields[2] and fields[0].isdigit():
            counts[fields[2].split(":", 1)[1]] = int(fields[0])
    return counts
