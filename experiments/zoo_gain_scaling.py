"""How much of an expert's gain its task vector keeps when scaled down: the quality bar's headroom.

    .venv/bin/python experiments/zoo_gain_scaling.py hm3/zoo/shipped/micro runs/zoo_variants/W96m10-s1 \
        --scales 0.25,0.4,0.55,0.7

The bar asks the best merge of its TIES grid (per-expert weights 0.25-0.55) to keep at least half of
every expert's gain over the base. This script scores, for each built zoo and each task, the base
plus the task's own expert alone at each scale α (θ = θ_base + α·τ, the bar's own TIES with one
model), on the validation examples the bar is judged on. The lone expert at the weight the bar's
merge gives it is what that merge would keep with no other expert to interfere; the merge's own
share (from ``zoo.json``) set beside it separates the two reasons a merge keeps little: a gain that
grows only in proportion to α, and the other experts' interference. The base's and the experts'
full-sample scores must equal the manifest's (same machine, same weights).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import harness
from zoo_bar_noise import require_recorded_scores

from hm3.zoo.build import TIES_WEIGHTS, ZooManifest, gain_kept, load_zoo_states, score_models, ties_state
from objectives.zoo import ZOO_TASKS


def lone_expert_kept(directory: Path, manifest: ZooManifest, scales: list[float]) -> dict[str, dict[str, float]]:
    """task -> scale -> the share of its expert's gain that base + scale·τ keeps, on validation."""
    import torch

    from hm3.eval.hf import HFBackend

    torch.set_num_threads(2)
    n = manifest.spec["eval_examples"]
    states = load_zoo_states(directory, manifest)
    backend = HFBackend.from_pretrained(directory / manifest.models["base"], batch_size=n)
    try:
        found = score_models(backend, states, "validation", n)
        require_recorded_scores(directory, found, manifest.scores_validation,
                                "the shares would not be of the recorded build")
        kept: dict[str, dict[str, float]] = {}
        for task in ZOO_TASKS:
            scaled = {f"{a}": ties_state(states["base"], [states[task]], [a], 1.0) for a in scales}
            scores = score_models(backend, scaled, "validation", n)
            kept[task] = {f"{a}": round(gain_kept(found, scores[f"{a}"], task), 4) for a in scales}
    finally:
        backend.close()
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoos", nargs="+", type=Path, help="built zoo directories (each with its zoo.json)")
    p.add_argument("--scales", default=",".join(map(str, (*TIES_WEIGHTS, 0.7))),
                   help="comma-separated scales α of each task vector (default: the bar's weights and 0.7)")
    harness.add_out_arguments(p, "zoo_gain_scaling")
    args = p.parse_args(argv)
    out = harness.out_path(args, "zoo_gain_scaling")
    scales = sorted({float(s) for s in args.scales.split(",")} | set(TIES_WEIGHTS))
    rows: list[dict[str, Any]] = []
    for directory in args.zoos:
        manifest = ZooManifest.read(directory)
        kept = lone_expert_kept(directory, manifest, scales)
        weights = dict(zip(ZOO_TASKS, manifest.ties_best["weights"], strict=True))
        merge_kept = manifest.quality_bar["checks"]
        row = {"zoo": str(directory), "spec_hash": manifest.spec_hash, "seed": manifest.spec["seed"],
               "bar_met": manifest.quality_bar["ok"], "lone_kept": kept, "merge_weights": weights,
               "lone_kept_at_merge_weight": {t: kept[t][f"{weights[t]}"] for t in ZOO_TASKS},
               "merge_kept": {t: merge_kept[t]["ties_gain_kept"] for t in ZOO_TASKS}}
        rows.append(row)
        fmt = lambda d: " / ".join(f"{d[t]:.2f}" for t in ZOO_TASKS)  # noqa: E731
        print(f"{directory.name}: lone expert at the merge's weight keeps {fmt(row['lone_kept_at_merge_weight'])}; "
              f"the merge keeps {fmt(row['merge_kept'])}", flush=True)
        harness.write_results(out, {"benchmark": "zoo_gain_scaling", **harness.provenance(argv),
                                    "scales": scales, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
