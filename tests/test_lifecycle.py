"""Attach, detach, Ctrl-C, SIGTERM, SIGKILL, group-stop, bad input, no root.

Each test checks the tracee afterwards from outside: its text bytes against
the file, its TracerPid, its own printed checksum.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import EMUPROBE, children_of, wait_for, wait_looping
from emuprobe.sys.maps import read_maps
from fixturebuild import build, run, symbol_vaddr


def text_matches_file(pid: int, exe: Path, symbols: list[str]) -> bool:
    """Whether the bytes at each symbol in the live process equal the file's."""
    maps = [m for m in read_maps(pid) if m.is_file and os.path.samefile(m.path, exe)]
    base = min(m.start - m.offset for m in maps)  # load bias (PIE) or 0
    from fixturebuild import vaddr_to_offset

    data = exe.read_bytes()
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for s in symbols:
            vaddr = symbol_vaddr(exe, s)
            addr = vaddr if not any(m.start - m.offset for m in maps) else base + vaddr
            mem.seek(addr)
            off = vaddr_to_offset(exe, vaddr)
            if mem.read(16) != data[off : off + 16]:
                return False
    return True


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rfind(")") + 2]


def start_loop(procs, variant="O2-pie"):
    exe = build("loop", variant)
    target = procs.start([str(exe), "0"])
    assert wait_looping(target.pid, exe), "the loop never reached its loop"
    return exe, target


def finish_loop(target) -> str:
    target.send_signal(signal.SIGTERM)
    out, _ = target.communicate(timeout=20)
    return out


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_attach_trace_detach_leaves_process_unharmed(tmp_path, procs, stop_with):
    exe, target = start_loop(procs)
    stats, printed = tmp_path / "s.json", tmp_path / "out.txt"
    with open(printed, "w") as stdout:  # a file, so that the lines can be counted meanwhile
        tracer = procs.start(
            [*EMUPROBE, "trace", "--stats-json", str(stats), "-p", str(target.pid), "loop_func"],
            stdout=stdout,
        )
    assert wait_for(lambda: tracer_pid(target.pid) == tracer.pid)
    # emuprobe prints a line per hit: stop it once more than 100 are out
    assert wait_for(lambda: _lines(printed) > 100, timeout=60)
    tracer.send_signal(stop_with)
    _, err = tracer.communicate(timeout=30)
    out = printed.read_text()
    assert tracer.returncode == 0, err
    assert tracer_pid(target.pid) == 0
    assert text_matches_file(target.pid, exe, ["loop_func", "main"])
    hit_count = json.loads(stats.read_text())["probes"]["loop_func"]["hits"]
    assert hit_count > 100
    assert len(out.splitlines()) == hit_count
    assert "checksum_ok=1" in finish_loop(target)


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def _voluntary_switches(pid: int) -> dict[int, int]:
    """Each thread's voluntary context switches: a spinning thread makes one
    at each ptrace stop, so at each hit on our int3."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("voluntary_ctxt_switches:"))
        except (OSError, StopIteration):
            continue  # the thread is gone
        counts[int(tid)] = int(line.split()[1])
    return counts


def _workers_trapping(pid: int, before: dict[int, int]) -> bool:
    """Every worker thread stopped 50 times since `before`: far more than
    being attached takes, so each is hitting our int3 over and over."""
    now = _voluntary_switches(pid)
    return all(now.get(t, 0) - n >= 50 for t, n in before.items() if t != pid)


def test_detach_while_threads_are_trapped(tmp_path, procs):
    """Threads already stopped on our int3 at detach must be rewound, not killed."""
    exe = build("threads", "O2-pie")
    for _ in range(3):
        target = procs.start([str(exe), "2000000000"])
        # the main thread and its 8 workers, all started
        assert wait_for(lambda: len(_voluntary_switches(target.pid)) == 9)  # noqa: B023
        before = _voluntary_switches(target.pid)
        tracer = procs.start([*EMUPROBE, "trace", "--count", "-p", str(target.pid), "work"])
        assert wait_for(lambda: tracer_pid(target.pid) == tracer.pid)  # noqa: B023
        assert wait_for(lambda: _workers_trapping(target.pid, before), timeout=60)  # noqa: B023
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=60)
        assert tracer.returncode == 0
        assert text_matches_file(target.pid, exe, ["work"])
        target.send_signal(signal.SIGKILL)
        target.wait(timeout=10)
        # Dying of SIGKILL (ours) rather than SIGTRAP proves no int3 was left.
        assert target.returncode == -signal.SIGKILL


def test_spawn_sigterm_removes_breakpoints_and_forwards(procs):
    tracer, _ = spawn_loop(procs)
    tracer.send_signal(signal.SIGTERM)
    out, err = tracer.communicate(timeout=30)
    # The command got the SIGTERM (strace does the same) and finished cleanly.
    assert "checksum_ok=1" in out, (tracer.returncode, err)
    assert tracer.returncode == 0


def spawn_loop(procs):
    """`emuprobe trace` a never-ending loop; (emuprobe, the loop's pid) once it runs."""
    exe = build("loop", "O0-pie")
    tracer = procs.start([*EMUPROBE, "trace", "--count", "loop_func", "--", str(exe), "0"])
    def loop_child() -> list[int]:
        return [c for c in children_of(tracer.pid) if _exe(c) == str(exe)]

    assert wait_for(lambda: bool(loop_child()))
    child = loop_child()[0]
    assert wait_looping(child, exe), "the traced loop never reached its loop"
    return tracer, child


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def test_spawn_sigkill_of_emuprobe_kills_the_command(procs):
    tracer, child = spawn_loop(procs)
    tracer.kill()
    tracer.wait(timeout=10)
    # PTRACE_O_EXITKILL: the command must not run on with unhandled int3s.
    assert wait_for(lambda: not os.path.exists(f"/proc/{child}") or state(child) in "ZX")


def test_group_stop_is_kept(procs):
    tracer, child = spawn_loop(procs)
    os.kill(child, signal.SIGSTOP)
    assert wait_for(lambda: state(child) in "Tt")
    ticks = _cpu_ticks(child)
    # emuprobe has taken the stop and gone back to waiting, the command still
    # stopped: a command it resumed would hit loop_func and wake it at once
    assert wait_for(lambda: _settled(tracer.pid, child)), "emuprobe never settled"
    assert state(child) in "Tt" and _cpu_ticks(child) == ticks  # stayed stopped
    os.kill(child, signal.SIGCONT)
    assert wait_for(lambda: _cpu_ticks(child) > ticks)
    os.kill(child, signal.SIGTERM)
    out, err = tracer.communicate(timeout=30)
    assert "checksum_ok=1" in out, err


def _settled(tracer: int, child: int) -> bool:
    """Two looks in a row at both processes see the same thing: every thread
    of the tracer asleep, the child stopped, and not one of them switched in
    or out in between (no context-switch count moved)."""
    tasks = [f"/proc/{tracer}/task/{tid}" for tid in os.listdir(f"/proc/{tracer}/task")]
    first = [_task_look(t) for t in [*tasks, f"/proc/{child}"]]
    *tracer_threads, child_look = first
    if child_look[0] not in "tT" or any(look[0] != "S" for look in tracer_threads):
        return False
    return [_task_look(t) for t in [*tasks, f"/proc/{child}"]] == first


def _task_look(task: str) -> tuple[str, str, str]:
    """A task's state letter and its voluntary and involuntary context switches."""
    with open(f"{task}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return (fields["State"].split()[0], fields["voluntary_ctxt_switches"].strip(),
            fields["nonvoluntary_ctxt_switches"].strip())  # fmt: skip


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# -- bad input ---------------------------------------------------------------------


def _fails_cleanly(argv: list[str], *words: str) -> str:
    done = subprocess.run([*EMUPROBE, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_bad_input_spawn(tmp_path):
    exe = str(build("firstinsn", "O0-pie"))
    text = tmp_path / "notelf"
    text.write_text("hello\n")
    _fails_cleanly(["trace", "f_pusj", "--", exe], "f_pusj", "did you mean", "f_push")
    _fails_cleanly(["trace", "f_subrsp+1", "--", exe], "f_subrsp+1", "boundary")
    _fails_cleanly(["trace", f"{text}:main", "--", exe], "not an ELF")
    _fails_cleanly(["trace", "/nonexistent/x:main", "--", exe], "no such file")
    _fails_cleanly(["trace", "libnothere:foo", "--", exe], "libnothere", "not found")
    _fails_cleanly(["trace", "main", "--", "no-such-command-xyz"], "command not found")
    _fails_cleanly(["trace", "ma-in", "--", exe], "column")
    _fails_cleanly(["trace", f"{exe}:0x10", "--", exe], "not in executable code")
    _fails_cleanly(["trace", "main"], "nothing to trace")
    _fails_cleanly(["trace", "--bogus", "main", "--", exe], "--bogus")
    _fails_cleanly(["list", str(text)], "not an ELF")


def test_bad_input_attach_leaves_tracee_untouched(procs):
    exe, target = start_loop(procs)
    pid = str(target.pid)
    _fails_cleanly(["trace", "-p", pid, "nosuchfn"], "nosuchfn")
    _fails_cleanly(["trace", "-p", pid, "loop_func+1"], "boundary")
    _fails_cleanly(["trace", "-p", pid, "libm:cos"], "libm", "not mapped")
    _fails_cleanly(["trace", "-p", "999999999", "main"], "no process", "999999999")
    assert tracer_pid(target.pid) == 0
    assert text_matches_file(target.pid, exe, ["loop_func", "main"])
    # Already traced (by strace here, as it would be by gdb).
    strace = procs.start(["strace", "-o", "/dev/null", "-p", pid])
    assert wait_for(lambda: tracer_pid(target.pid) == strace.pid)
    _fails_cleanly(["trace", "-p", pid, "loop_func"], "already traced", str(strace.pid))
    strace.send_signal(signal.SIGINT)
    strace.wait(timeout=10)
    assert "checksum_ok=1" in finish_loop(target)


# -- no root ----------------------------------------------------------------------

USER = "emuprobe-test"


@pytest.fixture(scope="module")
def unprivileged_uid():
    if os.geteuid() != 0:
        return os.geteuid()  # already unprivileged: the test runs as is
    try:
        return pwd.getpwnam(USER).pw_uid
    except KeyError:
        done = subprocess.run(["useradd", "--system", "--no-create-home", USER],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot create an unprivileged user: {done.stderr.strip()}")
        return pwd.getpwnam(USER).pw_uid


def test_traces_own_child_without_root(unprivileged_uid):
    """The case kernel uprobes, perf and bpftrace cannot serve: no privileges at all."""
    import shutil
    import tempfile

    from emuprobe.api import Tracer

    src = build("firstinsn", "O2-pie")
    expected = run(src, "100").stdout
    # pytest's tmp dirs are private to root; this one the user can enter.
    work = Path(tempfile.mkdtemp(prefix="emuprobe-noroot-"))
    try:
        work.chmod(0o777)
        exe = work / "firstinsn"
        shutil.copy(src, exe)
        exe.chmod(0o755)
        out = work / "out.json"
        # Everything is imported and set up before privileges are dropped: the
        # interpreter under /root is not readable afterwards.
        tracer = Tracer.spawn([str(exe), "100"])
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(unprivileged_uid)
                os.setuid(unprivileged_uid)
                # Dropping root clears "dumpable", which a user's shell-started
                # emuprobe has; without it the kernel refuses ptrace of our child.
                import ctypes

                ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
                tracer.probe("f_push")
                tracer.probe("f_riprel_load")
                r, w = os.pipe()
                saved = os.dup(1)
                os.dup2(w, 1)
                status = tracer.run()
                os.dup2(saved, 1)
                os.close(w)
                printed = os.read(r, 1 << 20).decode()
                out.write_text(json.dumps({
                    "status": status, "uid": os.getuid(), "stdout": printed,
                    "hits": {p.name: p.hits for p in tracer.probes},
                }))
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()  # the test's stderr shows why the child failed
            finally:
                os._exit(code)
        _, st = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(st) == 0
        got = json.loads(out.read_text())
        assert got["uid"] != 0 and got["status"] == 0
        assert got["stdout"] == expected
        assert got["hits"] == {"f_push": 100, "f_riprel_load": 100}
    finally:
        shutil.rmtree(work, ignore_errors=True)
