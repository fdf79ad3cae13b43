"""emuprobe's own PROBE syntax, parsed without touching any file or process.

    PROBE := LOCATION[%return] [FETCHARG ...]
    LOCATION := [NAME=][BINARY:]SYMBOL[+OFFSET]  |  [NAME=]BINARY:0xADDRESS

BINARY is a path (contains "/") or a library name as mapped in the target
("libc", "libm.so.6").  It is omitted for the main executable.  ADDRESS is the
ELF virtual address as `nm` prints it.  `%return` makes a return probe;
FETCHARGs use the kernel's grammar (perfbridge/fetchargs.py), as tracefs and
`perf probe` do.  Resolution happens elsewhere; a parse error quotes the spec
and points at the offending column.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from emuprobe.errors import spec_error
from emuprobe.spec.fetchargs import FetchArg, parse_fetchargs

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_SYMBOL = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$@]*\Z")
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\Z")


@dataclass(frozen=True)
class ProbeSpec:
    text: str  # the spec as the user wrote it
    name: str  # the event name printed at each hit
    binary: str | None  # None: the main executable
    symbol: str | None  # None when `address` is given
    offset: int = 0
    address: int | None = None
    retprobe: bool = False  # fire at the function's return, not at LOCATION
    args: tuple[FetchArg, ...] = ()  # fetched at each hit
    file_offset: int | None = None  # instead of `address`: an offset in BINARY (tracefs form)


def _number(text: str, part: str, column: int, what: str) -> int:
    if not _NUMBER.match(part):
        raise spec_error(text, column, f"{what} '{part}' is not a number")
    return int(part, 0)


def parse_probe(text: str) -> ProbeSpec:
    """Parse one PROBE argument into a ProbeSpec (pure: resolves nothing)."""
    if not text or text.strip() != text:
        raise spec_error(text, 0, "empty probe or surrounding spaces")
    if "\0" in text:
        raise spec_error(text.replace("\0", "?"), text.index("\0"), "NUL byte")
    location, _, args_text = text.partition(" ")
    retprobe = location.endswith(RETURN_SUFFIX)
    spec = _parse_location(text, location.removesuffix(RETURN_SUFFIX))
    if retprobe:
        if spec.offset:
            raise spec_error(text, 0, "a return probe must be on a function's entry (no +OFFSET)")
        default = spec.name == (spec.symbol or f"{spec.address:#x}")
        name = f"{spec.name}__return" if default else spec.name  # perf probe's naming
        spec = dataclasses.replace(spec, name=name, retprobe=True)
    if args_text:

        args = parse_fetchargs(text, args_text, len(location) + 1, retprobe)
        spec = dataclasses.replace(spec, args=args)
    return spec


RETURN_SUFFIX = "%return"


def _parse_location(text: str, body: str) -> ProbeSpec:
    name, col = None, 0
    eq = body.find("=")
    if eq >= 0:
        name, body, col = body[:eq], body[eq + 1 :], eq + 1
        if not _NAME.match(name):
            raise spec_error(text, 0, f"event name '{name}' must be an identifier")
    # The location separator is the last ':' — paths may contain ':' rarely,
    # symbols never do (mangled C++ names have no ':').
    colon = body.rfind(":")
    binary: str | None = None
    if colon >= 0:
        binary, body, col = body[:colon], body[colon + 1 :], col + colon + 1
        if not binary:
            raise spec_error(text, col - 1, "empty BINARY before ':'")
    if not body:
        raise spec_error(text, col, "missing SYMBOL or ADDRESS")
    if body[0].isdigit():
        if binary is None:
            raise spec_error(text, col, "an ADDRESS needs a BINARY: write BINARY:0xADDRESS")
        address = _number(text, body, col, "address")
        return ProbeSpec(text, name or f"{address:#x}", binary, None, 0, address)
    symbol, offset = body, 0
    plus = body.find("+")
    if plus >= 0:
        symbol = body[:plus]
        offset = _number(text, body[plus + 1 :], col + plus + 1, "offset")
    if not _SYMBOL.match(symbol):
        bad = next((i for i, c in enumerate(symbol) if not (c.isalnum() or c in "_.$@")), 0)
        raise spec_error(text, col + bad, f"'{symbol}' is not a symbol name")
    default = symbol if offset == 0 else f"{symbol}+{offset}"
    return ProbeSpec(text, name or default, binary, symbol, offset, None)
