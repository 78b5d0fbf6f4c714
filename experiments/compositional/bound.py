"""Could any swap have met the targets? Every structured swap of a grid, framed by the level-1 merges.

The issue's fallback when two levels miss the targets: a bound over the structured family. For a
finished two-level arm of ``ablation.py`` (``--work``/ablation/seed-S/two_levels), every layer swap
``layer_swap(frame, donor, k₁, k₂, switch_scale=w)`` (:mod:`hm3.arch.swaps`) is scored on the run's
whole validation plan: each level-1 front merge as the frame (``--frames front``; ``best`` takes only
the merge with the best composite score), each expert as donor, every (k₁, k₂) of ``--k-bottom`` ×
``--k-top`` that fits, and each transition scale of ``--scales`` (plus none). Reported: the union HV
of level 1 and all swaps, how many swaps reach the union front, the best composite score among the
swaps against the level-1 merges' best (the +0.05 target) and the number of full evaluations.

The run is copied first (``experiments/level2_ceiling.py``'s :func:`finished_run`), so its own cost
accounting is untouched; scores go through hm3's store, so an interrupted bound resumes. The swaps are
scored where the run scored its merges: its stored ``evaluation`` (device, dtype, batch size).
``--device``/``--dtype`` only confirm it (one that differs is refused: the swaps would be compared with
merges measured otherwise), and ``--device cuda`` where torch finds no GPU is refused before any work.

Commands (after ``ablation.py``)::

    python experiments/compositional/bound.py --toy --work runs/compositional-toy --seed 0
    python experiments/compositional/bound.py --work runs/compositional --seed 0 --frames best \\
        --out experiments/results/compositional_bound_s0.json

CPU cost, an estimate: with the defaults (k₁ ∈ {0, 2, 4, 6, 8, 10, 12}, k₂ ∈ {0, 1, 2, 4, 6}, 2
donors, scales none/0.8/1.25, one frame) ~200 full evaluations of ~1 min each (measured per-example
cost in ``ablation.py``'s docstring): ~3.5 h per seed on an idle 2-core machine. On one GPU, **an
estimate** by the ~10x of ``build.py``'s docstring (not measured): ~15-20 min per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # build.py (which adds experiments/ for the rest)

from build import DTYPES, provenance, refuse_compute  # noqa: E402
from level2_ceiling import finished_run  # noqa: E402

from hm3.arch.level2 import PathEvaluator  # noqa: E402
from hm3.arch.swaps import layer_swap  # noqa: E402
from hm3.atomic import atomic_write_text  # noqa: E402
from hm3.search.pareto import non_dominated, protocol_hypervolume  # noqa: E402


def swap_bound(run_dir: Path, work: Path, *, k_bottom: list[int], k_top: list[int], scales: list[float],
               frames: str = "best") -> dict[str, Any]:
    """Score every swap of the grid on the whole validation plan (module docstring)."""
    start = time.perf_counter()
    with finished_run(run_dir, work) as (run, scores, base, ideal):
        ids = list(scores)
        y1 = np.stack([scores[i] for i in ids])
        front = [ids[i] for i in non_dominated(y1)]
        if frames == "best":  # the merge with the best composite score (objective 0)
            front = [max(front, key=lambda c: scores[c][0])]
        layout = run.session.pool_layout()
        layers = layout.num_layers
        evaluator = PathEvaluator(run.session, base=base, ideal=ideal, dar=False, data_scale=1.0, seed=0,
                                  t_max=layers)
        rows = []
        for frame in front:
            for donor in range(layout.size - 1):
                for kb in k_bottom:
                    for kt in (k for k in k_top if kb + k <= layers and kb + k > 0):
                        for w in [None, *scales]:
                            path = layer_swap(layers, layout.size - 1, donor, kb, kt, switch_scale=w)
                            y = evaluator.raw_scores(path, frame, run.session.validation)
                            rows.append({"frame": frame, "donor": layout.experts[donor], "k_bottom": kb,
                                         "k_top": kt, "switch_scale": w, "validation": y.tolist()})
        ys = np.array([r["validation"] for r in rows]).reshape(-1, len(base))
        union = np.concatenate([y1, ys])
        nd = non_dominated(union)
        best = max(rows, key=lambda r: r["validation"][0]) if rows else None
    return {
        "run": str(run_dir), "frames": front, "swaps": rows, "path_evaluations": len(rows),
        "hv_level1": protocol_hypervolume(y1, base, ideal), "hv_union": protocol_hypervolume(union, base, ideal),
        "union_front_swaps": int((nd >= len(y1)).sum()),
        "best_composite_level1": float(y1[:, 0].max()), "best_composite_swap": best,
        "seconds": round(time.perf_counter() - start, 1),
    }


def stored_evaluation(run_dir: Path) -> dict[str, Any]:
    """The finished run's evaluation settings (device, dtype, batch size, ...), as its store holds them."""
    from hm3.run.config import stored_two_level_config
    from hm3.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        return stored_two_level_config(store).level1.evaluation.model_dump()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/compositional"), help="build.py's directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="a grid that fits the toy's 4 layers")
    p.add_argument("--k-bottom", default=None, help="comma-separated k₁ (default 0,2,4,6,8,10,12; toy 0,1,2)")
    p.add_argument("--k-top", default=None, help="comma-separated k₂ (default 0,1,2,4,6; toy 0,1)")
    p.add_argument("--scales", default="0.8,1.25", help="transition scales tried besides none ('' for none)")
    p.add_argument("--frames", choices=("best", "front"), default="best")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N; must be the run's (default: the run's)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="must be the run's (default: the run's)")
    args = p.parse_args(argv)
    if (args.device or args.dtype) and (code := refuse_compute(args.device or "cpu", args.dtype or "float32",
                                                                "bound.py")) is not None:
        return code
    if args.threads or args.toy:
        torch.set_num_threads(args.threads or 1)
    run_dir = args.work / "ablation" / f"seed-{args.seed}" / "two_levels"
    if not (run_dir / "summary.json").is_file():
        p.error(f"no finished two-level arm at {run_dir}: run ablation.py first")
    ev = stored_evaluation(run_dir)
    for key in ("device", "dtype"):
        given = getattr(args, key)
        if given is not None and given != ev[key]:
            p.error(f"--{key} {given}: {run_dir} evaluated with {key} {ev[key]}, and the swaps are compared with its "
                    f"merges; leave --{key} out")
    if (code := refuse_compute(ev["device"], ev["dtype"], "bound.py")) is not None:
        return code
    result = swap_bound(run_dir, args.work / "bound" / f"seed-{args.seed}",
                        k_bottom=_ints(args.k_bottom or ("0,1,2" if args.toy else "0,2,4,6,8,10,12")),
                        k_top=_ints(args.k_top or ("0,1" if args.toy else "0,1,2,4,6")),
                        scales=[float(x) for x in args.scales.split(",") if x], frames=args.frames)
    result.update(evaluation={k: ev[k] for k in ("device", "dtype", "batch_size")}, **provenance(argv))
    out = args.out or Path(f"experiments/results/compositional_bound{'_toy' if args.toy else ''}_s{args.seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    best = result["best_composite_swap"]
    print(f"{result['path_evaluations']} swaps: union HV {result['hv_union']:.4f} vs level 1 {result['hv_level1']:.4f}, "
          f"{result['union_front_swaps']} swaps on the union front; best composite: swaps "
          f"{best['validation'][0] if best else float('nan'):.3f} vs level 1 {result['best_composite_level1']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
