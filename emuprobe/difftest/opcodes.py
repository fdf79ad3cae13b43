"""Opcode maps for the generator: which opcode bytes exist in each map.

Built once from capstone by trying every opcode of a map with a few ModRM
bytes, so the generator spends its draws on opcodes that exist (an
instruction is still filtered through capstone after its ModRM, SIB,
displacement and immediate are drawn).  Maps: the legacy 1-byte map, 0F,
0F38 and 0F3A (each with its mandatory prefixes: none, 66, F3, F2), and
VEX-128 (C4 with mmmmm 1-3, every pp and W).
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import capstone
from elftools.elf.elffile import ELFFile

# An opcode template: the bytes before ModRM, with any mandatory prefix first.
Template = bytes

LEGACY_PREFIXES = (0x66, 0xF2, 0xF3, 0x64, 0x65, 0xF0)  # + REX, drawn separately
_NOT_OPCODES = frozenset({0x0F, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3,
                          0xC4, 0xC5, 0x62, *range(0x40, 0x50)})  # fmt: skip
_MODRMS = (0xC1, 0x07, 0x44, 0x84, 0xD0, 0xF8, 0x05)
_TAIL = bytes(range(0x11, 0x11 + 12))
MANDATORY = (b"", b"\x66", b"\xf3", b"\xf2")
# Function entries as compilers emit them, whatever this machine's libc was
# built with (CET's endbr64 included): the instructions probes displace most.
PROLOGUES = (
    "f30f1efa", "f30f1efb", "55", "4155", "4156", "4157", "53", "4889e5", "4883ec18",
    "4881ec88000000", "31c0", "4885ff", "85ff", "488b05d0ff0000", "48897c2408", "c3",
    "e800010000", "e900010000", "f3c3", "0f1f4000", "660f1f440000",
)  # fmt: skip

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def _decodes(template: bytes) -> bool:
    for modrm in _MODRMS:
        raw = template + bytes([modrm]) + _TAIL
        insn = next(_cs.disasm(raw, 0x1000, 1), None)
        if insn is not None and insn.size > len(template) - 1:
            return True
    return False


@cache
def opcode_maps() -> dict[str, tuple[Template, ...]]:
    maps: dict[str, list[Template]] = {"1byte": [], "0f": [], "0f38": [], "0f3a": [], "vex128": []}
    for op in range(256):
        if op not in _NOT_OPCODES and _decodes(bytes([op])):
            maps["1byte"].append(bytes([op]))
    for name, esc in (("0f", b"\x0f"), ("0f38", b"\x0f\x38"), ("0f3a", b"\x0f\x3a")):
        for pfx in MANDATORY:
            for op in range(256):
                if name == "0f" and op in (0x38, 0x3A):
                    continue
                template = pfx + esc + bytes([op])
                if _decodes(template):
                    maps[name].append(template)
    for mmmmm in (1, 2, 3):
        for w in (0, 1):
            for pp in range(4):
                # C4 RXB.mmmmm W.vvvv.L.pp: R/X/B inverted (all set = none), vvvv=1111
                vex = bytes([0xC4, 0xE0 | mmmmm, (w << 7) | 0x78 | pp])
                for op in range(256):
                    if _decodes(vex + bytes([op])):
                        maps["vex128"].append(vex + bytes([op]))
    return {k: tuple(v) for k, v in maps.items()}


@cache
def real_code(limit: int = 30_000) -> tuple[bytes, ...]:
    """Instructions as compilers emit them, from libc and this Python: the
    first instructions of every function symbol (prologues: what probes
    displace) and a linear sweep over .text, so that the classes real
    programs use are among those tried (and proven, for the trust table)."""
    seen: dict[bytes, None] = dict.fromkeys(bytes.fromhex(h) for h in PROLOGUES)
    for path in (_libc_path(), sys.executable):
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                text = elf.get_section_by_name(".text")
                if text is None:
                    continue
                data, base = text.data(), text["sh_addr"]
                entries = sorted(_function_offsets(elf, base, len(data)))
        except OSError:
            continue
        starts = entries + list(range(0, len(data), max(1, len(data) // 2000)))
        for start in starts:
            for i, insn in enumerate(_cs.disasm(data[start : start + 96], base + start)):
                if i >= 12:
                    break
                seen.setdefault(bytes(insn.bytes), None)
            if len(seen) >= limit:
                return tuple(seen)
    return tuple(seen)


def _function_offsets(elf: ELFFile, base: int, size: int) -> set[int]:
    out = set()
    for name in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(name)
        if sec is None:
            continue
        for sym in sec.iter_symbols():  # type: ignore[attr-defined]
            off = sym["st_value"] - base
            if sym["st_info"]["type"] == "STT_FUNC" and 0 <= off < size:
                out.add(off)
    return out


def _libc_path() -> str | None:
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        p = Path(d) / "libc.so.6"
        if p.exists():
            return str(p)
    return None
