"""Which CPU this is, and which CPUs' proofs the trust table may use here.

The difftest proves the engine against the CPU it runs on, and vendors differ
where Unicorn (which follows Intel) does not: on AMD a rep prefix turns
`loope`/`loopne` into a different branch, 16-bit SHLD/SHRD by more than 16 give
other results, and `imul` leaves SF/ZF/AF/PF as they were.  So every proof is
recorded with the CPU it ran on, and a proof counts only on a CPU that
`matches` it.

The rule: same vendor and same display family, as CPUID reports them (leaf 1,
family + extended family).  A family is one line of microarchitectures
(AMD 0x17 Zen 1-2, 0x19 Zen 3-4, 0x1A Zen 5; Intel 6 for the Core line): the
behaviour of undefined flags and prefixes is a property of the decoder and
ALU design, which a family shares and a new one may change.  The model is
recorded for the reader, not matched, so that a stepping or a new SKU of the
same family reuses the proof.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

UNKNOWN_MODEL = "?"
_KEY = re.compile(r"^(\S+) (\d+)/(\d+|\?)$")


@dataclass(frozen=True)
class Cpu:
    vendor: str  # CPUID vendor string: GenuineIntel, AuthenticAMD, ...
    family: int  # display family
    model: int | None  # display model; None when it was not recorded
    name: str = ""  # the brand string, for people

    @property
    def key(self) -> str:
        """`GenuineIntel 6/85`: how tables and messages name the CPU."""
        model = UNKNOWN_MODEL if self.model is None else str(self.model)
        return f"{self.vendor} {self.family}/{model}"

    def matches(self, other: Cpu) -> bool:
        """Whether a proof made on `other` holds on this CPU (see the module doc)."""
        return self.vendor == other.vendor and self.family == other.family

    @classmethod
    def from_key(cls, key: str, name: str = "") -> Cpu:
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"bad CPU name {key!r} (expected e.g. 'GenuineIntel 6/85')")
        model = None if m.group(3) == UNKNOWN_MODEL else int(m.group(3))
        return cls(m.group(1), int(m.group(2)), model, name)


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor of a /proc/cpuinfo text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    try:
        return Cpu(fields["vendor_id"], int(fields["cpu family"]), int(fields["model"]),
                   fields.get("model name", ""))  # fmt: skip
    except (KeyError, ValueError) as e:
        raise ValueError(f"/proc/cpuinfo has no x86 vendor, family and model ({e})") from e


@cache
def this_cpu() -> Cpu:
    """The CPU this process runs on (the tracee's: same machine)."""
    return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
