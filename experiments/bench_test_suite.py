"""The README's two Quick start commands, timed for this commit against a baseline commit, side by side.

Each commit is cloned fresh (``git clone`` + checkout) into ``--work``, and its own ``scripts/setup.sh``
builds its ``.venv`` once, untimed (the package installs are the same for both and come from the
local pip cache). Then, ``--rounds`` times and alternating between the two clones, each going first
in every other round, so that machine noise hits both alike:

* ``scripts/test.sh`` (ruff + the whole pytest suite, what CI runs), wall time and pytest's summary;
* ``scripts/demo.sh --out DIR`` into a fresh folder, with the clone's ``runs/`` removed first, so a
  demo that builds its zoo builds it every time, as on a fresh machine;
* ``quick`` (``--what`` must name it): ``scripts/test.sh -m "not slow"``, a developer's feedback loop, on
  this commit's clone only; its target is absolute (:data:`QUICK_TARGET_S`), not a ratio.

Each clone has its own torch extension cache (:func:`clone_env`): what a commit's set-up or first
run compiles (botorch's fused kernel) it compiles once, as on its own machine.

    .venv/bin/python experiments/bench_test_suite.py --baseline deae316 --rounds 2

The JSON (``experiments/results/bench_test_suite_<date>_<commit>.json``) holds every timing with the
1-minute load average at its start, the CPU time the whole machine used during it, the machine and both
commits; the summary is the ratio of the mean wall times (this commit / baseline), and for each commit
its mean CPU time over the machine's cores: the wall time below which that work cannot finish there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import harness
import psutil

REPO = harness.REPO
#: the quick suite's target: a developer's feedback within 3 minutes
QUICK_TARGET_S = 180.0
COMMANDS = {"suite": ["scripts/test.sh", "-q", "-p", "no:cacheprovider"],
            "quick": ["scripts/test.sh", "-q", "-p", "no:cacheprovider", "-m", "not slow"]}


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def clone(commit: str, dest: Path) -> Path:
    """A clone of this repository at ``commit`` with its own ``.venv`` (set up untimed; an earlier clone
    is moved to ``commit`` and keeps its ``.venv``, which ``scripts/setup.sh`` brings up to date)."""
    if not (dest / ".git").is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "fetch", "-q", str(REPO), commit], cwd=dest, check=True)
    subprocess.run(["git", "checkout", "-q", "--force", commit], cwd=dest, check=True)
    subprocess.run(["git", "clean", "-qfdx", "-e", ".venv", "-e", ".torch_extensions"], cwd=dest, check=True)
    subprocess.run(["scripts/setup.sh"], cwd=dest, check=True, env=clone_env(dest))
    return dest


def clone_env(src: Path) -> dict[str, str]:
    """The environment of a clone's commands: its own torch extension cache, as on a machine of its own.

    torch keys its JIT extensions (botorch's fused kernel) by name in one shared cache, and two
    virtual environments rebuild it over each other (~30 s each time), which would charge both
    checkouts a rebuild on every alternation that no single installation ever pays."""
    return os.environ | {"TORCH_EXTENSIONS_DIR": str(src / ".torch_extensions")}


def busy_core_seconds() -> float:
    """CPU time every process on the machine has used so far, in core-seconds.

    Machine-wide rather than the command's own rusage, which misses what runs outside its process tree:
    Ray's actors (children of Ray's daemon), and processes that daemonise. Guest time is already inside
    user time on Linux, and steal is the hypervisor's, so neither is added."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in ``cwd`` (output to ``log``): wall seconds, the machine's CPU core-seconds meanwhile,
    exit code, load at start, last line."""
    load = os.getloadavg()[0]
    busy = busy_core_seconds()
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=clone_env(cwd)).returncode
    seconds = time.perf_counter() - start
    busy = busy_core_seconds() - busy
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line), lines[-1] if lines else "")
    return {"seconds": round(seconds, 1), "busy_core_seconds": round(busy, 1), "exit_code": code,
            "load_at_start": round(load, 2), "summary": summary.strip("= ")}


def cpu_floor(runs: list[dict], cores: int) -> dict[str, float]:
    """The runs' mean CPU time, and that time spread over ``cores``: no scheduling of the same work on this
    machine finishes sooner (the work would have to shrink)."""
    busy = sum(x["busy_core_seconds"] for x in runs) / len(runs)
    return {"mean_busy_core_s": round(busy, 1), "floor_s": round(busy / cores, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="the commit to compare against (e.g. the main before a change)")
    p.add_argument("--current", default="HEAD")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--what", default="suite,demo", help="comma-separated: suite, demo, quick")
    p.add_argument("--work", type=Path, default=Path("/tmp/hm3-bench-suite"))
    harness.add_out_arguments(p, "bench_test_suite")
    args = p.parse_args(argv)
    commits = {"baseline": git("rev-parse", args.baseline), "current": git("rev-parse", args.current)}
    args.work.mkdir(parents=True, exist_ok=True)
    clones = {k: clone(c, args.work / k) for k, c in commits.items()}
    # named by the commit measured, which need not be this checkout's
    out = args.out or harness.results_path("bench_test_suite", args.label, commit=commits["current"])
    cores = os.cpu_count() or 1
    result = {"benchmark": "bench_test_suite", **harness.provenance(argv), "commits": commits, "cores": cores,
              "runs": []}
    what = args.what.split(",")
    for r in range(args.rounds):
        for kind in ("suite", "demo", "quick"):
            if kind not in what:
                continue
            for name, src in harness.alternated(list(clones.items()), r):
                if kind == "quick" and name != "current":
                    continue
                if kind in COMMANDS:
                    cmd = COMMANDS[kind]
                else:
                    shutil.rmtree(src / "runs", ignore_errors=True)
                    cmd = ["scripts/demo.sh", "--out", "runs/demo-bench"]
                row = {"round": r, "kind": kind, "checkout": name,
                       **timed(cmd, src, args.work / f"{name}-{kind}-{r}.log")}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
                harness.write_results(out, result)
    ratios: dict[str, dict] = {}
    for kind in what:
        if kind == "quick":
            mean_s = sum(x["seconds"] for x in result["runs"] if x["kind"] == kind) / args.rounds
            ratios[kind] = {"current_mean_s": round(mean_s, 1), "target_s": QUICK_TARGET_S,
                            "met": mean_s <= QUICK_TARGET_S,
                            "failed_runs": sum(x["exit_code"] != 0 for x in result["runs"] if x["kind"] == kind),
                            "cpu": {"current": cpu_floor([x for x in result["runs"] if x["kind"] == kind], cores)}}
            continue
        mean = {n: sum(x["seconds"] for x in result["runs"] if x["kind"] == kind and x["checkout"] == n)
                / args.rounds for n in clones}
        ratios[kind] = {"baseline_mean_s": round(mean["baseline"], 1), "current_mean_s": round(mean["current"], 1),
                        "ratio": round(mean["current"] / mean["baseline"], 3),
                        # a failing run stops early: its time is not the command's (the page does not judge it)
                        "failed_runs": sum(x["exit_code"] != 0 for x in result["runs"] if x["kind"] == kind),
                        "cpu": {n: cpu_floor([x for x in result["runs"] if x["kind"] == kind and x["checkout"] == n],
                                             cores) for n in clones}}
    result["summary"] = ratios
    harness.write_results(out, result)
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
