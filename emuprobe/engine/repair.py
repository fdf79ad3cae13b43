"""`emuprobe repair -p PID`: take out the int3s a killed tracer left behind.

If emuprobe is killed with SIGKILL while attached, it cannot restore the
bytes it planted, and the process dies of SIGTRAP at its next hit.  Repair
freezes every thread (PTRACE_SEIZE + INTERRUPT), compares each executable
file mapping with its file, and writes the file's byte back wherever memory
holds 0xcc and the file does not, except where a kernel uprobe is
registered on that file offset (the kernel put that 0xcc there).  It knows
nothing of the dead session: the file is the reference.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from emuprobe.errors import ProbeError
from emuprobe.sys import ptrace
from emuprobe.sys.maps import Mapping, file_identity, read_maps
from emuprobe.sys.tasks import check_attachable, list_threads, seize_error

INT3 = 0xCC
_UPROBE_EVENTS = ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events")


@dataclass(frozen=True)
class Repaired:
    path: str
    file_offset: int
    address: int


def repair(pid: int) -> list[Repaired]:
    """Restore every stray 0xcc in `pid`'s executable file mappings."""
    check_attachable(pid)
    seized = _freeze(pid)
    try:
        kernel = _kernel_uprobe_offsets()
        fixed: list[Repaired] = []
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            for m in read_maps(pid):
                if m.is_file and m.executable:
                    fixed += _repair_mapping(fd, m, kernel.get(os.path.realpath(m.path), set()))
        finally:
            os.close(fd)
        return fixed
    finally:
        for tid in seized:
            try:
                ptrace.detach(tid)
            except OSError:
                pass


def _freeze(pid: int) -> list[int]:
    """Seize and stop every thread, so none runs into a byte being fixed."""
    seized: list[int] = []
    try:
        while True:  # threads may be created while we stop the others
            new = [t for t in list_threads(pid) if t not in seized]
            if not new:
                return seized
            for tid in new:
                try:
                    ptrace.seize(tid, 0)
                except OSError as e:
                    if tid == pid:
                        raise seize_error(pid, e) from e
                    if e.errno != errno.ESRCH:
                        raise
                    continue
                seized.append(tid)
                ptrace.interrupt(tid)
                ptrace.waitpid(tid)
    except BaseException:
        for tid in seized:
            try:
                ptrace.detach(tid)
            except OSError:
                pass
        raise


def _repair_mapping(fd: int, m: Mapping, kernel: set[int]) -> list[Repaired]:
    try:
        if file_identity(m.path) != (m.dev, m.inode):
            return []  # the file on disk is not the one mapped: no reference
        with open(m.path, "rb") as f:
            f.seek(m.offset)
            want = f.read(m.end - m.start)
        have = os.pread(fd, len(want), m.start)
    except OSError:
        return []
    fixed = []
    for i, (now, orig) in enumerate(zip(have, want, strict=False)):
        if now == INT3 and orig != INT3 and m.offset + i not in kernel:
            os.pwrite(fd, bytes([orig]), m.start + i)
            fixed.append(Repaired(m.path, m.offset + i, m.start + i))
    return fixed


def _kernel_uprobe_offsets() -> dict[str, set[int]]:
    """Registered kernel uprobes: real path -> file offsets."""
    out: dict[str, set[int]] = {}
    for events in _UPROBE_EVENTS:
        try:
            with open(events) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 2 or ":" not in fields[1]:
                continue
            path, _, off = fields[1].rpartition(":")
            try:
                offset = int(off.split("(")[0], 16)
            except ValueError:
                continue
            out.setdefault(os.path.realpath(path), set()).add(offset)
        break
    return out


def describe(fixed: list[Repaired], pid: int) -> str:
    if not fixed:
        return f"PID {pid}: no stray int3 found in its executable file mappings"
    lines = [f"PID {pid}: restored {len(fixed)} byte(s):"]
    lines += [f"  {r.address:#x}  {r.path}+{r.file_offset:#x}" for r in fixed]
    return "\n".join(lines)


__all__ = ["repair", "describe", "Repaired", "ProbeError"]
