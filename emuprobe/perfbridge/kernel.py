"""The same probes as kernel uprobes: the XOL baseline and a hit-count oracle.

Kernel uprobes are registered through tracefs (``uprobe_events``), enabled
per event, and counted in ``uprobe_profile``.  A uprobe is attached to an
inode, not a process: every process that maps the file is probed while the
event is enabled, so callers that want exact counts should probe a private
copy of the binary.

Nothing here is used on emuprobe's own hit path; it exists so tests and
benchmarks can compare emuprobe against what the kernel does (and show the
``[uprobes]`` VMA the kernel adds on the first out-of-line hit).
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import subprocess
import time
from types import TracebackType

_TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class KernelUprobesUnavailable(Exception):
    """Kernel uprobes cannot be used here; str() says why (for pytest skips)."""


class KernelUprobeError(OSError):
    """tracefs refused a definition, an enable or a removal; carries the line."""


def tracefs_dir() -> str:
    """Return a tracefs directory that has ``uprobe_events``.

    Mounts tracefs at /sys/kernel/tracing when that directory is empty (as in
    fresh containers), which needs root.  Raises KernelUprobesUnavailable.
    """
    for d in _TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(d, "uprobe_events")):
            return _check_writable(d)
    if os.geteuid() != 0:
        raise KernelUprobesUnavailable("kernel uprobes need root (tracefs is not mounted)")
    target = _TRACEFS_CANDIDATES[0]
    if not os.path.isdir(target):
        raise KernelUprobesUnavailable(f"{target} does not exist (no tracefs in this kernel?)")
    if not _is_mountpoint_with_content(target):
        mount = next((p for p in ("/usr/bin/mount", "/bin/mount") if os.path.exists(p)), None)
        if mount is None:
            raise KernelUprobesUnavailable("no /usr/bin/mount to mount tracefs with")
        proc = subprocess.run(  # by absolute path: as root, never whatever PATH finds first
            [mount, "-t", "tracefs", "nodev", target], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise KernelUprobesUnavailable(
                f"cannot mount tracefs at {target}: {proc.stderr.strip() or proc.returncode}"
            )
    if not os.path.exists(os.path.join(target, "uprobe_events")):
        raise KernelUprobesUnavailable("tracefs has no uprobe_events (CONFIG_UPROBE_EVENTS off)")
    return _check_writable(target)


def _is_mountpoint_with_content(d: str) -> bool:
    return os.path.ismount(d) and bool(os.listdir(d))


def _check_writable(d: str) -> str:
    # uprobe_events is mode 0640 root: readable is not enough to register.
    if not os.access(os.path.join(d, "uprobe_events"), os.W_OK):
        raise KernelUprobesUnavailable(f"{d}/uprobe_events is not writable (need root)")
    return d


def available() -> tuple[bool, str]:
    """(True, "") if kernel uprobes can be registered here, else (False, reason)."""
    try:
        tracefs_dir()
    except KernelUprobesUnavailable as exc:
        return False, str(exc)
    return True, ""


def _append(path: str, line: str) -> None:
    # O_APPEND, never O_TRUNC: opening uprobe_events for truncation deletes
    # EVERY uprobe event on the system, including other tools' probes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as exc:
        why = _last_error(os.path.dirname(path))
        raise KernelUprobeError(exc.errno, f"{path}: {line!r}: {exc.strerror}{why}") from None
    finally:
        os.close(fd)


def _last_error(tracefs: str) -> str:
    # The kernel explains a rejected definition only in error_log.
    try:
        lines = [ln.strip() for ln in _read(os.path.join(tracefs, "error_log")).splitlines()]
    except OSError:
        return ""
    return f" ({' / '.join(lines[-3:])})" if lines else ""


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        raise KernelUprobeError(exc.errno, f"{path}: {text!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class KernelUprobes:
    """A group of kernel uprobes that exists exactly for the ``with`` block.

    ``add`` registers (disabled); entering enables every added event; leaving
    (also on an exception) snapshots the hit counts, disables, deletes and
    verifies the group is gone from uprobe_events.
    """

    def __init__(self, group: str | None = None) -> None:
        self.group = group if group is not None else f"emuprobe_{os.getpid()}"
        if not _NAME_RE.match(self.group):
            raise ValueError(f"bad uprobe group name {self.group!r}")
        self.tracefs = tracefs_dir()
        self._events: dict[str, str] = {}  # name -> path
        self._active = False
        self._final_hits: dict[str, int] | None = None
        self._atexit = False

    @property
    def events(self) -> list[str]:
        return list(self._events)

    def add(
        self,
        path: str,
        file_offset: int,
        name: str | None = None,
        retprobe: bool = False,
        args: str = "",
    ) -> str:
        """Register ``p:GROUP/NAME PATH:0xOFF [ARGS]`` (``r:`` for a return probe).

        ``file_offset`` is an offset in the file, not an ELF vaddr.  Returns
        the event name.  The kernel decodes the instruction only when it
        first installs the probe in a process, so an instruction it cannot
        handle is not reported here.
        """
        path = os.path.realpath(path)
        if any(c.isspace() for c in path):
            raise ValueError(f"uprobe_events cannot express a path with spaces: {path!r}")
        if name is None:
            # The kernel caps event names at 64 characters.
            base = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(path))[:32]
            name = f"{'r' if retprobe else 'p'}_{base}_0x{file_offset:x}"
        if not _NAME_RE.match(name):
            raise ValueError(f"bad uprobe event name {name!r}")
        if name in self._events:
            raise ValueError(f"event {name!r} already added to group {self.group}")
        kind = "r" if retprobe else "p"
        line = f"{kind}:{self.group}/{name} {path}:0x{file_offset:x} {args}".rstrip()
        _append(self._file("uprobe_events"), line)
        if not self._events and not self._atexit:
            # A safety net for a caller that adds and then never enters or
            # leaves the with block: nothing outlives this process.
            atexit.register(self._remove_quietly)
            self._atexit = True
        self._events[name] = path
        self._final_hits = None
        if self._active:
            # Already inside the with block: enable at once.
            self._enable(name)
        return name

    def __enter__(self) -> KernelUprobes:
        self._active = True
        self._final_hits = None
        try:
            for name in self._events:
                self._enable(name)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def _enable(self, name: str) -> None:
        # Per event rather than events/GROUP/enable: a refused instruction
        # (e.g. in a process already running) then names its event.
        _write(self._file("events", self.group, name, "enable"), "1")

    def hits(self) -> dict[str, int]:
        """Hits per event name, summed over every process that mapped the file.

        After the with block, the counts as they were just before removal.
        """
        if self._final_hits is not None:
            return dict(self._final_hits)
        return self._read_hits()

    def _read_hits(self) -> dict[str, int]:
        # uprobe_profile shows "PATH EVENT HITS" without the group, so two
        # groups may show the same event name.  It lists events in the same
        # order as uprobe_events (both walk the dyn_event list), so pair the
        # two files line by line; re-read if another tool changed the list
        # between the reads.
        for _ in range(20):
            defs = [ln for ln in _read(self._file("uprobe_events")).splitlines() if ln]
            prof = [ln.split() for ln in _read(self._file("uprobe_profile")).splitlines() if ln]
            if len(defs) != len(prof):
                time.sleep(0.01)
                continue
            out: dict[str, int] = {}
            consistent = True
            for d, p in zip(defs, prof, strict=True):
                group, event = _parse_def(d)
                if len(p) < 3 or p[1] != event:
                    consistent = False
                    break
                if group == self.group and event in self._events:
                    out[event] = int(p[2])
            if consistent:
                return {n: out.get(n, 0) for n in self._events}
            time.sleep(0.01)
        raise KernelUprobeError(errno.EAGAIN, "uprobe_events kept changing while reading hits")

    def remove(self) -> None:
        """Disable and delete every event this object added; verify they are gone."""
        if not self._events:
            return
        try:
            self._final_hits = self._read_hits()
        except OSError:
            self._final_hits = None
        errors: list[str] = []
        for name in list(self._events):
            enable = self._file("events", self.group, name, "enable")
            try:
                if os.path.exists(enable):
                    _write(enable, "0")
            except OSError as exc:
                errors.append(str(exc))
        attempted = set(self._events)
        for name in attempted:
            if self._delete(name, errors):
                del self._events[name]
        self._active = False
        # Only our own names: another KernelUprobes in this process may share
        # the default group and still be active.
        left = [e for e in self.registered() if e in attempted]
        if left or errors:
            raise KernelUprobeError(
                errno.EBUSY, f"uprobes of group {self.group} not removed: {left} {errors}"
            )

    def _remove_quietly(self) -> None:
        try:
            self.remove()
        except OSError:
            pass

    def _delete(self, name: str, errors: list[str]) -> bool:
        # Deleting an event that perf or BPF still holds gives EBUSY; that
        # holder goes away on its own, so retry briefly before giving up.
        for _ in range(50):
            try:
                _append(self._file("uprobe_events"), f"-:{self.group}/{name}")
                return True
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return True
                if exc.errno != errno.EBUSY:
                    errors.append(str(exc))
                    return False
                time.sleep(0.02)
        errors.append(f"-:{self.group}/{name}: still busy")
        return False

    def registered(self) -> list[str]:
        """Event names of this group that uprobe_events still lists."""
        text = _read(self._file("uprobe_events"))
        return [e for g, e in map(_parse_def, text.splitlines()) if g == self.group]

    def _file(self, *parts: str) -> str:
        return os.path.join(self.tracefs, *parts)


def _parse_def(line: str) -> tuple[str, str]:
    """("GROUP", "EVENT") from a uprobe_events line "p:GROUP/EVENT PATH:0xOFF ..."."""
    head = line.split(" ", 1)[0]
    _, _, ident = head.partition(":")
    group, _, event = ident.partition("/")
    return group, event


class TraceInstance:
    """A private tracefs ring buffer (``instances/NAME``) that exists for the ``with`` block.

    Events enabled here are recorded only here, so reading the trace never
    sees other tools' events and nobody else's buffer is cleared.  Leaving
    disables what was enabled and removes the instance.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"emuprobe_{os.getpid()}_{id(self):x}"
        self.dir = os.path.join(tracefs_dir(), "instances", self.name)
        self._enabled: list[str] = []

    def __enter__(self) -> TraceInstance:
        os.mkdir(self.dir)
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self._enabled:
            try:
                _write(path, "0")
            except OSError:
                pass
        for _ in range(50):  # the buffer may still be busy for a moment
            try:
                os.rmdir(self.dir)
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)

    def enable(self, group: str, event: str) -> None:
        path = os.path.join(self.dir, "events", group, event, "enable")
        _write(path, "1")
        self._enabled.append(path)

    def lines(self) -> list[str]:
        """The recorded events, one trace line each (header comments dropped)."""
        with open(os.path.join(self.dir, "trace"), errors="replace") as f:
            return [ln.rstrip("\n") for ln in f if ln.strip() and not ln.startswith("#")]
