"""emuprobe's hit counts against kernel uprobes on the same probes, and the
address-space difference between the two.

The kernel is an independent oracle: it finds the function by file offset and
counts in its own trap handler.  Runs as root with kernel uprobes; skips with
the reason otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

import fixturebuild as fb
from conftest import EMUPROBE, SYS_PAUSE, blocked_in, children_of, hits, run_traced, wait_for
from emuprobe.perfbridge import kernel

_OK, _WHY = kernel.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"kernel uprobes unavailable: {_WHY}")

# The first-instruction kinds kernel uprobes handle (it refuses lock xadd and
# VEX.256, and a probe on `syscall` crashes the tracee).
KERNEL_KINDS = [
    "f_push", "f_movrr", "f_subrsp", "f_riprel_load", "f_riprel_store", "f_stack_store",
    "f_call", "f_jmp", "f_jcc", "f_ret", "f_fsload", "f_addsd", "f_movaps", "c_func",
]


@pytest.mark.parametrize("variant", ["O0-pie", "O2-nopie"])
def test_counts_equal_kernel_uprobes(tmp_path, variant):
    exe = fb.build("firstinsn", variant, out_dir=tmp_path / "bin")  # private inode
    n = 257
    with kernel.KernelUprobes() as k:
        names = {k.add(str(exe), fb.symbol_offset(exe, f), name=f): f for f in KERNEL_KINDS}
        plain = fb.run(exe, str(n))
        kernel_hits = {names[e]: h for e, h in k.hits().items()}
    assert plain.returncode == 0
    t = run_traced(tmp_path, KERNEL_KINDS, [str(exe), str(n)])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    assert hits(t) == kernel_hits
    assert set(kernel_hits.values()) == {n}


def _perf_counts(events: list[str], argv: list[str]) -> dict[str, int]:
    """Per-event counts of kernel uprobe events in `argv` alone (perf stat follows the task)."""
    cmd = ["perf", "stat", "-x", ",", "--no-big-num"]
    for e in events:
        cmd += ["-e", e]
    done = subprocess.run([*cmd, "--", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = {}
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2] in events and fields[0].isdigit():
            counts[fields[2].split(":")[1]] = int(fields[0])
    return counts


def test_ls_malloc_free_equal_kernel(tmp_path):
    """A real program nobody here wrote: `ls -la /usr/lib`, libc malloc and free."""
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    if not os.path.exists(libc) or not _has_perf():
        pytest.skip("needs glibc at the Debian path and perf")
    argv = ["/bin/ls", "-la", "/usr/lib"]
    # Registered but not enabled in tracefs: perf enables them for the command
    # alone (enabling them globally makes perf_event_open fail with EINTR).
    k = kernel.KernelUprobes()
    try:
        events = [
            f"{k.group}:{k.add(libc, fb.symbol_offset(libc, s), name=s)}"
            for s in ("malloc", "free")
        ]
        kernel_counts = _perf_counts(events, argv)
    finally:
        k.remove()
    t = run_traced(tmp_path, ["libc:malloc", "libc:free"], argv)
    assert t.status == 0, t.stderr
    assert hits(t) == kernel_counts
    assert kernel_counts["malloc"] > 50


def _has_perf() -> bool:
    return subprocess.run(["perf", "--version"], capture_output=True).returncode == 0


def _maps_when_paused(argv: list[str], procs_started: list, traced: bool = False) -> list[str]:
    """/proc/PID/maps of the firstinsn fixture once it printed PAUSED (after all hits)."""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    procs_started.append(p)
    assert p.stdout is not None
    for line in p.stdout:
        if line.strip() == "PAUSED":
            break
    pid = p.pid
    if traced:  # the fixture is emuprobe's child
        assert wait_for(lambda: bool(children_of(p.pid)))
        pid = children_of(p.pid)[0]
    assert wait_for(lambda: blocked_in(pid, SYS_PAUSE))  # waiting in pause(), as it stays
    with open(f"/proc/{pid}/maps") as f:
        return [re.sub(r"\s+", " ", line.strip()) for line in f]


def test_maps_identical_with_emuprobe_but_not_kernel(tmp_path):
    """The point of emuprobe: no VMA added, where the kernel's XOL adds [uprobes]."""
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path / "bin")
    norand = ["setarch", "-R"]  # same layout in every run, so maps compare line by line
    probes = ["f_riprel_load", "f_subrsp", "f_addsd", "f_lockxadd", "f_syscall", "f_ret"]
    started: list = []
    try:
        plain = _maps_when_paused([*norand, str(exe), "50", "pause"], started)
        traced = _maps_when_paused(
            [*norand, *EMUPROBE, "trace", "--count", *probes, "--", str(exe), "50", "pause"],
            started,
            traced=True,
        )
        with kernel.KernelUprobes() as k:
            k.add(str(exe), fb.symbol_offset(exe, "f_riprel_load"), name="riprel")
            kprobed = _maps_when_paused([*norand, str(exe), "50", "pause"], started)
    finally:
        for p in started:
            p.kill()
            p.wait(timeout=10)
    assert traced == plain
    assert not any("[uprobes]" in line for line in traced)
    assert any("[uprobes]" in line for line in kprobed)
    assert len(kprobed) == len(plain) + 1

