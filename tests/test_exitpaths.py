"""Every way out of a session rewinds, restores and detaches: a closed output
pipe, a handler's BaseException.  Each test checks the tracee from outside
afterwards: its own checksum, its output against an untraced run, its text
against the file, its TracerPid."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from test_lifecycle import finish_loop, start_loop, text_matches_file, tracer_pid

from conftest import EMUPROBE, wait_for
from emuprobe.api import Tracer
from fixturebuild import build, run


@pytest.mark.parametrize("stderr_to_file", [False, True], ids=["stderr-pipe", "stderr-file"])
def test_closed_output_pipe_ends_the_trace_quietly(tmp_path, procs, stderr_to_file):
    """`emuprobe trace -p PID f | head -3`: emuprobe exits 0 without a word,
    and the thread it had stopped on the probe resumes on the instruction."""
    exe, target = start_loop(procs, "O0-pie")
    for attempt in range(3):
        err = open(tmp_path / f"err{attempt}", "w+") if stderr_to_file else subprocess.PIPE
        tracer = procs.start([*EMUPROBE, "trace", "-p", str(target.pid), "loop_func"],
                             stderr=err)  # fmt: skip
        lines = [tracer.stdout.readline() for _ in range(3)]
        assert all("loop_func: (0x" in line for line in lines), lines
        tracer.stdout.close()  # the reader goes away, as `head -3` does
        tracer.wait(timeout=60)
        message = err.read() if stderr_to_file else tracer.stderr.read()  # type: ignore[union-attr]
        assert tracer.returncode == 0 and message == ""
        assert wait_for(lambda: tracer_pid(target.pid) == 0)
        assert text_matches_file(target.pid, exe, ["loop_func", "main"])
    assert "checksum_ok=1" in finish_loop(target)


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_handler_base_exception_leaves_the_tracee_exact(capfd, exc):
    """The exception reaches the caller of run(); the command, detached, runs
    on and prints what it prints untraced."""
    exe = build("firstinsn", "O0-pie")
    plain = run(exe, "200").stdout
    t = Tracer.spawn([str(exe), "200"])
    seen = []

    def handler(ev) -> None:  # type: ignore[no-untyped-def]
        seen.append(ev)
        if len(seen) == 10:
            raise exc()

    t.probe("f_push", handler)  # push rbp: resumed one byte in, the push is skipped
    with pytest.raises(exc):
        t.run()
    pid = t.session.stops.root_pid
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert capfd.readouterr().out == plain
    assert len(seen) == 10


def test_repair_after_emuprobe_was_killed(procs):
    """SIGKILL leaves the int3s in an attached process; `emuprobe repair`
    restores them from the file, and the process then runs on unharmed."""
    exe, target = start_loop(procs, "O0-pie")
    os.kill(target.pid, signal.SIGSTOP)  # no hit may come while nobody owns the int3
    tracer = procs.start([*EMUPROBE, "trace", "--count", "-p", str(target.pid), "loop_func"])
    assert wait_for(lambda: tracer_pid(target.pid) == tracer.pid)
    assert wait_for(lambda: not text_matches_file(target.pid, exe, ["loop_func"]))  # planted
    tracer.kill()
    tracer.wait(timeout=30)
    assert wait_for(lambda: tracer_pid(target.pid) == 0)
    done = subprocess.run([*EMUPROBE, "repair", "-p", str(target.pid)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Our probe's byte, and maybe the ld.so rendezvous int3 every session plants.
    restored = [line.split()[1] for line in done.stdout.splitlines()[1:]]
    assert "restored" in done.stdout and any(p.startswith(f"{exe}+") for p in restored)
    assert all(p.startswith(f"{exe}+") or "/ld-linux" in p for p in restored), done.stdout
    assert text_matches_file(target.pid, exe, ["loop_func", "main"])
    os.kill(target.pid, signal.SIGCONT)
    assert "checksum_ok=1" in finish_loop(target)
    again = subprocess.run([*EMUPROBE, "repair", "-p", str(procs.start(["sleep", "30"]).pid)],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and "no stray int3" in again.stdout
