"""Logical probes, physical sites, and the int3s planted in each address space.

A `Probe` is what the user asked for (a name, handlers, counters).  A
`ProbeSite` is a physical place: a file (by device and inode) and an offset in
it, the original bytes, and the execution plan chosen once when it was made.
Several probes on one instruction share one site and one int3 (Delve's
Breakpoint / LogicalBreakpoint split).  An `AddressSpace` records where in one
mm each site is planted; processes that share an mm (vfork) share the object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emuprobe.errors import ProbeError
from emuprobe.sys.memory import PlantedBytes, ProcessMemory

INT3 = b"\xcc"

FileKey = tuple[tuple[int, int], int]  # ((major, minor), inode)


@dataclass(eq=False)
class Probe:
    """One user probe.  Counters are per probe; a site's hit counts for each probe on it."""

    name: str
    spec_text: str
    handlers: list[Callable[[Any], None]] = field(default_factory=list)
    internal: bool = False  # emuprobe's own (the dynamic-linker rendezvous): never reported
    hits: int = 0
    emulated: int = 0
    native_fallback: int = 0
    handler_errors: int = 0
    returns: int | None = None  # a %return probe: returns seen (`hits` counts its entries)


@dataclass(eq=False)
class ProbeSite:
    file: FileKey
    file_offset: int
    path: str
    vaddr: int  # ELF vaddr, for messages
    code: bytes  # original bytes from the file, at least the whole instruction
    plan: Any  # x86.decode.Plan; typed loosely so this layer does not import the emulator
    probes: list[Probe] = field(default_factory=list)
    hits: int = 0
    emulated: int = 0
    native_fallback: int = 0

    @property
    def length(self) -> int:
        return int(self.plan.length)

    @property
    def internal(self) -> bool:
        return all(p.internal for p in self.probes)


class SiteTable:
    """All physical sites, keyed by (file, offset): a site exists once per file."""

    def __init__(self) -> None:
        self._sites: dict[tuple[FileKey, int], ProbeSite] = {}

    def get(self, file: FileKey, file_offset: int) -> ProbeSite | None:
        return self._sites.get((file, file_offset))

    def add(self, site: ProbeSite) -> ProbeSite:
        return self._sites.setdefault((site.file, site.file_offset), site)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._sites.values())


class AddressSpace:
    """One mm: its memory, and the address at which each site is planted in it."""

    def __init__(self, memory: ProcessMemory) -> None:
        self.memory = memory
        self.planted: dict[int, ProbeSite] = {}
        self.users = 1  # processes sharing this mm (vfork)

    def plant(self, site: ProbeSite, addr: int) -> bool:
        """Write the int3 for `site` at `addr`; False if it was already there.

        The bytes in memory must equal the file's, so we never save (and later
        "restore") someone else's breakpoint or a relocated instruction.
        """
        if addr in self.planted:
            return False
        n = site.length
        try:
            current = self.memory.read(addr, n)
        except OSError as e:
            raise ProbeError(f"{site.path}:{site.vaddr:#x}: cannot read tracee memory: {e}") from e
        if current != site.code[:n]:
            raise ProbeError(
                f"{site.path}:{site.vaddr:#x}: memory differs from the file "
                f"({current.hex()} != {site.code[:n].hex()}); another tracer's breakpoint?"
            )
        self.memory.write(addr, INT3)
        self.planted[addr] = site
        self.memory.planted[addr] = site.code[:n]
        return True

    def unplant(self, addr: int) -> bool:
        """Forget the site at `addr` and put its original byte back, if the
        byte is still ours: our 0xcc, in a mapping of the site's file at the
        site's offset.  Otherwise (the file was unmapped and something else
        mapped there, the program rewrote the byte) nothing is written.
        True if the byte was restored."""
        site = self.planted.pop(addr)
        self.memory.planted.pop(addr, None)
        if not self._ours(addr, site):
            return False
        self.memory.write(addr, site.code[:1])
        return True

    def unplant_all(self) -> list[tuple[int, ProbeSite]]:
        """Unplant every site; the ones where the file was still mapped but
        our 0xcc was gone (the program wrote over it)."""
        try:
            self.memory.refresh()  # one fresh look at the maps for every check below
        except OSError:
            self.planted.clear()  # the mm is gone: nothing left to restore
            self.memory.planted.clear()
            return []
        overwritten = []
        for addr, site in list(self.planted.items()):
            try:
                if not self.unplant(addr) and self._maps_hold(addr, site):
                    overwritten.append((addr, site))
            except OSError:
                pass  # the mm is gone: nothing left to restore
        return overwritten

    def restore_byte(self, addr: int) -> bool:
        """Put the original byte back without forgetting the site (native
        step), if our 0xcc is still there; False if it is not."""
        if self.memory.read(addr, 1) != INT3:
            return False
        self.memory.write(addr, self.planted[addr].code[:1])
        return True

    def replant_byte(self, addr: int) -> None:
        """The int3 again after a native step, where the original byte still is."""
        if self.memory.read(addr, 1) == self.planted[addr].code[:1]:
            self.memory.write(addr, INT3)

    def forget_gone(self) -> list[int]:
        """Forget, without writing, the sites whose address no longer holds
        their file at their offset (munmap, dlclose, a new mapping there).
        Uses the cached maps: refresh them first.  The forgotten addresses."""
        gone = [a for a, site in self.planted.items() if not self._maps_hold(a, site)]
        for addr in gone:
            del self.planted[addr]
            self.memory.planted.pop(addr, None)
        return gone

    def _maps_hold(self, addr: int, site: ProbeSite) -> bool:
        m = self.memory.maps().find(addr)
        return (m is not None and (m.dev, m.inode) == site.file
                and m.file_offset_to_addr(site.file_offset) == addr)  # fmt: skip

    def _ours(self, addr: int, site: ProbeSite) -> bool:
        if not self._maps_hold(addr, site):
            return False
        try:
            return self.memory.read(addr, 1) == INT3
        except OSError:
            return False

    def fork_copy(self, child_memory: ProcessMemory) -> AddressSpace:
        """The child's mm after fork: a copy of ours, int3s included."""
        child = AddressSpace(child_memory)
        child.planted = dict(self.planted)
        child_memory.planted = PlantedBytes(self.memory.planted)
        return child
