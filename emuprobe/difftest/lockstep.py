"""Lockstep: single-step a real program and, at every K-th instruction, run the
engine's per-hit path on the state before it and compare with the CPU's after.

The engine runs against the live process with a memory and an FP seam that
record its stores and FP write-back instead of applying them; then the CPU
executes the instruction (PTRACE_SINGLESTEP) and the recorded results must
equal the real ones.  Only instructions the engine would emulate (trusted
classes, policy allowed) are compared; the rest are counted by reason.

Compared: GPRs, RIP, FS/GS base, the arithmetic flags, XMM0-15 and MXCSR
when the instruction uses them, every store the engine made, and the bytes
of each explicit memory operand (a store only the CPU made).  A fault the
CPU raises where the engine emulated is a mismatch too.  Bits the SDM leaves
undefined are compared as well, as a traced program would see them: a
difference only there is tallied as "masked", and is a mismatch unless
EMUPROBE_TRUST_MASKED=1 (which trusts such classes) is set.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from capstone import x86_const as csx

from emuprobe.difftest.oracle import end_traced
from emuprobe.difftest.runner import decode
from emuprobe.difftest.undefined import NONE, Undefined, undefined
from emuprobe.exec.execute import Emulated, Emulator
from emuprobe.sys import ptrace as pt
from emuprobe.sys.memory import ProcessMemory
from emuprobe.x86 import policy, trust
from emuprobe.x86.decode import NativeStep, Plan, UnicornStep, analyze
from emuprobe.x86.regs import EMULATED_FLAGS, GPR_NAMES, MASK64, full_register


class RecordingMemory(ProcessMemory):
    """The tracee's memory, except that writes are recorded, not made."""

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.stores: list[tuple[int, bytes]] = []

    def write(self, addr: int, data: bytes) -> None:
        self.stores.append((addr, bytes(data)))


class RecordingFp(pt.ThreadFp):
    """FP access that reads the thread's state and records what is set."""

    __slots__ = ("written",)

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.written: pt.UserFpRegs | None = None

    def set(self, fp: pt.UserFpRegs) -> None:
        self.written = pt.UserFpRegs.from_buffer_copy(fp)


@dataclass
class Report:
    steps: int = 0
    compared: Counter[str] = field(default_factory=Counter)  # mnemonic -> instructions compared
    mismatched: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> instructions not compared
    examples: dict[str, list[str]] = field(default_factory=dict)  # mnemonic -> first diffs
    masked: Counter[str] = field(default_factory=Counter)  # differed only in undefined bits
    exit_status: int = 0


def _reason_kind(reason: str) -> str:
    """A refusal reason without its addresses and counts, for tallying."""
    return " ".join(w for w in reason.split(":")[0].split() if not w[:1].isdigit())


def _spawn(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            pt.traceme()
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status = pt.waitpid(pid)
    if not os.WIFSTOPPED(status):
        raise OSError(f"{argv[0]}: did not start under ptrace (status {status:#x})")
    pt.set_options(pid, pt.PTRACE_O_EXITKILL | pt.PTRACE_O_TRACEEXEC)
    return pid


def _operands_ea(insn: object, regs: pt.UserRegs) -> list[tuple[int, int]]:
    """(address, size) of each explicit memory operand of `insn` at `regs`."""
    out = []
    for op in insn.operands:  # type: ignore[attr-defined]
        if op.type != csx.X86_OP_MEM or op.size == 0:
            continue
        m = op.mem
        ea = m.disp
        if m.base == csx.X86_REG_RIP:
            ea += regs.rip + insn.size  # type: ignore[attr-defined]
        elif m.base:
            base = full_register(m.base)
            if base is None or base.field is None:
                continue
            ea += getattr(regs, base.field)
        if m.index:
            index = full_register(m.index)
            if index is None or index.field is None:
                continue
            ea += getattr(regs, index.field) * m.scale
        if m.segment == csx.X86_REG_FS:
            ea += regs.fs_base
        elif m.segment == csx.X86_REG_GS:
            ea += regs.gs_base
        out.append((ea & MASK64, op.size))
    return out


def _current_cpu() -> int:
    """The CPU this process last ran on (field 39 of /proc/self/stat)."""
    stat = open("/proc/self/stat").read()  # noqa: SIM115 - one read
    return int(stat.rsplit(")", 1)[1].split()[36])


class Lockstep:
    def __init__(self, argv: list[str], every: int = 1) -> None:
        self.every = max(1, every)
        # Tracer and tracee on one CPU: every step is a stop and a wake-up of
        # the other, and across CPUs that costs 4x (6,500 against 23,500
        # steps/s on these 2-vCPU machines).  The tracee inherits the mask.
        self._affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {_current_cpu()})
        try:
            self.pid = _spawn(argv)
        except BaseException:
            os.sched_setaffinity(0, self._affinity)
            raise
        self.mem = RecordingMemory(self.pid)
        self.emu = Emulator()
        self.plans: dict[tuple[int, bytes], tuple[Plan, Any]] = {}  # -> (plan, capstone insn)
        self.report = Report()

    def _read_code(self, rip: int) -> bytes:
        for n in (16, (0x1000 - rip % 0x1000) or 16):
            try:
                return self.mem.read(rip, n)
            except OSError:
                continue
        return b""

    def run(self, progress: Callable[[Report], None] | None = None) -> Report:
        rep = self.report
        pending_sig = 0
        after_event = False
        try:
            while True:
                check = None
                if rep.steps % self.every == 0 and pending_sig == 0 and not after_event:
                    check = self._prepare(pt.getregs(self.pid))
                after_event = False
                status = self._step(pending_sig, check)
                pending_sig = 0
                if progress is not None and rep.steps % 4096 == 0:
                    progress(rep)
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    rep.exit_status = (
                        os.WEXITSTATUS(status)
                        if os.WIFEXITED(status)
                        else 128 + os.WTERMSIG(status)
                    )
                    return rep
                if pt.stop_event(status):  # exec: a new address space
                    self.mem.close()
                    self.mem = RecordingMemory(self.pid)
                    self.plans.clear()
                    # The next step only finishes the execve (rax becomes 0)
                    # and stops on the entry point: no instruction to compare.
                    after_event = True
                    continue
                sig = os.WSTOPSIG(status)
                if sig == signal.SIGTRAP and check is None:
                    continue  # the step's own trap (siginfo only matters when comparing)
                completed = self._completed(sig)
                if not completed:
                    pending_sig = sig  # the program's own signal: deliver it
                if check is not None:
                    check.verify(completed, sig)
        finally:
            self.close()

    def _completed(self, sig: int) -> bool:
        return sig == signal.SIGTRAP and pt.getsiginfo(self.pid).si_code in (
            pt.TRAP_TRACE,
            pt.TRAP_BRKPT,
        )

    def _step(self, sig: int, check: _Check | None) -> int:
        """One instruction on the CPU; a rep string op the engine ran to
        completion is stepped until it leaves its address."""
        while True:
            pt.singlestep(self.pid, sig)
            _, status = pt.waitpid(self.pid)
            self.report.steps += 1
            if check is None or not check.repeat or not os.WIFSTOPPED(status):
                return status
            if not self._completed(os.WSTOPSIG(status)) or pt.getregs(self.pid).rip != check.rip:
                return status
            sig = 0

    def close(self) -> None:
        if self.pid:
            end_traced(self.pid, self.mem)
            self.pid = 0
            os.sched_setaffinity(0, self._affinity)

    def _prepare(self, regs: pt.UserRegs) -> _Check | None:
        """Emulate the instruction at regs.rip from `regs`; the check to run
        once the CPU has executed it (None if it is not compared)."""
        rip = regs.rip
        code = self._read_code(rip)
        key = (rip, code)
        cached = self.plans.get(key)
        if cached is None:
            cached = self.plans[key] = (analyze(code, rip), decode(code, rip))
        plan, insn = cached
        rep = self.report
        if isinstance(plan, NativeStep):
            rep.skipped[plan.reason.split(":")[0] if plan.reason else "native"] += 1
            return None
        before = pt.UserRegs.from_buffer_copy(regs)
        after = pt.UserRegs.from_buffer_copy(regs)
        self.mem.stores.clear()
        fp = RecordingFp(self.pid)
        unicorn = isinstance(plan, UnicornStep)
        fp_before = pt.getfpregs(self.pid) if unicorn and plan.needs_fp else None  # type: ignore[union-attr]
        result = self.emu.step(plan, code, after, self.mem, fp)
        if not isinstance(result, Emulated):
            rep.skipped["refused at this hit (" + _reason_kind(result.reason) + ")"] += 1
            return None
        operands = _operands_ea(insn, before) if insn is not None else []
        old = {ea: self._peek(ea, size) for ea, size in operands}
        repeat = unicorn and plan.rep and regs.rcx <= policy.REP_LIMIT  # type: ignore[union-attr]
        return _Check(self, plan.mnemonic, insn, before, after, list(self.mem.stores), old, fp,
                      fp_before, rip, bool(repeat))  # fmt: skip

    def _peek(self, addr: int, size: int) -> bytes | None:
        try:
            return self.mem.read(addr, size)
        except (OSError, OverflowError):
            return None

    def _fail(self, mnem: str, diffs: list[str]) -> None:
        self.report.mismatched[mnem] += 1
        self.report.examples.setdefault(mnem, diffs)


@dataclass
class _Check:
    """What the engine did with one instruction, to hold against the CPU."""

    ls: Lockstep
    mnemonic: str
    insn: Any
    before: pt.UserRegs
    eng: pt.UserRegs
    stores: list[tuple[int, bytes]]
    old: dict[int, bytes | None]  # explicit memory operands' bytes before
    fp: RecordingFp
    fp_before: pt.UserFpRegs | None
    rip: int
    repeat: bool

    def verify(self, completed: bool, sig: int) -> None:
        ls = self.ls
        ls.report.compared[self.mnemonic] += 1
        if not completed:
            ls._fail(self.mnemonic, [f"cpu raised {signal.Signals(sig).name}, engine emulated"])
            return
        cpu = pt.getregs(ls.pid)
        diffs = self._diffs(cpu, NONE)
        if not diffs:
            return
        if self.insn is not None and not self._diffs(cpu, undefined(self.insn, self.before, cpu)):
            ls.report.masked[self.mnemonic] += 1
            if os.environ.get(trust.ENV_MASKED) == "1":
                return
        ls._fail(self.mnemonic, diffs)

    def _diffs(self, cpu: pt.UserRegs, undef: Undefined) -> list[str]:
        """What differs, leaving out the bits `undef` names."""
        eng, ls = self.eng, self.ls
        skip_regs = undef.regs
        diffs = []
        for name in (*GPR_NAMES, "rip", "fs_base", "gs_base"):
            a, b = getattr(cpu, name), getattr(eng, name)
            if a != b and name not in skip_regs:
                diffs.append(f"{name}: cpu {a:#x} engine {b:#x}")
        mask = EMULATED_FLAGS & ~undef.flags
        if (cpu.eflags ^ eng.eflags) & mask:
            diffs.append(f"eflags: cpu {cpu.eflags & mask:#x} engine {eng.eflags & mask:#x}")
        for addr, data in self.stores:
            now = ls._peek(addr, len(data))
            if now != data:
                diffs.append(f"store at {addr:#x}: cpu {now and now.hex()} engine {data.hex()}")
        stored = {a for a, _ in self.stores}
        for ea, was in self.old.items():
            if was is not None and ea not in stored and ls._peek(ea, len(was)) != was:
                diffs.append(f"memory at {ea:#x}: the cpu stored there, the engine did not")
        if self.fp_before is not None:
            cpu_fp = pt.getfpregs(ls.pid)
            eng_fp = self.fp.written or self.fp_before
            for i in range(16):
                a = bytes(cpu_fp.xmm_space)[16 * i : 16 * i + 16]
                b = bytes(eng_fp.xmm_space)[16 * i : 16 * i + 16]
                if a != b:
                    diffs.append(f"xmm{i}: cpu {a[::-1].hex()} engine {b[::-1].hex()}")
            if cpu_fp.mxcsr != eng_fp.mxcsr:
                diffs.append(f"mxcsr: cpu {cpu_fp.mxcsr:#x} engine {eng_fp.mxcsr:#x}")
        return diffs


def lockstep(argv: list[str], every: int = 1,
             progress: Callable[[Report], None] | None = None) -> Report:  # fmt: skip
    return Lockstep(argv, every).run(progress)


__all__ = ["Lockstep", "Report", "lockstep", "RecordingMemory", "RecordingFp"]
