"""Binding probe specs to the files a process maps.

A spec names its binary loosely: nothing (the main executable), a path, or a
library name ("libc").  It is checked against a file on disk before the tracee
is touched, so bad input fails early; then, each time a process maps an
executable file, the specs that name that file are resolved in it and give
(file, offset) keys for sites.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from emuprobe.engine.sites import FileKey, Probe
from emuprobe.errors import ProbeError
from emuprobe.spec.probe import ProbeSpec
from emuprobe.sys.elfimage import ElfImage, Resolved
from emuprobe.sys.libraries import (
    find_library_on_disk,
    is_path_spec,
    library_matches,
    program_search_dirs,
)
from emuprobe.sys.maps import Mapping


class ImageCache:
    """One parsed ELF per file: symbol tables are costly to read."""

    def __init__(self) -> None:
        self._by_path: dict[str, ElfImage] = {}

    def open(self, path: str) -> ElfImage:
        image = self._by_path.get(path)
        if image is None:
            image = ElfImage.open(path)
            self._by_path[path] = image
        return image


@dataclass(eq=False)
class Target:
    spec: ProbeSpec
    probe: Probe
    # The file the spec was checked against; for the main executable and for
    # paths it is also the only file that matches.
    checked: ElfImage
    _resolved: dict[FileKey, Resolved] = field(default_factory=dict)

    @property
    def by_library_name(self) -> bool:
        return self.spec.binary is not None and not is_path_spec(self.spec.binary)

    def matches(self, mapping: Mapping) -> bool:
        if (mapping.dev, mapping.inode) == self.checked.identity:
            return True
        return self.by_library_name and library_matches(self.spec.binary or "", mapping.path)

    def resolve_in(self, image: ElfImage) -> Resolved:
        got = self._resolved.get(image.identity)
        if got is None:
            s = self.spec
            address = s.address
            if s.file_offset is not None:  # tracefs names a file offset, as the kernel does
                address = image.offset_to_vaddr(s.file_offset)
            got = image.resolve(s.symbol, s.offset, address)
            self._resolved[image.identity] = got
        return got


def check_targets(
    specs: list[tuple[ProbeSpec, Probe]],
    main_exe: str,
    images: ImageCache,
    mapped: list[Mapping] | None,
) -> list[Target]:
    """Resolve every spec once against a file, raising ProbeError on the first bad one.

    `mapped` is the target's mappings when attaching (a library must then be
    mapped already), or None when spawning (it is looked up on disk).
    """
    locate = _Locator(main_exe, mapped)
    targets = []
    for spec, probe in specs:
        image = images.open(locate.path(spec.binary))
        target = Target(spec, probe, image)
        target.resolve_in(image)
        targets.append(target)
    return targets


class _Locator:
    """Which file each BINARY of a spec names, decided once per BINARY per run:
    a thousand probes in libc search the disk (and read the program's
    RUNPATH) once, not a thousand times."""

    def __init__(self, main_exe: str, mapped: list[Mapping] | None) -> None:
        self.main_exe = main_exe
        self.mapped = mapped
        self._paths: dict[str | None, str] = {}

    def path(self, binary: str | None) -> str:
        found = self._paths.get(binary)
        if found is None:
            found = self._paths[binary] = self._find(binary)
        return found

    def _find(self, binary: str | None) -> str:
        main_exe, mapped = self.main_exe, self.mapped
        if binary is None:
            return main_exe
        if is_path_spec(binary):
            return binary
        if binary == os.path.basename(main_exe):
            return main_exe
        if mapped is not None:
            for m in mapped:
                if m.is_file and library_matches(binary, m.path):
                    return m.path
            raise ProbeError(f"library '{binary}' is not mapped in the target process")
        found = find_library_on_disk(binary, program_search_dirs(main_exe))
        if found is None:
            raise ProbeError(
                f"library '{binary}' not found (searched the program's RUNPATH, "
                "LD_LIBRARY_PATH, the ld.so cache and library directories); give its path"
            )
        return found
