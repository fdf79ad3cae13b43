"""The tracers compared, as command lines: emuprobe's strategies, the C floors
(emulating and out-of-line), kernel uprobes (perf stat) and the peers
(ltrace -x, gdb commands, bpftrace)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emuprobe.perfbridge import kcount

from .build import FLOOR_OPS, SITES, XOL_FLOOR, XOL_SLOTS, Built

ROOT = Path(__file__).resolve().parent.parent
EMUPROBE = [sys.executable, "-m", "emuprobe"]
STRATEGIES = ("emulate", "xol", "inplace", "stopworld")
PEERS = ("ltrace", "gdb", "bpftrace")


def emuprobe_env() -> dict[str, str]:
    """The environment emuprobe runs in: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Tool:
    """One way of tracing `hot KIND N`; `missing` says why it cannot run here."""

    name: str
    argv: Callable[[str, int], list[str]]
    calls_scale: float = 1.0  # per-hit cost varies 100x between tools: keep runs ~1 s
    kinds: tuple[str, ...] = tuple(SITES)
    missing: str = ""
    env: dict[str, str] = field(default_factory=emuprobe_env)


def strategy_tool(built: Built, strategy: str) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        func = SITES[kind][0]
        return [*EMUPROBE, "trace", "--count", "--strategy", strategy, func, "--",
                str(built.hot), kind, str(n)]

    return Tool(strategy, argv)


def floor_tool(built: Built) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        op, length = FLOOR_OPS[kind]
        addr = built.symbol(built.hot, SITES[kind][0])
        return [str(built.floor), op, hex(addr), str(length), str(built.hot), kind, str(n)]

    return Tool("floor", argv, kinds=tuple(FLOOR_OPS))


def xol_floor_tool(built: Built) -> Tool:
    """The least a user-space XOL tracer does per hit: the C floor with a
    single-step of a copy in place of emulating the instruction."""

    def argv(kind: str, n: int) -> list[str]:
        length = FLOOR_OPS[kind][1]
        addr = built.symbol(built.hot, SITES[kind][0])
        slot = built.symbol(built.hot, XOL_SLOTS[kind])
        return [str(built.floor), "xol", hex(addr), str(length), hex(slot), str(built.hot),
                kind, str(n)]

    return Tool(XOL_FLOOR, argv, kinds=tuple(XOL_SLOTS))


def ltrace_tool(built: Built) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        # -L: no library calls; -x: this symbol of the executable; output discarded
        return ["ltrace", "-L", "-x", SITES[kind][0], "-o", os.devnull,
                str(built.hot), kind, str(n)]

    return Tool("ltrace", argv, 0.25, missing=_which("ltrace"))


def gdb_tool(built: Built, scratch: Path) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        script = scratch / f"gdb-{kind}.cmd"
        addr = built.symbol(built.hot, SITES[kind][0])
        # break *ADDR: exactly the site (a plain `break f` skips the prologue)
        script.write_text(
            f"set pagination off\nset confirm off\nbreak *{addr:#x}\n"
            "commands\nsilent\ncontinue\nend\nrun\nquit\n"
        )
        return ["gdb", "-q", "-nx", "-batch", "-x", str(script), "--args",
                str(built.hot), kind, str(n)]

    return Tool("gdb", argv, 0.25, missing=_which("gdb"))


def bpftrace_tool(built: Built) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        prog = f"uprobe:{built.hot}:{SITES[kind][0]} {{ @hits = count(); }}"
        return ["bpftrace", "-q", "-e", prog, "-c", f"{built.hot} {kind} {n}"]

    why = _which("bpftrace") or kcount.unavailable()
    return Tool("bpftrace", argv, 10.0, missing=why)


def kernel_tool(built: Built, counter: kcount.KernelCount | None, why: str) -> Tool:
    def argv(kind: str, n: int) -> list[str]:
        assert counter is not None
        return counter.argv([str(built.hot), kind, str(n)])

    return Tool("kernel", argv, 10.0, missing=why)


def _which(cmd: str) -> str:
    return "" if shutil.which(cmd) else f"{cmd} is not installed"
