"""A difftest case: one instruction and the whole state it starts from, as a
value that Hypothesis can build and shrink and a reproducer file can hold."""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from emuprobe.difftest.oracle import DATA_LEN, SITE, Input, Sandbox
from emuprobe.x86.regs import GPR_NAMES

# Data-page fills: a boundary pattern, zeros, ones, or pseudo-random bytes
# from the seed (fill >= FILL_RANDOM).
FILL_BOUNDARY, FILL_ZERO, FILL_ONES, FILL_RANDOM = 0, 1, 2, 3
BOUNDARY64 = (
    0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000,
    0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000,
    0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFE, 0xFFFF_FFFF_FFFF_FF80,
    0xFFFF_FFFF_8000_0000, 0x8000_0000_0000_0001, 0x0123_4567_89AB_CDEF,
)  # fmt: skip


# XMM values too plain to print (the generator's fixed value for unused ones)
_PLAIN_XMM = tuple(bytes((i * 16 + j) & 0xFF for j in range(16)) for i in range(16))


@cache
def fill_bytes(fill: int) -> bytes:
    if fill == FILL_ZERO:
        return bytes(DATA_LEN)
    if fill == FILL_ONES:
        return b"\xff" * DATA_LEN
    if fill == FILL_BOUNDARY:
        words = b"".join(v.to_bytes(8, "little") for v in BOUNDARY64)
        return (words * (DATA_LEN // len(words) + 1))[:DATA_LEN]
    return random.Random(fill).randbytes(DATA_LEN)


@dataclass(frozen=True)
class Case:
    code: bytes
    gprs: tuple[int, ...]  # in GPR_NAMES order
    eflags: int = 0x202
    xmm: tuple[bytes, ...] = tuple(bytes(16) for _ in range(16))
    mxcsr: int = 0x1F80
    fs_base: int = 0
    gs_base: int = 0
    fill: int = FILL_BOUNDARY
    overlay: tuple[tuple[int, bytes], ...] = ()  # (DATA offset, bytes) written over the fill
    site: int = SITE
    note: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def data(self) -> bytes:
        if not self.overlay:
            return fill_bytes(self.fill)
        buf = bytearray(fill_bytes(self.fill))
        for off, chunk in self.overlay:
            buf[off : off + len(chunk)] = chunk[: DATA_LEN - off]
        return bytes(buf)

    def to_input(self, sb: Sandbox) -> Input:
        regs = sb.base_regs()
        for name, value in zip(GPR_NAMES, self.gprs, strict=True):
            setattr(regs, name, value)
        regs.eflags = self.eflags
        regs.fs_base, regs.gs_base = self.fs_base, self.gs_base
        fp = sb.base_fp()
        ctypes.memmove(ctypes.addressof(fp.xmm_space), b"".join(self.xmm), 256)
        fp.mxcsr = self.mxcsr
        return Input(self.code, regs, fp, self.data(), self.site)

    def with_gpr(self, name: str, value: int) -> Case:
        gprs = list(self.gprs)
        gprs[GPR_NAMES.index(name)] = value
        return replace(self, gprs=tuple(gprs))

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code.hex(),
            "site": hex(self.site),
            "regs": {n: hex(v) for n, v in zip(GPR_NAMES, self.gprs, strict=True)},
            "eflags": hex(self.eflags),
            "fs_base": hex(self.fs_base),
            "gs_base": hex(self.gs_base),
            "xmm": [x.hex() for x in self.xmm],
            "mxcsr": hex(self.mxcsr),
            "fill": self.fill,
            "overlay": [[hex(off), chunk.hex()] for off, chunk in self.overlay],
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Case:
        return cls(
            code=bytes.fromhex(raw["code"]),
            site=int(raw["site"], 16),
            gprs=tuple(int(raw["regs"][n], 16) for n in GPR_NAMES),
            eflags=int(raw["eflags"], 16),
            fs_base=int(raw["fs_base"], 16),
            gs_base=int(raw["gs_base"], 16),
            xmm=tuple(bytes.fromhex(x) for x in raw["xmm"]),
            mxcsr=int(raw["mxcsr"], 16),
            fill=int(raw["fill"]),
            overlay=tuple((int(o, 16), bytes.fromhex(c)) for o, c in raw["overlay"]),
        )

    def describe(self) -> str:
        """Hex bytes plus the register state, for a terminal (under 80 columns)."""
        regs = [f"{n}={v:#x}" for n, v in zip(GPR_NAMES, self.gprs, strict=True)]
        lines = [f"bytes {self.code.hex()} at {self.site:#x}"]
        lines += ["  ".join(regs[i : i + 3]) for i in range(0, 16, 3)]
        lines.append(f"eflags={self.eflags:#x} mxcsr={self.mxcsr:#x} fill={self.fill}")
        lines.append(f"fs_base={self.fs_base:#x} gs_base={self.gs_base:#x}")
        zero = bytes(16)
        for i, x in enumerate(self.xmm):
            if x != zero and x != _PLAIN_XMM[i]:
                lines.append(f"xmm{i}={x[::-1].hex()}")
        for off, chunk in self.overlay:
            lines.append(f"data+{off:#x}: {chunk.hex()}")
        return "\n".join(lines)
