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

from emuprobe.difftest.prologues import function_starts, libc_path, text_section
from emuprobe.disasm import CS

# An opcode template: the bytes before ModRM, with any mandatory prefix first.
Template = bytes

# Every legacy prefix: operand/address size, rep, segment overrides (2E/3E
# are also branch hints and 3E notrack), lock.  REX is drawn separately.
LEGACY_PREFIXES = (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x36, 0x64, 0x65, 0xF0)
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
    # prefixed forms compilers and hand-written libc emit: bnd (MPX) and
    # notrack (CET) branches, branch hints, pause, data16 and cs nops
    "f2c3", "f2e900010000", "f2e800010000", "3effe0", "3effe1", "3eff24c5d0ff0000",
    "2e7410", "3e7510", "f390", "6690", "662e0f1f840000000000",
    "66662e0f1f840000000000", "0f1f440000", "0f1f840000000000",
)  # fmt: skip

# Opcodes whose meaning a prefix changes on some CPU, or that a prefix
# leaves alone on one CPU and not on another: the "prefixed" map puts one to
# three legacy prefixes (and maybe a REX) before each.  A rep prefix on
# loope/loopne replaces the condition on AMD; 66 truncates a branch target on
# AMD and not on Intel; 67 makes loop and jrcxz count in ECX.
PREFIXED_BODIES = tuple(
    bytes([op])
    for op in (
        0xE0, 0xE1, 0xE2, 0xE3,  # loopne loope loop jrcxz
        0x74, 0x75, 0x7C, 0xEB, 0xE8, 0xE9, 0xC3, 0xC2,  # jcc, jmp, call, ret
        0x50, 0x55, 0x58, 0x5D, 0x6A, 0x68, 0x90,  # push/pop, nop
        0xA4, 0xA5, 0xAA, 0xAB, 0xAC, 0xAE, 0xA6,  # string ops
        0x89, 0x8B, 0x01, 0x85, 0x31, 0xC7,  # mov/add/test/xor with ModRM
    )
) + (b"\x0f\x1f", b"\xff", b"\x0f\xb8", b"\x0f\xbc", b"\x0f\x1e")  # fmt: skip



def _decodes(template: bytes) -> bool:
    for modrm in _MODRMS:
        raw = template + bytes([modrm]) + _TAIL
        insn = next(CS.disasm(raw, 0x1000, 1), None)
        if insn is not None and insn.size > len(template) - 1:
            return True
    return False


@cache
def opcode_maps() -> dict[str, tuple[Template, ...]]:
    maps: dict[str, list[Template]] = {"1byte": [], "0f": [], "0f38": [], "0f3a": [], "vex128": [],
                                       "prefixed": list(PREFIXED_BODIES)}  # fmt: skip
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
    first instructions of every function (prologues: what probes displace)
    and a linear sweep over .text, so that the classes real programs use are
    among those tried (and proven, for the trust table)."""
    seen: dict[bytes, None] = dict.fromkeys(bytes.fromhex(h) for h in PROLOGUES)
    for path in (libc_path(), sys.executable):
        found = text_section(path) if path is not None else None
        if found is None:
            continue
        data, base, elf = found
        entries = sorted(s - base for s in function_starts(elf) if 0 <= s - base < len(data))
        starts = entries + list(range(0, len(data), max(1, len(data) // 2000)))
        for start in starts:
            for i, insn in enumerate(CS.disasm(data[start : start + 96], base + start)):
                if i >= 12:
                    break
                seen.setdefault(bytes(insn.bytes), None)
            if len(seen) >= limit:
                return tuple(seen)
    return tuple(seen)
