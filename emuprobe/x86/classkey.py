"""The class an instruction belongs to, for the trust table: the unit the
difftest proves and the engine trusts.

A class is the mnemonic as capstone prints it (`repz ret`, `bnd jmp`,
`notrack jmp` included), the operand form (`r64,m32`: registers by kind and
size, memory by size with its segment override and a32 for 32-bit
addressing), and every prefix that capstone's reading hides.  The last part
matters because CPUs disagree exactly there: on AMD an F3 prefix turns
`loopne` into a loop while ZF=1, where Intel and Unicorn ignore it, yet
capstone prints both as `loopne`.  So a prefix byte or REX bit whose removal
leaves capstone's text unchanged is named in the key (`loopne imm +f3`,
`push r64 +rex.w`, `loop imm +67`, `nop cs:m16 +66` for a doubled 66), and
such a form must be proven with exactly those prefixes before it is
emulated.
"""

from __future__ import annotations

from capstone import CsInsn
from capstone import x86_const as csx

from emuprobe.disasm import text_of

LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_SEGMENTS = {csx.X86_REG_CS: "cs:", csx.X86_REG_DS: "ds:", csx.X86_REG_ES: "es:",
             csx.X86_REG_SS: "ss:", csx.X86_REG_FS: "fs:", csx.X86_REG_GS: "gs:"}  # fmt: skip
_REX_BITS = ((8, "w"), (4, "r"), (2, "x"), (1, "b"))
_GPR_SIZES = {1: "r8", 2: "r16", 4: "r32", 8: "r64"}
_HIGH_BYTE = frozenset({"ah", "bh", "ch", "dh"})


def _reg_kind(name: str, size: int) -> str:
    if name in _HIGH_BYTE:
        return "r8h"  # QEMU has had AH/SPL confusions: keep them a class apart
    for prefix in ("xmm", "ymm", "zmm", "st", "mm", "cr", "dr", "k"):
        if name.startswith(prefix) and (name[len(prefix) :].isdigit() or name == prefix):
            return prefix
    if name in ("cs", "ds", "es", "fs", "gs", "ss"):
        return "sreg"
    return _GPR_SIZES.get(size, name)


def operand_form(insn: CsInsn) -> str:
    """`r64,m32`-style text for the operands as decoded (registers by kind and
    size, memory by size with any segment override and a32 for 32-bit
    addressing)."""
    parts = []
    a32 = insn.prefix[3] == 0x67
    for op in insn.operands:
        if op.type == csx.X86_OP_REG:
            parts.append(_reg_kind(insn.reg_name(op.reg), op.size))
        elif op.type == csx.X86_OP_IMM:
            parts.append("imm")
        elif op.type == csx.X86_OP_MEM:
            seg = _SEGMENTS.get(op.mem.segment, "")
            parts.append(f"{seg}{'a32:' if a32 else ''}m{op.size * 8}")
    return ",".join(parts)


def prefix_length(code: bytes) -> int:
    """How many legacy prefix and REX bytes start `code`."""
    n = 0
    while n < len(code) and (code[n] in LEGACY_PREFIXES or 0x40 <= code[n] <= 0x4F):
        n += 1
    return n


def hidden_prefixes(insn: CsInsn) -> tuple[str, ...]:
    """The prefix bytes (`f3`, `66`...) and REX bits (`rex.w`...) that
    capstone's text does not reflect: without them it reads the same.  A
    repeated prefix is named as often as it is repeated; a 66 is named
    whenever no register or memory operand shows the operand size (`66 68
    iw` pushes two bytes, `68 id` eight, and both print as `push imm`)."""
    raw = bytes(insn.bytes)
    n = prefix_length(raw[:-1])  # the last byte is never a prefix of this instruction
    if n == 0:
        return ()
    addr = insn.address
    seen = text_of(raw, addr)
    hidden: list[str] = []
    for i in range(n):
        b = raw[i]
        # decoded one byte later, so the next instruction's address (branch
        # targets, RIP-relative operands) reads the same
        same_without = text_of(raw[:i] + raw[i + 1 :], addr + 1) == seen
        if 0x40 <= b <= 0x4F:
            for bit, name in _REX_BITS:
                flipped = raw[:i] + bytes([b & ~bit]) + raw[i + 1 :]
                if b & bit and text_of(flipped, addr) == seen:
                    hidden.append(f"rex.{name}")
            if b == 0x40 and same_without:
                hidden.append("rex")
        elif same_without or (b == 0x66 and not _sized(insn)):
            hidden.append(f"{b:02x}")
    return tuple(sorted(hidden))


def _sized(insn: CsInsn) -> bool:
    """Whether the operand form shows the operand size (a register or memory operand)."""
    return any(op.type in (csx.X86_OP_REG, csx.X86_OP_MEM) for op in insn.operands)


def class_key(insn: CsInsn) -> str:
    form = operand_form(insn)
    key = f"{insn.mnemonic} {form}" if form else insn.mnemonic
    return "".join([key, *(f" +{p}" for p in hidden_prefixes(insn))])
