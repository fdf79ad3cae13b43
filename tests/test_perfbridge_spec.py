"""perf-probe definitions, uprobe_events lines and fetchargs, from a table of strings;
and the same definitions accepted by `perf probe -x` (as root, removed afterwards)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import fixturebuild as fb
from emuprobe.errors import ProbeError
from emuprobe.perfbridge import kernel
from emuprobe.spec.fetchargs import Addr, Comm, Deref, Imm, Reg, Retval, Stack
from emuprobe.spec.perf import binary_tag, parse_perf_probe, parse_uprobe_event
from emuprobe.spec.probe import parse_probe

# text, -> (name, binary, symbol, offset, retprobe, [(arg name, fetch, type name)])
PERF_GOOD = [
    ("fib", ("probe_app:fib", "fib", 0, False, [])),
    ("fib+4", ("probe_app:fib", "fib", 4, False, [])),
    ("fib%return", ("probe_app:fib__return", "fib", 0, True, [])),
    ("fib%return $retval", ("probe_app:fib__return", "fib", 0, True,
                            [("arg1", Retval(), "x64")])),
    ("ev=fib n=%di:s32", ("probe_app:ev", "fib", 0, False, [("n", Reg("di"), "s32")])),
    ("g:ev=fib %si:b3@2/8", ("g:ev", "fib", 0, False, [("arg1", Reg("si"), "b3@2/8")])),
    ("fib +0(%si):string $stack3 $comm", ("probe_app:fib", "fib", 0, False, [
        ("arg1", Deref(0, Reg("si")), "string"), ("arg2", Stack(3), "x64"),
        ("arg3", Comm(), "string")])),
    ("fib s=-8(+16(%sp)):u16 @0x1234:x8 @+0x10 \\7 \\-3:s8", ("probe_app:fib", "fib", 0, False, [
        ("s", Deref(-8, Deref(16, Reg("sp"))), "u16"), ("arg2", Addr(0x1234, False), "x8"),
        ("arg3", Addr(0x10, True), "x64"), ("arg4", Imm(7), "x64"), ("arg5", Imm(-3), "s8")])),
    ("fib%return r=+0($retval):string", ("probe_app:fib__return", "fib", 0, True,
                                         [("r", Deref(0, Retval()), "string")])),
    ("fib $stack +u8(%r12):u64 %flags", ("probe_app:fib", "fib", 0, False, [
        ("arg1", Stack(None), "x64"), ("arg2", Deref(8, Reg("r12")), "u64"),
        ("arg3", Reg("flags"), "x64")])),
]


@pytest.mark.parametrize("text,want", PERF_GOOD)
def test_perf_probe_good(text, want):
    s = parse_perf_probe(text, "/some/dir/app")
    name, symbol, offset, ret, args = want
    assert (s.name, s.binary, s.symbol, s.offset, s.retprobe) == (
        name, "/some/dir/app", symbol, offset, ret)
    assert [(a.name, a.fetch, a.type.name) for a in s.args] == args


UPROBE_GOOD = [
    # text, name, path, file offset, retprobe, arg names
    ("p /bin/app:0x1139", "uprobes:p_app_0x1139", "/bin/app", 0x1139, False, []),
    ("r /x/my-prog.x:0x1139", "uprobes:p_my_0x1139", "/x/my-prog.x", 0x1139, True, []),
    ("p /bin/app:4409%return", "uprobes:p_app_0x1139", "/bin/app", 4409, True, []),
    ("p:ev /bin/app:0x10 %di", "uprobes:ev", "/bin/app", 0x10, False, ["arg1"]),
    ("p:grp/ev /bin/app:0x10 a=%di b=+4($stack):s32", "grp:ev", "/bin/app", 0x10, False,
     ["a", "b"]),
    ("p:grp/ /lib/libc.so.6:0x20 $comm", "grp:p_libc_0x20", "/lib/libc.so.6", 0x20, False,
     ["arg1"]),
    ("r:grp/ev /bin/app:0x10 rv=$retval:s64", "grp:ev", "/bin/app", 0x10, True, ["rv"]),
]


@pytest.mark.parametrize("text,name,path,offset,ret,args", UPROBE_GOOD)
def test_uprobe_event_good(text, name, path, offset, ret, args):
    s = parse_uprobe_event(text)
    assert (s.name, s.binary, s.file_offset, s.retprobe, s.symbol) == (
        name, path, offset, ret, None)
    assert [a.name for a in s.args] == args


OWN_GOOD = [
    # emuprobe's own PROBE form with %return and fetchargs
    ("./app:parse%return $retval", "parse__return", True, ["arg1"]),
    ("libc:write fd=%di:s32 n=%dx:u64", "write", False, ["fd", "n"]),
    ("done=fib%return rv=$retval", "done", True, ["rv"]),
    ("./app:0x1139%return", "0x1139__return", True, []),
    ("fib  a=%di   b=%si", "fib", False, ["a", "b"]),
]


@pytest.mark.parametrize("text,name,ret,args", OWN_GOOD)
def test_own_form(text, name, ret, args):
    s = parse_probe(text)
    assert (s.name, s.retprobe, [a.name for a in s.args]) == (name, ret, args)


BAD = [
    # parser, text, 1-based column, words in the message
    ("perf", "fib %rdi", 5, "unknown register '%rdi'"),
    ("perf", "fib %rdi", 5, "did you mean %di"),
    ("perf", "fib $retval", 5, "only valid in a return probe"),
    ("perf", "fib n=%di:u12", 11, "unknown type 'u12'"),
    ("perf", "fib n=%di:string", 11, "memory reference"),
    ("perf", "fib n=$comm:u32", 13, "cannot hold a string"),
    ("perf", "fib x=%di:b9@0/8", 11, "bad bitfield"),
    ("perf", "fib counter", 5, "local variable"),
    ("perf", "fib $stackx", 5, "unknown variable"),
    ("perf", "fib +zz(%di)", 6, "offset 'zz'"),
    ("perf", "fib +8(%di", 5, "dereference"),
    ("perf", "fib a=%di a=%si", 11, "used twice"),
    ("perf", "fib 1a=%di", 5, "identifier"),
    ("perf", "fib@main.c", 4, "source files"),
    ("perf", "fib:12", 4, "line numbers"),
    ("perf", "fib+4%return", 4, "%return"),
    ("perf", "fib+x", 5, "offset 'x'"),
    ("perf", "9fib", 1, "not a function"),
    ("perf", "g-x:ev=fib", 1, "group"),
    ("perf", "fib \\zz", 6, "immediate"),
    ("perf", "fib @sym", 6, "not an address"),
    ("uprobe", "q /bin/app:0x10", 1, "starts with p or r"),
    ("uprobe", "p /bin/app", 3, "PATH:OFFSET"),
    ("uprobe", "p /bin/app:0xzz", 12, "offset '0xzz'"),
    ("uprobe", "p:g-x/ev /bin/app:0x10", 3, "group"),
    ("uprobe", "p /bin/app:0x10(0x20)", 16, "reference counters"),
    ("uprobe", "p /bin/app:0x10 $retval", 17, "return probe"),
    ("uprobe", "p /bin/app:0x10 +0(%di):strng", 25, "unknown type"),
    ("own", "fib+4%return", 1, "function's entry"),
    ("own", "fib %ax:s7", 9, "unknown type 's7'"),
    ("own", "fib $retval", 5, "return probe"),
]


@pytest.mark.parametrize("parser,text,column,words", BAD)
def test_bad(parser, text, column, words):
    parse = {
        "perf": lambda t: parse_perf_probe(t, "/bin/app"),
        "uprobe": parse_uprobe_event,
        "own": parse_probe,
    }[parser]
    with pytest.raises(ProbeError) as err:
        parse(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{text}'" in msg
    assert f"column {column}:" in msg, msg
    assert words in msg


def test_binary_tag_is_perfs():
    assert binary_tag("/usr/lib/x86_64-linux-gnu/libc.so.6") == "libc"
    assert binary_tag("/tmp/my-prog.x") == "my"
    assert binary_tag("/tmp/pb_ret") == "pb"


# -- the same text accepted by perf probe -x ------------------------------------------------

_OK, _WHY = kernel.available()
PERF = shutil.which("perf")

ACCEPTED_BY_BOTH = [
    "pb_fib n=%di:s32",
    "pb_fib%return $retval",
    "pb_fib%return rv=$retval:s32",
    "pbg:ev=pb_fib %di:u8 $stack $stack1 $comm",
    "pb_fib x=+8(%sp):x32 y=-8(+16(%sp)):s16 @+0x10 \\7",
    "pb_values s=+0(%r8):string b=+0(%r9):b5@3/32",
    "pb_fib+4",
]


@pytest.mark.skipif(not _OK or PERF is None, reason=f"needs perf and kernel uprobes: {_WHY}")
@pytest.mark.parametrize("binary", ["fixture", "libc"])
def test_perf_probe_accepts_the_same_definitions(tmp_path, binary):
    if binary == "fixture":
        exe = str(fb.build("pb_ret", "O0-pie", out_dir=tmp_path))
        defs = ACCEPTED_BY_BOTH
    else:
        exe = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
        defs = ["pbl:w=write fd=%di:s32 n=%dx:u64", "pbl:m=malloc%return $retval",
                "pbl:s=puts +0(%di):string"]
    uniq = f"pbt{os.getpid()}"
    try:
        for i, text in enumerate(defs):
            parse_perf_probe(text, exe)  # emuprobe accepts it...
            # ...and so does perf, under a private group so that nothing else is touched.
            loc, _, rest = text.partition(" ")
            perf_text = f"{uniq}:e{i}={loc.split('=', 1)[-1]} {rest}".strip()
            parse_perf_probe(perf_text, exe)
            done = subprocess.run([PERF, "probe", "-q", "-x", exe, "-a", perf_text],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (perf_text, done.stderr)
    finally:
        subprocess.run([PERF, "probe", "-q", "-d", f"{uniq}:*"], capture_output=True, timeout=60)
    with open(os.path.join(kernel.tracefs_dir(), "uprobe_events")) as f:
        assert uniq not in f.read()
