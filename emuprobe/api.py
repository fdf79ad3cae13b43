"""The Python API: Tracer.spawn(argv) / Tracer.attach(pid), .probe(spec, handler), .run().

Nothing touches the target until run(): every probe is resolved first, so a
bad spec fails before the command starts or before the process is attached.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from collections.abc import Callable

from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.session import Session
from emuprobe.engine.sites import AddressSpace, Probe
from emuprobe.engine.strategies import DEFAULT, NAMES, Strategy
from emuprobe.engine.targets import check_targets
from emuprobe.engine.tracee import Process
from emuprobe.errors import ProbeError
from emuprobe.platform import require_supported
from emuprobe.spec.probe import ProbeSpec, parse_probe
from emuprobe.sys import ptrace
from emuprobe.sys.maps import read_maps
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.tasks import (
    TRACE_OPTIONS,
    check_attachable,
    list_threads,
    seize_error,
    spawn_seized,
)

Handler = Callable[[ProbeEvent], None]


class Tracer:
    def __init__(
        self,
        argv: list[str] | None,
        pid: int | None,
        follow: bool = True,
        strategy: Strategy = DEFAULT,
    ) -> None:
        require_supported()
        if strategy not in NAMES:
            raise ProbeError(f"unknown strategy {strategy!r}; one of: {', '.join(NAMES)}")
        self.argv = argv
        self.pid = pid
        self.session = Session(follow=follow, strategy=strategy)
        self._specs: list[tuple[ProbeSpec, Probe]] = []
        self._spec_ids: set[int] = set()  # id() of each spec in _specs, which keeps it alive
        self._probes: dict[str, Probe] = {}

    @classmethod
    def spawn(
        cls, argv: list[str], follow: bool = True, strategy: Strategy = DEFAULT
    ) -> Tracer:
        if not argv:
            raise ProbeError("no command to run")
        return cls(list(argv), None, follow, strategy)

    @classmethod
    def attach(cls, pid: int, strategy: Strategy = DEFAULT) -> Tracer:
        return cls(None, pid, strategy=strategy)

    def probe(self, spec: str | ProbeSpec, handler: Handler | None = None) -> Probe:
        """Add a probe; several calls with the same name share one Probe."""
        parsed = spec if isinstance(spec, ProbeSpec) else parse_probe(spec)
        if handler is not None and (parsed.retprobe or parsed.args):
            # A handler here runs at the entry with raw registers.
            raise ProbeError(
                f"{parsed.text}: %return and fetch arguments need emuprobe.perfbridge.bridge.Bridge"
            )
        probe = self._probes.get(parsed.name)
        if probe is None:
            probe = Probe(parsed.name, parsed.text)
            self._probes[parsed.name] = probe
        if handler is not None:
            probe.handlers.append(handler)
        if id(parsed) not in self._spec_ids:
            self._spec_ids.add(id(parsed))
            self._specs.append((parsed, probe))
        return probe

    @property
    def probes(self) -> list[Probe]:
        return list(self._probes.values())

    def run(self) -> int:
        """Start or attach, trace until the end, detach; the command's exit status."""
        with self.session.stop_on_signals():
            if self.argv is not None:
                self._spawn(self.argv)
            else:
                assert self.pid is not None
                self._attach(self.pid)
            status = self.session.run()
        stop = self.session.stop_signal
        if stop and self.argv is not None and self.session.stops.root_pid:
            # Ctrl-C already reached the command through the terminal; SIGTERM
            # was ours alone, so pass it on (as strace does) and report how the
            # command ended if it ends promptly.
            if stop == signal.SIGTERM:
                try:
                    os.kill(self.session.stops.root_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            ended = wait_briefly(self.session.stops.root_pid, 2.0)
            status = ended if ended is not None else status
        return status

    # -- spawn ------------------------------------------------------------------
    def _spawn(self, argv: list[str]) -> None:
        exe = shutil.which(argv[0])
        if exe is None:
            raise ProbeError(f"command not found: {argv[0]}")
        s = self.session
        s.set_targets(check_targets(self._specs, os.path.realpath(exe), s.planter.images, None))
        # EXITKILL: if emuprobe itself is killed, the command must not run on
        # with int3s that nobody handles.
        pid = spawn_seized(argv, TRACE_OPTIONS | ptrace.PTRACE_O_EXITKILL)
        s.stops.root_pid = pid
        status = _wait_exec(pid)
        if status is not None:  # the exec failed; the child said why on stderr
            s.stops.exit_status = status
            return
        proc = Process(pid, AddressSpace(ProcessMemory(pid)))
        try:
            s.start(proc)
            s.reg.add_thread(pid, proc, stopped=True)
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        s.reg.resume(s.reg.threads[pid])

    # -- attach -----------------------------------------------------------------
    def _attach(self, pid: int) -> None:
        check_attachable(pid)
        s = self.session
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            mapped = read_maps(pid)
        except OSError as e:
            raise ProbeError(f"PID {pid}: cannot read its executable or maps ({e.strerror})") from e
        exe = exe.removesuffix(" (deleted)")
        s.set_targets(check_targets(self._specs, exe, s.planter.images, mapped))
        s.attached = True
        proc = Process(pid, AddressSpace(ProcessMemory(pid)), attached=True)
        s.reg.add_process(proc)
        seized: set[int] = set()
        try:
            while True:  # threads can be created while we attach to the others
                new = [t for t in list_threads(pid) if t not in seized]
                if not new:
                    break
                for tid in new:
                    try:
                        ptrace.seize(tid, TRACE_OPTIONS)
                    except OSError as e:
                        if tid == pid:
                            raise seize_error(pid, e) from e
                        if e.errno != errno.ESRCH:
                            raise
                        continue  # exited meanwhile
                    seized.add(tid)
                    s.reg.add_thread(tid, proc)
            ours = s.reg.stop_threads(list(s.reg.threads.values()))
            s.start(proc)
        except BaseException:
            s.reg.hold = None
            s.detach_all()
            raise
        s.reg.resume_all(ours)


def _wait_exec(pid: int) -> int | None:
    """Wait for the seized child's PTRACE_EVENT_EXEC; its exit status if it never execs."""
    while True:
        _, status = ptrace.waitpid(pid)
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        if ptrace.stop_event(status) == ptrace.PTRACE_EVENT_EXEC:
            return None
        sig = os.WSTOPSIG(status)
        ptrace.cont(pid, 0 if ptrace.stop_event(status) else sig)


def wait_briefly(pid: int, seconds: float) -> int | None:
    """The exit status of our (no longer traced) child, if it ends within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if got:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else (
                128 + os.WTERMSIG(status)
            )
        time.sleep(0.01)
    return None
