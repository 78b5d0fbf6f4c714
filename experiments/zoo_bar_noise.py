"""How sure a zoo's quality-bar verdict is: a paired bootstrap of its validation examples.

    .venv/bin/python experiments/zoo_bar_noise.py runs/zoo_variants/W96m10-s1 hm3/zoo/shipped/micro \
        --resamples 500 --label wide4

The bar is judged on the first ``eval_examples`` validation examples of each task (200). For each
built zoo this script scores the base, the experts and the bar's chosen TIES merge on those examples
again (the full-sample scores must equal the manifest's: same machine, same weights), then resamples
the examples with replacement, the same draw for every model (the scores are paired), and recomputes
each expert's margin, the share of its gain the merge keeps and the bar's verdict. The spread says how
much of a verdict the choice of 200 examples decides; it leaves out how the weights vary with the seed
(that is what ``zoo_variants.py`` measures) and holds the merge fixed (it was chosen on the same data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import harness
import numpy as np

from hm3.zoo.build import (
    MIN_EXPERT_MARGIN,
    MIN_TIES_GAIN_KEPT,
    MODELS,
    TASK_SEED,
    ZooManifest,
    expert_margin,
    gain_kept,
    load_zoo_states,
    quality_bar,
    ties_state,
)
from objectives.zoo import ZOO_TASKS, zoo_objective

MERGE = "merge"


def outputs_of(directory: Path, manifest: ZooManifest) -> tuple[dict[str, Any], dict[str, dict[str, list[str]]]]:
    """(task -> its scored examples, model -> task -> outputs) for the zoo's models and its bar merge."""
    import torch

    from hm3.eval.evaluate import model_outputs
    from hm3.eval.hf import HFBackend

    torch.set_num_threads(2)
    n = manifest.spec["eval_examples"]
    states = load_zoo_states(directory, manifest)
    best = manifest.ties_best
    states[MERGE] = ties_state(states["base"], [states[t] for t in ZOO_TASKS], best["weights"], best["density"])
    objectives = {t: zoo_objective(t, seed=TASK_SEED) for t in ZOO_TASKS}
    examples = {t: list(o.examples("validation"))[:n] for t, o in objectives.items()}
    backend = HFBackend.from_pretrained(directory / manifest.models["base"], batch_size=n)
    try:
        outputs = {}
        for name, state in states.items():
            backend.load_state(state)
            outputs[name] = {t: model_outputs(backend, objectives[t], examples[t]) for t in ZOO_TASKS}
    finally:
        backend.close()
    return examples, outputs


def require_recorded_scores(directory: Path, found: dict[str, dict[str, float]], recorded: dict[str, dict[str, float]],
                            consequence: str) -> None:
    """Exit unless the scores found here equal the ones ``zoo.json`` records for every model it records: on another
    machine, or with other weights, a measurement would not be of the recorded build (``consequence`` says how)."""
    drift = max(abs(found[m][t] - recorded[m][t]) for m in recorded for t in ZOO_TASKS)
    if drift > 1e-9:
        raise SystemExit(f"{directory}: the scores differ from its zoo.json by up to {drift:.4f} (another machine "
                         f"or other weights): {consequence}")


def bar_of(scores: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, float], bool]:
    """(margins, gains kept, verdict) of one score matrix with the merge's row, by the zoo build's own bar
    (unrounded: :func:`hm3.zoo.build.quality_bar` rounds what it reports)."""
    matrix = {m: scores[m] for m in MODELS}
    margins = {t: expert_margin(matrix, t) for t in ZOO_TASKS}
    kept = {t: gain_kept(matrix, scores[MERGE], t) for t in ZOO_TASKS}
    return margins, kept, quality_bar(matrix, scores[MERGE])["ok"]


def bootstrap(examples, outputs, resamples: int, seed: int) -> dict[str, Any]:
    """Point estimates, the bootstrap's standard errors and how often the bar (and each check) holds."""
    objectives = {t: zoo_objective(t, seed=TASK_SEED) for t in ZOO_TASKS}
    n = {t: len(examples[t]) for t in ZOO_TASKS}
    # accuracy tasks average per-example scores; translation's chrF is a corpus statistic, recomputed per draw
    singles = {t: {m: np.array([objectives[t].aggregate([e], [o]) for e, o in zip(examples[t], outputs[m][t],
                                                                                   strict=True)])
                   for m in outputs} for t in ZOO_TASKS if t != "translation"}

    def scores(draw: dict[str, np.ndarray] | None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {m: {} for m in outputs}
        for t in ZOO_TASKS:
            idx = np.arange(n[t]) if draw is None else draw[t]
            for m in outputs:
                if t in singles:
                    out[m][t] = float(singles[t][m][idx].mean())
                else:
                    out[m][t] = objectives[t].aggregate([examples[t][i] for i in idx], [outputs[m][t][i] for i in idx])
        return out

    full = scores(None)
    margins, kept, ok = bar_of(full)
    rng = np.random.default_rng(seed)
    drawn_margins, drawn_kept, verdicts = [], [], []
    for _ in range(resamples):
        m, k, v = bar_of(scores({t: rng.integers(0, n[t], n[t]) for t in ZOO_TASKS}))
        drawn_margins.append(m)
        drawn_kept.append(k)
        verdicts.append(v)

    def spread(drawn: list[dict[str, float]]) -> dict[str, float]:
        return {t: round(float(np.std([d[t] for d in drawn], ddof=1)), 4) for t in ZOO_TASKS}

    return {
        "scores": full, "bar_met": ok, "margins": margins, "kept": kept,
        "margin_se": spread(drawn_margins), "kept_se": spread(drawn_kept),
        "bar_met_share": float(np.mean(verdicts)),
        "margin_ok_share": {t: float(np.mean([d[t] >= MIN_EXPERT_MARGIN for d in drawn_margins])) for t in ZOO_TASKS},
        "kept_ok_share": {t: float(np.mean([d[t] >= MIN_TIES_GAIN_KEPT for d in drawn_kept])) for t in ZOO_TASKS},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoos", nargs="+", type=Path, help="built zoo directories (each with its zoo.json)")
    p.add_argument("--resamples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    harness.add_out_arguments(p, "zoo_bar_noise")
    args = p.parse_args(argv)
    out = harness.out_path(args, "zoo_bar_noise")
    rows = []
    for directory in args.zoos:
        manifest = ZooManifest.read(directory)
        examples, outputs = outputs_of(directory, manifest)
        found = bootstrap(examples, outputs, args.resamples, args.seed)
        recorded = {**manifest.scores_validation,
                    MERGE: {t: manifest.ties_best[t] for t in ZOO_TASKS}}
        require_recorded_scores(directory, found["scores"], recorded, "the bootstrap would not be of the recorded verdict")
        row = {"zoo": str(directory), "spec_hash": manifest.spec_hash, "seed": manifest.spec["seed"],
               "merge": manifest.ties_best["merge"], "examples": manifest.spec["eval_examples"],
               **{k: v for k, v in found.items() if k != "scores"}}
        rows.append(row)
        fmt = lambda d: " / ".join(f"{d[t]:.2f}" for t in ZOO_TASKS)  # noqa: E731
        print(f"{directory.name}: bar {'met' if row['bar_met'] else 'NOT met'}, holds in "
              f"{row['bar_met_share']:.0%} of {args.resamples} resamples | keeps {fmt(row['kept'])} "
              f"± {fmt(row['kept_se'])} | margins {fmt(row['margins'])} ± {fmt(row['margin_se'])}", flush=True)
        harness.write_results(out, {"benchmark": "zoo_bar_noise", **harness.provenance(argv),
                                    "resamples": args.resamples, "seed": args.seed, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
