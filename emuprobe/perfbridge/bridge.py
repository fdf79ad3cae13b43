"""Probe hits -> Records: fetch arguments, match returns, unwind stacks, hand to a sink.

    t = Tracer.spawn(["./app"])
    b = Bridge(t, sink=lambda rec: print(rec.line()))
    b.add("./app:parse%return $retval")          # or a ProbeSpec from perfbridge.spec
    t.run()

Every handler runs in the session's thread, so sinks need no locking.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from emuprobe.api import Tracer
from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.sites import Probe
from emuprobe.perfbridge.fetch import FetchContext, fetch_all, format_args
from emuprobe.perfbridge.record import Frame, Record
from emuprobe.perfbridge.retprobe import ReturnTracker
from emuprobe.spec.probe import ProbeSpec, parse_probe

Sink = Callable[[Record], None]
Unwind = Callable[[ProbeEvent], tuple[Frame, ...]]


class Bridge:
    def __init__(self, tracer: Tracer, sink: Sink, unwind: Unwind | None = None) -> None:
        self.tracer = tracer
        self.sink = sink
        self.unwind = unwind
        self._warned: set[str] = set()
        self.returns = ReturnTracker(tracer.session, self._on_return, self._warn_once)
        self._return_probes: dict[str, Probe] = {}

    def add(self, spec: str | ProbeSpec) -> Probe:
        parsed = spec if isinstance(spec, ProbeSpec) else parse_probe(spec)
        probe = self.tracer.probe(parsed)
        if parsed.retprobe:
            probe.returns = probe.returns or 0
            self._return_probes[parsed.name] = probe
            probe.handlers.append(lambda ev: self.returns.on_entry(parsed, ev))
        else:
            probe.handlers.append(lambda ev: self._on_hit(parsed, ev))
        return probe

    def _on_hit(self, spec: ProbeSpec, ev: ProbeEvent) -> None:
        values = fetch_all(spec.args, _context(ev, ev.address)) if spec.args else ()
        self.sink(
            Record(
                ev.timestamp_ns, ev.pid, ev.tid, ev.comm, "probe", spec.name,
                tuple((a.name, v) for a, v in zip(spec.args, values, strict=True)),
                format_args(spec.args, values), ev.address,
                stack=self.unwind(ev) if self.unwind else (),
            )
        )

    def _on_return(self, spec: ProbeSpec, ev: ProbeEvent, func: int, entry_ts: int) -> None:
        # Fetched at the return, as the kernel's uretprobe does ($retval is rax
        # now); @+OFFSET counts from the probed function's file, not the caller's.
        probe = self._return_probes[spec.name]
        probe.returns = (probe.returns or 0) + 1
        values = fetch_all(spec.args, _context(ev, func)) if spec.args else ()
        self.sink(
            Record(
                ev.timestamp_ns, ev.pid, ev.tid, ev.comm, "return", spec.name,
                tuple((a.name, v) for a, v in zip(spec.args, values, strict=True)),
                format_args(spec.args, values), ev.address, func,
                latency_ns=ev.timestamp_ns - entry_ts,
                stack=self.unwind(ev) if self.unwind else (),
            )
        )

    def _warn_once(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            print(f"emuprobe: {msg}", file=sys.stderr)


def _context(ev: ProbeEvent, anchor: int) -> FetchContext:
    m = ev._memory.region(anchor)
    base = m.start - m.offset if m is not None else 0
    return FetchContext(lambda f: getattr(ev.regs, f), ev.read_memory, ev.comm, base)
