"""`emuprobe trace` and `emuprobe list`.

Every error a user can cause is one line on stderr and exit status 2; a
Python traceback reaching the user is a bug (EMUPROBE_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from typing import TextIO

from emuprobe.engine.strategies import NAMES as STRATEGY_NAMES
from emuprobe.engine.strategies import describe as describe_strategies
from emuprobe.errors import OutputClosed, ProbeError
from emuprobe.perfbridge import options as perf_options

TRACE_EPILOG = """\
PROBE is [NAME=][BINARY:]SYMBOL[+OFFSET] or [NAME=]BINARY:0xADDRESS.
BINARY is a path or a library as mapped in the target (libc, libm.so.6);
the default is the main executable.  ADDRESS is the ELF address `nm` shows.

examples:
  emuprobe trace main -- ./app              # one line per call of main
  emuprobe trace --count libc:malloc libc:free -- ls -la /usr/lib
  emuprobe trace -p 1234 'parse+4'          # attach; Ctrl-C detaches cleanly
  emuprobe trace --stats-json s.json ./app:0x401136 -- ./app
  emuprobe trace entry=work --no-follow -- ./server
  emuprobe trace --count --strategy xol work -- ./app   # XOL, for comparison

strategies (--strategy):
""" + describe_strategies() + "\n"

LIST_EPILOG = """\
examples:
  emuprobe list ./app
  emuprobe list libc 'str*'
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"emuprobe: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="emuprobe",
        description="Dynamic probes that emulate the displaced instruction: no VMA is added.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "trace",
        help="trace probes in a new command or a running process",
        epilog=TRACE_EPILOG + "\n" + perf_options.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("-p", "--pid", type=int, help="attach to this running process")
    t.add_argument(
        "--count", action="store_true", help="count hits silently; print a table at exit"
    )
    t.add_argument("--stats-json", metavar="FILE", help="write hit counts and exit status as JSON")
    t.add_argument("-o", "--output", metavar="FILE", help="write events to FILE instead of stdout")
    t.add_argument("--no-follow", action="store_true", help="do not trace forked children")
    t.add_argument(
        "--strategy",
        choices=STRATEGY_NAMES,
        default="emulate",
        help="how the displaced instruction runs at each hit (inplace is UNSAFE: it"
        " loses events in multi-threaded programs); see the list below",
    )
    perf_options.add_arguments(t)
    t.add_argument("probes", nargs="*", metavar="PROBE")
    ls = sub.add_parser(
        "list",
        help="list probe-able functions of a binary",
        epilog=LIST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("binary")
    ls.add_argument("glob", nargs="?", default="*")
    rp = sub.add_parser(
        "repair",
        help="restore the int3s a killed emuprobe left in a process",
        description="If emuprobe was killed with SIGKILL while attached, the process keeps "
        "its int3s and dies of SIGTRAP at its next hit.  This restores, from the files, every "
        "0xcc in its executable file mappings that the file does not have (kernel uprobes "
        "excepted).",
    )
    rp.add_argument("-p", "--pid", type=int, required=True, help="the process to repair")
    from emuprobe.difftest.cli import add_parser as add_difftest

    add_difftest(sub)
    return p


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not
    complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split at the first '--': emuprobe's arguments, then the command's."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ours, command = _split_command(args_in)
    args = _parser().parse_args(perf_options.normalize(ours))
    try:
        if args.command == "list":
            return _list(args.binary, args.glob)
        if args.command == "repair":
            from emuprobe.engine.repair import describe, repair

            print(describe(repair(args.pid), args.pid))
            return 0
        if args.command == "difftest":
            from emuprobe.difftest.cli import main as difftest

            return difftest(args, command)
        return _trace(args, command)
    except ProbeError as e:
        print(f"emuprobe: {e}", file=sys.stderr)
        return 2
    except (OutputClosed, BrokenPipeError):
        # the reader went away (`| head`): every int3 is out and the tracee
        # detached (Session.run); end quietly, as perf and bpftrace do
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: no traceback for users
        if os.environ.get("EMUPROBE_DEBUG"):
            raise
        print(f"emuprobe: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _trace(args: argparse.Namespace, command: list[str]) -> int:
    from emuprobe.api import Tracer
    from emuprobe.output import LinePrinter, count_table, open_output, stats_json
    from emuprobe.perfbridge import frontend

    if args.pid is not None and command:
        raise ProbeError("give either -p PID or a command after '--', not both")
    if args.pid is None and not command:
        raise ProbeError("nothing to trace: give -p PID or a command after '--'")
    specs = frontend.parse_specs(args)  # once, and before the tracee is touched
    tracer = (
        Tracer.attach(args.pid, strategy=args.strategy)
        if args.pid is not None
        else Tracer.spawn(command, follow=not args.no_follow, strategy=args.strategy)
    )
    # outputs are opened before the tracee is touched: a bad path leaves it as it was
    out: TextIO = open_output(args.output) if args.output else sys.stdout
    stats_file = open_output(args.stats_json) if args.stats_json else None
    front = None
    if frontend.wanted(args, specs):
        front = frontend.TraceFrontend(args, out, specs)
        front.attach(tracer)
    else:
        printer = None if args.count else LinePrinter(out)
        for spec in specs:
            tracer.probe(spec, printer)
    try:
        status = tracer.run()
    finally:
        if front is not None:
            front.finish()
        out.flush()
    if args.count:
        table = count_table(tracer.probes)
        print(table, file=out if args.output and args.format == "text" else sys.stderr)
    for p in tracer.probes:
        if p.handler_errors > 1:
            print(f"emuprobe: probe '{p.name}': handler raised {p.handler_errors} times",
                  file=sys.stderr)
    if args.output:
        out.close()
    if stats_file is not None:
        with stats_file:
            try:
                stats_file.write(stats_json(tracer.probes, status) + "\n")
            except OSError as e:
                raise ProbeError(f"cannot write {args.stats_json}: {e.strerror}") from e
    return status


def _list(binary: str, glob: str) -> int:
    from emuprobe.sys.elfimage import ElfImage
    from emuprobe.sys.libraries import find_library_on_disk, is_path_spec
    from emuprobe.x86.decode import NativeStep, analyze

    path = binary
    if not is_path_spec(binary) and not os.path.exists(binary):
        path = find_library_on_disk(binary) or binary
    image = ElfImage.open(path)
    shown = 0
    for sym in image.functions():
        if fnmatch.fnmatchcase(sym.name, glob):
            kind = " [ifunc]" if sym.ifunc else ""
            print(f"{sym.vaddr:#014x}  {sym.name:<40} {image.first_instruction(sym.vaddr)}{kind}")
            plan = analyze(image.read(sym.vaddr, 16), sym.vaddr)
            if isinstance(plan, NativeStep):  # a probe here costs a native step: say why
                print(f"{'':16}native: {plan.reason}")
            shown += 1
    if shown == 0:
        raise ProbeError(f"{path}: no function matches '{glob}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
