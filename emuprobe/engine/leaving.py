"""Every way out of a session: stop all threads, settle the stops already
queued, rewind each thread sitting on one of our int3s, restore the bytes,
detach, delivering what each thread is owed."""

from __future__ import annotations

from collections.abc import Callable

from emuprobe.engine.registry import Registry
from emuprobe.engine.tracee import Thread
from emuprobe.sys import ptrace
from emuprobe.sys.tasks import trap_pending

Dispatch = Callable[[int, int], None]


def detach_all(reg: Registry, dispatch: Dispatch, warn_once: Callable[[str], None]) -> None:
    """Remove every int3 and detach from everything, leaving all tracees unharmed.

    All threads are stopped first; stops already queued are handled by
    `dispatch` (which, on the way out, counts a thread trapped on one of our
    int3s, unless a failure is why we leave, and rewinds it onto the
    instruction, so no SIGTRAP is left to kill it and it runs the instruction
    itself), but nothing is resumed: a signal owed to a thread is delivered at
    detach.
    """
    owed: dict[int, int] = {}
    reg.hold = owed
    for _ in range(100):  # new threads can appear while we stop the others
        running = [t for t in reg.threads.values() if not t.stopped]
        if not running and not reg.pending:
            break
        reg.stop_threads(running)
        while reg.pending:
            dispatch(*reg.pending.popleft())
        _take_queued_traps(reg, owed, dispatch)
    for thread in list(reg.threads.values()):
        rewind(thread)  # one a failure left on its int3
    for proc in list(reg.processes.values()):
        for addr, site in proc.aspace.unplant_all():
            name = site.probes[0].name if site.probes else "?"
            warn_once(f"the program overwrote the int3 at {addr:#x} (probe {name}): "
                      "hits after that were not seen")  # fmt: skip
    for tid, thread in list(reg.threads.items()):
        try:
            ptrace.detach(tid, owed.get(tid, 0))
        except OSError:
            pass
        reg.remove_thread(thread.tid)
    for proc in list(reg.processes.values()):
        reg.remove_process(proc)
    reg.hold = None


def _take_queued_traps(reg: Registry, owed: dict[int, int], dispatch: Dispatch) -> None:
    """Have each interrupted thread with an int3's SIGTRAP still queued report it.

    An int3 that fires just as our PTRACE_INTERRUPT lands is reported as the
    interrupt, with its SIGTRAP still queued; detached like that, the program
    would take the SIGTRAP and die.  Resumed, such a thread takes the queued
    signal before any user code runs and stops again; the trap is then
    handled like any other on the way out.  A thread already stopped for
    another signal is left alone: an int3's SIGTRAP is taken before any other
    signal, so a later one is the program's own and is delivered after
    detach, as it would be untraced.
    """
    for thread in list(reg.threads.values()):
        if not thread.stopped or owed.get(thread.tid, 0) or not trap_pending(thread.tid):
            continue
        try:
            ptrace.cont(thread.tid, 0)
        except ProcessLookupError:
            continue
        thread.stopped = False
        got = reg.reap(thread.tid)
        if got is not None:
            dispatch(*got)


def rewind(thread: Thread) -> None:
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
