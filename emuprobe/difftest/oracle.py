"""The native oracle: a ptraced sandbox child that runs one instruction on the CPU.

The child is forked from this process, maps a code area and data pages at fixed
addresses, asks to be traced and stops; it never runs a line of its own again.
The tracer gives it any state (general registers, RFLAGS, FS/GS base,
XMM0-15, MXCSR, the pages' bytes), single-steps one instruction and reads
everything back, including the fault if there was one.  One sandbox serves
any number of cases: each case rewrites every page it compares.

The emulated side of a case goes through the engine's own per-hit path
(`run_engine`): the int3 planted at the site, GETREGS, `Emulator.step` over
this child's /proc/PID/mem and PTRACE_{GET,SET}FPREGS, SETREGS, exactly as
session.py does it at a probe hit, so the difftest proves the state transfer
and write-back too, not a Unicorn set-up of its own.

Layout (DATA within rel32 reach of CODE; the holes between are unmapped, so
faults are compared too):

    CODE  0x200000000  r-x  2 pages   instructions, the rest int3
    DATA  0x200010000  rw-  4 pages   data and stack
    RO    0x200020000  r--  1 page
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

from emuprobe.exec.execute import Emulated, Emulator, StepResult
from emuprobe.sys import ptrace as pt
from emuprobe.sys.maps import read_maps
from emuprobe.sys.memory import ProcessMemory
from emuprobe.x86.decode import Plan

CODE, CODE_LEN = 0x2_0000_0000, 0x2000
DATA, DATA_LEN = 0x2_0001_0000, 0x4000
RO, RO_LEN = 0x2_0002_0000, 0x1000
SITE = CODE + 0x100
INT3 = b"\xcc"
RO_BYTES = bytes(range(256)) * (RO_LEN // 256)
_SYSCALL = b"\x0f\x05"
_SYS_MUNMAP = 11
_SYS_RSEQ = 334
_RSEQ_SIG = 0x53053053  # glibc's RSEQ_SIG on x86
REGIONS = ((CODE, CODE_LEN), (DATA, DATA_LEN), (RO, RO_LEN))

_PROT_R, _PROT_W, _PROT_X = 1, 2, 4
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
)  # fmt: skip


class PtraceFp(pt.ThreadFp):
    """The hit path's FP access, counting calls."""

    __slots__ = ("gets", "sets")

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self.gets = self.sets = 0

    def get(self) -> pt.UserFpRegs:
        self.gets += 1
        return super().get()

    def set(self, fp: pt.UserFpRegs) -> None:
        self.sets += 1
        super().set(fp)


@dataclass
class Input:
    """One case's starting state.  `regs`/`fp` are complete structures (start
    from `Sandbox.base_regs()`/`base_fp()`); `rip` is set to `site` here."""

    code: bytes
    regs: pt.UserRegs
    fp: pt.UserFpRegs
    data: bytes  # DATA_LEN bytes
    site: int = SITE
    planted: dict[int, bytes] | None = None  # other probe sites: addr -> original bytes

    def memory(self) -> bytes:
        """CODE + DATA + RO as loaded (no int3 at the site): what an
        instruction that changed nothing leaves."""
        page = bytearray(INT3 * CODE_LEN)
        for addr, orig in (self.planted or {}).items():
            page[addr - CODE : addr - CODE + len(orig)] = orig
        off = self.site - CODE
        page[off : off + len(self.code)] = self.code[: CODE_LEN - off]
        return bytes(page) + self.data + RO_BYTES


@dataclass
class Outcome:
    """Everything the comparator looks at after one instruction."""

    regs: pt.UserRegs
    fp: pt.UserFpRegs
    memory: bytes  # CODE + DATA + RO, concatenated
    signal: int = 0  # 0: the instruction completed; else the signal it raised
    si_code: int = 0
    si_addr: int = 0


def _rseq_offset() -> int | None:
    """Where glibc's rseq area sits relative to the thread pointer, if it
    registered one."""
    try:
        size = ctypes.c_uint.in_dll(_libc, "__rseq_size").value
        offset = ctypes.c_long.in_dll(_libc, "__rseq_offset").value
    except ValueError:  # glibc < 2.35: no rseq registration
        return None
    return offset if size else None


def _rseq_size() -> int:
    return ctypes.c_uint.in_dll(_libc, "__rseq_size").value


def end_traced(pid: int, mem: ProcessMemory) -> None:
    """Close `mem`, kill the traced child `pid` and reap it."""
    mem.close()
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _child() -> None:  # pragma: no cover - runs in the forked child only
    try:
        os.setpgid(0, 0)  # the terminal's ^C must not reach it
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        for addr, length, prot in (
            (CODE, CODE_LEN, _PROT_R | _PROT_X),
            (DATA, DATA_LEN, _PROT_R | _PROT_W),
            (RO, RO_LEN, _PROT_R),
        ):
            flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE
            if _libc.mmap(addr, length, prot, flags, -1, 0) != addr:
                os._exit(3)
        pt.traceme()
        os.kill(os.getpid(), signal.SIGSTOP)
    finally:
        os._exit(4)


class Sandbox:
    """One traced child; `close()` (or the context manager) kills and reaps it."""

    def __init__(self) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            _child()
        self.pid = pid
        _, status = pt.waitpid(pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP):
            os.waitpid(pid, os.WNOHANG)
            raise OSError(f"oracle sandbox failed to start (status {status:#x})")
        pt.set_options(pid, pt.PTRACE_O_EXITKILL)
        self.mem = ProcessMemory(pid)
        self.fp = PtraceFp(pid)
        self._base = pt.getregs(pid)
        thread_pointer = self._base.fs_base
        self._base.orig_rax = (1 << 64) - 1  # not in a syscall: no restart fix-ups
        self._base.fs_base = self._base.gs_base = 0
        self._base_fp = pt.getfpregs(pid)
        try:
            self._isolate(thread_pointer)
        except BaseException:
            self.close()
            raise
        self.mem.write(RO, RO_BYTES)

    def _isolate(self, thread_pointer: int) -> None:
        """Unmap everything the fork inherited (Python, libc, heap, stack), by
        munmap syscalls run in the child, so that only the sandbox pages exist:
        an address outside them faults on the CPU and in the engine alike, and
        a store there cannot change what the next case reads."""
        rseq = _rseq_offset()
        if rseq is not None:
            # glibc registered an rseq area in the TLS; once that is unmapped
            # the kernel would SIGSEGV the child on its next return to user mode
            area = thread_pointer + rseq
            if self._syscall(_SYS_RSEQ, area, 32, 1, _RSEQ_SIG) != 0:
                self._syscall(_SYS_RSEQ, area, _rseq_size(), 1, _RSEQ_SIG)
        ours = {a for a, _ in REGIONS}
        for m in read_maps(self.pid):
            if m.start in ours or m.path == "[vsyscall]":  # vsyscall cannot be unmapped
                continue
            if self._syscall(_SYS_MUNMAP, m.start, m.end - m.start) != 0:
                raise OSError(f"oracle sandbox: munmap of {m.start:#x}-{m.end:#x} failed")
        self.mem.refresh()

    def _syscall(self, nr: int, *args: int) -> int:
        """Run one system call in the child (from the code page); its result."""
        regs = self.base_regs()
        regs.rip, regs.rax = CODE, nr
        for name, value in zip(("rdi", "rsi", "rdx", "r10"), args, strict=False):
            setattr(regs, name, value)
        self.mem.write(CODE, _SYSCALL)
        pt.setregs(self.pid, regs)
        pt.singlestep(self.pid)
        _, status = pt.waitpid(self.pid)
        if not (os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP):
            raise OSError(f"oracle sandbox: syscall {nr} stopped with status {status:#x}")
        result: int = pt.getregs(self.pid).rax
        return result - (1 << 64) if result >> 63 else result

    def close(self) -> None:
        if self.pid:
            end_traced(self.pid, self.mem)
            self.pid = 0

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def base_regs(self) -> pt.UserRegs:
        """A fresh copy of the child's registers at its stop (CS, SS as the kernel set them)."""
        return pt.UserRegs.from_buffer_copy(self._base)

    def base_fp(self) -> pt.UserFpRegs:
        return pt.UserFpRegs.from_buffer_copy(self._base_fp)

    # ---- one case ----------------------------------------------------------

    def load(self, case: Input, planted: bool) -> None:
        """Give the child `case`'s pages and registers, RIP at the site; with
        `planted`, an int3 on each site as a probe leaves it."""
        page = bytearray(case.memory()[:CODE_LEN])
        others = case.planted or {}
        self.mem.planted.clear()
        if planted:  # as a probe leaves it: our int3 in place of each first byte
            for addr, orig in {**others, case.site: case.code[:1]}.items():
                page[addr - CODE] = INT3[0]
                self.mem.planted[addr] = orig
        self.mem.write(CODE, bytes(page))
        self.mem.write(DATA, case.data)
        case.regs.rip = case.site
        pt.setregs(self.pid, case.regs)
        pt.setfpregs(self.pid, case.fp)

    def snapshot(self, sig: int = 0, si_code: int = 0, si_addr: int = 0) -> Outcome:
        mem = b"".join(self.mem.read(a, n) for a, n in REGIONS)
        return Outcome(pt.getregs(self.pid), pt.getfpregs(self.pid), mem, sig, si_code, si_addr)

    def run_native(self, case: Input, repeat: bool = False) -> Outcome:
        """Single-step `case.code` on the CPU.  A rep string op traps after
        each iteration; with `repeat` it is stepped until RIP leaves the site,
        as the engine emulates it to completion."""
        self.load(case, planted=False)
        while True:
            pt.singlestep(self.pid)
            _, status = pt.waitpid(self.pid)
            if not os.WIFSTOPPED(status):
                raise OSError(f"oracle sandbox died (status {status:#x})")
            sig = os.WSTOPSIG(status)
            info = pt.getsiginfo(self.pid)
            done = sig == signal.SIGTRAP and info.si_code == pt.TRAP_TRACE
            if not done:
                addr = ctypes.c_uint64.from_buffer(info, 16).value  # _sigfault.si_addr
                return self.snapshot(sig, info.si_code, addr)
            if not repeat or pt.getregs(self.pid).rip != case.site:
                return self.snapshot()

    def run_engine(
        self, case: Input, plan: Plan, emulator: Emulator, mem: ProcessMemory | None = None
    ) -> tuple[StepResult, Outcome]:
        """Take `case.code` the way a probe hit does: int3 planted at the site,
        GETREGS, `emulator.step`, SETREGS if it emulated.  Then un-plant, so
        that the pages compare equal to the native run's."""
        self.load(case, planted=True)
        regs = pt.getregs(self.pid)
        result = emulator.step(plan, case.code, regs, mem or self.mem, self.fp)
        if isinstance(result, Emulated):
            pt.setregs(self.pid, regs)
        for addr, orig in self.mem.planted.items():
            self.mem.write(addr, orig[:1])
        self.mem.planted.clear()
        return result, self.snapshot()
