"""Kernel tracepoints for the traced processes, merged in time order with the probe events.

Each tracepoint is opened with perf_event_open for the traced process on
every CPU, with `inherit` (its threads and children are counted as they
appear; perf refuses an mmap of an inherited per-task event on "any CPU"),
timestamps on CLOCK_MONOTONIC (`use_clockid`, the clock of probe events), and
read from its mmap ring buffer.  A reader thread drains the buffers so they
do not overflow while the event loop waits in waitpid; records are released
to the sinks in time order once they are older than LAG, the longest a
record can take to be written on another CPU.
"""

from __future__ import annotations

import ctypes
import heapq
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from emuprobe.engine.tracee import Process
from emuprobe.errors import ProbeError
from emuprobe.perfbridge.record import Record
from emuprobe.sys.tasks import list_threads, read_comm

_NR_PERF_EVENT_OPEN = 298  # x86-64
_PERF_TYPE_TRACEPOINT = 2
_SAMPLE_TID, _SAMPLE_TIME, _SAMPLE_CPU, _SAMPLE_RAW = 1 << 1, 1 << 2, 1 << 7, 1 << 10
_FLAG_INHERIT, _FLAG_WATERMARK, _FLAG_USE_CLOCKID = 1 << 1, 1 << 14, 1 << 25
_RECORD_LOST, _RECORD_SAMPLE = 2, 9
_PAGES = 64  # data pages per buffer (a power of two)
LAG_NS = 20_000_000

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@dataclass(frozen=True)
class _Field:
    name: str
    offset: int
    size: int
    signed: bool
    kind: str  # "int", "str" (char array) or "loc" (__data_loc string)


@dataclass(frozen=True)
class Tracepoint:
    name: str  # "syscalls:sys_enter_write"
    id: int
    fields: tuple[_Field, ...]


def _events_dir() -> str:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(d, "events")):
            return d
    from emuprobe.perfbridge.kernel import KernelUprobesUnavailable, tracefs_dir

    try:
        return tracefs_dir()  # mounts tracefs when it is empty (root only)
    except KernelUprobesUnavailable as e:
        raise ProbeError(f"kernel events: tracefs is not available ({e})") from None


def load_tracepoint(name: str) -> Tracepoint:
    system, sep, event = name.partition(":")
    if not sep or not system or not event or "/" in name:
        raise ProbeError(f"-k {name}: a tracepoint is SYSTEM:EVENT, e.g. syscalls:sys_enter_write")
    base = os.path.join(_events_dir(), "events", system, event)
    try:
        with open(os.path.join(base, "id")) as f:
            tp_id = int(f.read())
        with open(os.path.join(base, "format")) as f:
            fmt = f.read()
    except FileNotFoundError:
        raise ProbeError(f"-k {name}: no such tracepoint (see tracefs available_events)") from None
    except PermissionError:
        raise ProbeError(f"-k {name}: tracefs is not readable (need root)") from None
    return Tracepoint(name, tp_id, tuple(_parse_format(fmt)))


def _parse_format(fmt: str) -> list[_Field]:
    fields = []
    for line in fmt.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.rstrip(";").split(";") if ":" in p)
        decl = parts["field"].strip()
        name = decl.split()[-1].split("[")[0]
        if name.startswith("common_"):
            continue
        kind = "loc" if decl.startswith("__data_loc") else "str" if "char" in decl and "[" in decl \
            else "int"
        fields.append(_Field(name, int(parts["offset"]), int(parts["size"]),
                             parts.get("signed", "0").strip() == "1", kind))
    return fields


def decode(tp: Tracepoint, raw: bytes) -> tuple[tuple[tuple[str, int | str], ...], str]:
    """A raw tracepoint record's fields, as values and as `name=value` text."""
    values: list[tuple[str, int | str]] = []
    texts = []
    for f in tp.fields:
        chunk = raw[f.offset : f.offset + f.size]
        if f.kind == "int" and f.size in (1, 2, 4, 8):
            v = int.from_bytes(chunk, "little", signed=f.signed)
            values.append((f.name, v))
            texts.append(f"{f.name}={v}" if f.signed else f"{f.name}={v:#x}")
            continue
        if f.kind == "loc":
            loc = int.from_bytes(chunk, "little")
            chunk = raw[loc & 0xFFFF : (loc & 0xFFFF) + (loc >> 16)]
        s = chunk.split(b"\0", 1)[0].decode("utf-8", "replace")
        values.append((f.name, s))
        texts.append(f'{f.name}="{s}"')
    return tuple(values), " ".join(texts)


def _perf_event_open(tp: Tracepoint, pid: int, cpu: int) -> int:
    size = 112  # PERF_ATTR_SIZE_VER5
    attr = bytearray(size)
    flags = _FLAG_INHERIT | _FLAG_WATERMARK | _FLAG_USE_CLOCKID
    sample_type = _SAMPLE_TID | _SAMPLE_TIME | _SAMPLE_CPU | _SAMPLE_RAW
    struct.pack_into("<IIQQQQQI", attr, 0, _PERF_TYPE_TRACEPOINT, size, tp.id, 1, sample_type,
                     0, flags, _PAGES * mmap.PAGESIZE // 4)
    struct.pack_into("<i", attr, 92, time.CLOCK_MONOTONIC)  # clockid
    buf = ctypes.create_string_buffer(bytes(attr), size)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, buf, pid, cpu, -1, 0x8)  # PERF_FLAG_FD_CLOEXEC
    if fd < 0:
        err = ctypes.get_errno()
        if err in (1, 13):  # EPERM, EACCES
            raise ProbeError(f"-k {tp.name}: {_permission_hint()}")
        if err == 3:  # ESRCH: the thread is gone already
            return -1
        raise ProbeError(f"-k {tp.name}: perf_event_open: {os.strerror(err)}")
    return int(fd)


def _permission_hint() -> str:
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            level = f.read().strip()
    except OSError:
        level = "?"
    return (f"kernel events need root or kernel.perf_event_paranoid <= 1 (it is {level}); "
            "try: sudo sysctl kernel.perf_event_paranoid=1")


def check_permission() -> None:
    """Fail before the tracee starts, with the reason, when perf will refuse."""
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            if int(f.read()) > 1:
                raise ProbeError(_permission_hint())
    except (OSError, ValueError):
        pass


def online_cpus() -> list[int]:
    """/sys/devices/system/cpu/online ("0-3,6") as a list."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


class _Buffer:
    def __init__(self, fd: int, tp: Tracepoint) -> None:
        self.fd, self.tp = fd, tp
        self.map = mmap.mmap(fd, (1 + _PAGES) * mmap.PAGESIZE)
        self.size = _PAGES * mmap.PAGESIZE

    def drain(self) -> list[tuple[int, bytes]]:
        """(record type, record bytes without header) for each new record."""
        m, page = self.map, mmap.PAGESIZE
        head = struct.unpack_from("<Q", m, 1024)[0]
        tail = struct.unpack_from("<Q", m, 1032)[0]
        out = []
        while tail < head:
            hdr = self._read(page, tail, 8)
            rtype, _misc, rsize = struct.unpack("<IHH", hdr)
            out.append((rtype, self._read(page, tail + 8, rsize - 8)))
            tail += rsize
        struct.pack_into("<Q", m, 1032, tail)
        return out

    def _read(self, page: int, pos: int, n: int) -> bytes:
        start = pos % self.size
        first = self.map[page + start : page + min(start + n, self.size)]
        return first + self.map[page : page + n - len(first)]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class KernelEvents:
    """The tracepoints of one run: opened per traced process, drained by a thread."""

    def __init__(self, names: list[str], push: Callable[[list[Record]], None]) -> None:
        check_permission()
        self.tracepoints = [load_tracepoint(n) for n in names]
        self._push = push
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._comms: dict[int, str] = {}
        self.lost = 0
        self._thread = threading.Thread(target=self._reader, name="emuprobe-kevents", daemon=True)
        self._started = False

    def open_for(self, proc: Process) -> None:
        """Session.when_started hook: follow `proc` (and, by inheritance, what it creates)."""
        tids = list_threads(proc.pid) or [proc.pid]
        with self._lock:
            for tp in self.tracepoints:
                for tid in tids:
                    for cpu in online_cpus():
                        fd = _perf_event_open(tp, tid, cpu)
                        if fd >= 0:
                            self._buffers.append(_Buffer(fd, tp))
        if not self._started:
            self._started = True
            self._thread.start()

    def _reader(self) -> None:
        while not self._stop.is_set():
            poller = select.poll()
            with self._lock:
                for b in self._buffers:
                    poller.register(b.fd, select.POLLIN)
            poller.poll(100)
            self.drain()

    def drain(self) -> None:
        with self._lock:
            records = [r for b in self._buffers for r in self._records(b)]
        if records:
            self._push(records)

    def _records(self, b: _Buffer) -> list[Record]:
        out = []
        for rtype, body in b.drain():
            if rtype == _RECORD_LOST:
                self.lost += struct.unpack_from("<QQ", body)[1]
                continue
            if rtype != _RECORD_SAMPLE:
                continue
            pid, tid, ts, cpu, _res, size = struct.unpack_from("<IIQIII", body)
            values, text = decode(b.tp, body[28 : 28 + size])
            out.append(Record(ts, pid, tid, self._comm(pid, tid), "kernel", b.tp.name, values,
                              text, cpu=cpu))
        return out

    def _comm(self, pid: int, tid: int) -> str:
        comm = self._comms.get(tid)
        if comm is None:
            comm = self._comms[tid] = read_comm(pid, tid)
        return comm

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join()
        self.drain()
        with self._lock:
            for b in self._buffers:
                b.close()
            self._buffers.clear()


class Merger:
    """Releases probe and kernel records to `sink` in timestamp order."""

    def __init__(self, sink: Callable[[Record], None]) -> None:
        self.sink = sink
        self._heap: list[tuple[int, int, Record]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self.kernel: KernelEvents | None = None

    def push(self, rec: Record) -> None:
        """A probe record (event-loop thread): kernel records written before it go first."""
        if self.kernel is not None:
            self.kernel.drain()
        self._add([rec])

    def push_kernel(self, records: list[Record]) -> None:
        self._add(records)

    def _add(self, records: list[Record]) -> None:
        with self._lock:
            for r in records:
                self._seq += 1
                heapq.heappush(self._heap, (r.ts, self._seq, r))
            self._release(time.clock_gettime_ns(time.CLOCK_MONOTONIC) - LAG_NS)

    def _release(self, upto: int) -> None:
        while self._heap and self._heap[0][0] <= upto:
            self.sink(heapq.heappop(self._heap)[2])

    def flush_all(self) -> None:
        with self._lock:
            self._release(1 << 63)
