"""The compiled Unicorn machine (machine.c), with the interface of machine.Machine.

Emulator uses it whenever the compiled module is built; machine.Machine, the
pure-Python machine, is the fallback and the reference for what machine.c does.
Python's part: flatten each UnicornStep into a C struct once, keep the C copy
of each address space's maps and planted bytes current (pushed when they
change), and turn the C result into the (reason, fp_written) pair of
Machine.run.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from unicorn import unicorn_const as ucc
from unicorn import x86_const as ucx
from unicorn.unicorn_py3.unicorn import uclib

from emuprobe.exec.ucengine import FpAccess, new_engine
from emuprobe.sys.maps import MapsIndex
from emuprobe.sys.memory import PlantedBytes, ProcessMemory
from emuprobe.sys.ptrace import UserRegs, reg_offset
from emuprobe.x86.decode import UnicornStep
from emuprobe.x86.regs import EMULATED_FLAGS, MXCSR, RESERVED_ONE, XMMS

# machine.c's results and flags
_REFUSED, _MAPS_MISS, _HANDBACK, _COMMIT_FAILED, _CRASHED = 1, 2, 3, 4, 5
_MAPS_FRESH, _KEEP_STORES, _TEST_CRASH = 1, 4, 8
_STORE_CAP = 8 * 4096 + 64  # the largest store span: a rep string op at policy.REP_LIMIT
_RIP_BASE, _NO_REG = -2, -1


def compiled_module() -> Any | None:
    """emuprobe._hotloop (machine.c is built into it), unless EMUPROBE_CMACHINE=0."""
    if os.environ.get("EMUPROBE_CMACHINE", "1") == "0":
        return None
    try:
        from emuprobe import _hotloop  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _hotloop



def _fn(name: str) -> int:
    return int(ctypes.cast(getattr(uclib, name), ctypes.c_void_p).value or 0)


def _ctl(code: int, nargs: int) -> int:
    """uc_ctl's control word for a write with `nargs` arguments (unicorn.h UC_CTL_WRITE)."""
    return (ucc.UC_CTL_IO_WRITE << 30) | (nargs << 26) | code


class _AddressSpaceState:
    """The C memctx of one ProcessMemory and what was last pushed into it."""

    def __init__(self, ffi: Any, lib: Any, mem: ProcessMemory) -> None:
        self._lib = lib
        self.ctx = ffi.gc(lib.memctx_new(mem.fd), lib.memctx_free)
        self.maps: object = None
        self.planted: object = None
        self.planted_version = -1

    def maps_changed(self, maps: MapsIndex) -> None:
        ms = maps.mappings
        self._lib.memctx_set_maps(self.ctx, [m.start for m in ms], [m.end for m in ms],
                                  [m.prot for m in ms], len(ms))  # fmt: skip
        self.maps = maps

    def sync_planted(self, planted: PlantedBytes) -> None:
        addrs = sorted(planted)
        packed = bytearray(16 * len(addrs))
        for i, a in enumerate(addrs):
            orig = planted[a][:15]
            packed[16 * i] = len(orig)
            packed[16 * i + 1 : 16 * i + 1 + len(orig)] = orig
        self._lib.memctx_set_planted(self.ctx, addrs, bytes(packed), len(addrs))
        self.planted, self.planted_version = planted, planted.version


class CMachine:
    """One Unicorn engine, driven by machine.c, reused for every hit."""

    def __init__(self, module: Any) -> None:
        self._ffi, self._lib = module.ffi, module.lib
        self.crashes = 0  # engines lost to a crash inside Unicorn (machine.c's guard)
        self.crash_next = False  # tests: fault inside the next guarded run
        self.replaced: list[Callable[[], None]] = []  # told when the engine is replaced
        self._dead: list[Any] = []
        self._start()
        self._plans: dict[UnicornStep, Any] = {}
        self._fp_written = self._ffi.new("int *")
        self._store_addr = self._ffi.new("uint64_t *")
        self._store_buf: Any = None

    def _start(self) -> None:
        """A new engine, with machine.c's hooks on it."""
        ffi, lib = self._ffi, self._lib
        self.uc = new_engine()
        api = self._api = ffi.new("struct uc_api *")
        for name, field in ffi.typeof("struct uc_api").fields:
            if field.type.kind == "function":  # a function of libunicorn
                setattr(api, name, ffi.cast(field.type, _fn(f"uc_{name}")))
        api.hook_mem_unmapped = ucc.UC_HOOK_MEM_UNMAPPED
        api.hook_mem_read = ucc.UC_HOOK_MEM_READ
        api.hook_mem_write = ucc.UC_HOOK_MEM_WRITE
        api.hook_intr = ucc.UC_HOOK_INTR
        api.hook_insn_invalid = ucc.UC_HOOK_INSN_INVALID
        api.hook_insn = ucc.UC_HOOK_INSN
        api.ins_syscall = ucx.UC_X86_INS_SYSCALL
        api.mem_fetch_unmapped = ucc.UC_MEM_FETCH_UNMAPPED
        api.prot_all = ucc.UC_PROT_ALL
        api.ctl_remove_cache = _ctl(ucc.UC_CTL_TB_REMOVE_CACHE, 2)
        api.ctl_flush_tb = _ctl(ucc.UC_CTL_TB_FLUSH, 0)
        self._m = lib.mach_new(ffi.cast("uc_engine *", self.uc._uch.value), api)
        if self._m == ffi.NULL:
            raise RuntimeError("machine.c: cannot install its Unicorn hooks")

    @property
    def handle(self) -> Any:
        """The C machine, for the hot loop's mach_run() calls."""
        return self._m

    def plan_handle(self, plan: UnicornStep) -> Any:
        """The flattened plan; it lives as long as this machine."""
        cplan = self._plans.get(plan)
        if cplan is None:
            cplan = self._plans[plan] = self._flatten(plan)
        return cplan

    def memctx(self, mem: ProcessMemory) -> Any:
        """The C view of `mem`, kept current while `mem` is open."""
        return self._sync(mem).ctx

    def run(
        self, plan: UnicornStep, code: bytes, regs: UserRegs, mem: ProcessMemory, fp: FpAccess
    ) -> tuple[str | None, bool]:
        """As machine.Machine.run."""
        ffi, lib = self._ffi, self._lib
        cplan = self.plan_handle(plan)
        state = self._sync(mem)
        fpregs = fp.get() if plan.needs_fp else None
        fx = ffi.NULL if fpregs is None else ffi.from_buffer("uint8_t[]", fpregs)
        regbuf = ffi.from_buffer("uint8_t[]", regs)
        # a ProcessMemory subclass that overrides write (the lockstep's records
        # stores instead of making them) is given the stores; else C writes them
        keep = type(mem).write is not ProcessMemory.write
        flags = _KEEP_STORES if keep else 0
        if self.crash_next:
            flags |= _TEST_CRASH
            self.crash_next = False
        while True:
            rc = lib.mach_run(self._m, cplan, code, len(code), regbuf, fx, state.ctx, flags,
                              self._fp_written)  # fmt: skip
            if rc != _MAPS_MISS or flags & _MAPS_FRESH:
                break
            mem.refresh()  # as ProcessMemory.region does on a miss
            self._sync(mem)
            flags |= _MAPS_FRESH
        if rc == 0:
            if keep:
                self._hand_over_stores(mem)
            if self._fp_written[0] and fpregs is not None:
                fp.set(fpregs)
                return None, True
            return None, False
        reason = ffi.string(lib.mach_reason(self._m)).decode()
        if rc == _CRASHED:
            # the old engine's state is unknown: never run, nor closed (closing
            # walks that state), just kept
            self.crashes += 1
            self._dead.append(self.uc)
            self._start()
            for tell in self.replaced:
                tell()
        if rc == _COMMIT_FAILED:
            raise OSError(lib.mach_errno(self._m), reason)
        return reason, False

    def _hand_over_stores(self, mem: ProcessMemory) -> None:
        ffi, lib = self._ffi, self._lib
        if self._store_buf is None:
            self._store_buf = ffi.new("uint8_t[]", _STORE_CAP)
        for i in range(lib.mach_nstores(self._m)):
            n = lib.mach_store(self._m, i, self._store_addr, self._store_buf, _STORE_CAP)
            mem.write(self._store_addr[0], bytes(ffi.buffer(self._store_buf, n)))

    def _sync(self, mem: ProcessMemory) -> _AddressSpaceState:
        """The memctx of `mem`, with its maps and planted bytes brought up to date."""
        state = mem.machine_state
        if not isinstance(state, _AddressSpaceState):
            state = mem.machine_state = _AddressSpaceState(self._ffi, self._lib, mem)
        maps = mem.maps()
        if state.maps is not maps:
            state.maps_changed(maps)
        planted = mem.planted
        if state.planted is not planted or state.planted_version != planted.version:
            state.sync_planted(planted)
        return state

    def _flatten(self, plan: UnicornStep) -> Any:
        p = self._ffi.new("struct mplan *")
        p.length = plan.length
        if len(plan.regs) > 32 or len(plan.mem) > 8 or len(plan.implicit) > 3:
            raise ValueError(f"plan too large for machine.c: {plan.text}")
        p.nregs = len(plan.regs)
        for i, (uc, field) in enumerate(zip(plan.regs, plan.fields, strict=True)):
            p.uc_ids[i] = uc
            p.offs[i] = reg_offset(field)
        p.rip_i = plan.fields.index("rip")
        p.eflags_i = plan.fields.index("eflags")
        p.nxmm = len(plan.xmm)
        for i, x in enumerate(plan.xmm):
            p.xmm_uc[i] = XMMS[x].uc
            p.xmm_idx[i] = x
        p.xmm_uc[len(plan.xmm)] = MXCSR.uc
        p.needs_fp, p.branch, p.rep, p.aligned16 = (
            plan.needs_fp, plan.branch, plan.rep, plan.aligned16
        )
        p.nrefs = len(plan.mem)
        for i, ref in enumerate(plan.mem):
            r = p.refs[i]
            base = reg_offset(ref.base) if ref.base and ref.base != "rip" else _NO_REG
            r.base = _RIP_BASE if ref.base == "rip" else base
            r.index = reg_offset(ref.index) if ref.index else _NO_REG
            r.seg = reg_offset(ref.seg) if ref.seg else _NO_REG
            r.bitreg = reg_offset(ref.bitreg) if ref.bitreg else _NO_REG
            r.disp, r.scale, r.bitsize, r.a32 = ref.disp, ref.scale, ref.bitsize, ref.a32
        p.nimplicit = len(plan.implicit)
        for i, name in enumerate(plan.implicit):
            p.implicit[i] = reg_offset(name)
        p.emulated_flags, p.reserved_one = EMULATED_FLAGS, RESERVED_ONE
        return p

