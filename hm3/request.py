"""Preference requests: ``hm3 request RUN_DIR --prefer math=0.6,code=0.4 OUT_DIR [--budget N]``.

How a request is answered, and why:

* **Budget 0** (no evaluation, seconds): the candidates are the finished run's front points (their
  stored validation scores are the prediction) and the pretrained policy's greedy path for λ over
  the experts + the level-1 merge chosen for λ (HM3's Tchebycheff choice). The path's prediction
  is what the run store already knows of it: the count-weighted mean of every validation score
  stored for it (its whole-validation score, if level 2 kept it, dominates by count; else the
  subsets of its training episodes); a path the store has never seen has no prediction and is not chosen over a predicted point. The answer maximises
  the preference-weighted normalised score ``Σ_k λ_k f̂_k`` -- the reward level 2 was trained on,
  without the length penalty. The store is opened read-only: nothing is evaluated or written there.
  The level-1 BO posterior adds one more option: the merge its GPs predict best for λ, compared by
  the lower confidence bound of its predicted score (:func:`posterior_option`).
* **Budget N > 0**: the pretrained policy is fine-tuned online for N episodes with λ fixed (the
  same machinery as the run's online stage); its greedy and best paths are then scored on the
  whole validation plan (those 1-2 extra evaluations are reported beside the budget) and compete
  with the front points on measured scores.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.arch.level2 import PATH_KIND, build_trainer, merge_for_preference, path_recipe
from hm3.arch.path import LayerPath
from hm3.arch.rl_config import Level2Config
from hm3.atomic import atomic_write_text
from hm3.errors import ConfigError
from hm3.pipeline import POLICY_FILE, path_point_file, read_front, stored_two_level_config
from hm3.search.level1 import recipe_with_paths
from hm3.search.pareto import normalise
from hm3.search.posterior import POSTERIOR_FILE, posterior_option
from hm3.store import RunStore, content_hash

_ITEM = re.compile(r"^\s*([^=\s]+)\s*=\s*([^=\s]+)\s*$")


def short_name(objective: str) -> str:
    """``zoo:math`` -> ``math``; ``gsm8k:/data/x.jsonl`` -> ``gsm8k``: what a user types in --prefer."""
    prefix, _, rest = objective.partition(":")
    return rest if prefix == "zoo" and rest else prefix


def parse_preference(text: str, objectives: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``math=0.6,code=0.4`` -> λ over ``objectives`` (full or short names) and notes on what was assumed.

    Refused: unknown names, repeated names, non-numbers, negative weights, all-zero weights.
    Missing objectives get 0; weights not summing to 1 are normalised (both said in the notes).
    """
    lookup: dict[str, int] = {}
    for i, name in enumerate(objectives):
        lookup[name] = i
        lookup.setdefault(short_name(name), i)
    known = ", ".join(dict.fromkeys(short_name(o) for o in objectives))
    lam = np.zeros(len(objectives))
    seen: set[int] = set()
    notes: list[str] = []
    items = [s for s in text.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"--prefer is empty; give weights like {known.split(', ')[0]}=1 (objectives: {known})")
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(f"--prefer: cannot read {item.strip()!r}; expected NAME=WEIGHT (objectives: {known})")
        name, value = m.groups()
        if name not in lookup:
            raise ConfigError(f"--prefer: unknown objective {name!r}; this run's objectives are: {known}")
        try:
            weight = float(value)
        except ValueError:
            raise ConfigError(f"--prefer: weight of {name!r} is not a number: {value!r}") from None
        if not np.isfinite(weight) or weight < 0:
            raise ConfigError(f"--prefer: weight of {name!r} must be a non-negative number, got {value}")
        i = lookup[name]
        if i in seen:
            raise ConfigError(f"--prefer: objective {name!r} is given twice")
        seen.add(i)
        lam[i] = weight
    total = lam.sum()
    if total <= 0:
        raise ConfigError("--prefer: all weights are zero; at least one objective needs a positive weight")
    missing = [short_name(objectives[i]) for i in range(len(objectives)) if i not in seen]
    if missing:
        notes.append(f"weight 0 assumed for {', '.join(missing)}")
    if abs(total - 1.0) > 1e-6:
        notes.append(f"weights summed to {total:g}; normalised to sum to 1")
    return lam / total, notes


@dataclass
class RequestAnswer:
    lam: np.ndarray
    source: str  # "front point N (level L)" or "policy path ..."
    kind: str  # "merge" or "path"
    predicted: np.ndarray | None  # raw validation scores, per objective
    measured: np.ndarray | None
    out_dir: Path
    evaluations: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def _weighted(lam: np.ndarray, raw: np.ndarray, base: np.ndarray, ideal: np.ndarray) -> float:
    return float(np.dot(lam, normalise(np.asarray(raw, dtype=float)[None], base, ideal)[0]))


def _stored_prediction(store: RunStore, recipe: dict[str, Any], objectives: Sequence[str]) -> np.ndarray | None:
    """Validation scores the store holds for a candidate recipe (none are computed here)."""
    match = store.find_candidate(recipe)
    if match is None or match.kind != PATH_KIND:
        return None
    evals = store.evaluations(match.id)
    out = []
    for obj in objectives:
        rows = [e for e in evals if e.objective == obj and e.split == "validation"]
        if not rows:
            return None
        out.append(sum(e.score * e.count for e in rows) / sum(e.count for e in rows))
    return np.array(out)


def load_policy(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "level2" / POLICY_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no pretrained policy ({path} missing); finish the run with hm3 run --resume")
    return torch.load(path, weights_only=False)


def greedy_path(saved: dict[str, Any], lam: np.ndarray) -> LayerPath:
    """The pretrained policy's deterministic path for λ (its env has no scorer: nothing is evaluated)."""

    def no_evaluation(_path: LayerPath) -> np.ndarray:
        raise RuntimeError("a budget-0 request must not evaluate anything")

    trainer = build_trainer(
        pool_size=saved["pool_size"], num_layers=saved["num_layers"], n_objectives=len(saved["objectives"]),
        layer_features=saved["layer_features"], config=Level2Config.model_validate(saved["config"]),
        scorer=no_evaluation, lam=lam, seed=0, policy_state=saved["policy"],
    )
    return trainer.greedy_path(lam)


def answer_request(
    run_dir: str | Path, prefer: str, out_dir: str | Path, *, budget: int = 0, overwrite: bool = False,
    progress: bool = True,
) -> RequestAnswer:
    from hm3.materialise import write_merge, write_path

    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if budget < 0:
        raise ConfigError(f"--budget must be >= 0, got {budget}")
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output directory already exists: {out_dir} (use --overwrite to replace it)")
    front, summary = read_front(run_dir)
    names = summary["objectives"]
    lam, notes = parse_preference(prefer, names)
    base, ideal = np.array(summary["base_validation"]), np.array(summary["ideal_validation"])
    saved = load_policy(run_dir)
    frame_front = {int(c): np.array(v) for c, v in saved["frame_front"].items()}
    frame = merge_for_preference(lam, frame_front) if frame_front else "base"

    with RunStore.open(run_dir, readonly=True) as store:
        cfg = stored_two_level_config(store)
        options: list[tuple[float, str, str, np.ndarray, Any]] = []
        for _, row in front.iterrows():
            raw = np.array([row[f"{n}_val"] for n in names])
            cid = int(row["point"])
            options.append((_weighted(lam, raw, base, ideal), f"front point {cid} (level {row['level']})",
                            row["kind"], raw, cid))
        evaluations = 0
        if budget == 0:
            path = greedy_path(saved, lam)
            recipe = path_recipe(path, frame, saved["expert_refs"])
            predicted = _stored_prediction(store, recipe, names) if path.hops else None
            if predicted is not None:
                options.append((_weighted(lam, predicted, base, ideal), f"policy path ({len(path.hops)} hops)",
                                PATH_KIND, predicted, recipe))
            else:
                notes.append(f"the policy's greedy path for this λ ({len(path.hops)} hops) was never evaluated, "
                             "so it has no prediction; answered from the front")
            posterior_file = run_dir / "level1" / POSTERIOR_FILE
            posterior = torch.load(posterior_file, weights_only=False) if posterior_file.is_file() else None
            proposal = posterior_option(posterior, cfg.level1.search_space, lam, base, ideal)
            if proposal is not None:
                bound, recipe, predicted = proposal
                options.append((bound, "level-1 BO posterior proposal (unevaluated merge)", "merge", predicted,
                                recipe))
            score, source, kind, raw, what = max(options, key=lambda o: o[0])
            stored = store.candidate(what)[1] if isinstance(what, int) else what
    measured = None
    if budget > 0:
        score, source, kind, raw, stored, measured, evaluations = _fine_tune(
            cfg, run_dir, saved, lam, frame, budget, options, base, ideal, progress
        )
    if kind == "merge":
        write_merge(recipe_with_paths(stored, cfg.level1.models), out_dir, overwrite=overwrite)
    else:
        with RunStore.open(run_dir, readonly=True) as store:
            point = path_point_file(stored, store, cfg.level1)
        write_path(point, out_dir, overwrite=overwrite)
        atomic_write_text(out_dir / "hm3_request.json", json.dumps({"lam": lam.tolist(), "source": source}, indent=2))
    return RequestAnswer(
        lam=lam, source=source, kind=kind, predicted=None if measured is not None else raw, measured=measured,
        out_dir=out_dir, evaluations=evaluations, seconds=time.perf_counter() - start, notes=notes,
        details={"weighted_normalised_score": score, "frame": frame, "objectives": names},
    )


def _fine_tune(cfg, run_dir: Path, saved: dict[str, Any], lam: np.ndarray, frame, budget: int,
               options: list, base: np.ndarray, ideal: np.ndarray, progress: bool):
    """Online fine-tuning for ``budget`` episodes; measured whole-validation scores of its paths."""
    from hm3.search.level1 import Level1Context, stderr_logger

    log = stderr_logger(progress)
    rl = cfg.level2.rl
    k = len(saved["objectives"])
    with RunStore.open(run_dir) as store:
        ctx = Level1Context(cfg.level1, store, log=log)
        try:
            return _tune_and_measure(ctx, store, saved, lam, frame, budget, options, base, ideal, rl, k, log)
        finally:
            ctx.backend.close()


def _tune_and_measure(ctx, store: RunStore, saved: dict[str, Any], lam: np.ndarray, frame, budget: int,
                      options: list, base: np.ndarray, ideal: np.ndarray, rl, k: int, log):
    """Fine-tune from the pretrained policy for ``budget`` episodes, then measure its paths in full."""
    from hm3.arch.level2 import PathEvaluator, PoolSet

    pools = PoolSet(ctx)
    t_max = rl.resolved_t_max(pools.num_layers) if rl.mode == "hm3" else None
    seed = int(content_hash({"lam": lam.round(6).tolist(), "budget": budget})[:8], 16)
    ev = PathEvaluator(ctx, pools, base=base, ideal=ideal, dar=rl.dar, data_scale=rl.data_scale, seed=seed,
                       t_max=t_max)
    trainer = build_trainer(
        pool_size=pools.size, num_layers=pools.num_layers, n_objectives=k, layer_features=saved["layer_features"],
        config=rl, scorer=ev.scorer_for(lambda: frame), lam=lam, seed=seed, policy_state=saved["policy"],
    )
    log(f"fine-tuning the pretrained policy for λ={np.round(lam, 3).tolist()} ({budget} episodes)")
    trainer.train(budget)
    evaluations = budget
    paths = {trainer.greedy_path(lam)} | ({trainer.best[1]} if trainer.best is not None else set())
    paths = {p for p in paths if p.hops}  # RMM's greedy rollout may back out: no path
    measured_options = []
    for path in paths:
        before = ctx.scorer.evaluated_examples
        raw = ev.raw_scores(path, frame, ctx.validation)
        evaluations += int(ctx.scorer.evaluated_examples > before)
        recipe = path_recipe(path, frame, pools.expert_refs)
        measured_options.append((_weighted(lam, raw, base, ideal), f"fine-tuned path ({len(path.hops)} hops)",
                                 PATH_KIND, raw, recipe))
    ctx.restore_live_model()
    best = max([*options, *measured_options], key=lambda o: o[0])
    score, source, kind, raw, what = best
    stored = store.candidate(what)[1] if isinstance(what, int) else what
    store.add_event("request", {"lam": lam.tolist(), "budget": budget, "answer": source, "score": score})
    return score, source, kind, raw, stored, raw, evaluations
