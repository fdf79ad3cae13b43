"""Writers for the merged stream: text/perf-script, Chrome trace JSON, folded stacks, JSONL.

- perf-script: `perf script` lines; with stacks, each sample is followed by
  `\\t ADDR SYMBOL (LIBRARY)` frame lines and a blank line, the layout that
  FlameGraph's stackcollapse-perf.pl and the Firefox Profiler import read.
- chrome: the Trace Event Format (what ui.perfetto.dev and chrome://tracing
  open): a return becomes a complete event ("X") spanning entry to return on
  its thread; probe hits and kernel events are instant events ("i"); process
  and thread names are metadata ("M").  Timestamps are microseconds.
- folded: `comm;outer;...;inner COUNT`, one line per distinct stack.
- jsonl: one JSON object per event: ts (ns, CLOCK_MONOTONIC), pid, tid,
  kind, name, args, and comm/address/func/latency_ns/stack where they apply.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TextIO

from emuprobe.perfbridge.record import Record


class TextWriter:
    """One line per event; with stacks, perf script -g's sample blocks."""

    def __init__(self, out: TextIO, stacks: bool) -> None:
        self.out = out
        self.stacks = stacks

    def __call__(self, rec: Record) -> None:
        if not self.stacks:
            self.out.write(rec.line() + "\n")
            return
        self.out.write("\n".join([rec.line(pad=False), *rec.stack_lines()]) + "\n\n")

    def close(self) -> None:
        self.out.flush()


class JsonlWriter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, rec: Record) -> None:
        self.out.write(json.dumps(jsonl_object(rec), separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.out.flush()


def jsonl_object(rec: Record) -> dict[str, object]:
    obj: dict[str, object] = {
        "ts": rec.ts, "pid": rec.pid, "tid": rec.tid, "kind": rec.kind, "name": rec.name,
        "args": dict(rec.args), "comm": rec.comm,
    }
    if rec.kind != "kernel":
        obj["address"] = rec.address
    if rec.kind == "return":
        obj["func"] = rec.func
        obj["latency_ns"] = rec.latency_ns
    if rec.cpu >= 0:
        obj["cpu"] = rec.cpu
    if rec.stack:
        obj["stack"] = [f"{f.symbol} ({f.library})" for f in rec.stack]
    return obj


class FoldedWriter:
    """Counts identical stacks; written when the trace ends."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.counts: Counter[str] = Counter()

    def __call__(self, rec: Record) -> None:
        if rec.kind == "kernel":
            return  # no user stack to fold
        frames = [f.function for f in reversed(rec.stack)] or [rec.name]
        self.counts[";".join([rec.comm or "?", *frames])] += 1

    def close(self) -> None:
        for stack, n in sorted(self.counts.items()):
            self.out.write(f"{stack} {n}\n")
        self.out.flush()


class ChromeWriter:
    """Collects events; writes one JSON document when the trace ends."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.events: list[dict[str, object]] = []
        self.threads: dict[tuple[int, int], str] = {}

    def __call__(self, rec: Record) -> None:
        self.threads.setdefault((rec.pid, rec.tid), rec.comm)
        args: dict[str, object] = {k: v for k, v in rec.args}
        ev: dict[str, object] = {"name": rec.name, "pid": rec.pid, "tid": rec.tid, "args": args}
        if rec.kind == "return":
            # The span is the function's, from its entry to its return.
            args["latency_ns"] = rec.latency_ns
            ev.update(name=rec.name.removesuffix("__return"), ph="X", cat="user",
                      ts=_us(rec.entry_ts), dur=_us(rec.latency_ns or 0))
        else:
            ev.update(ph="i", s="t", cat="kernel" if rec.kind == "kernel" else "probe",
                      ts=_us(rec.ts))
        if rec.stack:
            args["stack"] = [f.symbol for f in rec.stack]
        self.events.append(ev)

    def close(self) -> None:
        meta: list[dict[str, object]] = []
        for pid in sorted({p for p, _ in self.threads}):
            name = self.threads.get((pid, pid)) or next(
                c for (p, _), c in self.threads.items() if p == pid
            )
            meta.append(_meta("process_name", pid, pid, name))
        for (pid, tid), comm in sorted(self.threads.items()):
            meta.append(_meta("thread_name", pid, tid, comm))
        # Viewers nest complete events by start time; an enclosing span that
        # starts at the same microsecond must come first (the longer one).
        body = sorted(self.events, key=lambda e: (e["ts"], -float(e.get("dur", 0))))  # type: ignore[arg-type]
        json.dump({"traceEvents": meta + body, "displayTimeUnit": "ns"}, self.out)
        self.out.write("\n")
        self.out.flush()


def _meta(what: str, pid: int, tid: int, name: str) -> dict[str, object]:
    return {"name": what, "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def _us(ns: int) -> float:
    return ns / 1000.0
