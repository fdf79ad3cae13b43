"""Return probes that never touch the stack.

The kernel's uretprobes and Frida overwrite the return address with a
trampoline's, which breaks code that reads its own return address (stack
unwinders, `__builtin_return_address`, CET shadow stacks).  Here the stack is
only read: at the function's entry the return address at [rsp] is read and an
internal int3 is planted at that return site in the caller (one per address
space and address, reference-counted by the entries waiting on it).  A hit
there is a return when its thread and stack pointer match: after `ret`, rsp is
the entry's rsp + 8.

Recursion returns through one site with a different rsp per depth; a tail call
returns from both functions at once (same rsp, same site), so both are
reported; longjmp and C++ exceptions skip returns, and an entry whose frame
lies below the stack pointer seen later on its thread is dropped as stale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.session import Session
from emuprobe.engine.sites import AddressSpace, Probe
from emuprobe.engine.tracee import Thread
from emuprobe.errors import ProbeError
from emuprobe.spec.probe import ProbeSpec
from emuprobe.sys import ptrace

_INT3 = 0xCC


class HeldSites:
    """Internal int3s at run-time addresses, planted while someone holds them.

    Removal happens after the current hit's instruction has run (the site may
    be the one being executed), and a thread that had already trapped on a
    removed int3 is rewound and resumed instead of getting a SIGTRAP.
    """

    def __init__(self, session: Session, probe: Probe, warn: Callable[[str], None]) -> None:
        self._session = session
        self._probe = probe
        self._warn = warn
        self._refs: dict[tuple[AddressSpace, int], int] = {}
        self._retired: dict[AddressSpace, set[int]] = {}
        session.judge_stray_traps(self._stray)

    def hold(self, aspace: AddressSpace, addr: int) -> bool:
        """Take a reference on an int3 at `addr`; False if it cannot be planted there."""
        key = (aspace, addr)
        if key in self._refs:
            self._refs[key] += 1
            return True
        site = aspace.planted.get(addr)
        try:
            if site is None:
                self._plant(aspace, addr)
            else:
                # a user probe's site: share its int3
                self._session.planter.add_probe(site, self._probe)
        except (ProbeError, OSError) as e:
            self._warn(f"return probe: no int3 at return site {addr:#x}: {e}")
            return False
        self._refs[key] = 1
        return True

    def _plant(self, aspace: AddressSpace, addr: int) -> None:
        m = aspace.memory.region(addr)
        if m is None or not (m.is_file and m.executable):
            raise ProbeError("not in a mapped file's code (JIT or vdso?)")
        image = self._session.planter.images.open(m.path)
        if image.identity != (m.dev, m.inode):
            raise ProbeError(f"{m.path} changed on disk since it was mapped")
        file_offset = m.offset + (addr - m.start)
        site = self._session.planter.site(image, image.offset_to_vaddr(file_offset), file_offset,
                                   self._probe)
        aspace.plant(site, addr)

    def release(self, aspace: AddressSpace, addr: int) -> None:
        key = (aspace, addr)
        n = self._refs.get(key, 0) - 1
        if n > 0:
            self._refs[key] = n
            return
        self._refs.pop(key, None)
        self._session.after_this_hit(lambda: self._unplant(aspace, addr))

    def _unplant(self, aspace: AddressSpace, addr: int) -> None:
        site = aspace.planted.get(addr)
        if (aspace, addr) in self._refs or site is None:
            return  # held again meanwhile, or already gone (detach, exec)
        if any(p is not self._probe for p in site.probes):
            return  # a user's probe (or the rendezvous) lives here too
        try:
            aspace.unplant(addr)
        except OSError:
            return  # the mm is gone
        self._retired.setdefault(aspace, set()).add(addr)

    def _stray(self, thread: Thread, addr: int) -> bool:
        aspace = thread.process.aspace
        if addr not in self._retired.get(aspace, ()):
            return False
        try:
            if ptrace.getsiginfo(thread.tid).si_code != ptrace.SI_KERNEL:
                return False
            return aspace.memory.read(addr, 1)[0] != _INT3
        except OSError:
            return False


@dataclass
class _Entry:
    spec: ProbeSpec
    aspace: AddressSpace
    sp: int  # rsp at the entry: it points at the return address
    ret: int  # the return address
    func: int  # the entry's address
    ts: int


ReturnHandler = Callable[[ProbeSpec, ProbeEvent, int, int], None]  # spec, event, func, entry ts


class ReturnTracker:
    """Pending function entries per thread, matched to returns by stack pointer."""

    def __init__(self, session: Session, on_return: ReturnHandler,
                 warn: Callable[[str], None]) -> None:
        self._probe = Probe("return-sites", "", internal=True)
        self._probe.handlers.append(self._on_return_site)
        self.sites = HeldSites(session, self._probe, warn)
        self._on_return = on_return
        self._pending: dict[int, list[_Entry]] = {}  # tid -> entries, innermost last
        self._aspaces: dict[int, AddressSpace] = {}
        self._session = session
        self.dropped = 0  # entries whose return was never seen (longjmp, exceptions)

    def pending(self, tid: int) -> int:
        return len(self._pending.get(tid, ()))

    def on_entry(self, spec: ProbeSpec, event: ProbeEvent) -> None:
        """Handler for a return probe's entry: remember it, plant at the return site."""
        sp = event.regs.rsp
        aspace = self._aspace(event.pid)
        if aspace is None:
            return
        try:
            ret = int.from_bytes(event.read_memory(sp, 8), "little")
        except OSError:
            return
        entries = self._pending.setdefault(event.tid, [])
        # Live frames all lie at or above this one: anything deeper was left
        # without a return (longjmp, an exception, a thread reusing the tid).
        # The same function entered again at the same rsp from the same call
        # site is a re-entry after a longjmp, not a self tail call (compilers
        # turn those into loops).
        self._drop(entries, lambda e: e.sp < sp or e.aspace is not aspace
                   or (e.sp == sp and e.ret == ret and e.spec is spec))
        if self.sites.hold(aspace, ret):
            entries.append(_Entry(spec, aspace, sp, ret, event.address, event.timestamp_ns))

    def _on_return_site(self, event: ProbeEvent) -> None:
        entries = self._pending.get(event.tid)
        if not entries:
            return
        sp = event.regs.rsp
        aspace = self._aspace(event.pid)
        self._drop(entries, lambda e: e.sp + 8 < sp or e.aspace is not aspace)
        # Innermost first: with a tail call, the callee returns "before" its caller.
        while entries and entries[-1].sp + 8 == sp and entries[-1].ret == event.address:
            e = entries.pop()
            self.sites.release(e.aspace, e.ret)
            self._on_return(e.spec, event, e.func, e.ts)

    def _drop(self, entries: list[_Entry], stale: Callable[[_Entry], bool]) -> None:
        keep = [e for e in entries if not stale(e)]
        if len(keep) == len(entries):
            return
        for e in entries:
            if stale(e):
                self.sites.release(e.aspace, e.ret)
                self.dropped += 1
        entries[:] = keep

    def _aspace(self, pid: int) -> AddressSpace | None:
        proc = self._session.reg.processes.get(pid)
        return proc.aspace if proc is not None else None
