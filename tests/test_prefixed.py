"""Probes on prefixed first instructions: a traced run computes exactly what
the program computes untraced, with exact hit counts.

The fixture (fixtures/prefixed.c) has one asm function per prefixed form
(rep/bnd ret, bnd jmp/call, notrack jmp, hinted jcc, pause, data16 and
cs-prefixed nops, REX/segment-prefixed forms, address-size loop/jecxz, rep- or
repne-prefixed loopne/loope, 16-bit pushes and pops, address-size string and
memory operands, redundant REX bits, duplicated prefixes), each form being the
function's first instruction, so a probe on the function displaces it.  The
prefixed loopne/loope forms behave differently on AMD and Intel CPUs, so the
program's output depends on the machine: a traced run is only ever compared
with an untraced run on the same machine.  Every expectation comes from
outside the code under test: the program's own printout of its calls, an
untraced run, and the bytes in the file.
"""

from __future__ import annotations

import pytest

from conftest import hits, run_traced
from emuprobe.x86.decode import NativeStep, analyze
from fixturebuild import build, parse_counts, run, symbol_offset

VARIANTS = ["O0-pie", "O2-nopie"]
N = 300

# Functions whose (prefixed) first instruction belongs to a class the engine
# must emulate once it is trusted: a prefix that changes nothing the engine
# models is no reason to go native.
EMULATED_FORMS = [
    "p_repret",  # f3 c3          rep ret
    "p_bndret",  # f2 c3          bnd ret
    "p_bndjmp",  # f2 e9 rel32    bnd jmp
    "p_bndcall",  # f2 e8 rel32   bnd call
    "p_notrack_rax",  # 3e ff e0  notrack jmp rax
    "p_notrack_rcx",  # 3e ff e1  notrack jmp rcx
    "p_jcc_hint_nt",  # 2e 74 rel8  je, hinted not taken
    "p_jcc_hint_t",  # 3e 75 rel8   jne, hinted taken
    "p_pause",  # f3 90
    "p_xchgax",  # 66 90          xchg ax,ax
    "p_nopw",  # 66 0f 1f 44 00 00
    "p_csnopw",  # 66 2e 0f 1f 84 00 00 00 00 00
    "p_csnopw2",  # 66 66 2e 0f 1f 84 00 00 00 00 00
    "p_nopl",  # 0f 1f 40 00      (no prefix, for contrast)
    "p_push",  # 55               (control)
    "p_endbr",  # f3 0f 1e fa     (control)
]

# Exactness only: these may go native, but must compute what the CPU does.
OTHER_FORMS = [
    "p_rexw_push",  # 48 55       push rbp, REX.W ignored
    "p_rexret",  # 40 c3          rex ret
    "p_csload",  # 2e 48 8b 07    mov rax, cs:[rdi]
    "p_dsstore",  # 3e 48 89 37   mov ds:[rdi], rsi
    "p_loop32",  # 67 e2 rel8     loop on ecx
    "p_jrcxz",  # e3 rel8
    "p_jecxz",  # 67 e3 rel8
    "p_loopne_f3",  # f3 e0 rel8     AMD: loop while ZF=1; Intel: loopne
    "p_loope_f2",  # f2 e1 rel8      AMD: loop while ZF=0; Intel: loope
    "p_loopne_f2",  # f2 e0 rel8
    "p_loope_f3",  # f3 e1 rel8
    "p_loopne_f2f3",  # f2 f3 e0 rel8  AMD: the last of f2/f3 (f3) decides
    "p_push16",  # 66 55          push bp
    "p_pushw_imm8",  # 66 6a f5   pushw -11
    "p_pushw_imm16",  # 66 68 65 87  pushw 0x8765
    "p_pop16",  # 66 5a           pop dx
    "p_movsb32",  # 67 f3 a4      rep movsb, esi/edi/ecx
    "p_load32",  # 67 48 8b 07    mov rax, [edi]
    "p_rexx_add",  # 4a 01 f8     add rax, rdi with an idle REX.X
    "p_rexlegacy_add",  # 48 66 01 f8  add ax, di: the REX before 66 is ignored
    "p_jcc_hint2",  # 3e 3e 74 rel8  je, hinted taken twice
    "p_reprepret",  # f3 f3 c3    rep rep ret
]

LOOP_FORMS = ["p_loopne_f3", "p_loope_f2", "p_loopne_f2", "p_loope_f3", "p_loopne_f2f3"]
CONDITIONAL = [
    "p_jcc_hint_nt",
    "p_jcc_hint_t",
    "p_loop32",
    "p_jrcxz",
    "p_jecxz",
    *LOOP_FORMS,
    "p_jcc_hint2",
]


def _taken(stdout: str) -> dict[str, int]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("taken "):
            k, _, v = line[len("taken ") :].partition("=")
            out[k] = int(v)
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def traced(request, tmp_path_factory):
    """(exe, untraced result, its counts, traced result) for one variant."""
    exe = build("prefixed", request.param)
    plain = run(exe, str(N))
    assert plain.returncode == 0, plain.stderr
    calls = parse_counts(plain.stdout)
    tmp = tmp_path_factory.mktemp(f"prefixed-{request.param}")
    t = run_traced(tmp, EMULATED_FORMS + OTHER_FORMS, [str(exe), str(N)])
    return exe, plain, calls, t


def test_fixture_covers_every_form(traced):
    _, plain, calls, _ = traced
    assert sorted(calls) == sorted(EMULATED_FORMS + OTHER_FORMS)
    assert all(c == N for c in calls.values())
    taken = _taken(plain.stdout)
    for name in CONDITIONAL:  # both outcomes of every conditional branch happen
        assert 0 < taken[name] < calls[name], name


def test_prefixed_output_and_counts_exact(traced):
    _, plain, calls, t = traced
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout  # the program computed exactly what it does untraced
    got = hits(t)
    stats = t.stats["probes"]
    for name in EMULATED_FORMS + OTHER_FORMS:
        assert got[name] == calls[name], name
        assert stats[name]["hits"] == stats[name]["emulated"] + stats[name]["native_fallback"]
    assert len(t.events) == sum(calls.values())


def _first_bytes(exe, name: str) -> bytes:
    off = symbol_offset(exe, name)
    with open(exe, "rb") as f:
        f.seek(off)
        return f.read(16)


def test_trusted_prefixed_forms_are_emulated(traced):
    """Every EMULATED_FORMS class is trusted on this CPU, and every hit on it
    is emulated: a prefix that changes nothing the engine models is no reason
    to single-step natively."""
    exe, _, calls, t = traced
    assert t.status == 0, t.stderr
    stats = t.stats["probes"]
    wrong = {}
    for name in EMULATED_FORMS:
        code = _first_bytes(exe, name)
        plan = analyze(code, 0)
        if isinstance(plan, NativeStep):
            wrong[name] = f"{code[: plan.length or 8].hex()} goes native: {plan.reason}"
        elif stats[name]["emulated"] != calls[name]:
            wrong[name] = f"trusted, yet {stats[name]} for {calls[name]} calls"
    assert not wrong, wrong


def test_other_prefixed_forms_follow_the_plan(traced):
    """The rarer forms: each hit goes the way analyze() plans it, all natively
    single-stepped or all emulated, never a mixture."""
    exe, _, calls, t = traced
    assert t.status == 0, t.stderr
    stats = t.stats["probes"]
    for name in OTHER_FORMS:
        native = isinstance(analyze(_first_bytes(exe, name), 0), NativeStep)
        key = "native_fallback" if native else "emulated"
        assert stats[name][key] == calls[name], (name, key, stats[name])
