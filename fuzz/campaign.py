"""Long campaigns: `emuprobe difftest` on every core with its own seed, merged.

    python fuzz/campaign.py --examples 100000 --seed 2 [--jobs N] [--lockstep]
                            [--update-trust]

Each job is `emuprobe difftest --examples N --seed SEED+i --json ...`; the
merged figures are what README.md's "Differential testing" section quotes:
cases, distinct mnemonics, and the mismatches in classes trusted on this CPU,
which must be 0.  With --update-trust the jobs' proofs for this CPU and the
encodings they met go into the packaged trust table and corpus.  With
--lockstep it then runs the six lockstep commands of the README.  Exit
status 1 if any class trusted here mismatched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from emuprobe.difftest import prove
from emuprobe.x86 import trust

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
REPO = Path(__file__).resolve().parent.parent


def lockstep_commands(work: Path) -> list[tuple[list[str], int]]:
    """The six programs of README.md's lockstep table, each with the K of
    --every K (every K-th instruction compared) that keeps the run under an
    hour on these 2-core machines (lockstep pins itself to one CPU: about
    20,000 instructions stepped a second here).  Inputs are written to `work` first."""
    blob = work / "lockstep-64k.bin"  # compressible, like real data: the start of ls
    blob.write_bytes((Path("/bin/ls").read_bytes() * 2)[:65536])
    text = work / "lockstep-small.txt"
    text.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
    sql = ("create table t(a integer, b text); insert into t values (1,'x'),(2,'y'),(3,'z');"
           " select sum(a), group_concat(b) from t; select count(*) from t where a > 1;")
    return [
        (["/bin/ls", "-la", "/usr/bin"], 2),
        # /usr/bin/python3 rather than a PATH lookup, which may find a pyenv
        # shim (a bash script that execs pyenv, that execs Python)
        ([PYTHON, "-c", "import json,zlib; "
          "print(len(zlib.compress(json.dumps(list(range(1000))).encode())))"], 10),
        (["sh", "-c", f"exec gzip -c {blob} > /dev/null"], 2),
        (["sqlite3", ":memory:", sql], 1),
        (["git", "-C", str(REPO), "--no-pager", "log", "-5", "--oneline"], 2),
        (["sh", "-c", f"exec xz -c {text} > /dev/null"], 5),
    ]  # fmt: skip


def run_jobs(examples: int, seed: int, jobs: int, out_dir: Path, update: bool) -> list[dict]:
    """Start one `emuprobe difftest` per job and wait for all; their JSON.
    With `update`, each job proves into its own copy of the packaged trust
    table and corpus (merged by `merge_trust` afterwards)."""
    procs = []
    for i in range(jobs):
        out = out_dir / f"seed{seed + i}.json"
        cmd = [sys.executable, "-m", "emuprobe", "difftest", "--examples", str(examples),
               "--seed", str(seed + i), "--json", str(out)]  # fmt: skip
        if update:
            table = out_dir / f"seed{seed + i}.trust.json"
            corpus = out_dir / f"seed{seed + i}.corpus.json"
            shutil.copyfile(trust.packaged_path(), table)
            corpus.write_text("{}\n")
            cmd += ["--update-trust", "--trust-file", str(table), "--corpus", str(corpus)]
        log = open(out_dir / f"seed{seed + i}.log", "w")  # noqa: SIM115 - closed after wait
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, out))
    results = []
    for proc, log, out in procs:
        proc.wait()
        log.close()
        results.append(json.loads(out.read_text()))
    return results


def merge(results: list[dict]) -> dict:
    classes: dict[str, dict] = {}
    for r in results:
        for key, c in r["classes"].items():
            m = classes.setdefault(key, {"mnemonic": c["mnemonic"], "trusted": c["trusted"]})
            for field in ("cases", "match", "fault", "refused", "mismatch", "policy", "noplan",
                          "masked"):  # fmt: skip
                count = c.get(field, 0)
                m[field] = m.get(field, 0) + (count if isinstance(count, int) else 0)
    compared = ("match", "fault", "refused", "mismatch")
    return {
        "cases": sum(r["totals"]["cases"] for r in results),
        "compared": sum(sum(c.get(k, 0) for k in compared) for c in classes.values()),
        "mnemonics": len({c["mnemonic"] for c in classes.values()}),
        "mnemonics_compared": len(
            {c["mnemonic"] for c in classes.values() if any(c.get(k) for k in compared)}
        ),
        "classes": len(classes),
        "trusted_classes_seen": sum(1 for c in classes.values() if c["trusted"]),
        "trusted_cases": sum(c["cases"] for c in classes.values() if c["trusted"]),
        "mismatches": sum(c.get("mismatch", 0) for c in classes.values()),
        "mismatching_classes": sorted(k for k, c in classes.items() if c.get("mismatch")),
        "trusted_mismatches": sum(c.get("mismatch", 0) for c in classes.values() if c["trusted"]),
        "masked": sum(c.get("masked", 0) for c in classes.values()),
    }


def merge_trust(out_dir: Path, seed: int, jobs: int) -> None:
    """The jobs' trust tables and corpora, merged into the packaged ones."""
    merged = trust.TrustTable.load(trust.packaged_path())
    corpus = prove.load_corpus()
    for i in range(jobs):
        merged = merged.merge(trust.TrustTable.load(out_dir / f"seed{seed + i}.trust.json"))
        job = prove.load_corpus(out_dir / f"seed{seed + i}.corpus.json")
        corpus = prove.add_encodings(corpus, [c for codes in job.values() for c in codes])
    trust.packaged_path().write_text(merged.dump())
    prove.corpus_path().write_text(prove.dump_corpus(corpus))
    print(f"trust table: {len(merged.proofs)} classes, corpus: {len(corpus)} classes",
          file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100_000, help="per job")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lockstep", action="store_true")
    ap.add_argument("--update-trust", action="store_true",
                    help="add what the jobs prove on this CPU to the packaged table and corpus")
    ap.add_argument("--out", help="keep the per-job JSON and logs here")
    args = ap.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="emuprobe-fuzz-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = merge(run_jobs(args.examples, args.seed, args.jobs, out_dir, args.update_trust))
    if args.update_trust:
        merge_trust(out_dir, args.seed, args.jobs)
    print(json.dumps(totals, indent=1))
    status = 1 if totals["trusted_mismatches"] else 0
    if args.lockstep:
        for argv, every in lockstep_commands(out_dir):
            cmd = [sys.executable, "-m", "emuprobe", "difftest", "--lockstep", "--every",
                   str(every), "--", *argv]  # fmt: skip
            print(f"$ emuprobe difftest --lockstep --every {every} -- " + " ".join(argv),
                  flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            print(done.stdout.splitlines()[-1] if done.stdout else done.stderr)
            status |= done.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
