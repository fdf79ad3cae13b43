"""One ELF file on disk: its functions, and where a probe location lands in it.

Everything here is a property of the file, not of a process. Addresses are ELF
virtual addresses (what `nm` and `objdump` print); a site is keyed by file
identity and file offset, so the load address of a process never enters.
"""

from __future__ import annotations

import bisect
import difflib
import os
from dataclasses import dataclass
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from emuprobe.disasm import CS, SWEEP
from emuprobe.errors import ProbeError
from emuprobe.sys.elfsyms import Symbol, read_functions
from emuprobe.sys.ifunc import ifunc_file_offset
from emuprobe.sys.maps import file_identity

_PF_X = 1
_MAX_INSN = 15



@dataclass(frozen=True)
class Resolved:
    vaddr: int  # ELF vaddr of the probed instruction
    file_offset: int  # its offset in the file (via the PT_LOAD that contains it)
    label: str  # "main", "main+4", "0x401136", "strlen (__strlen_avx2)"
    symbol: Symbol | None


@dataclass(frozen=True)
class _Segment:
    vaddr: int
    filesz: int  # only these bytes come from the file; the rest of memsz is zeros
    offset: int
    executable: bool


class ElfImage:
    """An x86-64 executable or shared object, opened read-only."""

    def __init__(self, path: str, stream: BinaryIO, elf: ELFFile) -> None:
        self.path = os.path.realpath(path)
        self.identity = file_identity(self.path)
        self.is_pie = elf.header.e_type == "ET_DYN"
        self._name = os.path.basename(path)
        self._stream = stream  # kept open: pyelftools reads lazily, and so does read()
        self._elf = elf
        self._segments = [
            _Segment(s["p_vaddr"], s["p_filesz"], s["p_offset"], bool(s["p_flags"] & _PF_X))
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        self._funcs: list[Symbol] | None = None
        self._starts: list[int] = []
        self._by_name: dict[str, list[Symbol]] = {}
        # (name, vaddr) -> (version, is_default) for .dynsym entries that carry one.
        self._versions: dict[tuple[str, int], tuple[str, bool]] = {}
        self._max_size = 0

    @classmethod
    def open(cls, path: str) -> ElfImage:
        """Open `path`; every reason it cannot be probed is a one-line ProbeError."""
        try:
            stream = open(path, "rb")  # lives as long as the image
        except FileNotFoundError:
            raise ProbeError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ProbeError(f"{path}: is a directory") from None
        except PermissionError:
            raise ProbeError(f"{path}: permission denied") from None
        except OSError as e:
            raise ProbeError(f"{path}: {(e.strerror or str(e)).lower()}") from None
        try:
            if stream.read(4) != b"\x7fELF":
                raise ProbeError(f"{path}: not an ELF file")
            stream.seek(0)
            try:
                elf = ELFFile(stream)
                machine = elf.header.e_machine
                e_type = elf.header.e_type
            except (ELFError, ValueError, OSError) as e:
                raise ProbeError(f"{path}: corrupt ELF file ({e})") from None
            if elf.elfclass != 64 or machine != "EM_X86_64":
                raise ProbeError(f"{path}: not an x86-64 ELF file ({machine})")
            if e_type not in ("ET_EXEC", "ET_DYN"):
                raise ProbeError(f"{path}: not an executable or shared object ({e_type})")
            _check_extent(path, elf, os.fstat(stream.fileno()).st_size)
            return cls(path, stream, elf)
        except BaseException:
            stream.close()
            raise

    # -- symbols ---------------------------------------------------------------

    def functions(self) -> list[Symbol]:
        """Defined functions of .symtab and .dynsym, once per (name, vaddr), by vaddr."""
        if self._funcs is None:
            self._load_symbols()
        assert self._funcs is not None
        return self._funcs

    def _load_symbols(self) -> None:
        funcs, self._versions = read_functions(self._stream.fileno(), self._elf)
        self._funcs = funcs
        self._starts = [s.vaddr for s in funcs]
        self._max_size = max((s.size for s in funcs), default=0)
        for sym in funcs:
            self._by_name.setdefault(sym.name, []).append(sym)

    def lookup(self, name: str) -> Symbol:
        """The function called `name`; "malloc@@GLIBC_2.2.5" picks a .dynsym version."""
        self.functions()
        candidates = self._by_name.get(name, [])
        base, at, version = name.partition("@")
        if not candidates and at:
            version = version.lstrip("@")
            everything = self._by_name.get(base, [])
            candidates = [s for s in everything if self._version_of(s)[0] == version]
            if everything and not candidates:
                have = sorted({v for s in everything if (v := self._version_of(s)[0])})
                raise ProbeError(
                    f"{self._name}: no version '{version}' of '{base}'"
                    f" (have: {', '.join(have) or 'none'})"
                )
        if not candidates:
            raise ProbeError(f"{self._name}: no function '{name}' ({self._suggest(base)})")
        if len(candidates) == 1:
            return candidates[0]
        # Several addresses under one name: compat versions of a libc function
        # (the linker binds new code to the "@@" one), or static functions of
        # different translation units (nothing to prefer).
        defaults = [s for s in candidates if self._version_of(s)[1]]
        if len(defaults) == 1:
            return defaults[0]
        where = ", ".join(f"0x{s.vaddr:x}" for s in candidates)
        raise ProbeError(f"{self._name}: '{name}' is ambiguous ({where}); probe an address")

    def _version_of(self, sym: Symbol) -> tuple[str, bool]:
        return self._versions.get((sym.name, sym.vaddr), ("", False))

    def _suggest(self, name: str) -> str:
        if not self._by_name:
            return "the file has no function symbols; probe an address"
        close = difflib.get_close_matches(name, list(self._by_name), n=3)
        return f"did you mean: {', '.join(close)}?" if close else "no close match"

    def symbol_at(self, vaddr: int) -> Symbol | None:
        """The function whose [vaddr, vaddr+size) holds `vaddr` (size 0: its start only)."""
        funcs = self.functions()
        best: Symbol | None = None
        i = bisect.bisect_right(self._starts, vaddr) - 1
        # Symbols may overlap (aliases, asm), so walk back as far as the largest size.
        while i >= 0 and (self._starts[i] == vaddr or self._starts[i] + self._max_size > vaddr):
            s = funcs[i]
            if vaddr < s.vaddr + s.size or s.vaddr == vaddr:
                if best is None or _rank(s) < _rank(best):
                    best = s
            i -= 1
        return best

    # -- bytes -----------------------------------------------------------------

    def _segment(self, vaddr: int) -> _Segment | None:
        for seg in self._segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return seg
        return None

    def vaddr_to_offset(self, vaddr: int) -> int:
        """File offset of `vaddr`, which must be file-backed executable code."""
        seg = self._segment(vaddr)
        if seg is None or not seg.executable:
            raise ProbeError(f"{self._name}: 0x{vaddr:x} is not in executable code")
        return seg.offset + (vaddr - seg.vaddr)

    def offset_to_vaddr(self, file_offset: int) -> int:
        """Inverse of vaddr_to_offset, for offsets inside an executable PT_LOAD."""
        for seg in self._segments:
            if seg.executable and seg.offset <= file_offset < seg.offset + seg.filesz:
                return seg.vaddr + (file_offset - seg.offset)
        raise ProbeError(f"{self._name}: file offset 0x{file_offset:x} is not in executable code")

    def read(self, vaddr: int, n: int) -> bytes:
        """Up to `n` bytes of the file at `vaddr`, cut short at the end of its segment."""
        seg = self._segment(vaddr)
        if seg is None:
            raise ProbeError(f"{self._name}: 0x{vaddr:x} is not in the file")
        n = min(n, seg.vaddr + seg.filesz - vaddr)
        return os.pread(self._stream.fileno(), n, seg.offset + (vaddr - seg.vaddr))

    # -- instructions ----------------------------------------------------------

    def check_boundary(self, vaddr: int) -> None:
        """Raise unless `vaddr` starts an instruction of the function around it.

        Outside any known function there is nothing to sweep from, so it is accepted.
        """
        sym = self.symbol_at(vaddr)
        if sym is not None:
            self._check_from(sym, vaddr, f"{sym.name}+{vaddr - sym.vaddr}")

    def _check_from(self, sym: Symbol, vaddr: int, label: str) -> None:
        # A linear sweep from the function start is what objdump does too; it
        # is right for compiler output, which does not put data inside code.
        if vaddr == sym.vaddr:
            return
        code = self.read(sym.vaddr, vaddr - sym.vaddr + _MAX_INSN)
        before = after = None
        for addr, _size, _mnemonic, _ops in SWEEP.disasm_lite(code, sym.vaddr):
            if addr == vaddr:
                return
            if addr > vaddr:
                after = addr - sym.vaddr
                break
            before = addr - sym.vaddr
        near = ", ".join(f"+{d}" for d in (before, after) if d is not None)
        raise ProbeError(f"{label}: not on an instruction boundary (instructions start at {near})")

    def first_instruction(self, vaddr: int) -> str:
        """The instruction at `vaddr` in Intel syntax, or "(bad)" as objdump says."""
        for _addr, _size, mnemonic, ops in CS.disasm_lite(self.read(vaddr, _MAX_INSN), vaddr):
            return f"{mnemonic} {ops}".strip()
        return "(bad)"

    # -- probe locations -------------------------------------------------------

    def resolve(self, symbol: str | None, offset: int = 0, address: int | None = None) -> Resolved:
        """Where `symbol`+`offset` (or the ELF vaddr `address`) is, checked for probing.

        An ifunc symbol stands for the implementation its resolver picks, so the
        offset counts from that implementation.
        """
        if (symbol is None) == (address is None):
            raise ValueError("resolve() needs exactly one of symbol and address")
        if offset < 0:
            raise ProbeError(f"{symbol or hex(address or 0)}: negative offset {offset}")
        if address is not None:
            vaddr = address + offset
            file_offset = self.vaddr_to_offset(vaddr)
            self.check_boundary(vaddr)
            return Resolved(vaddr, file_offset, f"0x{vaddr:x}", self.symbol_at(vaddr))
        assert symbol is not None
        sym = self.lookup(symbol)
        plus = f"+{offset}" if offset else ""
        target, label = sym, f"{symbol}{plus}"
        if sym.ifunc:
            target = resolve_ifunc(self, sym)
            named = target.name in self._by_name
            impl = f"{target.name}{plus}" if named else f"0x{target.vaddr + offset:x}"
            label = f"{symbol}{plus} ({impl})"
        if target.size and offset >= target.size:
            raise ProbeError(f"{label}: offset {offset} is past the end ({target.size} bytes)")
        vaddr = target.vaddr + offset
        file_offset = self.vaddr_to_offset(vaddr)
        self._check_from(target, vaddr, label)
        return Resolved(vaddr, file_offset, label, target)


def _check_extent(path: str, elf: ELFFile, size: int) -> None:
    """A truncated file is refused here, in one line, rather than failing
    later in whatever read first goes past its end."""
    h = elf.header
    tables = ((h.e_phoff, h.e_phnum * h.e_phentsize), (h.e_shoff, h.e_shnum * h.e_shentsize))
    for off, length in tables:
        if off + length > size:
            need = off + length
            raise ProbeError(f"{path}: truncated ELF file ({size} bytes, headers need {need})")
    try:
        for sec in elf.iter_sections():
            if sec["sh_type"] != "SHT_NOBITS" and sec["sh_offset"] + sec["sh_size"] > size:
                raise ProbeError(f"{path}: truncated ELF file ({size} bytes, section "
                                 f"{sec.name or '?'} ends at {sec['sh_offset'] + sec['sh_size']})")
    except (ELFError, ValueError, OSError) as e:
        raise ProbeError(f"{path}: corrupt ELF file ({e})") from None


def _rank(s: Symbol) -> tuple[bool, int, bool, int, str]:
    # Sized before zero-sized, innermost first, then the public-looking alias:
    # "malloc" rather than "__libc_malloc" for the same address.
    return (s.size == 0, -s.vaddr, s.name.startswith("_"), len(s.name), s.name)


# -- IFUNC -------------------------------------------------------------------
#
# The target's dynamic linker ran the resolver once, in the target, on this CPU.
# The resolver reads only the CPU features ld.so recorded, so running the same
# file's resolver on the same CPU picks the same implementation. Caveat: a
# GLIBC_TUNABLES (hwcaps mask) in the target's environment that differs from ours
# can make the target pick another one.



def resolve_ifunc(image: ElfImage, sym: Symbol) -> Symbol:
    """The implementation that the ifunc `sym` resolves to on this machine."""
    version = image._version_of(sym)[0] or None
    try:
        offset = ifunc_file_offset(image.path, image.identity, sym.name, version)
    except ProbeError as e:
        raise ProbeError(
            f"{image._name}: cannot resolve ifunc '{sym.name}' ({e}); probe an address instead"
        ) from None
    vaddr = image.offset_to_vaddr(offset)
    if vaddr == sym.vaddr:
        raise ProbeError(f"{image._name}: ifunc '{sym.name}' resolved to its own resolver")
    named = image.symbol_at(vaddr)
    if named is not None and named.vaddr == vaddr and not named.ifunc:
        return named
    # Distribution libraries ship without .symtab, so "__strlen_avx2" is
    # usually unknown; the address is still exact.
    return Symbol(f"{sym.name}.impl", vaddr, 0, False)
