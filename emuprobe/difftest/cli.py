"""`emuprobe difftest`: prove the engine against the CPU."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..emulator import trust
from ..errors import ProbeError

EPILOG = """\
A campaign generates instructions with Hypothesis (opcode maps 1-byte, 0F,
0F38, 0F3A, VEX-128, and real code), runs each natively in a ptraced sandbox
and through the engine's per-hit path, and compares registers, flags, XMM,
MXCSR, memory and faults.  The trust table (which classes the engine may
emulate) is rewritten only with --update-trust.

examples:
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
    d.add_argument("--update-trust", action="store_true", help="rewrite the trust table")
    d.add_argument("--trust-file", metavar="FILE", help="trust table to read and write")
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
        trust.table.cache_clear()
    if args.lockstep:
        if not command:
            raise ProbeError("--lockstep needs a command after '--'")
        return _lockstep(command, args.every)
    if command:
        raise ProbeError("a command after '--' is only for --lockstep")
    return _campaign(args)


def _campaign(args: argparse.Namespace) -> int:
    from .campaign import Config, run_campaign
    from .report import (
        ProgressBar,
        print_reproducers,
        print_summary,
        to_json,
        update_trust,
        write_discrepancies,
    )
    from .runner import Runner

    # top-ups (more cases for classes short of proof) only matter for the table
    cfg = Config(examples=args.examples, seed=args.seed, glob=args.mnemonic,
                 min_cases=args.min_cases, topup=args.update_trust)  # fmt: skip
    table = trust.table()
    with Runner(explore=not args.no_explore) as runner:
        bar = ProgressBar(cfg.examples)
        try:
            repro = run_campaign(runner, cfg, bar)
        except ValueError as e:
            raise ProbeError(str(e)) from e
        finally:
            bar.finish()
        print_summary(runner, table, sys.stdout, args.all)
        print_reproducers(runner, repro, sys.stdout)
        config = {"examples": cfg.examples, "seed": cfg.seed, "mnemonic": cfg.glob,
                  "explore": not args.no_explore, "min_cases": cfg.min_cases}  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(runner, table, repro, config), indent=1))
        if args.discrepancies:
            written = write_discrepancies(runner, repro, Path(args.discrepancies))
            print(f"{len(written)} reproducers written to {args.discrepancies}", file=sys.stderr)
        if args.update_trust:
            new = update_trust(runner, table, cfg.min_cases, {"last_campaign": config})
            path = Path(args.trust_file) if args.trust_file else trust.packaged_path()
            path.write_text(new.dump())
            print(f"trust table: {len(new.classes)} classes -> {path}", file=sys.stderr)
        trusted_bad = sum(s.mismatches for k, s in runner.stats.items() if k in table)
    return 1 if trusted_bad else 0


def _lockstep(command: list[str], every: int) -> int:
    from .lockstep import lockstep

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
    compared = sum(rep.compared.values())
    skipped = ", ".join(f"{why}: {n}" for why, n in rep.skipped.most_common())
    print(f"{rep.steps} instructions stepped, {compared} compared over {len(rep.compared)} "
          f"mnemonics, {sum(rep.mismatched.values())} mismatches; not compared: {skipped}; "
          f"exit status {rep.exit_status}", file=out)  # fmt: skip
    return 1 if rep.mismatched else 0
