"""Probed code that goes away and comes back: dlclose/dlopen cycles keep
every hit, and memory that is no longer the probed file is never written."""

from __future__ import annotations

import signal
import subprocess

from test_lifecycle import tracer_pid

from conftest import EMUPROBE, hits, run_traced, wait_for
from fixturebuild import build, run


def test_dlclose_dlopen_cycles_lose_no_hit(tmp_path):
    exe = build("dlcycle", "O2-pie")
    plain = run(exe, "50", "10")
    assert plain.returncode == 0 and "calls dl_func=500" in plain.stdout
    t = run_traced(tmp_path, ["libemudl.so:dl_func"], [str(exe), "50", "10"])
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    assert hits(t) == {"dl_func": 500}


def test_detach_never_writes_into_what_replaced_the_file(procs):
    """After dlclose the program maps a data page where dl_func was; ending
    the trace then must not put dl_func's saved byte into that page."""
    exe = build("dlcycle", "O2-pie")
    prog = procs.start([str(exe), "3", "5", "remap"], stdin=subprocess.PIPE)
    assert prog.stdout.readline() == "READY\n"
    lib = exe.parent / "libemudl.so"  # attaching: a library not yet mapped is named by path
    tracer = procs.start([*EMUPROBE, "trace", "--count", "-p", str(prog.pid),
                          f"{lib}:dl_func"])  # fmt: skip
    assert wait_for(lambda: tracer_pid(prog.pid) == tracer.pid)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    out = [prog.stdout.readline() for _ in range(3)]
    assert out[2] == "REMAPPED\n", out
    tracer.send_signal(signal.SIGINT)  # detach while the page holds the program's data
    _, table = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, table
    assert "dl_func" in table and " 15 " in table  # every hit, across three dlopens
    assert wait_for(lambda: tracer_pid(prog.pid) == 0)
    rest, _ = prog.communicate("go\n", timeout=30)
    assert rest == "page_ok=1\n" and prog.returncode == 0
