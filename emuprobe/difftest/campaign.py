"""A campaign: Hypothesis-generated cases through a Runner, then top-ups for
classes short of proof, then a shrunk reproducer for each mismatching class.

Hypothesis runs in chunks of `chunk` examples, each under its own seed derived
from the campaign's: one very long run makes Hypothesis keep ever more
bookkeeping, and chunks let a campaign be resumed and split across cores with
the same figures.  Cases never fail the Hypothesis test: every verdict is
recorded, because a campaign wants all discrepancies, not the first.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, replace

from capstone import CsInsn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from emuprobe.difftest.cases import FILL_BOUNDARY, Case
from emuprobe.difftest.compare import MISMATCH
from emuprobe.difftest.isolate import StopCampaign, in_worker
from emuprobe.difftest.opcodes import MANDATORY, opcode_maps, real_code
from emuprobe.difftest.oracle import SITE
from emuprobe.difftest.runner import Result, Runner, decode
from emuprobe.difftest.strategies import FIXED_GPRS, FIXED_XMM, MAP_ENCODINGS, cases, encodings
from emuprobe.x86.regs import GPR_NAMES

Progress = Callable[[Runner], None]
__all__ = ["CI_PROFILE", "Config", "StopCampaign", "run_campaign", "shrink", "matching_encodings"]


@dataclass(frozen=True)
class Config:
    examples: int = 10_000
    seed: int = 0
    glob: str = "*"
    chunk: int = 2_000
    min_cases: int = 25  # top up classes to this many proofs
    topup: bool = True
    shrink: bool = True


# What `make test` runs (tests/test_difftest.py): a fixed seed, classes the
# policy refuses skipped, no top-up; sized to well under a minute on 2 cores.
CI_PROFILE = Config(examples=5_000, seed=0, chunk=2_500, topup=False, shrink=False)


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # verdicts are recorded, never raised: nothing to shrink
    )


def _pin_hypothesis_constants() -> None:
    """Hypothesis draws about 5% of its choices from the number literals of
    every local module the process has imported (its providers'
    _get_local_constants), so a seed's cases would depend on what else was
    imported (pytest imports every collected test module) and change with
    every edit to emuprobe's source.  Pin that pool to empty, and forget what
    an earlier run in this process cached from it."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import Constants
    except ImportError:  # a Hypothesis without local constants: nothing to pin
        return
    providers.HypothesisProvider._local_constants = Constants()  # type: ignore[assignment]
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if cache is not None:
        cache.cache.clear()


def _draw(strategy: st.SearchStrategy[Case], n: int, seed: int,
          each: Callable[[Case], None]) -> None:  # fmt: skip
    """Feed `n` cases drawn under `seed` to `each`, in this process."""
    _pin_hypothesis_constants()

    @hypothesis_seed(seed)
    @_settings(n)
    @given(strategy)
    def one(case: Case) -> None:
        each(case)

    one()


def draw_cases(cfg: Config, n: int) -> list[Case]:
    """The first `n` cases `cfg` generates (of its first chunk), unrun."""
    out: list[Case] = []
    _draw(cases(_pool(cfg.glob)), min(n, cfg.chunk), cfg.seed * 1_000_003, out.append)
    return out


def _run(
    runner: Runner,
    strategy: st.SearchStrategy[Case],
    n: int,
    seed: int,
    progress: Progress | None,
    stop: Callable[[Result], bool] | None,
) -> None:
    def check(case: Case) -> None:
        r = runner.check(case)
        if progress is not None:
            progress(runner)
        if stop is not None and stop(r):
            raise StopCampaign(r)

    stopped = in_worker(runner, lambda: _draw(strategy, n, seed, check))
    if stopped is not None:
        raise StopCampaign(stopped)


def _pool(glob: str) -> st.SearchStrategy[tuple[bytes, CsInsn]]:
    if glob == "*":
        return MAP_ENCODINGS
    found = matching_encodings(glob)
    if not found:
        raise ValueError(f"no encoding found for mnemonic '{glob}'")
    return encodings(st.sampled_from(found))


def matching_encodings(glob: str) -> list[bytes]:
    """Encodings whose mnemonic matches `glob`: every opcode-map template with
    a spread of ModRM bytes, prefixes and REX, plus real code."""
    out: dict[bytes, None] = {}

    def consider(raw: bytes) -> None:
        insn = decode(raw, SITE)
        if insn is not None and fnmatch.fnmatchcase(insn.mnemonic, glob):
            out.setdefault(bytes(raw[: insn.size]), None)

    tail = bytes(range(0x21, 0x2B))
    for name, templates in opcode_maps().items():
        for t in templates:
            for modrm in (0x00, 0x04, 0x05, 0x44, 0x84, 0xC0, 0xC9, 0xD3, 0xE8, 0xF7):
                consider(t + bytes([modrm]) + tail)
                if name != "vex128" and t[:1] not in MANDATORY[1:]:
                    for pfx in (b"\x48", b"\x41", b"\x66", b"\xf3", b"\x4d"):
                        consider(pfx + t + bytes([modrm]) + tail)
    for raw in real_code():
        consider(raw)
    return list(out)


def run_campaign(
    runner: Runner,
    cfg: Config,
    progress: Progress | None = None,
    stop: Callable[[Result], bool] | None = None,
) -> dict[str, Case]:
    """Run `cfg` on `runner` (its stats accumulate); returns a shrunk
    reproducer per class that mismatched.  `stop` may end it early (raising
    StopCampaign out of here)."""
    strategy = cases(_pool(cfg.glob))
    done = 0
    chunk_no = 0
    while done < cfg.examples:
        n = min(cfg.chunk, cfg.examples - done)
        _run(runner, strategy, n, cfg.seed * 1_000_003 + chunk_no, progress, stop)
        done += n
        chunk_no += 1
    if cfg.topup:
        _top_up(runner, cfg, progress, stop)
    if not cfg.shrink:
        return {}
    return {
        key: shrink(runner, s.first_mismatch.case)
        for key, s in sorted(runner.stats.items())
        if s.first_mismatch is not None and s.first_mismatch.case is not None
    }


def _top_up(
    runner: Runner, cfg: Config, progress: Progress | None, stop: Callable[[Result], bool] | None
) -> None:
    """More cases for classes that matched so far but have fewer than
    `min_cases` proofs: the same encodings, new states."""
    for rnd in range(3):
        short = [
            s for s in runner.stats.values()
            if not s.mismatches and s.codes and s.counts["policy"] < s.cases
            and s.proven < cfg.min_cases
        ]  # fmt: skip
        if not short:
            return
        codes = sorted({c for s in short for c in s.codes})
        need = sum(cfg.min_cases - s.proven for s in short)
        pool = encodings(st.sampled_from(codes))
        n = min(max(need * 2, 100), cfg.examples // 2)  # a top-up never dwarfs the campaign
        _run(runner, cases(pool), n, cfg.seed * 1_000_003 + 900_000 + rnd, progress, stop)


def _same_failure(r: Result, key: str, field: str) -> bool:
    return (
        r.kind == MISMATCH
        and r.key == key
        and r.verdict is not None
        and r.verdict.diffs[0].split(":")[0] == field
    )


def _zero_xmm(i: int) -> Callable[[Case], Case]:
    return lambda c: replace(c, xmm=c.xmm[:i] + (bytes(16),) + c.xmm[i + 1 :])


def _set_gpr(name: str, value: int) -> Callable[[Case], Case]:
    return lambda c: c.with_gpr(name, value)


def shrink(runner: Runner, case: Case) -> Case:
    """A simpler case with the same mismatch (same class, same first field):
    each register, XMM and setting reset to a plain value while it still fails."""
    first = runner.check(case, record=False)
    if first.kind != MISMATCH or first.verdict is None:
        return case
    key, field = first.key, first.verdict.diffs[0].split(":")[0]
    best = case
    candidates: list[Callable[[Case], Case]] = [
        lambda c: replace(c, site=SITE),
        lambda c: replace(c, fill=FILL_BOUNDARY, overlay=()),
        lambda c: replace(c, overlay=()),
        lambda c: replace(c, eflags=0x202),
        lambda c: replace(c, mxcsr=0x1F80),
        lambda c: replace(c, fs_base=0, gs_base=0),
        lambda c: replace(c, xmm=FIXED_XMM),
    ]
    candidates += [_zero_xmm(i) for i in range(16)]
    candidates += [_set_gpr(n, v) for i, n in enumerate(GPR_NAMES) for v in (FIXED_GPRS[i], 0, 1)]
    for make in candidates:
        trial = make(best)
        if trial != best and _same_failure(runner.check(trial, record=False), key, field):
            best = trial
    return best
