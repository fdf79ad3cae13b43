"""Python's side of the compiled hot loop (hotloop.c, built by pip as emuprobe._hotloop).

The session calls `offer` after it has emulated a hit itself; a site that
qualifies (a FastPath op the loop knows, or a UnicornStep when the compiled
machine is in use; probes that only count; a followed process; memory in a
mapping known to allow the access) is then handled entirely in C at later
hits, and `sync` adds the C counters to the probes.
Without the built module, or with EMUPROBE_HOTLOOP=0, `load` returns None and
every hit takes the Python path, which is the reference.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from emuprobe.engine.sites import AddressSpace, ProbeSite
from emuprobe.engine.tracee import Thread
from emuprobe.exec.cmachine import CMachine
from emuprobe.sys import ptrace
from emuprobe.sys.maps import PROT_EXEC, PROT_READ, PROT_WRITE
from emuprobe.sys.ptrace import reg_offset
from emuprobe.x86.decode import FastPath, UnicornStep
from emuprobe.x86.regs import MASK64

OPS = {"nop": 0, "push": 1, "mov": 2, "jmp": 3, "call": 4, "load": 5, "store": 6, "sse": 7}
BASE_RIP = 0xFFFF  # hotloop.c: a load/store address based on the next instruction
MAX_SITES = 4096



def _access(plan: FastPath, after: ptrace.UserRegs, addr: int) -> tuple[int, bool] | None:
    """(data address, is a store) of the hit just emulated at `addr`, from the
    registers after it (a load must not have overwritten its base); None for
    a plan without memory access."""
    if plan.op in ("push", "call"):
        return after.rsp, True
    if plan.op not in ("load", "store"):
        return None
    if plan.base == "rip":
        return (addr + plan.length + plan.imm) & MASK64, plan.op == "store"
    return (getattr(after, plan.base) + plan.imm) & MASK64, plan.op == "store"


class HotLoop:
    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi, self._lib = ffi, lib
        self._counters = ffi.new("uint64_t[]", MAX_SITES)
        self._tid = ffi.new("int *")
        self._status = ffi.new("int *")
        self._sites: list[ProbeSite] = []
        self._folded: list[int] = []
        self._index: dict[ProbeSite, int] = {}
        self._aspaces: dict[AddressSpace, int] = {}
        self._next_id = 0
        self._offered: set[tuple[int, int]] = set()  # (aspace id, addr) already decided
        self._placed: dict[ProbeSite, list[tuple[int, int]]] = {}  # where C may handle it
        self._machine: CMachine | None = None
        self._keep: list[Any] = []

    @classmethod
    def load(cls) -> HotLoop | None:
        if os.environ.get("EMUPROBE_HOTLOOP", "1") == "0":
            return None
        try:
            from emuprobe import _hotloop  # type: ignore[attr-defined]
        except ImportError:
            return None
        return cls(_hotloop.ffi, _hotloop.lib)

    def wait(self) -> tuple[int, int] | None:
        """The next stop that needs Python, like Registry.reap(); None: no tracees left."""
        while True:
            rc = self._lib.hot_wait(self._tid, self._status, self._counters)
            if rc == 1:
                return self._tid[0], self._status[0]
            if rc == 0 or rc == -errno.EINTR:
                continue  # Python's signal handlers run here (and may raise)
            if rc == -errno.ECHILD:
                return None
            raise OSError(-rc, os.strerror(-rc))

    def offer(self, thread: Thread, site: ProbeSite, addr: int, regs: ptrace.UserRegs) -> None:
        """`site` at `addr` was just emulated on the FastPath for `thread`, and
        `regs` is the state after it; let C take its later hits if it can."""
        aspace = thread.process.aspace
        aid = self._aspaces.get(aspace)
        if aid is None:
            aid = self._aspaces[aspace] = self._next_id
            self._next_id += 1
        self._lib.hot_bind(thread.tid, aid)
        plan = site.plan
        if any(p.handlers for p in site.probes):
            return
        if isinstance(plan, UnicornStep):
            self._offer_unicorn(aid, site, addr, plan, aspace)
            return
        if not isinstance(plan, FastPath):
            return
        op = OPS.get(plan.op)
        if op is None or plan.op == "load" and plan.dst == plan.base:
            return  # a load that overwrote its base: its address is lost
        access = _access(plan, regs, addr)
        if access is not None:
            at, write = access
            m = aspace.memory.region(at)
            need = PROT_WRITE if write else PROT_READ
            if m is None or not m.prot & need or m.prot & PROT_EXEC:
                return
            # one range per mapping (a stack, a .data), not per site
            self._lib.hot_add_range(aid, m.start, m.end, int(bool(m.prot & PROT_WRITE)))
        index = self._counter(aid, site, addr)
        if index is None:
            return
        target = regs.rip if op in (OPS["jmp"], OPS["call"]) else 0
        src = reg_offset(plan.src) if plan.src else 0
        dst = reg_offset(plan.dst) if plan.dst else 0
        base = BASE_RIP if plan.base == "rip" else reg_offset(plan.base) if plan.base else 0
        disp = plan.imm if plan.base else 0
        self._lib.hot_add_site(
            aid, addr, op, plan.length, src, dst, target & MASK64, index, base, disp, plan.size,
            site.code,
        )

    def use_machine(self, machine: object) -> None:
        """Let C run UnicornStep sites too, with `machine` if it is the compiled one."""
        if isinstance(machine, CMachine):
            self._machine = machine
            self._lib.hot_use_machine(machine.handle)
            # after a crash inside Unicorn the machine gets a new engine
            machine.replaced.append(lambda: self._lib.hot_use_machine(machine.handle))

    def _offer_unicorn(
        self, aid: int, site: ProbeSite, addr: int, plan: UnicornStep, aspace: AddressSpace
    ) -> None:
        if self._machine is None:
            return
        index = self._counter(aid, site, addr)
        if index is None:
            return
        cplan, ctx = self._machine.plan_handle(plan), self._machine.memctx(aspace.memory)
        self._keep.append(ctx)  # C keeps the pointer: never freed before this loop
        self._lib.hot_add_unicorn(aid, addr, plan.length, site.code, index, cplan, ctx)

    def _counter(self, aid: int, site: ProbeSite, addr: int) -> int | None:
        """The counter of `site`, the first time it is offered at `addr` in
        address space `aid`; None if already decided or out of counters."""
        if (aid, addr) in self._offered:
            return None
        self._offered.add((aid, addr))
        self._placed.setdefault(site, []).append((aid, addr))
        index = self._index.get(site)
        if index is None:
            if len(self._sites) >= MAX_SITES:
                return None
            index = self._index[site] = len(self._sites)
            self._sites.append(site)
            self._folded.append(0)
        return index

    def withdraw(self, site: ProbeSite) -> None:
        """Python handles every later hit of `site` (a probe with a handler joined it)."""
        for aid, addr in self._placed.pop(site, []):
            self._lib.hot_drop_site(aid, addr)
            self._offered.discard((aid, addr))

    def drop(self, aspace: AddressSpace, addr: int) -> None:
        """No site at `addr` in `aspace` any more (its file was unmapped)."""
        aid = self._aspaces.get(aspace)
        if aid is None:
            return
        self._lib.hot_drop_site(aid, addr)
        self._offered.discard((aid, addr))
        for places in self._placed.values():
            if (aid, addr) in places:
                places.remove((aid, addr))

    def unbind(self, tid: int) -> None:
        self._lib.hot_unbind(tid)

    def forget(self, aspace: AddressSpace) -> None:
        aid = self._aspaces.pop(aspace, None)
        if aid is not None:
            self._lib.hot_forget(aid)
            self._offered = {k for k in self._offered if k[0] != aid}

    def handled(self) -> int:
        """Hits handled in C so far."""
        return sum(self._counters[i] for i in range(len(self._sites)))

    def sync(self) -> None:
        """Add the hits C handled since the last sync to the sites' and probes' counters."""
        for i, site in enumerate(self._sites):
            delta = self._counters[i] - self._folded[i]
            if not delta:
                continue
            self._folded[i] += delta
            site.hits += delta
            site.emulated += delta
            for p in site.probes:
                p.hits += delta
                p.emulated += delta
