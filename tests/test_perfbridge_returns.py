"""Return probes on real processes: values and counts equal what the fixture computes,
for recursion, a tail call, longjmp and 8 threads; the stack is never written."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import fixturebuild as fb
from conftest import run_traced
from emuprobe.api import Tracer
from emuprobe.engine.hotloop import HotLoop
from emuprobe.perfbridge.bridge import Bridge

VARIANTS = ["O0-pie", "O2-pie"]


def trace_jsonl(tmp_path, probes, argv, *opts):
    t = run_traced(tmp_path, probes, argv, "--format", "jsonl", *opts)
    assert t.status == 0, t.stderr
    return t, [json.loads(line) for line in t.events]


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def fib_returns(n: int) -> Counter[int]:
    """The multiset of values pb_fib(n) and all its recursive calls return."""
    got: Counter[int] = Counter()

    def walk(k: int) -> None:
        got[fib(k)] += 1
        if k >= 2:
            walk(k - 1)
            walk(k - 2)

    walk(n)
    return got


@pytest.mark.parametrize("variant", VARIANTS)
def test_recursion(tmp_path, variant):
    exe = fb.build("pb_ret", variant)
    n = 12
    t, events = trace_jsonl(tmp_path, ["pb_fib n=%di:s64", "pb_fib%return rv=$retval:s64"],
                            [str(exe), "fib", str(n)])
    calls = sum(fib_returns(n).values())
    assert t.stdout == f"fib {n}={fib(n)} calls={calls}\n"
    entries = [e for e in events if e["kind"] == "probe"]
    returns = [e for e in events if e["kind"] == "return"]
    assert len(entries) == len(returns) == calls
    assert Counter(e["args"]["rv"] for e in returns) == fib_returns(n)
    # Each return pairs with the latest unmatched entry: replaying the stream
    # as a stack gives every return the value fib(n) of its own entry.
    stack = []
    for e in events:
        if e["kind"] == "probe":
            stack.append(e)
        else:
            entry = stack.pop()
            assert e["args"]["rv"] == fib(entry["args"]["n"])
            assert e["ts"] - e["latency_ns"] == entry["ts"]
            assert e["func"] == entry["address"]
    assert not stack


@pytest.mark.parametrize("variant", VARIANTS)
def test_tail_call(tmp_path, variant):
    exe = fb.build("pb_ret", variant)
    n = 20
    _, events = trace_jsonl(
        tmp_path, ["pb_tail_outer%return o=$retval:s64", "pb_tail_inner%return i=$retval:s64"],
        [str(exe), "tail", str(n)])
    returns = [e for e in events if e["kind"] == "return"]
    # pb_tail_outer jumps to pb_tail_inner: both return at once, to main,
    # the callee first, and both see the callee's return value.
    assert len(returns) == 2 * n
    for i in range(n):
        inner, outer = returns[2 * i], returns[2 * i + 1]
        assert (inner["name"], outer["name"]) == ("pb_tail_inner__return", "pb_tail_outer__return")
        assert inner["args"]["i"] == outer["args"]["o"] == 3 * (i + 1) + 1
        assert inner["address"] == outer["address"]  # the same return site, in main


@pytest.mark.parametrize("variant", VARIANTS)
def test_longjmp(tmp_path, variant):
    exe = fb.build("pb_ret", variant)
    n = 40
    t, events = trace_jsonl(tmp_path, ["pb_jump%return rv=$retval:s64"],
                            [str(exe), "jump", str(n)])
    assert t.stdout == f"jump jumped={n // 2} returned={(n // 2) * 103}\n"
    returns = [e["args"]["rv"] for e in events if e["kind"] == "return"]
    # Odd i: longjmp from depth 0, so none of its 4 frames returns; even i:
    # depths 0..3 return 100..103.  Stale entries must not pair with the
    # next iteration's frames at the same stack addresses.
    assert Counter(returns) == Counter({100: n // 2, 101: n // 2, 102: n // 2, 103: n // 2})


@pytest.mark.parametrize("variant", VARIANTS)
def test_eight_threads(tmp_path, variant):
    exe = fb.build("pb_ret", variant)
    n = 150
    t, events = trace_jsonl(tmp_path, ["pb_work t=%di:s64 i=%si:s64",
                                       "pb_work%return rv=$retval:s64"],
                            [str(exe), "threads", str(n)])
    total = sum(w * 1000 + i for w in range(8) for i in range(n))
    assert t.stdout == f"threads=8 calls={8 * n} total={total}\n"
    entries = [e for e in events if e["kind"] == "probe"]
    returns = [e for e in events if e["kind"] == "return"]
    assert len(entries) == len(returns) == 8 * n
    assert sorted(e["args"]["rv"] for e in returns) == sorted(
        w * 1000 + i for w in range(8) for i in range(n))
    # A thread's returns carry its own worker number.
    worker_of = {e["tid"]: e["args"]["t"] for e in entries}
    assert len(set(worker_of)) == 8
    for e in returns:
        assert e["args"]["rv"] // 1000 == worker_of[e["tid"]]


def test_latency_histogram(tmp_path):
    """--hist latency bins one latency per return; the table goes to -o FILE."""
    exe = fb.build("pb_ret", "O0-pie")
    t = run_traced(tmp_path, ["pb_fib%return"], [str(exe), "fib", "15"], "--hist", "latency")
    assert t.status == 0, t.stderr
    assert t.events[0] == "@latency_ns[pb_fib__return]:"
    rows = [ln for ln in t.events[1:] if ln.startswith(("[", "("))]
    assert all(ln.endswith("|") and len(ln) == 16 + 8 + 2 + 52 + 1 for ln in rows)
    assert sum(int(r.split("|")[0].split()[-1]) for r in rows) == sum(fib_returns(15).values())


def test_count_of_a_return_probe_is_its_returns(tmp_path):
    """`--count f%return` counts returns, as perf and bpftrace count uretprobe
    hits: with longjmp out of half the calls, fewer than the entries."""
    exe = fb.build("pb_ret", "O0-pie")
    n = 40
    t = run_traced(tmp_path, ["pb_jump%return", "pb_jump"], [str(exe), "jump", str(n)],
                   "--count")  # fmt: skip
    assert t.status == 0, t.stderr
    probes = t.stats["probes"]
    assert probes["pb_jump"]["hits"] == 4 * n  # depth 3 down to 0, every call
    assert probes["pb_jump__return"]["hits"] == 4 * (n // 2)  # the even calls return
    assert probes["pb_jump__return"]["entries"] == 4 * n
    # with -o, the table goes to the file
    assert any(line.startswith(f"pb_jump__return: {4 * (n // 2)} returns of {4 * n} entries")
               for line in t.events)


@pytest.mark.skipif(HotLoop.load() is None, reason="the compiled hot loop is not built")
def test_return_site_that_the_compiled_loop_already_counts(capfd):
    """pb_after_call is hit first by a jump (i == 0), before pb_leaf's first
    return needs an int3 there, so a counting probe on it is handed to the
    compiled loop; the return probe that then shares its int3 must take the
    site back to Python, or the loop counts its returns and reports none."""
    exe = fb.build("pb_ret", "O2-pie")
    n = 300
    records = []
    t = Tracer.spawn([str(exe), "skip", str(n)])
    user = t.probe("pb_after_call")  # counting only: C may take it
    Bridge(t, records.append).add("pb_leaf%return rv=$retval:s64")
    assert t.run() == 0
    assert capfd.readouterr().out == f"skip calls={n} total={sum(range(1, n + 1)) - 1}\n"
    returns = [r for r in records if r.kind == "return"]
    assert user.hits == n
    assert [dict(r.args)["rv"] for r in returns] == list(range(2, n + 1))
