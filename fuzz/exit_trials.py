"""Exit-path trials: end an attached trace at random moments, and close its
output early, then check the tracee from outside.

    python fuzz/exit_trials.py [--signals 100] [--heads 20] [--seed 1]

A fresh 8-thread target (tests/fixtures/threads.c, built here with gcc) is
attached with `emuprobe trace -p PID work t_atomic_inc` (an emulated and a
native-fallback site); after a random delay (0-400 ms) emuprobe gets SIGINT
or SIGTERM.  Then: emuprobe exited 0, the target is no longer traced, its
text equals the file at both probed functions, it is alive, and when it ends
its own self-checks (counter and sum) are clean.  The --heads trials do the
same with `emuprobe trace ... | head -1` instead of a signal.  Prints a
line per failure and a summary; exit status 1 if any trial failed.
Not part of `make test`: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMUPROBE = [sys.executable, "-m", "emuprobe"]
PROBES = ["work", "t_atomic_inc"]
ITERATIONS = 2_000_000_000  # per thread: runs far longer than a trial


def build(out: Path) -> Path:
    exe = out / "threads"
    src = REPO / "tests" / "fixtures" / "threads.c"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def symbol_bytes(exe: Path, names: list[str]) -> dict[str, tuple[int, bytes]]:
    """name -> (vaddr, the file's first 16 bytes there)."""
    from elftools.elf.elffile import ELFFile

    out = {}
    with open(exe, "rb") as f:
        elf = ELFFile(f)
        syms = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
        for name in names:
            vaddr = syms[name]
            off = next(seg["p_offset"] + vaddr - seg["p_vaddr"] for seg in elf.iter_segments()
                       if seg["p_type"] == "PT_LOAD"
                       and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"])  # fmt: skip
            f.seek(off)
            out[name] = (vaddr, f.read(16))
    return out


def text_ok(pid: int, exe: Path, expect: dict[str, tuple[int, bytes]]) -> bool:
    base = min(int(line.split("-")[0], 16) for line in open(f"/proc/{pid}/maps")
               if line.rstrip().endswith(str(exe)))  # fmt: skip
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for vaddr, want in expect.values():
            mem.seek(base + vaddr)
            if mem.read(16) != want:
                return False
    return True


def started(pid: int, exe: Path) -> bool:
    """The child has exec'd `exe` (before that it is a copy of this Python)."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(exe)
    except OSError:
        return False


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(x for x in f if x.startswith("TracerPid:")).split()[1])


def wait_until(pred, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def trial(exe: Path, expect: dict[str, tuple[int, bytes]], rng: random.Random,
          how: str) -> str | None:  # fmt: skip
    """One trial; None if the target came through unharmed, else what went wrong."""
    target = subprocess.Popen([str(exe), str(ITERATIONS)], stdout=subprocess.PIPE, text=True)
    tracer: subprocess.Popen[str] | None = None
    try:
        if not wait_until(lambda: started(target.pid, exe)):
            return "target never started"
        argv = [*EMUPROBE, "trace", "-p", str(target.pid), *PROBES]
        if how == "head":
            tracer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)  # fmt: skip
            assert tracer.stdout is not None
            tracer.stdout.readline()  # `| head -1`: one line, then the reader is gone
            tracer.stdout.close()
        else:
            tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)  # fmt: skip
            if not wait_until(lambda: tracer_pid(target.pid) == tracer.pid):
                return "never attached"
            time.sleep(rng.uniform(0, 0.4))  # a random moment: hits in flight, threads trapped
            tracer.send_signal(signal.SIGINT if how == "int" else signal.SIGTERM)
        tracer.wait(timeout=120)
        err = tracer.stderr.read() if tracer.stderr else ""
        if tracer.returncode != 0:
            return f"emuprobe exited {tracer.returncode}: {err.strip()[-200:]}"
        if not wait_until(lambda: tracer_pid(target.pid) == 0):
            return "still traced"
        if target.poll() is not None:
            return f"target died ({target.returncode}); emuprobe said: {err.strip()[-300:]!r}"
        if not text_ok(target.pid, exe, expect):
            return "text differs from the file"
        target.send_signal(signal.SIGKILL)  # the self-checks need the end: run a short one instead
        return None
    finally:
        for p in (tracer, target):
            if p is not None and p.poll() is None:
                p.kill()
            if p is not None:
                p.wait()


def self_check_run(exe: Path, rng: random.Random) -> str | None:
    """A short target that finishes while traced and detached mid-way: its
    own counter and sum checks (threads.c prints them) must be clean."""
    m = 200_000
    target = subprocess.Popen([str(exe), str(m)], stdout=subprocess.PIPE, text=True)
    wait_until(lambda: started(target.pid, exe))
    tracer = subprocess.Popen([*EMUPROBE, "trace", "--count", "-p", str(target.pid), *PROBES],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until(lambda: tracer_pid(target.pid) == tracer.pid)
    time.sleep(rng.uniform(0, 0.2))
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=120)
    out, _ = target.communicate(timeout=600)
    n = 8 * m
    want = f"counter={n}\nsum={n * (n - 1) // 2}\n"
    return None if out.endswith(want) and target.returncode == 0 else f"self-check: {out!r}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", type=int, default=100)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        expect = symbol_bytes(exe, PROBES)
        plan = [rng.choice(["int", "term"]) for _ in range(args.signals)] + ["head"] * args.heads
        failures = 0
        t0 = time.monotonic()
        for i, how in enumerate(plan):
            why = trial(exe, expect, rng, how)
            if why is None and i % 10 == 0:
                why = self_check_run(exe, rng)
            if why is not None:
                failures += 1
                print(f"trial {i} ({how}): {why}", flush=True)
        print(f"{len(plan)} trials ({args.signals} SIGINT/SIGTERM at random moments, "
              f"{args.heads} '| head -1'), {failures} failed, {time.monotonic() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
