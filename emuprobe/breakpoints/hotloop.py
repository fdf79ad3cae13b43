"""Python's side of the compiled hot loop (hotloop.c, built by pip as emuprobe._hotloop).

The session calls `offer` after it has executed a FastPath hit itself; a site
that qualifies (a FastPath op the loop knows, probes that only count, a
followed process, a store into a mapping known to be writable) is then handled
entirely in C at later hits, and `sync` adds the C counters to the probes.
Without the built module, or with EMUPROBE_HOTLOOP=0, `load` returns None and
every hit takes the Python path, which is the reference.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from . import ptrace
from .maps import PROT_EXEC, PROT_WRITE
from .sites import AddressSpace, ProbeSite
from .tracee import Thread

OPS = {"nop": 0, "push": 1, "mov": 2, "jmp": 3, "call": 4}
MAX_SITES = 4096
MASK64 = (1 << 64) - 1


def _offset(field: str) -> int:
    return int(getattr(ptrace.UserRegs, field).offset)


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

    @classmethod
    def load(cls) -> HotLoop | None:
        if os.environ.get("EMUPROBE_HOTLOOP", "1") == "0":
            return None
        try:
            from .. import _hotloop  # type: ignore[attr-defined]
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
        op = OPS.get(getattr(plan, "op", ""))
        if op is None or any(p.handlers for p in site.probes):
            return
        if op in (OPS["push"], OPS["call"]):
            m = aspace.memory.region(regs.rsp)
            if m is None or not m.prot & PROT_WRITE or m.prot & PROT_EXEC:
                return
            self._lib.hot_add_range(aid, m.start, m.end)  # one per stack, not per site
        if (aid, addr) in self._offered:
            return
        self._offered.add((aid, addr))
        index = self._index.get(site)
        if index is None:
            if len(self._sites) >= MAX_SITES:
                return
            index = self._index[site] = len(self._sites)
            self._sites.append(site)
            self._folded.append(0)
        target = regs.rip if op in (OPS["jmp"], OPS["call"]) else 0
        src = _offset(plan.src) if plan.src else 0
        dst = _offset(plan.dst) if plan.dst else 0
        self._lib.hot_add_site(aid, addr, op, plan.length, src, dst, target & MASK64, index)

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
