"""emuprobe: dynamic probes that emulate the displaced instruction."""

from __future__ import annotations

__version__ = "0.1.0"
