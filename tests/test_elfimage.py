"""ELF-side resolution checked against binutils on real binaries built here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from emuprobe.errors import ProbeError
from emuprobe.sys.elfimage import ElfImage
from emuprobe.sys.libraries import find_library_on_disk, is_path_spec, library_matches

FIXTURES = Path(__file__).parent / "fixtures"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
BUILDS = [("-O0", "-pie"), ("-O0", "-no-pie"), ("-O2", "-pie"), ("-O2", "-no-pie")]

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gcc", "nm", "readelf", "objdump")),
    reason="needs gcc and binutils",
)


def run(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


def gcc(tmp: Path, source: str, out: str, *flags: str) -> Path:
    target = tmp / out
    run("gcc", "-g0", *flags, "-o", target, FIXTURES / source)
    return target


@pytest.fixture(scope="module", params=BUILDS, ids=["-".join(b) for b in BUILDS])
def basic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    opt, pie = request.param
    tmp = tmp_path_factory.mktemp("elf")
    pic = "-fPIE" if pie == "-pie" else "-fno-pie"
    return gcc(tmp, "elf_basic.c", f"basic{opt}{pie}", opt, pic, pie)


@pytest.fixture(scope="module")
def ifunc_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("lib")
    return gcc(tmp, "elf_ifunc_lib.c", "libelfifunc.so.1", "-O1", "-shared", "-fPIC")


# -- oracles: binutils output, parsed ----------------------------------------


def nm_values(path: Path, dynamic: bool = False) -> dict[str, tuple[str, int]]:
    """name -> (nm type letter, value); versioned names keep their suffix."""
    out = run("nm", "--defined-only", *(["-D"] if dynamic else []), path)
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            values[parts[2]] = (parts[1], int(parts[0], 16))
    return values


def readelf_functions(path: Path) -> set[tuple[str, int, int, bool]]:
    """(name, value, size, is_ifunc) of defined FUNC/IFUNC in .symtab and .dynsym."""
    found: dict[tuple[str, int], tuple[int, bool]] = {}
    for line in run("readelf", "-sW", path).splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":") or f[3] not in ("FUNC", "IFUNC"):
            continue
        if f[6] == "UND":
            continue
        name = f[7].split("@")[0]
        key = (name, int(f[1], 16))
        size, ifunc = found.get(key, (0, False))
        found[key] = (max(size, int(f[2], 0)), ifunc or f[3] == "IFUNC")
    return {(n, v, s, i) for (n, v), (s, i) in found.items()}


@dataclass(frozen=True)
class Load:
    offset: int
    vaddr: int
    filesz: int
    flags: str


def readelf_loads(path: Path) -> list[Load]:
    loads = []
    for line in run("readelf", "-lW", path).splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            flags = "".join(x for x in f[6:-1])
            loads.append(Load(int(f[1], 16), int(f[2], 16), int(f[4], 16), flags))
    return loads


def objdump_function(path: Path, name: str) -> list[tuple[int, bytes, str]]:
    """(address, bytes, mnemonic) of each instruction objdump shows for `name`."""
    out = run("objdump", "-d", "-M", "intel", "--insn-width=16", path)
    lines = out.split(f"<{name}>:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    insns = []
    for line in lines:
        m = re.match(r"\s*([0-9a-f]+):\t((?:[0-9a-f]{2} )+)\s*\t?(\S*)", line)
        if m:
            raw = bytes.fromhex(m.group(2).replace(" ", ""))
            insns.append((int(m.group(1), 16), raw, m.group(3)))
    return insns


def objdump_range(path: Path, start: int, stop: int) -> list[int]:
    out = run("objdump", "-d", f"--start-address=0x{start:x}", f"--stop-address=0x{stop:x}", path)
    return [int(m.group(1), 16) for m in re.finditer(r"^\s*([0-9a-f]+):\t", out, re.M)]


def one_line_error(exc: pytest.ExceptionInfo[ProbeError]) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# -- symbols -----------------------------------------------------------------


def test_functions_equal_readelf(basic: Path) -> None:
    funcs = ElfImage.open(str(basic)).functions()
    assert {(s.name, s.vaddr, s.size, s.ifunc) for s in funcs} == readelf_functions(basic)
    assert [s.vaddr for s in funcs] == sorted(s.vaddr for s in funcs)
    assert len({(s.name, s.vaddr) for s in funcs}) == len(funcs)


def test_lookup_agrees_with_nm(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    values = nm_values(basic)
    names = ["main", "compute_sum", "mixed_widths", "helper", "badfn", "pick", "pick_two"]
    for name in names:
        assert image.lookup(name).vaddr == values[name][1], name
    assert values["helper"][0] == "t"  # a static function is found too
    assert values["pick"][0] == "i" and image.lookup("pick").ifunc


def test_header_facts(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    kind = re.search(r"Type:\s+(\S+)", run("readelf", "-h", basic))
    assert kind is not None
    assert image.is_pie == (kind.group(1) == "DYN")
    assert image.is_pie == (not basic.name.endswith("-no-pie"))
    st = os.stat(basic)
    assert image.identity == ((os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
    assert image.path == os.path.realpath(basic)


def test_shared_object_exports_once(ifunc_lib: Path) -> None:
    image = ElfImage.open(str(ifunc_lib))
    assert {(s.name, s.vaddr, s.size, s.ifunc) for s in image.functions()} == readelf_functions(
        ifunc_lib
    )
    dyn = nm_values(ifunc_lib, dynamic=True)
    assert dyn["pick_b"][1] == image.lookup("pick_b").vaddr  # in both tables, listed once
    assert [s.name for s in image.functions()].count("pick_b") == 1


def test_symbol_at_covers_objdump_instructions(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    ((start, size),) = [(v, s) for n, v, s, _i in readelf_functions(basic) if n == "compute_sum"]
    insns = objdump_function(basic, "compute_sum")
    # objdump also lists the alignment padding after the function's st_size.
    for addr, _raw, _m in insns:
        sym = image.symbol_at(addr)
        if addr < start + size:
            assert sym is not None and sym.name == "compute_sum"
        else:
            assert sym is None or sym.name != "compute_sum"
    assert image.symbol_at(start + size - 1) == image.lookup("compute_sum")


# -- instruction boundaries ----------------------------------------------------


@pytest.mark.parametrize("name", ["compute_sum", "mixed_widths", "main"])
def test_every_offset_against_objdump(basic: Path, name: str) -> None:
    image = ElfImage.open(str(basic))
    sym = image.lookup(name)
    starts = {addr for addr, _raw, _m in objdump_function(basic, name)}
    assert len(starts) > 3
    for off in range(sym.size):
        if sym.vaddr + off in starts:
            r = image.resolve(name, off)
            assert r.vaddr == sym.vaddr + off
            assert r.label == (f"{name}+{off}" if off else name)
            assert r.symbol == sym
        else:
            with pytest.raises(ProbeError) as exc:
                image.resolve(name, off)
            msg = one_line_error(exc)
            assert msg.startswith(f"{name}+{off}: not on an instruction boundary (")
            # The hint names real neighbours.
            for hint in re.findall(r"\+(\d+)", msg.split("(", 1)[1]):
                assert sym.vaddr + int(hint) in starts


def test_absolute_addresses(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    insns = objdump_function(basic, "mixed_widths")
    addr, raw, _m = next(i for i in insns if len(i[1]) > 1)
    r = image.resolve(None, address=addr)
    assert (r.vaddr, r.label) == (addr, f"0x{addr:x}")
    assert r.symbol is not None and r.symbol.name == "mixed_widths"
    with pytest.raises(ProbeError, match="not on an instruction boundary"):
        image.resolve(None, address=addr + 1)
    with pytest.raises(ProbeError, match="not on an instruction boundary"):
        image.check_boundary(addr + len(raw) - 1)
    image.check_boundary(addr + len(raw))


def test_offset_past_end_rejected(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    size = image.lookup("helper").size
    with pytest.raises(ProbeError) as exc:
        image.resolve("helper", size)
    assert "past the end" in one_line_error(exc)


def test_undecodable_byte_like_objdump(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    insns = objdump_function(basic, "badfn")
    assert insns[0][2] == "(bad)"
    assert image.first_instruction(image.lookup("badfn").vaddr) == "(bad)"
    # objdump steps one byte over "(bad)" and finds ret; so does the sweep.
    assert insns[1][0] == image.resolve("badfn", 1).vaddr
    assert image.first_instruction(insns[1][0]) == "ret"


def test_first_instruction_mnemonics(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    for name in ("main", "compute_sum", "mixed_widths", "helper"):
        for addr, _raw, mnemonic in objdump_function(basic, name)[:6]:
            assert image.first_instruction(addr).split()[0] == mnemonic


# -- file offsets ----------------------------------------------------------------


def test_offsets_agree_with_program_headers(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    loads = readelf_loads(basic)
    data = basic.read_bytes()
    for name in ("main", "compute_sum", "mixed_widths"):
        for addr, raw, _m in objdump_function(basic, name):
            (seg,) = [s for s in loads if s.vaddr <= addr < s.vaddr + s.filesz]
            assert "E" in seg.flags
            off = seg.offset + addr - seg.vaddr
            assert image.vaddr_to_offset(addr) == off
            assert image.read(addr, len(raw)) == raw == data[off : off + len(raw)]
            assert image.resolve(None, address=addr).file_offset == off


def test_data_is_not_code(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    values = nm_values(basic)
    for name in ("table", "counter"):
        addr = values[name][1]
        with pytest.raises(ProbeError) as exc:
            image.vaddr_to_offset(addr)
        assert one_line_error(exc) == f"{basic.name}: 0x{addr:x} is not in executable code"
        with pytest.raises(ProbeError, match="not in executable code"):
            image.resolve(None, address=addr)


def test_read_stops_at_segment_end(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    seg = next(s for s in readelf_loads(basic) if "E" in s.flags)
    end = seg.vaddr + seg.filesz
    assert len(image.read(end - 3, 16)) == 3


# -- files that cannot be probed -----------------------------------------------


def test_open_errors(tmp_path: Path, ifunc_lib: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    arm = tmp_path / "arm"
    data = bytearray(ifunc_lib.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
    arm.write_bytes(bytes(data))
    obj = tmp_path / "basic.o"
    run("gcc", "-c", "-o", obj, FIXTURES / "elf_basic.c")
    cases = {
        str(tmp_path / "missing"): "no such file",
        str(tmp_path): "is a directory",
        str(text): "not an ELF file",
        str(arm): "not an x86-64 ELF file (EM_AARCH64)",
        str(obj): "not an executable or shared object (ET_REL)",
    }
    for path, why in cases.items():
        with pytest.raises(ProbeError) as exc:
            ElfImage.open(path)
        assert one_line_error(exc) == f"{path}: {why}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_open_permission_denied(tmp_path: Path, ifunc_lib: Path) -> None:
    locked = tmp_path / "locked"
    shutil.copy(ifunc_lib, locked)
    locked.chmod(0)
    with pytest.raises(ProbeError, match="permission denied"):
        ElfImage.open(str(locked))


def test_unknown_function_suggests(basic: Path) -> None:
    image = ElfImage.open(str(basic))
    with pytest.raises(ProbeError) as exc:
        image.lookup("compute_sun")
    msg = one_line_error(exc)
    assert msg.startswith(f"{basic.name}: no function 'compute_sun' (did you mean: compute_sum")
    with pytest.raises(ProbeError) as exc:
        image.lookup("zzqqxxyy")
    assert one_line_error(exc) == f"{basic.name}: no function 'zzqqxxyy' (no close match)"


def test_same_static_name_twice_is_ambiguous(tmp_path: Path) -> None:
    exe = tmp_path / "dup"
    run("gcc", "-O2", "-o", exe, FIXTURES / "elf_basic.c", FIXTURES / "elf_dup.c")
    helpers = [
        int(line.split()[0], 16) for line in run("nm", exe).splitlines() if line.endswith(" helper")
    ]
    assert len(helpers) == 2
    with pytest.raises(ProbeError) as exc:
        ElfImage.open(str(exe)).lookup("helper")
    msg = one_line_error(exc)
    assert "'helper' is ambiguous" in msg
    assert all(f"0x{a:x}" in msg for a in helpers)
    ElfImage.open(str(exe)).resolve(None, address=helpers[1])  # an address is never ambiguous


def test_ifunc_in_executable_is_refused(basic: Path) -> None:
    # dlopen refuses executables, so there is no way to run the resolver here.
    with pytest.raises(ProbeError) as exc:
        ElfImage.open(str(basic)).resolve("pick")
    assert "ifunc 'pick'" in one_line_error(exc)


# -- libc --------------------------------------------------------------------


@pytest.fixture(scope="module")
def libc() -> ElfImage:
    if not os.path.exists(LIBC):
        pytest.skip(f"{LIBC} not present")
    return ElfImage.open(LIBC)


def test_libc_lookups_agree_with_nm(libc: ElfImage) -> None:
    dyn = nm_values(Path(LIBC), dynamic=True)
    malloc = libc.lookup("malloc")
    assert malloc.vaddr == dyn["malloc@@GLIBC_2.2.5"][1] and not malloc.ifunc
    assert libc.lookup("malloc@@GLIBC_2.2.5") == malloc
    assert libc.resolve("malloc").file_offset == libc.vaddr_to_offset(malloc.vaddr)
    # Two memcpy: the compat one and the default ("@@") the linker binds to.
    compat = [k for k in dyn if k.startswith("memcpy@") and not k.startswith("memcpy@@")]
    default = [k for k in dyn if k.startswith("memcpy@@")]
    if compat and default:
        assert libc.lookup("memcpy").vaddr == dyn[default[0]][1]
        assert libc.lookup(compat[0]).vaddr == dyn[compat[0]][1]
        with pytest.raises(ProbeError) as exc:
            libc.lookup("memcpy@GLIBC_0.1")
        assert "no version 'GLIBC_0.1' of 'memcpy'" in one_line_error(exc)
    with pytest.raises(ProbeError) as exc:
        libc.lookup("mallok")
    assert "did you mean: malloc" in one_line_error(exc)


def test_libc_ifunc_matches_a_real_process(libc: ElfImage, tmp_path: Path) -> None:
    probe = gcc(tmp_path, "elf_ifunc_probe.c", "ifunc_probe", "-O0", "-fPIE", "-pie")
    chosen: dict[str, int] = {}
    for line in run(probe).splitlines():
        name, mapped, hex_vaddr = line.split()
        if os.path.samefile(mapped, LIBC):
            chosen[name] = int(hex_vaddr, 16)
    assert "strlen" in chosen
    strlen = libc.lookup("strlen")
    assert strlen.ifunc
    dyn = nm_values(Path(LIBC), dynamic=True)
    for name, vaddr in chosen.items():
        r = libc.resolve(name)
        assert r.vaddr == vaddr != libc.lookup(name).vaddr
        assert r.symbol is not None and name in r.symbol.name
        assert r.label.startswith(f"{name} (")
        assert r.file_offset == libc.vaddr_to_offset(vaddr)
        for versioned in (k for k in dyn if k.startswith(f"{name}@@")):
            assert libc.resolve(versioned).vaddr == vaddr  # through dlvsym
    # The offset counts from the implementation; objdump tells its boundaries.
    starts = objdump_range(Path(LIBC), chosen["strlen"], chosen["strlen"] + 32)
    second = starts[1] - starts[0]
    assert libc.resolve("strlen", second).vaddr == starts[1]
    if second > 1:
        with pytest.raises(ProbeError) as exc:
            libc.resolve("strlen", 1)
        assert one_line_error(exc).startswith("strlen+1 (")


def test_ifunc_in_unloaded_library(ifunc_lib: Path) -> None:
    image = ElfImage.open(str(ifunc_lib))
    values = nm_values(ifunc_lib)
    assert values["pick"][0] == "i"
    r = image.resolve("pick")
    assert r.vaddr == values["pick_b"][1] != values["pick"][1]
    assert r.label == "pick (pick_b)" and r.symbol == image.lookup("pick_b")
    insns = objdump_function(ifunc_lib, "pick_b")
    off = insns[1][0] - insns[0][0]
    assert image.resolve("pick", off).label == f"pick+{off} (pick_b+{off})"
    # The library was loaded by a child, not here: its constructor never ran in us.
    with open("/proc/self/maps") as maps:
        assert str(ifunc_lib) not in maps.read()


# -- library specs -------------------------------------------------------------

MATCHES = [
    ("libc", "/usr/lib/x86_64-linux-gnu/libc.so.6", True),
    ("libc", "/lib/libc-2.31.so", True),
    ("libc", "/usr/lib/x86_64-linux-gnu/libcap.so.2", False),
    ("libc", "/usr/lib/x86_64-linux-gnu/libcrypt.so.1", False),
    ("libc", "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0", False),
    ("libc", "/usr/lib/x86_64-linux-gnu/libc.so.6 (deleted)", True),
    ("libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", True),
    ("libm.so.6", "/usr/lib/x86_64-linux-gnu/libmvec.so.1", False),
    ("libm.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", False),
    ("libm", "/usr/lib/x86_64-linux-gnu/libmvec.so.1", False),
    ("libpthread", "/usr/lib/x86_64-linux-gnu/libpthread.so.0", True),
    ("libpthread", "/lib/libpthread-2.31.so", True),
    ("libpthread", "/usr/lib/libpthread_nonshared.a", False),
    ("libstdc++", "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30", True),
    ("libfoo.so", "/opt/libfoo.so.1.2", True),
]


@pytest.mark.parametrize("spec,mapped,expected", MATCHES)
def test_library_matches_names(spec: str, mapped: str, expected: bool) -> None:
    assert library_matches(spec, mapped) is expected
    assert not is_path_spec(spec)


def test_library_matches_paths(tmp_path: Path, ifunc_lib: Path) -> None:
    alias = tmp_path / "alias.so"
    alias.symlink_to(ifunc_lib)
    assert is_path_spec(str(alias))
    assert library_matches(str(alias), str(ifunc_lib))
    assert library_matches(str(ifunc_lib), str(alias))
    assert not library_matches(str(alias), LIBC)
    assert not library_matches(str(tmp_path / "gone.so"), LIBC)


def test_find_library_on_disk(ifunc_lib: Path) -> None:
    libc = find_library_on_disk("libc")
    assert libc is not None and os.path.isfile(libc)
    assert os.path.basename(libc).startswith("libc.so")
    assert libc == os.path.realpath(libc)
    if os.path.exists(LIBC):
        assert os.path.samefile(libc, LIBC)
    libm = find_library_on_disk("libm.so.6")
    assert libm is not None and os.path.basename(libm).startswith("libm.so")
    assert find_library_on_disk(str(ifunc_lib)) == os.path.realpath(ifunc_lib)
    assert find_library_on_disk("libno-such-library-here") is None
    assert find_library_on_disk(str(FIXTURES / "elf_basic.c")) is None


def test_check_targets_finds_each_library_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many probes in one library search the disk (and the program's RUNPATH) once."""
    from emuprobe.engine import targets
    from emuprobe.engine.sites import Probe
    from emuprobe.spec.probe import parse_probe

    calls: list[str] = []

    def counted(spec: str, dirs: list[str] | None = None) -> str | None:
        calls.append(spec)
        return find_library_on_disk(spec, dirs)

    monkeypatch.setattr(targets, "find_library_on_disk", counted)
    specs = [parse_probe(f"libc:{n}") for n in ("malloc", "free", "calloc", "realloc")]
    got = targets.check_targets(
        [(s, Probe(s.name, s.text)) for s in specs], "/bin/true", targets.ImageCache(), None
    )
    assert calls == ["libc"]
    assert len({t.checked.identity for t in got}) == 1
    with pytest.raises(ProbeError, match="library 'libno-such' not found"):
        missing = parse_probe("libno-such:f")
        targets.check_targets(
            [(missing, Probe(missing.name, missing.text))], "/bin/true", targets.ImageCache(), None
        )
