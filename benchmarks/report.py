"""The benchmark results as JSON, a markdown report and a PNG bar chart."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from .build import SITES, XOL_FLOOR
from .perhit import Cell

HEADS = {"floor": "C floor"}
COLUMNS = ("emulate", "xol", "inplace", "stopworld", "kernel", "ltrace", "gdb", "bpftrace")


def machine() -> dict[str, str]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import os

    return {"cpu": cpu or platform.processor(), "cpus": str(os.cpu_count()),
            "kernel": platform.release(), "python": platform.python_version()}


def floor_us(cells: list[Cell]) -> float | None:
    """The denominator of every ratio: the C floor on the push site."""
    return next((c.us for c in cells if c.tool == "floor" and c.kind == "push"), None)


def cell_text(c: Cell | None, floor: float | None) -> str:
    if c is None:
        return "–"
    if c.us is None:
        return "n/a"
    ratio = f" ({c.us / floor:.2f}x)" if floor else ""
    return f"{c.us:.1f}{ratio}"


def perhit_table(cells: list[Cell]) -> str:
    floor = floor_us(cells)
    by = {(c.tool, c.kind): c for c in cells}
    # the C floor always, the XOL floor beside it when this run measured it
    cols = ["floor"] + [t for t in (XOL_FLOOR, *COLUMNS) if any(c.tool == t for c in cells)]
    head = "| site (displaced insn) | " + " | ".join(HEADS.get(t, t) for t in cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    for kind, (_func, insn) in SITES.items():
        rows.append(f"| {kind} (`{insn}`) | "
                    + " | ".join(cell_text(by.get((t, kind)), floor) for t in cols) + " |")
    return "\n".join(rows)


def notes(cells: list[Cell]) -> list[str]:
    return [f"- {c.tool} on {c.kind}: {c.note}" for c in cells if c.note]


def write(out_dir: Path, stamp: str, results: dict[str, Any], markdown: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"bench-{stamp}.json"
    md = out_dir / f"bench-{stamp}.md"
    js.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md.write_text(markdown)
    written = [js, md]
    png = chart(out_dir / f"bench-{stamp}.png", results)
    if png is not None:
        written.append(png)
    return written


def chart(path: Path, results: dict[str, Any]) -> Path | None:
    """Per-hit cost by site and tool, as multiples of the C floor (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cells = [Cell(**c) for c in results["perhit"]["cells"]]
    floor = floor_us(cells)
    if not floor:
        return None
    tools = [t for t in (XOL_FLOOR, *COLUMNS) if any(c.tool == t and c.us for c in cells)]
    kinds = list(SITES)
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / max(1, len(tools))
    for i, tool in enumerate(tools):
        ys = []
        for k in kinds:
            c = next((c for c in cells if c.tool == tool and c.kind == k), None)
            ys.append(c.us / floor if c is not None and c.us and c.us > 0 else 0)
        ax.bar([x + i * width for x in range(len(kinds))], ys, width, label=tool)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="C ptrace floor")
    ax.set_yscale("log")
    ax.set_xticks([x + width * (len(tools) - 1) / 2 for x in range(len(kinds))], kinds)
    ax.set_ylabel("per-hit cost / C floor (log)")
    m = results["machine"]
    ax.set_title(f"emuprobe per-hit cost, {results['date']}, {m['cpu']}, Linux {m['kernel']}")
    ax.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
