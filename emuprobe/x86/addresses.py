"""Addresses an instruction will touch, checked against the non-canonical hole
before Unicorn runs it.

Unicorn 2.1.4 does not raise #GP for a non-canonical data address: it drops
the high bits, so `mov rax, [rdi]` with rdi = 0x8000_0002_0001_0000 reads
0x2_0001_0000 where the CPU faults (found by the difftest; see
fuzz/discrepancies/README.md).  A wild pointer would then read or write the
wrong memory silently.  So decode.py records how each memory operand's
address is formed, and at each hit the machine refuses, before running, when
an address is near or inside the hole; the native step then does what the
CPU does.  The margins make the check conservative (a refusal only costs a
native step), so the refusal claims no fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86_const as csx

from emuprobe.sys.ptrace import UserRegs
from emuprobe.x86.regs import MASK64, canonical, full_register

NEAR_HOLE = "address near the non-canonical hole: left to the CPU"
_MARGIN = 0x10000  # covers operand sizes, bt* offsets, ret imm16 and rep strings


@dataclass(frozen=True)
class MemRef:
    """base + index*scale + disp (+ FS/GS base) (+ bit offset/8 for bt* m,r)."""

    base: str = ""  # UserRegs field, "rip" for RIP-relative, "" for none
    index: str = ""
    scale: int = 1
    disp: int = 0
    seg: str = ""  # "fs_base" / "gs_base"
    bitreg: str = ""  # bt/bts/btr/btc with a register bit offset
    bitsize: int = 8  # that register's size in bytes (the offset is signed)
    a32: bool = False  # 67 prefix: the address wraps at 32 bits


_STACK_OPS = frozenset({"push", "pop", "call", "ret", "leave"})
# String instructions by opcode, not mnemonic: SSE has a movsd and a cmpsd too.
_STRING_REGS = {
    0xA4: ("rsi", "rdi"), 0xA5: ("rsi", "rdi"), 0xA6: ("rsi", "rdi"), 0xA7: ("rsi", "rdi"),
    0xAA: ("rdi",), 0xAB: ("rdi",), 0xAC: ("rsi",), 0xAD: ("rsi",), 0xAE: ("rdi",), 0xAF: ("rdi",),
}  # fmt: skip


def _field(reg: int) -> str:
    r = full_register(reg) if reg else None
    return r.field or "" if r is not None else ""


# A memory operand these never access (lea computes, nop and prefetch ignore it).
_NO_ACCESS = frozenset(
    "lea nop prefetch prefetchw prefetchwt1 prefetchnta prefetcht0 prefetcht1 prefetcht2".split()
)


def mem_refs(insn: capstone.CsInsn) -> tuple[tuple[MemRef, ...], tuple[str, ...]]:
    """(explicit memory operands, registers used implicitly as addresses)."""
    refs = []
    base_mnem = insn.mnemonic.split()[-1]
    if base_mnem in _NO_ACCESS:
        return (), ()
    a32 = insn.prefix[3] == 0x67
    for op in insn.operands:
        if op.type != csx.X86_OP_MEM:
            continue
        m = op.mem
        seg = {csx.X86_REG_FS: "fs_base", csx.X86_REG_GS: "gs_base"}.get(m.segment, "")
        base = "rip" if m.base == csx.X86_REG_RIP else _field(m.base)
        bitreg, bitsize = "", 8
        if base_mnem in ("bt", "bts", "btr", "btc") and insn.operands[1].type == csx.X86_OP_REG:
            bitreg, bitsize = _field(insn.operands[1].reg), insn.operands[1].size
        refs.append(MemRef(base, _field(m.index), m.scale, m.disp, seg, bitreg, bitsize, a32))
    implicit: tuple[str, ...] = ()
    if base_mnem in _STACK_OPS:
        implicit = ("rsp",)
    elif insn.opcode[1] == 0:  # one-byte opcode: maybe a string instruction
        implicit = _STRING_REGS.get(insn.opcode[0], ())
    return tuple(refs), implicit


def _signed(v: int, size: int) -> int:
    bits = 8 * size
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _safe(addr: int) -> bool:
    return canonical((addr - _MARGIN) & MASK64) and canonical((addr + _MARGIN) & MASK64)


def check(
    refs: tuple[MemRef, ...], implicit: tuple[str, ...], regs: UserRegs, next_rip: int
) -> str | None:
    """NEAR_HOLE if an address the instruction may touch is within a margin of
    the non-canonical range (or in it), else None."""
    for ref in refs:
        ea = ref.disp
        if ref.base == "rip":
            ea += next_rip
        elif ref.base:
            ea += getattr(regs, ref.base)
        if ref.index:
            ea += getattr(regs, ref.index) * ref.scale
        if ref.bitreg:
            ea += _signed(getattr(regs, ref.bitreg), ref.bitsize) >> 3
        if ref.a32:
            ea &= 0xFFFF_FFFF
        if ref.seg:
            ea += getattr(regs, ref.seg)
        if not _safe(ea & MASK64):
            return NEAR_HOLE
    for name in implicit:
        if not _safe(getattr(regs, name)):
            return NEAR_HOLE
    return None
