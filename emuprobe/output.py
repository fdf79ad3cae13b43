"""How hits and totals are printed: perf-script style lines, a count table, JSON stats."""

from __future__ import annotations

import json
import os
import stat
from typing import TextIO

from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.sites import Probe
from emuprobe.errors import ProbeError


def open_output(path: str) -> TextIO:
    """`path` opened for writing, with the rule of fs.protected_symlinks
    applied whatever the sysctl says: in a sticky world-writable directory
    (/tmp), a symlink is followed only if we or the directory's owner own
    it, so another user's planted link cannot make us truncate its target."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        d = os.stat(parent)
        if d.st_mode & stat.S_ISVTX and d.st_mode & stat.S_IWOTH:
            link = os.lstat(path)
            if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), d.st_uid):
                raise ProbeError(f"{path}: a symlink owned by another user in a sticky "
                                 "world-writable directory: not followed")  # fmt: skip
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ProbeError(f"cannot write {path}: {e.strerror}") from e
    try:
        return open(path, "w")  # noqa: SIM115 - the caller closes it
    except OSError as e:
        raise ProbeError(f"cannot write {path}: {e.strerror}") from e


def perf_header(comm: str, pid: int, tid: int, timestamp_ns: int, pad: bool = True) -> str:
    """`COMM PID/TID SECONDS.USEC:`, the start of every `perf script` line.

    pad=False starts the line with COMM, as perf script does before a call
    chain (stackcollapse-perf.pl takes an indented line for a frame).
    """
    sec, nsec = divmod(timestamp_ns, 1_000_000_000)
    if not pad:
        return f"{comm} {pid:>7}/{tid:<7} {sec:>6}.{nsec // 1000:06d}:"
    return f"{comm:>16} {pid:>7}/{tid:<7} {sec:>6}.{nsec // 1000:06d}:"


def hit_line(event: ProbeEvent) -> str:
    """`COMM PID/TID SECONDS.USEC: NAME: (0xADDRESS)`, as `perf script` prints a uprobe."""
    head = perf_header(event.comm, event.pid, event.tid, event.timestamp_ns)
    return f"{head} {event.probe.name}: ({event.address:#x})"


class LinePrinter:
    """A handler that writes one line per hit."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: ProbeEvent) -> None:
        self.out.write(hit_line(event) + "\n")


def count_table(probes: list[Probe]) -> str:
    """The --count summary: one row per probe, hits and how they were executed.
    A %return probe's hits are its returns; EMULATED/NATIVE are its entries'."""
    width = max([len("PROBE")] + [len(p.name) for p in probes])
    rows = [f"{'PROBE':<{width}} {'HITS':>12} {'EMULATED':>12} {'NATIVE':>10}"]
    for p in probes:
        rows.append(
            f"{p.name:<{width}} {hits(p):>12} {p.emulated:>12} {p.native_fallback:>10}"
        )
    for p in probes:
        if p.returns is not None:
            rows.append(f"{p.name}: {p.returns} returns of {p.hits} entries "
                        "(EMULATED and NATIVE count the entries)")  # fmt: skip
    return "\n".join(rows)


def hits(p: Probe) -> int:
    """What a probe counts: hits, or returns for a %return probe (as perf and bpftrace do)."""
    return p.hits if p.returns is None else p.returns


def stats_json(probes: list[Probe], exit_status: int) -> str:
    return json.dumps(
        {
            "probes": {
                p.name: {
                    "hits": hits(p),
                    **({"entries": p.hits} if p.returns is not None else {}),
                    "emulated": p.emulated,
                    "native_fallback": p.native_fallback,
                    "handler_errors": p.handler_errors,
                }
                for p in probes
            },
            "exit_status": exit_status,
        },
        indent=2,
    )
