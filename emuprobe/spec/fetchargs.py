"""The kernel's fetch-argument grammar (Documentation/trace/uprobetracer.rst), parsed purely.

    FETCHARG := [NAME=]BODY[:TYPE]
    BODY     := %REG | @ADDR | @+OFFSET | $stackN | $stack | $retval | $comm
              | +|-[u]OFFS(BODY) | \\IMM | \\"STRING"
    TYPE     := u8..u64 | s8..s64 | x8..x64 | string | ustring | b<width>@<offset>/<container>

Register names are the kernel's (`%di`, `%ax`, `%r8`, `%sp`, `%ip`, `%flags`),
not the assembler's (`%rdi`): the same text must be accepted by tracefs and by
`perf probe`.  An unnamed argument is called `argN` after its 1-based position,
as the kernel names it.  Errors quote the whole spec and name the column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emuprobe.errors import spec_error

# The kernel's regoffset_table (arch/x86/kernel/ptrace.c) -> user_regs_struct field.
REGISTERS: dict[str, str] = {
    **{f"r{i}": f"r{i}" for i in range(8, 16)},
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx", "si": "rsi", "di": "rdi",
    "bp": "rbp", "sp": "rsp", "ip": "rip", "flags": "eflags", "orig_ax": "orig_rax",
    "cs": "cs", "ss": "ss",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)\Z")
_BITFIELD = re.compile(r"b([0-9]+)@([0-9]+)/([0-9]+)\Z")
_MAX_NESTING = 16  # FETCH_INSN_MAX: the kernel refuses deeper derefs


# -- the parsed form --------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    name: str  # kernel name, e.g. "di"

    @property
    def field(self) -> str:
        return REGISTERS[self.name]


@dataclass(frozen=True)
class Addr:
    value: int
    file_relative: bool  # @+OFFSET: an offset in the probed file, not an address


@dataclass(frozen=True)
class Stack:
    index: int | None  # $stackN; None: $stack, the stack pointer itself


@dataclass(frozen=True)
class Retval:
    pass


@dataclass(frozen=True)
class Comm:
    pass


@dataclass(frozen=True)
class Imm:
    value: int | str


@dataclass(frozen=True)
class Deref:
    offset: int
    inner: Fetch


Fetch = Reg | Addr | Stack | Retval | Comm | Imm | Deref


@dataclass(frozen=True)
class FetchType:
    name: str  # as written (or the default), e.g. "x64", "string", "b3@2/8"
    kind: str  # "u", "s", "x", "string" or "bitfield"
    size: int  # bytes read (the container for a bitfield; 0 for strings)
    bit_width: int = 0
    bit_offset: int = 0


@dataclass(frozen=True)
class FetchArg:
    name: str
    fetch: Fetch
    type: FetchType
    text: str  # the argument as written


DEFAULT_TYPE = FetchType("x64", "x", 8)
STRING_TYPE = FetchType("string", "string", 0)


def _sized(name: str) -> FetchType | None:
    kind, bits = name[:1], name[1:]
    if kind in ("u", "s", "x") and bits in ("8", "16", "32", "64"):
        return FetchType(name, kind, int(bits) // 8)
    return None


# -- parsing -------------------------------------------------------------------------


def parse_fetchargs(
    text: str, args_text: str, column: int, retprobe: bool
) -> tuple[FetchArg, ...]:
    """Parse the space-separated FETCHARGS `args_text`, found at `column` of `text`.

    `retprobe` allows $retval.  Raises ProbeError quoting `text`.
    """
    args: list[FetchArg] = []
    names: set[str] = set()
    for m in re.finditer(r"\S+", args_text):
        arg = parse_fetcharg(text, m.group(), column + m.start(), len(args) + 1, retprobe)
        if arg.name in names:
            raise spec_error(text, column + m.start(), f"argument name '{arg.name}' used twice")
        names.add(arg.name)
        args.append(arg)
    return tuple(args)


def parse_fetcharg(text: str, arg: str, column: int, position: int, retprobe: bool) -> FetchArg:
    """One FETCHARG `arg` at `column` of `text`; unnamed, it is called arg<position>."""
    name, body, col = f"arg{position}", arg, column
    eq = arg.find("=")
    if eq >= 0 and not arg.startswith("\\"):
        name, body, col = arg[:eq], arg[eq + 1 :], column + eq + 1
        if not _NAME.match(name):
            raise spec_error(text, column, f"argument name '{name}' must be an identifier")
    type_text = None
    # The type follows the first ':' outside an immediate string.
    colon = -1 if body.startswith('\\"') else body.find(":")
    if colon >= 0:
        body, type_text = body[:colon], body[colon + 1 :]
    if not body:
        raise spec_error(text, col, "missing fetch argument")
    fetch = _parse_body(text, body, col, retprobe, 0)
    ftype = _parse_type(text, type_text, col + colon + 1, fetch)
    return FetchArg(name, fetch, ftype, arg)


def _parse_body(text: str, body: str, col: int, retprobe: bool, depth: int) -> Fetch:
    c = body[0]
    if c == "%":
        reg = body[1:]
        if reg not in REGISTERS:
            hint = f"; did you mean %{reg[1:]}?" if reg[1:] in REGISTERS else ""
            raise spec_error(
                text, col, f"unknown register '%{reg}' (the kernel's names: %di, %ax, %r8...{hint})"
            )
        return Reg(reg)
    if c == "@":
        rel = body.startswith("@+")
        num = body[2:] if rel else body[1:]
        if not _INT.match(num) or num[0] in "+-":
            raise spec_error(text, col + 1, f"'{num}' is not an address (symbols need perf probe)")
        return Addr(_in_range(text, col + 1, num, 0, _U64_MAX, "address"), rel)
    if c == "$":
        return _parse_var(text, body, col, retprobe)
    if c == "\\":
        return _parse_imm(text, body, col)
    if c in "+-":
        return _parse_deref(text, body, col, retprobe, depth)
    if _NAME.match(body):
        raise spec_error(
            text, col, f"'{body}' looks like a local variable, which needs DWARF; use a register"
        )
    raise spec_error(text, col, f"'{body}' is not a fetch argument")


_U64_MAX, _S64_MIN, _S64_MAX = (1 << 64) - 1, -(1 << 63), (1 << 63) - 1
_MAX_STACK_INDEX = 4096 // 8 - 1


def _in_range(text: str, col: int, number: str, lo: int, hi: int, what: str) -> int:
    """`number` parsed, refused (as the kernel refuses it) outside [lo, hi]."""
    value = int(number, 0)
    if not lo <= value <= hi:
        raise spec_error(text, col, f"{what} {number} out of range ({lo:#x}..{hi:#x})")
    return value


def _parse_var(text: str, body: str, col: int, retprobe: bool) -> Fetch:
    if body == "$retval":
        if not retprobe:
            raise spec_error(text, col, "$retval is only valid in a return probe")
        return Retval()
    if body == "$comm":
        return Comm()
    if body == "$stack":
        return Stack(None)
    if body.startswith("$stack") and body[6:].isdigit():
        # the kernel's PARAM_MAX_STACK: the entries of one page of stack
        return Stack(_in_range(text, col, body[6:], 0, _MAX_STACK_INDEX, "$stack index"))
    raise spec_error(text, col, f"unknown variable '{body}' ($stackN, $stack, $retval, $comm)")


def _parse_imm(text: str, body: str, col: int) -> Fetch:
    value = body[1:]
    if value.startswith('"'):
        if len(value) < 2 or not value.endswith('"'):
            raise spec_error(text, col + 1, "unterminated immediate string")
        return Imm(value[1:-1])
    if not _INT.match(value):
        raise spec_error(text, col + 1, f"immediate '{value}' is not a number")
    return Imm(_in_range(text, col + 1, value, _S64_MIN, _U64_MAX, "immediate"))


def _parse_deref(text: str, body: str, col: int, retprobe: bool, depth: int) -> Fetch:
    if depth >= _MAX_NESTING:
        raise spec_error(text, col, f"more than {_MAX_NESTING} nested dereferences")
    paren = body.find("(")
    if paren < 0 or not body.endswith(")"):
        raise spec_error(text, col, "a dereference is +|-OFFS(FETCHARG)")
    offs = body[1:paren]
    if offs.startswith("u"):  # user-memory deref: all a uprobe can read anyway
        offs = offs[1:]
    if not _INT.match(offs) or offs[0] in "+-":
        raise spec_error(text, col + 1, f"offset '{offs}' is not a number")
    offset = _in_range(text, col, body[0] + offs, _S64_MIN, _S64_MAX, "offset")
    inner = body[paren + 1 : -1]
    if not inner:
        raise spec_error(text, col + paren + 1, "missing fetch argument inside ()")
    if inner[0] in "\\" or inner == "$comm":
        raise spec_error(text, col + paren + 1, f"cannot dereference '{inner}'")
    return Deref(offset, _parse_body(text, inner, col + paren + 1, retprobe, depth + 1))


def _parse_type(text: str, name: str | None, col: int, fetch: Fetch) -> FetchType:
    is_string_source = isinstance(fetch, Comm) or (
        isinstance(fetch, Imm) and isinstance(fetch.value, str)
    )
    if name is None:
        return STRING_TYPE if is_string_source else DEFAULT_TYPE
    if name in ("string", "ustring"):
        # The kernel reads strings only through memory (or $comm, \"imm").
        if not (is_string_source or isinstance(fetch, Deref | Addr)):
            raise spec_error(text, col, "string needs a memory reference, e.g. +0(%di):string")
        return FetchType(name, "string", 0)
    if is_string_source:
        raise spec_error(text, col, f"'{name}' cannot hold a string; use :string")
    sized = _sized(name)
    if sized is not None:
        return sized
    m = _BITFIELD.match(name)
    if m:
        width, offset, container = (int(g) for g in m.groups())
        if container not in (8, 16, 32, 64) or width < 1 or width + offset > container:
            raise spec_error(text, col, f"bad bitfield '{name}' (width+offset <= 8/16/32/64)")
        return FetchType(name, "bitfield", container // 8, width, offset)
    raise spec_error(
        text, col, f"unknown type '{name}' (u8-64, s8-64, x8-64, string, b<w>@<o>/<c>)"
    )
