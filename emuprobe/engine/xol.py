"""--strategy xol: execute the displaced instruction out of line, from user space.

This is the 2010 design (and the kernel's uprobes), done with ptrace so that
it can be measured against emulation on the same targets: one executable page
is added to the tracee with an injected mmap(2) — the XOL VMA, visible in
/proc/PID/maps like the kernel's `[uprobes]` — each site's instruction is
copied to a slot there (rewritten by xolinsn.prepare), and at each hit the
thread is single-stepped in its slot and its RIP (and a call's return address)
fixed up.  The int3 never leaves memory, so no event is lost, but the address
space changes and every hit costs a second trap.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from emuprobe.engine.registry import Registry
from emuprobe.engine.sites import AddressSpace, ProbeSite
from emuprobe.engine.stepping import StepOutcome, single_step
from emuprobe.engine.tracee import Thread
from emuprobe.exec.xolinsn import XolInsn, prepare
from emuprobe.sys import ptrace
from emuprobe.sys.maps import PAGE
from emuprobe.x86.regs import MASK64

SLOT = 16  # an instruction is at most 15 bytes; slots never overlap
# Where the kernel first tries to put its [uprobes] page: TASK_SIZE - PAGE_SIZE.
# A hint only: mmap picks another address if this one is taken.
HINT = 0x7FFF_FFFF_E000
SYSCALL = b"\x0f\x05"
SYS_MMAP = 9
PROT_READ_EXEC = 0x1 | 0x4
MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20


@dataclass
class XolArea:
    """The XOL pages of one mm and the slot of each site address in it."""

    pages: list[int] = field(default_factory=list)
    slots: dict[int, int] = field(default_factory=dict)  # site address -> slot address
    used: int = 0  # slots taken in the last page
    failed: str = ""  # the page could not be mapped: every hit goes native


class Xol:
    """The XOL areas of every traced mm, created at each mm's first XOL hit."""

    def __init__(self) -> None:
        self.areas: weakref.WeakKeyDictionary[AddressSpace, XolArea] = weakref.WeakKeyDictionary()

    def pages(self, aspace: AddressSpace) -> list[int]:
        area = self.areas.get(aspace)
        return list(area.pages) if area is not None else []

    def on_fork(self, parent: AddressSpace, child: AddressSpace) -> None:
        """A fork child inherits the page (an ordinary private mapping) and its slots."""
        area = self.areas.get(parent)
        if area is not None:
            self.areas[child] = XolArea(list(area.pages), dict(area.slots), area.used, area.failed)

    def step(
        self, reg: Registry, thread: Thread, site: ProbeSite, addr: int, regs: ptrace.UserRegs
    ) -> StepOutcome | None:
        """Run the instruction of `site` (planted at `addr`, regs.rip == addr) in
        its slot and fix the thread up; None if it must take the native step."""
        xi = prepare(site.code)
        if xi.refused:
            return None
        slot = self._slot(reg, thread, addr, xi, regs)
        if slot is None:
            return None
        tid = thread.tid
        saved = 0
        if xi.scratch:
            saved = getattr(regs, xi.scratch)
            setattr(regs, xi.scratch, addr + xi.length)  # what RIP is when it runs in place
        regs.rip = slot
        ptrace.setregs(tid, regs)
        outcome = single_step(reg, thread, slot, xi.rep)
        if outcome.left_stopped:
            return outcome  # it exited inside the step: nothing left to fix
        after = ptrace.getregs(tid)
        if xi.scratch:
            setattr(after, xi.scratch, saved)
        _fix_up(after, xi, slot, addr, thread)
        ptrace.setregs(tid, after)
        return outcome

    def _slot(
        self, reg: Registry, thread: Thread, addr: int, xi: XolInsn, regs: ptrace.UserRegs
    ) -> int | None:
        aspace = thread.process.aspace
        area = self.areas.get(aspace)
        if area is None:
            area = self.areas[aspace] = XolArea()
        slot = area.slots.get(addr)
        if slot is not None:
            return slot
        if area.failed:
            return None
        if not area.pages or area.used == PAGE // SLOT:
            page = inject_mmap(reg, thread, addr, regs, HINT if not area.pages else 0)
            if page is None:
                area.failed = "mmap of the XOL page failed"
                return None
            area.pages.append(page)
            area.used = 0
        slot = area.pages[-1] + area.used * SLOT
        # /proc/PID/mem writes into the r-x page (FOLL_FORCE), as the kernel
        # copies into its own [uprobes] page
        aspace.memory.write(slot, xi.slot_code)
        area.used += 1
        area.slots[addr] = slot
        return slot


def _fix_up(r: ptrace.UserRegs, xi: XolInsn, slot: int, addr: int, thread: Thread) -> None:
    """Map the state after the step in the slot back to the site's address."""
    rip = r.rip
    slot_next, nxt = slot + xi.length, addr + xi.length
    if slot <= rip < slot_next:
        # It did not complete (a fault, or a held signal's stop): show the
        # site, so that a signal frame and the restarted instruction are right.
        r.rip = addr + (rip - slot)
        return
    kind = xi.kind
    if kind == "plain":
        if rip == slot_next:
            r.rip = nxt
        # otherwise an absolute transfer (ret, jmp *reg): RIP is already right
    elif kind == "jump":
        r.rip = (nxt + xi.disp) & MASK64
    elif kind == "cond":
        r.rip = nxt if rip == slot_next else (nxt + xi.disp) & MASK64
    else:  # call, call_indirect: it pushed slot_next
        thread.process.aspace.memory.write(r.rsp, nxt.to_bytes(8, "little"))
        if kind == "call":
            r.rip = (nxt + xi.disp) & MASK64


def inject_mmap(
    reg: Registry, thread: Thread, addr: int, regs: ptrace.UserRegs, hint: int
) -> int | None:
    """Make `thread` (stopped at our int3 at `addr`, state `regs`) call
    mmap(hint, PAGE, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0).

    The syscall instruction is written over the site for one step with every
    other thread of the mm stopped, then the bytes and registers are put back.
    Returns the page's address, or None if mmap failed.
    """
    aspace = thread.process.aspace
    mem = aspace.memory
    others = reg.stop_threads([t for t in reg.sharing(aspace) if t is not thread])
    call = ptrace.UserRegs.from_buffer_copy(regs)
    call.rip, call.rax = addr, SYS_MMAP
    call.rdi, call.rsi, call.rdx = hint, PAGE, PROT_READ_EXEC
    call.r10, call.r8, call.r9 = MAP_PRIVATE_ANONYMOUS, MASK64, 0
    saved = mem.read(addr, len(SYSCALL))
    outcome = StepOutcome(left_stopped=True)  # until the step says otherwise
    result = None
    try:
        mem.write(addr, SYSCALL)
        ptrace.setregs(thread.tid, call)
        outcome = single_step(reg, thread, addr)
        if not outcome.left_stopped:
            result = ptrace.getregs(thread.tid).rax
    finally:
        mem.write(addr, saved)
        if not outcome.left_stopped:
            ptrace.setregs(thread.tid, regs)
        reg.resume_all(others)
    for sig, _info in outcome.extra + ([(outcome.deliver, None)] if outcome.deliver else []):
        ptrace.tgkill(thread.process.pid, thread.tid, sig)  # due after the hit: keep it pending
    if result is None or result >= MASK64 - 4095:  # -errno
        return None
    mem.refresh()  # the page is a new mapping
    return int(result)

