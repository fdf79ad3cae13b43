"""The one exception type a user ever sees as a message."""

from __future__ import annotations


class ProbeError(Exception):
    """Bad input or an unusable target: printed as one line, exit status 2.

    Raised before anything in the tracee is changed, so that a user's mistake
    never leaves the tracee in a different state.
    """


class OutputClosed(Exception):
    """An output emuprobe writes to was closed by its reader (EPIPE, as with
    `| head`): the session ends quietly, as perf and bpftrace do."""


def spec_error(text: str, column: int, message: str) -> ProbeError:
    """A one-line error quoting the probe `text` and naming the 1-based column at fault."""
    return ProbeError(f"bad probe '{text}' at column {column + 1}: {message}")
