"""The reusable Unicorn machine: one Uc, hooks installed once, tracee memory
shown lazily and freshly, exactly one instruction per hit.

Memory.  Tracee pages are mapped into Unicorn on first touch (UC_HOOK_MEM_UNMAPPED)
with `mem_map_ptr` over host buffers we own, and stay mapped: unmapping and
remapping costs ~18 µs a page, refreshing a mapped buffer ~1 µs.  Freshness is
per hit: a page is re-read from the tracee (with our int3s replaced by the
program's bytes) the first time the instruction reads or writes it in a hit
(UC_HOOK_MEM_READ / UC_HOOK_MEM_WRITE run before the access).  Permissions are
enforced in those hooks from the tracee's maps; the Unicorn pages themselves
are RWX so that a page mapped for one process is never wrongly refused for
another.

Code.  The instruction's own bytes are poked into its page(s) at every hit,
followed by `hlt` (on the next page if need be) so that a translation block
holds exactly one instruction (without it QEMU translates the whole basic
block, ~0.5 µs an instruction, and reads on into pages nobody asked for).
`count=1` stops after that instruction even when it branches.  Unicorn keeps
translation blocks across runs and does not see our host-side pokes, so
`_tb` records the bytes each site's block was translated from, and a block is
dropped (`ctl_remove_cache`) before it could run stale.  A read of the
planted `hlt` byte is refused rather than shown a byte the program never wrote.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from unicorn import (
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_MEM_FETCH_UNMAPPED,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as ucx
from unicorn.unicorn_py3.unicorn import uclib

from emuprobe.exec.ucengine import HLT, Batch, FpAccess, XmmBatch, new_engine
from emuprobe.sys.maps import PAGE, PROT_EXEC, PROT_READ, PROT_WRITE
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.ptrace import UserFpRegs, UserRegs
from emuprobe.x86 import addresses, policy
from emuprobe.x86.decode import UnicornStep
from emuprobe.x86.regs import EMULATED_FLAGS, MASK64, RESERVED_ONE, canonical

_OFF = PAGE - 1
MAX_PAGES = 256  # beyond this, drop every page and translation block at the next hit
_REP_COUNT = 1 << 62


def _check(status: int) -> None:
    if status:
        raise UcError(status)


class Machine:
    """One Unicorn engine reused for every hit of every site and process: the
    pure-Python machine.  machine.c does the same in C (cmachine.py), and is
    used instead when the compiled module is built."""

    def __init__(self) -> None:
        self.uc = new_engine()
        self._h = self.uc._uch
        self._pages: dict[int, int] = {}  # Unicorn page -> host address of its buffer
        self._buffers: list[ctypes.Array[ctypes.c_char]] = []  # keeps them alive
        self._fresh: dict[int, int] = {}  # page -> tracee prot, refreshed this hit
        self._tb: dict[int, bytes] = {}  # site -> bytes its cached block came from
        self._batches: dict[tuple[int, ...], Batch] = {}
        self._xmm_batches: dict[tuple[int, ...], XmmBatch] = {}
        self._stores: list[tuple[int, int]] = []
        self._mem: ProcessMemory | None = None
        self._fault: str | None = None
        self._error: BaseException | None = None
        self._escaped = False
        self._site = self._next = self._code_end = 0
        self._guard = -1
        self._blob = b""  # the instruction, then hlt
        self._aligned16 = False
        self._lowest = MASK64  # lowest data address accessed this hit
        uc = self.uc
        uc.hook_add(UC_HOOK_MEM_UNMAPPED, self._guarded(self._on_unmapped, False))
        uc.hook_add(UC_HOOK_MEM_READ, self._guarded(self._on_read, None))
        uc.hook_add(UC_HOOK_MEM_WRITE, self._guarded(self._on_write, None))
        uc.hook_add(UC_HOOK_INTR, self._guarded(self._on_intr, None))
        uc.hook_add(UC_HOOK_INSN_INVALID, self._guarded(self._on_invalid, False))
        uc.hook_add(
            UC_HOOK_INSN, self._guarded(self._on_syscall, None), aux1=ucx.UC_X86_INS_SYSCALL
        )

    # ---- the hit -------------------------------------------------------

    def run(
        self, plan: UnicornStep, code: bytes, regs: UserRegs, mem: ProcessMemory, fp: FpAccess
    ) -> tuple[str | None, bool]:
        """Emulate `plan` (the instruction `code` at regs.rip) for one hit.

        Returns (None, fp_written) after committing registers, stores and FP state, or
        (reason, False) having changed nothing (also when a callback raised: re-raised).
        """
        site = regs.rip
        length = plan.length
        if len(code) < length:
            return policy.TRUNCATED, False
        nxt = (site + length) & MASK64
        if plan.rep and regs.rcx > policy.REP_LIMIT:
            return f"rep count {regs.rcx} > {policy.REP_LIMIT}: native is faster", False
        near_hole = addresses.check(plan.mem, plan.implicit, regs, nxt)
        if near_hole is not None:
            return near_hole, False  # Unicorn would alias a non-canonical address
        self._begin(mem, site, nxt, bytes(code[:length]), plan.aligned16)
        if plan.rep:
            # it runs on into the block at `next`, which must be our hlt
            self.uc.ctl_remove_cache(nxt, nxt + 1)
            self._tb.pop(nxt, None)

        b, before, fpregs, xb = self._load(plan, regs, fp)
        # straight to C: the binding's wrapper costs ~0.5 µs and raises
        status = uclib.uc_emu_start(self._h, site, 0, 0, _REP_COUNT if plan.rep else 1)
        self._mem = None
        why = self._why_refused(status, plan.aligned16)
        if why is not None:
            return why, False

        _check(uclib.uc_reg_read_batch(self._h, b.ids, b.ptrs, b.n))
        vals = b.vals
        rip = vals[b.rip]
        if plan.rep and rip == nxt + 1:
            rip = nxt  # it stopped by executing our hlt
        if rip != site:
            self._tb.pop(rip, None)  # a block may have been translated there
        if not plan.branch and rip != nxt:
            return f"Unicorn stopped at {rip:#x}, expected {nxt:#x}", False
        if not canonical(rip):
            return f"branch to non-canonical {rip:#x} (#GP)", False
        writes = self._collect_stores()
        xmm_out = xb if xb is not None and self._xmm_changed(xb) else None

        # commit: nothing above changed the tracee or `regs`
        for addr, data in writes:
            mem.write(addr, data)
        eflags = (regs.eflags & ~EMULATED_FLAGS) | (vals[b.eflags] & EMULATED_FLAGS)
        for field, new, old in zip(b.fields, vals, before, strict=True):
            if new != old:
                setattr(regs, field, new)
        regs.eflags = eflags
        regs.rip = rip
        if xmm_out is not None and fpregs is not None:
            xmm_out.write_back(fpregs)
            fp.set(fpregs)
            return None, True
        return None, False

    def _load(
        self, plan: UnicornStep, regs: UserRegs, fp: FpAccess
    ) -> tuple[Batch, tuple[int, ...], UserFpRegs | None, XmmBatch | None]:
        """Load the registers `plan` uses (and its XMM/MXCSR state) into Unicorn;
        the values before, to see afterwards which ones changed."""
        b = self._batches.get(plan.regs)
        if b is None:
            b = self._batches[plan.regs] = Batch(plan.regs, plan.fields)
        before = b.get(regs)
        vals = b.vals
        vals[:] = before  # type: ignore[call-overload]
        vals[b.eflags] = (regs.eflags & EMULATED_FLAGS) | RESERVED_ONE
        _check(uclib.uc_reg_write_batch(self._h, b.ids, b.ptrs, b.n))
        fpregs: UserFpRegs | None = None
        xb: XmmBatch | None = None
        if plan.needs_fp:
            fpregs = fp.get()
            xb = self._xmm_batch(plan.xmm)
            xb.read_from(fpregs)
            _check(uclib.uc_reg_write_batch(self._h, xb.ids, xb.ptrs, xb.n))
        return b, before, fpregs, xb

    def _why_refused(self, status: int, aligned16: bool) -> str | None:
        """After uc_emu_start: why the run must not be committed (a callback's
        exception is re-raised here), or None."""
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc
        if self._fault is not None:
            return self._fault
        if status and not self._escaped:
            return f"unicorn: {UcError(status)}"
        if aligned16 and self._lowest & 15:
            # QEMU splits the 16-byte access in two and never checks alignment
            return f"misaligned 16-byte SSE access at {self._lowest:#x} (#GP)"
        return None

    def _xmm_changed(self, xb: XmmBatch) -> bool:
        """Read the XMM registers back; whether any changed (compared rather
        than trusting capstone's idea of which XMM the instruction writes)."""
        before = ctypes.string_at(xb.base, 16 * len(xb.xmm))
        _check(uclib.uc_reg_read_batch(self._h, xb.ids, xb.ptrs, xb.n))
        return ctypes.string_at(xb.base, 16 * len(xb.xmm)) != before

    def _xmm_batch(self, xmm: tuple[int, ...]) -> XmmBatch:
        xb = self._xmm_batches.get(xmm)
        if xb is None:
            xb = self._xmm_batches[xmm] = XmmBatch(xmm)
        return xb

    def _begin(self, mem: ProcessMemory, site: int, nxt: int, code: bytes, aligned16: bool) -> None:
        if len(self._pages) > MAX_PAGES:
            self._drop_all()
        self._mem = mem
        self._fresh.clear()
        self._stores.clear()
        self._fault = None
        self._error = None
        self._escaped = False
        self._site, self._next = site, nxt
        self._aligned16 = aligned16
        self._lowest = MASK64
        # hlt right after the instruction, even on the next page: QEMU's
        # translator reads on across page ends, and that page need not exist
        # in the tracee (its data is still checked against the maps)
        self._guard = nxt
        blob = self._blob = code + HLT
        end = self._code_end = site + len(blob)
        page = site & ~_OFF
        host = self._pages.get(page)
        if host is None:
            host = self._map(page)
        if end <= page + PAGE:
            ctypes.memmove(host + site - page, blob, len(blob))
        else:
            if page + PAGE not in self._pages:
                self._map(page + PAGE)
            self._poke(site, blob)
        if self._tb.get(site) != code:
            self.uc.ctl_remove_cache(site, end)
            self._tb[site] = code

    def _map(self, page: int) -> int:
        buf = ctypes.create_string_buffer(PAGE)
        host = ctypes.addressof(buf)
        self.uc.mem_map_ptr(page, PAGE, UC_PROT_ALL, host)
        self._buffers.append(buf)
        self._pages[page] = host
        return host

    def _drop_all(self) -> None:
        for page in self._pages:
            self.uc.mem_unmap(page, PAGE)
        self._pages.clear()
        self._buffers.clear()
        self._tb.clear()
        self.uc.ctl_flush_tb()

    def _poke(self, addr: int, data: bytes, lo: int = 0, hi: int = MASK64) -> None:
        """Copy `data` to `addr` in our page buffers, clipped to [lo, hi)."""
        start, end = max(addr, lo), min(addr + len(data), hi)
        while start < end:
            page = start & ~_OFF
            stop = min(end, page + PAGE)
            host = self._pages.get(page)
            if host is not None:
                chunk = data[start - addr : stop - addr]
                ctypes.memmove(host + start - page, chunk, len(chunk))
            start = stop

    def _refresh(self, page: int) -> bool:
        """Re-read `page` from the tracee for this hit; False (with a fault) if it
        is not there."""
        mem = self._mem
        assert mem is not None
        m = mem.region(page)
        if m is None:
            return self._fail(f"access to unmapped address {page:#x}")
        try:
            data = mem.read(page, PAGE)
        except OSError as e:
            return self._fail(f"cannot read tracee page {page:#x}: {e}")
        host = self._pages.get(page)
        if host is None:
            host = self._map(page)
        ctypes.memmove(host, data, PAGE)
        end = page + PAGE
        for addr, orig in mem.original_bytes_in(page - 15, end):
            self._poke(addr, orig, page, end)
        if page < self._code_end and self._site < end:
            self._poke(self._site, self._blob, page, end)
        self._fresh[page] = m.prot
        return True

    def _fail(self, reason: str) -> bool:
        if self._fault is None:
            self._fault = reason
        self.uc.emu_stop()
        return False

    def _fresh_prot(self, addr: int, size: int) -> int | None:
        """The tracee's protection common to [addr, addr+size), refreshing pages."""
        page = addr & ~_OFF
        last = (addr + max(size, 1) - 1) & ~_OFF
        if page == last:
            p = self._fresh.get(page)
            if p is not None:
                return p
        prot = PROT_READ | PROT_WRITE | PROT_EXEC
        while True:
            p = self._fresh.get(page)
            if p is None:
                if not self._refresh(page):
                    return None
                p = self._fresh[page]
            prot &= p
            if page >= last:
                return prot
            page += PAGE

    def _collect_stores(self) -> list[tuple[int, bytes]]:
        """The bytes of every recorded store, merged where they touch."""
        spans: list[list[int]] = []
        for addr, size in self._stores:
            if spans and spans[-1][0] <= addr <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], addr + size)
            else:
                spans.append([addr, addr + size])
        out = []
        for start, end in spans:
            chunks = []
            a = start
            while a < end:  # straight from our page buffers
                page = a & ~_OFF
                stop = min(end, page + PAGE)
                chunks.append(ctypes.string_at(self._pages[page] + a - page, stop - a))
                a = stop
            out.append((start, b"".join(chunks)))
        return out

    # ---- callbacks -----------------------------------------------------

    def _guarded(self, fn: Callable[..., Any], on_error: Any) -> Callable[..., Any]:
        """Wrap a Unicorn callback: an exception is kept and re-raised by run()
        (inside C it would vanish, or surface as an unrelated UcError)."""

        def callback(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised after emu_start
                if self._error is None:
                    self._error = e
                self.uc.emu_stop()
                return on_error

        return callback

    def _on_unmapped(
        self, uc: Uc, access: int, addr: int, size: int, value: int, ud: object
    ) -> bool:
        if access == UC_MEM_FETCH_UNMAPPED:
            # only the next instruction's fetch can get here: the instruction's
            # own pages are mapped before the run, so it has completed
            if not self._site <= addr < self._next:
                self._escaped = True
            return False
        return self._fresh_prot(addr, size) is not None

    def _on_read(self, uc: Uc, access: int, addr: int, size: int, value: int, ud: object) -> None:
        prot = self._fresh_prot(addr, size)
        if prot is None:
            return
        if not prot & PROT_READ:
            self._fail(f"read from unreadable page at {addr:#x}")
        elif addr <= self._guard < addr + size:
            self._fail("reads the byte after itself, where the stop byte is")
        elif addr < self._lowest:
            self._lowest = addr

    def _on_write(self, uc: Uc, access: int, addr: int, size: int, value: int, ud: object) -> None:
        prot = self._fresh_prot(addr, size)
        if prot is None:
            return
        if not prot & PROT_WRITE:
            self._fail(f"store to non-writable page at {addr:#x}")
        elif prot & PROT_EXEC:
            self._fail(f"store to executable page at {addr:#x} (may hold int3s)")
        else:
            self._stores.append((addr, size))
            if addr < self._lowest:
                self._lowest = addr

    def _on_intr(self, uc: Uc, intno: int, ud: object) -> None:
        self._fail(f"CPU exception {intno} in the emulator")

    def _on_invalid(self, uc: Uc, ud: object) -> bool:
        return self._fail("Unicorn: invalid instruction")

    def _on_syscall(self, uc: Uc, ud: object) -> None:
        self._fail("syscall reached the emulator")
