"""Every C fixture builds in every variant and, untraced, prints exactly what
fixturebuild.expected_stdout predicts; firstinsn's probed functions start
with the intended instruction in every variant (checked with objdump)."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

import fixturebuild as fb
from conftest import SYS_PAUSE, blocked_in, wait_for, wait_looping

VARIANTS = list(fb.VARIANTS)

# (fixture, args) for the deterministic programs, with small counts.
RUNS = [
    ("firstinsn", ("300",)),
    ("threads", ("200",)),
    ("forkexec", ("50",)),
    ("vfork", ("50",)),
    ("uselib", ("40",)),
    ("dlopen", ("30", "20")),
    ("signals", ("20000",)),
    ("signals", ("100", "sigtrap", "3")),
    ("signals", ("100", "int3", "4")),
]

# Intel-syntax first instruction (regex over objdump's text) and its exact
# leading bytes where they do not depend on the link layout.
FIRST_INSN: dict[str, tuple[str, str | None]] = {
    "f_push": (r"push\s+rbp$", "55"),
    "f_movrr": (r"mov\s+rax,rdi$", "48 89 f8"),
    "f_subrsp": (r"sub\s+rsp,0x18$", "48 83 ec 18"),
    "f_riprel_load": (r"mov\s+rax,QWORD PTR \[rip\+0x[0-9a-f]+\]", "48 8b 05"),
    "f_riprel_store": (r"mov\s+QWORD PTR \[rip\+0x[0-9a-f]+\],rdi", "48 89 3d"),
    "f_stack_store": (r"mov\s+QWORD PTR \[rsp-0x8\],rdi$", "48 89 7c 24 f8"),
    "f_call": (r"call\s+(?:[0-9a-f]+ )?<f_call_helper>$", "e8"),
    "f_jmp": (r"jmp\s+(?:[0-9a-f]+ )?<f_jmp_tail>$", "e9"),
    "f_jcc": (r"jne\s+(?:[0-9a-f]+ )?<f_jcc\+0x7>$", "75 05"),
    "f_ret": (r"ret$", "c3"),
    "f_fsload": (r"mov\s+rax,QWORD PTR fs:0x28$", "64 48 8b 04 25 28 00 00 00"),
    "f_addsd": (r"addsd\s+xmm0,xmm1$", "f2 0f 58 c1"),
    "f_movaps": (r"movaps\s+xmm0,XMMWORD PTR \[rdi\]$", "0f 28 07"),
    "f_lockxadd": (r"lock xadd\s+DWORD PTR \[rdi\],esi$", "f0 0f c1 37"),
    "f_syscall": (r"syscall$", "0f 05"),
    "f_vmovdqu": (r"vmovdqu\s+ymm0,YMMWORD PTR \[rdi\]$", "c5 fe 6f 07"),
}

# Compiled (not asm) probe targets: endbr64 first in the CET variant only.
C_TARGETS = {
    "firstinsn": ["c_func"],
    "threads": ["work"],
    "forkexec": ["fe_func"],
    "vfork": ["vf_func"],
    "signals": ["sig_func"],
    "loop": ["loop_func"],
    "dlopen": ["pre_func"],
    "lib": ["lib_func"],
    "dllib": ["dl_func"],
}


def first_insns(path: Path) -> dict[str, tuple[str, str]]:
    """{function: (bytes, intel text)} of each function's first instruction."""
    out = subprocess.run(
        ["objdump", "-d", "-M", "intel", "--no-addresses", "--insn-width=16", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, tuple[str, str]] = {}
    current: str | None = None
    for line in out.splitlines():
        m = re.match(r"^<([^>]+)>:$", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "\t" in line:
            # "\tBYTES \tTEXT" (--insn-width=16 keeps every byte on one line).
            parts = [p.strip() for p in line.split("\t") if p.strip()]
            if len(parts) >= 2:
                result[current] = (parts[0], parts[1])
                current = None
    return result


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("name", "args"), RUNS, ids=lambda x: x if isinstance(x, str) else "-")
def test_runs_with_expected_output(name: str, args: tuple[str, ...], variant: str) -> None:
    exe = fb.build(name, variant)
    r = fb.run(exe, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == fb.expected_stdout(name, *args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_firstinsn_first_instructions(variant: str) -> None:
    insns = first_insns(fb.build("firstinsn", variant))
    for func, (pattern, raw) in FIRST_INSN.items():
        assert func in insns, f"{func} missing from objdump of {variant}"
        got_bytes, text = insns[func]
        assert re.match(pattern, text), f"{variant} {func}: {text!r} !~ {pattern}"
        if raw is not None:
            assert got_bytes.startswith(raw), f"{variant} {func}: bytes {got_bytes} not {raw}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(C_TARGETS))
def test_compiled_targets_endbr_only_in_cet(name: str, variant: str) -> None:
    insns = first_insns(fb.build(name, variant))
    for func in C_TARGETS[name]:
        text = insns[func][1]
        if variant.endswith("cet"):
            assert text == "endbr64", f"{func}: {text}"
        else:
            assert text != "endbr64", f"{func}: {text}"


def test_variants_differ() -> None:
    """PIE/no-PIE really differ (a no-PIE executable is ET_EXEC at 0x400000)."""
    for variant, etype in (("O0-pie", "DYN"), ("O2-nopie", "EXEC")):
        hdr = subprocess.run(
            ["readelf", "-h", str(fb.build("firstinsn", variant))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert re.search(rf"Type:\s+{etype}", hdr), hdr


def test_symbol_offset_matches_bytes() -> None:
    """symbol_offset gives the file offset of the function's first byte."""
    for variant in ("O0-pie", "O2-nopie"):
        exe = fb.build("firstinsn", variant)
        data = exe.read_bytes()
        off = fb.symbol_offset(exe, "f_subrsp")
        assert data[off : off + 4] == bytes.fromhex("4883ec18")


@pytest.mark.parametrize("variant", ["O0-pie", "O2-nopie"])
def test_loop_runs_for_seconds(variant: str) -> None:
    r = fb.run(fb.build("loop", variant), "0.2", timeout=30)
    assert r.returncode == 0
    assert re.fullmatch(r"loop calls loop_func=[1-9]\d* checksum_ok=1\n", r.stdout), r.stdout


def test_loop_stops_on_sigterm() -> None:
    exe = fb.build("loop", "O2-pie")
    proc = subprocess.Popen([str(exe), "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert wait_looping(proc.pid, exe), "the loop never reached its loop"
        assert proc.poll() is None, "loop exited before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert re.fullmatch(r"loop calls loop_func=[1-9]\d* checksum_ok=1\n", out), out


def test_firstinsn_pause_mode() -> None:
    proc = subprocess.Popen(
        [str(fb.build("firstinsn", "O0-pie")), "5", "pause"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(len(fb.FIRSTINSN_FUNCS) + 3)]
        assert "".join(lines) == fb.expected_stdout("firstinsn", "5", "pause")
        wait_for(lambda: proc.poll() is not None or blocked_in(proc.pid, SYS_PAUSE))
        assert proc.poll() is None, "pause mode must wait to be killed"
        assert blocked_in(proc.pid, SYS_PAUSE), "pause mode must wait in pause()"
    finally:
        proc.kill()
        proc.wait()


def test_build_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(fb.FixtureBuildError, match="unknown fixture"):
        fb.build("nonexistent")
    with pytest.raises(fb.FixtureBuildError, match="unknown variant"):
        fb.build("loop", "O3-weird")
    with pytest.raises(fb.FixtureBuildError, match="gcc"):
        fb.build("loop", "O0-pie", out_dir=tmp_path, extra=["-DX", "-fno-such-flag"])


def test_build_cache_and_private_copy(tmp_path: Path) -> None:
    a = fb.build("loop", "O0-pie")
    assert fb.build("loop", "O0-pie") == a
    b = fb.build("loop", "O0-pie", out_dir=tmp_path)
    assert b.parent == tmp_path
    assert a.stat().st_ino != b.stat().st_ino
    lib = fb.build("uselib", "O0-pie", out_dir=tmp_path / "u")
    assert (lib.parent / "libemufix.so").exists()
