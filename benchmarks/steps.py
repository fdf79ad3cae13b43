"""What one emulated step costs: Emulator.step on a planted probe site, per Unicorn machine.

    python -m benchmarks.steps [--steps 3000] [--machine c|py|both]

Loads each instruction into the native oracle's sandbox
(emuprobe/difftest/oracle.py) as a probe hit finds it (our int3 on the site, the tracee stopped
there), then calls Emulator.step STEPS times from the same registers and
prints the median µs per step, for the compiled machine (when it is built)
and the pure-Python one.  The state is the one tests/test_emulator.py gives
its cases (the same seeds); that test file used to print these figures.
Every step must be emulated: a refusal ends the run with an error.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import struct
import time

from emuprobe.difftest.oracle import CODE, DATA, DATA_LEN, Input, PtraceFp, Sandbox
from emuprobe.exec import cmachine
from emuprobe.exec.execute import Emulated, Emulator
from emuprobe.sys import ptrace as pt
from emuprobe.x86.decode import Plan, analyze
from emuprobe.x86.regs import GPR_NAMES

SITE = CODE + 0x100
STACK = DATA + 0x2000
TARGET = CODE + 0x800  # where ret goes


def _rip_rel(prefix: str, target: int) -> str:
    """`prefix` + the disp32 that reaches `target` from SITE."""
    end = SITE + len(bytes.fromhex(prefix)) + 4
    return prefix + struct.pack("<i", target - end).hex()


# (what it is, encoding); the engine that runs it is printed from its plan
INSTRUCTIONS = (
    ("push rbp", "55"),
    ("mov rax,[rip+d]", _rip_rel("488b05", DATA + 0x48)),
    ("mov [rsp+8],rdi", "48897c2408"),
    ("ret", "c3"),
)


def _case(sb: Sandbox, code: bytes) -> Input:
    """tests/test_emulator.py's default state: random GPRs (seed 7) with
    pointers into DATA, random data (seed 11) holding TARGET for ret."""
    rng = random.Random(7)
    values = {n: rng.getrandbits(64) for n in GPR_NAMES}
    values.update(rdi=DATA + 0x100, rsi=DATA + 0x200, rbx=DATA + 0x300, rbp=STACK + 0x100)
    values.update(rsp=STACK, rcx=5, rdx=0, fs_base=DATA + 0x800)
    regs = sb.base_regs()
    for name, value in values.items():
        setattr(regs, name, value)
    regs.eflags = 0x202
    fp = sb.base_fp()
    for i in range(16):
        xmm = bytes((i * 16 + j) & 0xFF for j in range(16))
        ctypes.memmove(ctypes.addressof(fp.xmm_space) + 16 * i, xmm, 16)
    fp.mxcsr = 0x1F80
    rng = random.Random(11)
    data = bytearray(rng.getrandbits(8) for _ in range(DATA_LEN))
    data[STACK - DATA : STACK - DATA + 8] = TARGET.to_bytes(8, "little")
    data[0x40:0x48] = TARGET.to_bytes(8, "little")
    return Input(code, regs, fp, bytes(data), SITE)


def median_us(sb: Sandbox, emu: Emulator, code: bytes, plan: Plan, steps: int) -> float:
    """The median time of one Emulator.step of `code`, each from the same registers."""
    sb.load(_case(sb, code), planted=True)
    template = bytes(pt.getregs(sb.pid))
    regs = pt.UserRegs()
    fp = PtraceFp(sb.pid)
    times = []
    try:
        for _ in range(steps):
            ctypes.memmove(ctypes.addressof(regs), template, len(template))
            t0 = time.perf_counter_ns()
            result = emu.step(plan, code, regs, sb.mem, fp)
            times.append(time.perf_counter_ns() - t0)
            if not isinstance(result, Emulated):
                raise SystemExit(f"steps: {code.hex()} was not emulated: {result}")
    finally:
        sb.mem.planted.clear()
    return statistics.median(times) / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="steps per instruction (3000)")
    ap.add_argument("--machine", choices=("c", "py", "both"), default="both")
    args = ap.parse_args()
    machines = {"c": [True], "py": [False], "both": [True, False]}[args.machine]
    with Sandbox() as sb:
        for compiled in machines:
            name = "machine.c" if compiled else "machine.py"
            if compiled and cmachine.compiled_module() is None:
                print(f"{name}: not built, skipped")
                continue
            emu = Emulator(compiled=compiled)
            print(f"{name}:")
            for text, hexcode in INSTRUCTIONS:
                code = bytes.fromhex(hexcode)
                plan = analyze(code, SITE, trusted_only=False)
                label = f"{type(plan).__name__} {text}"
                us = median_us(sb, emu, code, plan, args.steps)
                print(f"  {label:32} {us:6.1f} us/step (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
