"""Where an IFUNC resolves on this machine: dlsym's answer, as a file offset.

Asked in this process when the library is loaded already (libc always is);
otherwise in a child (`python -m emuprobe.sys.ifunc PATH NAME VERSION`),
because dlopen runs the library's constructors, which must not run in the
process that holds the ptrace attachments.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys

from emuprobe.errors import ProbeError
from emuprobe.sys.maps import file_identity, read_maps

_MARKER = "emuprobe-dlsym-offset"


@functools.lru_cache(maxsize=256)
def ifunc_file_offset(
    path: str, identity: tuple[tuple[int, int], int], name: str, version: str | None
) -> int:
    # Already loaded in this process (libc always is): asking costs nothing.
    # Any doubt (say, an older copy of the file is loaded) goes to the child.
    try:
        offset = _dlsym_file_offset(path, name, version, noload=True)
    except ProbeError:
        offset = None
    if offset is not None:
        return offset
    # Not loaded: dlopen runs the library's constructors, which must not run
    # in the process that holds the ptrace attachments, so a child does it.
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", __name__, path, name, version or ""]
    try:
        done = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ProbeError(str(e)) from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARKER + " "):
            return int(line.split()[1])
    raise ProbeError((done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1])


def _dlsym_file_offset(path: str, name: str, version: str | None, noload: bool) -> int | None:
    """File offset of what dlsym gives for `name` in `path`, loaded in this process.

    None if `noload` and the file is not loaded; ProbeError(reason) on failure.
    """
    mode = os.RTLD_LAZY | (os.RTLD_NOLOAD if noload else os.RTLD_LOCAL)
    try:
        handle = ctypes.CDLL(path, mode=mode)._handle
    except OSError as e:
        if noload:
            return None
        raise ProbeError(str(e).removeprefix(f"{path}: ")) from None
    libdl = ctypes.CDLL(None)
    find = libdl.dlvsym if version else libdl.dlsym
    find.restype = ctypes.c_void_p
    names = [name.encode()] + ([version.encode()] if version else [])
    addr = find(ctypes.c_void_p(handle), *names)
    if not addr:
        raise ProbeError("dlsym found nothing")
    # The mapping that holds the address gives its file offset directly; this
    # also proves that dlsym answered from this file and not a dependency.
    identity = file_identity(path)
    for m in read_maps(os.getpid()):
        if (m.dev, m.inode) == identity and m.start <= addr < m.end:
            return int(m.offset + (addr - m.start))
    raise ProbeError("dlsym answered from another file")


def _main(argv: list[str]) -> int:
    path, name, version = argv
    try:
        offset = _dlsym_file_offset(path, name, version or None, noload=False)
    except ProbeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{_MARKER} {offset}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
