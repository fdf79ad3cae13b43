"""/proc/PID/maps as values."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

PAGE = 0x1000  # x86-64's base page


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    prot: int  # PROT_* bits
    shared: bool
    offset: int  # file offset of `start`
    dev: tuple[int, int]  # (major, minor)
    inode: int
    path: str  # "" for anonymous mappings, "[stack]" etc. for special ones

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    @property
    def executable(self) -> bool:
        return bool(self.prot & PROT_EXEC)

    def file_offset_to_addr(self, file_offset: int) -> int | None:
        """The address at which `file_offset` of the mapped file appears, if inside."""
        rel = file_offset - self.offset
        if 0 <= rel < self.end - self.start:
            return self.start + rel
        return None


def parse_line(line: str) -> Mapping:
    fields = line.split(maxsplit=5)
    lo, hi = fields[0].split("-")
    perms = fields[1]
    major, minor = fields[3].split(":")
    prot = (
        (PROT_READ if perms[0] == "r" else 0)
        | (PROT_WRITE if perms[1] == "w" else 0)
        | (PROT_EXEC if perms[2] == "x" else 0)
    )
    path = fields[5].strip() if len(fields) > 5 else ""
    return Mapping(
        start=int(lo, 16),
        end=int(hi, 16),
        prot=prot,
        shared=perms[3] == "s",
        offset=int(fields[2], 16),
        dev=(int(major, 16), int(minor, 16)),
        inode=int(fields[4]),
        path=path,
    )


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of `pid`, sorted by address. Raises OSError if it is gone."""
    with open(f"/proc/{pid}/maps") as f:
        return [parse_line(line) for line in f if line.strip()]


class MapsIndex:
    """Address lookup over one snapshot of a process's mappings."""

    def __init__(self, mappings: list[Mapping]) -> None:
        self.mappings = mappings
        self._starts = [m.start for m in mappings]

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.mappings[i].end:
            return self.mappings[i]
        return None


def file_identity(path: str) -> tuple[tuple[int, int], int]:
    """((major, minor), inode) of a file, comparable with Mapping.dev/inode."""
    st = os.stat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino
