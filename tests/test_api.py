"""The Python API and `emuprobe list`, on real processes and real files."""

from __future__ import annotations

import subprocess

from conftest import EMUPROBE, hits, run_traced
from emuprobe.api import Tracer
from fixturebuild import build, parse_counts, run, symbol_vaddr


def test_handler_sees_registers_and_memory():
    exe = build("firstinsn", "O0-nopie")
    seen: list[tuple[int, int, bytes]] = []

    def on_push(ev):
        # f_push(i) is called with i = 0..N-1 in rdi; the code bytes read back
        # are the program's (push rbp = 0x55), not our int3.
        seen.append((ev.regs.rdi, ev.address, ev.read_memory(ev.address, 1)))

    t = Tracer.spawn([str(exe), "20"])
    t.probe("f_push", on_push)
    assert t.run() == 0
    assert [s[0] for s in seen] == list(range(20))
    assert {s[1] for s in seen} == {symbol_vaddr(exe, "f_push")}
    assert {s[2] for s in seen} == {b"\x55"}


def test_handler_exception_is_reported_once_and_tracee_unharmed(capfd):
    exe = build("firstinsn", "O0-pie")
    t = Tracer.spawn([str(exe), "30"])
    p = t.probe("f_movrr", lambda ev: 1 / 0)
    assert t.run() == 0
    out, err = capfd.readouterr()
    assert out == run(exe, "30").stdout
    assert err.count("ZeroDivisionError") == 1 and "f_movrr" in err
    assert p.handler_errors == 30 and p.hits == 30


def test_faulting_instruction_faults_for_real(tmp_path):
    """Emulator refuses (the load would fault): the CPU raises the real SIGSEGV."""
    exe = build("faults", "O2-pie")
    plain = run(exe, "60")
    t = run_traced(tmp_path, ["f_load"], [str(exe), "60"])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout  # same si_addr and si_code sum as untraced
    s = t.stats["probes"]["f_load"]
    assert s["hits"] == 60 and s["emulated"] == 30 and s["native_fallback"] == 30


def test_threads_come_and_go_during_stop_the_world(tmp_path):
    exe = build("churn", "O2-pie")
    t = run_traced(tmp_path, ["churn_work", "churn_atomic"], [str(exe), "15", "40"], timeout=300)
    assert t.status == 0, t.stderr
    printed = parse_counts(t.stdout)
    assert f"counter={printed['churn_atomic']}" in t.stdout
    got = hits(t)
    assert got["churn_atomic"] == printed["churn_atomic"]
    # The detached spinners hit churn_work an unknown number of times more.
    assert got["churn_work"] >= printed["churn_work"]


def test_list_shows_functions_with_first_instruction():
    exe = build("firstinsn", "O0-nopie")
    done = subprocess.run([*EMUPROBE, "list", str(exe), "f_*"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[1]: line for line in done.stdout.splitlines()}
    assert int(rows["f_push"].split()[0], 16) == symbol_vaddr(exe, "f_push")
    assert rows["f_push"].rstrip().endswith("push rbp")
    assert "lock xadd" in rows["f_lockxadd"]
    assert "c_func" not in rows
    done = subprocess.run([*EMUPROBE, "list", "libc", "malloc"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split()[1] == "malloc"


def test_rep_string_probe_fires_once_per_execution(tmp_path):
    exe = build("repstr", "O2-pie")
    plain = run(exe, "12")
    t = run_traced(tmp_path, ["f_rep"], [str(exe), "12"])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    s = t.stats["probes"]["f_rep"]
    assert s["hits"] == 12  # once per execution, natively stepped or not
    from emuprobe.x86.decode import NativeStep, analyze

    if isinstance(analyze(bytes.fromhex("f3a4c3") + bytes(13), 0), NativeStep):
        assert s["native_fallback"] == 12  # rep movsb is not (yet) trusted
    else:
        assert s["emulated"] == 6 and s["native_fallback"] == 6  # 20000 bytes: too long
