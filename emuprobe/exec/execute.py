"""The per-hit entry point: make the displaced instruction take effect, or refuse.

    emu = Emulator()                       # once per session: one Unicorn
    plan = analyze(original_bytes, addr)   # once per site
    result = emu.step(plan, original_bytes, regs, mem, fp)   # at every hit

`Emulated` means `regs` (and the tracee's memory, and its FP registers if
`fp_written`) now hold the state after the instruction; the caller only has to
SETREGS and continue.  `Refused` means nothing was changed and the caller must
execute the instruction natively, which also delivers any fault it raises.
"""

from __future__ import annotations

from dataclasses import dataclass

from emuprobe.exec import fastpath, hostsse
from emuprobe.exec.cmachine import CMachine, compiled_module
from emuprobe.exec.machine import Machine
from emuprobe.exec.ucengine import FpAccess
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.ptrace import UserRegs
from emuprobe.x86.decode import FastPath, NativeStep, Plan, UnicornStep
from emuprobe.x86.regs import AC, MASK64

__all__ = ["Emulator", "Emulated", "Refused", "StepResult", "FpAccess"]


@dataclass(frozen=True)
class Emulated:
    fp_written: bool  # the thread's FP/SSE registers were set through FpAccess


@dataclass(frozen=True)
class Refused:
    reason: str


StepResult = Emulated | Refused

_DONE = Emulated(False)
_DONE_FP = Emulated(True)
_AC_SET = Refused("AC flag set: alignment checks are not modelled")


class Emulator:
    """Executes Plans for every site and process of a session."""

    def __init__(self, compiled: bool | None = None) -> None:
        """`compiled`: the Unicorn machine in C (None: when it is built, unless
        EMUPROBE_CMACHINE=0), else the pure-Python one."""
        module = compiled_module() if compiled is not False else None
        if compiled and module is None:
            raise RuntimeError("the compiled machine is not built")
        self.machine: Machine | CMachine = Machine() if module is None else CMachine(module)

    def step(
        self, plan: Plan, code: bytes, regs: UserRegs, mem: ProcessMemory, fp: FpAccess
    ) -> StepResult:
        """Apply the instruction `code` (the site's original bytes, regs.rip ==
        the site) to `regs` and the tracee, or refuse having changed nothing."""
        if type(plan) is FastPath:
            if regs.eflags & AC:
                return _AC_SET
            if plan.op == "sse":  # XMM state only: through FpAccess
                fpregs = fp.get()
                reason = hostsse.run(plan.code, fpregs)
                if reason is not None:
                    return Refused(reason)
                fp.set(fpregs)
                regs.rip = (regs.rip + plan.length) & MASK64
                return _DONE_FP
            reason = fastpath.execute(plan, regs, mem)
            return _DONE if reason is None else Refused(reason)
        if type(plan) is UnicornStep:
            if regs.eflags & AC:
                return _AC_SET
            reason, fp_written = self.machine.run(plan, code, regs, mem, fp)
            if reason is not None:
                return Refused(reason)
            return _DONE_FP if fp_written else _DONE
        assert isinstance(plan, NativeStep)
        return Refused(plan.reason)
