"""`emuprobe difftest`: prove the engine against the CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from emuprobe.errors import ProbeError
from emuprobe.x86 import trust

EPILOG = """\
A campaign generates instructions with Hypothesis (opcode maps 1-byte, 0F,
0F38, 0F3A, VEX-128, and real code), runs each natively in a ptraced sandbox
and through the engine's per-hit path, and compares registers, flags, XMM,
MXCSR, memory and faults.  The trust table (which classes the engine may
emulate) is rewritten only with --update-trust.

Trust is kept per CPU (vendor and family must match): --prove replays the
shipped corpus, the prologues of libc, python3 and ls included, on this CPU
and writes what it proves to your own table ($XDG_CACHE_HOME/emuprobe/trust.json).

examples:
  emuprobe difftest --prove                 # prove this CPU (once; about a minute)
  emuprobe difftest --examples 20000 --seed 1
  emuprobe difftest --mnemonic 'sh*' --examples 3000 --all
  emuprobe difftest --examples 200000 --update-trust --discrepancies fuzz/discrepancies
  emuprobe difftest --lockstep --every 1 -- /bin/ls -la /usr/bin
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    d = sub.add_parser(
        "difftest",
        help="differential test of the emulator against the CPU",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--examples", type=int, default=10_000, metavar="N", help="cases to generate")
    d.add_argument("--seed", type=int, default=0, metavar="S")
    d.add_argument("--mnemonic", default="*", metavar="GLOB", help="only these mnemonics")
    d.add_argument("--json", metavar="FILE", help="write per-class results as JSON")
    d.add_argument("--all", action="store_true", help="show every mnemonic in the table")
    d.add_argument(
        "--no-explore",
        action="store_true",
        help="skip classes the policy refuses (default: run them with it off)",
    )
    d.add_argument(
        "--prove", action="store_true",
        help="prove this CPU from the shipped corpus; writes your trust table",
    )
    d.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="--prove: worker processes (default: one per CPU)")
    d.add_argument("--update-trust", action="store_true",
                   help="add this campaign's proofs to the packaged trust table")
    d.add_argument("--trust-file", metavar="FILE", help="trust table to read and write")
    d.add_argument("--corpus", metavar="FILE",
                   help="--update-trust: add the encodings met here (default: the packaged "
                        "corpus, when the packaged table is updated)")
    d.add_argument(
        "--min-cases",
        type=int,
        default=trust.DEFAULT_MIN_CASES,
        metavar="N",
        help="proofs a class needs to be trusted (default %(default)s)",
    )
    d.add_argument(
        "--discrepancies", metavar="DIR", help="write a reproducer per mismatching class"
    )
    d.add_argument("--lockstep", action="store_true", help="single-step CMD and compare each step")
    d.add_argument("--every", type=int, default=1, metavar="K", help="lockstep: every K-th step")
    # fmt: skip


def main(args: argparse.Namespace, command: list[str]) -> int:
    if args.trust_file:
        os.environ[trust.ENV_FILE] = args.trust_file
        trust.clear_caches()
    if args.lockstep:
        if not command:
            raise ProbeError("--lockstep needs a command after '--'")
        return _lockstep(command, args.every)
    if command:
        raise ProbeError("a command after '--' is only for --lockstep")
    if args.prove:
        return _prove(args)
    return _campaign(args)


def _campaign(args: argparse.Namespace) -> int:
    from emuprobe.difftest.campaign import Config, run_campaign
    from emuprobe.difftest.report import (
        ProgressBar,
        print_reproducers,
        print_summary,
        to_json,
        update_trust,
        write_discrepancies,
    )
    from emuprobe.difftest.runner import Runner

    # top-ups (more cases for classes short of proof) only matter for the table
    cfg = Config(examples=args.examples, seed=args.seed, glob=args.mnemonic,
                 min_cases=args.min_cases, topup=args.update_trust)  # fmt: skip
    trusted = trust.trusted_here()
    with Runner(explore=not args.no_explore) as runner:
        bar = ProgressBar(cfg.examples)
        try:
            repro = run_campaign(runner, cfg, bar)
        except ValueError as e:
            raise ProbeError(str(e)) from e
        finally:
            bar.finish()
        print_summary(runner, trusted, sys.stdout, args.all)
        print_reproducers(runner, repro, sys.stdout)
        config = {"examples": cfg.examples, "seed": cfg.seed, "mnemonic": cfg.glob,
                  "explore": not args.no_explore, "min_cases": cfg.min_cases}  # fmt: skip
        if args.json:
            report = to_json(runner, trusted, repro, config)
            Path(args.json).write_text(json.dumps(report, indent=1))
        if args.discrepancies:
            written = write_discrepancies(runner, repro, Path(args.discrepancies))
            print(f"{len(written)} reproducers written to {args.discrepancies}", file=sys.stderr)
        if args.update_trust:
            path = Path(args.trust_file) if args.trust_file else trust.packaged_path()
            new = update_trust(runner.stats, _load_table(path), cfg.min_cases, config)
            path.write_text(new.dump())
            print(f"trust table: {len(new.proofs)} classes -> {path}", file=sys.stderr)
            corpus = Path(args.corpus) if args.corpus else None
            if corpus is not None or not args.trust_file:
                _add_to_corpus(runner.stats, corpus, cfg.min_cases)
        trusted_bad = sum(s.mismatches for k, s in runner.stats.items() if k in trusted)
    return 1 if trusted_bad else 0


def _add_to_corpus(stats: dict, path: Path | None, min_cases: int) -> None:
    """The encodings a campaign met, added to what --prove replays."""
    from emuprobe.difftest.prove import corpus_from_campaign, corpus_path, dump_corpus, load_corpus

    path = path or corpus_path()
    path.write_text(dump_corpus(corpus_from_campaign(load_corpus(path), stats, min_cases)))


def _prove(args: argparse.Namespace) -> int:
    import time

    from emuprobe.difftest.prove import load_corpus, prologue_corpus, prove, select_classes
    from emuprobe.difftest.report import ProgressBar, update_trust
    from emuprobe.x86.cpu import this_cpu

    start = time.monotonic()
    path = Path(args.trust_file) if args.trust_file else trust.local_path()
    existing = _load_table(path)  # a bad file stops us before minutes of work, not after
    corpus, prologues = prologue_corpus(load_corpus())
    sel = select_classes(corpus, trust.table())
    cpu = this_cpu()
    print(f"proving {len(sel.todo)} classes on {cpu.key} ({cpu.name}); {sel.known} already "
          f"proven here", file=sys.stderr)  # fmt: skip
    bar = ProgressBar(len(sel.todo) * args.min_cases * 2)
    try:
        out = prove(sel.todo, args.min_cases, args.jobs, bar.advance)
    finally:
        bar.finish()
    meta = {"prove": {"classes": len(sel.todo), "cases": out.cases, "jobs": args.jobs}}
    new = update_trust(out.stats, existing, args.min_cases, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.dump())
    trust.clear_caches()
    _print_proof(out.stats, out.crashed, prologues, time.monotonic() - start, path)
    return 0


def _print_proof(stats: dict, crashed: list[str], prologues: list[bytes], seconds: float,
                 path: Path) -> None:  # fmt: skip
    from emuprobe.difftest.oracle import SITE
    from emuprobe.x86.decode import NativeStep, analyze

    here = trust.trusted_here()
    proven = sum(1 for k in stats if k in here)
    masked = sum(1 for s in stats.values() if s.masked and not s.mismatches)
    bad = sum(1 for s in stats.values() if s.mismatches)
    cases = sum(s.cases for s in stats.values())
    print(f"{cases} cases in {seconds:.0f} s: {proven} classes trusted on this CPU, {masked} "
          f"equal only after masking, {bad} mismatching -> {path}")  # fmt: skip
    for key in crashed:
        print(f"not proven: {key} (a worker died on it)")
    kinds = {"emulated": 0, "untrusted": 0, "policy": 0}
    for code in prologues:
        if isinstance(analyze(code, SITE, trusted_only=False), NativeStep):
            kinds["policy"] += 1
        elif isinstance(analyze(code, SITE), NativeStep):
            kinds["untrusted"] += 1
        else:
            kinds["emulated"] += 1
    n = max(len(prologues), 1)
    print(f"prologues (first 6 instructions of every function in libc, python3, ls): "
          f"{len(prologues)}: " + ", ".join(f"{v / n:.1%} {k}" for k, v in kinds.items()))


def _load_table(path: Path) -> trust.TrustTable:
    try:
        return trust.TrustTable.load(path)
    except FileNotFoundError:
        return trust.TrustTable()
    except (OSError, ValueError) as e:
        raise ProbeError(str(e)) from e


def _lockstep(command: list[str], every: int) -> int:
    from emuprobe.difftest.lockstep import lockstep

    def progress(rep: object) -> None:
        if sys.stderr.isatty():
            steps = getattr(rep, "steps", 0)
            sys.stderr.write(f"\rlockstep: {steps} instructions ")
            sys.stderr.flush()

    rep = lockstep(command, every, progress)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    out = sys.stdout
    print(f"{'MNEMONIC':<20}{'COMPARED':>10}{'MISMATCHES':>12}", file=out)
    for mnem, n in sorted(rep.compared.items(), key=lambda kv: -kv[1]):
        print(f"{mnem[:19]:<20}{n:>10}{rep.mismatched[mnem]:>12}", file=out)
    for mnem, diffs in rep.examples.items():
        print(f"mismatch in {mnem}: " + "; ".join(diffs[:3]), file=out)
    if rep.masked:
        masked = ", ".join(f"{m} {n}" for m, n in rep.masked.most_common())
        print(f"differing only in bits the SDM leaves undefined: {masked}", file=out)
    compared = sum(rep.compared.values())
    skipped = ", ".join(f"{why}: {n}" for why, n in rep.skipped.most_common())
    print(f"{rep.steps} instructions stepped, {compared} compared over {len(rep.compared)} "
          f"mnemonics, {sum(rep.mismatched.values())} mismatches; not compared: {skipped}; "
          f"exit status {rep.exit_status}", file=out)  # fmt: skip
    return 1 if rep.mismatched else 0
