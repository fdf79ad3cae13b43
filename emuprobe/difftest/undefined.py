"""What the architecture leaves undefined, so the comparator must not compare it.

Each rule cites the "Flags Affected" (or Operation) section of its instruction
page in the Intel 64 and IA-32 Architectures Software Developer's Manual,
Volume 2 (order no. 325383).  Masks depend on the operands and the count where
the SDM says so: capstone's `eflags` undefined bits are not enough (capstone 5
misses SF for imul and has no count rule for shifts), and a mask wider than
the SDM's would hide real emulator bugs.  iSH's tools/undefined-flags.c is the
prior art for count-dependent masks.

A rule sees the decoded instruction, the registers before it and the CPU's
registers after it (BSF/BSR: the CPU's ZF says whether the source was 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from capstone import CsInsn
from capstone import x86_const as csx

from emuprobe.sys.ptrace import UserRegs
from emuprobe.x86.regs import AF, CF, OF, PF, SF, ZF, full_register

SDM = "Intel SDM Vol. 2"


@dataclass(frozen=True)
class Undefined:
    """Flags and whole registers whose value after the instruction is undefined."""

    flags: int = 0
    regs: frozenset[str] = frozenset()
    cite: str = ""


NONE = Undefined()
MaskFn = Callable[[CsInsn, UserRegs, UserRegs], tuple[int, frozenset[str]]]


@dataclass(frozen=True)
class Rule:
    mnemonics: frozenset[str]
    cite: str
    mask: MaskFn


_SIZED_BY_SOURCE = frozenset({"shld", "shrd", "bt", "bts", "btr", "btc"})


def _bits(insn: CsInsn) -> int:
    """The operand width.  For SHLD/SHRD and BT* with a memory destination it
    is the register source's: with F2/F3 and 66 together, capstone 5 reports
    a 32-bit memory operand for a 16-bit instruction.  (Not for shifts by CL,
    whose register operand is the 8-bit count.)"""
    ops = insn.operands
    if not ops:
        return 64
    if (insn.mnemonic.split()[-1] in _SIZED_BY_SOURCE and len(ops) >= 2
            and ops[0].type == csx.X86_OP_MEM and ops[1].type == csx.X86_OP_REG):  # fmt: skip
        return ops[1].size * 8
    return ops[0].size * 8


def _count(insn: CsInsn, before: UserRegs) -> int:
    """The masked shift/rotate count: imm, CL or the implicit 1 (the SDM's
    COUNT AND COUNTMASK, 0x3F for 64-bit operands, else 0x1F)."""
    src = insn.operands[-1]
    if len(insn.operands) < 2:
        raw = 1
    elif src.type == csx.X86_OP_IMM:
        raw = src.imm
    else:
        raw = before.rcx & 0xFF
    return raw & (0x3F if _bits(insn) == 64 else 0x1F)


def _dest(insn: CsInsn) -> frozenset[str]:
    op = insn.operands[0]
    if op.type != csx.X86_OP_REG:
        return frozenset()
    reg = full_register(op.reg)
    return frozenset({reg.name}) if reg is not None else frozenset()


def _fixed(flags: int) -> MaskFn:
    return lambda insn, before, after: (flags, frozenset())


def _shift(insn: CsInsn, before: UserRegs, after: UserRegs) -> tuple[int, frozenset[str]]:
    n = _count(insn, before)
    if n == 0:
        return 0, frozenset()  # "If the count is 0, the flags are not affected."
    flags = AF | (OF if n != 1 else 0)
    base = insn.mnemonic.split()[-1]
    if base in ("shl", "sal", "shr") and n >= _bits(insn):
        flags |= CF  # "undefined for SHL and SHR where count >= the operand size"
    return flags, frozenset()


def _rotate(insn: CsInsn, before: UserRegs, after: UserRegs) -> tuple[int, frozenset[str]]:
    n = _count(insn, before)
    return (OF if n not in (0, 1) else 0), frozenset()


def _double_shift(insn: CsInsn, before: UserRegs, after: UserRegs) -> tuple[int, frozenset[str]]:
    n = _count(insn, before)
    if n == 0:
        return 0, frozenset()
    if n > _bits(insn):  # only 16-bit operands can get here
        return CF | OF | SF | ZF | AF | PF, _dest(insn)
    return AF | (OF if n != 1 else 0), frozenset()


def _bit_scan(insn: CsInsn, before: UserRegs, after: UserRegs) -> tuple[int, frozenset[str]]:
    source_zero = bool(after.eflags & ZF)
    return CF | OF | SF | AF | PF, _dest(insn) if source_zero else frozenset()


def _bswap(insn: CsInsn, before: UserRegs, after: UserRegs) -> tuple[int, frozenset[str]]:
    return 0, _dest(insn) if _bits(insn) == 16 else frozenset()


def _rules() -> tuple[Rule, ...]:
    def rule(names: str, page: str, text: str, fn: MaskFn) -> Rule:
        return Rule(frozenset(names.split()), f"{SDM}, {page}, Flags Affected: {text}", fn)

    return (
        rule(
            "shl sal shr sar", "SAL/SAR/SHL/SHR-Shift",
            "OF is affected only on 1-bit shifts, else undefined; for a non-zero count "
            "AF is undefined; CF is undefined for SHL and SHR where the count is "
            "greater than or equal to the operand size; a count of 0 affects no flags",
            _shift,
        ),
        rule(
            "rol ror rcl rcr", "RCL/RCR/ROL/ROR-Rotate",
            "OF is defined only for 1-bit rotates and undefined in all other cases "
            "(a masked count of 0 affects no flags)",
            _rotate,
        ),
        rule(
            "shld shrd", "SHLD-Double Precision Shift Left / SHRD-Double Precision Shift Right",
            "for a 1-bit shift OF is set on a sign change, for longer shifts OF is "
            "undefined; if a shift occurs AF is undefined; if the count is greater "
            "than the operand size the flags (and the destination) are undefined",
            _double_shift,
        ),
        rule("mul", "MUL-Unsigned Multiply", "SF, ZF, AF and PF are undefined",
             _fixed(SF | ZF | AF | PF)),
        rule("imul", "IMUL-Signed Multiply", "SF, ZF, AF and PF are undefined",
             _fixed(SF | ZF | AF | PF)),
        rule(
            "div idiv", "DIV-Unsigned Divide / IDIV-Signed Divide",
            "CF, OF, SF, ZF, AF and PF are undefined", _fixed(CF | OF | SF | ZF | AF | PF),
        ),
        rule(
            "bsf bsr", "BSF-Bit Scan Forward / BSR-Bit Scan Reverse",
            "CF, OF, SF, AF and PF are undefined (Operation: if the source is 0 the "
            "destination is undefined)",
            _bit_scan,
        ),
        rule(
            "bt bts btr btc", "BT-Bit Test (and BTC, BTR, BTS)",
            "OF, SF, AF and PF are undefined", _fixed(OF | SF | AF | PF),
        ),
        rule(
            "and or xor test", "AND / OR / XOR / TEST", "AF is undefined", _fixed(AF),
        ),
        rule(
            "lzcnt tzcnt", "LZCNT-Count the Number of Leading Zero Bits / TZCNT",
            "OF, SF, PF and AF are undefined", _fixed(OF | SF | PF | AF),
        ),
        rule(
            "andn blsi blsmsk blsr bzhi", "ANDN / BLSI / BLSMSK / BLSR / BZHI",
            "AF and PF are undefined", _fixed(AF | PF),
        ),
        rule("bextr", "BEXTR-Bit Field Extract", "AF, SF and PF are undefined",
             _fixed(AF | SF | PF)),
        rule(
            "bswap", "BSWAP-Byte Swap",
            "(Description) when BSWAP references a 16-bit register the result is undefined",
            _bswap,
        ),
    )  # fmt: skip


RULES = _rules()
BY_MNEMONIC: dict[str, Rule] = {m: r for r in RULES for m in r.mnemonics}


def undefined(insn: CsInsn, before: UserRegs, after: UserRegs) -> Undefined:
    """What to leave out of the comparison for `insn` run from `before` (the
    CPU left `after`)."""
    base = insn.mnemonic.split()[-1]
    r = BY_MNEMONIC.get(base)
    if r is None:
        return NONE
    flags, regs = r.mask(insn, before, after)
    return Undefined(flags, regs, r.cite) if flags or regs else NONE
