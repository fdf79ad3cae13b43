"""analyze(code, addr) -> Plan: decide once per probe site how its displaced
instruction will take effect at every hit.

The decoding happens here (with the shared capstone of emuprobe/disasm.py); the hit
path dispatches on the Plan's type and never decodes.  Plans are position
independent: a site is keyed by file and offset and may sit at different
addresses in different processes, so a Plan holds displacements, never
absolute addresses (`text` alone shows the address the site was analysed at).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import capstone
from capstone import x86_const as csx

from emuprobe.disasm import CS as _cs
from emuprobe.x86 import policy, trust
from emuprobe.x86.addresses import MemRef, mem_refs
from emuprobe.x86.refusals import BRANCH_GROUPS as _BRANCH_GROUPS
from emuprobe.x86.refusals import ignored_mandatory_prefix, refusal
from emuprobe.x86.refusals import legacy_prefixes as _legacy_prefixes
from emuprobe.x86.refusals import vex_kind as _vex_kind
from emuprobe.x86.regs import (
    BY_NAME,
    EFLAGS,
    FS_BASE,
    GPR_NAMES,
    GS_BASE,
    MASK64,
    RIP,
    Register,
    full_register,
    is_gpr64,
)

FastOp = Literal[
    "nop", "push", "mov", "add_rsp", "sub_rsp", "jmp", "call", "load", "store", "sse"
]


@dataclass(frozen=True)
class FastPath:
    """An instruction executed in pure Python against `UserRegs` (no Unicorn)."""

    op: FastOp
    length: int
    mnemonic: str
    text: str
    dst: str = ""  # UserRegs field written (mov, load)
    src: str = ""  # UserRegs field read (push, mov, store)
    imm: int = 0  # add/sub immediate (unsigned 64-bit), or the signed displacement
    # of a branch target or of a load/store address, from `base` (rip: the next insn)
    base: str = ""  # load/store: the UserRegs field the address is based on
    size: int = 0  # load/store: bytes moved (4 or 8; a 4-byte load zero-extends)
    code: bytes = b""  # sse: the instruction, run as it is on our CPU (hostsse.c)


@dataclass(frozen=True)
class UnicornStep:
    """An instruction run once in the reusable Unicorn machine."""

    length: int
    mnemonic: str
    text: str
    regs: tuple[int, ...]  # Unicorn consts of the 64-bit registers loaded (and stored back
    # if changed): regs_access() plus every operand register plus known capstone gaps
    fields: tuple[str, ...]  # the matching UserRegs fields
    xmm: tuple[int, ...] = ()  # XMM indices loaded (and stored back if changed)
    needs_fp: bool = False  # XMM or MXCSR involved: fetch user_fpregs
    fs_base: bool = False  # in `regs`; recorded for readers
    gs_base: bool = False
    branch: bool = False  # may transfer control anywhere
    rep: bool = False  # rep-prefixed string op: run to completion
    aligned16: bool = False  # a 16-byte memory operand must be 16-byte aligned
    mem: tuple[MemRef, ...] = ()  # how each memory operand's address is formed
    implicit: tuple[str, ...] = ()  # registers used as addresses implicitly (rsp, rsi, rdi)


@dataclass(frozen=True)
class NativeStep:
    """Not emulated: the caller single-steps it natively."""

    reason: str
    length: int = 0
    mnemonic: str = ""
    text: str = ""
    rep: bool = False  # rep-prefixed string op: step it until RIP leaves


Plan = FastPath | UnicornStep | NativeStep

# Registers capstone 5 leaves out of regs_access() (found by comparing it with
# Unicorn's behaviour over random encodings; see tests/test_emulator.py).
_EXTRA_READ: dict[str, tuple[str, ...]] = {"cmpxchg": ("rax",)}
_EXTRA_WRITE: dict[str, tuple[str, ...]] = {
    "cmpxchg": ("rax", "eflags"),
    "xadd": ("eflags",),
}

_SEGMENT_NAMES = frozenset({"cs", "ds", "es", "fs", "gs", "ss"})



def analyze(
    code: bytes,
    addr: int,
    *,
    fast: bool = True,
    policy_check: bool = True,
    trusted_only: bool = True,
) -> Plan:
    """The Plan for the instruction at the start of `code` (the site's original
    bytes, up to 16), analysed as if at `addr`.

    Only classes the trust table (trust.py) trusts on this CPU are emulated.  `fast=False`
    never returns a FastPath, `trusted_only=False` skips the trust table and
    `policy_check=False` skips it and the refusal tables (not the register
    checks); they exist for the difftest, which is what earns the trust.
    """
    insn = next(_cs.disasm(bytes(code[:16]), addr, 1), None)
    if insn is None:
        return NativeStep(policy.UNDECODABLE)
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    if policy_check:
        reason = refusal(insn, code)
        if reason is None and trusted_only:
            reason = trust.verdict(insn)
        if reason is not None:
            return NativeStep(reason, insn.size, insn.mnemonic, text, repeats(insn))
    if fast:
        fp = _fast_path(insn, text) or _host_sse(insn, code, text)
        if fp is not None:
            return fp
    return _unicorn_step(insn, text, policy_check)


def repeats(insn: capstone.CsInsn) -> bool:
    """A rep/repne string instruction: it traps after every iteration when
    stepped, with RIP still on it (movsd/cmpsd with XMM operands are SSE)."""
    base = insn.mnemonic.split()[-1]
    return (insn.prefix[0] in (0xF2, 0xF3) and base in policy.STRING_OPS
            and "xmm" not in insn.op_str)  # fmt: skip


def _fast_path(insn: capstone.CsInsn, text: str) -> FastPath | None:
    mnem = insn.mnemonic
    ops = insn.operands
    size = insn.size
    legacy = [p for p in insn.prefix if p]
    if mnem in ("nop", "endbr64", "endbr32"):
        return FastPath("nop", size, mnem, text)
    if mnem in ("jmp", "call", "bnd jmp", "bnd call") and len(ops) == 1:
        if ops[0].type != csx.X86_OP_IMM or any(p in (0x66, 0x67) for p in legacy):
            return None
        disp = ((ops[0].imm - (insn.address + size)) + (1 << 63)) % (1 << 64) - (1 << 63)
        op: FastOp = "jmp" if mnem.endswith("jmp") else "call"
        return FastPath(op, size, mnem, text, imm=disp)
    if legacy:
        return None
    if mnem == "push" and len(ops) == 1 and ops[0].type == csx.X86_OP_REG:
        src = insn.reg_name(ops[0].reg)
        return FastPath("push", size, mnem, text, src=src) if src in GPR_NAMES else None
    if mnem == "mov" and len(ops) == 2 and all(o.type == csx.X86_OP_REG for o in ops):
        dst, src = insn.reg_name(ops[0].reg), insn.reg_name(ops[1].reg)
        if dst in GPR_NAMES and src in GPR_NAMES:
            return FastPath("mov", size, mnem, text, dst=dst, src=src)
        return None
    if mnem == "mov" and len(ops) == 2:
        return _fast_load_store(insn, text)
    if mnem in ("add", "sub") and len(ops) == 2:
        if ops[0].type == csx.X86_OP_REG and insn.reg_name(ops[0].reg) == "rsp":
            if ops[1].type == csx.X86_OP_IMM:
                kind: FastOp = "add_rsp" if mnem == "add" else "sub_rsp"
                return FastPath(kind, size, mnem, text, imm=ops[1].imm & MASK64)
    return None


def _host_sse(insn: capstone.CsInsn, code: bytes, text: str) -> FastPath | None:
    """Register-only SSE arithmetic from policy.HOST_SSE: XMM operands, no memory,
    no other register read or written (capstone lists MXCSR as none)."""
    if insn.mnemonic not in policy.HOST_SSE or _vex_kind(code) is not None:
        return None
    prefixes = _legacy_prefixes(code[: insn.size])
    if prefixes.translate(None, b"\x66\xf2\xf3"):
        return None  # segment, address-size or lock prefixes: not this plain form
    if ignored_mandatory_prefix(insn, code, prefixes):
        # #UD on the CPU: run here it would raise SIGILL in the tracer (the
        # policy refuses it, but the difftest explores with the policy off)
        return None
    read_ids, write_ids = insn.regs_access()
    names = [insn.reg_name(r) for r in (*read_ids, *write_ids)]
    names += [
        insn.reg_name(op.reg) if op.type == csx.X86_OP_REG else "memory"
        for op in insn.operands
    ]
    if not names or not all(n.startswith("xmm") for n in names):
        return None
    return FastPath("sse", insn.size, insn.mnemonic, text, code=bytes(code[: insn.size]))


def _fast_load_store(insn: capstone.CsInsn, text: str) -> FastPath | None:
    """`mov r, [base+disp]` / `mov [base+disp], r` with a 32/64-bit register and a
    base (a GPR or RIP) but no index or segment: the commonest memory operands of
    prologues (RIP-relative loads of globals, spills to the stack frame)."""
    ops = insn.operands
    mem_at = 1 if ops[1].type == csx.X86_OP_MEM else 0
    mem, reg_op = ops[mem_at], ops[1 - mem_at]
    if mem.type != csx.X86_OP_MEM or reg_op.type != csx.X86_OP_REG:
        return None
    m = mem.mem
    if mem.size not in (4, 8) or reg_op.size != mem.size or m.index or m.segment:
        return None
    reg = full_register(reg_op.reg)
    base = full_register(m.base) if m.base else None
    if reg is None or base is None or not (is_gpr64(reg.name) and base.field):
        return None
    if base.name != "rip" and not is_gpr64(base.name):
        return None
    if mem_at == 1:
        return FastPath("load", insn.size, insn.mnemonic, text, dst=reg.name,
                        imm=m.disp, base=base.name, size=mem.size)  # fmt: skip
    return FastPath("store", insn.size, insn.mnemonic, text, src=reg.name,
                    imm=m.disp, base=base.name, size=mem.size)  # fmt: skip


def _registers_used(insn: capstone.CsInsn, base: str) -> dict[str, Register] | str:
    """Every register `insn` reads or writes, by name (fs_base/gs_base for an
    fs:/gs: operand); or why one of them cannot be transferred."""
    read_ids, write_ids = insn.regs_access()
    used: dict[str, Register] = {"rip": RIP, "eflags": EFLAGS}
    mem_ops = [op for op in insn.operands if op.type == csx.X86_OP_MEM]
    segments = {op.mem.segment for op in mem_ops}
    for ids, is_write in ((read_ids, False), (write_ids, True)):
        for rid in ids:
            reg = full_register(rid)
            if reg is None:
                if not is_write and rid in segments:
                    continue  # a segment override: fs/gs become a base below, the rest are 0
                return _register_reason(insn.reg_name(rid))
            used[reg.name] = reg
    # regs_access() misses explicit operands too (capstone 5: `test [m], eax`
    # lists neither eax nor rflags), so add every register the operands name.
    # Loading too many costs nothing but time: unchanged ones are not written.
    for op in insn.operands:
        if op.type == csx.X86_OP_REG:
            reg = full_register(op.reg)
            if reg is None:
                return _register_reason(insn.reg_name(op.reg))
            used[reg.name] = reg
    for op in mem_ops:
        for rid in (op.mem.base, op.mem.index):
            reg = full_register(rid) if rid else None
            if reg is not None:
                used[reg.name] = reg
        # cs/ds/es/ss overrides have base 0 in 64-bit mode
        if op.mem.segment == csx.X86_REG_FS:
            used["fs_base"] = FS_BASE
        elif op.mem.segment == csx.X86_REG_GS:
            used["gs_base"] = GS_BASE
    for name in _EXTRA_READ.get(base, ()) + _EXTRA_WRITE.get(base, ()):
        used[name] = BY_NAME[name]
    return used


def _unicorn_step(insn: capstone.CsInsn, text: str, policy_check: bool) -> Plan:
    mnem = insn.mnemonic
    base = mnem.split()[-1]
    used = _registers_used(insn, base)
    if isinstance(used, str):
        return NativeStep(used, insn.size, mnem, text)
    mem_ops = [op for op in insn.operands if op.type == csx.X86_OP_MEM]
    xmm = tuple(sorted(r.xmm for r in used.values() if r.xmm >= 0))
    sse = bool(xmm) or any(g in policy.SSE_GROUPS for g in insn.groups)
    if sse and policy_check and base not in policy.SSE_SAFE:
        return NativeStep(policy.SSE_FP, insn.size, mnem, text)
    needs_fp = bool(xmm) or base == "stmxcsr"
    aligned16 = (
        bool(xmm) and base not in policy.SSE_UNALIGNED_OK and any(op.size == 16 for op in mem_ops)
    )
    gprs = tuple(r for r in used.values() if r.field is not None)
    rep = repeats(insn)
    refs, implicit = mem_refs(insn)
    branch = any(g in _BRANCH_GROUPS for g in insn.groups) or base.startswith("loop")
    return UnicornStep(
        regs=tuple(r.uc for r in gprs),
        fields=tuple(r.field for r in gprs if r.field is not None),
        xmm=xmm,
        needs_fp=needs_fp,
        fs_base="fs_base" in used,
        gs_base="gs_base" in used,
        branch=branch,
        rep=rep,
        aligned16=aligned16,
        mem=refs,
        implicit=implicit,
        length=insn.size,
        mnemonic=mnem,
        text=text,
    )


def _register_reason(name: str) -> str:
    if name in _SEGMENT_NAMES:
        return policy.SEGMENT
    return policy.UNKNOWN_REGISTER.format(reg=name)


def describe(plan: Plan) -> str:
    """One line for logs and `--explain`: strategy, instruction, and why."""
    if isinstance(plan, NativeStep):
        return f"native   {plan.text or '?'}: {plan.reason}"
    kind = "fast" if isinstance(plan, FastPath) else "unicorn"
    return f"{kind:8} {plan.text}"
