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
