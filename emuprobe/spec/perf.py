"""perf's probe languages, parsed purely into the same ProbeSpec as emuprobe's own form.

    perf probe -x BINARY:  [[GROUP:]EVENT=]FUNC[+OFFS|%return] [ARG ...]
    uprobe_events line:    p[:[GRP/][EVENT]] PATH:OFFSET[%return] [FETCHARGS]
                           r[:[GRP/][EVENT]] PATH:OFFSET [FETCHARGS]

Events are named as the tools name them, so a definition prints the same
name everywhere: perf's default group is `probe_<binary>` and a return probe
is `FUNC__return`; tracefs's default group is `uprobes` and its default event
`p_<binary>_0x<offset>` (the binary's name cut at its first '.', '-' or '_').
The name printed at each hit is `GROUP:EVENT`, as `perf script` prints it.
"""

from __future__ import annotations

import os
import re

from emuprobe.errors import ProbeError, spec_error
from emuprobe.spec.fetchargs import parse_fetchargs
from emuprobe.spec.probe import RETURN_SUFFIX, ProbeSpec

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_FUNC = re.compile(r"[A-Za-z_.$][A-Za-z0-9_.$@]*\Z")
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)\Z")


def binary_tag(path: str) -> str:
    """`my-prog.x` -> `my`: how perf and tracefs shorten a binary's name in event names."""
    return re.split(r"[.\-_]", os.path.basename(path), maxsplit=1)[0] or "bin"


def _group_event(text: str, ident: str, sep: str, col: int, group: str) -> tuple[str, str]:
    """`GROUP<sep>EVENT` or `EVENT` found at `col`; either part is checked as an identifier."""
    event = ident
    if sep in ident:
        group, _, event = ident.partition(sep)
        if not _IDENT.match(group):
            raise spec_error(text, col, f"group '{group}' must be an identifier")
    if event and not _IDENT.match(event):
        at = col + len(ident) - len(event)
        raise spec_error(text, at, f"event '{event}' must be an identifier")
    return group, event


def _location_end(text: str) -> int:
    m = re.search(r"\s", text)
    return m.start() if m else len(text)


def parse_perf_probe(text: str, binary: str) -> ProbeSpec:
    """A `perf probe -x BINARY` definition (function locations only: no DWARF lines)."""
    if not text or text.strip() != text:
        raise spec_error(text, 0, "empty definition or surrounding spaces")
    end = _location_end(text)
    loc, col = text[:end], 0
    group, event = f"probe_{binary_tag(binary)}", None
    eq = loc.find("=")
    if eq >= 0:
        ident, loc, col = loc[:eq], loc[eq + 1 :], eq + 1
        group, event = _group_event(text, ident, ":", 0, group)
        if not event:
            raise spec_error(text, eq, "missing EVENT before '='")
    retprobe = loc.endswith(RETURN_SUFFIX)
    loc = loc.removesuffix(RETURN_SUFFIX)
    for mark, what in (("@", "source files"), (":", "line numbers"), (";", "lazy patterns")):
        if mark in loc:
            raise spec_error(text, col + loc.index(mark), f"{what} need DWARF; not supported")
    func, _, offs = loc.partition("+")
    if not _FUNC.match(func):
        raise spec_error(text, col, f"'{func}' is not a function name")
    offset = 0
    if "+" in loc:
        if not _NUMBER.match(offs):
            raise spec_error(text, col + len(func) + 1, f"offset '{offs}' is not a number")
        offset = int(offs, 0)
        if retprobe:
            raise spec_error(text, col + len(func), "%return needs the function's entry, no +OFFS")
    event = event or (f"{func}__return" if retprobe else func)
    args = parse_fetchargs(text, text[end:], end, retprobe)
    return ProbeSpec(
        text, f"{group}:{event}", binary, func, offset, None, retprobe=retprobe, args=args
    )


def parse_uprobe_event(text: str) -> ProbeSpec:
    """One line of tracefs `uprobe_events` syntax (the kind of probe, not `-:` removal)."""
    if not text or text.strip() != text:
        raise spec_error(text, 0, "empty line or surrounding spaces")
    end = _location_end(text)
    head = text[:end]
    if head[0] not in "pr" or (len(head) > 1 and head[1] != ":"):
        raise spec_error(text, 0, "a definition starts with p or r (p[:[GRP/][EVENT]] ...)")
    retprobe = head[0] == "r"
    group, event = "uprobes", ""
    if len(head) > 2:
        group, event = _group_event(text, head[2:], "/", 2, group)
    rest = text[end:].lstrip()
    col = len(text) - len(rest)
    loc_end = _location_end(rest)
    loc = rest[:loc_end]
    if not loc:
        raise spec_error(text, col, "missing PATH:OFFSET")
    if loc.endswith(")"):
        raise spec_error(text, col + loc.rfind("("), "reference counters (SDT semaphores)"
                         " are not supported")
    if loc.endswith(RETURN_SUFFIX):
        retprobe, loc = True, loc.removesuffix(RETURN_SUFFIX)
    path, colon, offs = loc.rpartition(":")
    if not colon or not path:
        raise spec_error(text, col, "the location is PATH:OFFSET")
    if not _NUMBER.match(offs):
        raise spec_error(text, col + len(path) + 1, f"offset '{offs}' is not a number")
    offset = int(offs, 0)
    event = event or f"p_{binary_tag(path)}_{offset:#x}"
    args = parse_fetchargs(text, rest[loc_end:], col + loc_end, retprobe)
    return ProbeSpec(
        text, f"{group}:{event}", path, None, 0, None,
        retprobe=retprobe, args=args, file_offset=offset,
    )


EVENTS_FILE_LIMIT = 4 << 20  # bytes: far more than any real uprobe_events file


def read_events_file(path: str) -> list[ProbeSpec]:
    """Every definition in a file of uprobe_events lines ('#' comments, blank
    lines skipped).  Read with a size limit (`--events /dev/zero` must not
    eat memory); it must be UTF-8 text without NUL bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(EVENTS_FILE_LIMIT + 1)
    except OSError as e:
        raise ProbeError(f"cannot read {path}: {e.strerror}") from e
    if len(raw) > EVENTS_FILE_LIMIT:
        raise ProbeError(f"{path}: larger than {EVENTS_FILE_LIMIT >> 20} MiB: not an events file")
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise ProbeError(f"{path}: line {line}: NUL byte (a binary file?)")
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        line, byte = raw[: e.start].count(b"\n") + 1, raw[e.start]
        raise ProbeError(f"{path}: line {line}: not UTF-8 text (byte {byte:#04x})") from None
    lines = text.splitlines()
    return [parse_uprobe_event(ln.strip()) for ln in lines if ln.strip() and not ln.startswith("#")]
