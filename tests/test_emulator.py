"""The emulator against the CPU: every emulated instruction is compared with a
native PTRACE_SINGLESTEP of the same bytes from the same state, in the native
oracle's sandbox (emuprobe/difftest/oracle.py).  Nothing here mocks ptrace.

These tables pin behaviour the engine relies on whether or not a class is in
the trust table, so plans come from `plan()` (trust bypassed); the trust gate
itself is tested in tests/test_difftest.py.
"""

from __future__ import annotations

import ctypes
import random
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INTR,
    UC_HOOK_MEM_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as ucx

from emuprobe.difftest.oracle import CODE, DATA, DATA_LEN, RO, Input, PtraceFp, Sandbox
from emuprobe.exec import cmachine
from emuprobe.exec.execute import Emulated, Emulator, Refused
from emuprobe.sys import ptrace as pt
from emuprobe.sys.memory import ProcessMemory
from emuprobe.x86 import policy
from emuprobe.x86.decode import FastPath, NativeStep, Plan, UnicornStep, analyze, describe
from emuprobe.x86.regs import AF, ARITH_FLAGS, CF, EMULATED_FLAGS, GPR_NAMES, GPRS, OF, PF, SF, ZF

SITE = CODE + 0x100
STACK = DATA + 0x2000
TARGET = CODE + 0x800  # where ret / call [mem] / jmp reg go

def plan_for(code: bytes, addr: int, **kw: bool) -> Plan:
    """analyze() with the trust table bypassed (see the module docstring)."""
    return analyze(code, addr, trusted_only=False, **kw)


UNDEF_MUL = SF | ZF | AF | PF
UNDEF_ALL = ARITH_FLAGS


def rel32(target: int, insn_end: int) -> bytes:
    return struct.pack("<i", target - insn_end)


def rip_rel(prefix: str, target: int, tail: str = "") -> str:
    """`prefix` + disp32 reaching `target` from SITE, + `tail` (an imm)."""
    n = len(bytes.fromhex(prefix)) + 4 + len(bytes.fromhex(tail))
    return prefix + rel32(target, SITE + n).hex() + tail


@dataclass
class State:
    code: bytes
    regs: dict[str, int] = field(default_factory=dict)
    eflags: int = 0x202
    xmm: dict[int, bytes] = field(default_factory=dict)
    mxcsr: int = 0x1F80
    data: bytes = b""
    site: int = SITE
    planted: dict[int, bytes] = field(default_factory=dict)  # other sites: addr -> original


def default_regs() -> dict[str, int]:
    rng = random.Random(7)
    regs = {n: rng.getrandbits(64) for n in GPR_NAMES}
    regs.update(rdi=DATA + 0x100, rsi=DATA + 0x200, rbx=DATA + 0x300, rbp=STACK + 0x100)
    regs.update(rsp=STACK, rcx=5, rdx=0, fs_base=DATA + 0x800)  # fs:[0x28] is in DATA
    return regs


def default_data() -> bytes:
    rng = random.Random(11)
    data = bytearray(rng.getrandbits(8) for _ in range(DATA_LEN))
    data[STACK - DATA : STACK - DATA + 8] = TARGET.to_bytes(8, "little")  # for ret
    data[0x40:0x48] = TARGET.to_bytes(8, "little")  # for call/jmp [DATA+0x40]
    return bytes(data)


@dataclass
class Snapshot:
    regs: pt.UserRegs
    fp: pt.UserFpRegs
    memory: bytes


class Tracee:
    """The native oracle's sandbox (emuprobe/difftest/oracle.py), driven from a State."""

    def __init__(self) -> None:
        self.sb = Sandbox()
        self.pid = self.sb.pid
        self.mem = self.sb.mem

    def kill(self) -> None:
        self.sb.close()

    def input(self, st: State) -> Input:
        regs = self.sb.base_regs()
        for name, value in {**default_regs(), **st.regs}.items():
            setattr(regs, name, value)
        regs.eflags = st.eflags
        fp = self.sb.base_fp()
        for i in range(16):
            xmm = st.xmm.get(i, bytes((i * 16 + j) & 0xFF for j in range(16)))
            ctypes.memmove(ctypes.addressof(fp.xmm_space) + 16 * i, xmm, 16)
        fp.mxcsr = st.mxcsr
        return Input(st.code, regs, fp, st.data or default_data(), st.site, st.planted)

    def apply(self, st: State, planted: bool) -> None:
        self.sb.load(self.input(st), planted)

    def snapshot(self) -> Snapshot:
        o = self.sb.snapshot()
        return Snapshot(o.regs, o.fp, o.memory)

    def native(self, st: State, rep: bool = False) -> tuple[int, Snapshot]:
        """Single-step `st.code` natively (a rep string op: until it leaves
        the site, as the emulator runs it to completion); SIGTRAP if it completed."""
        o = self.sb.run_native(self.input(st), rep)
        return o.signal or signal.SIGTRAP, Snapshot(o.regs, o.fp, o.memory)

    def emulate(
        self, emu: Emulator, st: State, plan: Plan
    ) -> tuple[Emulated | Refused, Snapshot, PtraceFp]:
        fp = self.sb.fp = PtraceFp(self.pid)
        result, o = self.sb.run_engine(self.input(st), plan, emu)
        return result, Snapshot(o.regs, o.fp, o.memory), fp


@pytest.fixture(scope="module")
def tracee() -> Iterator[Tracee]:
    t = Tracee()
    yield t
    t.kill()


@pytest.fixture(scope="module", params=[True, False], ids=["machine.c", "machine.py"])
def emu(request: pytest.FixtureRequest) -> Emulator:
    """Both Unicorn machines: the compiled one the engine uses when it is built,
    and the pure-Python fallback."""
    if request.param and cmachine.compiled_module() is None:
        pytest.skip("the compiled machine is not built")
    return Emulator(compiled=request.param)


def assert_same(native: Snapshot, emulated: Snapshot, undefined: int, fp: bool) -> None:
    for name in (*GPR_NAMES, "rip", "fs_base", "gs_base"):
        n, e = getattr(native.regs, name), getattr(emulated.regs, name)
        assert n == e, f"{name}: native {n:#x} emulated {e:#x}"
    mask = EMULATED_FLAGS & ~undefined
    n, e = native.regs.eflags & mask, emulated.regs.eflags & mask
    assert n == e, f"eflags: native {n:#x} emulated {e:#x} (mask {mask:#x})"
    assert native.memory == emulated.memory, "memory differs"
    if fp:
        assert bytes(native.fp.xmm_space) == bytes(emulated.fp.xmm_space), "xmm differs"
        assert native.fp.mxcsr == emulated.fp.mxcsr, "mxcsr differs"


def difftest(
    tracee: Tracee, emu: Emulator, st: State, undefined: int = 0, plan: Plan | None = None
) -> Plan:
    plan = plan or plan_for(st.code, st.site)
    sig, native = tracee.native(st, rep=isinstance(plan, UnicornStep) and plan.rep)
    assert sig == signal.SIGTRAP, f"native step of {describe(plan)} raised signal {sig}"
    result, emulated, fp = tracee.emulate(emu, st, plan)
    assert isinstance(result, Emulated), f"{describe(plan)}: {result}"
    assert_same(native, emulated, undefined, fp=isinstance(plan, UnicornStep) and plan.needs_fp)
    assert result.fp_written == (fp.sets > 0)
    return plan


# --- FastPath --------------------------------------------------------------

FAST = [
    ("push rbp", "55", {}, 0x202),
    ("push r12", "4154", {}, 0x202),
    ("push rsp", "54", {}, 0x202),
    ("mov rbp,rsp", "4889e5", {}, 0x202),
    ("mov rbp,rsp (8b)", "488bec", {}, 0x202),
    ("mov r8,r9", "4d89c8", {}, 0x202),
    ("sub rsp,0x10", "4883ec10", {}, 0x202),
    ("sub rsp,0x1000", "4881ec00100000", {}, 0xA47),
    ("sub rsp,-8", "4883ecf8", {}, 0x202),
    ("sub rsp borrow", "4883ec10", {"rsp": 8}, 0x202),
    ("sub rsp to zero", "4883ec10", {"rsp": 0x10}, 0x202),
    ("sub rsp overflow", "4883ec10", {"rsp": 1 << 63}, 0x202),
    ("add rsp,8", "4883c408", {}, 0x202),
    ("add rsp carry", "4883c410", {"rsp": (1 << 64) - 8}, 0x202),
    ("add rsp overflow", "4883c410", {"rsp": (1 << 63) - 8}, 0x202),
    ("add rsp af", "4883c40f", {"rsp": 0x1001}, 0x202),
    ("nop", "90", {}, 0x202),
    ("nop dword", "0f1f4000", {}, 0x202),
    ("nop word cs", "662e0f1f840000000000", {}, 0x202),
    ("endbr64", "f30f1efa", {}, 0x202),
    ("jmp rel8", "eb10", {}, 0x202),
    ("jmp self", "ebfe", {}, 0x202),
    ("jmp rel32", "e900010000", {}, 0x202),
    ("bnd jmp", "f2e900010000", {}, 0x202),
    ("call rel32", "e800010000", {}, 0x202),
    ("call back", "e8f0feffff", {}, 0x202),
    ("load r64,[rip+d]", rip_rel("488b05", DATA + 0x48), {}, 0x202),
    ("load r32,[rip+d] zero-extends", rip_rel("8b05", DATA + 0x4C), {"rax": (1 << 64) - 1}, 0x202),
    ("load r13,[rbp+8]", "4c8b6d08", {"rbp": DATA + 0x40}, 0x202),
    ("load rsp,[rsp]", "488b2424", {}, 0x202),
    ("load across a page", "488b4001", {"rax": DATA + 0xFFB}, 0x202),
    ("store [rsp-8],rdi", "48897c24f8", {}, 0x202),
    ("store [rbp-0x14],edi", "897dec", {"rbp": DATA + 0x80, "rdi": 0x1122334455667788}, 0x202),
    ("store [rip+d],r9", rip_rel("4c890d", DATA + 0x50), {}, 0x202),
    ("store [rsp],rsp", "48892424", {}, 0x202),
]


@pytest.mark.parametrize("hexcode,regs,eflags", [c[1:] for c in FAST], ids=[c[0] for c in FAST])
def test_fast_path_matches_cpu(
    tracee: Tracee, emu: Emulator, hexcode: str, regs: dict[str, int], eflags: int
) -> None:
    st = State(bytes.fromhex(hexcode), regs=regs, eflags=eflags)
    plan = plan_for(st.code, SITE)
    assert isinstance(plan, FastPath), describe(plan)
    difftest(tracee, emu, st, plan=plan)
    # the same instruction through Unicorn must agree too
    difftest(tracee, emu, st, plan=plan_for(st.code, SITE, fast=False))


# --- UnicornStep -----------------------------------------------------------

UNICORN = [
    ("rip-relative load", rip_rel("488b05", DATA + 0x48), {}, 0x202, 0),
    ("rip-relative load of itself", "8b05faffffff", {}, 0x202, 0),
    ("rip-relative store", rip_rel("48890d", DATA + 0x50), {}, 0x202, 0),
    ("stack store", "48897c2408", {}, 0x202, 0),
    ("push [rip]", rip_rel("ff35", DATA + 0x40), {}, 0x202, 0),
    ("pop rbx", "5b", {}, 0x202, 0),
    ("leave", "c9", {}, 0x202, 0),
    ("ret", "c3", {}, 0x202, 0),
    ("ret 8", "c20800", {}, 0x202, 0),
    ("call [rip]", rip_rel("ff15", DATA + 0x40), {}, 0x202, 0),
    ("call rax", "ffd0", {"rax": TARGET}, 0x202, 0),
    ("jmp rax", "ffe0", {"rax": TARGET}, 0x202, 0),
    ("je taken", "7410", {}, 0x246, 0),
    ("je not taken", "7410", {}, 0x202, 0),
    ("jne rel32 taken", "0f8500010000", {}, 0x202, 0),
    ("jne rel32 not taken", "0f8500010000", {}, 0x246, 0),
    ("loop", "e2fe", {"rcx": 5}, 0x202, 0),
    ("jrcxz", "e3fe", {"rcx": 0}, 0x202, 0),
    ("fs load", "64488b042528000000", {}, 0x202, 0),
    ("add", "4801d8", {}, 0x202, 0),
    ("adc", "4811d8", {}, 0x203, 0),
    ("imul", "480fafc3", {}, 0x202, UNDEF_MUL),
    ("mul", "48f7e1", {}, 0x202, UNDEF_MUL),
    ("div", "48f7f1", {"rax": 1000, "rdx": 0, "rcx": 7}, 0x202, UNDEF_ALL),
    ("cqo", "4899", {}, 0x202, 0),
    ("movzx eax,ah", "0fb6c4", {}, 0x202, 0),
    ("mov ah,bl", "88dc", {}, 0x202, 0),
    ("xor eax,eax", "31c0", {}, 0x202, 0),
    ("lea", "488d448b08", {}, 0x202, 0),
    ("cmove", "480f44c1", {}, 0x246, 0),
    ("sete", "0f94c0", {}, 0x246, 0),
    ("shl rax,cl", "48d3e0", {"rcx": 3}, 0x202, AF | OF),
    ("bt", "480fa3c8", {}, 0x202, OF | SF | AF | PF),
    ("bsf", "480fbcc1", {"rcx": 0x80}, 0x202, CF | OF | SF | AF | PF),
    ("tzcnt", "f3480fbcc1", {"rcx": 0x80}, 0x202, OF | SF | AF | PF),
    ("popcnt", "f3480fb8c1", {}, 0x202, 0),
    ("xadd", "480fc1c8", {}, 0x202, 0),
    ("cmpxchg equal", "480fb10f", {"rax": 0}, 0x202, 0),
    ("cmpxchg differ", "480fb10f", {"rax": 1}, 0x202, 0),
    ("xchg reg", "4891", {}, 0x202, 0),
    ("bswap", "480fc8", {}, 0x202, 0),
    ("andn", "c4e2f0f2c1", {}, 0x202, AF | PF),
    ("shlx", "c4e2f1f7c0", {}, 0x202, 0),
    ("pext", "c4e2f2f5c0", {}, 0x202, 0),
    ("rorx", "c4e3fbf0c108", {}, 0x202, 0),
    ("movbe", "480f38f007", {}, 0x202, 0),
    ("crc32", "f2480f38f1c1", {}, 0x202, 0),
    ("std", "fd", {}, 0x202, 0),
    ("cld", "fc", {}, 0x602, 0),
    ("lahf", "9f", {}, 0x2D7, 0),
    ("sahf", "9e", {"rax": 0xD500}, 0x202, 0),
    ("movsb", "a4", {}, 0x202, 0),
    ("movsb backwards", "a4", {}, 0x602, 0),
    ("rep stosb", "f3aa", {"rcx": 37}, 0x202, 0),
    ("rep movsq", "f348a5", {"rcx": 3}, 0x202, 0),
    ("rep stosq zero count", "f348ab", {"rcx": 0}, 0x202, 0),
    ("repne scasb", "f2ae", {"rcx": 300, "rax": 0}, 0x202, 0),
    ("movaps load", "0f2807", {}, 0x202, 0),
    ("movaps store", "0f29442410", {}, 0x202, 0),
    ("movups unaligned", "0f104f01", {}, 0x202, 0),
    ("movdqa", "660f6f07", {}, 0x202, 0),
    ("pxor", "660fefc1", {}, 0x202, 0),
    ("movq rax,xmm0", "66480f7ec0", {}, 0x202, 0),
    ("movd xmm0,eax", "660f6ec0", {}, 0x202, 0),
    ("pshufd", "660f70c11b", {}, 0x202, 0),
    ("paddd", "660ffec1", {}, 0x202, 0),
    ("stmxcsr", "0fae5c2408", {}, 0x202, 0),
]


@pytest.mark.parametrize(
    "hexcode,regs,eflags,undefined", [c[1:] for c in UNICORN], ids=[c[0] for c in UNICORN]
)
def test_unicorn_step_matches_cpu(
    tracee: Tracee, emu: Emulator, hexcode: str, regs: dict[str, int], eflags: int, undefined: int
) -> None:
    st = State(bytes.fromhex(hexcode), regs=regs, eflags=eflags)
    plan = plan_for(st.code, SITE, fast=False)  # some of these have a FastPath too
    assert isinstance(plan, UnicornStep), describe(plan)
    difftest(tracee, emu, st, undefined, plan)


def test_branch_to_unmapped_page_completes(tracee: Tracee, emu: Emulator) -> None:
    """The next fetch is the next instruction's business: natively the branch
    completes and traps at the target; the emulator sees Unicorn's fetch fail."""
    far = 0x7E0000001000
    difftest(tracee, emu, State(bytes.fromhex("ffe0"), regs={"rax": far}))  # jmp rax
    data = bytearray(default_data())
    data[STACK - DATA : STACK - DATA + 8] = far.to_bytes(8, "little")
    difftest(tracee, emu, State(bytes.fromhex("c3"), data=bytes(data)))  # ret


def test_branch_to_non_canonical_is_refused(tracee: Tracee, emu: Emulator) -> None:
    st = State(bytes.fromhex("ffe0"), regs={"rax": 1 << 47})  # jmp rax: #GP at the jmp
    assert tracee.native(st)[0] == signal.SIGSEGV
    assert "non-canonical" in assert_refused(tracee, emu, st, plan_for(st.code, SITE)).reason


@pytest.mark.parametrize(
    "hexcode,site",
    [
        ("4801d8", CODE + 0x1000 - 3),  # ends a page: the stop byte is on the next
        ("4801d8", CODE + 0x2000 - 3),  # ... which the tracee does not have
        ("488b07", CODE + 0x1000 - 1),  # crosses into the next page
        ("488b07", CODE + 0x1000 - 2),
        ("48897c2408", CODE + 0x1000 - 4),
        ("c3", CODE + 0x1000 - 1),
        ("7410", CODE + 0x1000 - 2),
    ],
)
def test_instruction_at_page_end(tracee: Tracee, emu: Emulator, hexcode: str, site: int) -> None:
    difftest(tracee, emu, State(bytes.fromhex(hexcode), site=site, eflags=0x246))


def test_rep_at_page_end(tracee: Tracee, emu: Emulator) -> None:
    difftest(tracee, emu, State(bytes.fromhex("f3aa"), site=CODE + 0x1000 - 2))
    difftest(tracee, emu, State(bytes.fromhex("f3aa"), site=CODE + 0x2000 - 2))  # no next page


def test_reads_see_other_sites_original_bytes(tracee: Tracee, emu: Emulator) -> None:
    other = SITE + 0x20
    code = bytes.fromhex("8b05") + rel32(other, SITE + 6)  # mov eax, [other]
    difftest(tracee, emu, State(code, planted={other: b"\x55"}))


def test_store_across_a_page_boundary(tracee: Tracee, emu: Emulator) -> None:
    difftest(tracee, emu, State(bytes.fromhex("48893e"), regs={"rsi": DATA + 0xFFC}))
    difftest(tracee, emu, State(bytes.fromhex("0f1147fd"), regs={"rdi": DATA + 0x1000}))


def test_sse_arithmetic_runs_on_the_host_cpu_and_why(tracee: Tracee, emu: Emulator) -> None:
    """addsd xmm0, xmm1 is not given to Unicorn, which computes the sum but
    never sets MXCSR's exception flags: the tracer's own CPU runs it (FastPath
    "sse").  With a memory operand it goes native; with an exception unmasked
    it is refused, so that the tracee, not the tracer, takes the #XM."""
    code = bytes.fromhex("f20f58c1")  # addsd xmm0, xmm1
    plan = plan_for(code, SITE)
    assert isinstance(plan, FastPath) and plan.op == "sse", describe(plan)
    xmm = {0: struct.pack("<dd", 1.0, 7.0), 1: struct.pack("<dd", 2.0**-60, 9.0)}
    difftest(tracee, emu, State(code, xmm=xmm, mxcsr=0x1F80), plan=plan)  # sets PE
    forced = plan_for(code, SITE, fast=False, policy_check=False)
    assert isinstance(forced, UnicornStep) and forced.needs_fp and forced.xmm == (0, 1)
    # with every flag already set (sticky) Unicorn agrees, which proves its XMM round trip
    difftest(tracee, emu, State(code, xmm=xmm, mxcsr=0x1FBF), plan=forced)
    # the measured Unicorn 2.1.4 behaviour the policy rests on
    st = State(code, xmm=xmm, mxcsr=0x1F80)
    _, native = tracee.native(st)
    _, emulated, _ = tracee.emulate(emu, st, forced)
    assert bytes(native.fp.xmm_space) == bytes(emulated.fp.xmm_space)
    assert native.fp.mxcsr & 0x20 and not emulated.fp.mxcsr & 0x20  # PE: inexact
    memory = plan_for(bytes.fromhex("f20f5807"), SITE)  # addsd xmm0, [rdi]
    assert isinstance(memory, NativeStep) and memory.reason == policy.SSE_FP
    unmasked = State(code, xmm=xmm, mxcsr=0x1F80 & ~0x1000)  # PE unmasked: #XM natively
    assert "unmasks" in assert_refused(tracee, emu, unmasked, plan).reason


def host_sse_encodings() -> list[bytes]:
    """Every policy.HOST_SSE mnemonic in register form, low and high registers."""
    out: dict[str, list[bytes]] = {}
    for pfx in (b"", b"\x66", b"\xf2", b"\xf3"):
        for rex in (b"", b"\x45"):
            for op in (*range(0x50, 0x80), 0xE6):
                for modrm in (0xC1, 0xD2):  # xmm0,xmm1 / xmm2,xmm2 (aliased)
                    raw = pfx + rex + bytes([0x0F, op, modrm])
                    plan = plan_for(raw, SITE)
                    if isinstance(plan, FastPath) and plan.op == "sse":
                        out.setdefault(plan.mnemonic, []).append(raw)
    return [c for codes in out.values() for c in codes]


INF, NAN = float("inf"), float("nan")
F64_EDGES = (0.0, -0.0, 1.0, -1.5, 0.1, 3.0, 1e308, -1e-310, INF, -INF, NAN, 2.0**-1030, 2.0**31)
F32_EDGES = (0.0, -0.0, 1.0, -1.5, 0.1, 3.0, 3e38, -1e-40, INF, -INF, NAN, 1e-45, 2.0**31)


@pytest.mark.parametrize("mxcsr", [0x1F80, 0x3F80, 0x5F80, 0x7F80, 0x9FC0], ids=hex)
def test_host_sse_matches_cpu(tracee: Tracee, emu: Emulator, mxcsr: int) -> None:
    """Every host-run mnemonic, under each rounding mode and with FTZ+DAZ, on
    edge values (denormals, infinities, NaNs) and random ones: XMM and MXCSR
    (the exception flags Unicorn does not set) equal the CPU's."""
    rng = random.Random(mxcsr)
    encodings = host_sse_encodings()
    assert {plan_for(c, SITE).mnemonic for c in encodings} == set(policy.HOST_SSE)
    for code in encodings:
        for trial in range(3):
            if trial == 2:
                xmm = {i: rng.randbytes(16) for i in range(16)}
            else:
                xmm = {
                    i: struct.pack("<dd", rng.choice(F64_EDGES), rng.choice(F64_EDGES))
                    if trial else struct.pack("<ffff", *(rng.choice(F32_EDGES) for _ in range(4)))
                    for i in range(16)
                }
            difftest(tracee, emu, State(code, xmm=xmm, mxcsr=mxcsr))


def sse_safe_encodings() -> list[bytes]:
    """Register (distinct and aliased), memory, and /digit forms of every legacy
    encoding whose mnemonic policy.SSE_SAFE allows, at most 8 per mnemonic."""
    per: dict[str, list[bytes]] = {}
    for pfx in (b"", b"\x66", b"\xf2", b"\xf3"):
        for rex in (b"", b"\x48"):
            for esc in (b"\x0f", b"\x0f\x38", b"\x0f\x3a"):
                for op in range(256):
                    for modrm in (0xC1, 0xC9, 0x07, 0xF9, 0xD9, 0xF8, 0xE8, 0xF0):
                        raw = pfx + rex + esc + bytes([op, modrm, 0x1B])
                        plan = plan_for(raw, SITE)
                        if isinstance(plan, UnicornStep) and plan.mnemonic in policy.SSE_SAFE:
                            forms = per.setdefault(plan.mnemonic, [])
                            if len(forms) < 8:
                                forms.append(raw[: plan.length])
    return [code for forms in per.values() for code in forms]


EDGY = (0, 1, 0x7F, 0x80, 0xFF)


def test_sse_safe_list_matches_cpu(tracee: Tracee, emu: Emulator) -> None:
    rng = random.Random(5)
    encodings = sse_safe_encodings()
    assert len({plan_for(c, SITE).mnemonic for c in encodings}) > 150
    for code in encodings:
        for trial in range(2):
            regs = {n: DATA + 0x1000 + 16 * rng.randrange(0x100) for n in GPR_NAMES}
            regs.update(rax=rng.getrandbits(64), rcx=rng.getrandbits(64), rdx=rng.getrandbits(64))
            if trial:
                xmm = {i: rng.randbytes(16) for i in range(16)}
            else:  # edge values: saturation, sign bits
                xmm = {i: bytes(rng.choice(EDGY) for _ in range(16)) for i in range(16)}
            eflags = 0x202 | rng.choice((0, 0xD5))
            difftest(tracee, emu, State(code, regs=regs, xmm=xmm, eflags=eflags))


# --- refusals: nothing changes ---------------------------------------------

FAULTS = [
    ("load from unmapped", "488b00", {"rax": 0x10}, signal.SIGSEGV),
    ("load crossing into unmapped", "488b07", {"rdi": DATA + DATA_LEN - 4}, signal.SIGSEGV),
    ("store to read-only page", "488906", {"rsi": RO + 8}, signal.SIGSEGV),
    ("store to code page", rip_rel("48890d", CODE + 0x900), {}, signal.SIGSEGV),
    ("push to read-only page", "55", {"rsp": RO + 0x800}, signal.SIGSEGV),
    ("call with unmapped stack", "e800010000", {"rsp": 0x18}, signal.SIGSEGV),
    ("misaligned movaps", "0f2847 01".replace(" ", ""), {}, signal.SIGSEGV),
    ("divide by zero", "48f7f1", {"rcx": 0}, signal.SIGFPE),
    ("ret to stack in ro", "c3", {"rsp": 0x20}, signal.SIGSEGV),
    ("load r32 non-canonical", "8b4008", {"rax": 1 << 63}, signal.SIGSEGV),
    ("store r32 to read-only page", "897e04", {"rsi": RO + 8}, signal.SIGSEGV),
    ("store across into read-only", "48897ef8", {"rsi": RO + 4}, signal.SIGSEGV),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "unicorn"])
@pytest.mark.parametrize("hexcode,regs,sig", [c[1:] for c in FAULTS], ids=[c[0] for c in FAULTS])
def test_fault_is_refused_with_nothing_changed(
    tracee: Tracee, emu: Emulator, hexcode: str, regs: dict[str, int], sig: int, fast: bool
) -> None:
    st = State(bytes.fromhex(hexcode), regs=regs)
    plan = plan_for(st.code, SITE, fast=fast)
    assert not isinstance(plan, NativeStep), describe(plan)
    got, _ = tracee.native(st)
    assert got == sig
    assert_refused(tracee, emu, st, plan)


def assert_refused(tracee: Tracee, emu: Emulator, st: State, plan: Plan) -> Refused:
    tracee.apply(st, planted=True)
    before_mem = tracee.snapshot().memory
    regs = pt.getregs(tracee.pid)
    before = bytes(regs)
    fp = PtraceFp(tracee.pid)
    result = emu.step(plan, st.code, regs, tracee.mem, fp)
    assert isinstance(result, Refused), result
    assert bytes(regs) == before, "registers changed"
    assert tracee.snapshot().memory == before_mem, "tracee memory changed"
    assert fp.sets == 0
    return result


POLICY = [
    ("lock xadd", "f0480fc107", "lock"),
    ("syscall", "0f05", "syscall"),
    ("rdtsc", "0f31", "rdtsc"),
    ("cpuid", "0fa2", "cpuid"),
    ("vmovdqu ymm0,[rdi]", "c5fe6f07", "VEX.256"),
    ("vmovdqu xmm0,[rdi]", "c5fa6f07", "VEX.128"),
    ("vaddps zmm", "62f17c4858c2", "EVEX"),
    ("xchg [rdi],rax", "488707", "implicitly locked"),
    ("int3", "cc", "int3"),
    ("int 0x80", "cd80", "int"),
    ("rdtscp", "0f01f9", "rdtscp"),
    ("rdrand", "480fc7f0", "rdrand"),
    ("rdseed", "480fc7f8", "rdseed"),
    ("rdpid", "f30fc7f8", "rdpid"),
    ("xgetbv", "0f01d0", "xgetbv"),
    ("fld", "d90500000000", "x87"),
    ("fnstcw", "d97c2408", "x87"),
    ("movq mm0,rax", "480f6ec0", "MMX"),
    ("popfq", "9d", "system flags"),
    ("pushfq", "9c", "system flags"),
    ("iretq", "48cf", "iretq"),
    ("mov ss,ax", "8ed0", "privileged"),
    ("mov eax,ds", "8cd8", "segment"),
    ("hlt", "f4", "privileged"),
    ("fxsave", "0fae07", "fxsave"),
    ("xrstor", "0fae2f", "xrstor"),
    ("wrfsbase", "f3480faed0", "wrfsbase"),
    ("rdfsbase", "f3480faec0", "rdfsbase"),
    ("cmpxchg16b", "480fc70f", "cmpxchg16b"),
    ("bzhi", "c4e2f0f5c0", "wrong"),
    ("addsd from memory", "f20f5807", "MXCSR"),
    ("ud2", "0f0b", "ud2"),
    ("far jmp [mem]", "ff2c25000000ff", "far"),
    ("lahf with rex", "4f9f", "SPL"),
    ("undecodable", "06", "capstone"),
]


@pytest.mark.parametrize("hexcode,why", [c[1:] for c in POLICY], ids=[c[0] for c in POLICY])
def test_policy_refuses(hexcode: str, why: str) -> None:
    plan = plan_for(bytes.fromhex(hexcode), SITE)
    assert isinstance(plan, NativeStep), describe(plan)
    assert why.lower() in plan.reason.lower(), plan.reason


def test_read_of_the_stop_byte_is_refused(tracee: Tracee, emu: Emulator) -> None:
    st = State(bytes.fromhex("488b05f9ffffff"))  # mov rax, [rip-7]: 8 bytes from itself
    unicorn = plan_for(st.code, SITE, fast=False)
    assert "stop byte" in assert_refused(tracee, emu, st, unicorn).reason
    # the FastPath plants no stop byte, and shows its own bytes, not the int3
    assert isinstance(difftest(tracee, emu, st), FastPath)


def test_a_crash_inside_unicorn_costs_one_hit_and_the_engine(tracee: Tracee) -> None:
    """A fatal signal inside the compiled machine's run (Unicorn 2.1.4 has
    segfaulted there) refuses the hit with nothing changed, and the next hit
    runs on a new engine, matching the CPU."""
    if cmachine.compiled_module() is None:
        pytest.skip("the compiled machine is not built")
    emu = Emulator(compiled=True)
    machine = emu.machine
    assert isinstance(machine, cmachine.CMachine)
    told: list[int] = []
    machine.replaced.append(lambda: told.append(1))
    st = State(bytes.fromhex("4801d8"))  # add rax, rbx
    plan = plan_for(st.code, SITE)
    assert isinstance(plan, UnicornStep)
    machine.crash_next = True
    assert "crashed" in assert_refused(tracee, emu, st, plan).reason
    assert machine.crashes == 1 and told == [1]
    difftest(tracee, emu, st, plan=plan)
    difftest(tracee, emu, State(bytes.fromhex("48897c2408")), plan=plan_for(  # a store, too
        bytes.fromhex("48897c2408"), SITE, fast=False))


def test_ac_flag_and_native_plans_are_refused(tracee: Tracee, emu: Emulator) -> None:
    for hexcode in ("55", "4801d8"):  # FastPath, UnicornStep
        st = State(bytes.fromhex(hexcode), eflags=0x40202)
        assert "AC flag" in assert_refused(tracee, emu, st, plan_for(st.code, SITE)).reason
    st = State(bytes.fromhex("0f31"))
    plan = plan_for(st.code, SITE)
    assert assert_refused(tracee, emu, st, plan) == Refused(plan.reason)  # type: ignore[union-attr]


def test_rep_beyond_limit_is_refused(tracee: Tracee, emu: Emulator) -> None:
    st = State(bytes.fromhex("f3aa"), regs={"rcx": policy.REP_LIMIT + 1})
    assert "rep count" in assert_refused(tracee, emu, st, plan_for(st.code, SITE)).reason


def test_callback_exception_is_reraised_with_nothing_changed(tracee: Tracee, emu: Emulator) -> None:
    class Exploding(ProcessMemory):
        def read(self, addr: int, size: int) -> bytes:
            raise RuntimeError("boom in a Unicorn callback")

    st = State(bytes.fromhex(rip_rel("488b05", DATA + 0x48)))
    tracee.apply(st, planted=True)
    regs = pt.getregs(tracee.pid)
    before = bytes(regs)
    mem = Exploding(tracee.pid)
    mem.planted.update(tracee.mem.planted)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            emu.step(plan_for(st.code, SITE), st.code, regs, mem, PtraceFp(tracee.pid))
    finally:
        mem.close()
    assert bytes(regs) == before
    # and the machine is still usable
    difftest(tracee, emu, st)


# --- freshness: Unicorn's caches never show an old hit ---------------------


def test_same_address_different_code_each_hit(tracee: Tracee, emu: Emulator) -> None:
    codes = ["48c7c001000000", "48c7c002000000", "4801d8", "4829d8", "48c7c001000000"]
    for hexcode in codes * 2:
        difftest(tracee, emu, State(bytes.fromhex(hexcode)))


def test_two_processes_same_address_different_code(emu: Emulator) -> None:
    a, b = Tracee(), Tracee()
    try:
        for _ in range(3):
            difftest(a, emu, State(bytes.fromhex("4801d8")))  # add rax, rbx
            difftest(b, emu, State(bytes.fromhex("4829d8")))  # sub rax, rbx
            difftest(a, emu, State(bytes.fromhex(rip_rel("488b05", DATA + 0x48))))
            data = bytes(reversed(default_data()))
            difftest(b, emu, State(bytes.fromhex(rip_rel("488b05", DATA + 0x48)), data=data))
    finally:
        a.kill()
        b.kill()


def test_memory_changes_between_hits_are_seen(tracee: Tracee, emu: Emulator) -> None:
    code = bytes.fromhex("488b07")  # mov rax, [rdi]
    for fill in (0x11, 0x22, 0x33):
        difftest(tracee, emu, State(code, data=bytes([fill]) * DATA_LEN))


# --- decode's register sets against Unicorn itself -------------------------


def test_plan_registers_cover_what_unicorn_touches() -> None:
    """For random encodings, a UnicornStep must name every GPR the instruction
    uses: moving the ones it leaves out must not change any result (registers,
    flags, stores), and those must come out untouched.  capstone's
    regs_access() has gaps (`test [m], eax`, cmpxchg); decode.py must cover them."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    code_at, data_at = 0x10000000, 0x20000000
    uc.mem_map(code_at, 0x1000)
    uc.mem_map(data_at, 0x100000)
    uc.hook_add(UC_HOOK_MEM_UNMAPPED, lambda *a: False)
    uc.hook_add(UC_HOOK_INTR, lambda u, i, d: u.emu_stop())
    writes: list[tuple[int, int, int]] = []
    uc.hook_add(UC_HOOK_MEM_WRITE, lambda u, acc, a, size, v, d: writes.append((a, size, v)))
    ucs = {g.name: g.uc for g in GPRS}

    Outcome = tuple[dict[str, int], int, list[tuple[int, int, int]]]

    def run(code: bytes, values: dict[str, int]) -> Outcome | None:
        uc.mem_write(code_at, code + b"\xf4")
        uc.mem_write(data_at, bytes(0x100000))
        uc.ctl_remove_cache(code_at, code_at + 16)
        for name, v in values.items():
            uc.reg_write(ucs[name], v)
        uc.reg_write(ucx.UC_X86_REG_EFLAGS, 0x2)
        writes.clear()
        try:
            uc.emu_start(code_at, 0, 0, 1)
        except UcError:
            return None
        if uc.reg_read(ucx.UC_X86_REG_RIP) != code_at + len(code):
            return None
        gprs = {n: uc.reg_read(ucs[n]) for n in GPR_NAMES}
        return gprs, uc.reg_read(ucx.UC_X86_REG_EFLAGS), list(writes)

    rng = random.Random(3)
    checked = 0
    while checked < 1500:
        raw = bytes(rng.getrandbits(8) for _ in range(15))
        plan = plan_for(raw, code_at, fast=False)
        if not isinstance(plan, UnicornStep) or plan.branch:
            continue
        code = raw[: plan.length]
        base = {n: data_at + 0x40000 + i * 0x1000 for i, n in enumerate(GPR_NAMES)}
        first = run(code, base)
        if first is None:
            continue
        checked += 1
        moved = {n: v + 0x100 if n not in plan.fields else v for n, v in base.items()}
        second = run(code, moved)
        assert second is not None, f"{plan.text}: depends on a register outside {plan.fields}"
        (g1, f1, w1), (g2, f2, w2) = first, second
        for n in GPR_NAMES:
            if n in plan.fields:
                assert g1[n] == g2[n], f"{plan.text}: {n} depends on unlisted registers"
            else:
                assert (g1[n], g2[n]) == (base[n], moved[n]), f"{plan.text}: writes {n}"
        assert f1 == f2, f"{plan.text}: flags depend on unlisted registers"
        assert w1 == w2, f"{plan.text}: stores depend on unlisted registers"


# --- a hot site: the same step over and over ------------------------------
# (what each of these steps costs: python -m benchmarks.steps)


def test_repeated_steps_from_one_state_are_emulated(tracee: Tracee, emu: Emulator) -> None:
    """3000 steps of one planted site from the same registers, as a hot probe
    takes them: every one is emulated."""
    for hexcode in ("55", rip_rel("488b05", DATA + 0x48), "48897c2408", "c3"):
        st = State(bytes.fromhex(hexcode))
        tracee.apply(st, planted=True)
        plan = plan_for(st.code, SITE)
        template = bytes(pt.getregs(tracee.pid))
        regs = pt.UserRegs()
        fp = PtraceFp(tracee.pid)
        for _ in range(3000):
            ctypes.memmove(ctypes.addressof(regs), template, len(template))
            result = emu.step(plan, st.code, regs, tracee.mem, fp)
            assert isinstance(result, Emulated), f"{describe(plan)}: {result}"
        tracee.mem.planted.clear()
