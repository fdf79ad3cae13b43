"""The `emuprobe trace` options perfbridge adds (kept light: cli.py imports this at start-up)."""

from __future__ import annotations

import argparse

FORMATS = ("text", "perf-script", "chrome", "folded", "jsonl")

EPILOG = """\
perf's forms (the same text works with perf probe -x and in uprobe_events):
  emuprobe trace -x ./app 'fib n=%di:s32' 'fib%return $retval' -- ./app
  emuprobe trace --events defs.txt -- ./app  # lines: p:grp/ev /path/app:0x1139 %di
  emuprobe trace './app:parse%return $retval' 'libc:write fd=%di:s32 n=%dx:u64' -- ./app
  emuprobe trace --hist latency 'fib%return' -- ./app      # log2 histogram at exit
  emuprobe trace --count --by fd 'libc:write fd=%di:s32' -- ./app
  emuprobe trace -k syscalls:sys_enter_write --format chrome -o t.json \\
      emit 'emit%return' -- ./app                          # open t.json in ui.perfetto.dev
"""

DEFAULT_DEPTH = 127  # perf's default maximum call-chain depth


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "-x", dest="perf_binary", metavar="BINARY",
        help="PROBEs are perf probe definitions in BINARY: [[GRP:]EV=]FUNC[+OFFS|%%return] [ARG..]",
    )
    t.add_argument(
        "--events", metavar="FILE",
        help="also trace FILE's uprobe_events lines: p|r[:GRP/EV] PATH:OFFSET [ARG..]",
    )
    t.add_argument(
        "--stack", action="store_true",
        help=f"--stack[=DEPTH]: record the user call chain at each event (depth {DEFAULT_DEPTH})",
    )
    t.add_argument("--stack-depth", type=int, default=0, help=argparse.SUPPRESS)
    t.add_argument("--by", metavar="NAME", help="with --count: count by this fetched argument")
    t.add_argument("--hist", metavar="NAME", help="log2 histogram of a fetched argument or latency")
    t.add_argument(
        "-k", dest="kernel_events", action="append", default=[], metavar="TRACEPOINT",
        help="merge a kernel tracepoint (e.g. syscalls:sys_enter_write) into the stream",
    )
    t.add_argument(
        "--format", choices=FORMATS, default="text",
        help="how events are written (to -o FILE or stdout)",
    )


def normalize(argv: list[str]) -> list[str]:
    """`--stack=N` -> `--stack-depth=N`: argparse cannot give an option an
    optional value without swallowing the PROBE that follows a bare `--stack`."""
    return [f"--stack-depth={a[8:]}" if a.startswith("--stack=") else a for a in argv]


def stack_depth(args: argparse.Namespace) -> int:
    """The call-chain depth asked for, 0 for none."""
    if args.stack_depth < 0:
        from emuprobe.errors import ProbeError

        raise ProbeError(f"--stack={args.stack_depth}: the depth must be positive")
    return args.stack_depth or (DEFAULT_DEPTH if args.stack else 0)
