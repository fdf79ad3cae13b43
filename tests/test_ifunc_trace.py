"""An IFUNC probe (`libc:strlen`) lands on the implementation the dynamic
linker selected, counted against kernel uprobes placed by the program's own
account of that choice (dladdr in the tracee)."""

from __future__ import annotations

import os
import re

import pytest

import fixturebuild as fb
from conftest import hits, run_traced
from emuprobe.perfbridge import kernel

_OK, _WHY = kernel.available()


@pytest.mark.skipif(not _OK, reason=f"kernel uprobes unavailable: {_WHY}")
def test_ifunc_probe_hits_selected_implementation(tmp_path):
    exe = fb.build("strlen_calls", "O2-pie")
    plain = fb.run(exe, "300")
    assert plain.returncode == 0, plain.stderr
    vaddr = int(re.search(r"impl_vaddr=(0x[0-9a-f]+)", plain.stdout).group(1), 16)  # type: ignore[union-attr]
    libc = os.path.realpath(re.search(r"libc=(\S+)", plain.stdout).group(1))  # type: ignore[union-attr]
    # The kernel counts system-wide on libc's inode; perf stat restricts it to
    # this command (see test_vs_kernel._perf_counts).
    from test_vs_kernel import _perf_counts

    k = kernel.KernelUprobes()
    try:
        event = f"{k.group}:{k.add(libc, fb.vaddr_to_offset(libc, vaddr), name='strlen_impl')}"
        kernel_count = _perf_counts([event], [str(exe), "300"])["strlen_impl"]
    finally:
        k.remove()
    t = run_traced(tmp_path, ["libc:strlen"], [str(exe), "300"])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    assert kernel_count >= 300
    assert hits(t)["strlen"] == kernel_count
