"""`emuprobe difftest --prove`: prove the engine on this CPU by replaying the
shipped corpus, and write what it proved to the user's trust table.

The corpus (`corpus.json` beside this module) names, for every class any
campaign met, a few encodings of it; the prologues of libc, python3 and ls
as installed here are added to it.  Each case is built from its encoding and
a seeded generator (strategies.replay_case), so a replay runs the same cases
on every machine, at the speed of the sandbox rather than of Hypothesis.  A
class is replayed until it has `2 * min_cases` proofs, a mismatch, or
`MAX_TRIES` cases; its result is recorded for this CPU exactly as a
campaign's (report.update_trust).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import select
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from emuprobe.difftest.compare import MISMATCH
from emuprobe.difftest.opcodes import PROLOGUES
from emuprobe.difftest.oracle import SITE
from emuprobe.difftest.prologues import default_programs, prologue_encodings
from emuprobe.difftest.runner import ClassStats, Runner, unsafe_natively
from emuprobe.difftest.strategies import replay_case
from emuprobe.disasm import decode
from emuprobe.x86 import trust
from emuprobe.x86.classkey import class_key
from emuprobe.x86.cpu import this_cpu

Corpus = dict[str, list[bytes]]  # class -> encodings
Item = tuple[str, list[bytes]]  # one class to prove, and its encodings
Progress = Callable[[int, int], None]  # (cases done, of them mismatches)
CODES_PER_CLASS = 4
CHUNK = 24  # classes per worker process
MAX_TRIES_FACTOR = 8  # cases per class at most: this times min_cases (aligned-only
# SSE forms fault on most generated addresses)


def corpus_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("corpus.json")))


def load_corpus(path: Path | None = None) -> Corpus:
    try:
        raw = json.loads((path or corpus_path()).read_text())
    except FileNotFoundError:
        return {}
    return {k: [bytes.fromhex(h) for h in v] for k, v in raw.items()}


def dump_corpus(corpus: Corpus) -> str:
    rows = [f"  {json.dumps(k)}: {json.dumps([c.hex() for c in corpus[k]])}"
            for k in sorted(corpus)]  # fmt: skip
    return "{\n" + ",\n".join(rows) + "\n}\n"


def add_encodings(corpus: Corpus, codes: list[bytes]) -> Corpus:
    """`corpus` plus each of `codes` under its class (at most CODES_PER_CLASS
    per class; encodings the sandbox must not run are left out)."""
    out = {k: list(v) for k, v in corpus.items()}
    for code in codes:
        insn = decode(code, SITE)
        if insn is None or unsafe_natively(insn):
            continue
        have = out.setdefault(class_key(insn), [])
        raw = bytes(insn.bytes)
        if raw not in have and len(have) < CODES_PER_CLASS:
            have.append(raw)
    return out


def corpus_from_campaign(corpus: Corpus, stats: dict[str, ClassStats], min_cases: int) -> Corpus:
    """`corpus` plus the encodings a campaign met, for every class it proved
    or disproved (a rare prefix combination met a few times is left out: no
    replay proves it in a few hundred cases either)."""
    codes = [c for s in stats.values() if s.proven >= min_cases or s.mismatches for c in s.codes]
    return add_encodings(corpus, codes)


@dataclass
class Selection:
    todo: list[Item]  # class and encodings, in order
    known: int  # corpus classes already proven (or disproved) on this very CPU


def select_classes(corpus: Corpus, table: trust.TrustTable) -> Selection:
    """The corpus classes without a recorded result for this CPU model."""
    me = this_cpu().key
    todo, known = [], 0
    for key in sorted(corpus):
        proof = table.proofs.get(key, {}).get(me)
        if (proof is not None and proof.masked is not None) or me in table.disproved.get(key, {}):
            known += 1
        else:
            todo.append((key, corpus[key]))
    return Selection(todo, known)


def _prove_chunk(items: list[Item], min_cases: int, progress_fd: int,
                 current_fd: int) -> dict[str, ClassStats]:  # fmt: skip
    """Runs in a worker: every class of `items` on a sandbox of its own."""
    want, limit = 2 * min_cases, MAX_TRIES_FACTOR * min_cases
    with Runner(explore=False) as runner:
        for key, codes in items:
            os.pwrite(current_fd, key.encode().ljust(256), 0)
            decoded = [(c, insn) for c in codes if (insn := decode(c, SITE)) is not None]
            for i in range(limit if decoded else 0):
                code, insn = decoded[i % len(decoded)]
                r = runner.check(replay_case(code, insn, random.Random(f"{code.hex()}/{i}")))
                os.write(progress_fd, b"x" if r.kind == MISMATCH else b".")
                s = runner.stats[r.key]
                if s.policy or s.mismatches or s.proven >= want:
                    break
    return runner.stats


def _fork_worker(chunk: list[Item], min_cases: int, progress_fd: int) -> tuple[int, Worker]:
    worker = Worker(chunk, tempfile.TemporaryFile(), tempfile.TemporaryFile())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker
        code = 1
        try:
            stats = _prove_chunk(chunk, min_cases, progress_fd, worker.current.fileno())
            worker.out.write(pickle.dumps(stats))
            worker.out.flush()
            code = 0
        except BaseException:  # noqa: BLE001 - the parent sees no scores and runs the rest again
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid, worker


@dataclass
class Worker:
    chunk: list[Item]
    out: IO[bytes]  # the pickled scores, once done
    current: IO[bytes]  # the class being run, for when the worker dies

    def result(self, status: int) -> tuple[dict[str, ClassStats], str]:
        """The scores, or ({}, the class it died on)."""
        self.out.seek(0)
        data = self.out.read()
        died = os.pread(self.current.fileno(), 256, 0).decode(errors="replace").strip()
        self.out.close()
        self.current.close()
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and data:
            return pickle.loads(data), ""
        return {}, died or "?"


def _workers(chunks: list[list[Item]], jobs: int, min_cases: int,
             progress: Progress) -> Iterator[tuple[dict[str, ClassStats], str]]:  # fmt: skip
    """Run the chunks `jobs` at a time in forked workers; yield each chunk's
    scores and, if its worker died, the class it died on (its other classes
    are run again)."""
    queue = list(reversed(chunks))
    prog_rd, prog_wr = os.pipe()
    running: dict[int, Worker] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                pid, worker = _fork_worker(queue.pop(), min_cases, prog_wr)
                running[pid] = worker
            if select.select([prog_rd], [], [], 0.2)[0]:
                ticks = os.read(prog_rd, 65536)
                progress(len(ticks), ticks.count(b"x"))
            while running:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                worker = running.pop(pid)
                stats, died = worker.result(status)
                yield stats, died
                if died:
                    queue.append([item for item in worker.chunk if item[0] != died])
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(prog_rd)
        os.close(prog_wr)


@dataclass
class Outcome:
    stats: dict[str, ClassStats]
    crashed: list[str]  # classes whose worker died (not proven)
    cases: int


def prove(todo: list[Item], min_cases: int, jobs: int,
          progress: Progress) -> Outcome:  # fmt: skip
    chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
    stats: dict[str, ClassStats] = {}
    crashed: list[str] = []
    cases = 0
    for got, died in _workers(chunks, max(1, jobs), min_cases, progress):
        if died:
            crashed.append(died)
        for key, s in got.items():
            stats[key] = s
            cases += s.cases
    return Outcome(stats, crashed, cases)


def prologue_corpus(
    corpus: Corpus, programs: list[str] | None = None
) -> tuple[Corpus, list[bytes]]:
    """`corpus` plus the prologues of `programs` (default: libc, python3, ls),
    and those prologue instructions (one per function that starts with it)."""
    codes = prologue_encodings(programs if programs is not None else default_programs())
    written = [bytes.fromhex(h) for h in PROLOGUES]  # as other compilers emit them too
    return add_encodings(corpus, codes + written), codes
