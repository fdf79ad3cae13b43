"""The event loop: stops -> sites -> handlers -> execution of the displaced instruction.

One thread (the one that attached) makes every ptrace call and runs every
handler.  A thread stopped at a site is handled on its own while the others
keep running; only the native fallback stops the world.  The work is done by
collaborators: Planter (where int3s go), Hits (one hit), Children (clone,
fork, exec) and leaving.detach_all (every way out).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from emuprobe.engine import leaving
from emuprobe.engine.children import Children
from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.hits import Hits
from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.planting import Planter
from emuprobe.engine.registry import Registry
from emuprobe.engine.sites import Probe, ProbeSite
from emuprobe.engine.strategies import DEFAULT, Strategy
from emuprobe.engine.targets import ImageCache, Target
from emuprobe.engine.tracee import Process, Thread
from emuprobe.errors import OutputClosed
from emuprobe.sys import ptrace
from emuprobe.sys.elfimage import ElfImage

_NEW_CHILD_EVENTS = (ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK, ptrace.PTRACE_EVENT_CLONE)
StrayJudge = Callable[[Thread, int], bool]


class _Interrupted(Exception):
    """Raised by our SIGINT/SIGTERM handler, only while idle in waitpid."""


class Session:
    def __init__(self, follow: bool = True, warn: Callable[[str], None] | None = None,
                 strategy: Strategy = DEFAULT) -> None:  # fmt: skip
        self._warn = warn or (lambda msg: print(f"emuprobe: {msg}", file=sys.stderr))
        self._warned: set[str] = set()
        # The compiled loop only ever runs emulation: emulate alone uses it.
        self.hot = HotLoop.load() if strategy == "emulate" else None
        self.reg = Registry()
        self.reg.hot = self.hot
        self.planter = Planter(self.hot, self.warn_once, self._on_rendezvous)
        self.hits = Hits(self.reg, strategy, self.hot, self._warn, self.warn_once)
        self.children = Children(self.reg, self.planter, self.hot, self.hits.xol, follow)
        self.root_pid = 0
        self.exit_status: int | None = None
        self.stop_signal = 0
        self.attached = False
        self._waiting = False
        self._leaving = False  # detaching: traps are rewound, not executed
        self._failed = False  # leaving because something raised: no handler runs
        self._on_start: list[Callable[[Process], None]] = []
        self._after_hit: list[Callable[[], None]] = []
        self._stray_judges: list[StrayJudge] = []
        self._regs = ptrace.UserRegs()

    # -- extension points (perfbridge) ------------------------------------------
    def when_started(self, hook: Callable[[Process], None]) -> None:
        """Call `hook` with each process once its sites are first planted."""
        self._on_start.append(hook)

    def after_this_hit(self, work: Callable[[], None]) -> None:
        """Run `work` once the current hit's instruction has run (e.g. unplant it)."""
        self._after_hit.append(work)

    def judge_stray_traps(self, judge: StrayJudge) -> None:
        """`judge(thread, addr)` says whether a SIGTRAP at `addr`, where no site
        is, was ours (an int3 removed after the thread hit it): rewind, resume."""
        self._stray_judges.append(judge)

    # -- set-up ---------------------------------------------------------------
    @property
    def images(self) -> ImageCache:
        return self.planter.images

    def set_targets(self, targets: list[Target]) -> None:
        self.planter.targets = targets

    def site_for(self, image: ElfImage, vaddr: int, file_offset: int, probe: Probe) -> ProbeSite:
        return self.planter.site(image, vaddr, file_offset, probe)

    def add_probe(self, site: ProbeSite, probe: Probe) -> None:
        self.planter.add_probe(site, probe)

    def start(self, proc: Process) -> None:
        """Plant every site in a freshly seized `proc` (all its threads stopped)."""
        self.reg.add_process(proc)
        proc.read_comm()
        self.planter.plant_all(proc, strict=True)
        for hook in self._on_start:
            hook(proc)

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

    def detach_all(self) -> None:
        """Every way out of a session comes here (see leaving.detach_all)."""
        self._leaving = True
        leaving.detach_all(self.reg, self._dispatch, self.warn_once)

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
            return self.reg.next_event()
        finally:
            self._waiting = False

    def _dispatch(self, tid: int, status: int) -> None:
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
            if site is None and any(judge(thread, addr) for judge in self._stray_judges):
                regs.rip = addr
                ptrace.setregs(thread.tid, regs)
                self.reg.resume(thread)
            else:
                self.reg.resume(thread, signal.SIGTRAP)  # the program's own trap
            return
        regs.rip = addr
        thread.at_site = addr
        followed = thread.process.followed
        if self._leaving:
            # On the way out the thread is rewound and runs the instruction
            # itself once the byte is restored.  The hit still counts, unless
            # we are leaving because something failed (a handler, maybe).
            try:
                if followed and not self._failed:
                    self.hits.report(thread, site, regs)
            except OutputClosed:
                self._failed = True
            leaving.rewind(thread)
            self.reg.resume(thread)  # held: detach_all lets it go
            return
        if followed:
            self.hits.report(thread, site, regs)
        self.hits.execute(thread, site, addr, regs)
        while self._after_hit:
            self._after_hit.pop(0)()

    def _on_rendezvous(self, event: ProbeEvent) -> None:
        proc = self.reg.processes.get(event.pid)
        if proc is not None:
            self.planter.plant_all(proc)

    def warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._warn(msg)
