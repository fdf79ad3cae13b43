"""Fetched values equal the kernel's trace output for the same hits.

The same definitions run once under kernel uprobes (read from a private
tracefs instance) and once under emuprobe, on a private copy of the fixture
with ASLR off and the same environment, so even stack addresses agree.  Every
kernel uprobe registered here is removed (KernelUprobes checks it).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import fixturebuild as fb
from conftest import run_traced
from emuprobe.perfbridge import kernel

_OK, _WHY = kernel.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"kernel uprobes unavailable: {_WHY}")

ENTRY_ARGS = (
    "u=%di:u8 s=%si:s16 i=%dx:s32 l=%cx:s64 x=%cx cx8=%cx:x8 cu16=%cx:u16 x32=%dx:x32"
    " str=+0(%r8):string low=+0(%r9):b3@0/32 mid=+0(%r9):b5@3/32 high=+0(%r9):b8@8/32"
    " big=+8(%r9):s64 nested=+0(+8(%sp)):x64 c=$comm imm=\\42 neg=\\-5:s16 ra=$stack0"
    " sp=$stack st2=$stack2:u32 magic=@+0:x32 bad=@0x10:string badn=@0x10:u32"
)
RETURN_ARGS = "rv=$retval:s64 rx=$retval rb=$retval:u8"

TRACE_LINE = re.compile(r"^\s*(?P<head>\S.*?)\s+\[\d+\]\s+\S+\s+[\d.]+: (?P<ev>\w+): (?P<rest>.*)$")
OUR_LINE = re.compile(r"^\s*\S+\s+\d+/\d+\s+[\d.]+: (?P<ev>\S+): (?P<rest>.*)$")


def test_values_equal_kernel_trace(tmp_path):
    exe = str(fb.build("pb_ret", "O0-pie", out_dir=tmp_path / "bin"))
    off = fb.symbol_offset(exe, "pb_values")
    # ASLR off and an empty environment: the stack is laid out alike in both runs.
    argv = [shutil.which("env") or "env", "-i", shutil.which("setarch") or "setarch", "-R",
            exe, "values", "6"]
    with kernel.KernelUprobes() as k, kernel.TraceInstance() as inst:
        k.add(exe, off, name="vals", args=ENTRY_ARGS)
        k.add(exe, off, name="vals_ret", retprobe=True, args=RETURN_ARGS)
        inst.enable(k.group, "vals")
        inst.enable(k.group, "vals_ret")
        plain = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        lines = inst.lines()
    assert plain.returncode == 0
    theirs: dict[str, list[str]] = {"vals": [], "vals_ret": []}
    for ln in lines:
        m = TRACE_LINE.match(ln)
        assert m, ln
        theirs[m["ev"]].append(m["rest"])
    assert len(theirs["vals"]) == len(theirs["vals_ret"]) == 6

    defs = tmp_path / "defs.txt"
    defs.write_text(f"# the same lines as the kernel got\n"
                    f"p:k/vals {exe}:{off:#x} {ENTRY_ARGS}\n"
                    f"r:k/vals_ret {exe}:{off:#x} {RETURN_ARGS}\n")
    t = run_traced(tmp_path, [], argv, "--events", str(defs))
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    ours: dict[str, list[str]] = {"k:vals": [], "k:vals_ret": []}
    for ln in t.events:
        m = OUR_LINE.match(ln)
        assert m, ln
        ours[m["ev"]].append(m["rest"])
    # The whole rest of the line: "(0xADDR) u=250 s=-300 ..." and for the
    # return "(0xRET <- 0xFUNC) rv=...", character for character.
    assert ours["k:vals"] == theirs["vals"]
    assert ours["k:vals_ret"] == theirs["vals_ret"]
    assert 'str="even"' in ours["k:vals"][0] and "bad=(fault)" in ours["k:vals"][0]
