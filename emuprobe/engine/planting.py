"""Where the int3s go: every target's site in each address space that maps its
file, and the dynamic linker's rendezvous (which tells us of dlopen/dlclose).

A site exists once per (file, offset), whatever the number of processes
mapping the file; each address space records where it planted it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.sites import AddressSpace, Probe, ProbeSite, SiteTable
from emuprobe.engine.targets import ImageCache, Target
from emuprobe.engine.tracee import Process
from emuprobe.errors import ProbeError
from emuprobe.sys.elfimage import ElfImage
from emuprobe.x86.decode import analyze

# The dynamic linker calls this empty function whenever its list of loaded
# objects changes (r_debug.r_brk); debuggers break on it to see dlopen.
RENDEZVOUS_SYMBOL = "_dl_debug_state"


class Planter:
    def __init__(
        self,
        hot: HotLoop | None,
        warn_once: Callable[[str], None],
        on_rendezvous: Callable[[ProbeEvent], None],
    ) -> None:
        self.sites = SiteTable()
        self.images = ImageCache()
        self.targets: list[Target] = []
        self._hot = hot
        self._warn_once = warn_once
        self._rendezvous = Probe("rendezvous", RENDEZVOUS_SYMBOL, internal=True)
        self._rendezvous.handlers.append(on_rendezvous)

    def plant_all(self, proc: Process, strict: bool = False) -> None:
        """Plant the sites of every probe whose file `proc` maps.

        strict: a failure is the user's error (raised before the tracee runs);
        otherwise it is a warning and that probe is skipped in this process.
        """
        aspace = proc.aspace
        maps = aspace.memory.refresh()
        for addr in aspace.forget_gone():  # dlclose, munmap: the file left that address
            if self._hot is not None:
                self._hot.drop(aspace, addr)
        for m in maps.mappings:
            if not (m.is_file and m.executable):
                continue
            for target in self.targets:
                if target.matches(m):
                    self._plant_target(aspace, target, m, strict)
            if os.path.basename(m.path).startswith("ld-"):
                self._plant_rendezvous(aspace, m)

    def site(self, image: ElfImage, vaddr: int, file_offset: int, probe: Probe) -> ProbeSite:
        """The site at `file_offset` of `image` (made on first use), with `probe` on it."""
        site = self.sites.get(image.identity, file_offset)
        if site is None:
            code = image.read(vaddr, 16)
            plan = analyze(code, vaddr)
            site = self.sites.add(
                ProbeSite(image.identity, file_offset, image.path, vaddr, code, plan)
            )
        self.add_probe(site, probe)
        return site

    def add_probe(self, site: ProbeSite, probe: Probe) -> None:
        """`probe` fires at `site` from now on.  A probe with handlers joining a
        site the compiled loop already handles takes it back to Python (return
        probes share a user probe's int3 while the program runs)."""
        if probe in site.probes:
            return
        site.probes.append(probe)
        if probe.handlers and self._hot is not None:
            self._hot.withdraw(site)

    def _plant_target(self, aspace: AddressSpace, target: Target, m: Any, strict: bool) -> None:
        try:
            image = target.checked if (m.dev, m.inode) == target.checked.identity else None
            image = image or self.images.open(m.path)
            resolved = target.resolve_in(image)
            addr = m.file_offset_to_addr(resolved.file_offset)
            if addr is None:
                return
            aspace.plant(self.site(image, resolved.vaddr, resolved.file_offset, target.probe), addr)
        except ProbeError as e:
            if strict:
                raise
            self._warn_once(f"probe '{target.probe.name}' not planted in {m.path}: {e}")

    def _plant_rendezvous(self, aspace: AddressSpace, m: Any) -> None:
        try:
            image = self.images.open(m.path)
            r = image.resolve(RENDEZVOUS_SYMBOL)
        except ProbeError:
            return  # not a glibc-style dynamic linker: no dlopen tracking
        addr = m.file_offset_to_addr(r.file_offset)
        if addr is not None:
            try:
                aspace.plant(self.site(image, r.vaddr, r.file_offset, self._rendezvous), addr)
            except ProbeError as e:
                self._warn_once(f"dlopen tracking disabled: {e}")
