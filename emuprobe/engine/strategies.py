"""The ways a probe hit can make its displaced instruction take effect.

One is chosen per run (`emuprobe trace --strategy`).  Only `emulate` is
emuprobe's design; the others exist so that it can be measured against the
designs it replaces, on the same targets and in the same run (benchmarks/).
"""

from __future__ import annotations

import textwrap
from typing import Literal

Strategy = Literal["emulate", "xol", "inplace", "stopworld"]

DEFAULT: Strategy = "emulate"

HELP: dict[Strategy, str] = {
    "emulate": "emulate the displaced instruction (the default; adds no VMA, loses no event;"
    " what must not be emulated takes the stop-the-world native step)",
    "xol": "execute it out of line in a page injected with mmap (the kernel uprobes"
    " design: one more VMA, a second trap per hit)",
    "inplace": "UNSAFE, for demonstration: restore the byte and single-step without"
    " stopping the other threads, which then run through the site unseen (and run code"
    " being rewritten under them: a wrong result has been seen)",
    "stopworld": "the native fallback for every hit: stop all threads, restore the byte,"
    " single-step, re-plant, resume",
}

NAMES: tuple[Strategy, ...] = tuple(HELP)


def describe() -> str:
    """The --strategy part of `emuprobe trace --help`."""
    return "\n".join(
        textwrap.fill(text, 78, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13)
        for name, text in HELP.items()
    )
