"""Fetch arguments at a hit, and print them exactly as the kernel's trace output does.

The kernel's print formats (kernel/trace/trace_probe.c): uN and bitfields `%u`,
sN `%d`, x8-x32 `0x%x`, x64 `0x%Lx`, strings `"%s"` or `(fault)` when the
memory cannot be read.  A numeric fetch that faults prints 0, as the kernel's
zero-filled record does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from emuprobe.spec.fetchargs import (
    Addr,
    Comm,
    Deref,
    Fetch,
    FetchArg,
    FetchType,
    Imm,
    Reg,
    Retval,
    Stack,
)
from emuprobe.sys.maps import PAGE

Value = int | str | None  # None: a string that could not be read
_MAX_STRING = 4096  # MAX_STRING_SIZE (PATH_MAX) in the kernel


class _Fault(Exception):
    pass


@dataclass(frozen=True)
class FetchContext:
    """What a fetch can see at one hit: registers, memory, the thread's name.

    `file_base` is the address at which offset 0 of the probed file is mapped,
    for `@+OFFSET` (the kernel's translate_user_vaddr).
    """

    reg: Callable[[str], int]  # user_regs_struct field name -> value
    read: Callable[[int, int], bytes]  # raises OSError when unmapped
    comm: str
    file_base: int


def fetch_all(args: tuple[FetchArg, ...], ctx: FetchContext) -> tuple[Value, ...]:
    return tuple(fetch_one(a, ctx) for a in args)


def fetch_one(arg: FetchArg, ctx: FetchContext) -> Value:
    f, t = arg.fetch, arg.type
    if t.kind == "string":
        if isinstance(f, Comm):
            return ctx.comm
        if isinstance(f, Imm):
            return str(f.value)
        try:
            return _read_string(ctx, _address(f, ctx))
        except _Fault:
            return None
    try:
        if isinstance(f, Deref | Addr):
            raw = int.from_bytes(_read(ctx, _address(f, ctx), t.size), "little")
        else:
            raw = _value(f, ctx)
    except _Fault:
        raw = 0
    return convert(raw, t)


def convert(raw: int, t: FetchType) -> int:
    """`raw` cut to the type's size (and sign, and bitfield)."""
    bits = t.size * 8
    v = raw & ((1 << bits) - 1)
    if t.kind == "bitfield":
        return (v >> t.bit_offset) & ((1 << t.bit_width) - 1)
    if t.kind == "s" and v >> (bits - 1):
        return v - (1 << bits)
    return v


def format_value(t: FetchType, value: Value) -> str:
    if t.kind == "string":
        return "(fault)" if value is None else f'"{value}"'
    assert isinstance(value, int)
    if t.kind == "x":
        return f"{value:#x}"
    return str(value)


def format_args(args: tuple[FetchArg, ...], values: tuple[Value, ...]) -> str:
    """`name=value ...` as the kernel's trace output shows them."""
    pairs = zip(args, values, strict=True)
    return " ".join(f"{a.name}={format_value(a.type, v)}" for a, v in pairs)


def _value(f: Fetch, ctx: FetchContext) -> int:
    """The 64-bit value of a fetch (memory references are read as a pointer)."""
    if isinstance(f, Reg):
        return ctx.reg(f.field)
    if isinstance(f, Retval):
        return ctx.reg("rax")
    if isinstance(f, Imm):
        return f.value if isinstance(f.value, int) else 0
    if isinstance(f, Stack):
        sp = ctx.reg("rsp")
        if f.index is None:
            return sp
        return int.from_bytes(_read(ctx, sp + 8 * f.index, 8), "little")
    if isinstance(f, Deref | Addr):
        return int.from_bytes(_read(ctx, _address(f, ctx), 8), "little")
    raise _Fault()  # $comm has no numeric value (the parser forbids it)


def _address(f: Fetch, ctx: FetchContext) -> int:
    if isinstance(f, Addr):
        return ctx.file_base + f.value if f.file_relative else f.value
    if isinstance(f, Deref):
        return (_value(f.inner, ctx) + f.offset) & ((1 << 64) - 1)
    raise _Fault()


def _read(ctx: FetchContext, addr: int, n: int) -> bytes:
    try:
        return ctx.read(addr, n)
    except (OSError, OverflowError, ValueError):
        raise _Fault() from None


def _read_string(ctx: FetchContext, addr: int) -> str:
    out = b""
    while len(out) < _MAX_STRING:
        # Page by page: the string may end just before an unmapped page.
        n = min(PAGE - (addr + len(out)) % PAGE, 256, _MAX_STRING - len(out))
        chunk = _read(ctx, addr + len(out), n)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return (out + chunk[:nul]).decode("utf-8", "replace")
        out += chunk
    return out[: _MAX_STRING - 1].decode("utf-8", "replace")
