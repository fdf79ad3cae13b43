"""The functions an ELF file defines, read from .symtab and .dynsym with
struct (pyelftools' per-symbol parsing costs a quarter of a second for libc,
which every `libc:` probe would pay), with the versions .dynsym gives them."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from elftools.elf.elffile import ELFFile

_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_FUNC_TYPES = frozenset({_STT_FUNC, _STT_GNU_IFUNC})
_SHN_UNDEF = 0
_SHT_SYMTAB, _SHT_NOBITS, _SHT_DYNSYM = 2, 8, 11
_SHT_GNU_VERDEF, _SHT_GNU_VERSYM = 0x6FFFFFFD, 0x6FFFFFFF
# .gnu.version values that name no version: local, global (unversioned), reserved.
_VER_NDX_LOCAL = 0
_VER_NDX_UNVERSIONED = frozenset({_VER_NDX_LOCAL, 1, 0xFF00, 0xFF01})
_SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
_VERDEF = struct.Struct("<HHHHIII")  # Elf64_Verdef
_VERDAUX = struct.Struct("<II")  # Elf64_Verdaux


@dataclass(frozen=True)
class Symbol:
    name: str
    vaddr: int  # ELF virtual address, as `nm` prints it
    size: int
    ifunc: bool  # STT_GNU_IFUNC


class _Section(NamedTuple):  # Elf64_Shdr without sh_name
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int
    entsize: int


def _cstring(table: bytes, at: int) -> str:
    end = table.find(b"\0", at)
    return table[at : end if end >= 0 else len(table)].decode("utf-8", errors="replace")


def read_functions(
    fd: int, elf: ELFFile
) -> tuple[list[Symbol], dict[tuple[str, int], tuple[str, bool]]]:
    """Defined functions, once per (name, vaddr), by vaddr; and (name, vaddr) ->
    (version, is the default) for the .dynsym entries that carry a version."""
    found: dict[tuple[str, int], Symbol] = {}
    versions_of: dict[tuple[str, int], tuple[str, bool]] = {}
    sections = _section_headers(fd, elf)
    for sec in sections:
        if sec.type not in (_SHT_SYMTAB, _SHT_DYNSYM) or sec.entsize < _SYM.size:
            continue
        versions = _version_names(fd, sections) if sec.type == _SHT_DYNSYM else {}
        versym = _versym(fd, sections) if versions else ()
        names = _section_bytes(fd, sections[sec.link]) if sec.link < len(sections) else b""
        table = _section_bytes(fd, sec)
        for i in range(len(table) // sec.entsize):
            st_name, st_info, _other, shndx, value, st_size = _SYM.unpack_from(
                table, i * sec.entsize
            )
            kind = st_info & 0xF
            if kind not in _FUNC_TYPES or shndx == _SHN_UNDEF:
                continue
            name = _cstring(names, st_name)
            if not name:
                continue
            key = (name, value)
            old = found.get(key)
            # A stripped .symtab entry may say size 0 where .dynsym knows it.
            size = max(st_size, old.size if old else 0)
            ifunc = kind == _STT_GNU_IFUNC or bool(old and old.ifunc)
            found[key] = Symbol(name, value, size, ifunc)
            ndx = versym[i] if i < len(versym) else _VER_NDX_LOCAL
            if ndx not in _VER_NDX_UNVERSIONED and (ndx & 0x7FFF) in versions:
                # Bit 15 marks a hidden (non-default, "@" not "@@") version.
                versions_of[key] = (versions[ndx & 0x7FFF], not ndx & 0x8000)
    return sorted(found.values(), key=lambda s: (s.vaddr, s.name)), versions_of


def _section_headers(fd: int, elf: ELFFile) -> list[_Section]:
    header = elf.header
    count, entsize = elf.num_sections(), header["e_shentsize"]
    if not count or entsize < _SHDR.size:
        return []
    raw = os.pread(fd, count * entsize, header["e_shoff"])
    return [
        _Section(*_SHDR.unpack_from(raw, i * entsize)[1:])
        for i in range(len(raw) // entsize)
    ]

def _section_bytes(fd: int, sec: _Section) -> bytes:
    if sec.type == _SHT_NOBITS:
        return b""
    return os.pread(fd, sec.size, sec.offset)

def _version_names(fd: int, sections: list[_Section]) -> dict[int, str]:
    """vd_ndx -> name of each version .gnu.version_d defines."""
    verdef = next((s for s in sections if s.type == _SHT_GNU_VERDEF), None)
    if verdef is None or verdef.link >= len(sections):
        return {}
    data = _section_bytes(fd, verdef)
    names = _section_bytes(fd, sections[verdef.link])
    out: dict[int, str] = {}
    at = 0
    for _ in range(verdef.info):  # sh_info: the number of entries
        if at + _VERDEF.size > len(data):
            break
        _version, _flags, ndx, count, _hash, aux, step = _VERDEF.unpack_from(data, at)
        if count and at + aux + _VERDAUX.size <= len(data):
            out[ndx] = _cstring(names, _VERDAUX.unpack_from(data, at + aux)[0])
        if not step:
            break
        at += step
    return out

def _versym(fd: int, sections: list[_Section]) -> tuple[int, ...]:
    """.gnu.version: the version index of each .dynsym entry."""
    sec = next((s for s in sections if s.type == _SHT_GNU_VERSYM), None)
    if sec is None:
        return ()
    data = _section_bytes(fd, sec)
    return struct.unpack_from(f"<{len(data) // 2}H", data)

