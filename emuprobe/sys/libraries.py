"""Which mapped file a library spec such as "libc", "libm.so.6" or a path means."""

from __future__ import annotations

import functools
import os
import re
import subprocess

# ldconfig by absolute path only: as root, a name looked up on PATH would run
# whatever a writable directory early on PATH holds.
_LDCONFIG = ("/sbin/ldconfig", "/usr/sbin/ldconfig")
_LIB_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/usr/local/lib",
)
_EM_X86_64 = 62
_DELETED = " (deleted)"


def is_path_spec(spec: str) -> bool:
    """A spec with a slash names a file; without one it names a library."""
    return "/" in spec


def library_matches(spec: str, mapped_path: str) -> bool:
    """Whether the file mapped at `mapped_path` is the library `spec` names.

    "libc" matches libc.so.6 and libc-2.31.so, never libcap.so.2 or
    libc_malloc_debug.so.0: the name must end where ".so" or "-VERSION" begins.
    "libm.so.6" matches that basename (or a longer version of it). A path spec
    matches the same file under any name.
    """
    if mapped_path.endswith(_DELETED):
        mapped_path = mapped_path[: -len(_DELETED)]
    if is_path_spec(spec):
        try:
            return os.path.samefile(spec, mapped_path)
        except OSError:
            # Gone or unreadable: fall back to comparing names.
            return os.path.realpath(spec) == os.path.realpath(mapped_path)
    return _name_pattern(spec).match(os.path.basename(mapped_path)) is not None


@functools.lru_cache(maxsize=128)
def _name_pattern(spec: str) -> re.Pattern[str]:
    name = re.escape(spec)
    if ".so" in spec:
        # "libm.so.6" is that file; "libfoo.so" also means libfoo.so.1.2.
        return re.compile(rf"{name}(?:\.[0-9][0-9.]*)?$")
    return re.compile(rf"{name}(?:\.so(?:\.[0-9][0-9.]*)?|-[0-9][0-9.]*\.so(?:\.[0-9.]*)?)$")


def program_search_dirs(exe: str) -> list[str]:
    """Directories the dynamic linker searches first for `exe`'s libraries.

    LD_LIBRARY_PATH (the command inherits our environment), then the
    program's DT_RPATH/DT_RUNPATH with $ORIGIN expanded.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    origin = os.path.dirname(os.path.realpath(exe))
    try:
        with open(exe, "rb") as f:
            for section in ELFFile(f).iter_sections():
                if not isinstance(section, DynamicSection):
                    continue
                for tag in section.iter_tags():
                    attr = {"DT_RPATH": "rpath", "DT_RUNPATH": "runpath"}.get(tag.entry.d_tag)
                    if attr:
                        path = getattr(tag, attr)
                        for d in path.split(":"):
                            dirs.append(d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin))
    except (OSError, ELFError):
        pass
    return dirs


def find_library_on_disk(spec: str, search_dirs: list[str] | None = None) -> str | None:
    """The realpath of the x86-64 library `spec` would load, or None.

    This validates a probe before the program has mapped the library, so it
    follows the dynamic linker's order: `search_dirs` (see
    program_search_dirs), its cache, then the usual directories.
    """
    if is_path_spec(spec):
        return os.path.realpath(spec) if _is_x86_64_elf(spec) else None
    found = _search(spec, search_dirs or ())
    if found:
        return found
    cached = [
        (path, x86) for soname, x86, path in _ldconfig_cache() if library_matches(spec, soname)
    ]
    # Prefer the x86-64 entry: the cache also lists i386/x32 builds of a soname.
    for path, _x86 in sorted(cached, key=lambda e: not e[1]):
        if _is_x86_64_elf(path):
            return os.path.realpath(path)
    return _search(spec, _LIB_DIRS)


def _search(spec: str, dirs: tuple[str, ...] | list[str]) -> str | None:
    for directory in dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        # Shortest first ("libc.so.6" before "libc.so.6.bak"); "libc.so" itself is
        # usually a linker script, which the ELF check skips.
        for name in sorted(names, key=lambda n: (len(n), n)):
            path = os.path.join(directory, name)
            if library_matches(spec, path) and _is_x86_64_elf(path):
                return os.path.realpath(path)
    return None


@functools.lru_cache(maxsize=1)
def _ldconfig_cache() -> tuple[tuple[str, bool, str], ...]:
    """(soname, is_x86_64, path) for each entry of `ldconfig -p`, in its order."""
    for exe in _LDCONFIG:
        try:
            out = subprocess.run(
                [exe, "-p"], capture_output=True, text=True, timeout=10, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        return tuple(_parse_ldconfig(out))
    return ()


def _parse_ldconfig(text: str) -> list[tuple[str, bool, str]]:
    # "\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6"
    entries = []
    for line in text.splitlines():
        m = re.match(r"\s+(\S+) \(([^)]*)\) => (.+)$", line)
        if m:
            entries.append((m.group(1), "x86-64" in m.group(2), m.group(3).strip()))
    return entries


def _is_x86_64_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    # ELF magic, ELFCLASS64, then e_machine (little-endian) at offset 18.
    return (
        len(head) == 20
        and head[:4] == b"\x7fELF"
        and head[4] == 2
        and int.from_bytes(head[18:20], "little") == _EM_X86_64
    )
