"""How one instruction runs out of line: the slot bytes and the fix-ups after the step.

This is the user-space counterpart of the kernel's `arch_uprobe_analyze_insn`
(arch/x86/kernel/uprobes.c), done once per site: the instruction is copied to
a slot in the XOL page, and whatever in it depends on where it sits is
rewritten so that it can run at the slot's address instead of its own.

- RIP-relative memory operands: modrm `00 reg 101` becomes `10 reg SCRATCH`
  (REX.B / VEX.B cleared), and at the hit the scratch register holds the
  address of the original next instruction, so `disp32(%scratch)` is the
  address `disp32(%rip)` meant (the kernel's `riprel_analyze`).
- Relative branches (jmp/jcc/loop/jrcxz/call rel): the displacement becomes 1,
  so "taken" lands on slot+len+1 and "not taken" on slot+len; the real target
  is then computed from the original displacement.  The kernel emulates these
  instead: its page sits at the top of the address space, where a forward
  displacement would leave the canonical range.
- call (any form) pushes slot+len; the return address is rewritten to site+len.

Instructions that cannot run anywhere but where they are (syscall: the kernel
saves RIP in RCX; int*: the signal frame; far branches) are refused and take
the stop-the-world native step instead.  Pure: bytes in, a value out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import capstone
from capstone import x86_const as csx

from emuprobe.disasm import CS
from emuprobe.x86.decode import repeats

Kind = Literal["plain", "jump", "cond", "call", "call_indirect"]

# The registers a RIP-relative operand can be rebased on without a REX.B bit,
# in the kernel's order of preference (rsi, rdi, rbx), then the rest.
# (name, modrm.rm number); rsp (4) would mean a SIB byte, and is never free.
_SCRATCH = (("rsi", 6), ("rdi", 7), ("rbx", 3), ("rcx", 1), ("rdx", 2), ("rax", 0), ("rbp", 5))
_LEGACY = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})
_REFUSED = {
    "syscall": "syscall: the kernel stores RIP in RCX",
    "sysenter": "sysenter: returns to a fixed address",
    "int": "int: the signal frame would show the slot",
    "int1": "int1: the signal frame would show the slot",
    "int3": "int3: the signal frame would show the slot",
    "into": "into: the signal frame would show the slot",
    "ljmp": "far branch",
    "lcall": "far branch",
    "retf": "far branch",
    "retfq": "far branch",
    "iretq": "iret",
    "iretd": "iret",
}


@dataclass(frozen=True)
class XolInsn:
    """One instruction prepared for a slot; `refused` says why it cannot be."""

    length: int
    slot_code: bytes = b""
    kind: Kind = "plain"
    disp: int = 0  # relative branch displacement, from the next instruction
    scratch: str = ""  # UserRegs field rebased for a RIP-relative operand
    rep: bool = False  # rep string op: traps after each iteration, RIP unchanged
    refused: str = ""
    text: str = ""


@lru_cache(maxsize=4096)
def prepare(code: bytes) -> XolInsn:
    """The slot form of the instruction at the start of `code` (position
    independent: the same bytes give the same value wherever they sit)."""
    insn = next(CS.disasm(bytes(code[:16]), 0, 1), None)
    if insn is None:
        return XolInsn(0, refused="undecodable")
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    size = insn.size
    base = insn.mnemonic.split()[-1]
    why = _REFUSED.get(base)
    if why is None and insn.opcode[0] == 0xFF and ((insn.modrm >> 3) & 7) in (3, 5):
        why = "far branch"
    if why is not None:
        return XolInsn(size, refused=why, text=text)
    slot = bytearray(code[:size])
    rep = repeats(insn)
    scratch = ""
    if any(op.type == csx.X86_OP_MEM and op.mem.base == csx.X86_REG_RIP for op in insn.operands):
        scratch_or_why = _rebase(insn, slot, code)
        if scratch_or_why.startswith("!"):
            return XolInsn(size, refused=scratch_or_why[1:], text=text)
        scratch = scratch_or_why
    groups = set(insn.groups)
    kind: Kind = "plain"
    disp = 0
    if csx.X86_GRP_BRANCH_RELATIVE in groups and insn.imm_size:
        # capstone gives the target; decoded at 0 it is the displacement + size
        disp = ((insn.operands[0].imm - size + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)
        off, n = insn.imm_offset, insn.imm_size
        slot[off : off + n] = (1).to_bytes(n, "little")
        if csx.X86_GRP_CALL in groups:
            kind = "call"
        elif base == "jmp":
            kind = "jump"
        else:
            kind = "cond"
    elif csx.X86_GRP_CALL in groups:
        kind = "call_indirect"
    return XolInsn(size, bytes(slot), kind, disp, scratch, rep, "", text)


def _rebase(insn: capstone.CsInsn, slot: bytearray, code: bytes) -> str:
    """Rewrite the RIP-relative modrm in `slot`; the scratch register's name,
    or '!reason' when it cannot be done."""
    m = insn.modrm_offset
    modrm = code[m]
    if modrm >> 6 != 0 or modrm & 7 != 5:
        return "!RIP-relative operand without a modrm (moffs?)"
    used = _registers_named(insn)
    reg_field = (modrm >> 3) & 7
    for name, num in _SCRATCH:
        if name not in used and num != reg_field:
            break
    else:
        return "!no free scratch register for the RIP-relative operand"
    slot[m] = 0x80 | (modrm & 0x38) | num
    i = 0
    while code[i] in _LEGACY:
        i += 1
    if 0x40 <= code[i] <= 0x4F:
        slot[i] &= ~0x01  # REX.B: the scratch register is one of the first eight
    elif code[i] == 0xC4:
        slot[i + 1] |= 0x20  # VEX3.B is stored inverted
    elif code[i] in (0x62, 0x8F):
        return "!EVEX/XOP RIP-relative operand"
    return name


def _registers_named(insn: capstone.CsInsn) -> set[str]:
    """The scratch candidates the instruction reads or writes, in any width."""
    reads, writes = insn.regs_access()
    ids = set(reads) | set(writes)
    for op in insn.operands:
        if op.type == csx.X86_OP_REG:
            ids.add(op.reg)
        elif op.type == csx.X86_OP_MEM:
            ids.update(r for r in (op.mem.base, op.mem.index) if r)
    return {_WIDTHS.get(insn.reg_name(r), "") for r in ids} - {""}


def _widths() -> dict[str, str]:
    out = {}
    for x in "abcd":
        out.update({n: f"r{x}x" for n in (f"r{x}x", f"e{x}x", f"{x}x", f"{x}l", f"{x}h")})
    for x in ("si", "di", "bp"):
        out.update({n: f"r{x}" for n in (f"r{x}", f"e{x}", x, f"{x}l")})
    return out


_WIDTHS = _widths()
