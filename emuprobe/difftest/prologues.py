"""The instructions real probes displace: the first few of every function.

Function starts come from the symbol tables and, for stripped programs such
as /bin/ls, from the .eh_frame_hdr search table, which lists the start of
every function that has unwind information (nearly all compiled code).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from emuprobe.disasm import CS

PROLOGUE_LENGTH = 6  # instructions per function, as the trust table's coverage is quoted
_DW_EH_PE_DATAREL_SDATA4 = 0x3B  # the table encoding every GNU linker writes


def _eh_frame_starts(elf: ELFFile) -> set[int]:
    hdr = elf.get_section_by_name(".eh_frame_hdr")
    if hdr is None:
        return set()
    data, base = hdr.data(), hdr["sh_addr"]
    if len(data) < 12 or data[0] != 1 or data[3] != _DW_EH_PE_DATAREL_SDATA4:
        return set()
    if data[1] & 0x0F not in (0x03, 0x0B) or data[2] & 0x0F not in (0x03, 0x0B):
        return set()  # eh_frame_ptr / fde_count not 4-byte: an encoding we do not read
    (count,) = struct.unpack_from("<I", data, 8)
    count = min(count, (len(data) - 12) // 8)
    return {base + loc for loc, _fde in struct.iter_unpack("<ii", data[12 : 12 + 8 * count])}


def function_starts(elf: ELFFile) -> set[int]:
    """ELF addresses where functions start: STT_FUNC symbols and FDE starts."""
    out = _eh_frame_starts(elf)
    for name in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(name)
        if sec is None:
            continue
        for sym in sec.iter_symbols():  # type: ignore[attr-defined]
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]:
                out.add(sym["st_value"])
    return out


def text_section(path: str) -> tuple[bytes, int, ELFFile] | None:
    """The bytes and address of `path`'s .text, and the open ELF (None if unreadable)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - pyelftools reads lazily; kept for the process
        elf = ELFFile(f)
    except (OSError, ELFError):
        return None
    text = elf.get_section_by_name(".text")
    if text is None:
        return None
    return text.data(), text["sh_addr"], elf


def prologue_encodings(paths: list[str], length: int = PROLOGUE_LENGTH) -> list[bytes]:
    """The first `length` instructions of every function in `paths` (an
    instruction as often as functions start with it)."""
    seen: list[bytes] = []
    for path in paths:
        found = text_section(path)
        if found is None:
            continue
        data, base, elf = found
        for start in sorted(function_starts(elf)):
            off = start - base
            if not 0 <= off < len(data):
                continue
            for i, (_a, size, _m, _o) in enumerate(CS.disasm_lite(data[off : off + 96], start)):
                if i >= length:
                    break
                at = off + _a - start
                seen.append(bytes(data[at : at + size]))
    return seen


def libc_path() -> str | None:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        p = Path(d) / "libc.so.6"
        if p.exists():
            return str(p)
    return None


def default_programs() -> list[str]:
    """libc, python3 and ls as installed here (python3 the system's, not a
    shim that PATH may find first, e.g. pyenv's bash script)."""
    out = [libc_path()]
    for candidate in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if candidate and os.path.exists(candidate) and _is_elf(candidate):
            out.append(os.path.realpath(candidate))
            break
    out.append(shutil.which("ls") or "/bin/ls")
    return [p for p in dict.fromkeys(out) if p and os.path.exists(p)]


def _is_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
