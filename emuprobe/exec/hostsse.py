"""Python's side of hostsse.c: register-only SSE arithmetic on the tracer's CPU.

Used by the FastPath "sse" op at a hit taken in Python; the compiled hot loop
calls the same C function directly.  Without the compiled module the op is
refused and the instruction goes native, as every SSE_FP class did before.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from emuprobe.sys.ptrace import UserFpRegs

NOT_BUILT = "SSE arithmetic runs on the host CPU, and the compiled helper is not built"
UNMASKED = "MXCSR unmasks a SIMD exception: the CPU must raise it in the tracee"
NO_STUB = "no room for another host-executed SSE instruction"


@cache
def _lib() -> Any | None:
    try:
        from emuprobe import _hotloop  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _hotloop


def run(code: bytes, fp: UserFpRegs) -> str | None:
    """Execute `code` against `fp` (updated in place); None, or why not (with
    `fp` unchanged)."""
    mod = _lib()
    if mod is None:
        return NOT_BUILT
    rc = mod.lib.host_sse(code, len(code), mod.ffi.from_buffer(fp))
    if rc == 0:
        return None
    return UNMASKED if rc == -1 else NO_STUB
