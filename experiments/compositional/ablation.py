"""The equal-cost ablation on the compositional benchmark: does level 2 pay where skills compose?

Arms, per seed, over the models of ``build.py`` (base, language expert, math expert) and the
objectives composite, math and language (:mod:`objectives.compositional`):

1. **two levels** -- ``hm3 run`` (:func:`hm3.run.two_level.run_two_level`): level-1 BO over DARE-TIES,
   then the λ-conditioned policy over paths framed by the level-1 merge (Sakana's parameter space,
   then data flow), with the frame-order prior, transition scales searched per path
   (``level2.rl.transition_scales``) and the swap prior (``level2.swaps``);
2. **level 1 alone** -- ``hm3 search param`` (:func:`hm3.search.level1.run_level1`) with the budget
   the two-level run spent: its level-1 evaluations plus its level-2 cost in full-evaluation
   equivalents (examples scored / (objectives × validation examples)), as
   ``experiments/real_model_ablation.py`` counts it;
3. **level 2 alone** -- ``hm3 run`` with ``pool: experts`` (paths over the experts, framed by the
   base), the same level-2 settings with its episode counts scaled by the two-level run's whole cost over
   its level-2 cost (rounded up), so that it spends the same budget with no level-1 stage
   (:func:`level2_alone_settings`); its measured cost is reported beside (results files before this
   plan ran it with the two-level run's episode counts: ~80% of the others' cost);
4. **layer swaps** -- the published heuristic without search (Bandarkar et al. 2024): the math
   expert with the language expert's bottom k₁ and top k₂ layers, for each (k₁, k₂) of ``--swaps``;
   each swap costs one full evaluation, so this arm is *not* at the others' cost (a fixed recipe, not a
   search: ``bound.py`` scores a whole grid of swaps for what a swap search could reach).

Reported per arm and seed: HV on validation (all candidates) and on test (the validation front
re-scored), by the documented protocol (objectives normalised by the base and the best expert per
task on that split, reference point the base; :func:`hm3.search.pareto.protocol_hypervolume`), the
best composite score on validation and the same candidate's test score, and the cost in
full-evaluation equivalents (references excluded: every arm scores them alike). The results JSON
(``--out``, under experiments/results/) carries date, commit, machine and command. Each arm's result
is saved under ``--work``/seed-S/ when it ends and reused on a rerun, and a killed arm resumes from
its run store, so the ablation is resumable per arm.

Commands (after ``build.py``; from the repository root, ``.venv`` active)::

    python experiments/compositional/ablation.py --toy --work runs/compositional-toy     # ~1-2 min
    python experiments/compositional/ablation.py --work runs/compositional --seeds 0,1,2
    python experiments/compositional/ablation.py --work runs/compositional --seeds 0,1,2 --partial

``--partial`` runs nothing: it reports the arms finished so far (the run takes hours and resumes
across interruptions, so its progress is worth a report of its own, labelled ``partial``).

Every arm evaluates where the build scored its matrix: the manifest's ``evaluation`` (device, dtype,
batch size; cpu, float32 and 32 for a build that predates it) goes into the run configs (hm3's
``evaluation.device``/``dtype``) and to the swap arm's backend, because the arms' references must equal
the matrix to the last digit (:func:`check_refs`). ``--device``/``--dtype`` only confirm it: one that
differs from the manifest's is refused (rescore the matrix with ``build.py --device ... --dtype ...``),
and ``--device cuda`` where torch finds no GPU is refused before any work. The hf backend only: the
build's matrix and the swap arm score through transformers, so a vLLM run would not measure the same
references.

GPU cost, **an estimate** (nothing here has run on a GPU yet): scaled from seed 0's measured CPU
seconds (two levels 5199 s, level 1 alone 3263 s, level 2 alone 3613 s, swaps 535 s: 3.5 h on this
2-core machine, ~36 s per merge evaluation, ~45 s per path equivalent) by the ~10x of GPU greedy
scoring over this CPU (``build.py``'s docstring), **~20 min per seed on one GPU** (~1 h for three),
less with a larger ``build.py --batch-size`` (64 scores a validation split of one objective in one batch).

CPU cost of the real ablation, an estimate from measured per-example costs (SmolLM2 greedy scoring
of these tasks took 0.7-0.8 s per example in batches of 32 on this 2-core machine at load ~5 from
other work, ~0.3 s idle by this machine's earlier SmolLM2 runs): a full evaluation (3 objectives x 64
validation examples) is ~1 min idle. Per seed the two-level run costs ~16 merges + ~40-60 path
equivalents (80 DAR episodes at data scale 0.25, up to 3 scale variants each, kept paths and swaps
on the whole plan) + test re-scoring ≈ 1.3 h; level 1 alone the same budget ≈ 1.1 h; level 2 alone
≈ 1.2 h at the same budget; 6 swaps on validation and test ≈ 0.3 h: **~3.9 h per seed, ~12 CPU-hours for 3 seeds idle**,
up to ~2.5x that under the load measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build.py (which adds experiments/ for the rest)

from build import COMPUTE_DEFAULTS, DTYPES, MANIFEST, check_compute, provenance, refuse_compute  # noqa: E402
from harness import results_path  # noqa: E402
from real_model_run import validation_cost  # noqa: E402

from hm3.atomic import atomic_write_text  # noqa: E402
from hm3.search.pareto import non_dominated, protocol_hypervolume  # noqa: E402

ARMS = ("two_levels", "level1_alone", "level2_alone", "swaps")
#: budgets; the validation and test examples are the build's (its matrix holds the references), from its manifest
REAL = {"optimizer": "bo-mo", "budget": 16, "offline_episodes": 48,
        "online_episodes": 16, "preferences": 2, "episodes_per_update": 8, "epochs": 4, "data_scale": 0.25,
        "keep_best": 3, "swaps": [[2, 1], [4, 2], [5, 2], [6, 3], [8, 4], [10, 4]], "swap_prior": [[5, 2], [8, 4]],
        "transition_scales": [0.8, 1.25]}
TOY = {"optimizer": "random", "budget": 3, "offline_episodes": 4, "online_episodes": 4,
       "preferences": 1, "episodes_per_update": 4, "epochs": 1, "data_scale": 0.5, "keep_best": 1,
       "swaps": [[1, 0], [1, 1]], "swap_prior": [[1, 1]], "transition_scales": [0.8]}


def evaluation_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """Where and how the build scored its matrix (device, dtype, batch size): every arm evaluates alike."""
    return {**COMPUTE_DEFAULTS, **manifest.get("evaluation", {})}


def run_config(manifest: dict[str, Any], s: dict[str, Any], seed: int, *, level2: str | None) -> dict[str, Any]:
    """A run config over the built models; ``level2`` None (level 1 alone), 'experts+merge' or 'experts'."""
    ev = evaluation_of(manifest)
    config: dict[str, Any] = {
        "models": manifest["models"],
        "objectives": manifest["objectives"],
        "search_space": {"base_model": "base", "models": ["language", "math"], "dare": True, "rescale_mode": "l1",
                         "weight_bounds": [0.0, 1.0], "density_bounds": [0.2, 1.0]},
        "optimizer": {"name": s["optimizer"], "budget": s["budget"]},
        "evaluation": {"backend": "hf", "device": ev["device"], "dtype": ev["dtype"],
                       "validation_examples": s["validation_examples"], "test_examples": s["test_examples"],
                       "batch_size": ev["batch_size"]},
        "seed": seed,
    }
    if level2 is not None:
        config["level2"] = {
            "pool": level2, "preferences": s["preferences"], "keep_best": s["keep_best"], "swaps": s["swap_prior"],
            "rl": {"offline_episodes": s["offline_episodes"], "online_episodes": s["online_episodes"],
                   "episodes_per_update": s["episodes_per_update"], "epochs": s["epochs"], "dar": True,
                   "data_scale": s["data_scale"], "path_prior": "frame-order", "epsilon": 0.05,
                   "critic_margin": 0.05, "transition_scales": s["transition_scales"]},
        }
    return config


def arm_config(manifest: dict[str, Any], s: dict[str, Any], seed: int, *, level2: str | None,
               budget: int | None = None) -> dict[str, Any]:
    """An hm3 arm's run config: :func:`run_config` with the level-1 ``budget`` when given."""
    return run_config(manifest, s if budget is None else {**s, "budget": budget}, seed, level2=level2)


def plan_of(config: dict[str, Any]) -> dict[str, Any]:
    """What an arm's cost was planned by: its level-1 optimizer and budget and its level-2 section. Results
    made before evaluation devices were an option lack ``evaluation.device``/``dtype`` (cpu, float32:
    :func:`check_refs` confirms the references), so the rest is not compared."""
    return {"optimizer": config.get("optimizer"), "level2": config.get("level2")}


def front_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "front.csv") as f:
        return list(csv.DictReader(f))


def best_composite(rows: list[dict[str, Any]], composite: str) -> dict[str, Any]:
    """The candidate with the best composite validation score (always on the front): its composite
    score on validation and test, and its whole row (every objective: the score matrix's merge row)."""
    best = max(rows, key=lambda r: float(r[f"{composite}_val"]))
    return {"validation": float(best[f"{composite}_val"]), "test": float(best[f"{composite}_test"]), "point": best}


def equivalents(cost: dict[str, Any], kinds: tuple[str, ...]) -> float:
    return round(sum(cost.get(k, {}).get("full_evaluation_equivalents", 0.0) for k in kinds), 2)


def level2_alone_settings(s: dict[str, Any], two_levels: dict[str, Any]) -> dict[str, Any]:
    """Level 2 alone's settings: the two-level run's, episodes scaled to that run's whole cost.

    The two-level run spent ``cost_equivalents`` (level-1 merges plus level-2 paths, measured), of which
    ``path_equivalents`` on level 2; with no level-1 stage, level 2 alone would spend only the latter at
    the same episode counts. Scaling offline and online episodes by their ratio (rounded up) spends the
    same budget; the arm's measured cost is reported beside, as every arm's is.
    """
    factor = two_levels["cost_equivalents"] / max(two_levels["path_equivalents"], 1e-9)
    return {**s, **{k: math.ceil(s[k] * factor) for k in ("offline_episodes", "online_episodes")}}


def hm3_arm(manifest: dict[str, Any], s: dict[str, Any], seed: int, run_dir: Path, *, level2: str | None,
            budget: int | None = None) -> dict[str, Any]:
    """Run (or resume) one hm3 arm in process and summarise it."""
    from hm3.run.config import parse_two_level_config
    from hm3.run.two_level import run_two_level
    from hm3.search.level1 import run_level1
    from hm3.search.run_config import parse_run_config

    config = arm_config(manifest, s, seed, level2=level2, budget=budget)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir.parent / f"{run_dir.name}.yml", yaml.safe_dump(config, sort_keys=False))
    resume = (run_dir / "hm3.sqlite").exists()
    start = time.perf_counter()
    if level2 is None:
        summary = run_level1(parse_run_config(config), run_dir, resume=resume, progress=False).summary
    else:
        summary = run_two_level(parse_two_level_config(config), run_dir, resume=resume, progress=False)
    names = manifest["objectives"]
    cost = validation_cost(run_dir, len(names), s["validation_examples"])
    front = front_rows(run_dir)
    return {
        "config": config, "hv_validation": summary["hv_validation"], "hv_test": summary["hv_test_front"],
        "front_levels": summary.get("front_levels"), "best_composite": best_composite(front, names[0]),
        "front": front,  # validation and test scores of every front point (the BENCHMARKS.md score matrix)
        "cost": cost, "level1_evaluations": cost.get("merge", {}).get("evaluations", 0) // len(names),
        "path_equivalents": equivalents(cost, ("path",)), "cost_equivalents": equivalents(cost, ("merge", "path")),
        "seconds": round(time.perf_counter() - start, 1),
    }


def swap_arm(manifest: dict[str, Any], s: dict[str, Any], seed_dir: Path, refs: dict[str, Any]) -> dict[str, Any]:
    """The heuristic: the math expert framing the language expert's bottom/top layers, no search."""
    from hm3.arch.path import LayerPool, build_path_model
    from hm3.arch.swaps import layer_swap
    from hm3.eval.backend import load_tokenizer
    from hm3.eval.evaluate import evaluate_objective
    from hm3.eval.hf import HFBackend
    from objectives.registry import get_objective

    ev = evaluation_of(manifest)
    device, dtype = check_compute(ev["device"], ev["dtype"])
    dirs = [manifest["models"]["language"], manifest["models"]["math"]]  # the frame last
    pool = LayerPool.load(dirs)
    # once, on the evaluation device in its dtype, as hm3's session holds path tensors (a no-op on cpu/float32)
    pool = dataclasses.replace(pool, states=tuple({n: t.to(device, dtype) for n, t in state.items()}
                                                  for state in pool.states))
    tokenizer = load_tokenizer(dirs[-1])
    objectives = [get_objective(n) for n in manifest["objectives"]]
    partial = seed_dir / "swaps.partial.json"
    done: dict[str, Any] = json.loads(partial.read_text()) if partial.is_file() else {}
    start = time.perf_counter()
    for k_bottom, k_top in s["swaps"]:
        label = f"{k_bottom},{k_top}"
        if label in done:
            continue
        path = layer_swap(pool.num_layers[-1], frame=1, donor=0, k_bottom=k_bottom, k_top=k_top)
        backend = HFBackend(build_path_model(pool, path), tokenizer, batch_size=ev["batch_size"], model_dir=dirs[-1])
        done[label] = {split: [evaluate_objective(backend, o, split, list(range(s[f"{split}_examples"]))).score
                               for o in objectives] for split in ("validation", "test")}
        atomic_write_text(partial, json.dumps(done, indent=2))  # resumable per swap
    val = np.array([done[k]["validation"] for k in done])
    front = non_dominated(val)
    test = np.array([done[k]["test"] for k in done])[front]
    best = max(done, key=lambda k: done[k]["validation"][0])
    return {
        "swaps": done, "hv_validation": protocol_hypervolume(val, *refs["validation"]),
        "hv_test": protocol_hypervolume(test, *refs["test"]),
        "best_composite": {"swap": best, "validation": done[best]["validation"][0], "test": done[best]["test"][0]},
        "cost_equivalents": float(len(done)), "seconds": round(time.perf_counter() - start, 1),
    }


def protocol_refs(manifest: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(base, ideal) per split from the build's score matrix: the base model, the best expert per task.

    The manifest scores base and experts on the same first N examples that the runs evaluate, so
    the swap arm needs no finished hm3 run for its references (and can run first: it is the
    cheapest arm and says early whether any layer recombination helps the composite);
    :func:`check_refs` confirms that each hm3 run measured the same references.
    """
    names, matrix = manifest["objectives"], manifest["score_matrix"]
    out = {}
    for split in ("validation", "test"):
        row = {m: np.array([matrix[m][split][n] for n in names]) for m in ("base", "language", "math")}
        out[split] = (row["base"], np.maximum(row["language"], row["math"]))
    return out


def check_refs(run_dir: Path, manifest: dict[str, Any], *, tol: float = 1e-6) -> None:
    """Refuse a run whose reference scores differ from the manifest's (other examples, other models)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    names, matrix = manifest["objectives"], manifest["score_matrix"]
    for split in ("validation", "test"):
        for model, scores in summary[f"reference_{split}"].items():
            expected = [matrix[model][split][n] for n in names]
            if not np.allclose(scores, expected, atol=tol, rtol=0):
                raise SystemExit(f"{run_dir}: reference {model} on {split} scored {scores}, the build's manifest "
                                 f"says {expected}: the run and the build do not measure the same thing")


def finished_arms(work: Path, seed: int) -> dict[str, Any]:
    """The arms of one seed that have finished (their ``work/seed-S/<arm>.json``), in :data:`ARMS` order."""
    seed_dir = work / f"seed-{seed}"
    return {arm: json.loads((seed_dir / f"{arm}.json").read_text()) for arm in ARMS
            if (seed_dir / f"{arm}.json").is_file()}


def run_seed(manifest: dict[str, Any], s: dict[str, Any], seed: int, work: Path,
             log=print) -> dict[str, Any]:
    """All arms of one seed, each reused from ``work/seed-S/<arm>.json`` when already finished."""
    seed_dir = work / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}

    def arm(name: str, make, planned: dict[str, Any] | None = None) -> dict[str, Any]:
        file = seed_dir / f"{name}.json"
        if file.is_file():
            done = json.loads(file.read_text())
            if planned is not None and plan_of(done["config"]) != plan_of(json.loads(json.dumps(planned))):
                raise SystemExit(f"{file} ran another config than this plan's (other budgets or episode "
                                 f"counts): remove it and {seed_dir / name} to run the arm again")
            return done
        log(f"seed {seed}: arm {name}")
        result = make()
        atomic_write_text(file, json.dumps(result, indent=2))
        return result

    refs = protocol_refs(manifest)
    out["swaps"] = arm("swaps", lambda: swap_arm(manifest, s, seed_dir, refs))
    out["two_levels"] = arm("two_levels", lambda: hm3_arm(manifest, s, seed, seed_dir / "two_levels",
                                                          level2="experts+merge"),
                            arm_config(manifest, s, seed, level2="experts+merge"))
    equal_budget = out["two_levels"]["level1_evaluations"] + round(out["two_levels"]["path_equivalents"])
    out["level1_alone"] = arm("level1_alone", lambda: hm3_arm(manifest, s, seed, seed_dir / "level1_alone",
                                                              level2=None, budget=equal_budget),
                              arm_config(manifest, s, seed, level2=None, budget=equal_budget))
    s2 = level2_alone_settings(s, out["two_levels"])
    out["level2_alone"] = arm("level2_alone", lambda: hm3_arm(manifest, s2, seed, seed_dir / "level2_alone",
                                                              level2="experts"),
                              arm_config(manifest, s2, seed, level2="experts"))
    for name in ("two_levels", "level1_alone", "level2_alone"):
        check_refs(seed_dir / name, manifest)
    return out


def summarise(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means per arm, and the issue's targets: two levels against level 1 alone, per seed."""
    def mean(arm: str, key: str, sub: str | None = None) -> float:
        return statistics.fmean(r[arm][key] if sub is None else r[arm][key][sub] for r in seeds.values())

    table = {arm: {"hv_validation": mean(arm, "hv_validation"), "hv_test": mean(arm, "hv_test"),
                   "best_composite_validation": mean(arm, "best_composite", "validation"),
                   "best_composite_test": mean(arm, "best_composite", "test"),
                   "cost_equivalents": mean(arm, "cost_equivalents")} for arm in ARMS}
    wins = {split: sum(r["two_levels"][f"hv_{split}"] > r["level1_alone"][f"hv_{split}"] for r in seeds.values())
            for split in ("validation", "test")}
    margins = [r["two_levels"]["best_composite"]["validation"] - r["level1_alone"]["best_composite"]["validation"]
               for r in seeds.values()]
    return {"mean": table, "two_levels_beats_level1_alone_hv": wins, "seeds": len(seeds),
            "best_composite_margin_over_level1": margins,
            "rl_beats_swap_heuristic_composite": [
                r["two_levels"]["best_composite"]["validation"] > r["swaps"]["best_composite"]["validation"]
                for r in seeds.values()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/compositional"), help="build.py's directory")
    p.add_argument("--toy", action="store_true", help="toy budgets (on a build.py --toy directory)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a budget setting (YAML value), e.g. budget=24 or swaps=[[5,2]]")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default experiments/results/compositional_ablation_DATE_COMMIT[_toy].json)")
    p.add_argument("--partial", action="store_true",
                   help="run nothing; report the arms finished so far (label 'partial')")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --toy, where tiny "
                   "models run several times faster on one thread; torch's default otherwise)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; must be the build's (default: the build's)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="must be the build's (default: the build's)")
    args = p.parse_args(argv)
    if (args.device or args.dtype) and (code := refuse_compute(args.device or "cpu", args.dtype or "float32",
                                                                "ablation.py")) is not None:
        return code
    if args.threads or args.toy:
        torch.set_num_threads(args.threads or 1)
    manifest_file = args.work / MANIFEST
    if not manifest_file.is_file():
        p.error(f"no {manifest_file}: run experiments/compositional/build.py{' --toy' if args.toy else ''} "
                f"--work {args.work} first")
    manifest = json.loads(manifest_file.read_text())
    ev = evaluation_of(manifest)
    for key in ("device", "dtype"):
        given = getattr(args, key)
        if given is not None and given != ev[key]:
            p.error(f"--{key} {given}: the build scored its matrix with {key} {ev[key]} ({manifest_file}), and "
                    f"every arm's references must equal it; rescore it with build.py --{key} {given}, or leave "
                    f"--{key} out")
    if not args.partial and (code := refuse_compute(ev["device"], ev["dtype"], "ablation.py")) is not None:
        return code
    s = {**(TOY if args.toy else REAL),
         **{k: manifest["settings"][k] for k in ("validation_examples", "test_examples")}}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in s:
            p.error(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(s)}")
        s[key] = yaml.safe_load(value)
    seed_list = [int(x) for x in args.seeds.split(",")]
    if args.partial:
        seeds = {x: finished_arms(args.work / "ablation", x) for x in seed_list}
        complete = {x: arms for x, arms in seeds.items() if set(arms) == set(ARMS)}
    else:
        seeds = complete = {x: run_seed(manifest, s, x, args.work / "ablation") for x in seed_list}
    result = {"benchmark": "compositional_ablation", "toy": args.toy, "partial": args.partial, "settings": s,
              "score_matrix": manifest["score_matrix"], "build": {k: manifest[k] for k in
                                                                  ("seconds", "date", "commit", "command")},
              "evaluation": ev, "device": manifest.get("device"),
              "per_seed": seeds, "summary": summarise(complete) if complete else None, **provenance(argv)}
    label = "_".join(x for x in ("toy" if args.toy else "", "partial" if args.partial else "") if x) or None
    out = args.out or results_path("compositional_ablation", label)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    for seed, arms in seeds.items():
        for arm, r in arms.items():
            print(f"seed {seed} {arm:<14} HV val {r['hv_validation']:.3f} test {r['hv_test']:.3f}  best composite "
                  f"val {r['best_composite']['validation']:.3f} test {r['best_composite']['test']:.3f}  "
                  f"cost {r['cost_equivalents']:.1f} full evaluations")
    if complete:
        print(f"two levels beat level 1 alone in HV on {result['summary']['two_levels_beats_level1_alone_hv']} of "
              f"{len(complete)} complete seeds")
    print(f"-> {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
