"""Who is traced, who is stopped, and stop events not yet handled.

Everything that reaps a wait status goes through `Registry.reap`, so a stop
seen while doing something else (stopping the world, single-stepping) is kept
in `pending` and handled by the event loop later instead of being lost.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque

from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.sites import AddressSpace
from emuprobe.engine.tracee import Process, Thread
from emuprobe.sys import ptrace
from emuprobe.sys.tasks import thread_state

Status = tuple[int, int]  # (tid, wait status)


def is_interrupt_stop(status: int) -> bool:
    """PTRACE_EVENT_STOP not caused by job control.

    That is our PTRACE_INTERRUPT, or the first stop of a new tracee.
    """
    return (
        os.WIFSTOPPED(status)
        and ptrace.stop_event(status) == ptrace.PTRACE_EVENT_STOP
        and os.WSTOPSIG(status) not in ptrace.GROUP_STOP_SIGNALS
    )


class Registry:
    def __init__(self) -> None:
        self.processes: dict[int, Process] = {}
        self.threads: dict[int, Thread] = {}
        self.pending: deque[Status] = deque()
        # Stops of tracees we have not been told about yet (a fork child's
        # first stop can be reported before its parent's PTRACE_EVENT_FORK).
        self.early: dict[int, int] = {}
        # While detaching, nothing may run again: resumes are recorded here
        # (tid -> signal owed) instead of being made.
        self.hold: dict[int, int] | None = None
        # The compiled hot loop, if the session uses one: told when a tid goes.
        self.hot: HotLoop | None = None

    # -- bookkeeping -------------------------------------------------------
    def add_process(self, proc: Process) -> Process:
        self.processes[proc.pid] = proc
        return proc

    def add_thread(self, tid: int, proc: Process, stopped: bool = False) -> Thread:
        thread = self.threads.get(tid)
        if thread is None:
            thread = Thread(tid, proc, stopped=stopped)
            self.threads[tid] = thread
        proc.threads.add(tid)
        return thread

    def remove_thread(self, tid: int) -> Thread | None:
        thread = self.threads.pop(tid, None)
        if thread is not None:
            thread.process.threads.discard(tid)
        if self.hot is not None:
            self.hot.unbind(tid)  # the tid may be reused by another process
        return thread

    def remove_process(self, proc: Process) -> None:
        for tid in list(proc.threads):
            self.remove_thread(tid)
        self.processes.pop(proc.pid, None)
        proc.aspace.users -= 1
        if proc.aspace.users <= 0:
            proc.aspace.memory.close()

    def sharing(self, aspace: AddressSpace) -> list[Thread]:
        """Every thread that runs in `aspace` (all processes sharing the mm)."""
        return [
            self.threads[t]
            for p in self.processes.values()
            if p.aspace is aspace
            for t in p.threads
            if t in self.threads
        ]

    # -- waiting -----------------------------------------------------------
    def reap(self, tid: int = -1, nohang: bool = False) -> Status | None:
        """One wait status, or None (nohang and nothing ready, or no children left)."""
        try:
            got, status = ptrace.waitpid(tid, os.WNOHANG if nohang else 0)
        except ChildProcessError:
            return None
        if got == 0:
            return None
        self.note(got, status)
        return got, status

    def next_event(self) -> Status | None:
        """The event loop's next status (through the compiled hot loop, which
        handles the hits it can itself, if there is one); None: no tracees left.

        Unlike reap() it books nothing: the loop marks the thread stopped when
        it handles the status.  A SIGINT that interrupts the loop between the
        kernel's reply and that moment loses the status, and must leave the
        thread marked running: stop_threads() then finds it stopped with
        nothing to reap and rebuilds the status from its siginfo (_recover).
        Booked as stopped, it would be detached unhandled, one byte into an
        instruction if it sat on our int3.
        """
        if self.hot is not None:
            return self.hot.wait()
        try:
            return ptrace.waitpid(-1, 0)
        except ChildProcessError:
            return None

    def note(self, tid: int, status: int) -> None:
        """Book a reaped status: a stopped thread stays stopped until resumed."""
        thread = self.threads.get(tid)
        if thread is not None and os.WIFSTOPPED(status):
            thread.stopped = True

    def resume(self, thread: Thread, sig: int = 0) -> None:
        if self.hold is not None:
            self.hold[thread.tid] = sig
            return
        thread.stopped = False
        try:
            ptrace.cont(thread.tid, sig)
        except ProcessLookupError:
            pass  # it died while stopped: its exit is reported by waitpid

    def listen(self, thread: Thread) -> None:
        if self.hold is not None:
            self.hold[thread.tid] = 0  # detaching from group-stop leaves it stopped
            return
        thread.stopped = False
        try:
            ptrace.listen(thread.tid)
        except ProcessLookupError:
            pass

    def stop_threads(self, threads: list[Thread]) -> list[Thread]:
        """PTRACE_INTERRUPT `threads` and wait until none runs user code.

        Returns the threads that stopped only because we asked, which the
        caller resumes; any other stop or exit reaped here is queued in
        `pending`.  Polls with WNOHANG because a thread-group leader that has
        called pthread_exit is a zombie that never reports a stop.
        """
        waiting: dict[int, Thread] = {}
        for t in threads:
            if t.stopped:
                continue
            try:
                ptrace.interrupt(t.tid)
                waiting[t.tid] = t
            except ProcessLookupError:
                pass
        ours: list[Thread] = []
        idle = 0
        while waiting:
            got = self.reap(nohang=True)
            if got is None:
                idle += 1
                if idle % 8 == 0:
                    for tid in list(waiting):
                        state = thread_state(tid)
                        if state in ("Z", "X", ""):
                            del waiting[tid]  # will never stop: a zombie leader
                        elif state == "t":
                            t = waiting.pop(tid)
                            got = self.reap(tid, nohang=True)
                            if got is not None:
                                self._classify(got, t, ours)
                            elif not self._recover(t):
                                # Stopped, yet nothing to reap: its status was
                                # taken already (SIGINT just after a waitpid).
                                ours.append(t)
                time.sleep(0 if idle < 8 else 0.0001)
                continue
            idle = 0
            self._classify(got, waiting.pop(got[0], None), ours)
        return ours

    def _classify(self, got: Status, waited_for: Thread | None, ours: list[Thread]) -> None:
        if waited_for is not None and is_interrupt_stop(got[1]):
            ours.append(waited_for)
        else:
            self.pending.append(got)

    def _recover(self, thread: Thread) -> bool:
        """Rebuild a lost stop status from the siginfo the kernel still holds.

        True if a stop that needs handling was queued in `pending`.
        """
        thread.stopped = True
        try:
            info = ptrace.getsiginfo(thread.tid)
        except OSError:
            return False  # group-stop: nothing to handle
        event = info.si_code >> 8 if info.si_signo == signal.SIGTRAP else 0
        if event == ptrace.PTRACE_EVENT_STOP:
            return False
        self.pending.append((thread.tid, (event << 16) | (info.si_signo << 8) | 0x7F))
        return True

    def resume_all(self, threads: list[Thread]) -> None:
        for t in threads:
            if t.tid in self.threads:
                self.resume(t)


SYNC_FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
