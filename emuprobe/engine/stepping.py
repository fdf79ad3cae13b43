"""The native fallback: run the displaced instruction on the CPU itself.

Stop every other thread of the mm, put the original byte back, single-step
the hitting thread, plant the int3 again, resume everyone.  No thread can run
through the site unobserved because none runs while the byte is restored.
Used for what must not be emulated (syscalls, atomics, CPU-state reads) and
whenever the emulator refuses a hit (e.g. it would fault: the real fault must
come from the real CPU, with the real siginfo).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from emuprobe.engine.registry import SYNC_FAULTS, Registry
from emuprobe.engine.tracee import Thread
from emuprobe.sys import ptrace


@dataclass
class StepOutcome:
    """How the thread should be resumed after the step.

    `deliver` is a signal to inject when resuming (0: none); `siginfo` is set
    when that signal was held back during the step and must keep its original
    siginfo.  `left_stopped` means the thread's stop was queued in `pending`
    (an event such as clone or exec happened inside the step) or it is gone:
    the caller must not resume it.
    """

    deliver: int = 0
    siginfo: ptrace.SigInfo | None = None
    left_stopped: bool = False
    extra: list[tuple[int, ptrace.SigInfo]] = field(default_factory=list)


def native_step(
    reg: Registry,
    thread: Thread,
    addr: int,
    regs: ptrace.UserRegs,
    repeats: bool = False,
    stop_world: bool = True,
    program_tf: bool = False,
) -> StepOutcome:
    """Execute the instruction displaced at `addr` natively; regs.rip must be `addr`.

    `repeats`: a rep-prefixed string instruction, which traps after every
    iteration with RIP still at `addr`; it is stepped until RIP leaves.
    `stop_world=False` is the naive in-place design (--strategy inplace): the
    other threads keep running while the byte is restored, and any of them
    that passes the site meanwhile is not seen.  It exists to show that loss.
    """
    aspace = thread.process.aspace
    others = (
        reg.stop_threads([t for t in reg.sharing(aspace) if t is not thread]) if stop_world else []
    )
    outcome = StepOutcome()
    restored = False
    try:
        ptrace.setregs(thread.tid, regs)
        restored = aspace.restore_byte(addr)  # False: our 0xcc was replaced meanwhile
        outcome = single_step(reg, thread, addr, repeats, program_tf)
    finally:
        # An exec inside the step replaced the mm: the old one is gone and the
        # new image must not get a stray int3.
        if restored and thread.process.aspace is aspace:
            try:
                aspace.replant_byte(addr)
            except OSError:
                pass
        reg.resume_all(others)
    return outcome


def single_step(reg: Registry, thread: Thread, addr: int, repeats: bool = False,
                program_tf: bool = False) -> StepOutcome:  # fmt: skip
    """Single-step `thread`, whose RIP is `addr`, until the instruction there has run.

    Signals that arrive first are held back (see StepOutcome); the thread is
    left in its step stop for the caller to fix up and resume.  With
    `program_tf` (the program had set EFLAGS.TF itself) the step's trap is
    the program's too, and is delivered.
    """
    tid = thread.tid
    held: list[tuple[int, ptrace.SigInfo]] = []
    while True:
        ptrace.singlestep(tid, 0)
        got = reg.reap(tid)
        if got is None:
            return StepOutcome(left_stopped=True)
        _, status = got
        if not os.WIFSTOPPED(status):
            reg.pending.append(got)  # exited inside the step (exit syscall, SIGKILL)
            return StepOutcome(left_stopped=True)
        sig = os.WSTOPSIG(status)
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP:
            # A PTRACE_INTERRUPT left pending by an earlier stop-the-world, or a
            # group-stop: either way the instruction has not run yet.  Step on;
            # a job-control stop is re-raised once the instruction is done.
            if sig in ptrace.GROUP_STOP_SIGNALS:
                held.append((sig, ptrace.SigInfo()))
            continue
        if ptrace.stop_event(status):
            # clone/fork/exec/stop inside a syscall: the instruction has been
            # entered and RIP is past it; the event loop handles the rest.
            reg.pending.append(got)
            return StepOutcome(left_stopped=True, extra=held)
        info = ptrace.getsiginfo(tid)
        # x86 reports a step over `syscall` from the syscall-exit path as
        # TRAP_BRKPT (user_single_step_report), any other step as TRAP_TRACE.
        if sig == signal.SIGTRAP and info.si_code in (ptrace.TRAP_TRACE, ptrace.TRAP_BRKPT):
            if repeats and ptrace.getregs(tid).rip == addr:
                continue  # one more iteration of a rep string instruction
            if program_tf:  # in the trap's delivery-stop: resuming with it delivers it
                return StepOutcome(deliver=signal.SIGTRAP, extra=held)
            return _done(held)
        if sig == signal.SIGTRAP or (sig in SYNC_FAULTS and info.si_code > 0):
            # The instruction raised this itself (its own int3, a fault): the
            # thread is in that signal's delivery-stop, so resuming with it
            # delivers the real siginfo.  Held signals follow by tgkill.
            return StepOutcome(deliver=sig, extra=held)
        # An asynchronous signal arrived before the instruction ran.  Hold it
        # back and deliver it after the instruction, as the CPU would have.
        held.append((sig, info))
        regs = ptrace.getregs(tid)
        if regs.rip != addr:  # cannot happen for a held signal; do not loop forever
            return _done(held)


def _done(held: list[tuple[int, ptrace.SigInfo]]) -> StepOutcome:
    if not held:
        return StepOutcome()
    (sig, info), rest = held[0], held[1:]
    if not info.si_signo:  # a job-control stop we only noted: re-raise it
        return StepOutcome(extra=held)
    return StepOutcome(deliver=sig, siginfo=info, extra=rest)


def resume_after_step(reg: Registry, thread: Thread, outcome: StepOutcome) -> None:
    """Resume `thread` from its step stop, delivering held signals in order."""
    for sig, _info in outcome.extra:
        # Only one signal can be injected at a stop; the rest are re-raised
        # (their siginfo becomes SI_TKILL — rare: two signals within one step).
        try:
            ptrace.tgkill(thread.process.pid, thread.tid, sig)
        except OSError:
            pass
    if outcome.left_stopped:
        return
    if outcome.siginfo is not None:
        try:
            ptrace.setsiginfo(thread.tid, outcome.siginfo)
        except ProcessLookupError:
            return
    reg.resume(thread, outcome.deliver)
