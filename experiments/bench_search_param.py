"""Level-1 search benchmark: hypervolume vs evaluations for every optimiser, several seeds.

Each (optimiser, seed) is one ordinary ``run_level1`` in its own run directory under ``--work``, so
every score is in a run store and an interrupted benchmark resumes where it stopped (a finished
run is read back from its ``summary.json`` if its store recorded the config asked for; an unfinished
one is continued with ``resume=True``).

Protocol (the same for every optimiser): the zoo's base and experts, the HV protocol of
:mod:`hm3.search.pareto` (base = 0, best expert = 1 per task, reference point = the base), DARE-TIES
coefficients and densities in the same search space, the first ``--validation-examples`` of each
validation split per candidate. HV after n evaluations is the HV of everything evaluated so far
(the ``hv_trace_validation`` of each run). ``random`` and ``nsga2`` run to ``--long-budget``; the others
to ``--budget``. The target: ``bo-mo`` at ``--budget`` reaches the HV that ``random`` and ``nsga2``
reach at ``--long-budget`` (4x sample efficiency with the defaults 50 / 200).
``df-merge`` is DF-Merge proper (Fisher-weighted task arithmetic, BO on the mean score); Fisher
weighting on DARE-TIES is ablated with ``bo-mo`` on vs off, and ``bo-mo``'s initial design (by default
the preference design of :func:`hm3.search.level1.preference_design`) against a plain Sobol design
(``bo-mo sobol-design``).

Usage::

    .venv/bin/python experiments/bench_search_param.py [--zoo builtin:micro] [--seeds 0,1,2]
        [--budget 50] [--long-budget 200] [--validation-examples 64] [--optimizers ...]
        [--work runs/bench_search_param] [--out FILE | --label LABEL]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
from zoo_bench import add_zoo_bench_args, check_reused, plot_hv_curves, prepare, zoo_record

from hm3.run.config import stored_form
from hm3.search.level1 import run_level1
from hm3.search.run_config import parse_run_config

OPTIMIZERS = ("bo-mo", "bo-tcheby", "df-merge", "nsga2", "random", "hm3-fixed")
LONG = ("random", "nsga2")
SOBOL_ARM = "bo-mo sobol-design"  # the design ablation: bo-mo with a Sobol initial design


def run_config(zoo: Path, optimizer: str, seed: int, budget: int, args: argparse.Namespace, fisher: bool) -> dict:
    space: dict[str, Any] = {"dare": True, "rescale_mode": "l1", "weight_bounds": [0.0, 1.0],
                             "density_bounds": [0.2, 1.0], "fisher": fisher}
    if args.normalize:  # TIES's disjoint mean: only the ratios of the weights matter, never their sum
        space["normalize"] = True
    if optimizer == "df-merge":  # DF-Merge proper: Fisher-weighted task arithmetic, λ_i in [0, 1], no drop step
        space = {"dare": False, "fisher": True, "df_merge": True, "weight_bounds": [0.0, 1.0]}
    options = args.bo_options if optimizer == "bo-mo" else {}
    return {
        "zoo": str(zoo.resolve()),
        "search_space": space,
        "optimizer": {"name": optimizer, "budget": budget, **({"options": options} if options else {})},
        "evaluation": {"backend": "hf", "validation_examples": args.validation_examples,
                       "test_examples": args.test_examples, "batch_size": 64},
        "fisher": {"examples": args.fisher_examples},
        "seed": seed,
    }


def one_run(zoo: Path, work: Path, optimizer: str, seed: int, budget: int, args, fisher: bool = False) -> dict:
    if optimizer == SOBOL_ARM:
        optimizer = "bo-mo"
        args = argparse.Namespace(**{**vars(args), "bo_options": {**args.bo_options, "initial_design": "sobol"}})
    tag = options_tag(args.bo_options) if optimizer == "bo-mo" else ""
    name = f"{optimizer}{'-fisher' if fisher else ''}{tag}-s{seed}-b{budget}"
    run_dir = work / name
    summary_file = run_dir / "summary.json"
    cfg = parse_run_config(run_config(zoo, optimizer, seed, budget, args, fisher), source=name)
    if summary_file.is_file():
        check_reused(run_dir, stored_form(cfg))
        summary = json.loads(summary_file.read_text())
        summary["reused"] = True
        return summary
    start = time.perf_counter()
    result = run_level1(cfg, run_dir, resume=(run_dir / "hm3.sqlite").exists(), progress=not args.quiet)
    summary = dict(result.summary)
    summary["bench_wall_seconds"] = time.perf_counter() - start
    summary["reused"] = False
    return summary


def options_tag(options: dict[str, Any]) -> str:
    """A run-directory suffix naming non-default optimiser options (none for the defaults)."""
    return "".join(f"-{k}{v}" for k, v in sorted(options.items()))


def hv_at(trace: list[float], n: int) -> float:
    return float(trace[min(n, len(trace)) - 1]) if trace else 0.0


def aggregate(runs: dict[str, list[dict]], checkpoints: list[int]) -> dict[str, Any]:
    table = {}
    for key, summaries in runs.items():
        row = {}
        for n in checkpoints:
            if all(len(s["hv_trace_validation"]) >= n for s in summaries):
                vals = [hv_at(s["hv_trace_validation"], n) for s in summaries]
                row[str(n)] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}
        row["hv_test_front"] = statistics.fmean(s["hv_test_front"] for s in summaries)
        row["seconds_per_eval"] = statistics.fmean(
            s["wall_seconds_this_process"] / max(1, s["evaluations"]) for s in summaries if not s.get("reused")
        ) if any(not s.get("reused") for s in summaries) else None
        table[key] = row
    return table


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    plot_hv_curves({key: [s["hv_trace_validation"] for s in summaries] for key, summaries in runs.items()}, path,
                   log_x=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_zoo_bench_args(p, "bench_search_param")
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--long-budget", type=int, default=200)
    p.add_argument("--fisher-examples", type=int, default=30)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--no-fisher-ablation", action="store_true")
    p.add_argument("--no-design-ablation", action="store_true",
                   help="skip bo-mo with a Sobol initial design (run by default beside bo-mo)")
    p.add_argument("--normalize", action="store_true",
                   help="DARE-TIES with normalize: true (mergekit's default for ties; dare_ties defaults to false)")
    p.add_argument("--bo-options", type=json.loads, default={},
                   help='JSON options for bo-mo, e.g. \'{"n_init": 8, "num_restarts": 10}\' (its ablations)')
    args = p.parse_args(argv)
    if not prepare(args):
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    optimizers = [o for o in args.optimizers.split(",") if o]
    started = time.time()
    runs: dict[str, list[dict]] = {}
    plan = [(o, s, args.long_budget if o in LONG else args.budget, False) for o in optimizers for s in seeds]
    if not args.no_fisher_ablation:
        plan += [("bo-mo", s, args.budget, True) for s in seeds]
    if not args.no_design_ablation and "bo-mo" in optimizers:
        plan += [(SOBOL_ARM, s, args.budget, False) for s in seeds]
    for i, (opt, seed, budget, fisher) in enumerate(plan, 1):
        key = f"{opt}{' +fisher' if fisher else ''}"
        print(f"[bench] {i}/{len(plan)}: {key} seed {seed} budget {budget}", file=sys.stderr, flush=True)
        runs.setdefault(key, []).append(one_run(args.zoo, args.work, opt, seed, budget, args, fisher))
    checkpoints = sorted(n for n in {10, 25, args.budget, 100, args.long_budget} if n <= args.long_budget)
    table = aggregate(runs, checkpoints)
    out = {
        "benchmark": "bench_search_param",
        **harness.provenance(argv),
        "zoo": str(args.zoo), "zoo_build": zoo_record(args.zoo),
        "seeds": seeds, "budget": args.budget, "long_budget": args.long_budget,
        "validation_examples": args.validation_examples,
        "search_space_normalize": args.normalize,
        "bo_mo_options": args.bo_options,
        "table": table,
        "target": {
            "bo-mo_at_budget": table.get("bo-mo", {}).get(str(args.budget)),
            "random_at_long": table.get("random", {}).get(str(args.long_budget)),
            "nsga2_at_long": table.get("nsga2", {}).get(str(args.long_budget)),
        },
        "runs": {k: [{"seed": s["seed"], "hv_trace_validation": s["hv_trace_validation"],
                      "hv_test_front": s["hv_test_front"], "evaluations": s["evaluations"],
                      "wall_seconds": s["wall_seconds_this_process"],
                      # read back from --work: made by an earlier call, perhaps at another commit
                      "reused": s["reused"]} for s in v] for k, v in runs.items()},
        # this invocation only: arms finished by an earlier invocation are read back, not re-run
        "this_invocation_wall_seconds": time.time() - started,
    }
    t = out["target"]
    if t["bo-mo_at_budget"] and t["random_at_long"] and t["nsga2_at_long"]:
        bo = t["bo-mo_at_budget"]["mean"]
        out["target"]["ratio_bo_to_random"] = bo / t["random_at_long"]["mean"] if t["random_at_long"]["mean"] else None
        out["target"]["ratio_bo_to_nsga2"] = bo / t["nsga2_at_long"]["mean"] if t["nsga2_at_long"]["mean"] else None
        out["target"]["met"] = bo > 0 and bo >= t["random_at_long"]["mean"] and bo >= t["nsga2_at_long"]["mean"]
    if "bo-mo" in runs:  # sample efficiency: evaluations a peer's mean trace needs to reach bo-mo's mean HV at --budget
        target = statistics.fmean(hv_at(s["hv_trace_validation"], args.budget) for s in runs["bo-mo"])
        reach = {}
        for key in (k for k in runs if k != "bo-mo"):
            n = min(len(s["hv_trace_validation"]) for s in runs[key])
            mean_trace = np.mean([s["hv_trace_validation"][:n] for s in runs[key]], axis=0)
            hit = np.nonzero(mean_trace >= target)[0]
            reach[key] = int(hit[0]) + 1 if len(hit) else None
        out["target"]["evaluations_to_reach_bo_mo"] = {"bo_mo_hv": target, "evaluations": reach}
    harness.write_results(args.out, out)
    plot(runs, args.plot)
    print(f"{'optimiser':<16}" + "".join(f"{'HV@' + str(n):>12}" for n in checkpoints) + f"{'HV test':>10}")
    for key, row in table.items():
        cells = "".join(f"{row[str(n)]['mean']:>12.4f}" if str(n) in row else f"{'':>12}" for n in checkpoints)
        print(f"{key:<16}{cells}{row['hv_test_front']:>10.4f}")
    print(f"target: {json.dumps(out['target'])}")
    print(f"-> {args.out}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
