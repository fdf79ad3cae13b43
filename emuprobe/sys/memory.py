"""Reading and writing a tracee's memory through /proc/PID/mem."""

from __future__ import annotations

import os
from typing import Any

from emuprobe.sys.maps import Mapping, MapsIndex, read_maps


class PlantedBytes(dict[int, bytes]):
    """address -> the bytes our int3 there displaced.  Every change bumps
    `version`, so that a copy kept elsewhere (the compiled emulator's) knows
    when it is stale."""

    version = 0

    def __setitem__(self, addr: int, orig: bytes) -> None:
        super().__setitem__(addr, orig)
        self.version += 1

    def pop(self, addr: int, *default: Any) -> Any:  # type: ignore[override]
        self.version += 1
        return super().pop(addr, *default)

    def __delitem__(self, addr: int) -> None:
        super().__delitem__(addr)
        self.version += 1

    def clear(self) -> None:
        super().clear()
        self.version += 1


class ProcessMemory:
    """One address space, seen through /proc/PID/mem.

    The fd stays open for the life of the address space: opening it costs more
    than a hit.  `planted` maps each address that currently holds our int3 to
    the original bytes it displaced; its owner (the site table) keeps it right,
    and the emulator uses it to show an instruction the memory as the program
    wrote it rather than with our int3 bytes in it.

    Note that /proc/PID/mem writes ignore page protections (FOLL_FORCE): callers
    that emulate a store must check `region(addr).prot` first.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        self.planted = PlantedBytes()
        self._maps: MapsIndex | None = None
        # the compiled emulator's view of this address space (exec/cmachine.py),
        # told of every new maps snapshot
        self.machine_state: Any = None

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        self.machine_state = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, addr: int, size: int) -> bytes:
        """`size` bytes at `addr`; OSError (EIO) if any of it is unmapped."""
        data = os.pread(self._fd, size, addr)
        if len(data) != size:
            raise OSError(5, f"short read at {addr:#x}")
        return data

    def write(self, addr: int, data: bytes) -> None:
        n = os.pwrite(self._fd, data, addr)
        if n != len(data):
            raise OSError(5, f"short write at {addr:#x}")

    def maps(self) -> MapsIndex:
        if self._maps is None:
            self._maps = MapsIndex(read_maps(self.pid))
            if self.machine_state is not None:  # keep the compiled emulator's copy current
                self.machine_state.maps_changed(self._maps)
        return self._maps

    def refresh(self) -> MapsIndex:
        """Forget the cached maps (after mmap/munmap/exec may have changed them)."""
        self._maps = None
        return self.maps()

    def region(self, addr: int) -> Mapping | None:
        """The mapping holding `addr`, re-reading maps once if it is not cached."""
        m = self.maps().find(addr)
        if m is None:
            m = self.refresh().find(addr)
        return m

    def original_bytes_in(self, start: int, end: int) -> list[tuple[int, bytes]]:
        """Planted sites' saved bytes that fall in [start, end)."""
        return [(a, b) for a, b in self.planted.items() if start <= a < end]
