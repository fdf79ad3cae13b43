"""emuprobe trace on real processes: counts, output, address space, processes.

Every expectation comes from outside the code under test: the fixture's own
printout of how often it called each function, an untraced run of the same
program, or the file on disk.
"""

from __future__ import annotations

import re

import pytest

from conftest import hits, run_traced
from fixturebuild import build, cpu_has, parse_counts, run, symbol_vaddr

HIT_LINE = re.compile(r"^\s*(\S+)\s+(\d+)/(\d+)\s+(\d+)\.(\d{6}): (\S+): \((0x[0-9a-f]+)\)$")

# firstinsn functions by kind of first instruction; native = must not be emulated.
EMULATED = [
    "f_push", "f_movrr", "f_subrsp", "f_riprel_load", "f_riprel_store", "f_stack_store",
    "f_call", "f_jmp", "f_jcc", "f_ret", "f_fsload", "f_addsd", "f_movaps", "c_func",
]
NATIVE = ["f_lockxadd", "f_syscall"] + (["f_vmovdqu"] if cpu_has("avx2") else [])
VARIANTS = ["O0-pie", "O2-pie", "O0-nopie", "O2-nopie", "O0-cet"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_firstinsn_counts_and_output(tmp_path, variant):
    exe = build("firstinsn", variant)
    n = 300
    plain = run(exe, str(n))
    assert plain.returncode == 0
    calls = parse_counts(plain.stdout)
    t = run_traced(tmp_path, EMULATED + NATIVE, [str(exe), str(n)])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout  # the program computed exactly what it does untraced
    got = hits(t)
    for name in EMULATED + NATIVE:
        assert got[name] == calls[name], name
    stats = t.stats["probes"]
    for name in NATIVE:  # atomics, syscalls, VEX.256 are never emulated
        assert stats[name]["native_fallback"] == calls[name], name
    for name in ("f_push", "f_movrr", "f_riprel_load", "f_movaps", "f_call", "f_ret"):
        assert stats[name]["emulated"] == calls[name], name
    assert len(t.events) == sum(calls[name] for name in EMULATED + NATIVE)


def test_hit_lines_look_like_perf_script(tmp_path):
    exe = build("firstinsn", "O0-nopie")
    t = run_traced(tmp_path, ["f_push", "entry=f_movrr"], [str(exe), "3"])
    assert t.status == 0, t.stderr
    assert len(t.events) == 6
    nm_addr = {"f_push": symbol_vaddr(exe, "f_push"), "entry": symbol_vaddr(exe, "f_movrr")}
    stamps = []
    for line in t.events:
        m = HIT_LINE.match(line)
        assert m, line
        comm, pid, tid, sec, usec, name, addr = m.groups()
        assert comm == "firstinsn" and pid == tid
        assert int(addr, 16) == nm_addr[name]  # non-PIE: run-time address = ELF address
        stamps.append(int(sec) * 10**6 + int(usec))
        assert len(line) < 80
    assert stamps == sorted(stamps)


def test_exit_status_is_the_commands(tmp_path):
    t = run_traced(tmp_path, ["libc:malloc"], ["sh", "-c", "exit 7"])
    assert t.status == 7 and t.stats["exit_status"] == 7
    t = run_traced(tmp_path, ["libc:malloc"], ["sh", "-c", "kill -TERM $$"])
    assert t.status == 128 + 15


def test_count_table(tmp_path):
    import subprocess

    from conftest import EMUPROBE

    exe = build("firstinsn", "O2-pie")
    done = subprocess.run(
        [*EMUPROBE, "trace", "--count", "f_push", "f_lockxadd", "--", str(exe), "200"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0
    assert done.stdout == run(exe, "200").stdout  # no per-hit lines
    rows = {line.split()[0]: line.split()[1:] for line in done.stderr.splitlines()}
    assert rows["PROBE"] == ["HITS", "EMULATED", "NATIVE"]
    assert rows["f_push"] == ["200", "200", "0"]
    assert rows["f_lockxadd"] == ["200", "0", "200"]


def test_two_probes_one_site_share_an_int3(tmp_path):
    exe = build("firstinsn", "O0-pie")
    t = run_traced(tmp_path, ["a=f_push", "b=f_push", "f_push"], [str(exe), "50"])
    assert t.status == 0, t.stderr
    assert hits(t) == {"a": 50, "b": 50, "f_push": 50}
    assert len(t.events) == 150


def test_threads_lose_no_events(tmp_path):
    exe = build("threads", "O2-pie")
    m = 50_000
    t = run_traced(tmp_path, ["work"], [str(exe), str(m)], timeout=600)
    assert t.status == 0, t.stderr
    printed = parse_counts(t.stdout)
    assert printed["work"] == 8 * m
    assert hits(t)["work"] == 8 * m
    assert f"counter={8 * m}" in t.stdout


def test_lock_xadd_counter_stays_exact(tmp_path):
    exe = build("threads", "O2-pie")
    m = 1500
    t = run_traced(tmp_path, ["t_atomic_inc", "work"], [str(exe), str(m)], timeout=600)
    assert t.status == 0, t.stderr
    assert t.stdout == run(exe, str(m)).stdout  # counter and the sum of old values exact
    assert hits(t) == {"t_atomic_inc": 8 * m, "work": 8 * m}
    assert t.stats["probes"]["t_atomic_inc"]["native_fallback"] == 8 * m


def test_shared_library_and_dlopen(tmp_path):
    exe = build("uselib", "O2-pie")
    t = run_traced(tmp_path, ["libemufix.so:lib_func"], [str(exe), "700"])
    assert t.status == 0, t.stderr
    assert t.stdout == run(exe, "700").stdout
    assert hits(t) == {"lib_func": 700}

    exe = build("dlopen", "O2-pie")
    t = run_traced(tmp_path, ["pre_func", "libemudl.so:dl_func"], [str(exe), "40", "90"])
    assert t.status == 0, t.stderr
    assert t.stdout == run(exe, "40", "90").stdout
    assert hits(t) == {"pre_func": 40, "dl_func": 90}


# fixture, probe, calls per image: followed (parent + fork child + exec'd
# image), not followed (parent only), and how many PIDs report hits.
FORKS = {
    "forkexec": ("fe_func", (4, 2), (2, 1)),  # the fork child execs in place: 2 PIDs
    "vfork": ("vf_func", (3, 2), (2, 1)),
}


@pytest.mark.parametrize("follow", [True, False])
@pytest.mark.parametrize("fixture", sorted(FORKS))
def test_fork_vfork_and_exec(tmp_path, fixture, follow):
    probe, per_n, npids = FORKS[fixture]
    exe = build(fixture, "O0-pie")
    n = 100
    t = run_traced(tmp_path, [probe], [str(exe), str(n)], *([] if follow else ["--no-follow"]))
    assert t.status == 0, t.stderr
    assert t.stdout == run(exe, str(n)).stdout
    assert hits(t)[probe] == per_n[0 if follow else 1] * n
    pids = {HIT_LINE.match(line).group(2) for line in t.events}  # type: ignore[union-attr]
    assert len(pids) == npids[0 if follow else 1]


@pytest.mark.parametrize("mode", ["usr1", "sigtrap", "int3"])
def test_tracee_signals_and_own_traps_pass_through(tmp_path, mode):
    exe = build("signals", "O0-pie")
    plain = run(exe, "400", mode, "16")
    assert plain.returncode == 0
    t = run_traced(tmp_path, ["sig_func"], [str(exe), "400", mode, "16"])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    assert hits(t)["sig_func"] == parse_counts(plain.stdout).get("sig_func", 0)
