"""The package layout is a stack of layers: each module imports only from
its own package or from a lower layer, and nothing imports in a circle.

Every import counts, including those inside functions (a function-level
import that dodges a circle at load time is still a circle in the design).
The layer of a module is the layer of its package; the root modules are
listed one by one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "emuprobe"

# Lowest first.  See README "Design in a paragraph".
LAYERS: dict[str, int] = {
    "emuprobe.errors": 0,
    "emuprobe.platform": 1,
    "emuprobe.disasm": 1,  # the shared capstone decoders
    "emuprobe.sys": 2,  # ptrace, /proc maps and memory, tasks, ELF files, libraries
    "emuprobe.spec": 2,  # the PROBE grammar, perf's forms, fetch args (pure)
    "emuprobe.x86": 3,  # bytes -> Plan, policy, trust, registers, addresses (pure)
    "emuprobe._hotloop": 4,  # the compiled module, built from the C sources of exec/ and engine/
    "emuprobe.exec": 5,  # running one Plan: FastPath, host SSE, Unicorn, XOL preparation
    "emuprobe.engine": 6,  # probes, sites, tracees, waits, stepping, hot loop, Session
    "emuprobe.output": 7,
    "emuprobe.api": 7,
    "emuprobe.perfbridge": 8,  # perf's front end, kernel events, exports
    "emuprobe.difftest": 8,  # the emulator against the CPU, with its oracle
    "emuprobe.cli": 9,
    "emuprobe.__main__": 10,
    "emuprobe": 11,  # the package's own __init__
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _layer(module: str) -> tuple[int, str]:
    """(layer, unit): the unit is the package, or the root module itself."""
    parts = module.split(".")
    for unit in (module, ".".join(parts[:2])):
        if unit in LAYERS:
            return LAYERS[unit], unit
    raise AssertionError(f"{module} has no layer: add its package to LAYERS")


def _imports(module: str, path: Path) -> set[str]:
    """The emuprobe modules `module` imports, wherever in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES
                or f"{source}.{a.name}" in LAYERS else source
                for a in node.names
            ]  # fmt: skip
        else:
            continue
        out |= {n for n in names if n.split(".")[0] == "emuprobe" and n != module}
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_import_goes_down_or_stays_in_its_package() -> None:
    upward = []
    for module, targets in sorted(GRAPH.items()):
        mine, my_unit = _layer(module)
        for target in sorted(targets):
            theirs, their_unit = _layer(target)
            if their_unit != my_unit and theirs >= mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_between_modules() -> None:
    found = _cycle(GRAPH)
    assert found is None, " -> ".join(found or [])


def test_no_import_circle_between_packages() -> None:
    units: dict[str, set[str]] = defaultdict(set)
    for module, targets in GRAPH.items():
        for target in targets:
            a, b = _layer(module)[1], _layer(target)[1]
            if a != b:
                units[a].add(b)
    found = _cycle(dict(units))
    assert found is None, " -> ".join(found or [])


def test_the_checks_can_fail() -> None:
    """The circle finder finds a circle (so a green run means something)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
