"""Kernel events merged with probe events, and the exports parsed back:
Chrome trace JSON against the trace-event format, folded stacks and perf-script
text with the regular expressions FlameGraph's stackcollapse-perf.pl uses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

import fixturebuild as fb
from conftest import EMUPROBE, run_traced

ROOT_OK = os.geteuid() == 0


def events_of(t) -> list[dict]:
    assert t.status == 0, t.stderr
    return [json.loads(line) for line in t.events]


@pytest.mark.skipif(not ROOT_OK, reason="kernel events need root here")
def test_syscall_is_inside_its_functions_span(tmp_path):
    exe = fb.build("pb_ret", "O2-pie")
    n = 25
    t = run_traced(tmp_path, ["pb_emit i=%di:s64", "pb_emit%return rv=$retval:s64"],
                   [str(exe), "write", str(n)], "-k", "syscalls:sys_enter_write",
                   "--format", "jsonl")
    events = events_of(t)
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)  # one merged stream
    kinds = [(e["kind"], e["name"]) for e in events]
    # Each call: entry, the write(2) it makes, then its return, in that order.
    assert kinds == [("probe", "pb_emit"), ("kernel", "syscalls:sys_enter_write"),
                     ("return", "pb_emit__return")] * n
    for i in range(n):
        entry, write, ret = events[3 * i : 3 * i + 3]
        assert entry["args"]["i"] == i
        assert write["args"]["fd"] == 1 and write["args"]["count"] == len(f"emit {i}\n")
        assert ret["args"]["rv"] == len(f"emit {i}\n")
        assert entry["tid"] == write["tid"] == ret["tid"]
        assert entry["ts"] < write["ts"] < ret["ts"]


def check_chrome_trace(doc: dict) -> None:
    """The Trace Event Format's rules that viewers rely on."""
    assert set(doc) >= {"traceEvents"}
    open_spans: dict[tuple[int, int], list[tuple[float, float]]] = {}
    last_ts: dict[tuple[int, int], float] = {}
    for ev in doc["traceEvents"]:
        assert ev["ph"] in ("X", "i", "M", "B", "E"), ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert isinstance(ev["name"], str)
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name") and ev["args"]["name"]
            continue
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] > 0
        key = (ev["pid"], ev["tid"])
        assert ev["ts"] >= last_ts.get(key, 0)  # sorted per thread
        last_ts[key] = ev["ts"]
        if ev["ph"] == "i":
            assert ev["s"] in ("t", "p", "g")
            continue
        assert ev["dur"] >= 0
        start, end = ev["ts"], ev["ts"] + ev["dur"]
        stack = open_spans.setdefault(key, [])
        while stack and stack[-1][1] <= start:
            stack.pop()
        if stack:  # X events on one thread nest: inside the enclosing one
            assert stack[-1][0] <= start and end <= stack[-1][1] + 1e-3, (stack[-1], ev)
        stack.append((start, end))


@pytest.mark.skipif(not ROOT_OK, reason="kernel events need root here")
def test_chrome_trace(tmp_path):
    exe = fb.build("pb_ret", "O0-pie")
    t = run_traced(tmp_path, ["pb_fib%return rv=$retval:s64", "pb_fib n=%di:s64"],
                   [str(exe), "fib", "7"], "-k", "syscalls:sys_enter_write",
                   "--format", "chrome")
    assert t.status == 0, t.stderr
    doc = json.loads("\n".join(t.events))
    check_chrome_trace(doc)
    evs = doc["traceEvents"]
    spans = [e for e in evs if e["ph"] == "X"]
    assert len(spans) == 41 and all(e["name"] == "pb_fib" for e in spans)
    assert sum(e["ph"] == "i" and e["cat"] == "probe" for e in evs) == 41
    assert any(e["ph"] == "i" and e["cat"] == "kernel" for e in evs)  # printf's write
    names = {e["args"]["name"] for e in evs if e["ph"] == "M"}
    assert "pb_ret" in names
    # The outermost span is pb_fib(7): it encloses every other one.
    top = max(spans, key=lambda e: e["dur"])
    assert top["args"]["rv"] == 13


def test_chrome_threads_nest_per_thread(tmp_path):
    exe = fb.build("pb_ret", "O2-pie")
    t = run_traced(tmp_path, ["pb_work%return"], [str(exe), "threads", "30"],
                   "--format", "chrome")
    assert t.status == 0, t.stderr
    doc = json.loads("\n".join(t.events))
    check_chrome_trace(doc)
    per_thread = Counter(e["tid"] for e in doc["traceEvents"] if e["ph"] == "X")
    assert sorted(per_thread.values()) == [30] * 8
    threads = [e for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(threads) == 8


# stackcollapse-perf.pl's patterns: a sample header (either form), then frames,
# then a blank line.  A header is tried first, so it must not be indented.
HEADERS = [re.compile(r"^(\S+\s*?\S*?)\s+(\d+)\s"), re.compile(r"^(\S+\s*?\S*?)\s+(\d+)/(\d+)")]
FRAME = re.compile(r"^\s*(\w+)\s*(.+) \((\S*)\)")


def collapse_perf_script(text: str) -> Counter[str]:
    """A port of the parts of stackcollapse-perf.pl that this output exercises."""
    folded: Counter[str] = Counter()
    comm, stack = None, []
    for line in text.splitlines():
        if not line.strip():
            if comm is not None:
                folded[";".join([comm, *reversed(stack)])] += 1
            comm, stack = None, []
            continue
        m = HEADERS[0].match(line) or HEADERS[1].match(line)
        if comm is None:
            assert m, line
            comm = m.group(1)
            continue
        assert m is None, f"a frame line read as a header: {line}"
        m = FRAME.match(line)
        assert m, line
        func, mod = m.group(2).split("+0x")[0], m.group(3)
        if func == "[unknown]" and mod != "[unknown]":
            func = f"[{os.path.basename(mod)}]"
        stack.append(func)
    return folded


def test_perf_script_and_folded_agree(tmp_path):
    exe = fb.build("pb_ret", "O0-pie")
    argv = [str(exe), "fib", "6"]
    (tmp_path / "p").mkdir()
    (tmp_path / "f").mkdir()
    perf = run_traced(tmp_path / "p", ["pb_fib"], argv, "--format", "perf-script")
    folded = run_traced(tmp_path / "f", ["pb_fib"], argv, "--format", "folded")
    assert perf.status == 0 and folded.status == 0, perf.stderr + folded.stderr
    text = "\n".join(perf.events) + "\n"
    ours = collapse_perf_script(text)
    back = Counter({ln.rsplit(" ", 1)[0]: int(ln.rsplit(" ", 1)[1]) for ln in folded.events})
    assert ours == back
    assert sum(back.values()) == 25  # pb_fib(6) and its recursive calls
    # Depth k of the recursion shows k pb_fib frames above main.
    depths = Counter(stack.split(";").count("pb_fib") for stack in back.elements())
    assert depths[1] == 1 and max(depths) == 6
    assert all(s.startswith("pb_ret;") and ";main;pb_fib" in s for s in back)
    stackcollapse = shutil.which("stackcollapse-perf.pl")
    if stackcollapse:  # the real script, when installed
        done = subprocess.run([stackcollapse], input=text, capture_output=True, text=True)
        real = Counter({ln.rsplit(" ", 1)[0]: int(ln.rsplit(" ", 1)[1])
                        for ln in done.stdout.splitlines()})
        assert real == ours


def test_stack_unwinds_without_frame_pointers_and_without_cfi(tmp_path):
    """CFI at -O2 -fomit-frame-pointer; the rbp chain where a file has no CFI."""
    expected_depth = {"fib": 4}
    for name, flags in (("cfi", ["-O2", "-fomit-frame-pointer"]),
                        ("fp", ["-O0", "-fno-omit-frame-pointer",
                                "-fno-asynchronous-unwind-tables", "-fno-unwind-tables"])):
        exe = tmp_path / f"pb_{name}"
        (tmp_path / name).mkdir()
        subprocess.run(["gcc", *flags, "-pthread", "-o", str(exe),
                        str(fb.FIXTURES / "pb_ret.c")], check=True)
        t = run_traced(tmp_path / name, ["pb_fib+4"] if name == "fp" else ["pb_fib"],
                       [str(exe), "fib", "3"], "--format", "folded")
        assert t.status == 0, t.stderr
        stacks = Counter({ln.rsplit(" ", 1)[0]: int(ln.rsplit(" ", 1)[1]) for ln in t.events})
        deepest = max(stacks, key=lambda s: s.count("pb_fib"))
        assert deepest.split(";main;")[1] == ";".join(["pb_fib"] * (expected_depth["fib"] - 1)), (
            name, stacks)


def test_kernel_events_need_permission_message(tmp_path):
    """As an unprivileged user with perf_event_paranoid > 1, -k fails before starting."""
    with open("/proc/sys/kernel/perf_event_paranoid") as f:
        if int(f.read()) <= 1:
            pytest.skip("perf_event_paranoid <= 1: unprivileged users may trace")
    setpriv = shutil.which("setpriv")
    if not ROOT_OK or setpriv is None:
        pytest.skip("needs root and setpriv to drop privileges")
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *EMUPROBE, "trace",
           "-k", "syscalls:sys_enter_write", "main", "--", "/bin/true"]
    env = dict(os.environ, PYTHONPATH=str(fb.FIXTURES.parent.parent))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert done.returncode == 2, done.stderr
    assert "perf_event_paranoid <= 1" in done.stderr and "\n" == done.stderr[-1]
    assert done.stderr.count("\n") == 1
