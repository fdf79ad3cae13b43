"""Processes and threads coming and going: clone, fork, vfork, exec, and
stops of tracees we have not been told about yet."""

from __future__ import annotations

import os

from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.planting import Planter
from emuprobe.engine.registry import Registry
from emuprobe.engine.sites import AddressSpace
from emuprobe.engine.tracee import Process, Thread
from emuprobe.engine.xol import Xol
from emuprobe.sys import ptrace
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.tasks import tgid_of


class Children:
    def __init__(self, reg: Registry, planter: Planter, hot: HotLoop | None, xol: Xol,
                 follow: bool) -> None:  # fmt: skip
        self.reg, self.planter, self.hot, self.xol, self.follow = reg, planter, hot, xol, follow

    def adopt(self, tid: int, status: int) -> Thread | None:
        """A stop from a tid we were not told about yet (a new thread or child)."""
        tgid = tgid_of(tid)
        proc = self.reg.processes.get(tgid) if tgid is not None else None
        if proc is not None and tgid != tid:
            return self.reg.add_thread(tid, proc, stopped=True)
        # A child process whose parent's fork event is still to come.
        self.reg.early[tid] = status
        return None

    def on_new_child(self, parent: Thread, event: int, child: int) -> None:
        if event == ptrace.PTRACE_EVENT_CLONE and tgid_of(child) == parent.process.pid:
            self.reg.add_thread(child, parent.process, stopped=child in self.reg.early)
            self._requeue_early(child)
            return
        vfork = event == ptrace.PTRACE_EVENT_VFORK
        pproc = parent.process
        if vfork:
            aspace = pproc.aspace  # the child runs in its parent's mm until it execs
            aspace.users += 1
        else:
            aspace = pproc.aspace.fork_copy(ProcessMemory(child))
            self.xol.on_fork(pproc.aspace, aspace)
        proc = Process(child, aspace, followed=self.follow, comm=pproc.comm)
        if not self.follow and not vfork:
            self._release_fork_child(proc)
            return
        self.reg.add_process(proc)
        self.reg.add_thread(child, proc, stopped=child in self.reg.early)
        self._requeue_early(child)

    def on_exec(self, thread: Thread) -> None:
        proc = thread.process
        for tid in list(proc.threads):
            if tid != proc.pid:
                self.reg.remove_thread(tid)
        if thread.tid != proc.pid:  # a non-leader exec'd and took the leader's tid
            self.reg.remove_thread(thread.tid)
            thread = self.reg.add_thread(proc.pid, proc, stopped=True)
        old = proc.aspace
        old.users -= 1
        if old.users <= 0:
            old.memory.close()
            if self.hot is not None:
                self.hot.forget(old)
        if self.hot is not None:
            self.hot.unbind(thread.tid)  # its int3s and stack are in the new image now
        proc.aspace = AddressSpace(ProcessMemory(proc.pid))
        thread.comm = ""
        proc.read_comm()
        if not proc.followed:  # a --no-follow vfork child: the new image is not ours
            self.reg.remove_process(proc)
            ptrace.detach(proc.pid)
            return
        self.planter.plant_all(proc)
        self.reg.resume(thread)

    def _requeue_early(self, tid: int) -> None:
        status = self.reg.early.pop(tid, None)
        if status is not None:
            self.reg.pending.append((tid, status))

    def _release_fork_child(self, proc: Process) -> None:
        """--no-follow: take our int3s out of a fork child's copy, then let it go."""
        status = self.reg.early.pop(proc.pid, None)
        if status is None:
            _, status = ptrace.waitpid(proc.pid)
        proc.aspace.unplant_all()
        proc.aspace.memory.close()
        if os.WIFSTOPPED(status):
            ptrace.detach(proc.pid)
