"""Traced processes and threads: the session's plain bookkeeping records."""

from __future__ import annotations

from dataclasses import dataclass, field

from emuprobe.engine.sites import AddressSpace
from emuprobe.sys.tasks import read_comm


@dataclass(eq=False)
class Process:
    pid: int
    aspace: AddressSpace
    threads: set[int] = field(default_factory=set)
    followed: bool = True  # False: a --no-follow vfork child, traced silently until exec
    attached: bool = False  # attached with -p (detach on exit) rather than spawned
    comm: str = ""

    def read_comm(self) -> str:
        self.comm = read_comm(self.pid) or self.comm
        return self.comm


@dataclass(eq=False)
class Thread:
    tid: int
    process: Process
    # True while the thread sits in a ptrace-stop that the session has not
    # resumed (stop-the-world, or an event queued for later).
    stopped: bool = False
    comm: str = ""
    # The address of our int3 this thread trapped on, while its registers in
    # the kernel still say rip = at_site + 1 (the hit is not yet done): every
    # way out rewinds such a thread before the byte goes, or it would resume
    # one byte into the restored instruction.
    at_site: int | None = None
