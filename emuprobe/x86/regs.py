"""The one register table: name -> Unicorn constant -> where the tracee keeps it.

General registers, RIP, RFLAGS and the FS/GS bases live in `UserRegs`
(user_regs_struct); XMM0-15 and MXCSR live in `UserFpRegs` (user_fpregs_struct,
four u32 per XMM register in `xmm_space`).  Syncing the tracee and Unicorn is a
loop over the rows a Plan names, so nothing else in the emulator spells a
register out.
"""

from __future__ import annotations

from dataclasses import dataclass

from capstone import x86_const as csx
from unicorn import x86_const as ucx

MASK64 = (1 << 64) - 1

# RFLAGS bits.
CF = 0x0001
PF = 0x0004
AF = 0x0010
ZF = 0x0040
SF = 0x0080
TF = 0x0100
IF = 0x0200
DF = 0x0400
OF = 0x0800
AC = 0x40000
RESERVED_ONE = 0x0002  # bit 1 always reads as 1
ARITH_FLAGS = CF | PF | AF | ZF | SF | OF
# What an emulated instruction may change. Everything else (TF, IF, RF, AC,
# IOPL, ID, ...) stays as the tracee had it: Unicorn does not model it, and
# loading TF into Unicorn makes it raise an exception.
EMULATED_FLAGS = ARITH_FLAGS | DF


@dataclass(frozen=True)
class Register:
    """One transferable register."""

    name: str
    uc: int  # Unicorn constant
    field: str | None  # UserRegs field, or None for the FP/SSE state
    xmm: int = -1  # XMM index (into UserFpRegs.xmm_space, 4 u32 each), else -1


GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


def _uc(name: str) -> int:
    return int(getattr(ucx, f"UC_X86_REG_{name.upper()}"))


GPRS = tuple(Register(n, _uc(n), n) for n in GPR_NAMES)
RIP = Register("rip", _uc("rip"), "rip")
EFLAGS = Register("eflags", _uc("eflags"), "eflags")
FS_BASE = Register("fs_base", _uc("fs_base"), "fs_base")
GS_BASE = Register("gs_base", _uc("gs_base"), "gs_base")
XMMS = tuple(Register(f"xmm{i}", _uc(f"xmm{i}"), None, i) for i in range(16))
MXCSR = Register("mxcsr", _uc("mxcsr"), None)

TABLE: tuple[Register, ...] = GPRS + (RIP, EFLAGS, FS_BASE, GS_BASE) + XMMS + (MXCSR,)
BY_NAME: dict[str, Register] = {r.name: r for r in TABLE}
BY_UC: dict[int, Register] = {r.uc: r for r in TABLE}


def _subregister_names() -> dict[str, str]:
    """Every x86-64 name of (part of) a transferable register -> the full name."""
    full: dict[str, str] = {n: n for n in GPR_NAMES}
    for x in "abcd":
        for sub in (f"e{x}x", f"{x}x", f"{x}l", f"{x}h"):
            full[sub] = f"r{x}x"
    for x in ("si", "di", "bp", "sp"):
        for sub in (f"e{x}", x, f"{x}l"):
            full[sub] = f"r{x}"
    for i in range(8, 16):
        for sub in (f"r{i}d", f"r{i}w", f"r{i}b"):
            full[sub] = f"r{i}"
    for sub in ("rip", "eip", "ip"):
        full[sub] = "rip"
    # capstone calls RFLAGS "rflags" but its constant is X86_REG_EFLAGS
    for sub in ("rflags", "eflags", "flags"):
        full[sub] = "eflags"
    for i in range(16):
        full[f"xmm{i}"] = f"xmm{i}"
    return full


SUBREGISTERS = _subregister_names()


def _capstone_ids() -> dict[int, Register]:
    out: dict[int, Register] = {}
    for attr in dir(csx):
        if not attr.startswith("X86_REG_"):
            continue
        name = attr[len("X86_REG_") :].lower()
        full = SUBREGISTERS.get(name)
        if full is not None:
            out[int(getattr(csx, attr))] = BY_NAME[full]
    return out


CAPSTONE_TO_FULL: dict[int, Register] = _capstone_ids()


def full_register(cs_reg: int) -> Register | None:
    """The full register holding capstone register `cs_reg` (eax/ax/al/ah -> rax,
    r8d -> r8, eip -> rip, rflags -> eflags, xmm3 -> xmm3); None if the emulator
    does not transfer it (segment, x87, MMX, YMM/ZMM, mask, control registers)."""
    return CAPSTONE_TO_FULL.get(cs_reg)


def is_gpr64(name: str) -> bool:
    return name in GPR_NAMES


def canonical(addr: int) -> bool:
    """Canonical under 4-level paging.  A branch elsewhere raises #GP at the
    branch itself, so it must go native; with LA57 this refuses a few good
    addresses too, which only costs a native step."""
    return addr < 0x0000_8000_0000_0000 or addr >= 0xFFFF_8000_0000_0000
