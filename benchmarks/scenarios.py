"""The benchmarks that are not per-hit costs: lost events, the VMAs each
strategy adds, the MAP_FIXED_NOREPLACE conflict, a real workload, attaching
many probes, and the tracer's memory."""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from emuprobe.perfbridge import kcount

from .build import Built
from .tools import STRATEGIES, emuprobe_env

# emuprobe's own peak RSS, printed by the process itself as it exits
_RSS_WRAPPER = (
    "import resource, sys\n"
    "from emuprobe.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(f'emuprobe-maxrss-kb={kb}', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def trace(
    strategy: str, probes: list[str], argv: list[str], prefix: list[str] | None = None
) -> dict[str, Any]:
    """Run `emuprobe trace --count` to completion: hits, wall time, stdout, peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json") as stats:
        cmd = [*(prefix or []), sys.executable, "-c", _RSS_WRAPPER, "trace", "--count",
               "--strategy", strategy, "--stats-json", stats.name, *probes, "--", *argv]
        c0, t0 = _children_cpu(), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=emuprobe_env(),
                              timeout=1800)
        seconds, cpu = time.perf_counter() - t0, _children_cpu() - c0
        data = json.loads(Path(stats.name).read_text() or "{}")
    rss = re.search(r"emuprobe-maxrss-kb=(\d+)", done.stderr)
    return {
        "status": done.returncode,
        "seconds": seconds,
        "cpu": cpu,
        "hits": {n: p["hits"] for n, p in data.get("probes", {}).items()},
        "stdout": done.stdout,
        "stderr": done.stderr[-500:],
        "rss_mb": int(rss.group(1)) / 1024 if rss else None,
    }


def lost_events(built: Built, threads: int, calls: int, kernel_why: str) -> dict[str, Any]:
    """8 threads x `calls` calls of work(): expected hits against observed."""
    expected = threads * calls
    out: dict[str, Any] = {"expected": expected, "threads": threads, "calls": calls}
    argv = [str(built.threads), str(calls)]
    for s in STRATEGIES:
        r = trace(s, ["work"], argv)
        out[s] = {"observed": r["hits"].get("work"), "status": r["status"],
                  "output_exact": f"counter={expected}" in r["stdout"],
                  "seconds": round(r["seconds"], 2), "rss_mb": r["rss_mb"]}
    if not kernel_why:
        with kcount.KernelCount(str(built.threads),
                                {"work": built.file_offset(built.threads, "work")}) as k:
            run = k.run(argv)
        out["kernel"] = {"observed": run.counts.get("work"), "status": run.returncode,
                         "output_exact": f"counter={expected}" in run.stdout,
                         "seconds": round(run.seconds, 2)}
    return out


def _shapes(lines: list[str]) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in lines:
        span, _, rest = line.partition(" ")
        lo, hi = (int(x, 16) for x in span.split("-"))
        out[f"{hi - lo:#x} {' '.join(rest.split())}"] += 1
    return out


def _maps(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", ln)]


def vma_diff(built: Built, kernel_why: str) -> dict[str, Any]:
    """The mappings each strategy leaves in the tracee, against an untraced run
    (ASLR off, so that addresses compare too)."""
    norand = ["setarch", "-R"]
    exe = str(built.mapfixed)
    plain = _maps(subprocess.run([*norand, exe, "maps"], capture_output=True, text=True).stdout)
    out: dict[str, Any] = {"untraced_vmas": len(plain)}

    def diff(lines: list[str]) -> dict[str, Any]:
        added = _shapes(lines) - _shapes(plain)
        return {"vmas": len(lines), "added": sorted(added.elements()),
                "removed": sorted((_shapes(plain) - _shapes(lines)).elements()),
                "moved": len(set(lines) - set(plain)) - sum(added.values())}

    for s in STRATEGIES:
        r = trace(s, ["m_func"], [exe, "maps"], prefix=norand)
        out[s] = diff(_maps(r["stdout"])) | {"hits": r["hits"].get("m_func")}
    if not kernel_why:
        with kcount.KernelCount(exe, {"m_func": built.file_offset(built.mapfixed, "m_func")}) as k:
            run = subprocess.run(k.argv([*norand, exe, "maps"]), capture_output=True, text=True)
        out["kernel"] = diff(_maps(run.stdout))
    return out


def map_fixed_conflict(built: Built, kernel_why: str) -> dict[str, Any]:
    """Where xol put its page, a program's MAP_FIXED_NOREPLACE mapping fails."""
    exe = str(built.mapfixed)
    plain = _shapes(_maps(subprocess.run([exe, "maps"], capture_output=True, text=True).stdout))
    first = trace("xol", ["m_func"], [exe, "maps"])
    lines = _maps(first["stdout"])
    new = [ln for ln in lines if _shapes([ln]) - plain and "r-xp 00000000 00:00 0" in ln]
    if not new:
        return {"error": "xol added no r-x page", "maps": lines}
    addr = new[0].split("-")[0]
    out: dict[str, Any] = {"address": f"0x{addr}"}
    for s in ("emulate", "xol"):
        r = trace(s, ["m_func"], [exe, "fixed", f"0x{addr}"])
        out[s] = next((ln for ln in r["stdout"].splitlines() if ln.startswith("mmap")), "?")
    untraced = subprocess.run([exe, "fixed", f"0x{addr}"], capture_output=True, text=True)
    out["untraced"] = untraced.stdout.splitlines()[0] if untraced.stdout else "?"
    if not kernel_why:
        with kcount.KernelCount(exe, {"m_func": built.file_offset(built.mapfixed, "m_func")}) as k:
            run = k.run([exe, "fixed", f"0x{addr}"])
        out["kernel"] = next((ln for ln in run.stdout.splitlines() if ln.startswith("mmap")), "?")
    return out


# ~51,000 calls of libc malloc (CPython hands blocks over 512 bytes to it)
WORKLOAD = "x = [bytearray(1000 + i % 3000) for i in range(50000)]"


def real_workload(runs: int, kernel_why: str) -> dict[str, Any]:
    """python3 -c WORKLOAD with a libc:malloc probe: wall-time overhead per strategy."""
    import os

    # the interpreter itself, not a wrapper script (pyenv's shim would be traced too)
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    argv = [os.path.realpath(py), "-c", WORKLOAD]
    plain = [_times(argv) for _ in range(runs)]
    base, base_cpu = _median(p[0] for p in plain), _median(p[1] for p in plain)
    # emuprobe's own start-up and exit (Python, ELF parsing), taken off per-hit figures
    true_cpu = _median(_times(["/bin/true"])[1] for _ in range(runs))
    startup = _median(trace("emulate", ["libc:malloc"], ["/bin/true"])["cpu"]
                      for _ in range(runs)) - true_cpu
    out: dict[str, Any] = {"command": f"python3 -c \"{WORKLOAD}\"", "untraced_s": base,
                           "untraced_cpu_s": base_cpu, "emuprobe_startup_cpu_s": startup}
    for s in STRATEGIES:
        rs = [trace(s, ["libc:malloc"], argv) for _ in range(runs)]
        rs.sort(key=lambda r: r["seconds"])
        med = rs[runs // 2]
        cpu = _median(r["cpu"] for r in rs)
        hits = med["hits"].get("malloc") or 0
        out[s] = {"seconds": med["seconds"], "overhead": med["seconds"] / base, "hits": hits,
                  "cpu_s": cpu, "cpu_overhead": cpu / base_cpu,
                  "us_per_hit": (cpu - base_cpu - startup) / hits * 1e6 if hits else None,
                  "rss_mb": max((r["rss_mb"] or 0) for r in rs)}
    if not kernel_why:
        from emuprobe.sys.elfimage import ElfImage
        from emuprobe.sys.libraries import find_library_on_disk

        libc = find_library_on_disk("libc") or "libc.so.6"
        off = ElfImage.open(libc).resolve("malloc").file_offset
        with kcount.KernelCount(libc, {"malloc": off}) as k:
            krs = []
            for _ in range(runs):
                c0 = _children_cpu()
                krs.append((k.run(argv), _children_cpu() - c0))
        krs.sort(key=lambda r: r[0].seconds)
        kr = krs[runs // 2][0]
        cpu = _median(c for _, c in krs)
        hits = kr.counts.get("malloc") or 0
        out["kernel"] = {"seconds": kr.seconds, "overhead": kr.seconds / base, "hits": hits,
                         "cpu_s": cpu, "cpu_overhead": cpu / base_cpu,
                         "us_per_hit": (cpu - base_cpu) / hits * 1e6 if hits else None}
    return out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _times(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t0, _children_cpu() - c0


def _median(xs: Any) -> float:
    return float(statistics.median(list(xs)))


def attach_many(count: int) -> dict[str, Any]:
    """Wall time to resolve and plant `count` probes (libc functions) and leave
    again, over planting one: `emuprobe trace --count F1..Fn -- /bin/true`."""
    from emuprobe.errors import ProbeError
    from emuprobe.sys.elfimage import ElfImage
    from emuprobe.sys.libraries import find_library_on_disk

    libc = find_library_on_disk("libc") or "libc.so.6"
    image = ElfImage.open(libc)
    seen: set[int] = set()
    names = []
    for sym in image.functions():
        if sym.ifunc or sym.vaddr in seen or not sym.name.isidentifier():
            continue
        try:
            image.resolve(sym.name)  # unique: not two versions at two addresses
        except ProbeError:
            continue
        seen.add(sym.vaddr)
        names.append(f"libc:{sym.name}")
        if len(names) == count:
            break
    one = min(trace("emulate", names[:1], ["/bin/true"])["seconds"] for _ in range(3))
    many = [trace("emulate", names, ["/bin/true"]) for _ in range(3)]
    best = min(many, key=lambda r: r["seconds"])
    return {"probes": len(names), "seconds": best["seconds"], "one_probe_s": one,
            "marginal_s": best["seconds"] - one, "status": best["status"],
            "rss_mb": best["rss_mb"], "stderr": best["stderr"] if best["status"] else ""}
