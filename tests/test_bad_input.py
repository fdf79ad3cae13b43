"""Bad input of every kind: one line naming the problem, exit status 2, no
traceback, and the tracee (where there is one) untouched."""

from __future__ import annotations

import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lifecycle import _fails_cleanly, finish_loop, start_loop, text_matches_file, tracer_pid

from emuprobe.cli import main
from fixturebuild import build


def test_bad_files_and_specs(tmp_path):
    exe = build("firstinsn", "O0-pie")
    truncated = tmp_path / "truncated"
    truncated.write_bytes(exe.read_bytes()[:3000])
    truncated.chmod(0o755)
    nonutf8, nul = tmp_path / "nonutf8.ev", tmp_path / "nul.ev"
    nonutf8.write_bytes(f"p:g/e {exe}:0x10\xff\n".encode("latin-1"))
    nul.write_bytes(f"p:g/e {exe}:0x10\0\n".encode())
    _fails_cleanly(["trace", "main", "--", str(truncated)], "truncated ELF")
    _fails_cleanly(["list", str(truncated)], "truncated ELF")
    _fails_cleanly(["trace", "--events", str(nonutf8), "--", str(exe)], "line 1", "UTF-8")
    _fails_cleanly(["trace", "--events", str(nul), "--", str(exe)], "line 1", "NUL")
    _fails_cleanly(["trace", "--events", "/dev/zero", "--", str(exe)], "/dev/zero", "MiB")
    for arg, words in (
        ("+99999999999999999999999(%sp)", ("offset", "out of range")),
        ("@0x1ffffffffffffffff", ("address", "out of range")),
        ("$stack512", ("$stack index", "out of range")),
        ("\\99999999999999999999999", ("immediate", "out of range")),
    ):
        _fails_cleanly(["trace", f"f_push a={arg}", "--", str(exe)], *words)


def test_kernel_thread_and_protected_symlink(tmp_path, procs):
    _fails_cleanly(["trace", "-p", "2", "main"], "PID 2", "kernel thread")
    exe, target = start_loop(procs)
    # a link another user planted in a sticky world-writable directory
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = shared / "out.txt"
    link.symlink_to(victim)
    os.lchown(link, 65534, 65534)  # nobody's
    for opt in ("-o", "--stats-json"):
        _fails_cleanly(["trace", opt, str(link), "-p", str(target.pid), "loop_func"],
                       "symlink", "not followed")  # fmt: skip
    assert victim.read_text() == "precious\n"
    assert tracer_pid(target.pid) == 0
    assert text_matches_file(target.pid, exe, ["loop_func"])
    assert "checksum_ok=1" in finish_loop(target)


_SPEC_CHARS = string.ascii_letters + string.digits + "_:+-%$@()\\\"=.,*?[] /\t\x00\xff"


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    specs=st.lists(st.text(_SPEC_CHARS, max_size=40), min_size=1, max_size=3),
    events=st.lists(st.text(_SPEC_CHARS + "\n", max_size=60), max_size=3),
    path=st.sampled_from(["", "/", "/dev/null", "/etc/passwd", "/proc/self/mem", "x:y", "\x00"]),
    opts=st.lists(st.sampled_from(["--count", "--stack", "--hist", "latency", "-x", "--by",
                                   "--format", "jsonl", "-k", "x:y", "--no-follow"]),
                  max_size=3),  # fmt: skip
)
def test_cli_never_tracebacks(tmp_path_factory, capsys, specs, events, path, opts):
    """Random specs, --events lines, binaries and options: exit 0 or 2, never
    a traceback or an internal error."""
    tmp = tmp_path_factory.mktemp("fuzz")
    ev = tmp / "events"
    ev.write_text("\n".join(events).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    argv = ["trace", *opts, *(["--events", str(ev)] if events else []), *specs]
    if path:
        argv.append(f"{path}:main")
    try:
        status = main([*argv, "--", "/bin/true"])
    except SystemExit as e:  # argparse's usage errors exit from inside main()
        status = e.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status in (0, 2), (argv, err)
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
