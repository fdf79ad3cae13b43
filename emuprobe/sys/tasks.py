"""Tasks as the kernel shows them: /proc status fields, attaching, spawning.

Every ptrace call is made by the session's single thread (ptrace requires
the attaching thread to issue all requests)."""

from __future__ import annotations

import errno
import os
import signal

from emuprobe.errors import ProbeError
from emuprobe.sys import ptrace

TRACE_OPTIONS = (
    ptrace.PTRACE_O_TRACECLONE
    | ptrace.PTRACE_O_TRACEFORK
    | ptrace.PTRACE_O_TRACEVFORK
    | ptrace.PTRACE_O_TRACEEXEC
)


def _status_field(tid: int, field: str) -> int | None:
    """An integer field of /proc/TID/status, None if the task is gone."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _status_mask(tid: int, field: str) -> int:
    """A hexadecimal signal mask of /proc/TID/status (0 if the task is gone)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def trap_pending(tid: int) -> bool:
    """Whether `tid` has a SIGTRAP queued for it alone that it will take next.

    An int3 queues its SIGTRAP (unblocked) before the thread gets back to
    user mode, but a PTRACE_INTERRUPT that lands in between is reported
    first: the thread then sits in an interrupt stop with the SIGTRAP still
    queued, and a detach would let it be delivered, which kills the program.
    """
    bit = 1 << (signal.SIGTRAP - 1)
    return bool(_status_mask(tid, "SigPnd:") & bit) and not _status_mask(tid, "SigBlk:") & bit


def read_comm(pid: int, tid: int | None = None) -> str:
    """The command name of process `pid` (or of its thread `tid`); "" if gone."""
    path = f"/proc/{pid}/comm" if tid is None else f"/proc/{pid}/task/{tid}/comm"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def tgid_of(tid: int) -> int | None:
    return _status_field(tid, "Tgid:")


def thread_state(tid: int) -> str:
    """The one-letter scheduler state of `tid` ('t' = ptrace-stopped, 'Z' zombie, '' gone)."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            data = f.read()
    except OSError:
        return ""
    return data[data.rfind(")") + 2 :][:1]


def tracer_of(pid: int) -> int:
    return _status_field(pid, "TracerPid:") or 0


def check_attachable(pid: int) -> None:
    """Raise ProbeError unless `pid` exists and is not already traced."""
    if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
        raise ProbeError(f"no process with PID {pid}")
    if tgid_of(pid) != pid:
        raise ProbeError(f"PID {pid} is a thread, not a process; use its process ID")
    other = tracer_of(pid)
    if other:
        raise ProbeError(f"PID {pid} is already traced by PID {other}")
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC))
    except PermissionError as e:
        raise ProbeError(f"PID {pid}: not permitted to trace it ({e.strerror})") from e
    except OSError as e:  # a kernel thread has no user memory at all
        if _is_kernel_thread(pid):
            raise ProbeError(f"PID {pid} is a kernel thread: it runs no user code") from e
        raise ProbeError(f"PID {pid}: cannot open its memory ({e.strerror})") from e
    if _is_kernel_thread(pid):
        raise ProbeError(f"PID {pid} is a kernel thread: it runs no user code")


_PF_KTHREAD = 0x00200000


def _is_kernel_thread(pid: int) -> bool:
    """PF_KTHREAD in the flags of /proc/PID/stat (field 9)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return bool(int(stat.rsplit(")", 1)[1].split()[6]) & _PF_KTHREAD)


def seize_error(pid: int, err: OSError) -> ProbeError:
    if err.errno == errno.EPERM:
        other = tracer_of(pid)
        if other:
            return ProbeError(f"PID {pid} is already traced by PID {other}")
        return ProbeError(
            f"PID {pid}: not permitted to trace it "
            "(another user's process, or kernel.yama.ptrace_scope forbids it)"
        )
    if err.errno == errno.ESRCH:
        return ProbeError(f"no process with PID {pid}")
    return ProbeError(f"PID {pid}: cannot trace it: {err.strerror}")


def spawn_seized(argv: list[str], options: int) -> int:
    """Fork `argv` and seize it before it executes; returns its pid.

    The child blocks on a pipe until PTRACE_SEIZE has been done, so the exec is
    reported as PTRACE_EVENT_EXEC and the new image runs nothing before we plant.
    SEIZE (not TRACEME) is required: only seized tracees accept PTRACE_INTERRUPT
    and PTRACE_LISTEN, which stop-the-world and group-stop rely on.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(wfd)
            # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive
            # exec, and the traced command must run as it would untraced.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            os.read(rfd, 1)
            os.close(rfd)
            os.execvp(argv[0], argv)
        except BaseException as e:  # noqa: BLE001 - nothing may escape a forked child
            os.write(2, f"emuprobe: cannot run {argv[0]}: {e}\n".encode())
        os._exit(127)
    os.close(rfd)
    try:
        ptrace.seize(pid, options)
    except OSError as e:
        os.close(wfd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise ProbeError(f"cannot trace the command: {e.strerror}") from e
    os.write(wfd, b"x")
    os.close(wfd)
    return pid


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
