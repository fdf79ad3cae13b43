"""Which instruction classes the engine may emulate on this CPU: those the
difftest proved on a CPU that matches it (cpu.py states the rule).

A class is a mnemonic plus its operand form plus every prefix that capstone's
reading hides (classkey.py).  Each class records, per CPU it was proven on,
how many cases the engine and the CPU agreed on and how many of those agreed
only because the comparator masked bits the SDM leaves undefined.  A class is
emulated here when a matching CPU proved it on at least `min_cases` cases,
none of them masked (a traced program must compute what it computes untraced,
undefined results included: EMUPROBE_TRUST_MASKED=1 waives that), and no
matching CPU ever disproved it.  Everything else takes the native fallback,
which is always correct and only costs time.

Two tables are read: the packaged one beside this module (written by
`emuprobe difftest --update-trust`, proven on the CPUs its `cpus` names) and
the user's own, written by `emuprobe difftest --prove` on their CPU
(`$XDG_CACHE_HOME/emuprobe/trust.json`).  $EMUPROBE_TRUST_FILE replaces both.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from capstone import CsInsn

from emuprobe.x86.classkey import class_key
from emuprobe.x86.cpu import Cpu, this_cpu

UNTRUSTED = "untrusted: not proven by difftest"
DEFAULT_MIN_CASES = 25
FORMAT = 2
ENV_FILE = "EMUPROBE_TRUST_FILE"  # one table instead of the packaged and the local one
ENV_MASKED = "EMUPROBE_TRUST_MASKED"  # "1": also emulate classes equal only after masking
PROVE_HINT = "emuprobe difftest --prove"

__all__ = ["TrustTable", "Proof", "class_key", "table", "trusted_here", "verdict", "UNTRUSTED"]


@dataclass(frozen=True)
class Proof:
    """One CPU's evidence for one class."""

    proven: int  # cases the engine emulated and the CPU agreed on
    masked: int | None  # of those, equal only after masking; None: not recorded

    def merged(self, other: Proof) -> Proof:
        known = [m for m in (self.masked, other.masked) if m is not None]
        return Proof(max(self.proven, other.proven), max(known) if known else None)


@dataclass
class TrustTable:
    min_cases: int = DEFAULT_MIN_CASES
    proofs: dict[str, dict[str, Proof]] = field(default_factory=dict)  # class -> cpu -> proof
    # class -> cpu -> the mismatch that disproved it there: never trusted again,
    # on any CPU, by a later campaign that happens to miss the same corner
    disproved: dict[str, dict[str, str]] = field(default_factory=dict)
    cpus: dict[str, dict[str, Any]] = field(default_factory=dict)  # cpu -> what proved it

    # --- evidence ---------------------------------------------------------

    def add_proof(self, key: str, cpu: Cpu, proven: int, masked: int | None) -> None:
        self.note_cpu(cpu)
        mine = self.proofs.setdefault(key, {})
        new = Proof(proven, masked)
        mine[cpu.key] = mine[cpu.key].merged(new) if cpu.key in mine else new

    def disprove(self, key: str, cpu: Cpu, why: str) -> None:
        self.note_cpu(cpu)
        self.disproved.setdefault(key, {}).setdefault(cpu.key, why)
        self.proofs.get(key, {}).pop(cpu.key, None)
        if not self.proofs.get(key, True):
            del self.proofs[key]

    def forget(self, key: str) -> None:
        """Drop every proof of `key` (the policy now refuses it everywhere)."""
        self.proofs.pop(key, None)

    def note_cpu(self, cpu: Cpu, **info: Any) -> None:
        entry = self.cpus.setdefault(cpu.key, {})
        if cpu.name:
            entry.setdefault("name", cpu.name)
        for k, v in info.items():
            if isinstance(v, list):
                entry.setdefault(k, []).extend(v)
            else:
                entry[k] = v

    def merge(self, other: TrustTable) -> TrustTable:
        out = TrustTable(max(self.min_cases, other.min_cases))
        for t in (self, other):
            for key, by_cpu in t.proofs.items():
                for cpu_key, proof in by_cpu.items():
                    mine = out.proofs.setdefault(key, {})
                    mine[cpu_key] = mine[cpu_key].merged(proof) if cpu_key in mine else proof
            for key, why_by_cpu in t.disproved.items():
                for cpu_key, why in why_by_cpu.items():
                    out.disproved.setdefault(key, {}).setdefault(cpu_key, why)
            for cpu_key, info in t.cpus.items():
                entry = out.cpus.setdefault(cpu_key, {})
                for k, v in info.items():
                    if isinstance(v, list):  # campaigns: every table's, each once
                        entry[k] = entry.get(k, []) + [x for x in v if x not in entry.get(k, [])]
                    else:
                        entry[k] = v
        return out

    # --- the decision -----------------------------------------------------

    def verdict(self, key: str, cpu: Cpu, masked_ok: bool = False) -> str | None:
        """None if `key` may be emulated on `cpu`, else why not."""
        for cpu_key, why in sorted(self.disproved.get(key, {}).items()):
            # on any CPU: most mismatches are the engine's, whatever the CPU
            return f"untrusted: disproved on {cpu_key} ({why})"
        proofs = self.proofs.get(key, {})
        here = {k: p for k, p in proofs.items() if cpu.matches(_cpu(k))}
        if not here:
            if proofs:
                return f"untrusted on this CPU (proven on {', '.join(sorted(proofs))})"
            return UNTRUSTED
        proven = max(p.proven for p in here.values())
        if proven < self.min_cases:
            return f"untrusted on this CPU: {proven} proofs, {self.min_cases} needed"
        if masked_ok:
            return None
        # A proof that recorded whether undefined results differ outweighs an
        # older one (a table made before masking was recorded) that did not.
        recorded = {k: p for k, p in here.items() if p.masked is not None}
        if not recorded:
            cpu_key = min(here)
            return (f"proven on {cpu_key} only with undefined results masked, and not "
                    f"recorded whether they differ; prove this CPU: {PROVE_HINT}")  # fmt: skip
        for cpu_key, p in sorted(recorded.items()):
            if p.masked:
                return (f"undefined results differ on this CPU: {p.masked} of {p.proven} "
                        f"cases on {cpu_key} equal only after masking ({ENV_MASKED}=1 "
                        "emulates it)")  # fmt: skip
        return None

    def trusted(self, cpu: Cpu, masked_ok: bool = False) -> frozenset[str]:
        return frozenset(k for k in self.proofs if self.verdict(k, cpu, masked_ok) is None)

    def proven_cpus(self, key: str) -> list[str]:
        return sorted(self.proofs.get(key, {}))

    # --- files ------------------------------------------------------------

    @classmethod
    def load(cls, path: Path | str) -> TrustTable:
        """Raises ValueError naming the file for anything but a format-2 table."""
        try:
            raw = json.loads(Path(path).read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format', 1)}, not {FORMAT} (no CPUs recorded)")
            return cls(
                int(raw["min_cases"]),
                {k: {c: Proof(int(p[0]), None if p[1] is None else int(p[1]))
                     for c, p in by_cpu.items()} for k, by_cpu in raw["classes"].items()},
                {k: dict(v) for k, v in raw.get("disproved", {}).items()},
                {k: dict(v) for k, v in raw.get("cpus", {}).items()},
            )  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: not a trust table: {e}") from e

    def dump(self) -> str:
        """JSON with one line per class, so that a campaign's change is a readable diff."""

        def block(name: str, rows: dict[str, Any]) -> str:
            body = ",\n".join(
                f"  {json.dumps(k)}: {json.dumps(rows[k], sort_keys=True)}" for k in sorted(rows)
            )
            return f' "{name}": {{\n{body}\n }}'

        classes = {k: {c: [p.proven, p.masked] for c, p in by_cpu.items()}
                   for k, by_cpu in self.proofs.items()}  # fmt: skip
        head = (f' "format": {FORMAT},\n "min_cases": {self.min_cases},\n'
                f' "cpus": {json.dumps(self.cpus, sort_keys=True)}')  # fmt: skip
        return "{\n" + ",\n".join([head, block("disproved", self.disproved),
                                     block("classes", classes)]) + "\n}\n"  # fmt: skip


@cache
def _cpu(key: str) -> Cpu:
    return Cpu.from_key(key)


def packaged_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("trust.json")))


def local_path() -> Path:
    """The user's own table: what `emuprobe difftest --prove` wrote on their CPU."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emuprobe" / "trust.json"


def _load_quietly(path: Path, what: str) -> TrustTable:
    try:
        return TrustTable.load(path)
    except FileNotFoundError:
        return TrustTable()  # nothing proven there: those classes go native
    except (OSError, ValueError) as e:
        # emulating less is always safe; say once why it happens
        print(f"emuprobe: ignoring the {what} trust table: {e}", file=sys.stderr)
        return TrustTable()


@cache
def table() -> TrustTable:
    """The table in force: $EMUPROBE_TRUST_FILE alone if set, else the
    packaged table merged with the user's local one."""
    env = os.environ.get(ENV_FILE)
    if env:
        return _load_quietly(Path(env), ENV_FILE)
    return _load_quietly(packaged_path(), "packaged").merge(_load_quietly(local_path(), "local"))


def _masked_ok() -> bool:
    return os.environ.get(ENV_MASKED) == "1"


@cache
def trusted_here() -> frozenset[str]:
    """The classes the engine emulates on this CPU."""
    return table().trusted(this_cpu(), _masked_ok())


def clear_caches() -> None:
    """Forget the tables read (after a table or the environment changed)."""
    table.cache_clear()
    trusted_here.cache_clear()


def verdict(insn: CsInsn) -> str | None:
    """None if `insn`'s class may be emulated on this CPU, else why not."""
    key = class_key(insn)
    if key in trusted_here():
        return None
    return table().verdict(key, this_cpu(), _masked_ok()) or UNTRUSTED
