"""One hit: report it to the probes' handlers, then make the displaced
instruction take effect, by the way the strategy and the instruction's Plan
decide, and resume the thread.  The only place hit counters change in Python
(the compiled loop keeps its own, added in by HotLoop.sync).
"""

from __future__ import annotations

import ctypes
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emuprobe.engine.events import ProbeEvent, Registers
from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.registry import Registry
from emuprobe.engine.sites import AddressSpace, ProbeSite
from emuprobe.engine.stepping import native_step, resume_after_step
from emuprobe.engine.strategies import Strategy
from emuprobe.engine.tracee import Thread
from emuprobe.engine.xol import Xol
from emuprobe.errors import OutputClosed
from emuprobe.exec.execute import Emulated, Emulator
from emuprobe.sys import ptrace
from emuprobe.sys.tasks import read_comm
from emuprobe.x86.decode import FastPath, NativeStep, UnicornStep, analyze
from emuprobe.x86.regs import TF

_SI_ADDR_OFFSET = 16  # siginfo_t: si_signo, si_errno, si_code, padding, then si_addr


@dataclass
class _Hit:
    thread: Thread
    site: ProbeSite
    addr: int
    regs: ptrace.UserRegs
    plan: Any  # the Plan of the bytes in memory now (usually the site's)
    code: bytes

    @property
    def followed(self) -> bool:
        return self.thread.process.followed

    @property
    def program_tf(self) -> bool:
        """The program single-steps itself (EFLAGS.TF): natively the CPU traps
        after the instruction, so the emulated or stepped one must too."""
        return bool(self.regs.eflags & TF)


Executor = Callable[[_Hit], bool]  # True once the instruction has run and the thread resumed


class Hits:
    def __init__(
        self,
        reg: Registry,
        strategy: Strategy,
        hot: HotLoop | None,
        warn: Callable[[str], None],
        warn_once: Callable[[str], None],
    ) -> None:
        self.reg = reg
        self.hot = hot
        self.emulator = Emulator()
        self.xol = Xol()
        # Decided once: the executors each Plan kind tries, in order, until
        # one has run the instruction (the native step always does).
        first: list[Executor] = []
        if strategy == "emulate":
            first = [self._emulated]
        elif strategy == "xol":
            first = [self._out_of_line]
        self._stop_world = strategy != "inplace"  # inplace is the unsafe demonstration
        native_first = first if strategy == "xol" else []
        self._executors: dict[type, list[Executor]] = {
            FastPath: [*first, self._native], UnicornStep: [*first, self._native],
            NativeStep: [*native_first, self._native],
        }  # fmt: skip
        self._warn = warn
        self._warn_once = warn_once
        self._changed: dict[bytes, Any] = {}  # rewritten instructions' bytes -> plan
        if hot is not None:
            hot.use_machine(self.emulator.machine)

    def execute(self, thread: Thread, site: ProbeSite, addr: int, regs: ptrace.UserRegs) -> None:
        """Run the instruction displaced at `addr` for `thread` (regs.rip == addr), resume it."""
        hit = _Hit(thread, site, addr, regs, *self._code_now(thread.process.aspace, site, addr))
        for run in self._executors[type(hit.plan)]:
            if run(hit):
                return

    def _emulated(self, hit: _Hit) -> bool:
        thread, regs = hit.thread, hit.regs
        done = self.emulator.step(hit.plan, hit.code, regs, thread.process.aspace.memory,
                                  ptrace.ThreadFp(thread.tid))  # fmt: skip
        if not isinstance(done, Emulated):
            return False
        ptrace.setregs(thread.tid, regs)
        thread.at_site = None  # the instruction has taken effect
        self.reg.resume(thread, _single_step_trap(thread.tid, regs.rip) if hit.program_tf else 0)
        _count(hit.site, emulated=True, followed=hit.followed)
        if self.hot is not None and hit.followed and hit.code is hit.site.code:
            self.hot.offer(thread, hit.site, hit.addr, regs)
        return True

    def _out_of_line(self, hit: _Hit) -> bool:
        hit.thread.at_site = None  # the step sets rip itself
        outcome = self.xol.step(self.reg, hit.thread, hit.site, hit.addr, hit.regs)
        if outcome is None:
            return False
        _count(hit.site, emulated=False, followed=hit.followed)
        resume_after_step(self.reg, hit.thread, outcome)
        return True

    def _native(self, hit: _Hit) -> bool:
        hit.thread.at_site = None  # the step sets rip itself
        # A rep string op traps after every iteration: step it to completion.
        rep = bool(getattr(hit.plan, "rep", False))  # FastPath ops never repeat
        outcome = native_step(self.reg, hit.thread, hit.addr, hit.regs, rep,
                              stop_world=self._stop_world, program_tf=hit.program_tf)  # fmt: skip
        _count(hit.site, emulated=False, followed=hit.followed)
        resume_after_step(self.reg, hit.thread, outcome)
        return True

    def report(self, thread: Thread, site: ProbeSite, regs: ptrace.UserRegs) -> None:
        """Count the hit and call each probe's handlers (a handler's bug is
        counted and told once; a closed output ends the session)."""
        site.hits += 1
        proc = thread.process
        if not thread.comm:
            thread.comm = read_comm(proc.pid, thread.tid) or proc.comm
        event = None
        for probe in site.probes:
            probe.hits += 1
            if not probe.handlers:
                continue
            if event is None:
                now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                event = ProbeEvent(probe, proc.pid, thread.tid, thread.comm, now, regs.rip,
                                   Registers(regs), proc.aspace.memory)  # fmt: skip
            elif event.probe is not probe:
                event = event.for_probe(probe)
            for handler in probe.handlers:
                try:
                    handler(event)
                except (OutputClosed, BrokenPipeError) as e:
                    raise OutputClosed(str(e)) from e  # the reader is gone: end the session
                except Exception as e:  # noqa: BLE001 - a handler's bug must not hurt the tracee
                    probe.handler_errors += 1
                    if probe.handler_errors == 1:
                        self._warn(f"handler for probe '{probe.name}' raised {type(e).__name__}: "
                                   f"{e} (further errors are only counted)")  # fmt: skip

    def _code_now(self, aspace: AddressSpace, site: ProbeSite, addr: int) -> tuple[Any, bytes]:
        """The plan and bytes of the instruction as it is in memory now: the
        site's, unless the program rewrote the bytes after our int3 (self-
        modifying or patched code), which are then analysed afresh.  One
        read per hit; the plan of changed bytes is cached."""
        n = site.length
        if n <= 1:
            return site.plan, site.code
        try:
            tail = aspace.memory.read(addr + 1, 15)
        except OSError:  # near the end of a mapping: the instruction's own bytes
            try:
                tail = aspace.memory.read(addr + 1, n - 1)
            except OSError:
                return site.plan, site.code  # unreadable: the native step will fault for real
        if tail[: n - 1] == site.code[1:n]:
            return site.plan, site.code
        code = site.code[:1] + tail
        plan = self._changed.get(code)
        if plan is None:
            if len(self._changed) >= 256:  # a program that rewrites without end
                self._changed.clear()
            plan = self._changed[code] = analyze(code, addr)
            self._warn_once(f"the program changed the instruction at {addr:#x} "
                            f"(probe {site.probes[0].name}): emulating the new bytes")  # fmt: skip
        return plan, code


def _count(site: ProbeSite, emulated: bool, followed: bool) -> None:
    if not followed:
        return
    if emulated:
        site.emulated += 1
    else:
        site.native_fallback += 1
    for p in site.probes:
        if emulated:
            p.emulated += 1
        else:
            p.native_fallback += 1


def _single_step_trap(tid: int, rip: int) -> int:
    """Make the signal the next resume of `tid` delivers the trap the CPU
    raises after an instruction run with TF set (SIGTRAP, TRAP_TRACE, the
    address of the next instruction); returns the signal to resume with."""
    info = ptrace.SigInfo()
    info.si_signo, info.si_code = signal.SIGTRAP, ptrace.TRAP_TRACE
    ctypes.memmove(ctypes.addressof(info) + _SI_ADDR_OFFSET, rip.to_bytes(8, "little"), 8)
    ptrace.setsiginfo(tid, info)
    return signal.SIGTRAP
