"""Which instruction classes the engine may emulate: those the difftest proved.

A class is a mnemonic (as capstone prints it, prefixes such as `rep` included)
plus its operand form, e.g. `add r64,imm` or `movaps xmm,m128`.  The table is a
data file, `trust.json` beside this module, written only by
`emuprobe difftest --update-trust`: a class enters it after at least
`min_cases` cases in which the engine emulated it and the CPU agreed, with no
mismatch.  decode.analyze() sends every other class to the native fallback,
because a wrong emulation corrupts a process silently and a fallback only
costs time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from capstone import CsInsn
from capstone import x86_const as csx

UNTRUSTED = "untrusted: not proven by difftest"
DEFAULT_MIN_CASES = 25
# Set to a trust file to use instead of the packaged one (the difftest uses it
# to check a table before it is installed).
ENV_FILE = "EMUPROBE_TRUST_FILE"

_GPR_SIZES = {1: "r8", 2: "r16", 4: "r32", 8: "r64"}
_HIGH_BYTE = frozenset({"ah", "bh", "ch", "dh"})


def _reg_kind(name: str, size: int) -> str:
    if name in _HIGH_BYTE:
        return "r8h"  # QEMU has had AH/SPL confusions: keep them a class apart
    for prefix in ("xmm", "ymm", "zmm", "st", "mm", "cr", "dr", "k"):
        if name.startswith(prefix) and (name[len(prefix) :].isdigit() or name == prefix):
            return prefix
    if name in ("cs", "ds", "es", "fs", "gs", "ss"):
        return "sreg"
    return _GPR_SIZES.get(size, name)


def operand_form(insn: CsInsn) -> str:
    """`r64,m32`-style text for the operands as decoded (registers by kind and
    size, memory by size with an fs:/gs: base and a32 for 32-bit addressing)."""
    parts = []
    a32 = insn.prefix[3] == 0x67
    for op in insn.operands:
        if op.type == csx.X86_OP_REG:
            parts.append(_reg_kind(insn.reg_name(op.reg), op.size))
        elif op.type == csx.X86_OP_IMM:
            parts.append("imm")
        elif op.type == csx.X86_OP_MEM:
            seg = {csx.X86_REG_FS: "fs:", csx.X86_REG_GS: "gs:"}.get(op.mem.segment, "")
            parts.append(f"{seg}{'a32:' if a32 else ''}m{op.size * 8}")
    return ",".join(parts)


def class_key(insn: CsInsn) -> str:
    form = operand_form(insn)
    return f"{insn.mnemonic} {form}" if form else insn.mnemonic


@dataclass
class TrustTable:
    """The classes proven by difftest, with the evidence for each."""

    min_cases: int = DEFAULT_MIN_CASES
    classes: dict[str, int] = field(default_factory=dict)  # class -> cases proven
    meta: dict[str, Any] = field(default_factory=dict)  # how the table was produced
    # class -> the mismatch that disproved it: never trusted again by a later
    # campaign that happens not to hit the same corner
    untrusted: dict[str, str] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.classes

    @classmethod
    def load(cls, path: Path | str) -> TrustTable:
        raw = json.loads(Path(path).read_text())
        return cls(
            int(raw["min_cases"]),
            dict(raw["classes"]),
            dict(raw.get("meta", {})),
            dict(raw.get("untrusted", {})),
        )

    def dump(self) -> str:
        raw = {
            "min_cases": self.min_cases,
            "meta": self.meta,
            "untrusted": dict(sorted(self.untrusted.items())),
            "classes": dict(sorted(self.classes.items())),
        }
        return json.dumps(raw, indent=1) + "\n"


def packaged_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("trust.json")))


@cache
def table() -> TrustTable:
    """The table in force: $EMUPROBE_TRUST_FILE if set, else the packaged one."""
    path = os.environ.get(ENV_FILE) or packaged_path()
    try:
        return TrustTable.load(path)
    except FileNotFoundError:
        return TrustTable()  # nothing proven: everything goes native


def is_trusted(insn: CsInsn) -> bool:
    return class_key(insn) in table()
