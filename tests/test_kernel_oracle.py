"""Kernel uprobes as an oracle: their hit counts equal the calls the fixture
reports, their XOL path adds a [uprobes] VMA, and KernelUprobes always
removes what it registered.

Each test probes a private copy of the fixture (own inode), because a kernel
uprobe fires in every process that maps the file, including other tests'.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import fixturebuild as fb
from conftest import hits, run_traced
from emuprobe.perfbridge import kernel

_OK, _WHY = kernel.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"kernel uprobes unavailable: {_WHY}")

N = 500

# First-instruction kinds the kernel handles: it emulates push, call, jmp and
# jcc, and single-steps the rest out of line.  Not lock xadd or vmovdqu (it
# refuses them) nor syscall (see KERNEL_REFUSES).
KERNEL_SUPPORTED = [
    "f_push",
    "f_movrr",
    "f_subrsp",
    "f_riprel_load",
    "f_riprel_store",
    "f_stack_store",
    "f_call",
    "f_call_helper",
    "f_jmp",
    "f_jmp_tail",
    "f_jcc",
    "f_ret",
    "f_fsload",
    "f_addsd",
    "f_movaps",
    "c_func",
]

# The kernel's decoder rejects these (ENOTSUPP when a process maps the file at
# enable time; no hits at all when the process starts later).
KERNEL_REFUSES = ["f_lockxadd", "f_vmovdqu"]

ENOTSUPP = 524  # kernel-internal errno, leaks out of the enable write


def group_listed(group: str) -> bool:
    with open(os.path.join(kernel.tracefs_dir(), "uprobe_events")) as f:
        return any(line.split(" ", 1)[0].split(":", 1)[-1].startswith(group + "/") for line in f)


@pytest.fixture(autouse=True)
def no_leftover_probes() -> Iterator[None]:
    """Whatever a test does, no group of this process stays registered."""
    yield
    assert not group_listed(f"emuprobe_{os.getpid()}")


@pytest.fixture(params=["O0-pie", "O2-nopie", "O0-cet"])
def private_firstinsn(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return fb.build("firstinsn", request.param, out_dir=tmp_path)


@pytest.fixture
def paused() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test; each is killed by PID at teardown."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def start_paused(exe: Path, n: int, procs: list[subprocess.Popen[str]]) -> int:
    """Run firstinsn N pause until it prints PAUSED; return its pid."""
    p = subprocess.Popen([str(exe), str(n), "pause"], stdout=subprocess.PIPE, text=True)
    procs.append(p)
    assert p.stdout is not None
    out = ""
    while not out.endswith("PAUSED\n"):
        line = p.stdout.readline()
        assert line, f"firstinsn exited early: {out!r}"
        out += line
    assert out == fb.expected_stdout("firstinsn", str(n), "pause")
    return p.pid


def test_hits_equal_printed_calls(private_firstinsn: Path) -> None:
    exe = private_firstinsn
    with kernel.KernelUprobes() as k:
        for func in KERNEL_SUPPORTED:
            k.add(str(exe), fb.symbol_offset(exe, func), name=func)
        r = fb.run(exe, str(N))
        hits = k.hits()
    assert r.returncode == 0, r.stderr
    # The probes must not change what the program computes.
    assert r.stdout == fb.expected_stdout("firstinsn", str(N))
    calls = fb.parse_counts(r.stdout)
    assert hits == {f: calls[f] for f in KERNEL_SUPPORTED}
    assert not group_listed(k.group)
    assert k.hits() == hits  # the snapshot taken at removal


def test_return_probe_counts(tmp_path: Path) -> None:
    exe = fb.build("firstinsn", "O2-pie", out_dir=tmp_path)
    with kernel.KernelUprobes() as k:
        name = k.add(str(exe), fb.symbol_offset(exe, "f_push"), retprobe=True)
        r = fb.run(exe, str(N))
    assert r.stdout == fb.expected_stdout("firstinsn", str(N))
    assert name.startswith("r_")
    assert k.hits() == {name: N}


def test_refused_kinds_never_fire(tmp_path: Path) -> None:
    """Registered before the process starts, the kernel skips them silently."""
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    with kernel.KernelUprobes() as k:
        for func in KERNEL_REFUSES:
            k.add(str(exe), fb.symbol_offset(exe, func), name=func)
        r = fb.run(exe, str(N))
    assert r.stdout == fb.expected_stdout("firstinsn", str(N))
    assert k.hits() == {f: 0 for f in KERNEL_REFUSES}


def test_refused_kind_errors_when_mapped(
    tmp_path: Path, paused: list[subprocess.Popen[str]]
) -> None:
    """With the file already mapped, enabling a lock-prefixed probe fails, and
    the failed __enter__ still removes the group."""
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    start_paused(exe, 3, paused)
    k = kernel.KernelUprobes()
    k.add(str(exe), fb.symbol_offset(exe, "f_lockxadd"), name="f_lockxadd")
    with pytest.raises(kernel.KernelUprobeError) as info:
        with k:
            pass
    assert info.value.errno in (ENOTSUPP, errno.EINVAL, errno.EOPNOTSUPP)
    assert not group_listed(k.group)


def maps_after_hits(tmp_path: Path, symbol: str, procs: list[subprocess.Popen[str]]) -> str:
    """/proc/PID/maps of a private firstinsn, kernel-probed at `symbol`, once
    it paused after its 10 hits (which the probe must have counted)."""
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    with kernel.KernelUprobes() as k:
        k.add(str(exe), fb.symbol_offset(exe, symbol), name=symbol)
        pid = start_paused(exe, 10, procs)
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        assert k.hits() == {symbol: 10}
    return maps


def test_uprobes_vma_after_xol_hit(tmp_path: Path, paused: list[subprocess.Popen[str]]) -> None:
    """A RIP-relative load is single-stepped out of line: [uprobes] appears."""
    assert "[uprobes]" in maps_after_hits(tmp_path, "f_riprel_load", paused)


def test_no_vma_when_kernel_emulates(tmp_path: Path, paused: list[subprocess.Popen[str]]) -> None:
    """push rbp is emulated by the kernel: hits, but no XOL area is mapped."""
    assert "[uprobes]" not in maps_after_hits(tmp_path, "f_push", paused)


def test_removed_when_body_raises(tmp_path: Path) -> None:
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    k = kernel.KernelUprobes(group="emuprobe_raise_test")
    k.add(str(exe), fb.symbol_offset(exe, "f_push"), name="push")
    k.add(str(exe), fb.symbol_offset(exe, "f_movrr"))
    with pytest.raises(RuntimeError, match="boom"):
        with k:
            assert group_listed(k.group)
            raise RuntimeError("boom")
    assert not group_listed(k.group)
    assert k.registered() == []


def test_add_inside_block_is_enabled(tmp_path: Path) -> None:
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    with kernel.KernelUprobes() as k:
        k.add(str(exe), fb.symbol_offset(exe, "f_jcc"), name="jcc")
        fb.run(exe, "7")
    assert k.hits() == {"jcc": 7}
    assert not group_listed(k.group)


def test_bad_names_rejected(tmp_path: Path) -> None:
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    with pytest.raises(ValueError):
        kernel.KernelUprobes(group="bad-group")
    k = kernel.KernelUprobes()
    with pytest.raises(ValueError):
        k.add(str(exe), 0x1000, name="1bad")
    assert not group_listed(k.group)


def test_removed_at_exit_without_with_block(tmp_path: Path) -> None:
    """A process that adds probes and never enters the block leaves none behind."""
    exe = fb.build("firstinsn", "O0-pie", out_dir=tmp_path)
    code = (
        "import os, sys\n"
        "from emuprobe.perfbridge import kernel\n"
        "k = kernel.KernelUprobes(group='emuprobe_atexit_test')\n"
        f"k.add({str(exe)!r}, {fb.symbol_offset(exe, 'f_push')})\n"
        "assert k.registered(), 'not registered'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(kernel.__file__).parents[2])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not group_listed("emuprobe_atexit_test")


@pytest.mark.parametrize("func", ["work", "t_atomic_inc"])  # emulated / native fallback
def test_kernel_uprobe_beside_ours_keeps_firing(tmp_path: Path, func: str) -> None:
    """A kernel uprobe on the instruction after one of ours, in a program
    whose worker threads exit before the main thread makes the last calls:
    the kernel sees every call, traced or not (emuprobe writes only its own
    byte, never the kernel's)."""
    exe = fb.build("threads", "O2-pie", out_dir=tmp_path)
    m, tail = 2000, 300
    calls = 8 * m + tail
    second = fb.symbol_offset(exe, func) + 5  # both first instructions are 5 bytes
    with kernel.KernelUprobes() as ku:
        event = ku.add(str(exe), second)
        t = run_traced(tmp_path, [func], [str(exe), str(m), str(tail)])
        traced = ku.hits()[event]
    assert t.status == 0, t.stderr
    assert t.stdout == fb.expected_stdout("threads", str(m), str(tail))
    assert hits(t) == {func: calls}
    assert traced == calls
