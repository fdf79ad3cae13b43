"""Why an instruction must not be emulated: its encoding, the policy tables
(policy.py), and the forms the engine is known to get wrong.  Pure: bytes and
capstone's decoding in, a reason out."""

from __future__ import annotations

import capstone
from capstone import x86_const as csx

from emuprobe.disasm import CS as _cs
from emuprobe.x86 import policy
from emuprobe.x86.classkey import LEGACY_PREFIXES

_SEGMENT_PREFIXES = frozenset({0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65})
BRANCH_GROUPS = frozenset(
    {csx.X86_GRP_JUMP, csx.X86_GRP_CALL, csx.X86_GRP_RET, csx.X86_GRP_BRANCH_RELATIVE}
)


def refusal(insn: capstone.CsInsn, code: bytes) -> str | None:
    """Why `insn` (whose bytes start `code`) must not be emulated, or None:
    the encoding (prefixes, VEX kinds), the policy tables, then the forms the
    engine is known to get wrong."""
    return _encoding(insn, code) or _by_table(insn) or _engine_gap(insn, code)


def _encoding(insn: capstone.CsInsn, code: bytes) -> str | None:
    prefixes = legacy_prefixes(code)
    # not insn.prefix[0]: capstone keeps only the last of F0/F2/F3 there, and
    # `f0 f3 0f 4c c5` is #UD on the CPU but a plain cmovl to Unicorn
    if 0xF0 in prefixes:
        return policy.LOCK
    if sum(p in _SEGMENT_PREFIXES for p in prefixes) > 1:
        return policy.SEGMENT_PREFIXES
    if 0xF2 in prefixes and 0xF3 in prefixes:
        return policy.REP_PREFIXES
    if 0x66 in prefixes and any(g in BRANCH_GROUPS for g in insn.groups):
        return policy.BRANCH_66
    vex = vex_kind(code)
    if vex == "evex":
        return policy.VEX256
    if vex == "xop":
        return policy.XOP
    if vex == "rex+vex":
        return "REX before VEX/EVEX: #UD natively"
    if vex in ("vex128", "vex256") and any(_is_vector(insn, op) for op in insn.operands):
        return policy.VEX128 if vex == "vex128" else policy.VEX256
    return None


def _by_table(insn: capstone.CsInsn) -> str | None:
    base = insn.mnemonic.split()[-1]  # "rep stosq" -> "stosq", "bnd jmp" -> "jmp"
    reason = policy.BY_MNEMONIC.get(base)
    if reason is None:
        for g in insn.groups:
            reason = policy.BY_GROUP.get(g)
            if reason is not None:
                break
    if reason is not None:
        return reason.replace("{m}", base)
    first = insn.opcode[0]
    if 0xD8 <= first <= 0xDF or first == 0x9B:  # x87 escapes, fwait
        return policy.X87
    if first == 0xFF and ((insn.modrm >> 3) & 7) in (3, 5):  # call/jmp far [m]
        return policy.FAR_BRANCH
    return None


def _engine_gap(insn: capstone.CsInsn, code: bytes) -> str | None:
    """Forms Unicorn (QEMU) or capstone get wrong, found by the difftest."""
    base = insn.mnemonic.split()[-1]
    first = insn.opcode[0]
    prefixes = legacy_prefixes(code)
    if first in (0xF6, 0xF7) and ((insn.modrm >> 3) & 7) == 1:
        return "test alias F6/F7 /1: Unicorn decodes it differently"
    if base == "xchg" and any(op.type == csx.X86_OP_MEM for op in insn.operands):
        return policy.XCHG_MEMORY
    if base == "cmpxchg" and insn.operands[0].type == csx.X86_OP_REG:
        return "cmpxchg to a register: QEMU zero-extends a 32-bit destination the CPU keeps"
    if base in ("shld", "shrd") and insn.imm_size and _rip_relative(insn):
        return f"{base} [rip+d], r, imm8: Unicorn computes the address as if there were no imm8"
    prefixed = base in policy.SSE_SAFE or base in policy.HOST_SSE or base == "movbe"
    if prefixed and ignored_mandatory_prefix(insn, code, prefixes):
        return f"{base} with a prefix its encoding does not use: may be #UD natively"
    if insn.opcode[0] in (0xC6, 0xC7) and insn.rex & 4:
        return "REX.R on mov r/m, imm: Unicorn reads it into the /0 and raises #UD"
    if base == "cmpxchg" and insn.operands[0].size == 4:
        return "32-bit cmpxchg: Unicorn zero-extends RAX when the values are equal"
    if base == "ret" and insn.operands and insn.operands[0].imm >= 0x8000:
        return "ret imm16 >= 0x8000: Unicorn sign-extends the immediate the CPU zero-extends"
    if insn.opcode[0] == 0x90 and 0xF3 in prefixes and insn.rex & 1:
        return "F3 REX.B 90: the CPU exchanges with r8, Unicorn decodes pause"
    if base in ("lahf", "sahf") and insn.rex:
        # QEMU 5 decodes AH as SPL when a REX prefix is present
        return f"{base} with REX: Unicorn writes SPL instead of AH"
    for op in insn.operands:
        if op.type == csx.X86_OP_REG and insn.reg_name(op.reg).startswith("mm"):
            return policy.MMX
    return None


def ignored_mandatory_prefix(insn: capstone.CsInsn, code: bytes, prefixes: bytes) -> bool:
    """An F2/F3/66 that capstone decodes past (the same instruction without it)
    selects no SSE form: the CPU raises #UD where Unicorn and capstone do not."""
    for p in set(prefixes) & {0xF2, 0xF3, 0x66}:
        i = code.index(p)
        alt = next(_cs.disasm(bytes(code[:i] + code[i + 1 : 16]), insn.address, 1), None)
        if alt is not None and (alt.mnemonic, alt.op_str) == (insn.mnemonic, insn.op_str):
            return True
    return False


def _rip_relative(insn: capstone.CsInsn) -> bool:
    return any(op.type == csx.X86_OP_MEM and op.mem.base == csx.X86_REG_RIP for op in insn.operands)


def legacy_prefixes(code: bytes) -> bytes:
    """The legacy prefix bytes, including any after a (then ignored) REX byte."""
    out = bytearray()
    for b in code:
        if b in LEGACY_PREFIXES:
            out.append(b)
        elif not 0x40 <= b <= 0x4F:
            break
    return bytes(out)


def vex_kind(code: bytes) -> str | None:
    i = 0
    rex = False
    while i < len(code) and (code[i] in LEGACY_PREFIXES or 0x40 <= code[i] <= 0x4F):
        rex = 0x40 <= code[i] <= 0x4F
        i += 1
    if i >= len(code):
        return None
    b = code[i]
    if rex and b in (0xC4, 0xC5, 0x62):
        return "rex+vex"  # #UD on the CPU
    # In 64-bit mode C4/C5/62 are always VEX/EVEX; 8F is XOP unless ModRM.reg==0 (pop)
    if b == 0xC5 and i + 1 < len(code):
        return "vex256" if code[i + 1] & 0x04 else "vex128"
    if b == 0xC4 and i + 2 < len(code):
        return "vex256" if code[i + 2] & 0x04 else "vex128"
    if b == 0x62:
        return "evex"
    if b == 0x8F and i + 1 < len(code) and (code[i + 1] >> 3) & 7:
        return "xop"
    return None


def _is_vector(insn: capstone.CsInsn, op: object) -> bool:
    if getattr(op, "type", None) != csx.X86_OP_REG:
        return getattr(op, "type", None) == csx.X86_OP_MEM and getattr(op, "size", 0) >= 16
    name = insn.reg_name(op.reg)  # type: ignore[attr-defined]
    return name[:3] in ("xmm", "ymm", "zmm") or name[0] == "k"
