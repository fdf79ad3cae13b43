"""User call chains at a hit: .eh_frame CFI where a file has it, frame pointers where not.

CFI comes first because it is exact at every instruction, including the
first one of a function, where a probe usually sits and where the frame
pointer still belongs to the caller (a frame-pointer walk would skip the
caller there).  Code without CFI (JIT, hand-written asm, stripped .eh_frame)
falls back to the rbp chain.  Frames are symbolized as perf script prints
them: `symbol+0xOFF` and the mapped file's path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile

from emuprobe.engine.events import ProbeEvent
from emuprobe.engine.session import Session
from emuprobe.errors import ProbeError
from emuprobe.perfbridge.record import Frame
from emuprobe.sys.elfimage import ElfImage
from emuprobe.sys.maps import Mapping

_RSP, _RBP, _RA = 7, 6, 16  # DWARF register numbers on x86-64
UNKNOWN = "[unknown]"


@dataclass(frozen=True)
class _Rule:
    cfa_reg: int  # _RSP or _RBP
    cfa_offset: int
    ra_offset: int | None  # RA saved at CFA + offset
    rbp_offset: int | None  # caller's rbp saved at CFA + offset


class _CfiTable:
    """The FDEs of one file, by start address; rows decoded on first use."""

    def __init__(self, path: str) -> None:
        self._starts: list[int] = []
        self._fdes: list[Any] = []
        self._decoded: dict[int, list[tuple[int, _Rule | None]]] = {}
        try:
            with open(path, "rb") as f:
                dwarf = ELFFile(f).get_dwarf_info()
                entries = dwarf.EH_CFI_entries() if dwarf.has_EH_CFI() else []
        except Exception:  # noqa: BLE001 - no usable CFI: frame pointers then
            entries = []
        fdes = sorted((e for e in entries if isinstance(e, FDE)),
                      key=lambda e: e.header["initial_location"])
        self._fdes = fdes
        self._starts = [e.header["initial_location"] for e in fdes]

    def rule(self, vaddr: int) -> _Rule | None:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        fde = self._fdes[i]
        if vaddr >= fde.header["initial_location"] + fde.header["address_range"]:
            return None
        rows = self._decoded.get(i)
        if rows is None:
            rows = self._decoded[i] = _decode(fde)
        j = bisect.bisect_right([pc for pc, _ in rows], vaddr) - 1
        return rows[j][1] if j >= 0 else None


def _decode(fde: Any) -> list[tuple[int, _Rule | None]]:
    rows: list[tuple[int, _Rule | None]] = []
    try:
        table = fde.get_decoded().table
    except Exception:  # noqa: BLE001 - an opcode pyelftools cannot decode
        return rows
    for row in table:
        cfa = row.get("cfa")
        rule = None
        if cfa is not None and cfa.expr is None and cfa.reg in (_RSP, _RBP):
            ra, rbp = row.get(_RA), row.get(_RBP)
            rule = _Rule(cfa.reg, cfa.offset, _offset(ra), _offset(rbp))
        rows.append((row["pc"], rule))
    return rows


def _offset(reg_rule: Any) -> int | None:
    if reg_rule is not None and reg_rule.type == "OFFSET":
        return int(reg_rule.arg)
    return None


class Unwinder:
    def __init__(self, session: Session, depth: int) -> None:
        self.session = session
        self.depth = depth
        self._cfi: dict[tuple[tuple[int, int], int], _CfiTable] = {}

    def unwind(self, ev: ProbeEvent) -> tuple[Frame, ...]:
        """The call chain at `ev`, innermost first, at most `depth` frames."""
        mem = ev._memory
        pc, sp, bp = ev.regs.rip, ev.regs.rsp, ev.regs.rbp
        frames: list[Frame] = []
        while len(frames) < self.depth:
            m = mem.region(pc)
            image = self._image(m)
            frames.append(self._symbolize(pc, m, image))
            # The return address points after the call: look up the call itself.
            lookup = pc if len(frames) == 1 else pc - 1
            step = self._step_cfi(ev, m, image, lookup, sp, bp)
            if step is None:
                step = self._step_fp(ev, m, image, pc, sp, bp, first=len(frames) == 1)
            if step is None:
                break
            new_pc, new_sp, bp = step
            if new_pc == 0 or new_sp <= sp:
                break
            pc, sp = new_pc, new_sp
        return tuple(frames)

    def _image(self, m: Mapping | None) -> ElfImage | None:
        if m is None or not (m.is_file and m.executable):
            return None
        try:
            image = self.session.planter.images.open(m.path)
        except ProbeError:
            return None
        return image if image.identity == (m.dev, m.inode) else None

    def _symbolize(self, pc: int, m: Mapping | None, image: ElfImage | None) -> Frame:
        if m is None or image is None:
            return Frame(pc, UNKNOWN, m.path if m is not None and m.path else UNKNOWN)
        vaddr = _vaddr(image, m, pc)
        sym = image.symbol_at(vaddr) if vaddr is not None else None
        name = f"{sym.name}+{vaddr - sym.vaddr:#x}" if sym and vaddr is not None else UNKNOWN
        return Frame(pc, name, image.path)

    def _step_cfi(self, ev: ProbeEvent, m: Mapping | None, image: ElfImage | None,
                  pc: int, sp: int, bp: int) -> tuple[int, int, int] | None:
        if m is None or image is None:
            return None
        table = self._cfi.get(image.identity)
        if table is None:
            table = self._cfi[image.identity] = _CfiTable(image.path)
        vaddr = _vaddr(image, m, pc)
        rule = table.rule(vaddr) if vaddr is not None else None
        if rule is None or rule.ra_offset is None:
            return None
        cfa = (sp if rule.cfa_reg == _RSP else bp) + rule.cfa_offset
        try:
            ra = _word(ev, cfa + rule.ra_offset)
            if rule.rbp_offset is not None:
                bp = _word(ev, cfa + rule.rbp_offset)
        except OSError:
            return None
        return ra, cfa, bp

    def _step_fp(self, ev: ProbeEvent, m: Mapping | None, image: ElfImage | None,
                 pc: int, sp: int, bp: int, first: bool) -> tuple[int, int, int] | None:
        try:
            if first and image is not None and m is not None:
                vaddr = _vaddr(image, m, pc)
                sym = image.symbol_at(vaddr) if vaddr is not None else None
                if sym is not None and sym.vaddr == vaddr:
                    # At a function's first instruction rbp is still the caller's.
                    return _word(ev, sp), sp + 8, bp
            if bp < sp:
                return None
            return _word(ev, bp + 8), bp + 16, _word(ev, bp)
        except OSError:
            return None


def _vaddr(image: ElfImage, m: Mapping, pc: int) -> int | None:
    try:
        return image.offset_to_vaddr(m.offset + (pc - m.start))
    except ProbeError:
        return None


def _word(ev: ProbeEvent, addr: int) -> int:
    try:
        return int.from_bytes(ev.read_memory(addr, 8), "little")
    except (OverflowError, ValueError) as e:
        raise OSError(str(e)) from e
