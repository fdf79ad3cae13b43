"""The FastPath executors: the commonest prologue instructions in pure Python.

Each is exact for the encodings decode.py hands it and nothing else.  They
operate on `UserRegs` and the tracee's memory directly, so the one thing they
must never do is a store that the CPU would have refused: /proc/PID/mem writes
ignore page protections, so every store is checked against the tracee's maps
first.  On refusal nothing has been changed.
"""

from __future__ import annotations

from collections.abc import Callable

from emuprobe.sys.maps import PROT_EXEC, PROT_READ, PROT_WRITE
from emuprobe.sys.memory import ProcessMemory
from emuprobe.sys.ptrace import UserRegs
from emuprobe.x86.decode import FastPath
from emuprobe.x86.regs import AF, ARITH_FLAGS, CF, MASK64, OF, PF, SF, ZF, canonical

_PARITY = tuple(PF if bin(i).count("1") % 2 == 0 else 0 for i in range(256))


def execute(plan: FastPath, regs: UserRegs, mem: ProcessMemory) -> str | None:
    """Apply `plan` to `regs` (RIP at the site) and the tracee's memory.

    Returns None when done, or the reason it refused (with nothing changed).
    """
    run = _OPS.get(plan.op)
    if run is None:  # pragma: no cover - decode.py produces no other op
        return f"unknown fast path {plan.op!r}"
    return run(plan, regs, mem, (regs.rip + plan.length) & MASK64)


# Each op: (plan, regs, memory, address of the next instruction) -> refusal or None.
# Registers change only after every check and store has succeeded.


def _nop(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    regs.rip = nxt
    return None


def _push(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    sp = (regs.rsp - 8) & MASK64
    value = getattr(regs, plan.src)  # push rsp pushes the old value
    reason = store(mem, sp, value.to_bytes(8, "little"))
    if reason is None:
        regs.rsp, regs.rip = sp, nxt
    return reason


def _mov(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    setattr(regs, plan.dst, getattr(regs, plan.src))
    regs.rip = nxt
    return None


def _add_sub_rsp(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    a, b = regs.rsp, plan.imm
    if plan.op == "add_rsp":
        full = a + b
        r = full & MASK64
        flags = CF if full >> 64 else 0
        flags |= OF if ((a ^ r) & (b ^ r)) >> 63 else 0
    else:
        r = (a - b) & MASK64
        flags = CF if a < b else 0
        flags |= OF if ((a ^ b) & (a ^ r)) >> 63 else 0
    flags |= _PARITY[r & 0xFF] | ((a ^ b ^ r) & AF) | (SF if r >> 63 else 0)
    flags |= ZF if r == 0 else 0
    regs.rsp = r
    regs.eflags = (regs.eflags & ~ARITH_FLAGS) | flags
    regs.rip = nxt
    return None


def _load(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    loaded = load(mem, address(plan, regs), plan.size)
    if isinstance(loaded, str):
        return loaded
    setattr(regs, plan.dst, int.from_bytes(loaded, "little"))  # 32-bit: zero-extended
    regs.rip = nxt
    return None


def _store(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    value = getattr(regs, plan.src) & ((1 << 8 * plan.size) - 1)
    reason = store(mem, address(plan, regs), value.to_bytes(plan.size, "little"))
    if reason is None:
        regs.rip = nxt
    return reason


def _target(plan: FastPath, nxt: int) -> int | str:
    """A relative branch's target, or why the CPU would fault on it."""
    target = (nxt + plan.imm) & MASK64
    return target if canonical(target) else f"branch to non-canonical {target:#x} (#GP)"


def _jmp(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    target = _target(plan, nxt)
    if isinstance(target, str):
        return target
    regs.rip = target
    return None


def _call(plan: FastPath, regs: UserRegs, mem: ProcessMemory, nxt: int) -> str | None:
    target = _target(plan, nxt)
    if isinstance(target, str):
        return target
    sp = (regs.rsp - 8) & MASK64
    reason = store(mem, sp, nxt.to_bytes(8, "little"))
    if reason is None:
        regs.rsp, regs.rip = sp, target
    return reason


_OPS: dict[str, Callable[[FastPath, UserRegs, ProcessMemory, int], str | None]] = {
    "nop": _nop, "push": _push, "mov": _mov, "add_rsp": _add_sub_rsp, "sub_rsp": _add_sub_rsp,
    "load": _load, "store": _store, "jmp": _jmp, "call": _call,
}  # fmt: skip


def address(plan: FastPath, regs: UserRegs) -> int:
    """The data address of a load/store plan, with RIP at the site."""
    base = regs.rip + plan.length if plan.base == "rip" else getattr(regs, plan.base)
    return (base + plan.imm) & MASK64


def check_access(mem: ProcessMemory, addr: int, size: int, write: bool) -> str | None:
    """Why the CPU would refuse (or we must not do) this access, or None.

    Stores to executable pages are refused too: they may hold our int3s, and
    self-modifying code goes native.  A non-canonical address is in no
    mapping, so it is refused (natively: #GP)."""
    kind = "store to" if write else "load from"
    end = addr + size
    a = addr
    while a < end:
        m = mem.region(a)
        if m is None:
            return f"{kind} unmapped address {a:#x}"
        if not m.prot & (PROT_WRITE if write else PROT_READ):
            return f"{kind} {'non-writable' if write else 'unreadable'} page at {a:#x}"
        if write and m.prot & PROT_EXEC:
            return f"{kind} executable page at {a:#x}"
        a = m.end
    return None


def load(mem: ProcessMemory, addr: int, size: int) -> bytes | str:
    """The `size` bytes the program would read at `addr`, or why it could not.

    Executable pages may hold our int3s: the program's own bytes are shown."""
    reason = check_access(mem, addr, size, write=False)
    if reason is not None:
        return reason
    try:
        data = mem.read(addr, size)
    except OSError as e:
        return f"load at {addr:#x} failed: {e}"
    if any(m.prot & PROT_EXEC for m in (mem.region(addr), mem.region(addr + size - 1)) if m):
        out = bytearray(data)
        for a, orig in mem.original_bytes_in(addr - 15, addr + size):
            for i, b in enumerate(orig):
                if 0 <= a + i - addr < size:
                    out[a + i - addr] = b
        data = bytes(out)
    return data


def store(mem: ProcessMemory, addr: int, data: bytes) -> str | None:
    """Write `data` at `addr` if the CPU would allow the store, else say why not."""
    reason = check_access(mem, addr, len(data), write=True)
    if reason is not None:
        return reason
    try:
        mem.write(addr, data)
    except OSError as e:
        return f"store at {addr:#x} failed: {e}"
    return None
