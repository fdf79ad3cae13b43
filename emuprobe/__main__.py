"""`python -m emuprobe` and the `emuprobe` command."""

from __future__ import annotations

import sys


def run() -> int:
    """The command's entry point: a Ctrl-C while Python is still importing
    emuprobe (nothing started yet) exits 130 without a traceback."""
    try:
        from emuprobe.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
