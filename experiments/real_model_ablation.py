"""Two levels against level 1 alone at equal cost, on SmolLM2: the HM3 ablation on a real model.

``bench_two_level.py`` runs this ablation on the tiny zoo, where 2-layer models leave layer
recombination almost nothing to find. This script tabulates the same comparison for runs of
``real_model_run.py`` on SmolLM2-135M (30 layers), made per seed as:

1. the two-level run, e.g. ``real_model_run.py --seed S --offline-episodes 48 --online-episodes 16
   --rl path_prior=frame-order --rl epsilon=0.05 --level2 keep_best=3 --name prior-long-keep3
   --out TWO_S.json``; its JSON reports ``cost``: the validation examples it scored, by candidate
   kind, in full-evaluation equivalents (every objective on every validation example);
2. level 1 alone, ``real_model_run.py --level1-only --seed S --budget B --out ONE_S.json``, with B =
   the two-level run's level-1 evaluations plus its level-2 (path) full-evaluation equivalents,
   rounded: the same total evaluation budget, as the issue's zoo protocol counts it.

It checks that each pair matches (seed, models, objectives, evaluation plan; the level-1 budget
equals the two-level run's cost) and refuses a pair that does not, then prints and saves (JSON) HV on
validation and on test per seed and their means, and the wall seconds each arm spent scoring on
validation (paths score small DAR subsets, which costs more per example than a full evaluation).
HV is the runs' own (normalised by the base and the best expert per task; pymoo).

    .venv/bin/python experiments/real_model_ablation.py --pairs TWO_0.json:ONE_0.json,TWO_1.json:ONE_1.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import harness

#: settings that must be equal between the two arms of a pair
SHARED = ("models", "objectives", "search_space", "evaluation", "seed")


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read a real_model_run.py result ({e})") from e
    if data.get("benchmark") != "real_model_run" or "cost" not in data:
        raise SystemExit(f"{path}: not a real_model_run.py result with a 'cost' section (re-run it with this version)")
    return data


def pair_row(two_path: Path, one_path: Path) -> dict[str, Any]:
    """One seed's comparison; refuses files that are not a matching (two-level, level-1-alone) pair."""
    two, one = _load(two_path), _load(one_path)
    if "level2" not in two["config"] or "level2" in one["config"]:
        raise SystemExit(f"{two_path}:{one_path}: expected a two-level run, then a level-1-only run")
    for key in SHARED:
        if two["config"][key] != one["config"][key]:
            raise SystemExit(f"{two_path}:{one_path}: the arms differ in config[{key!r}]")
    level1 = two["cost"].get("merge", {}).get("evaluations", 0) // len(two["config"]["objectives"])
    equivalents = two["cost"].get("path", {}).get("full_evaluation_equivalents", 0.0)
    budget = one["config"]["optimizer"]["budget"]
    if budget != level1 + round(equivalents):
        raise SystemExit(f"{one_path}: level-1 budget {budget}, but the two-level run cost {level1} merges + "
                         f"{equivalents} path equivalents = {level1 + round(equivalents)}")

    def seconds(data: dict[str, Any]) -> float:
        return round(sum(v["seconds"] for k, v in data["cost"].items() if k != "reference"), 1)

    return {
        "seed": two["config"]["seed"],
        "files": [str(two_path), str(one_path)],
        "level1_budget_alone": budget,
        "two_level": {"level1_evaluations": level1, "path_equivalents": equivalents,
                      "front_levels": two["summary"].get("front_levels")},
        "hv_validation": {"level1_alone": one["summary"]["hv_validation"], "both": two["summary"]["hv_validation"],
                          "both_level1_part": two["summary"].get("hv_validation_level1"),
                          "both_level2_part": two["summary"].get("hv_validation_level2")},
        "hv_test_front": {"level1_alone": one["summary"]["hv_test_front"], "both": two["summary"]["hv_test_front"]},
        "validation_seconds": {"level1_alone": seconds(one), "both": seconds(two)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", required=True, help="TWO.json:ONE.json[,TWO.json:ONE.json...], one pair per seed")
    harness.add_out_arguments(p, "real_model_ablation")
    args = p.parse_args(argv)
    pairs = [item.split(":") for item in args.pairs.split(",")]
    if any(len(x) != 2 for x in pairs):
        p.error("--pairs: expected TWO.json:ONE.json items separated by commas")
    rows = [pair_row(Path(a), Path(b)) for a, b in pairs]

    def mean(split: str, arm: str) -> float:
        return statistics.fmean(r[split][arm] for r in rows)

    summary = {split: {arm: mean(split, arm) for arm in ("level1_alone", "both")}
               for split in ("hv_validation", "hv_test_front")}
    summary["both_beats_level1_alone_validation"] = summary["hv_validation"]["both"] > summary["hv_validation"][
        "level1_alone"]
    summary["seeds_where_both_wins_validation"] = sum(
        r["hv_validation"]["both"] > r["hv_validation"]["level1_alone"] for r in rows)
    result = {"benchmark": "real_model_ablation", **harness.provenance(argv), "rows": rows, "summary": summary}
    print(f"{'seed':>4} {'L1 budget':>9} {'HV val: L1 alone':>17} {'both':>6} {'(L1 / L2 part)':>15} "
          f"{'HV test: L1 alone':>18} {'both':>6} {'val s: L1 alone':>16} {'both':>6}")
    for r in rows:
        hv, ht, vs = r["hv_validation"], r["hv_test_front"], r["validation_seconds"]
        print(f"{r['seed']:>4} {r['level1_budget_alone']:>9} {hv['level1_alone']:>17.3f} {hv['both']:>6.3f} "
              f"{hv['both_level1_part']:>7.3f} / {hv['both_level2_part']:.3f} {ht['level1_alone']:>18.3f} "
              f"{ht['both']:>6.3f} {vs['level1_alone']:>16.0f} {vs['both']:>6.0f}")
    print(f"mean: HV validation {summary['hv_validation']['level1_alone']:.3f} alone vs "
          f"{summary['hv_validation']['both']:.3f} both; test {summary['hv_test_front']['level1_alone']:.3f} vs "
          f"{summary['hv_test_front']['both']:.3f}; both wins on validation in "
          f"{summary['seeds_where_both_wins_validation']} of {len(rows)} seeds")
    out = harness.write_results(harness.out_path(args, "real_model_ablation"), result)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
