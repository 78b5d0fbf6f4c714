"""Fresh-process ``hm3 request`` at budget 0: this checkout against another one, side by side.

A budget-0 answer takes well under a second inside a process; a user typing ``hm3 request`` also
pays Python's and the libraries' start-up, which dominates on a small CPU. This times that whole
command for both checkouts in alternation, each going first in every other pair (so machine noise
and the caches the first warms for the second hit both alike) on finished runs,
checks that both give the same answer, and reports the ratio.

    git worktree add /tmp/hm3-before <commit>
    .venv/bin/python experiments/bench_request_startup.py --baseline /tmp/hm3-before \\
        --runs runs/b2l/both-s0,runs/b2l/both-s1,runs/b2l/both-s2 --repeats 3

Each checkout's ``hm3`` is imported from its own source tree (the editable install's finder is
bypassed), with the same virtual environment. Run directories saved by an older hm3 get the level-1
posterior's grid predictions added first (the same GPs: answers are unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

from hm3.search.posterior import upgrade_posterior_file

PREFERENCES = ("math=0.6,code=0.3,translation=0.1", "math=0.1,code=0.3,translation=0.6",
               "math=0.3333,code=0.3333,translation=0.3334")
# Imports hm3 from HM3_SRC, not from the editable install, then runs its CLI.
LAUNCHER = """
import os, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, os.environ["HM3_SRC"])
import hm3
assert hm3.__file__.startswith(os.environ["HM3_SRC"]), hm3.__file__
from hm3.cli import main
sys.exit(main(sys.argv[1:]))
"""


def timed_request(src: Path, run: Path, prefer: str, out: Path) -> tuple[float, str]:
    """Wall seconds of one fresh ``hm3 request`` process from checkout ``src``, and its answer line.

    The line printed by the CLI, not the ``hm3_request.json`` record: the baseline checkout may predate
    the record's current keys, and the printed line is what both versions share."""
    env = os.environ | {"HM3_SRC": str(src.resolve())}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "request", str(run), "--prefer", prefer, str(out),
                           "--overwrite", "--quiet"], env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, next((line for line in done.stdout.splitlines() if line.startswith("answer:")), "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    p.add_argument("--runs", required=True, help="finished two-level run directories, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    harness.add_out_arguments(p, "bench_request_startup")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    runs = [Path(r) for r in args.runs.split(",") if r]
    for run in runs:
        upgrade_posterior_file(run / "level1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for run in runs:
                for prefer in PREFERENCES:
                    row: dict = {"repeat": rep, "run": str(run), "prefer": prefer}
                    for name, src in harness.alternated((("baseline", args.baseline), ("this", here)), len(rows)):
                        row[f"{name}_seconds"], row[f"{name}_answer"] = timed_request(
                            src, run, prefer, Path(tmp) / name)
                    row["same_answer"] = row["baseline_answer"] == row["this_answer"]
                    print(f"{run.name} {prefer}: baseline {row['baseline_seconds']:.2f} s, this "
                          f"{row['this_seconds']:.2f} s, same answer: {row['same_answer']}", flush=True)
                    rows.append(row)
    base = [r["baseline_seconds"] for r in rows]
    this = [r["this_seconds"] for r in rows]
    summary = {
        "baseline_mean_seconds": statistics.fmean(base), "this_mean_seconds": statistics.fmean(this),
        "this_max_seconds": max(this), "this_below_5s": sum(t < 5 for t in this), "requests": len(rows),
        "speedup_mean": statistics.fmean(b / t for b, t in zip(base, this, strict=True)),
        "all_same_answers": all(r["same_answer"] for r in rows),
    }
    commit = harness.git_commit(args.baseline)
    out = {"benchmark": "bench_request_startup", **harness.provenance(argv), "baseline_commit": commit,
           "summary": summary, "rows": rows}
    path = harness.write_results(harness.out_path(args, "bench_request_startup"), out)
    print(json.dumps(summary, indent=1))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
