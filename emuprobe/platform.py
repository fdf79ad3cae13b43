"""emuprobe runs only where its ptrace and register layouts are right."""

from __future__ import annotations

import platform

from emuprobe.errors import ProbeError


def require_supported() -> None:
    system, machine = platform.system(), platform.machine()
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        raise ProbeError(
            f"emuprobe supports only Linux on x86-64 (this is {system} on {machine})"
        )
