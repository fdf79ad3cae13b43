"""--count by probe (and by a fetched argument) and --hist log2 histograms, printed at exit.

The histogram prints as bpftrace's hist() does: buckets (..., 0), [0], [1],
[2, 4), [4, 8) ... with K/M/G/... suffixes for powers of 1024, a 52-column
bar of '@', and only the rows from the first to the last non-empty bucket.
"""

from __future__ import annotations

from collections import Counter

from emuprobe.errors import ProbeError
from emuprobe.perfbridge.record import Record

LATENCY = "latency"
_BAR = 52
_SUFFIXES = ["", "K", "M", "G", "T", "P", "E"]


def bucket(value: int) -> int:
    """bpftrace's log2 slot: 0 for negatives, 1 for 0, n+2 for [2^n, 2^(n+1))."""
    if value < 0:
        return 0
    if value == 0:
        return 1
    return value.bit_length() + 1


def _label(power: int) -> str:
    n = 1 << power
    i = 0
    while n >= 1024 and n % 1024 == 0 and i < len(_SUFFIXES) - 1:
        n //= 1024
        i += 1
    return f"{n}{_SUFFIXES[i]}"


def _bucket_name(slot: int) -> str:
    if slot == 0:
        return "(..., 0)"
    if slot == 1:
        return "[0]"
    if slot == 2:
        return "[1]"
    return f"[{_label(slot - 2)}, {_label(slot - 1)})"


def format_hist(title: str, slots: Counter[int]) -> str:
    """One histogram in bpftrace's layout (title line, rows, no trailing newline)."""
    lines = [f"{title}:"]
    if not slots:
        return lines[0]
    top = max(slots.values())
    for slot in range(min(slots), max(slots) + 1):
        n = slots.get(slot, 0)
        bar = "@" * int(n / top * _BAR)
        lines.append(f"{_bucket_name(slot):<16}{n:>8} |{bar:<{_BAR}}|")
    return "\n".join(lines)


class Aggregator:
    """A sink that counts Records by probe (optionally by argument) and bins one value."""

    def __init__(self, by: str | None = None, hist: str | None = None) -> None:
        self.by = by
        self.hist = hist
        self.counts: Counter[tuple[str, object]] = Counter()
        self.hists: dict[str, Counter[int]] = {}
        self._seen_by = self._seen_hist = False

    def __call__(self, rec: Record) -> None:
        if rec.kind == "kernel" and not self.by:
            key: object = None
        elif self.by is not None:
            args = dict(rec.args)
            if self.by not in args:
                return  # this probe has no such argument: not part of the breakdown
            self._seen_by = True
            key = args[self.by]
        else:
            key = None
        self.counts[(rec.name, key)] += 1
        if self.hist is None:
            return
        if self.hist == LATENCY:
            value = rec.latency_ns
        else:
            v = dict(rec.args).get(self.hist)
            value = v if isinstance(v, int) else None
        if value is not None:
            self._seen_hist = True
            self.hists.setdefault(rec.name, Counter())[bucket(value)] += 1

    def report(self) -> str:
        """The text printed at exit: counts, then one histogram per probe."""
        out: list[str] = []
        if self.by is not None:
            width = max([len("PROBE")] + [len(n) for n, _ in self.counts])
            out.append(f"{'PROBE':<{width}} {self.by.upper():>20} {'COUNT':>12}")
            for (name, key), n in sorted(self.counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
                out.append(f"{name:<{width}} {_show(key):>20} {n:>12}")
        for name, slots in self.hists.items():
            unit = "_ns" if self.hist == LATENCY else ""
            out.append(format_hist(f"@{self.hist}{unit}[{name}]", slots) + "\n")
        return "\n".join(out)

    def check_used(self) -> None:
        """After the run: a --by/--hist name that no probe fetched is a user error."""
        if self.by is not None and not self._seen_by and self.counts:
            raise ProbeError(f"--by {self.by}: no probe has an argument called '{self.by}'")


def _show(key: object) -> str:
    return f'"{key}"' if isinstance(key, str) else str(key)


def check_names(by: str | None, hist: str | None, arg_names: set[str]) -> None:
    """Before the run: --by/--hist must name a fetched argument (or latency)."""
    for opt, name in (("--by", by), ("--hist", hist)):
        if name is not None and name not in arg_names and not (opt == "--hist" and name == LATENCY):
            known = ", ".join(sorted(arg_names)) or "none"
            extra = " or latency" if opt == "--hist" else ""
            raise ProbeError(f"{opt} {name}: not a fetched argument (have: {known}{extra})")
