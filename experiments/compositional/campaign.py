"""The whole compositional campaign as one resumable command: build, ablation seeds, bound, report.

``campaign.sh OUTDIR [options]`` (which picks the interpreter and runs this) runs, in order, each as its
own process with its output appended to ``OUTDIR/campaign.log``:

1. ``build.py`` (base, experts, score matrix) on ``--device`` in ``--dtype``;
2. ``ablation.py`` for each of ``--seeds``, one seed per step (every arm of it);
3. ``bound.py --seed S --frames best`` for the first seed;
4. the report: ``ablation.py --partial`` over all seeds (what has finished, and the summary of the
   complete seeds) into ``OUTDIR/ablation.json``.

Heavy state (models, run stores) goes under ``--work`` (default ``OUTDIR/work``); ``OUTDIR`` itself
holds only what a report needs, a handful of small files: ``campaign.json`` (settings, each step's
state and seconds, the device and, on CUDA, ``torch.cuda``'s view of it), ``campaign.log``,
``manifest.json`` (the build's), ``ablation.json``, ``bound_sS.json`` and, on CUDA, ``nvidia-smi.txt``.
So a machine that returns only a few small files (``--work`` outside ``OUTDIR``) returns all of it.

**Resumable.** A step that finished is skipped on a rerun (``campaign.json``); the one in flight resumes
from its own state (experts and matrix entries reused by ``build.py``, arms and evaluations by
``ablation.py``'s files and run stores, swaps by ``bound.py``'s store). A rerun must give the same
settings as the first call (refused otherwise, naming the difference); ``--deadline-s`` may change.

**Wall-clock guard.** ``--deadline-s N`` ends the campaign cleanly within N seconds of its start: a
step is started only with time left for it, and the one running when the time is up is interrupted
(SIGINT, so its stores close; SIGKILL after a grace period), leaving its resumable state; then the
report is written and the exit status is 75 ("try again": rerun the same command to go on). A step
that fails stops the campaign (exit 1, the step named; its output is in the log); a complete campaign
exits 0.

``--device cuda`` where torch finds no GPU is refused before anything is written (exit 5).

Cost. On this 2-core CPU (measured): build ~83 min, ~3.5 h per ablation seed, the bound ~3.5 h
(estimated), so ~15 h in all. On one GPU, **an estimate** scaled from those measurements (the
scripts' docstrings; nothing here has run on a GPU yet): build ~2-4 min, ~20 min per seed, bound
~15 min: **~1.5 h in all**, so a 10-minute window holds the build and about a quarter of seed 0.
The toy campaign (``--toy``) took ~10 min on this CPU, one thread, under load from other work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build.py (which adds experiments/ for the rest)

from build import DTYPES, device_info, provenance, refuse_compute  # noqa: E402

from hm3.atomic import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
STATUS = "campaign.json"
LOG = "campaign.log"
DEADLINE_EXIT = 75  # EX_TEMPFAIL: stopped at the deadline, rerun to go on
#: seconds kept back at the deadline: for an interrupted step to unwind (then it is killed), and for the report
GRACE_S = 30.0
REPORT_S = 60.0
MIN_STEP_S = 20.0  # a step is not started with less time than this left: it would only load and be interrupted
#: settings a rerun must repeat (the deadline may change between calls)
SETTINGS = ("device", "dtype", "toy", "work", "seeds", "batch_size", "set", "smol_dir", "smol_wheel", "threads")


@dataclass
class Step:
    name: str
    argv: list[str]


def steps(args: argparse.Namespace, out: Path) -> list[Step]:
    """The campaign's steps in order (module docstring), each a script and its arguments."""
    work = str(args.work)
    toy = ["--toy"] if args.toy else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    build = [str(HERE / "build.py"), "--work", work, "--device", args.device, "--dtype", args.dtype,
             "--batch-size", str(args.batch_size), *toy, *threads]
    if args.smol_dir:
        build += ["--smol-dir", str(args.smol_dir)]
    if args.smol_wheel:
        build += ["--smol-wheel", str(args.smol_wheel)]
    sets = [x for item in args.set for x in ("--set", item)]
    out_steps = [Step("build", build)]
    for seed in args.seeds:
        out_steps.append(Step(f"ablation_s{seed}", [
            str(HERE / "ablation.py"), "--work", work, "--seeds", str(seed), "--device", args.device,
            "--dtype", args.dtype, "--out", str(args.work / f"ablation_s{seed}.json"), *toy, *threads, *sets]))
    first = args.seeds[0]
    out_steps.append(Step(f"bound_s{first}", [
        str(HERE / "bound.py"), "--work", work, "--seed", str(first), "--frames", "best", "--device", args.device,
        "--dtype", args.dtype, "--out", str(out / f"bound_s{first}.json"), *toy, *threads]))
    return out_steps


def report_step(args: argparse.Namespace, out: Path) -> Step:
    """``ablation.py --partial`` over every seed: runs nothing, reports what has finished."""
    return Step("report", [str(HERE / "ablation.py"), "--work", str(args.work), "--partial",
                           "--seeds", ",".join(map(str, args.seeds)), "--out", str(out / "ablation.json"),
                           *(["--toy"] if args.toy else []), *[x for item in args.set for x in ("--set", item)]])


def run_step(argv: list[str], log: Path, *, timeout: float | None, grace: float = GRACE_S) -> tuple[str, int | None]:
    """Run ``argv`` (its output appended to ``log``) for at most ``timeout`` seconds: ("done", 0), ("failed", rc),
    or ("stopped", rc) when the time ran out and it was interrupted.

    The child leads its own process group with SIGINT at its default, whatever this process inherited (a
    background job's SIGINT is ignored, and Python keeps an ignored SIGINT ignored), so the interrupt raises
    KeyboardInterrupt in it and its ``finally`` blocks close its stores; a child still running ``grace``
    seconds later is killed with its group. Either way its state is what a resume reads."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"=== {' '.join(argv)}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, process_group=0,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                rc = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            f.write(f"=== interrupted at the deadline (rc {rc}); a rerun resumes it\n")
            return "stopped", rc
        except BaseException:  # this process interrupted: take the child down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return ("done", 0) if rc == 0 else ("failed", rc)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cuda_report(device: str, out: Path) -> dict[str, Any]:
    """``nvidia-smi``'s output (into ``OUTDIR/nvidia-smi.txt``) and torch.cuda's view of the device."""
    info = device_info(device)
    if not device.startswith("cuda"):
        return info
    import torch

    info["torch_cuda"] = {"arch_list": torch.cuda.get_arch_list(), "cudnn": torch.backends.cudnn.version(),
                          "current_device": torch.cuda.current_device()}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        info["nvidia_smi"] = "not found"
        return info
    done = subprocess.run([smi], capture_output=True, text=True)
    atomic_write_text(out / "nvidia-smi.txt", done.stdout + done.stderr)
    info["nvidia_smi"] = "nvidia-smi.txt" if done.returncode == 0 else f"rc {done.returncode}"
    return info


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in SETTINGS}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="campaign.sh", description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path, help="results, status and log (a few small files)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--toy", action="store_true", help="the toy benchmark (tiny random Llama, toy budgets)")
    p.add_argument("--work", type=Path, default=None, help="models and run stores (default OUTDIR/work)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=32, help="scoring batch size of every step (default 32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ablation.py --set (repeatable)")
    p.add_argument("--smol-dir", type=Path, default=None, help="build.py --smol-dir")
    p.add_argument("--smol-wheel", type=Path, default=None, help="build.py --smol-wheel")
    p.add_argument("--threads", type=int, default=None, help="torch threads of every step")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="end cleanly within this many seconds of the start, resumable (exit 75)")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: comma-separated integers")
    if not args.seeds or args.batch_size < 1 or (args.deadline_s is not None and args.deadline_s <= 0):
        p.error("--seeds needs one seed at least, --batch-size and --deadline-s must be positive")
    args.work = (args.work or args.outdir / "work").resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    args = parse(argv)
    if (code := refuse_compute(args.device, args.dtype, "campaign")) is not None:
        return code  # before anything is written
    out = args.outdir
    status_file = out / STATUS
    previous = json.loads(status_file.read_text()) if status_file.is_file() else None
    settings = settings_of(args)
    if previous is not None and previous["settings"] != settings:
        diff = {k: (previous["settings"].get(k), v) for k, v in settings.items() if previous["settings"].get(k) != v}
        print(f"campaign: {status_file} was started with other settings ({diff}, as (then, now)); "
              "rerun with the same ones or use another OUTDIR", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = previous or {"settings": settings, "steps": {}, "calls": 0}
    state["calls"] += 1
    state["device"] = cuda_report(args.device, out)
    state.update(deadline_s=args.deadline_s, **provenance(argv))

    def save(outcome: str) -> None:
        state.update(outcome=outcome, seconds_this_call=round(time.monotonic() - start, 1))
        atomic_write_text(status_file, json.dumps(state, indent=2))

    def left() -> float | None:
        return None if args.deadline_s is None else args.deadline_s - (time.monotonic() - start)

    outcome = "complete"
    signal.signal(signal.SIGTERM, _interrupt)  # killed from outside: the step in flight goes down with us
    try:
        for step in steps(args, out):
            record = state["steps"].setdefault(step.name, {"state": "pending", "seconds": 0.0})
            if record["state"] == "done":
                continue
            remaining = left()
            budget = None if remaining is None else remaining - REPORT_S - GRACE_S
            if budget is not None and budget < MIN_STEP_S:
                outcome = "deadline"
                break
            record["state"] = "running"
            save("running")
            t = time.monotonic()
            result, rc = run_step([sys.executable, *step.argv], out / LOG, timeout=budget)
            record.update(state=result, rc=rc, seconds=round(record["seconds"] + time.monotonic() - t, 1))
            if step.name == "build" and result == "done":
                shutil.copyfile(args.work / "manifest.json", out / "manifest.json")
            if result != "done":
                outcome = "deadline" if result == "stopped" else f"failed: {step.name}"
                break
            save("running")
    except KeyboardInterrupt:
        save("interrupted")
        print(f"campaign interrupted; a rerun resumes it -> {status_file}", file=sys.stderr)
        return 130
    if (args.work / "manifest.json").is_file():
        remaining = left()
        result, rc = run_step([sys.executable, *report_step(args, out).argv], out / LOG,
                              timeout=None if remaining is None else max(remaining - GRACE_S, MIN_STEP_S))
        state["steps"]["report"] = {"state": result, "rc": rc}
        if result != "done" and outcome == "complete":
            outcome = "failed: report"
    save(outcome)
    print(f"campaign {outcome} after {time.monotonic() - start:.0f} s: "
          + ", ".join(f"{k} {v['state']}" for k, v in state["steps"].items()) + f" -> {status_file}")
    if outcome == "complete":
        return 0
    return DEADLINE_EXIT if outcome == "deadline" else 1


if __name__ == "__main__":
    sys.exit(main())
