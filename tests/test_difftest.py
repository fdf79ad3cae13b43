"""The difftest: the native oracle, the comparator's SDM masks, the trust gate,
the derandomized CI profile, and bugs injected into the per-hit state
transfer that the CI profile must catch.  Every case runs on the real CPU in
a ptraced sandbox and through the engine's own per-hit path; nothing is mocked.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from emuprobe.difftest import campaign
from emuprobe.difftest.cases import Case
from emuprobe.difftest.compare import FAULT, MATCH, MISMATCH, REFUSED
from emuprobe.difftest.oracle import CODE, DATA, RO, SITE, Sandbox
from emuprobe.difftest.runner import Result, Runner, decode
from emuprobe.difftest.strategies import FIXED_GPRS
from emuprobe.difftest.undefined import undefined
from emuprobe.exec import cmachine, machine, ucengine
from emuprobe.sys import ptrace as pt
from emuprobe.x86 import trust
from emuprobe.x86.classkey import class_key
from emuprobe.x86.cpu import Cpu, parse_cpuinfo, this_cpu
from emuprobe.x86.decode import NativeStep, UnicornStep, analyze
from emuprobe.x86.regs import AF, CF, OF, PF, SF, ZF

REPO = Path(__file__).resolve().parent.parent
DISCREPANCIES = REPO / "fuzz" / "discrepancies"
STACK = DATA + 0x2000


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with Runner(explore=False) as r:
        yield r


def case(hexcode: str, **regs: int) -> Case:
    c = Case(bytes.fromhex(hexcode), FIXED_GPRS).with_gpr("rsp", STACK)
    for name, value in regs.items():
        c = c.with_gpr(name, value)
    return c


def check(r: Runner, hexcode: str, **regs: int) -> Result:
    """One case with the trust table bypassed: the runner never asks it."""
    return r.check(case(hexcode, **regs), record=False)


# --- the oracle ------------------------------------------------------------


def test_sandbox_holds_only_its_pages_and_is_reaped() -> None:
    sb = Sandbox()
    pid = sb.pid
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        starts = sorted(int(line.split("-")[0], 16) for line in lines)
        assert starts[:3] == [CODE, DATA, RO]
        assert all(s in (CODE, DATA, RO) or s >= 0xFFFF_FFFF_FF60_0000 for s in starts), lines
    finally:
        sb.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_oracle_sets_and_reads_back_every_kind_of_state() -> None:
    with Sandbox() as sb:
        c = Case(bytes.fromhex("660fefc9"), FIXED_GPRS, eflags=0x2D7, mxcsr=0x1FBF,
                 fs_base=DATA, gs_base=STACK, fill=1)  # fmt: skip  # pxor xmm1, xmm1
        c = c.with_gpr("r15", 0x0123_4567_89AB_CDEF)
        out = sb.run_native(c.to_input(sb))
        assert out.signal == 0
        assert out.regs.rip == SITE + 4 and out.regs.r15 == 0x0123_4567_89AB_CDEF
        assert (out.regs.fs_base, out.regs.gs_base) == (DATA, STACK)
        assert out.regs.eflags & 0xFFF == 0x2D7 & 0xFFF
        assert out.fp.mxcsr == 0x1FBF
        xmm = bytes(out.fp.xmm_space)
        assert xmm[16:32] == bytes(16) and xmm[:16] == c.xmm[0]  # xmm1 zeroed, xmm0 kept
        assert out.memory[0x2000 : 0x2000 + 16] == bytes(16)  # DATA filled with zeros


def test_oracle_reports_the_fault() -> None:
    with Sandbox() as sb:
        out = sb.run_native(case("488b07", rdi=0x10).to_input(sb))  # mov rax, [rdi]
        assert (out.signal, out.si_code, out.si_addr) == (signal.SIGSEGV, 1, 0x10)  # SEGV_MAPERR
        out = sb.run_native(case("48890e", rsi=RO + 8).to_input(sb))  # mov [rsi], rcx
        assert (out.signal, out.si_code, out.si_addr) == (signal.SIGSEGV, 2, RO + 8)  # ACCERR
        out = sb.run_native(case("48f7f1", rcx=0, rax=1, rdx=0).to_input(sb))  # div rcx
        assert out.signal == signal.SIGFPE and out.regs.rip == SITE


# --- the comparator and the SDM masks --------------------------------------

SHIFT_MASKS = [
    ("shl eax, cl (0)", "d3e0", {"rcx": 0}, 0),
    ("shl eax, cl (1)", "d3e0", {"rcx": 1}, AF),
    ("shl eax, cl (5)", "d3e0", {"rcx": 5}, AF | OF),
    ("shl al, cl (9): CF too", "d2e0", {"rcx": 9}, AF | OF | CF),
    ("sar al, cl (9): CF defined", "d2f8", {"rcx": 9}, AF | OF),
    ("shl rax, 0x21 (masked to 33)", "48c1e021", {}, AF | OF),
    ("rol eax, cl (1)", "d3c0", {"rcx": 1}, 0),
    ("rol eax, cl (2)", "d3c0", {"rcx": 2}, OF),
    ("rcl eax, 1", "d1d0", {}, 0),
    ("shld eax, ebx, 1", "0fa4d801", {}, AF),
    ("shld eax, ebx, 7", "0fa4d807", {}, AF | OF),
    ("imul rax, rbx", "480fafc3", {}, SF | ZF | AF | PF),
    ("mul rcx", "48f7e1", {}, SF | ZF | AF | PF),
    ("div rcx", "48f7f1", {"rcx": 7, "rdx": 0}, CF | OF | SF | ZF | AF | PF),
    ("bt eax, ecx", "0fa3c8", {}, OF | SF | AF | PF),
    ("and eax, ebx", "21d8", {}, AF),
    ("tzcnt rax, rcx", "f3480fbcc1", {}, OF | SF | PF | AF),
    ("add eax, ebx", "01d8", {}, 0),
]


@pytest.mark.parametrize("hexcode,regs,flags", [c[1:] for c in SHIFT_MASKS],
                         ids=[c[0] for c in SHIFT_MASKS])  # fmt: skip
def test_undefined_flags_follow_the_sdm_count_rules(
    hexcode: str, regs: dict[str, int], flags: int
) -> None:
    insn = decode(bytes.fromhex(hexcode), SITE)
    before = pt.UserRegs()
    for name, value in regs.items():
        setattr(before, name, value)
    u = undefined(insn, before, pt.UserRegs())
    assert u.flags == flags
    assert not flags or "Intel SDM Vol. 2" in u.cite


def test_bsf_of_zero_leaves_the_destination_undefined(runner: Runner) -> None:
    insn = decode(bytes.fromhex("480fbcc1"), SITE)  # bsf rax, rcx
    zf = pt.UserRegs()
    zf.eflags = ZF
    assert undefined(insn, pt.UserRegs(), zf).regs == {"rax"}
    assert undefined(insn, pt.UserRegs(), pt.UserRegs()).regs == frozenset()
    assert check(runner, "480fbcc1", rcx=0).kind == MATCH
    assert check(runner, "480fbcc1", rcx=0x80).kind == MATCH


def test_verdicts_on_real_cases(runner: Runner) -> None:
    assert check(runner, "4801d8").kind == MATCH  # add rax, rbx
    assert check(runner, "488b07", rdi=0x10).kind == FAULT  # both fault
    # add rax, [rdi] (Unicorn path; mov has a FastPath): would alias in Unicorn
    r = check(runner, "480307", rdi=0x8000_0002_0001_0000)
    assert r.kind == REFUSED and "non-canonical" in r.verdict.diffs[0]  # type: ignore[union-attr]
    masked = check(runner, "48d3e0", rcx=5, rax=3)  # shl rax, cl: AF/OF undefined
    assert masked.kind == MATCH


# --- the trust gate --------------------------------------------------------


def _table_file(tmp_path: Path, table: trust.TrustTable, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trust.json"
    path.write_text(table.dump())
    monkeypatch.setenv(trust.ENV_FILE, str(path))
    trust.clear_caches()


OTHER_VENDOR = Cpu("GenuineIntel" if this_cpu().vendor != "GenuineIntel" else "AuthenticAMD",
                   6, 85)  # fmt: skip
SAME_FAMILY = Cpu(this_cpu().vendor, this_cpu().family, (this_cpu().model or 0) + 1)


def test_trust_holds_only_on_a_matching_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = trust.TrustTable(25)
    t.add_proof("add r64,r64", SAME_FAMILY, 25, 0)  # another model of this family
    t.add_proof("sub r64,r64", OTHER_VENDOR, 300, 0)
    t.add_proof("adc r64,r64", this_cpu(), 24, 0)  # one case short
    t.add_proof("imul r64,r64", this_cpu(), 40, 3)  # equal only after masking, 3 times
    t.add_proof("and r64,r64", this_cpu(), 40, None)  # masking not recorded
    t.add_proof("or r64,r64", this_cpu(), 40, 0)
    t.disprove("or r64,r64", OTHER_VENDOR, "rax: cpu 0x1 engine 0x2")  # counts everywhere
    t.add_proof("test r64,r64", SAME_FAMILY, 40, None)  # an old proof, masking not recorded,
    t.add_proof("test r64,r64", this_cpu(), 40, 0)  # and a newer one that recorded it
    _table_file(tmp_path, t, monkeypatch)
    try:
        assert isinstance(analyze(bytes.fromhex("4801d8"), SITE), UnicornStep)  # add rax, rbx
        assert isinstance(analyze(bytes.fromhex("4885c0"), SITE), UnicornStep)  # test rax, rax
        reasons = {h: analyze(bytes.fromhex(h), SITE) for h in
                   ("4829d8", "4811d8", "480fafc3", "4821d8", "4809d8", "4831d8")}  # fmt: skip
        assert all(isinstance(p, NativeStep) for p in reasons.values())
        why = {h: p.reason for h, p in reasons.items()}  # type: ignore[union-attr]
        assert why["4829d8"] == f"untrusted on this CPU (proven on {OTHER_VENDOR.key})"
        assert "24 proofs, 25 needed" in why["4811d8"]
        assert "undefined results differ on this CPU: 3 of 40" in why["480fafc3"]
        assert "not recorded" in why["4821d8"] and "emuprobe difftest --prove" in why["4821d8"]
        assert why["4809d8"].startswith(f"untrusted: disproved on {OTHER_VENDOR.key}")
        assert why["4831d8"] == trust.UNTRUSTED  # xor: proven nowhere
        # the difftest's view bypasses the table
        assert isinstance(analyze(bytes.fromhex("4829d8"), SITE, trusted_only=False), UnicornStep)
        monkeypatch.setenv(trust.ENV_MASKED, "1")
        trust.clear_caches()
        assert isinstance(analyze(bytes.fromhex("480fafc3"), SITE), UnicornStep)
    finally:
        monkeypatch.delenv(trust.ENV_FILE)
        trust.clear_caches()


def test_cpu_from_cpuinfo_and_the_matching_rule() -> None:
    text = Path("/proc/cpuinfo").read_text()
    cpu = parse_cpuinfo(text)
    assert cpu.vendor in ("GenuineIntel", "AuthenticAMD") and cpu.family >= 6
    assert f"{cpu.vendor} {cpu.family}/{cpu.model}" == cpu.key == Cpu.from_key(cpu.key).key
    assert cpu.matches(SAME_FAMILY) and not cpu.matches(OTHER_VENDOR)
    assert not cpu.matches(Cpu(cpu.vendor, cpu.family + 1, cpu.model))
    assert Cpu.from_key("GenuineIntel 6/?").model is None
    with pytest.raises(ValueError):
        parse_cpuinfo("processor\t: 0\n")


def test_packaged_table_names_its_cpus_and_ships_its_corpus() -> None:
    from emuprobe.difftest.prove import load_corpus

    table = trust.TrustTable.load(trust.packaged_path())
    assert table.min_cases >= 25 and len(table.proofs) >= 1000
    named = {Cpu.from_key(k).key for k in table.cpus}
    assert all(set(by_cpu) <= named for by_cpu in table.proofs.values())
    assert all(p.proven >= table.min_cases for by in table.proofs.values() for p in by.values())
    corpus = load_corpus()
    assert len(corpus) >= len(table.proofs) // 2  # --prove replays these
    for key, codes in list(corpus.items())[:200]:
        assert all(class_key(decode(c, SITE)) == key for c in codes), key


def test_trust_in_force_covers_the_common_prologues() -> None:
    """On this CPU (the session proved it first if the packaged table did not
    cover it): prologues as compilers emit them are emulated; one whose result
    has undefined flags may go native, but only because they differ here."""
    from emuprobe.difftest.undefined import BY_MNEMONIC

    for hexcode in ("55", "4889e5", "4883ec18", "f30f1efa", "e800010000", "c3", "488b05d0ff0000",
                    "48897c2408", "0f2807", "4885c0", "7410", "31c0"):  # fmt: skip
        plan = analyze(bytes.fromhex(hexcode), SITE)
        if isinstance(plan, NativeStep) and plan.mnemonic in BY_MNEMONIC:
            assert "undefined results differ on this CPU" in plan.reason, plan
        else:
            assert not isinstance(plan, NativeStep), plan


def test_discrepancies_are_untrusted_and_reproduce(runner: Runner) -> None:
    files = sorted(DISCREPANCIES.glob("*.json"))
    assert files, "fuzz/discrepancies/ holds the known mismatches"
    reproduced = 0
    for path in files:
        d = json.loads(path.read_text())
        c = Case.from_json(d["state"])
        plan = analyze(c.code, c.site)
        assert isinstance(plan, NativeStep), path.name  # untrusted, or refused by policy
        assert d["class"] not in trust.trusted_here() or d["status"].startswith("refused")
        assert c.code.hex() == d["bytes"] and d["differences"]
        reproduced += runner.check(c, record=False).kind == MISMATCH or _explored(c)
    assert reproduced >= len(files) * 3 // 4  # a few depend on Unicorn's state across runs


def _explored(c: Case) -> bool:
    with Runner(explore=True) as r:
        return r.check(c, record=False).kind == MISMATCH


# --- the CI profile, and bugs it must catch --------------------------------


def trusted_mismatch(r: Result) -> bool:
    return r.kind == MISMATCH and r.key in trust.trusted_here()


def test_ci_profile_finds_no_mismatch_in_trusted_classes(runner: Runner) -> None:
    campaign.run_campaign(runner, campaign.CI_PROFILE)
    bad = {k: s.first_mismatch.verdict.diffs for k, s in runner.stats.items()  # type: ignore[union-attr]
           if s.mismatches and k in trust.trusted_here()}  # fmt: skip
    assert not bad
    assert runner.cases == campaign.CI_PROFILE.examples
    assert len({s.mnemonic for s in runner.stats.values()}) >= 300
    assert sum(s.proven for s in runner.stats.values()) >= campaign.CI_PROFILE.examples // 3


def test_ci_profile_draws_the_same_cases_whatever_the_process_imported(tmp_path: Path) -> None:
    """Hypothesis mixes the number literals of every imported local module
    into its draws; under pytest that made the profile's cases depend on which
    test modules were collected (a mismatch seen in the full run and not in
    the file alone).  The campaign pins that pool."""
    (tmp_path / "literals_mod.py").write_text("A = 8127\nB = 4095\nC = (900, 110, 1800, 204)\n")
    script = (
        "import hashlib, sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "if sys.argv[1] == 'more':\n"
        "    import literals_mod, emuprobe.engine.xol  # noqa\n"
        "from emuprobe.difftest import campaign\n"
        "drawn = repr([c.to_json() for c in campaign.draw_cases(campaign.CI_PROFILE, 400)])\n"
        "print(drawn.count('code'), hashlib.sha256(drawn.encode()).hexdigest())\n"
    )
    outs = [
        subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                       timeout=300, check=True).stdout
        for mode in ("plain", "more")
    ]  # fmt: skip
    assert outs[0] == outs[1] and outs[0].startswith("400 ")


def caught_by_ci_profile() -> Result | None:
    with Runner(explore=False) as r:
        try:
            campaign.run_campaign(r, campaign.CI_PROFILE, stop=trusted_mismatch)
        except campaign.StopCampaign as stop:
            result: Result = stop.args[0]
            return result
        except Exception as e:  # Hypothesis may wrap the StopCampaign it saw
            cause = e.__cause__ or e.__context__
            if isinstance(cause, campaign.StopCampaign):
                return cause.args[0]  # type: ignore[no-any-return]
            raise
    return None


@pytest.mark.parametrize("compiled", ["1", "0"], ids=["machine.c", "machine.py"])
def test_ci_profile_catches_cf_dropped_on_write_back(
    monkeypatch: pytest.MonkeyPatch, compiled: str
) -> None:
    from emuprobe.x86.regs import EMULATED_FLAGS

    if compiled == "1" and cmachine.compiled_module() is None:
        pytest.skip("the compiled machine is not built")
    monkeypatch.setenv("EMUPROBE_CMACHINE", compiled)
    # both machines take the flags they transfer from here (cmachine puts them in each plan)
    monkeypatch.setattr(machine, "EMULATED_FLAGS", EMULATED_FLAGS & ~CF)
    monkeypatch.setattr(cmachine, "EMULATED_FLAGS", EMULATED_FLAGS & ~CF)
    r = caught_by_ci_profile()
    assert r is not None, "the CI profile missed a dropped CF"
    # seen in the flags, or in a result computed from CF (adc, sbb, setc, cmovc...)
    assert r.key in trust.trusted_here() and r.verdict is not None and r.verdict.diffs


def test_ci_profile_catches_lost_upper_half_of_xmm1(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the Python machine, whose XMM write-back can be patched from here."""
    monkeypatch.setenv("EMUPROBE_CMACHINE", "0")
    right = ucengine.XmmBatch.write_back

    def lossy(xb: ucengine.XmmBatch, fpregs: pt.UserFpRegs) -> None:
        upper = bytes(fpregs.xmm_space)[24:32]
        right(xb, fpregs)
        ctypes.memmove(ctypes.addressof(fpregs.xmm_space) + 24, upper, 8)  # xmm1[127:64] kept

    monkeypatch.setattr(ucengine.XmmBatch, "write_back", lossy)
    r = caught_by_ci_profile()
    assert r is not None, "the CI profile missed a lost XMM1 upper half"
    assert any(d.startswith("xmm1:") for d in r.verdict.diffs), r.verdict  # type: ignore[union-attr]


# --- the command line ------------------------------------------------------


def test_cli_campaign_table_json_and_trust_update(tmp_path: Path) -> None:
    out_json, table = tmp_path / "d.json", tmp_path / "trust.json"
    table.write_text(trust.TrustTable(5).dump())
    cmd = [sys.executable, "-m", "emuprobe", "difftest", "--examples", "300", "--seed", "3",
           "--mnemonic", "add", "--json", str(out_json), "--trust-file", str(table),
           "--min-cases", "5", "--update-trust"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["MNEMONIC", "CASES", "MATCH", "FAULT"]
    assert lines[1].split()[0] == "add" and max(len(line) for line in lines[:3]) < 80
    data = json.loads(out_json.read_text())
    assert data["totals"]["cases"] >= 300 and data["totals"]["mismatches"] == 0
    assert all(k.startswith("add ") for k in data["classes"])
    proven = trust.TrustTable.load(table)
    assert proven.proofs["add r64,r64"][this_cpu().key].proven >= 5
    assert proven.proofs["add r64,r64"][this_cpu().key].masked == 0
    assert this_cpu().key in proven.cpus and proven.cpus[this_cpu().key]["campaigns"]


def test_update_trust_never_retrusts_a_disproved_class() -> None:
    from emuprobe.difftest.report import update_trust

    me = this_cpu()
    with Runner(explore=False) as r:
        for i in range(30):
            r.check(case("4801d8", rax=i, rbx=(1 << 63) + i))  # add rax, rbx
        assert r.stats["add r64,r64"].proven == 30
        fresh = update_trust(r.stats, trust.TrustTable(25), 25, {})
        assert fresh.proofs == {"add r64,r64": {me.key: trust.Proof(30, 0)}}
        assert fresh.verdict("add r64,r64", me) is None
        disproved = trust.TrustTable(25)
        disproved.disprove("add r64,r64", SAME_FAMILY, "rax: cpu 1 engine 2")
        again = update_trust(r.stats, disproved, 25, {})
        assert "disproved on" in (again.verdict("add r64,r64", me) or "")
        # a disproof on another vendor's CPU counts here too (mostly the engine's fault)
        elsewhere = trust.TrustTable(25)
        elsewhere.disprove("add r64,r64", OTHER_VENDOR, "rax: cpu 1 engine 2")
        assert update_trust(r.stats, elsewhere, 25, {}).verdict("add r64,r64", me) is not None
