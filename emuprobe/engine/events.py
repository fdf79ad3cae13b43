"""What a probe handler receives at each hit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from emuprobe.engine.sites import Probe
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.ptrace import UserRegs


class Registers:
    """Read-only view of the tracee's registers at the hit (before the displaced
    instruction runs).  Valid only during the handler call."""

    __slots__ = ("_regs",)

    def __init__(self, regs: UserRegs) -> None:
        self._regs = regs

    def __getattr__(self, name: str) -> int:
        return int(getattr(self._regs, name))

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self._regs, name)) for name, _ in self._regs._fields_}


@dataclass(frozen=True)
class ProbeEvent:
    probe: Probe
    pid: int
    tid: int
    comm: str
    timestamp_ns: int  # CLOCK_MONOTONIC, as perf's default clock
    address: int  # run-time address of the probed instruction
    regs: Registers
    _memory: Any

    def for_probe(self, probe: Probe) -> ProbeEvent:
        """The same hit, as another probe on the same site sees it."""
        return dataclasses.replace(self, probe=probe)

    def read_memory(self, addr: int, size: int) -> bytes:
        """`size` bytes of the tracee's memory (OSError if unmapped)."""
        mem: ProcessMemory = self._memory
        data = mem.read(addr, size)
        # Show the program's bytes, not our int3s, as a debugger does.
        for at, orig in mem.original_bytes_in(addr - 15, addr + size):
            for i, b in enumerate(orig[:1]):
                if addr <= at + i < addr + size:
                    data = data[: at + i - addr] + bytes([b]) + data[at + i - addr + 1 :]
        return data
