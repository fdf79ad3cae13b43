"""What both Unicorn machines share: a fresh engine ready for one-instruction
runs, the interface through which they reach a thread's FP/SSE state, and
the batched register transfers.
The compiled machine (cmachine.py, machine.c) is the one on the hit path;
machine.py is the same machine in pure Python."""

from __future__ import annotations

import ctypes
import operator
from collections.abc import Callable
from typing import Any, Protocol, cast

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc

from emuprobe.sys.maps import PAGE
from emuprobe.sys.ptrace import UserFpRegs, UserRegs
from emuprobe.x86.regs import MXCSR, XMMS

HLT = b"\xf4"


class FpAccess(Protocol):
    """The tracee thread's FP/SSE registers, fetched only when a Plan needs them."""

    def get(self) -> UserFpRegs: ...

    def set(self, fp: UserFpRegs) -> None: ...


def new_engine() -> Any:
    """A Unicorn engine for x86-64, ready for one-instruction runs."""
    # Any: unicorn's stubs describe the Python 2 binding (no ctl_flush_tb, aux1)
    uc: Any = cast(Any, Uc(UC_ARCH_X86, UC_MODE_64))
    # Unicorn adds its instruction-counting hook on the first count>0 run
    # and flushes every block when it is removed (count=0): run once now,
    # before anything is translated, and never pass count=0.
    uc.mem_map(PAGE, PAGE, UC_PROT_ALL)
    uc.mem_write(PAGE, b"\x90" + HLT)
    uc.emu_start(PAGE, 0, 0, 1)
    uc.mem_unmap(PAGE, PAGE)
    uc.ctl_flush_tb()
    return uc


class Batch:
    """Precomputed uc_reg_{write,read}_batch arguments for one register tuple."""

    def __init__(self, ucs: tuple[int, ...], fields: tuple[str, ...]) -> None:
        n = len(ucs)
        self.n = n
        self.ids = (ctypes.c_int * n)(*ucs)
        self.vals = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.vals)
        self.ptrs = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))
        self.fields = fields
        self.get: Callable[[UserRegs], tuple[int, ...]] = operator.attrgetter(*fields)
        self.rip = fields.index("rip")
        self.eflags = fields.index("eflags")


class XmmBatch:
    """The same for XMM registers (16-byte slots) plus MXCSR in the last slot."""

    def __init__(self, xmm: tuple[int, ...]) -> None:
        ucs = [XMMS[i].uc for i in xmm] + [MXCSR.uc]
        n = len(ucs)
        self.n = n
        self.xmm = xmm
        self.ids = (ctypes.c_int * n)(*ucs)
        self.buf = (ctypes.c_uint8 * (16 * n))()
        self.base = ctypes.addressof(self.buf)
        self.ptrs = (ctypes.c_void_p * n)(*(self.base + 16 * i for i in range(n)))
        self.mxcsr = ctypes.c_uint32.from_address(self.base + 16 * (n - 1))

    def read_from(self, fpregs: UserFpRegs) -> None:
        """Fill the slots from the thread's FP state (XMM registers and MXCSR)."""
        src = ctypes.addressof(fpregs.xmm_space)
        for slot, x in enumerate(self.xmm):
            ctypes.memmove(self.base + 16 * slot, src + 16 * x, 16)
        self.mxcsr.value = fpregs.mxcsr

    def write_back(self, fpregs: UserFpRegs) -> None:
        """Copy the XMM registers Unicorn left in the slots into the thread's FP state."""
        dst = ctypes.addressof(fpregs.xmm_space)
        for slot, x in enumerate(self.xmm):
            ctypes.memmove(dst + 16 * x, self.base + 16 * slot, 16)
