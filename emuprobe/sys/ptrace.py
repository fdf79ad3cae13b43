"""Thin, fast ptrace(2) and waitpid(2) bindings for Linux x86-64.

python-ptrace supplies the kernel structure layouts; the calls themselves go
straight through ctypes because python-ptrace's wrappers add per-call Python
overhead that the hit path cannot afford (see ARCHITECTURE.md: 17 µs vs 10 µs
per round trip).  Every function raises ``OSError`` with the errno on failure.
"""

from __future__ import annotations

import ctypes
import os
import signal

from ptrace.binding.linux_struct import siginfo as SigInfo
from ptrace.binding.linux_struct import user_fpregs_struct as UserFpRegs
from ptrace.binding.linux_struct import user_regs_struct as UserRegs

__all__ = [
    "UserRegs",
    "UserFpRegs",
    "SigInfo",
    "PTRACE_CONT",
    "PTRACE_SINGLESTEP",
    "PTRACE_EVENT_FORK",
    "PTRACE_EVENT_VFORK",
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_EXEC",
    "PTRACE_EVENT_VFORK_DONE",
    "PTRACE_EVENT_STOP",
    "WALL",
    "SI_KERNEL",
    "TRAP_TRACE",
    "TRAP_BRKPT",
]

# Not ctypes.util.find_library: it runs ldconfig/gcc in a subprocess.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long

PTRACE_TRACEME = 0
PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_SETFPREGS = 15
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEVFORKDONE = 0x20
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_STOP = 128

WALL = 0x40000000  # __WALL: report clone children (threads) too
SI_KERNEL = 0x80  # si_code of the SIGTRAP an int3 raises
TRAP_BRKPT = 1
TRAP_TRACE = 2  # si_code of a single-step trap

GROUP_STOP_SIGNALS = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
)


def _check(result: int) -> int:
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return result


def _call(request: int, tid: int, addr: int = 0, data: int | object = 0) -> int:
    ctypes.set_errno(0)
    return _check(_ptrace(request, tid, addr, data))  # type: ignore[arg-type]


def traceme() -> None:
    _call(PTRACE_TRACEME, 0)


def seize(tid: int, options: int) -> None:
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid)


def listen(tid: int) -> None:
    _call(PTRACE_LISTEN, tid)


def set_options(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, 0, options)


def cont(tid: int, sig: int = 0) -> None:
    _call(PTRACE_CONT, tid, 0, sig)


def singlestep(tid: int, sig: int = 0) -> None:
    _call(PTRACE_SINGLESTEP, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _call(PTRACE_DETACH, tid, 0, sig)


def getregs(tid: int, regs: UserRegs | None = None) -> UserRegs:
    regs = regs if regs is not None else UserRegs()
    _call(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    _call(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def getfpregs(tid: int) -> UserFpRegs:
    fp = UserFpRegs()
    _call(PTRACE_GETFPREGS, tid, 0, ctypes.addressof(fp))
    return fp


def setfpregs(tid: int, fp: UserFpRegs) -> None:
    _call(PTRACE_SETFPREGS, tid, 0, ctypes.addressof(fp))


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(info))
    return info


def setsiginfo(tid: int, info: SigInfo) -> None:
    _call(PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(info))


def geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong(0)
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return msg.value


def reg_offset(field: str) -> int:
    """The byte offset of `field` in struct user_regs_struct (for the C code)."""
    return int(getattr(UserRegs, field).offset)


class ThreadFp:
    """A thread's FP/SSE state through PTRACE_GETFPREGS/SETFPREGS, read only
    when an instruction asks (most never need XMM state)."""

    __slots__ = ("tid",)

    def __init__(self, tid: int) -> None:
        self.tid = tid

    def get(self) -> UserFpRegs:
        return getfpregs(self.tid)

    def set(self, fp: UserFpRegs) -> None:
        setfpregs(self.tid, fp)


def waitpid(pid: int = -1, options: int = 0) -> tuple[int, int]:
    """waitpid with __WALL so that thread stops are never missed."""
    return os.waitpid(pid, options | WALL)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    _check(_libc.syscall(234, tgid, tid, sig))  # SYS_tgkill on x86-64


def stop_event(status: int) -> int:
    """The PTRACE_EVENT_* of a stop status, 0 for a plain signal stop."""
    return status >> 16
