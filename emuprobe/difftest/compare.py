"""The comparator: the CPU's outcome against the engine's, field by field.

Compared: general registers, RIP, FS/GS base, the arithmetic flags and DF,
XMM0-15, MXCSR, the bytes of every sandbox page, and the fault.  The engine
must refuse (and change nothing) exactly when the CPU faults, because the
native fallback it then takes is what raises the real fault; a refusal that
claims no fault ("store to an executable page", "AC set", ...) is always
allowed, since the fallback is correct by construction.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from capstone import CsInsn

from emuprobe.difftest.oracle import CODE, CODE_LEN, DATA, DATA_LEN, RO, Input, Outcome
from emuprobe.difftest.undefined import NONE, Undefined, undefined
from emuprobe.exec.execute import Emulated, StepResult
from emuprobe.x86.regs import EMULATED_FLAGS, GPR_NAMES

MATCH = "match"  # both completed, same state
FAULT = "fault"  # both faulted (the engine refused, claiming the CPU's fault class)
REFUSED = "refused"  # the engine refused without claiming a fault; nothing changed
MISMATCH = "mismatch"

# Fault classes: the engine claims "a memory fault", not which of #GP/#SS/#PF,
# and the kernel turns those into SIGSEGV or SIGBUS; the fallback then raises
# the CPU's own signal with its own siginfo.
_CLASS: dict[int, str] = {
    signal.SIGSEGV: "memory",
    signal.SIGBUS: "memory",
    signal.SIGFPE: "arithmetic",
    signal.SIGILL: "illegal",
    signal.SIGTRAP: "trap",
}
# QEMU keeps the last exception pending across runs (env->old_exception is only
# cleared when an exception is delivered through the IDT, which Unicorn never
# does), so a contributory exception after an earlier one reads as #DF (8):
# it says "a fault", not which.
ANY = "any"
_EXCEPTION = {0: "arithmetic", 1: "trap", 3: "trap", 4: "memory", 5: "memory", 6: "illegal",
              8: ANY, 12: "memory", 13: "memory", 14: "memory", 16: "arithmetic", 17: "memory",
              19: "arithmetic"}  # fmt: skip
_MEMORY_WORDS = (
    "unmapped", "unreadable", "non-writable", "misaligned", "to non-canonical",
    "cannot read tracee page", "UC_ERR_READ", "UC_ERR_WRITE", "UC_ERR_FETCH",
)  # fmt: skip


def signal_class(sig: int) -> str:
    return _CLASS.get(sig, signal.Signals(sig).name if sig in signal.valid_signals() else str(sig))


def claimed_fault(reason: str) -> str | None:
    """The fault class a refusal claims the CPU would raise, or None if it
    claims none (a deliberate fallback)."""
    m = re.match(r"CPU exception (\d+)", reason)
    if m:
        return _EXCEPTION.get(int(m.group(1)), f"exception {m.group(1)}")
    if "invalid instruction" in reason.lower():
        return "illegal"
    if any(w in reason for w in _MEMORY_WORDS):
        return "memory"
    if reason.startswith("unicorn:"):
        return "unknown"
    return None


@dataclass(frozen=True)
class Verdict:
    kind: str
    diffs: tuple[str, ...] = ()
    masked: bool = False  # equal only because undefined bits were left out
    cite: str = ""  # the SDM rule that masked something


def _mem_addr(offset: int) -> int:
    for base, length in ((CODE, CODE_LEN), (DATA, DATA_LEN), (RO, 0x1000)):
        if offset < length:
            return base + offset
        offset -= length
    return -1


def _state_diffs(cpu: Outcome, eng: Outcome, undef: Undefined) -> tuple[list[str], bool]:
    """Differences outside `undef`, and whether `undef` hid any."""
    diffs: list[str] = []
    hidden = False
    for name in (*GPR_NAMES, "rip", "fs_base", "gs_base"):
        n, e = getattr(cpu.regs, name), getattr(eng.regs, name)
        if n != e:
            if name in undef.regs:
                hidden = True
            else:
                diffs.append(f"{name}: cpu {n:#x} engine {e:#x}")
    n, e = cpu.regs.eflags & EMULATED_FLAGS, eng.regs.eflags & EMULATED_FLAGS
    if n != e:
        if (n ^ e) & ~undef.flags:
            diffs.append(f"eflags: cpu {n:#x} engine {e:#x} (undefined {undef.flags:#x})")
        else:
            hidden = True
    nx, ex = bytes(cpu.fp.xmm_space)[:256], bytes(eng.fp.xmm_space)[:256]
    if nx != ex:
        for i in range(16):
            a, b = nx[16 * i : 16 * i + 16], ex[16 * i : 16 * i + 16]
            if a != b:
                diffs.append(f"xmm{i}: cpu {a[::-1].hex()} engine {b[::-1].hex()}")
    if cpu.fp.mxcsr != eng.fp.mxcsr:
        diffs.append(f"mxcsr: cpu {cpu.fp.mxcsr:#x} engine {eng.fp.mxcsr:#x}")
    if cpu.memory != eng.memory:
        diffs.append(_memory_diff(cpu.memory, eng.memory))
    return diffs, hidden


def _memory_diff(a: bytes, b: bytes) -> str:
    first = next(i for i in range(len(a)) if a[i] != b[i])
    last = max(i for i in range(first, min(first + 64, len(a))) if a[i] != b[i])
    span = slice(first, last + 1)
    return f"memory at {_mem_addr(first):#x}: cpu {a[span].hex()} engine {b[span].hex()}"


def _unchanged(case: Input, eng: Outcome, fp_sets: int) -> list[str]:
    """A refusal must leave registers, FP state and memory as they were."""
    diffs = []
    for name in (*GPR_NAMES, "rip", "fs_base", "gs_base"):
        a, b = getattr(case.regs, name), getattr(eng.regs, name)
        if a != b:
            diffs.append(f"refusal changed {name}: {a:#x} -> {b:#x}")
    if (case.regs.eflags ^ eng.regs.eflags) & EMULATED_FLAGS:
        diffs.append("refusal changed eflags")
    if fp_sets or bytes(case.fp.xmm_space) != bytes(eng.fp.xmm_space):
        diffs.append("refusal changed the FP state")
    before = case.memory()
    if before != eng.memory:
        diffs.append("refusal changed " + _memory_diff(before, eng.memory))
    return diffs


def compare(
    insn: CsInsn,
    case: Input,
    cpu: Outcome,
    result: StepResult,
    eng: Outcome,
    fp_sets: int = 0,
) -> Verdict:
    """The verdict on one case: `cpu` from the native step of `case`, `result`
    and `eng` from the engine's per-hit path on the same state."""
    if isinstance(result, Emulated):
        if cpu.signal:
            what = f"cpu raised {signal_class(cpu.signal)} fault ({_sig(cpu)}), engine emulated"
            return Verdict(MISMATCH, (what,))
        undef = undefined(insn, case.regs, cpu.regs)
        diffs, hidden = _state_diffs(cpu, eng, undef)
        if diffs:
            return Verdict(MISMATCH, tuple(diffs))
        return Verdict(MATCH, masked=hidden, cite=undef.cite if hidden else "")
    changed = _unchanged(case, eng, fp_sets)
    if changed:
        return Verdict(MISMATCH, tuple(changed))
    claim = claimed_fault(result.reason)
    if claim is None:
        return Verdict(REFUSED, (result.reason,))
    if not cpu.signal:
        return Verdict(
            MISMATCH, (f"engine claims a {claim} fault ({result.reason}), cpu completed",)
        )
    if claim not in (ANY, signal_class(cpu.signal)):
        what = f"fault class: cpu {signal_class(cpu.signal)} ({_sig(cpu)}), engine {result.reason}"
        return Verdict(MISMATCH, (what,))
    return Verdict(FAULT, (result.reason,))


def _sig(o: Outcome) -> str:
    return f"{signal.Signals(o.signal).name} si_code {o.si_code} si_addr {o.si_addr:#x}"


__all__ = ["Verdict", "compare", "claimed_fault", "MATCH", "FAULT", "REFUSED", "MISMATCH", "NONE"]
