"""One event of the merged stream, whatever produced it, and its one-line text form."""

from __future__ import annotations

import os
from dataclasses import dataclass

from emuprobe.output import perf_header

KINDS = ("probe", "return", "kernel")


@dataclass(frozen=True)
class Frame:
    """One frame of a user call chain, symbolized as perf script shows it."""

    address: int
    symbol: str  # "fib+0x1b", or "[unknown]"
    library: str  # the mapped file's path, or "[unknown]"

    @property
    def function(self) -> str:
        """The symbol without its +offset (what flame graphs group by); an
        unknown one is `[library]`, as stackcollapse-perf.pl names it."""
        if self.symbol == "[unknown]" and self.library != "[unknown]":
            return f"[{os.path.basename(self.library)}]"
        return self.symbol.split("+0x", 1)[0]


@dataclass(frozen=True)
class Record:
    ts: int  # ns, CLOCK_MONOTONIC
    pid: int
    tid: int
    comm: str
    kind: str  # one of KINDS
    name: str  # the probe's event name, or the tracepoint "sys:name"
    args: tuple[tuple[str, int | str | None], ...]  # fetched values, in order
    args_text: str  # the same, printed as the kernel's trace output prints them
    address: int = 0  # probe: the probed address; return: the return site
    func: int = 0  # return: the function's entry address
    latency_ns: int | None = None  # return: time since the matching entry
    stack: tuple[Frame, ...] = ()  # innermost first
    cpu: int = -1  # kernel events: the CPU it happened on

    @property
    def entry_ts(self) -> int:
        return self.ts - (self.latency_ns or 0)

    def line(self, pad: bool = True) -> str:
        """`COMM PID/TID SEC.USEC: NAME: (ADDR) ARGS`, as perf script / tracefs print."""
        if self.kind == "probe":
            where = f" ({self.address:#x})"
        elif self.kind == "return":
            where = f" ({self.address:#x} <- {self.func:#x})"
        else:
            where = ""
        args = f" {self.args_text}" if self.args_text else ""
        head = perf_header(self.comm, self.pid, self.tid, self.ts, pad)
        return f"{head} {self.name}:{where}{args}"

    def stack_lines(self) -> list[str]:
        """perf script -g frame lines: `\\t    ADDR SYMBOL (LIBRARY)`."""
        return [f"\t{f.address:>16x} {f.symbol} ({f.library})" for f in self.stack]
