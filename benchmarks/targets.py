"""The performance targets of issue 4, evaluated on one run's results."""

from __future__ import annotations

from typing import Any

from .build import XOL_FLOOR
from .perhit import Cell
from .report import floor_us

EMULATED_SITES = ("endbr", "push", "movrr", "riprel", "ripadd", "stackstore", "call", "ssemem")
# Sites whose instruction emulate hands to Unicorn (no FastPath, not refused):
# the 2.5x target is about these.
UNICORN_SITES = ("ripadd", "ssemem")


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    cells = [Cell(**c) for c in results["perhit"]["cells"]]
    us = {(c.tool, c.kind): c.us for c in cells if c.us is not None and c.us > 0}
    floor = floor_us(cells)
    out: list[dict[str, Any]] = []

    def add(
        name: str, value: float | None, limit: float | None, le: bool = True, unit: str = "x"
    ) -> None:
        """limit None: a figure shown for context, with no target to meet."""
        ok = None if value is None or limit is None else (value <= limit if le else value >= limit)
        out.append({"target": name, "value": value, "limit": limit, "le": le, "unit": unit,
                    "met": ok})

    def ratio(a: tuple[str, str], b: tuple[str, str] | None) -> float | None:
        if a not in us:
            return None
        denom = floor if b is None else us.get(b)
        return us[a] / denom if denom else None

    for kind in ("push", "endbr"):
        add(f"emulate on {kind} / C floor", ratio(("emulate", kind), None), 1.5, True)
    # Neither is a Unicorn site any more: riprel has a FastPath, addsd runs natively
    # while untrusted and on the "sse" FastPath once trusted.  Same limit, by site only.
    for kind in ("riprel", "addsd"):
        add(f"emulate on {kind} / C floor", ratio(("emulate", kind), None), 2.5, True)
    for kind in UNICORN_SITES:
        add(f"emulate on {kind} (Unicorn path) / C floor", ratio(("emulate", kind), None),
            2.5, True)
    for kind in ("push", "endbr"):
        add(f"xol floor / C floor on {kind}", ratio((XOL_FLOOR, kind), None), None)
    for kind in EMULATED_SITES:
        add(f"xol / emulate on {kind}", ratio(("xol", kind), ("emulate", kind)), 1.8, False)
    add("ltrace / emulate on push", ratio(("ltrace", "push"), ("emulate", "push")), 3.0, False)
    add("gdb / emulate on push", ratio(("gdb", "push"), ("emulate", "push")), 4.5, False)
    attach = results.get("attach", {})
    add("attach 1,000 probes (whole run, s)", attach.get("seconds"), 1.0, True, "s")
    rss = [attach.get("rss_mb")]
    rss += [v.get("rss_mb") for v in results.get("lost_events", {}).values()
            if isinstance(v, dict)]
    rss += [v.get("rss_mb") for v in results.get("workload", {}).values() if isinstance(v, dict)]
    known = [r for r in rss if r]
    add("tracer peak RSS (MB)", max(known) if known else None, 150.0, True, "MB")
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.2f} {r['unit']}"
        if r["limit"] is None:
            lines.append(f"| {r['target']} | {v} | – | – |")
            continue
        op = "<=" if r["le"] else ">="
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        lines.append(f"| {r['target']} | {v} | {op} {r['limit']:g} {r['unit']} | {met} |")
    return "\n".join(lines)
