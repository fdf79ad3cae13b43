"""The event loop: stops -> sites -> handlers -> execution of the displaced instruction.

One thread (the one that attached) makes every ptrace call and runs every
handler.  A thread stopped at a site is handled on its own while the others
keep running; only the native fallback stops the world.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from emuprobe.engine.events import ProbeEvent, Registers
from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.registry import Registry, is_interrupt_stop
from emuprobe.engine.sites import AddressSpace, Probe, ProbeSite, SiteTable
from emuprobe.engine.stepping import native_step, resume_after_step
from emuprobe.engine.strategies import DEFAULT, Strategy
from emuprobe.engine.targets import ImageCache, Target
from emuprobe.engine.tracee import Process, Thread
from emuprobe.engine.xol import Xol
from emuprobe.errors import OutputClosed, ProbeError
from emuprobe.exec.execute import Emulated, Emulator
from emuprobe.exec.xolinsn import prepare
from emuprobe.sys import ptrace
from emuprobe.sys.elfimage import ElfImage
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.tasks import trap_pending
from emuprobe.x86.decode import NativeStep, analyze
from emuprobe.x86.regs import TF

# The dynamic linker calls this empty function whenever its list of loaded
# objects changes (r_debug.r_brk); debuggers break on it to see dlopen.
RENDEZVOUS_SYMBOL = "_dl_debug_state"

_NEW_CHILD_EVENTS = (ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK, ptrace.PTRACE_EVENT_CLONE)


class _FpAccess:
    """Lazy PTRACE_GETFPREGS: most instructions never need XMM state."""

    __slots__ = ("tid",)

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def get(self) -> ptrace.UserFpRegs:
        return ptrace.getfpregs(self.tid)

    def set(self, fp: ptrace.UserFpRegs) -> None:
        ptrace.setfpregs(self.tid, fp)


class _Interrupted(Exception):
    """Raised by our SIGINT/SIGTERM handler, only while idle in waitpid."""


class Session:
    def __init__(
        self,
        follow: bool = True,
        warn: Callable[[str], None] | None = None,
        strategy: Strategy = DEFAULT,
    ) -> None:
        self.follow = follow
        self.strategy = strategy
        self.xol = Xol()
        # The compiled loop only ever runs emulation: emulate alone uses it.
        self.hot = HotLoop.load() if strategy == "emulate" else None
        self.reg = Registry()
        self.reg.hot = self.hot
        self.sites = SiteTable()
        self.images = ImageCache()
        self.targets: list[Target] = []
        self.emulator = Emulator()
        if self.hot is not None:
            self.hot.use_machine(self.emulator.machine)
        self.root_pid = 0
        self.exit_status: int | None = None
        self.stop_signal = 0
        self.attached = False
        self._waiting = False
        self._leaving = False  # detaching: traps are rewound, not executed
        self._failed = False  # leaving because something raised: no handler runs
        self._changed: dict[bytes, Any] = {}  # rewritten instructions' bytes -> plan
        self._warn = warn or (lambda msg: print(f"emuprobe: {msg}", file=sys.stderr))
        self._warned: set[str] = set()
        # Hooks for perfbridge: callbacks when a process is first planted;
        # work queued by a handler to run once the current hit's instruction
        # has executed (e.g. removing the int3 just hit); and a judge for a
        # SIGTRAP at an address with no site (an int3 removed after a thread
        # hit it: True means rewind and resume, it was ours).
        self.on_start: list[Callable[[Process], None]] = []
        self.after_hit: list[Callable[[], None]] = []
        self.stray_trap: Callable[[Thread, int], bool] | None = None
        self._rendezvous = Probe("rendezvous", RENDEZVOUS_SYMBOL, internal=True)
        self._rendezvous.handlers.append(self._on_rendezvous)
        self._regs = ptrace.UserRegs()

    # -- set-up ---------------------------------------------------------------
    def start(self, proc: Process) -> None:
        """Plant every site in a freshly seized `proc` (all its threads stopped)."""
        self.reg.add_process(proc)
        proc.read_comm()
        self.plant_all(proc, strict=True)
        for hook in self.on_start:
            hook(proc)

    def plant_all(self, proc: Process, strict: bool = False) -> None:
        """Plant the sites of every probe whose file `proc` maps.

        strict: a failure is the user's error (raised before the tracee runs);
        otherwise it is a warning and that probe is skipped in this process.
        """
        aspace = proc.aspace
        maps = aspace.memory.refresh()
        for addr in aspace.forget_gone():  # dlclose, munmap: the file left that address
            if self.hot is not None:
                self.hot.drop(aspace, addr)
        for m in maps.mappings:
            if not (m.is_file and m.executable):
                continue
            for target in self.targets:
                if target.matches(m):
                    self._plant_target(aspace, target, m, strict)
            if os.path.basename(m.path).startswith("ld-"):
                self._plant_rendezvous(aspace, m)

    def _plant_target(self, aspace: AddressSpace, target: Target, m: Any, strict: bool) -> None:
        try:
            image = target.checked if (m.dev, m.inode) == target.checked.identity else None
            image = image or self.images.open(m.path)
            resolved = target.resolve_in(image)
            addr = m.file_offset_to_addr(resolved.file_offset)
            if addr is None:
                return
            site = self._site(image, resolved.vaddr, resolved.file_offset, target.probe)
            aspace.plant(site, addr)
        except ProbeError as e:
            if strict:
                raise
            self._warn_once(f"probe '{target.probe.name}' not planted in {m.path}: {e}")

    def _plant_rendezvous(self, aspace: AddressSpace, m: Any) -> None:
        try:
            image = self.images.open(m.path)
            r = image.resolve(RENDEZVOUS_SYMBOL)
        except ProbeError:
            return  # not a glibc-style dynamic linker: no dlopen tracking
        addr = m.file_offset_to_addr(r.file_offset)
        if addr is not None:
            try:
                aspace.plant(self._site(image, r.vaddr, r.file_offset, self._rendezvous), addr)
            except ProbeError as e:
                self._warn_once(f"dlopen tracking disabled: {e}")

    def _site(self, image: ElfImage, vaddr: int, file_offset: int, probe: Probe) -> ProbeSite:
        site = self.sites.get(image.identity, file_offset)
        if site is None:
            code = image.read(vaddr, 16)
            plan = analyze(code, vaddr)
            site = self.sites.add(
                ProbeSite(image.identity, file_offset, image.path, vaddr, code, plan)
            )
        self.add_probe(site, probe)
        return site

    def add_probe(self, site: ProbeSite, probe: Probe) -> None:
        """`probe` fires at `site` from now on.  A probe with handlers joining a
        site the compiled loop already handles takes it back to Python (return
        probes share a user probe's int3 while the program runs)."""
        if probe in site.probes:
            return
        site.probes.append(probe)
        if probe.handlers and self.hot is not None:
            self.hot.withdraw(site)

    # -- the loop -------------------------------------------------------------
    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM end the trace cleanly instead of killing us.

        Installed before the tracee is touched, so a Ctrl-C during attach or
        planting is a request to stop, never an exception half-way through.
        """
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Trace until every traced process has exited (or we are told to stop)."""
        try:
            while self.reg.processes and not self.stop_signal:
                got = self._next()
                if got is None:
                    break
                self._dispatch(*got)
        except _Interrupted:
            pass
        except BaseException:
            self._failed = True  # a handler's SystemExit, EPIPE, a bug of ours
            raise
        finally:
            if self.hot is not None:
                self.hot.sync()
            if self.reg.processes:
                self.detach_all()
        if self.stop_signal and self.exit_status is None:
            # Attached: Ctrl-C is how a user ends the trace, not a failure.
            return 0 if self.attached else 128 + self.stop_signal
        return self.exit_status if self.exit_status is not None else 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum
        if self._waiting:
            raise _Interrupted()

    def _next(self) -> tuple[int, int] | None:
        if self.reg.pending:
            return self.reg.pending.popleft()
        self._waiting = True
        try:
            if self.stop_signal:
                raise _Interrupted()
            got = self.reg.next_event()
        finally:
            self._waiting = False
        return got

    def _dispatch(self, tid: int, status: int) -> None:
        thread = self.reg.threads.get(tid)
        if thread is None:
            thread = self._adopt(tid, status)
            if thread is None:
                return
        thread.stopped = os.WIFSTOPPED(status)
        try:
            if not os.WIFSTOPPED(status):
                self._on_exit(thread, status)
            else:
                self._on_stop(thread, status)
        except ProcessLookupError:
            pass  # the thread died under us; waitpid reports how

    def _adopt(self, tid: int, status: int) -> Thread | None:
        """A stop from a tid we were not told about yet (a new thread or child)."""
        from emuprobe.sys.tasks import tgid_of

        tgid = tgid_of(tid)
        proc = self.reg.processes.get(tgid) if tgid is not None else None
        if proc is not None and tgid != tid:
            return self.reg.add_thread(tid, proc, stopped=True)
        # A child process whose parent's fork event is still to come.
        self.reg.early[tid] = status
        return None

    def _on_exit(self, thread: Thread, status: int) -> None:
        proc = thread.process
        self.reg.remove_thread(thread.tid)
        if thread.tid == proc.pid:
            if proc.pid == self.root_pid:
                self.exit_status = (
                    os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
                )
            self.reg.remove_process(proc)

    def _on_stop(self, thread: Thread, status: int) -> None:
        sig, event = os.WSTOPSIG(status), ptrace.stop_event(status)
        if event == ptrace.PTRACE_EVENT_STOP:
            if sig in ptrace.GROUP_STOP_SIGNALS:
                self.reg.listen(thread)  # group-stop: stay stopped until SIGCONT
            else:
                self.reg.resume(thread)
        elif event in _NEW_CHILD_EVENTS:
            self._on_new_child(thread, event, ptrace.geteventmsg(thread.tid))
            self.reg.resume(thread)
        elif event == ptrace.PTRACE_EVENT_EXEC:
            self._on_exec(thread)
        elif event:
            self.reg.resume(thread)
        elif sig == signal.SIGTRAP:
            self._on_trap(thread)
        else:
            self.reg.resume(thread, sig)  # every other signal passes through

    # -- breakpoint hits --------------------------------------------------------
    def _on_trap(self, thread: Thread) -> None:
        tid = thread.tid
        regs = ptrace.getregs(tid, self._regs)
        aspace = thread.process.aspace
        addr = regs.rip - 1
        site = aspace.planted.get(addr)
        # For a 1-byte instruction, addr+1 is also the next instruction, where
        # a SIGTRAP the program sent itself could find the thread: only the
        # si_code tells an int3 apart.  Longer instructions need no syscall.
        if site is None or (
            site.length == 1 and ptrace.getsiginfo(tid).si_code != ptrace.SI_KERNEL
        ):
            if site is None and self.stray_trap is not None and self.stray_trap(thread, addr):
                regs.rip = addr
                ptrace.setregs(tid, regs)
                self.reg.resume(thread)
                return
            self.reg.resume(thread, signal.SIGTRAP)  # the program's own trap
            return
        regs.rip = addr
        thread.at_site = addr
        if self._leaving:
            # On the way out the thread is rewound and runs the instruction
            # itself once the byte is restored.  The hit still counts, unless
            # we are leaving because something failed (a handler, maybe).
            if thread.process.followed and not self._failed:
                try:
                    self._report(thread, site, regs)
                except OutputClosed:
                    self._failed = True
            self._rewind(thread)
            self.reg.resume(thread)  # held: detach_all lets it go
            return
        if thread.process.followed:
            self._report(thread, site, regs)
        self._execute(thread, site, addr, regs)
        while self.after_hit:
            self.after_hit.pop(0)()

    def _execute(self, thread: Thread, site: ProbeSite, addr: int, regs: ptrace.UserRegs) -> None:
        strategy = self.strategy
        followed = thread.process.followed
        # The program's own single-stepping (EFLAGS.TF): natively the CPU
        # traps after the instruction, so the emulated or stepped one must too.
        program_tf = bool(regs.eflags & TF)
        plan, code = self._code_now(thread.process.aspace, site, addr)
        if strategy != "emulate" or type(plan) is NativeStep:
            thread.at_site = None  # the steps below set rip themselves
        if strategy == "emulate" and type(plan) is not NativeStep:
            done = self.emulator.step(
                plan, code, regs, thread.process.aspace.memory, _FpAccess(thread.tid)
            )
            if isinstance(done, Emulated):
                ptrace.setregs(thread.tid, regs)
                thread.at_site = None  # the instruction has taken effect
                trap = _single_step_trap(thread.tid, regs.rip) if program_tf else 0
                self.reg.resume(thread, trap)
                self._count(site, emulated=True, followed=followed)
                if self.hot is not None and followed and code is site.code:
                    self.hot.offer(thread, site, addr, regs)
                return
        elif strategy == "xol":
            outcome = self.xol.step(self.reg, thread, site, addr, regs)
            if outcome is not None:
                self._count(site, emulated=False, followed=followed)
                resume_after_step(self.reg, thread, outcome)
                return
        # A rep string op traps after every iteration: step it to completion
        # whatever its plan (a NativeStep plan carries no rep flag).
        thread.at_site = None
        rep = prepare(code).rep
        outcome = native_step(
            self.reg, thread, addr, regs, rep, stop_world=strategy != "inplace",
            program_tf=program_tf,
        )
        self._count(site, emulated=False, followed=followed)
        resume_after_step(self.reg, thread, outcome)

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

    def _count(self, site: ProbeSite, emulated: bool, followed: bool) -> None:
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

    def _report(self, thread: Thread, site: ProbeSite, regs: ptrace.UserRegs) -> None:
        site.hits += 1
        proc = thread.process
        if not thread.comm:
            thread.comm = _read_comm(proc.pid, thread.tid) or proc.comm
        event = None
        for probe in site.probes:
            probe.hits += 1
            if not probe.handlers:
                continue
            if event is None:
                event = ProbeEvent(
                    probe,
                    proc.pid,
                    thread.tid,
                    thread.comm,
                    time.clock_gettime_ns(time.CLOCK_MONOTONIC),
                    regs.rip,
                    Registers(regs),
                    proc.aspace.memory,
                )
            elif event.probe is not probe:
                event = ProbeEvent(probe, *_event_fields(event))
            for handler in probe.handlers:
                try:
                    handler(event)
                except (OutputClosed, BrokenPipeError) as e:
                    raise OutputClosed(str(e)) from e  # the reader is gone: end the session
                except Exception as e:  # noqa: BLE001 - a handler's bug must not hurt the tracee
                    probe.handler_errors += 1
                    if probe.handler_errors == 1:
                        self._warn(
                            f"handler for probe '{probe.name}' raised "
                            f"{type(e).__name__}: {e} (further errors are only counted)"
                        )

    def _on_rendezvous(self, event: ProbeEvent) -> None:
        proc = self.reg.processes.get(event.pid)
        if proc is not None:
            self.plant_all(proc)

    # -- processes coming and going ----------------------------------------------
    def _on_new_child(self, parent: Thread, event: int, child: int) -> None:
        if event == ptrace.PTRACE_EVENT_CLONE and _same_process(parent.process.pid, child):
            self.reg.add_thread(child, parent.process, stopped=child in self.reg.early)
            self._requeue_early(child)
            return
        vfork = event == ptrace.PTRACE_EVENT_VFORK
        pproc = parent.process
        if vfork:
            aspace = pproc.aspace  # the child runs in its parent's mm until it execs
            aspace.users += 1
        else:
            aspace = pproc.aspace.fork_copy(ProcessMemory(child))
            self.xol.on_fork(pproc.aspace, aspace)
        proc = Process(child, aspace, followed=self.follow, comm=pproc.comm)
        if not self.follow and not vfork:
            self._release_fork_child(proc)
            return
        self.reg.add_process(proc)
        self.reg.add_thread(child, proc, stopped=child in self.reg.early)
        self._requeue_early(child)

    def _requeue_early(self, tid: int) -> None:
        status = self.reg.early.pop(tid, None)
        if status is not None:
            self.reg.pending.append((tid, status))

    def _release_fork_child(self, proc: Process) -> None:
        """--no-follow: take our int3s out of a fork child's copy, then let it go."""
        status = self.reg.early.pop(proc.pid, None)
        if status is None:
            _, status = ptrace.waitpid(proc.pid)
        proc.aspace.unplant_all()
        proc.aspace.memory.close()
        if os.WIFSTOPPED(status):
            ptrace.detach(proc.pid)

    def _on_exec(self, thread: Thread) -> None:
        proc = thread.process
        for tid in list(proc.threads):
            if tid != proc.pid:
                self.reg.remove_thread(tid)
        if thread.tid != proc.pid:  # a non-leader exec'd and took the leader's tid
            self.reg.remove_thread(thread.tid)
            thread = self.reg.add_thread(proc.pid, proc, stopped=True)
        old = proc.aspace
        old.users -= 1
        if old.users <= 0:
            old.memory.close()
            if self.hot is not None:
                self.hot.forget(old)
        if self.hot is not None:
            self.hot.unbind(thread.tid)  # its int3s and stack are in the new image now
        proc.aspace = AddressSpace(ProcessMemory(proc.pid))
        thread.comm = ""
        proc.read_comm()
        if not proc.followed:  # a --no-follow vfork child: the new image is not ours
            self.reg.remove_process(proc)
            ptrace.detach(proc.pid)
            return
        self.plant_all(proc)
        self.reg.resume(thread)

    # -- leaving ----------------------------------------------------------------
    def detach_all(self) -> None:
        """Remove every int3 and detach from everything, leaving all tracees unharmed.

        All threads are stopped first; stops already queued are handled (a
        thread trapped on one of our int3s has its hit counted, unless a
        failure is why we leave, and is rewound onto the instruction, so no
        SIGTRAP is left to kill it and it runs the instruction itself), but
        nothing is resumed: a signal owed to a thread is delivered at detach.
        Every way out of a session comes here.
        """
        owed: dict[int, int] = {}
        self.reg.hold = owed
        self._leaving = True
        for _ in range(100):  # new threads can appear while we stop the others
            running = [t for t in self.reg.threads.values() if not t.stopped]
            if not running and not self.reg.pending:
                break
            self.reg.stop_threads(running)
            while self.reg.pending:
                self._dispatch(*self.reg.pending.popleft())
            self._take_queued_traps(owed)
        for thread in list(self.reg.threads.values()):
            self._rewind(thread)  # one a failure left on its int3
        for proc in list(self.reg.processes.values()):
            for addr, site in proc.aspace.unplant_all():
                name = site.probes[0].name if site.probes else "?"
                self._warn_once(f"the program overwrote the int3 at {addr:#x} (probe {name}): "
                                "hits after that were not seen")  # fmt: skip
        for tid, thread in list(self.reg.threads.items()):
            try:
                ptrace.detach(tid, owed.get(tid, 0))
            except OSError:
                pass
            self.reg.remove_thread(thread.tid)
        for proc in list(self.reg.processes.values()):
            self.reg.remove_process(proc)
        self.reg.hold = None

    def _take_queued_traps(self, owed: dict[int, int]) -> None:
        """Have each interrupted thread with an int3's SIGTRAP still queued report it.

        Resumed, such a thread takes the queued signal before any user code
        runs and stops again; the trap is then handled like any other on the
        way out (rewound if it was ours, owed to the program if it was not).
        A thread already stopped for another signal is left alone: an int3's
        SIGTRAP is taken before any other signal, so a later one is the
        program's own and is delivered after detach, as it would be untraced.
        """
        for thread in list(self.reg.threads.values()):
            if not thread.stopped or owed.get(thread.tid, 0) or not trap_pending(thread.tid):
                continue
            try:
                ptrace.cont(thread.tid, 0)
            except ProcessLookupError:
                continue
            thread.stopped = False
            got = self.reg.reap(thread.tid)
            if got is not None:
                self._dispatch(*got)

    def _rewind(self, thread: Thread) -> None:
        """Put a thread trapped on our int3 back on the instruction."""
        addr, thread.at_site = thread.at_site, None
        if addr is None or not thread.stopped:
            return
        try:
            regs = ptrace.getregs(thread.tid)
            if regs.rip == addr + 1:
                regs.rip = addr
                ptrace.setregs(thread.tid, regs)
        except OSError:
            pass  # gone

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._warn(msg)


def _single_step_trap(tid: int, rip: int) -> int:
    """Make the signal the next resume of `tid` delivers the trap the CPU
    raises after an instruction run with TF set (SIGTRAP, TRAP_TRACE, the
    address of the next instruction); returns the signal to resume with."""
    info = ptrace.SigInfo()
    info.si_signo, info.si_code = signal.SIGTRAP, ptrace.TRAP_TRACE
    ctypes.memmove(ctypes.addressof(info) + _SI_ADDR_OFFSET, rip.to_bytes(8, "little"), 8)
    ptrace.setsiginfo(tid, info)
    return signal.SIGTRAP


_SI_ADDR_OFFSET = 16  # siginfo_t: si_signo, si_errno, si_code, padding, then si_addr


def _same_process(pid: int, child: int) -> bool:
    from emuprobe.sys.tasks import tgid_of

    return tgid_of(child) == pid


def _read_comm(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _event_fields(e: ProbeEvent) -> tuple[Any, ...]:
    return (e.pid, e.tid, e.comm, e.timestamp_ns, e.address, e.regs, e._memory)


__all__ = ["Session", "is_interrupt_stop"]
