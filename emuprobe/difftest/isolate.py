"""Run part of a campaign in a forked worker, so that a crash inside Unicorn
costs that part, not the campaign.

Unicorn 2.1.4 has segfaulted once in a 150,000-case campaign, in a state
built up over many cases that the chunk alone did not reproduce.  A worker
gets its own sandbox and its own Unicorn (a ptraced child can only be driven
by its tracer, and a fresh machine keeps a crash from repeating), records
into a copy of the runner's scores and sends them back.  If it dies, the case
it was running (written to a file before each case) is recorded as a
mismatch of its class, so the class cannot be trusted.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable

from emuprobe.difftest.cases import Case
from emuprobe.difftest.compare import MISMATCH, Verdict
from emuprobe.difftest.oracle import Sandbox
from emuprobe.difftest.runner import Result, Runner, decode
from emuprobe.exec.execute import Emulator
from emuprobe.x86.classkey import class_key
from emuprobe.x86.decode import NativeStep, analyze


class StopCampaign(Exception):
    """Raised by a `stop` predicate to end the campaign at once."""


def stop_of(exc: BaseException) -> Result | None:
    """The Result a StopCampaign carries, also when Hypothesis wrapped it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StopCampaign):
            result: Result = seen.args[0]
            return result
        seen = seen.__cause__ or seen.__context__
    return None


def in_worker(runner: Runner, work: Callable[[], None]) -> Result | None:
    """Run `work` (which scores into `runner`) in a forked worker and merge
    its scores back.  Returns the Result that stopped it, if one did."""
    rd, wr = os.pipe()
    with tempfile.TemporaryFile() as last:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the worker; its exit status is checked below
            os.close(rd)
            _worker(runner, work, wr, last.fileno())
        os.close(wr)
        with os.fdopen(rd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if data:
            runner.stats, runner.cases, stopped = pickle.loads(data)
            return stopped  # type: ignore[no-any-return]
        last.seek(0)
        raw = last.read().split(b"\n", 1)[0]
    _record_crash(runner, raw, status)
    return None


def _worker(runner: Runner, work: Callable[[], None], wr: int, last_fd: int) -> None:
    code = 1
    sandbox = None
    try:
        runner.sandbox = sandbox = Sandbox()  # the parent's stays the parent's
        runner.emulator = Emulator()
        runner.explorer = Emulator() if runner.explore else runner.emulator
        runner.last_case_fd = last_fd
        stopped = None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - a stop, or a bug reported below
            stopped = stop_of(e)
            if stopped is None:
                raise
        with os.fdopen(wr, "wb") as f:
            f.write(pickle.dumps((runner.stats, runner.cases, stopped)))
        code = 0
    except BaseException:  # noqa: BLE001 - the parent sees no scores and says so
        traceback.print_exc()
    finally:
        if sandbox is not None:
            sandbox.close()
        os._exit(code)


def _record_crash(runner: Runner, raw: bytes, status: int) -> None:
    how = (
        f"signal {signal.Signals(os.WTERMSIG(status)).name}"
        if os.WIFSIGNALED(status)
        else f"exit status {os.WEXITSTATUS(status)}"
    )
    if not raw:
        raise RuntimeError(f"difftest worker died ({how}) before its first case")
    case = Case.from_json(json.loads(raw))
    insn = decode(case.code, case.site)
    key = class_key(insn) if insn is not None else "(undecodable)"
    plan = analyze(case.code, case.site, trusted_only=False)
    policy = plan.reason if isinstance(plan, NativeStep) else ""
    verdict = Verdict(MISMATCH, (f"the engine crashed the process ({how})",))
    mnem = insn.mnemonic if insn is not None else key
    print(f"difftest: a worker died ({how}) on {case.code.hex()} ({key}); recorded as a "
          "mismatch, the rest of its chunk is lost", file=sys.stderr)  # fmt: skip
    runner.record(Result(key, mnem, MISMATCH, verdict, policy, case))
