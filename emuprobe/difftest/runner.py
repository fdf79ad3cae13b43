"""Run cases through the oracle and the engine, and keep score per class."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import capstone
from capstone import x86_const as csx

from emuprobe.difftest.cases import Case
from emuprobe.difftest.compare import MATCH, MISMATCH, Verdict, compare
from emuprobe.difftest.oracle import Sandbox
from emuprobe.disasm import decode
from emuprobe.exec.execute import Emulator
from emuprobe.x86 import policy
from emuprobe.x86.classkey import class_key
from emuprobe.x86.decode import NativeStep, UnicornStep, analyze

POLICY = "policy"  # the engine refuses the class by policy (explored with it off)
NOPLAN = "noplan"  # nothing to compare: undecodable, unsafe to run, or not transferable

# Never single-stepped in the sandbox: they would act outside the instruction's
# own state (a syscall with random registers could kill(-1, SIGKILL) as root),
# or leave state behind that SETREGS/SETFPREGS do not restore (PKRU, CS/SS).
NEVER_NATIVE = frozenset(
    """
    syscall sysenter sysexit sysret int into iret iretd iretq ljmp lcall retf retfq
    lfs lgs lss wrpkru xrstor xrstor64 xrstors xrstors64 fxrstor fxrstor64
    umwait tpause umonitor xbegin xend xabort uiret senduipi enclu encls enclv
    wrfsbase wrgsbase swapgs pconfig
    """.split()
)


# Policy refusals that are not explored with the policy off: they change CPU
# state the reusable Unicorn keeps across runs (lmsw sets CR0.TS, and SSE then
# misbehaves for later cases), or make QEMU abort the process (lock bts reg).
_NOT_EXPLORED = (
    "lock", "privileged", "segment", "far branch", "system flags", "loads system",
    "kernel entry", "transactional", "shadow-stack", "PKRU", "saves/restores", "waits",
    "port I/O", "device stores", "virtualisation", "SGX", "ldmxcsr", "YMM",
)  # fmt: skip


def explorable(reason: str) -> bool:
    return not any(word in reason for word in _NOT_EXPLORED)


def unsafe_natively(insn: capstone.CsInsn) -> bool:
    if insn.mnemonic.split()[-1] in NEVER_NATIVE:
        return True
    op = insn.operands[0] if insn.operands else None
    # mov/pop to a segment register (fs/gs would also reset the bases)
    return (
        op is not None
        and op.type == csx.X86_OP_REG
        and insn.reg_name(op.reg) in ("cs", "ds", "es", "fs", "gs", "ss")
    )


@dataclass(frozen=True)
class Result:
    key: str  # class: mnemonic + operand form
    mnemonic: str
    kind: str  # MATCH FAULT REFUSED MISMATCH POLICY NOPLAN
    verdict: Verdict | None = None
    policy: str = ""  # the engine's policy reason, if it refuses the class
    case: Case | None = None


@dataclass
class ClassStats:
    mnemonic: str
    cases: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    masked: int = 0
    policy: str = ""  # set if every case was refused by policy
    explored_mismatches: int = 0  # mismatches with the policy off (explained by it)
    first_mismatch: Result | None = None
    cites: set[str] = field(default_factory=set)
    codes: list[bytes] = field(default_factory=list)  # a few encodings seen, for top-ups

    @property
    def proven(self) -> int:
        return self.counts[MATCH]

    @property
    def mismatches(self) -> int:
        return self.counts[MISMATCH]

    def add(self, r: Result) -> None:
        self.cases += 1
        if r.case is not None and len(self.codes) < 8 and r.case.code not in self.codes:
            self.codes.append(r.case.code)
        if r.policy:
            self.policy = r.policy
            self.counts[POLICY] += 1
            if r.kind == MISMATCH:
                self.explored_mismatches += 1
            return
        self.counts[r.kind] += 1
        if r.verdict is not None and r.verdict.masked:
            self.masked += 1
            self.cites.add(r.verdict.cite)
        if r.kind == MISMATCH and self.first_mismatch is None:
            self.first_mismatch = r

    def to_json(self) -> dict[str, Any]:
        return {
            "mnemonic": self.mnemonic,
            "cases": self.cases,
            **{k: v for k, v in sorted(self.counts.items())},
            "masked": self.masked,
            "policy_reason": self.policy,
            "explored_mismatches": self.explored_mismatches,
        }


class Runner:
    """One sandbox and one Emulator, reused for every case."""

    def __init__(self, explore: bool = True, emulator: Emulator | None = None) -> None:
        self.explore = explore  # also run policy-refused classes, with the policy off
        self.emulator = emulator or Emulator()
        # Policy-refused instructions run on a Unicorn of their own: some leave
        # state in it (CR0.TS: every later SSE instruction raises #NM) that the
        # engine's machine, which never runs them, must not inherit.
        self.explorer = Emulator() if explore else self.emulator
        self.sandbox = Sandbox()
        self.stats: dict[str, ClassStats] = {}
        self.cases = 0
        self.last_case_fd: int | None = None  # each case is written here first (isolate.py)

    def close(self) -> None:
        self.sandbox.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, case: Case, record: bool = True) -> Result:
        """Run `case` natively and through the engine; score it unless `record` is False."""
        if self.last_case_fd is not None:
            os.pwrite(self.last_case_fd, json.dumps(case.to_json()).encode() + b"\n", 0)
        r = self._check(case)
        if record:
            self.record(r)
        return r

    def record(self, r: Result) -> None:
        self.cases += 1
        st = self.stats.get(r.key)
        if st is None:
            st = self.stats[r.key] = ClassStats(r.mnemonic)
        st.add(r)

    def _check(self, case: Case) -> Result:
        insn = decode(case.code, case.site)
        if insn is None:
            return Result("(undecodable)", "(undecodable)", NOPLAN)
        key, mnem = class_key(insn), insn.mnemonic
        if unsafe_natively(insn):
            return Result(key, mnem, NOPLAN, policy="not run: unsafe natively")
        plan = analyze(case.code, case.site, trusted_only=False)
        reason = ""
        if isinstance(plan, NativeStep):
            if not self.explore:
                return Result(key, mnem, POLICY, policy=plan.reason)
            reason = plan.reason
            if not explorable(reason):
                return Result(key, mnem, NOPLAN, policy=reason)
            plan = analyze(case.code, case.site, policy_check=False)
            if isinstance(plan, NativeStep):
                return Result(key, mnem, NOPLAN, policy=reason)
        sb = self.sandbox
        inp = case.to_input(sb)
        repeat = isinstance(plan, UnicornStep) and plan.rep and case.gprs[2] <= policy.REP_LIMIT
        cpu = sb.run_native(inp, repeat)
        sets = sb.fp.sets
        result, eng = sb.run_engine(inp, plan, self.explorer if reason else self.emulator)
        verdict = compare(insn, inp, cpu, result, eng, sb.fp.sets - sets)
        return Result(key, mnem, verdict.kind, verdict, reason, case)
