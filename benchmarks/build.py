"""Compile the benchmark fixtures with gcc at bench time, into a private directory."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS_FIXTURES = HERE.parent / "tests" / "fixtures"

# Site kind -> (function in hot.c, first instruction).  The hot fixture is built
# without PIE so that the C floor tracer can plant its int3 at the nm address.
SITES: dict[str, tuple[str, str]] = {
    "endbr": ("h_endbr", "endbr64"),
    "push": ("h_push", "push %rbp"),
    "movrr": ("h_movrr", "mov %rdi,%rax"),
    "riprel": ("h_riprel", "mov h_value(%rip),%rax"),
    "ripadd": ("h_ripadd", "add h_value(%rip),%rdi"),
    "stackstore": ("h_stackstore", "mov %rdi,-8(%rsp)"),
    "call": ("h_call", "call rel32"),
    "addsd": ("h_addsd", "addsd %xmm1,%xmm0"),
    "ssemem": ("h_ssemem", "paddq h_vec(%rip),%xmm0"),
    "lockxadd": ("h_lockxadd", "lock xadd %esi,(%rdi)"),
}
# What the C floor tracer does in place of the displaced instruction, and its length.
FLOOR_OPS: dict[str, tuple[str, int]] = {"endbr": ("skip", 4), "push": ("push", 1)}
# Where hot.c keeps a copy of the site's instruction for the C XOL floor to
# single-step; both are position-independent, so the copy needs no fix-up.
XOL_SLOTS: dict[str, str] = {"endbr": "h_xol_slot_endbr", "push": "h_xol_slot_push"}
XOL_FLOOR = "xol floor"  # the name of that tool (tools.xol_floor_tool) in the results


@dataclass(frozen=True)
class Built:
    hot: Path
    floor: Path
    threads: Path
    mapfixed: Path

    def symbol(self, exe: Path, name: str) -> int:
        """The ELF address of `name` in `exe` (st_value, as nm prints it)."""
        out = subprocess.run(["nm", str(exe)], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == name:
                return int(parts[0], 16)
        raise KeyError(f"{name} not in {exe}")

    def file_offset(self, exe: Path, name: str) -> int:
        """The file offset of `name`, as uprobe_events wants it."""
        from elftools.elf.elffile import ELFFile

        vaddr = self.symbol(exe, name)
        with open(exe, "rb") as f:
            for seg in ELFFile(f).iter_segments():
                lo = int(seg["p_vaddr"])
                if seg["p_type"] == "PT_LOAD" and lo <= vaddr < lo + int(seg["p_filesz"]):
                    return vaddr - lo + int(seg["p_offset"])
        raise KeyError(f"{name} is not in a PT_LOAD of {exe}")


def _gcc(out: Path, src: Path, *flags: str) -> Path:
    cmd = ["gcc", "-O2", "-Wall", *flags, "-o", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def build_all(out: Path) -> Built:
    fx = HERE / "fixtures"
    return Built(
        hot=_gcc(out / "hot", fx / "hot.c", "-no-pie", "-fno-pie"),
        floor=_gcc(out / "floor", fx / "floor.c"),
        threads=_gcc(out / "threads", TESTS_FIXTURES / "threads.c", "-pthread"),
        mapfixed=_gcc(out / "mapfixed", fx / "mapfixed.c"),
    )
