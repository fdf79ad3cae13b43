"""Hypothesis strategies: instructions from the opcode maps, and the state to
run them from.

Encodings: legacy prefixes (66 67 F2 F3, the six segment overrides, LOCK),
REX (W/R/X/B, redundant bits included), an opcode from the 1-byte, 0F, 0F38,
0F3A or VEX-128 map, then ModRM, SIB and eight bytes that become the
displacement and immediate; capstone decides what the instruction is and
where it ends.  The "prefixed" map always puts one to three prefixes before
the branches, loops, stack and string operations and nops whose meaning a
prefix changes on some CPU (opcodes.PREFIXED_BODIES).  A share of cases takes instructions from
real code (opcodes.real_code) instead.

State: registers the instruction uses get boundary-biased values (0, -1,
sign bits, carry-out patterns, small shift counts) or pointers into the data
pages; the rest get fixed distinct values, so that a write to the wrong
register still shows.  An explicit memory operand is steered by its base or
index register (or, RIP-relative, by its displacement) into the data pages,
the read-only page or the code, and sometimes deliberately into unmapped
memory or across the end of the data, so that faults are compared too.

Cost: a Hypothesis draw costs ~0.05-0.1 ms, more than the case itself, so a
case makes a few structural draws (map, opcode, how the operand is aimed)
and decodes everything else from byte strings drawn in one go.  Hypothesis
still shrinks those, toward zero bytes, which decode to the simplest choices
(no prefix, value 0, fill 0).
"""

from __future__ import annotations

import random
import struct
from functools import cache

from capstone import CsInsn
from capstone import x86_const as csx
from hypothesis import strategies as st

from emuprobe.difftest.cases import BOUNDARY64, FILL_RANDOM, Case
from emuprobe.difftest.opcodes import LEGACY_PREFIXES, opcode_maps, real_code
from emuprobe.difftest.oracle import CODE, CODE_LEN, DATA, DATA_LEN, RO, RO_LEN, SITE
from emuprobe.difftest.runner import decode, unsafe_natively
from emuprobe.x86.regs import GPR_NAMES, MASK64, full_register

STACK = DATA + 0x2000

# map name -> share of generated encodings, in percent
MAP_WEIGHTS = (
    ("1byte", 27), ("0f", 25), ("0f38", 8), ("0f3a", 5), ("vex128", 10), ("prefixed", 7),
    ("real", 18),
)  # fmt: skip

FIXED_GPRS = tuple(0x1111_1111_1111_1111 * (i + 1) & MASK64 for i in range(16))
FIXED_XMM = tuple(bytes((i * 16 + j) & 0xFF for j in range(16)) for i in range(16))
_XMM_EDGES = (
    bytes(16), b"\xff" * 16, b"\x80" * 16, b"\x7f" * 16, bytes([0, 0xFF] * 8),
    struct.pack("<4f", 0.0, -0.0, 1.0, -1.0),
    struct.pack("<4f", float("inf"), float("nan"), 1e-40, 3.5),
    struct.pack("<2d", 0.0, -1.5), struct.pack("<2d", float("-inf"), 5e-324),
    struct.pack("<2d", 1e308, 2.0),
)  # fmt: skip
_SMALL = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65)
_POINTERS = (STACK, STACK + 8, DATA + 0x100, DATA + 0x1000, DATA + DATA_LEN - 8)
_MXCSRS = (0x1F80, 0x1F80, 0x1F80, 0x1FBF, 0x0000, 0x9F80, 0x3F80, 0x5F80)
_UNMAPPED = (DATA + DATA_LEN + 0x100, 0x10, RO - 0x800, 1 << 47, MASK64 - 7)

PERCENT = st.integers(0, 99)


class Blob:
    """Reads choices out of a Hypothesis byte string; all-zero reads as the
    simplest choice.  Reading past the end gives zeros."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk.ljust(n, b"\0")

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "little")

    def pick(self, options: tuple[int, ...] | tuple[bytes, ...]) -> int | bytes:
        return options[self.byte() % len(options)]

    def value(self, pointer_like: bool = False) -> int:
        """A 64-bit register value biased to boundaries (9 bytes)."""
        sel, payload = self.byte(), self.take(8)
        raw = int.from_bytes(payload, "little")
        if pointer_like and sel >= 0x40:
            sel = 5 + sel % 2
        kind = sel % 8
        if kind == 0:
            return BOUNDARY64[payload[0] % len(BOUNDARY64)]
        if kind == 1:
            return _SMALL[payload[0] % len(_SMALL)]
        if kind == 4:
            return BOUNDARY64[payload[0] % len(BOUNDARY64)] ^ payload[1]
        if kind == 5:
            return DATA + raw % DATA_LEN
        if kind == 6:
            return _POINTERS[payload[0] % len(_POINTERS)]
        if kind == 7:  # a sign-extended 32-bit value
            return (raw & 0xFFFF_FFFF) - ((raw & 0x8000_0000) << 1) & MASK64
        return raw

    def xmm(self) -> bytes:
        sel, payload = self.byte(), self.take(16)
        return _XMM_EDGES[payload[0] % len(_XMM_EDGES)] if sel % 4 == 0 else payload


@cache
def _sampled(name: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from(real_code() if name == "real" else opcode_maps()[name])


_ENC_BYTES = st.binary(min_size=16, max_size=16)


@st.composite
def map_encodings(draw: st.DrawFn) -> bytes:
    """Raw bytes (longer than the instruction) from one of the opcode maps."""
    roll = draw(PERCENT)
    name = "real"
    for candidate, weight in MAP_WEIGHTS:
        name = candidate
        if roll < weight:
            break
        roll -= weight
    template = draw(_sampled(name))
    if name == "real":
        return template
    b = Blob(draw(_ENC_BYTES))
    nprefix = (0, 0, 0, 0, 1, 1, 1, 2)[b.byte() % 8] if name != "prefixed" else 1 + b.byte() % 3
    prefixes = bytes(b.pick(LEGACY_PREFIXES) for _ in range(nprefix))  # type: ignore[misc]
    rex_sel = b.byte()
    if name == "vex128":
        # C4 RXB.mmmmm W.vvvv.L.pp: keep the map, W and pp; draw R/X/B and vvvv
        byte1 = (template[1] & 0x1F) | (b.byte() & 0xE0)
        byte2 = (template[2] & 0x87) | (b.byte() & 0x78)
        body = bytes([0xC4, byte1, byte2]) + template[3:]
    else:
        mandatory = template[:1] if template[0] in (0x66, 0xF2, 0xF3) else b""
        rex = bytes([0x40 | rex_sel & 0xF]) if rex_sel >= 0x80 else b""
        body = mandatory + rex + template[len(mandatory) :]
    return prefixes + body + b.take(10)  # ModRM, SIB, disp/imm


def _cut(data: bytes) -> tuple[bytes, CsInsn] | None:
    insn = decode(data, SITE)
    if insn is None or unsafe_natively(insn):
        return None
    return bytes(data[: insn.size]), insn


def encodings(raw: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, CsInsn]]:
    """(instruction bytes, decoded) that capstone accepts and the sandbox may run."""
    return raw.map(_cut).filter(lambda t: t is not None)  # type: ignore[return-value]


MAP_ENCODINGS = encodings(map_encodings())


def _used(insn: CsInsn) -> tuple[set[str], set[int]]:
    """GPR names and XMM indices the instruction names or accesses."""
    read, written = insn.regs_access()
    ids = [*read, *written, *(op.reg for op in insn.operands if op.type == csx.X86_OP_REG)]
    gprs, xmm = set(), set()
    for rid in ids:
        reg = full_register(rid)
        if reg is None:
            continue
        if reg.name in GPR_NAMES:
            gprs.add(reg.name)
        elif reg.xmm >= 0:
            xmm.add(reg.xmm)
    return gprs, xmm


_STATE_FIXED = 24  # bytes of the state blob not tied to a register


def _state_size(insn: CsInsn) -> int:
    used_gprs, used_xmm = _used(insn)
    return _STATE_FIXED + 9 * len(used_gprs | {"rsp"}) + 17 * len(used_xmm)


@st.composite
def cases(draw: st.DrawFn, pool: st.SearchStrategy[tuple[bytes, CsInsn]] = MAP_ENCODINGS) -> Case:
    """A case for an instruction from `pool` (default: the opcode maps and real code)."""
    code, insn = draw(pool)
    size = _state_size(insn)
    b = Blob(draw(st.binary(min_size=size, max_size=size)))
    roll = draw(PERCENT) if any(op.type == csx.X86_OP_MEM for op in insn.operands) else 0
    return build_case(code, insn, b, roll)


def replay_case(code: bytes, insn: CsInsn, rng: random.Random) -> Case:
    """The same kind of case as `cases` draws, from a seeded generator instead
    of Hypothesis: what `emuprobe difftest --prove` replays, identically on
    every run and machine."""
    return build_case(code, insn, Blob(rng.randbytes(_state_size(insn))), rng.randrange(100))


def build_case(code: bytes, insn: CsInsn, b: Blob, roll: int) -> Case:
    """The state for `insn` read out of `b`; `roll` (0-99) picks where a memory
    operand points (see _target)."""
    used_gprs, used_xmm = _used(insn)
    used_gprs.add("rsp")
    where = b.byte() % 10
    site = SITE if where < 8 else (CODE + 0x1000 if where == 8 else CODE + CODE_LEN) - len(code)
    gprs = dict(zip(GPR_NAMES, FIXED_GPRS, strict=True))
    for name in GPR_NAMES:
        if name in used_gprs:
            gprs[name] = b.value(pointer_like=name in ("rsp", "rbp", "rsi", "rdi"))
    if insn.prefix[0] in (0xF2, 0xF3) and 0xA4 <= insn.opcode[0] <= 0xAF and insn.opcode[1] == 0:
        gprs["rcx"] = _SMALL[gprs["rcx"] % len(_SMALL)]  # a rep count the engine will take
    xmm = tuple(b.xmm() if i in used_xmm else FIXED_XMM[i] for i in range(16))
    flags = b.byte()
    eflags = 0x202 | sum(
        bit for i, bit in enumerate((1, 4, 0x10, 0x40, 0x80, 0x800)) if flags >> i & 1
    )
    extra = b.byte() % 50
    eflags |= 0x400 if extra in (1, 2, 3) else (0x40000 if extra == 4 else 0)  # DF, rarely AC
    sel = b.byte()
    mxcsr = _MXCSRS[sel % 8] if sel < 0xF0 else b.u16()
    fill_sel = b.byte()
    fill = fill_sel % 3 if fill_sel < 0xC0 else FILL_RANDOM + b.byte()
    seg_base = {
        "fs": int(b.pick((0, DATA, 0x10000))),
        "gs": int(b.pick((0, STACK, 0x7F00_0000_0000))),
    }
    overlay: list[tuple[int, bytes]] = []
    mem = [op for op in insn.operands if op.type == csx.X86_OP_MEM]
    if mem:
        target = _target(roll, b, overlay)
        if target is not None:
            code = _steer(insn, code, site, mem[0], target, gprs, seg_base)
    return Case(code, tuple(gprs[n] for n in GPR_NAMES), eflags, xmm, mxcsr,
                seg_base["fs"], seg_base["gs"], fill, tuple(overlay), site)  # fmt: skip


def _target(roll: int, b: Blob, overlay: list[tuple[int, bytes]]) -> int | None:
    """Where a memory operand should point: mostly the data pages (maybe with
    a boundary value put there), else read-only or code pages, unmapped
    memory, or across the end of the data; None leaves it to the registers."""
    if roll < 76:
        target = DATA + (b.u16() % DATA_LEN & -int(b.pick((1, 8, 16, 64))))
        if b.byte() & 1:
            chunk = (
                b.xmm()
                if b.byte() & 1
                else BOUNDARY64[b.byte() % len(BOUNDARY64)].to_bytes(8, "little")
            )
            overlay.append((target - DATA, chunk))
        return target
    if roll < 80:
        return RO + b.u16() % RO_LEN
    if roll < 84:
        return CODE + b.u16() % CODE_LEN
    if roll < 91:
        return int(b.pick(_UNMAPPED))
    if roll < 96:
        return DATA + DATA_LEN - 1 - b.byte() % 16  # straddles the end of the data
    return None


def _steer(insn: CsInsn, code: bytes, site: int, op: object, target: int,
           gprs: dict[str, int], seg_base: dict[str, int]) -> bytes:  # fmt: skip
    """Point memory operand `op` at `target` by choosing its base or index
    register, or its displacement if RIP-relative.  Returns the code, patched
    if need be."""
    m = op.mem  # type: ignore[attr-defined]
    segment = {csx.X86_REG_FS: "fs", csx.X86_REG_GS: "gs"}.get(m.segment)
    if segment is not None:
        target -= seg_base[segment]
    disp = m.disp
    if m.base == csx.X86_REG_RIP:
        if insn.disp_size != 4:
            return code
        new = (target - (site + len(code))) & 0xFFFF_FFFF
        off = insn.disp_offset
        return code[:off] + new.to_bytes(4, "little") + code[off + 4 :]
    base = full_register(m.base) if m.base else None
    index = full_register(m.index) if m.index else None
    if base is not None and base.name in gprs:
        if index is not None and index.name == base.name:
            gprs[base.name] = ((target - disp) // (1 + m.scale)) & MASK64
        else:
            rest = gprs[index.name] * m.scale if index is not None and index.name in gprs else 0
            gprs[base.name] = (target - disp - rest) & MASK64
    elif index is not None and index.name in gprs:
        gprs[index.name] = ((target - disp) // m.scale) & MASK64
    return code  # else an absolute disp32, which cannot reach the sandbox: it faults
