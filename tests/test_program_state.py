"""What the program does to its own execution stays its own: its
single-step traps (EFLAGS.TF) arrive as they do untraced."""

from __future__ import annotations

import pytest

from conftest import run_traced
from fixturebuild import build, parse_counts, run


@pytest.mark.parametrize("hot", ["1", "0"], ids=["compiled-loop", "python"])
@pytest.mark.parametrize("strategy", ["emulate", "stopworld"])
def test_programs_own_single_step_traps_are_delivered(tmp_path, monkeypatch, strategy, hot):
    monkeypatch.setenv("EMUPROBE_HOTLOOP", hot)
    exe = build("tftrap", "O2-pie")
    plain = run(exe, "50")
    assert "traps=" in plain.stdout and "trace=" in plain.stdout
    t = run_traced(tmp_path, ["tf_emul", "tf_native"], [str(exe), "50"], "--strategy", strategy)
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout  # same count, si_code and si_addr of every trap
    calls = parse_counts(plain.stdout)
    stats = t.stats["probes"]
    assert {p: s["hits"] for p, s in stats.items()} == calls
    if strategy == "emulate":
        assert stats["tf_emul"]["emulated"] == calls["tf_emul"]  # the emulated path delivers too


@pytest.mark.parametrize("hot", ["1", "0"], ids=["compiled-loop", "python"])
@pytest.mark.parametrize("mode", ["rwx", "rx"])
def test_rewritten_instruction_is_emulated_as_it_is_now(tmp_path, monkeypatch, hot, mode):
    """The program rewrites the probed instruction's immediate before every
    call, leaving the page writable or making it read-execute again."""
    monkeypatch.setenv("EMUPROBE_HOTLOOP", hot)
    exe = build("selfmod", "O2-pie")
    args = [str(exe), "1000"] + (["rx"] if mode == "rx" else [])
    plain = run(*args)
    t = run_traced(tmp_path, ["sm_func"], args)
    assert t.status == 0, t.stderr
    assert t.stdout == plain.stdout
    assert t.stats["probes"]["sm_func"]["hits"] == 1000
    assert t.stderr.count("changed the instruction") == 1  # said once
