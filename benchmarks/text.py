"""Markdown for the scenario results (everything but the per-hit table)."""

from __future__ import annotations

from typing import Any


def extras_markdown(r: dict[str, Any]) -> str:
    out: list[str] = []
    lost = r.get("lost_events")
    if lost:
        out += [f"## Lost events: {lost['threads']} threads x {lost['calls']} calls of work()",
                "", "| strategy | expected | observed | lost | program output exact | s |",
                "|---|---|---|---|---|---|"]
        for name, v in _per_tool(lost):
            obs = v.get("observed")
            lostn = lost["expected"] - obs if obs is not None else "?"
            out.append(f"| {name} | {lost['expected']} | {obs} | {lostn} | "
                       f"{'yes' if v.get('output_exact') else 'NO'} | {v.get('seconds')} |")
        out.append("")
    vma = r.get("vma")
    if vma:
        out += ["## Address space: VMAs added (maps after the hit vs untraced, ASLR off)", "",
                f"Untraced: {vma['untraced_vmas']} VMAs.", "",
                "| strategy | VMAs | added (size perms offset dev inode path) | removed |"
                " mappings moved |", "|---|---|---|---|---|"]
        for name, v in _per_tool(vma):
            added = "<br>".join(v["added"]) or "none"
            removed = "<br>".join(v["removed"]) or "none"
            out.append(f"| {name} | {v['vmas']} | {added} | {removed} | {v['moved']} |")
        out.append("")
    mf = r.get("map_fixed")
    if mf:
        out += ["## MAP_FIXED_NOREPLACE at the address xol's page took", ""]
        if "error" in mf:
            out.append(f"Not reproduced: {mf['error']}.")
        else:
            out.append(f"Address {mf['address']}:")
            out.append("")
            for k in ("untraced", "emulate", "xol", "kernel"):
                if k in mf:
                    out.append(f"- {k}: `{mf[k]}`")
        out.append("")
    wl = r.get("workload")
    if wl:
        out += ["## Real workload: libc:malloc probe", "", f"`{wl['command']}`, untraced "
                f"{wl['untraced_s']:.3f} s wall, {wl['untraced_cpu_s']:.3f} s CPU.  Not pinned."
                f"  Per hit: CPU time, less the untraced run and emuprobe's own start-up and"
                f" exit ({wl['emuprobe_startup_cpu_s']:.3f} s CPU).", "",
                "| strategy | wall s | wall overhead | CPU s | CPU overhead | malloc hits |"
                " µs CPU per hit |", "|---|---|---|---|---|---|---|"]
        for name, v in _per_tool(wl):
            per = f"{v['us_per_hit']:.1f}" if v.get("us_per_hit") is not None else "?"
            out.append(f"| {name} | {v['seconds']:.3f} | {v['overhead']:.2f}x | "
                       f"{v['cpu_s']:.3f} | {v['cpu_overhead']:.2f}x | {v['hits']} | {per} |")
        out.append("")
    at = r.get("attach")
    if at:
        out += ["## Attaching many probes", "",
                f"{at['probes']} libc functions planted and removed in a whole run of "
                f"{at['seconds']:.2f} s (one probe: {at['one_probe_s']:.2f} s; marginal "
                f"{at['marginal_s']:.2f} s); peak RSS {at['rss_mb']:.0f} MB.", ""]
        if at.get("stderr"):
            out.append(f"(exit {at['status']}: {at['stderr']})")
    skipped = r.get("perhit", {}).get("skipped")
    if skipped:
        out += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(out) + "\n"


def _per_tool(section: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-strategy (or kernel) entries of a scenario's results."""
    return [(k, v) for k, v in section.items() if isinstance(v, dict)]
