"""Compile the C fixtures in tests/fixtures/ with gcc at test time.

``build(name, variant)`` returns the path of a built program (or shared
library), compiling it on first use.  Builds are cached for the life of the
Python process in a private temporary directory, keyed by a hash of the
sources, flags and compiler, so a session compiles each (fixture, variant)
once and a stale binary is never reused after a source edit.

Pass ``out_dir`` to get a private copy with its own inode: kernel uprobes are
registered per inode, so a test that uses them must not share the cached
binary with tests that run the same fixture untraced.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

VARIANTS: dict[str, tuple[str, ...]] = {
    "O0-pie": ("-O0", "-fPIE", "-pie"),
    "O2-pie": ("-O2", "-fPIE", "-pie"),
    "O0-nopie": ("-O0", "-fno-pie", "-no-pie"),
    "O2-nopie": ("-O2", "-fno-pie", "-no-pie"),
    # endbr64 becomes the first instruction of every compiled function.
    "O0-cet": ("-O0", "-fPIE", "-pie", "-fcf-protection=full"),
}

# Flags for shared libraries: always PIC, whatever the executable's variant.
_LIB_VARIANT_FLAGS: dict[str, tuple[str, ...]] = {
    v: tuple(f for f in flags if f not in ("-fPIE", "-pie", "-fno-pie", "-no-pie"))
    for v, flags in VARIANTS.items()
}

_COMMON = ("-g", "-Wall", "-Wextra", "-Werror")


@dataclass(frozen=True)
class Fixture:
    """How to build one fixture: its sources, output name and link needs."""

    sources: tuple[str, ...]
    output: str
    shared: bool = False
    libs: tuple[str, ...] = ()
    # Other fixtures built into the same directory (shared libraries found
    # through rpath $ORIGIN).
    deps: tuple[str, ...] = ()
    rpath_origin: bool = False
    extra: tuple[str, ...] = field(default=())
    werror: bool = True


FIXTURE_SPECS: dict[str, Fixture] = {
    "firstinsn": Fixture(("firstinsn.c",), "firstinsn"),
    "prefixed": Fixture(("prefixed.c",), "prefixed"),
    "threads": Fixture(("threads.c",), "threads", libs=("-pthread",)),
    "forkexec": Fixture(("forkexec.c",), "forkexec"),
    "vfork": Fixture(("vfork.c",), "vfork"),
    "lib": Fixture(("lib.c",), "libemufix.so", shared=True),
    "dllib": Fixture(("dllib.c",), "libemudl.so", shared=True),
    "uselib": Fixture(
        ("uselib.c",), "uselib", libs=("-L.", "-lemufix"), deps=("lib",), rpath_origin=True
    ),
    "dlopen": Fixture(("dlopen.c",), "dlopen", libs=("-ldl",), deps=("dllib",), rpath_origin=True),
    "tftrap": Fixture(("tftrap.c",), "tftrap"),
    "selfmod": Fixture(("selfmod.c",), "selfmod"),
    "dlcycle": Fixture(("dlcycle.c",), "dlcycle", libs=("-ldl",), deps=("dllib",),
                       rpath_origin=True),
    "signals": Fixture(("signals.c",), "signals", libs=("-pthread",)),
    "loop": Fixture(("loop.c",), "loop"),
}


class FixtureBuildError(RuntimeError):
    """gcc failed (or is missing); the message carries the command and its output."""


_lock = threading.Lock()
_cache_root: Path | None = None
_built: dict[str, Path] = {}


def _session_dir() -> Path:
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="emuprobe-fixtures-"))
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root


@functools.cache
def _gcc_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FixtureBuildError(f"gcc is not usable: {exc}") from exc
    return out.stdout.splitlines()[0] if out.stdout else "gcc"


def _spec(name: str) -> Fixture:
    if name in FIXTURE_SPECS:
        return FIXTURE_SPECS[name]
    # Any other single-file program in fixtures/ builds as a plain executable,
    # so other suites can use build() without registering here.
    if (FIXTURES / f"{name}.c").is_file():
        return Fixture((f"{name}.c",), name, libs=("-pthread",), werror=False)
    raise FixtureBuildError(f"unknown fixture {name!r}; known: {sorted(FIXTURE_SPECS)}")


def _closure(name: str) -> list[str]:
    """The fixture and everything it depends on, dependencies first."""
    order: list[str] = []

    def visit(n: str) -> None:
        for d in _spec(n).deps:
            visit(d)
        if n not in order:
            order.append(n)

    visit(name)
    return order


def _key(names: Sequence[str], variant: str, extra: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(_gcc_version().encode())
    h.update(repr((variant, VARIANTS[variant], tuple(extra), _COMMON)).encode())
    for n in names:
        spec = _spec(n)
        h.update(repr(spec).encode())
        for src in spec.sources:
            h.update((FIXTURES / src).read_bytes())
    # Sources may #include a fixtures/*.h (selfexec.h): an edited header must
    # not reuse a binary built from the old one.
    for header in sorted(FIXTURES.glob("*.h")):
        h.update(header.name.encode() + header.read_bytes())
    return h.hexdigest()[:16]


def _compile_one(name: str, variant: str, out_dir: Path, extra: Sequence[str]) -> Path:
    spec = _spec(name)
    out = out_dir / spec.output
    flags = _LIB_VARIANT_FLAGS[variant] if spec.shared else VARIANTS[variant]
    common = _COMMON if spec.werror else tuple(f for f in _COMMON if f != "-Werror")
    cmd = ["gcc", *common, *flags, *spec.extra, *extra]
    if spec.shared:
        cmd += ["-fPIC", "-shared"]
    cmd += [str(FIXTURES / s) for s in spec.sources]
    cmd += ["-o", str(out), *spec.libs]
    if spec.rpath_origin:
        cmd.append("-Wl,-rpath,$ORIGIN")
    # cwd=out_dir so "-L." finds the libraries built there just before.
    proc = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FixtureBuildError(
            f"building fixture {name!r} ({variant}) failed:\n$ {' '.join(cmd)}\n{proc.stderr}"
        )
    return out


def build(
    name: str,
    variant: str = "O0-pie",
    out_dir: Path | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """Build fixture ``name`` in ``variant`` and return the path of its output.

    Shared libraries it needs are built into the same directory.  With
    ``out_dir`` the fixture is compiled there (fresh files, new inodes);
    without, it comes from the per-process cache.  Raises FixtureBuildError.
    """
    if variant not in VARIANTS:
        raise FixtureBuildError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    names = _closure(name)
    with _lock:
        if out_dir is None:
            key = f"{name}-{variant}-{_key(names, variant, extra)}"
            if key in _built and _built[key].exists():
                return _built[key]
            target = _session_dir() / key
        else:
            key = ""
            target = Path(out_dir)
        target.mkdir(parents=True, exist_ok=True)
        result = target
        for n in names:
            result = _compile_one(n, variant, target, extra)
        if key:
            _built[key] = result
        return result


def symbol_vaddr(path: Path | str, symbol: str) -> int:
    """The st_value of ``symbol`` in the ELF file's .symtab (or .dynsym)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        for secname in (".symtab", ".dynsym"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            syms = sec.get_symbol_by_name(symbol)  # type: ignore[attr-defined]
            if syms:
                return int(syms[0]["st_value"])
    raise KeyError(f"{symbol} not found in {path}")


def vaddr_to_offset(path: Path | str, vaddr: int) -> int:
    """Translate an ELF virtual address into a file offset via PT_LOAD headers.

    Kernel uprobe_events wants file offsets; for a PIE they often equal the
    vaddr, for a non-PIE (based at 0x400000) they never do.
    """
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            start = int(seg["p_vaddr"])
            if start <= vaddr < start + int(seg["p_filesz"]):
                return vaddr - start + int(seg["p_offset"])
    raise ValueError(f"0x{vaddr:x} is not in a file-backed PT_LOAD of {path}")


def symbol_offset(path: Path | str, symbol: str) -> int:
    """File offset of ``symbol``'s first byte, as uprobe_events wants it."""
    return vaddr_to_offset(path, symbol_vaddr(path, symbol))


def run(path: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a built fixture to completion; the child is killed if it times out."""
    return subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _env() -> dict[str, str]:
    # Keep the loader deterministic: no inherited LD_PRELOAD / LD_LIBRARY_PATH.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LD_")}
    return env


def parse_counts(stdout: str) -> dict[str, int]:
    """Parse ``calls NAME=COUNT`` lines (firstinsn and friends) into a dict."""
    counts: dict[str, int] = {}
    for line in stdout.splitlines():
        if line.startswith("calls "):
            # Only the first NAME=COUNT: later pairs are sums, not calls.
            k, _, v = line[len("calls ") :].split(" ")[0].partition("=")
            if k.isidentifier() and v.isdigit():
                counts[k] = int(v)
    return counts


# Expected stdout of the deterministic fixtures, recomputed from their
# arguments, so a traced run can be checked without an untraced one.

_M64 = (1 << 64) - 1


def cpu_has(flag: str) -> bool:
    """True if /proc/cpuinfo lists ``flag`` (e.g. "avx2")."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return flag in line.split(":", 1)[1].split()
    return False


def _firstinsn_checksum(n: int) -> int:
    cs = 0xCBF29CE484222325

    def mix(v: int) -> None:
        nonlocal cs
        cs = (cs * 31 + (v & _M64)) & _M64

    for i in range(n):
        for v in (i + 1, 3 * i, i ^ 0x5A, 0x1234 + i, 5 * i, i + 7, i + 101, 2 * i + 5):
            mix(v)
        mix(i + 20 if i & 1 else i + 10)  # f_jcc: odd arguments take the jne
        mix(i + 1)  # f_ret_caller
        mix(1)  # f_fsload == canary
        mix((3 * i) // 2)  # (long)(i + 0.5 * i)
        mix(i)  # f_movaps, low lane
        mix(~i)  # f_movaps, high lane
        mix(2 * i)  # f_lockxadd old value
        mix(1)  # f_syscall == getpid
        for k in range(4):
            mix(i + k)  # f_vmovdqu (or its stand-in)
        mix(7 * i + 3)  # c_func
    mix(2 * n)
    return cs


FIRSTINSN_FUNCS = (
    "f_push f_movrr f_subrsp f_riprel_load f_riprel_store f_stack_store f_call f_call_helper"
    " f_jmp f_jmp_tail f_jcc f_jcc_caller f_ret f_ret_caller f_fsload f_addsd f_movaps"
    " f_lockxadd f_syscall f_syscall_caller f_vmovdqu c_func"
).split()


def expected_stdout(name: str, *args: str) -> str:
    """The exact stdout of fixture ``name`` run with ``args`` (deterministic ones only)."""
    a = [int(x) for x in args if x.lstrip("-").isdigit()]

    def tri(n: int, mul: int, add: int) -> int:
        return mul * n * (n - 1) // 2 + add * n

    if name == "firstinsn":
        n = a[0] if a else 1000
        vm = n if cpu_has("avx2") else 0
        lines = [f"calls {f}={vm if f == 'f_vmovdqu' else n}" for f in FIRSTINSN_FUNCS]
        lines += [f"jcc taken={n // 2}", f"checksum=0x{_firstinsn_checksum(n):016x}"]
        if "pause" in args:
            lines.append("PAUSED")
    elif name == "threads":
        t = 8 * (a[0] if a else 1000) + (a[1] if len(a) > 1 else 0)
        lines = ["threads=8", f"calls work={t}", f"calls t_atomic_inc={t}", f"counter={t}"]
        lines.append(f"sum={t * (t - 1) // 2}")
    elif name in ("forkexec", "vfork"):
        # Both print through selfexec.h; only forkexec's fork child also
        # calls the function (and says so), so it has four images' calls.
        n = a[0] if a else 1000
        fork = name == "forkexec"
        func, s = ("fe_func", tri(n, 3, 1)) if fork else ("vf_func", tri(n, 5, 2))
        lines = [f"fork-child calls {func}={n} sum={s}"] if fork else []
        lines += [
            f"exec-child calls {func}={n} sum={s}",
            f"parent calls {func}={2 * n} sum={2 * s}",
            "child status=0",
            f"total {func}={(4 if fork else 3) * n}",
        ]
    elif name == "uselib":
        n = a[0] if a else 1000
        lines = [f"calls lib_func={n}", f"lib counted={n}", f"sum={tri(n, 11, 4)}"]
    elif name == "dlopen":
        n = a[0] if a else 1000
        k = a[1] if len(a) > 1 else 1000
        s = tri(n, 2, 1) + tri(k, 13, 6)
        lines = [f"calls pre_func={n}", f"calls dl_func={k}", f"dl counted={k}", f"sum={s}"]
    elif name == "signals":
        n = a[0] if a else 100000
        k = a[1] if len(a) > 1 else 16
        mode = next((x for x in args[1:2] if not x.isdigit()), "all")
        lines = []
        if mode in ("all", "usr1"):
            s = tri(n, 9, 1) + sum(9 * (1000 + j) + 1 for j in range(k))
            lines += [f"usr1 sent={k} handled={k}", f"calls sig_func={n + k} sum={s}"]
        if mode in ("all", "sigtrap"):
            lines.append(f"sigtrap raised={k} handled={k} si_tkill={k}")
        if mode in ("all", "int3"):
            lines.append(f"int3 executed={k} handled={k} si_kernel={k} rip_after_int3={k}")
    else:
        raise KeyError(f"no expected output for fixture {name!r}")
    return "".join(line + "\n" for line in lines)
