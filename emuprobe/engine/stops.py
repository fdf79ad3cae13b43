"""What a stop means: a thread exited, a child or an exec appeared, a signal
passes through, or a SIGTRAP that may be one of our hits."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from emuprobe.engine import leaving
from emuprobe.engine.children import Children
from emuprobe.engine.hits import Hits
from emuprobe.engine.registry import Registry
from emuprobe.engine.tracee import Thread
from emuprobe.errors import OutputClosed
from emuprobe.sys import ptrace

_NEW_CHILD_EVENTS = (ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK, ptrace.PTRACE_EVENT_CLONE)
StrayJudge = Callable[[Thread, int], bool]


class Stops:
    def __init__(self, reg: Registry, hits: Hits, children: Children) -> None:
        self.reg, self.hits, self.children = reg, hits, children
        self.root_pid = 0
        self.exit_status: int | None = None  # the root process's, once it has ended
        self.leaving = False  # detaching: traps are rewound, not executed
        self.failed = False  # leaving because something raised: no handler runs
        self.after_hit: list[Callable[[], None]] = []
        self.stray_judges: list[StrayJudge] = []
        self._regs = ptrace.UserRegs()

    def dispatch(self, tid: int, status: int) -> None:
        thread = self.reg.threads.get(tid) or self.children.adopt(tid, status)
        if thread is None:
            return
        thread.stopped = os.WIFSTOPPED(status)
        try:
            if not thread.stopped:
                self._on_exit(thread, status)
            else:
                self._on_stop(thread, status)
        except ProcessLookupError:
            pass  # the thread died under us; waitpid reports how

    def _on_exit(self, thread: Thread, status: int) -> None:
        proc = thread.process
        self.reg.remove_thread(thread.tid)
        if thread.tid == proc.pid:
            if proc.pid == self.root_pid:
                self.exit_status = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                                    else 128 + os.WTERMSIG(status))  # fmt: skip
            self.reg.remove_process(proc)

    def _on_stop(self, thread: Thread, status: int) -> None:
        sig, event = os.WSTOPSIG(status), ptrace.stop_event(status)
        if event == ptrace.PTRACE_EVENT_STOP:
            if sig in ptrace.GROUP_STOP_SIGNALS:
                self.reg.listen(thread)  # group-stop: stay stopped until SIGCONT
            else:
                self.reg.resume(thread)
        elif event in _NEW_CHILD_EVENTS:
            self.children.on_new_child(thread, event, ptrace.geteventmsg(thread.tid))
            self.reg.resume(thread)
        elif event == ptrace.PTRACE_EVENT_EXEC:
            self.children.on_exec(thread)
        elif event:
            self.reg.resume(thread)
        elif sig == signal.SIGTRAP:
            self._on_trap(thread)
        else:
            self.reg.resume(thread, sig)  # every other signal passes through

    def _on_trap(self, thread: Thread) -> None:
        regs = ptrace.getregs(thread.tid, self._regs)
        addr = regs.rip - 1
        site = thread.process.aspace.planted.get(addr)
        # For a 1-byte instruction, addr+1 is also the next instruction, where
        # a SIGTRAP the program sent itself could find the thread: only the
        # si_code tells an int3 apart.  Longer instructions need no syscall.
        if site is None or (
            site.length == 1 and ptrace.getsiginfo(thread.tid).si_code != ptrace.SI_KERNEL
        ):
            if site is None and any(judge(thread, addr) for judge in self.stray_judges):
                regs.rip = addr
                ptrace.setregs(thread.tid, regs)
                self.reg.resume(thread)
            else:
                self.reg.resume(thread, signal.SIGTRAP)  # the program's own trap
            return
        regs.rip = addr
        thread.at_site = addr
        followed = thread.process.followed
        if self.leaving:
            # On the way out the thread is rewound and runs the instruction
            # itself once the byte is restored.  The hit still counts, unless
            # we are leaving because something failed (a handler, maybe).
            try:
                if followed and not self.failed:
                    self.hits.report(thread, site, regs)
            except OutputClosed:
                self.failed = True
            leaving.rewind(thread)
            self.reg.resume(thread)  # held: detach_all lets it go
            return
        if followed:
            self.hits.report(thread, site, regs)
        self.hits.execute(thread, site, addr, regs)
        while self.after_hit:
            self.after_hit.pop(0)()
