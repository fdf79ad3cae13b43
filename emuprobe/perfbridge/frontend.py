"""`emuprobe trace` options that come from perf: definitions, stacks, aggregations,
kernel events and exports.  cli.py adds these options and hands the run to TraceFrontend.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from emuprobe.api import Tracer
from emuprobe.errors import ProbeError
from emuprobe.perfbridge.aggregate import Aggregator, check_names
from emuprobe.perfbridge.bridge import Bridge
from emuprobe.perfbridge.export import ChromeWriter, FoldedWriter, JsonlWriter, TextWriter
from emuprobe.perfbridge.options import DEFAULT_DEPTH, stack_depth
from emuprobe.perfbridge.record import Record
from emuprobe.spec.perf import parse_perf_probe, read_events_file
from emuprobe.spec.probe import ProbeSpec, parse_probe


def wanted(args: argparse.Namespace, specs: list[ProbeSpec]) -> bool:
    """Whether this run needs the bridge (else the plain counting/printing path serves)."""
    return bool(
        args.perf_binary or args.events or stack_depth(args) or args.by or args.hist
        or args.kernel_events or args.format != "text"
        or any(s.retprobe or s.args for s in specs)
    )


def parse_specs(args: argparse.Namespace) -> list[ProbeSpec]:
    """Every definition on the command line and in --events, parsed before anything runs."""
    if args.perf_binary:
        specs = [parse_perf_probe(p, args.perf_binary) for p in args.probes]
    else:
        specs = [parse_probe(p) for p in args.probes]
    if args.events:
        specs += read_events_file(args.events)
    if not specs:
        raise ProbeError("no probes: give PROBE arguments or --events FILE")
    if args.by and not args.count:
        raise ProbeError("--by NAME goes with --count")
    check_names(args.by, args.hist, {a.name for s in specs for a in s.args})
    return specs


class TraceFrontend:
    """Wires a Tracer to the bridge, the sinks and (with -k) the kernel events."""

    def __init__(self, args: argparse.Namespace, out: TextIO, specs: list[ProbeSpec]) -> None:
        self.args = args
        self.specs = specs
        self.out = out
        fmt = args.format
        self.writer: Any = None
        if fmt == "perf-script" or (fmt == "text" and not (args.count or args.hist)):
            # --count and --hist are summaries: no line per event unless asked.
            self.writer = TextWriter(out, stacks=bool(stack_depth(args)) or fmt == "perf-script")
        elif fmt == "chrome":
            self.writer = ChromeWriter(out)
        elif fmt == "folded":
            self.writer = FoldedWriter(out)
        elif fmt == "jsonl":
            self.writer = JsonlWriter(out)
        self.aggregator = Aggregator(args.by, args.hist) if (args.by or args.hist) else None
        depth = stack_depth(args) or (DEFAULT_DEPTH if fmt in ("perf-script", "folded") else 0)
        self.depth = depth
        self.kernel: Any = None

    def attach(self, tracer: Tracer) -> None:
        sinks = [s for s in (self.writer, self.aggregator) if s is not None]
        if not sinks and not self.args.kernel_events:
            for spec in self.specs:  # counting only: no handler, C may take the hits
                if not spec.retprobe:
                    tracer.probe(spec)
            returns = [spec for spec in self.specs if spec.retprobe]
            if returns:  # a return is only seen through the return tracker
                self.bridge = Bridge(tracer, lambda record: None)
                for spec in returns:
                    self.bridge.add(spec)
            return
        unwind = None
        if self.depth:
            from emuprobe.perfbridge.unwind import Unwinder

            unwind = Unwinder(tracer.session, self.depth).unwind
        sink = self._fan_out(sinks)
        if self.args.kernel_events:
            from emuprobe.perfbridge.kevents import KernelEvents, Merger

            merger = Merger(sink)
            self.kernel = KernelEvents(self.args.kernel_events, merger.push_kernel)
            merger.kernel = self.kernel
            tracer.session.when_started(self.kernel.open_for)
            sink = merger.push
            self.merger = merger
        bridge = Bridge(tracer, sink, unwind)
        for spec in self.specs:
            bridge.add(spec)
        self.bridge = bridge

    @staticmethod
    def _fan_out(sinks: list[Any]) -> Any:
        if len(sinks) == 1:
            return sinks[0]

        def fan(rec: Record) -> None:
            for s in sinks:
                s(rec)

        return fan

    def finish(self) -> None:
        """After the run: drain kernel events, close exports, print summaries."""
        if self.kernel is not None:
            self.kernel.close()
            self.merger.flush_all()
            if self.kernel.lost:
                print(f"emuprobe: {self.kernel.lost} kernel events lost (ring buffer full)",
                      file=sys.stderr)
        if self.writer is not None:
            self.writer.close()
        if self.aggregator is not None:
            self.aggregator.check_used()
            report = self.aggregator.report()
            if report:
                to_out = self.args.output and self.args.format == "text"
                print(report, file=self.out if to_out else sys.stderr)
