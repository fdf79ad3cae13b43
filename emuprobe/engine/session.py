"""The event loop: stops -> sites -> handlers -> execution of the displaced instruction.

One thread (the one that attached) makes every ptrace call and runs every
handler.  A thread stopped at a site is handled on its own while the others
keep running; only the native fallback stops the world.  The work is done by
collaborators: Planter (where int3s go), Stops (what a stop means), Hits
(one hit), Children (clone, fork, exec) and leaving.detach_all (every way
out).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from emuprobe.engine import leaving
from emuprobe.engine.children import Children
from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.hits import Hits
from emuprobe.engine.hotloop import HotLoop
from emuprobe.engine.planting import Planter
from emuprobe.engine.registry import Registry
from emuprobe.engine.stops import Stops
from emuprobe.engine.strategies import DEFAULT, Strategy
from emuprobe.engine.targets import Target
from emuprobe.engine.tracee import Process, Thread


class _Interrupted(Exception):
    """Raised by our SIGINT/SIGTERM handler, only while idle in waitpid."""


class Session:
    def __init__(self, follow: bool = True, warn: Callable[[str], None] | None = None,
                 strategy: Strategy = DEFAULT) -> None:  # fmt: skip
        self._warn = warn or (lambda msg: print(f"emuprobe: {msg}", file=sys.stderr))
        self._warned: set[str] = set()
        # The compiled loop only ever runs emulation: emulate alone uses it.
        self.hot = HotLoop.load() if strategy == "emulate" else None
        self.reg = Registry()
        self.reg.hot = self.hot
        self.planter = Planter(self.hot, self.warn_once, self._on_rendezvous)
        self.hits = Hits(self.reg, strategy, self.hot, self._warn, self.warn_once)
        children = Children(self.reg, self.planter, self.hot, self.hits.xol, follow)
        self.stops = Stops(self.reg, self.hits, children)  # root_pid, exit_status
        self.stop_signal = 0
        self.attached = False
        self._waiting = False
        self._on_start: list[Callable[[Process], None]] = []

    # -- extension points (perfbridge) ------------------------------------------
    def when_started(self, hook: Callable[[Process], None]) -> None:
        """Call `hook` with each process once its sites are first planted."""
        self._on_start.append(hook)

    def after_this_hit(self, work: Callable[[], None]) -> None:
        """Run `work` once the current hit's instruction has run (e.g. unplant it)."""
        self.stops.after_hit.append(work)

    def judge_stray_traps(self, judge: Callable[[Thread, int], bool]) -> None:
        """`judge(thread, addr)` says whether a SIGTRAP at `addr`, where no site
        is, was ours (an int3 removed after the thread hit it): rewind, resume."""
        self.stops.stray_judges.append(judge)

    # -- set-up ---------------------------------------------------------------
    def set_targets(self, targets: list[Target]) -> None:
        self.planter.targets = targets

    def start(self, proc: Process) -> None:
        """Plant every site in a freshly seized `proc` (all its threads stopped)."""
        self.reg.add_process(proc)
        proc.read_comm()
        self.planter.plant_all(proc, strict=True)
        for hook in self._on_start:
            hook(proc)

    # -- the loop -------------------------------------------------------------
    @contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM end the trace cleanly instead of killing us.

        Installed before the tracee is touched, so a Ctrl-C during attach or
        planting is a request to stop, never an exception half-way through.
        """
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Trace until every traced process has exited (or we are told to stop)."""
        try:
            while self.reg.processes and not self.stop_signal:
                got = self._next()
                if got is None:
                    break
                self.stops.dispatch(*got)
        except _Interrupted:
            pass
        except BaseException:
            self.stops.failed = True  # a handler's SystemExit, EPIPE, a bug of ours
            raise
        finally:
            if self.hot is not None:
                self.hot.sync()
            if self.reg.processes:
                self.detach_all()
        status = self.stops.exit_status
        if self.stop_signal and status is None:
            # Attached: Ctrl-C is how a user ends the trace, not a failure.
            return 0 if self.attached else 128 + self.stop_signal
        return status if status is not None else 0

    def detach_all(self) -> None:
        """Every way out of a session comes here (see leaving.detach_all)."""
        self.stops.leaving = True
        leaving.detach_all(self.reg, self.stops.dispatch, self.warn_once)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum
        if self._waiting:
            raise _Interrupted()

    def _next(self) -> tuple[int, int] | None:
        if self.reg.pending:
            return self.reg.pending.popleft()
        self._waiting = True
        try:
            if self.stop_signal:
                raise _Interrupted()
            return self.reg.next_event()
        finally:
            self._waiting = False

    def _on_rendezvous(self, event: ProbeEvent) -> None:
        proc = self.reg.processes.get(event.pid)
        if proc is not None:
            self.planter.plant_all(proc)

    def warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._warn(msg)
