"""Preference requests: ``hm3 request RUN_DIR --prefer math=0.6,code=0.4 OUT_DIR [--budget N]``.

How a request is answered, and why:

* **Budget 0** (no evaluation, seconds): the candidates are the finished run's front points (their
  stored validation scores are the prediction) and the pretrained policy's greedy path for λ over
  the experts + the level-1 merge chosen for λ (HM3's Tchebycheff choice). The path's prediction
  is what the run store already knows of it: the count-weighted mean of every validation score
  stored for it (its whole-validation score, if level 2 kept it, dominates by count; else the
  subsets of its training episodes), and it competes by that mean minus one standard error for
  the examples behind it (:mod:`hm3.search.estimates`), so a path seen on a few DAR subsets (a
  handful of examples per task, whose plain mean can be far above what the path scores on the
  whole plan) does not win by luck; a path the store has never seen has no prediction and is not
  chosen. The answer maximises the preference-weighted normalised score
  ``Σ_k λ_k f̂_k`` -- the reward level 2 was trained on, without the length penalty. The store is
  opened read-only: nothing is evaluated or written there. The level-1 BO posterior adds one more
  option: the merge its GPs predict best for λ, compared by the lower confidence bound of its
  predicted score (:func:`posterior_option`).
* **Budget N > 0**: the pretrained policy is fine-tuned online for N episodes with λ fixed (the
  same machinery as the run's online stage); its greedy and best paths are then scored on the
  whole validation plan (those 1-2 extra evaluations are reported beside the budget) and compete
  with the front points on measured scores.
* **Refine M > 0** (``--refine M``): M whole-plan evaluations of λ-scalarised BO over the run's
  merge space (``df-merge``'s GP + log-EI on ``Σ_k λ_k f̂_k``), its GP warm-started with every merge
  the run (and earlier refinements) evaluated, so no initial design is spent. Why: a budget-0 answer
  is only as good as the run's front near λ, and a search focused on one λ beats a front spread
  over all of them (``docs/BENCHMARKS.md``); a few focused evaluations close most of that gap.
  Refinements are stored as ``request_merge`` events, never as level-1 evaluations, so a resumed
  run replays exactly its own history.
* **A level-1 search** (``hm3 search param``) answers requests too, from its front and its BO
  posterior, and ``--refine`` works on it as above; ``--budget N > 0`` is refused, since it has no
  level-2 policy. Why: in the equal-cost comparisons of ``docs/BENCHMARKS.md``, level 1 alone with
  the whole budget gave the better front, so a user may well hold only a level-1 run.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.arch.level2 import PATH_KIND, FrameKey, build_trainer, merge_for_preference, path_recipe
from hm3.arch.path import LayerPath
from hm3.arch.rl_config import Level2Config
from hm3.atomic import atomic_write_text
from hm3.errors import ConfigError, RunFileError
from hm3.pipeline import POLICY_STEM, path_point_file, read_front_rows, stored_two_level_config
from hm3.runfiles import find_state, read_front_table, read_state, read_summary
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.level1 import protocol_points, recipe_with_paths
from hm3.search.pareto import normalise, weighted_normalised
from hm3.search.posterior import load_posterior, posterior_option
from hm3.search.run_config import RunConfig, parse_run_config
from hm3.store import STORE_FILE, RunStore, content_hash

REFINE_EVENT = "request_merge"
REQUEST_RECORD = "hm3_request.json"  # written into OUT_DIR beside the model
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
    if lam.max() <= 0:
        raise ConfigError("--prefer: all weights are zero; at least one objective needs a positive weight")
    # scaled by the largest weight first: the sum of huge weights (1e308 + 1e308) overflows to inf,
    # and dividing by it would give λ = 0
    scaled = lam / lam.max()
    with np.errstate(over="ignore"):
        total = float(lam.sum())  # inf when it overflows: said so, never used to divide
    missing = [short_name(objectives[i]) for i in range(len(objectives)) if i not in seen]
    if missing:
        notes.append(f"weight 0 assumed for {', '.join(missing)}")
    if not math.isfinite(total) or abs(total - 1.0) > 1e-6:
        summed = f"{total:g}" if math.isfinite(total) else "more than the largest float"
        notes.append(f"weights summed to {summed}; normalised to sum to 1")
    return scaled / scaled.sum(), notes


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


@dataclass(frozen=True)
class FinishedRun:
    """What a request reads from a finished run, whichever command made it: a two-level ``hm3 run``
    (front of merges and paths, a pretrained policy) or a level-1 ``hm3 search param`` (merges only;
    answered from its front and BO posterior, refined with ``--refine``, never fine-tuned)."""

    names: list[str]
    base: np.ndarray  # validation scores of the HV protocol's 0 and 1
    ideal: np.ndarray
    front: list[tuple[int, str, str, np.ndarray]]  # (candidate id, level, kind, raw validation scores)
    level1: RunConfig
    level1_dir: Path  # where level 1's outputs are (its posterior)
    policy: dict[str, Any] | None  # the pretrained level-2 policy; None for a level-1 search
    rl: Level2Config | None


def read_finished_run(run_dir: Path) -> FinishedRun:
    """:class:`FinishedRun` of ``run_dir``; refuses unfinished runs and other formats, naming what is
    missing and how to finish them."""
    if (run_dir / STORE_FILE).is_file():
        with RunStore.open(run_dir, readonly=True) as store:
            stored = store.config() or {}
        if "level2" not in stored and "search_space" in stored:
            return _read_level1_search(run_dir, stored)
    front, summary = read_front_rows(run_dir)
    names = summary["objectives"]
    with RunStore.open(run_dir, readonly=True) as store:
        cfg = stored_two_level_config(store)
    return FinishedRun(
        names=names, base=np.array(summary["base_validation"]), ideal=np.array(summary["ideal_validation"]),
        front=[(int(r["point"]), r["level"], r["kind"], np.array([float(r[f"{n}_val"]) for n in names]))
               for r in front],
        level1=cfg.level1, level1_dir=run_dir / "level1", policy=load_policy(run_dir), rl=cfg.level2.rl,
    )


def _read_level1_search(run_dir: Path, stored: dict[str, Any]) -> FinishedRun:
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file() or not (run_dir / "front.csv").is_file():
        raise ConfigError(f"{run_dir} holds an unfinished level-1 search (summary.json or front.csv missing); "
                          f"finish it with: hm3 search param CONFIG.yml {run_dir} --resume")
    rewrite = (f"'hm3 search param CONFIG.yml {run_dir} --resume' writes the search's outputs again from its "
               "store (nothing is evaluated twice)")
    summary = read_summary(summary_file, keys=("objectives", "reference_validation", "front_size"),
                           regenerate=rewrite)
    cfg = parse_run_config(stored, source=f"{run_dir / STORE_FILE} (stored config)")
    refs = {name: np.array(v, dtype=float) for name, v in summary["reference_validation"].items()}
    base, ideal = protocol_points(refs, cfg.search_space)
    names = summary["objectives"]
    rows = read_front_table(run_dir / "front.csv", rows=int(summary["front_size"]), id_column="candidate",
                            regenerate=rewrite, columns=tuple(f"{n}_val" for n in names))
    front = [(int(r["candidate"]), r["level"], "merge", np.array([float(r[f"{n}_val"]) for n in names]))
             for r in rows]
    return FinishedRun(names=names, base=base, ideal=ideal, front=front, level1=cfg, level1_dir=run_dir, policy=None,
                       rl=None)


POLICY_KEYS = ("policy", "config", "pool_size", "num_layers", "objectives", "frame_front", "layer_features",
               "expert_refs")


def load_policy(run_dir: Path) -> dict[str, Any]:
    """The run's pretrained level-2 policy (a state file: reading it runs no code; an older run's
    ``policy.pt`` is read with torch's restricted unpickler or refused)."""
    path = find_state(run_dir / "level2" / POLICY_STEM)
    if path is None:
        raise ConfigError(f"{run_dir}: no pretrained policy ({run_dir / 'level2' / POLICY_STEM}.safetensors "
                          "missing); finish the run with hm3 run --resume")
    regenerate = f"delete {path} and run 'hm3 run CONFIG {run_dir} --resume' to write it again"
    saved = read_state(path, regenerate=regenerate)
    missing = [k for k in POLICY_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise RunFileError(f"{path}: not a level-2 policy (missing {', '.join(missing)}); {regenerate}")
    return saved


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


def _policy_option(store: RunStore, saved: dict[str, Any], lam: np.ndarray, frame, names: list[str],
                   base: np.ndarray, ideal: np.ndarray, notes: list[str]) -> list[tuple]:
    """The pretrained policy's greedy path for λ as an option, if the store already holds scores of it
    (by their lower bound, module docstring); else none, and a note says why."""
    path = greedy_path(saved, lam)
    recipe = path_recipe(path, frame, saved["expert_refs"])
    match = store.find_candidate(recipe) if path.hops else None
    known = stored_estimate(store, match, names) if match is not None and match.kind == PATH_KIND else None
    if known is None:
        notes.append(f"the policy's greedy path for this λ ({len(path.hops)} hops) was never evaluated, "
                     "so it has no prediction; answered from the front")
        return []
    predicted, counts = known
    return [(lower_bound(lam, known, base, ideal),
             f"policy path ({len(path.hops)} hops, predicted from {int(counts.min())}+ examples per objective)",
             PATH_KIND, predicted, recipe)]


def policy_frame(saved: dict[str, Any], lam: np.ndarray) -> FrameKey:
    """The level-1 merge framing the policy's paths for λ (HM3's Tchebycheff choice), or the base."""
    frame_front = {int(c): np.array(v) for c, v in saved["frame_front"].items()}
    return merge_for_preference(lam, frame_front) if frame_front else "base"


def front_options(run: FinishedRun, lam: np.ndarray) -> list[tuple[float, str, str, np.ndarray, Any]]:
    """The run's front points as options for λ: (Σ λ_k f̂_k, source, kind, raw scores, candidate id)."""
    return [(weighted_normalised(lam, raw, run.base, run.ideal), f"front point {cid} (level {level})", kind, raw, cid)
            for cid, level, kind, raw in run.front]


def budget_zero_choice(run: FinishedRun, store: RunStore, lam: np.ndarray, posterior: dict[str, Any] | None,
                       notes: list[str]) -> tuple[float, str, str, np.ndarray, Any]:
    """What a budget-0 request answers for λ (module docstring): the best of the front points, the
    policy's greedy path if the store knows it, and the BO posterior's proposal (``posterior``:
    :func:`load_posterior` of the run). Returns (score, source, kind, raw scores, candidate id or
    recipe); evaluates and writes nothing, so a report can ask it for many λ."""
    options = front_options(run, lam)
    if run.policy is not None:
        options += _policy_option(store, run.policy, lam, policy_frame(run.policy, lam), run.names, run.base,
                                  run.ideal, notes)
    proposal = posterior_option(posterior, run.level1.search_space, lam, run.base, run.ideal)
    if proposal is not None:
        bound, recipe, predicted = proposal
        options.append((bound, "level-1 BO posterior proposal (unevaluated merge)", "merge", predicted, recipe))
    return max(options, key=lambda o: o[0])


def answer_request(
    run_dir: str | Path, prefer: str, out_dir: str | Path, *, budget: int = 0, refine: int = 0,
    overwrite: bool = False, force: bool = False, progress: bool = True,
) -> RequestAnswer:
    from hm3.materialise import write_merge, write_path
    from hm3.outputs import check_output_dir

    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if budget < 0:
        raise ConfigError(f"--budget must be >= 0, got {budget}")
    if refine < 0:
        raise ConfigError(f"--refine must be >= 0, got {refine}")
    run = read_finished_run(run_dir)
    # before any evaluation: the answer is merged from the run's models, never written over one of them
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=[run_dir, *run.level1.models.values()])
    names, base, ideal, level1 = run.names, run.base, run.ideal, run.level1
    lam, notes = parse_preference(prefer, names)
    if run.policy is None and budget > 0:
        raise ConfigError(
            f"{run_dir} holds a level-1 search ('hm3 search param'): it has no level-2 policy to fine-tune, so "
            "--budget must be 0; use --refine M for M more merge evaluations, or 'hm3 run' for both levels"
        )
    saved = run.policy
    frame = policy_frame(saved, lam) if saved is not None else None

    with RunStore.open(run_dir, readonly=True) as store:
        options = front_options(run, lam)
        evaluations = 0
        if budget == 0 and refine == 0:
            score, source, kind, raw, what = budget_zero_choice(run, store, lam, load_posterior(run.level1_dir),
                                                                notes)
            stored = store.candidate(what)[1] if isinstance(what, int) else what
    measured = None
    if budget > 0 or refine > 0:
        score, source, kind, raw, stored, measured, evaluations = _search(
            level1, run.rl, run_dir, saved, lam, frame, budget, refine, options, base, ideal, progress
        )
    if kind == "merge":
        write_merge(recipe_with_paths(stored, level1.models), out_dir, overwrite=overwrite, force=force,
                    inputs=[run_dir])
    else:
        with RunStore.open(run_dir, readonly=True) as store:
            point = path_point_file(stored, store, level1)
        write_path(point, out_dir, overwrite=overwrite, force=force, inputs=[run_dir])
    # what was asked and answered, beside the model: a checkpoint handed on keeps its provenance
    scores = measured if measured is not None else raw
    record = {
        "run": str(run_dir.resolve()),
        "preference": {n: round(v, 12) for n, v in zip(names, lam.tolist(), strict=True)}, "notes": notes,
        "budget": budget, "refine": refine, "new_evaluations": evaluations, "answer": source, "kind": kind,
        "validation_scores": dict(zip(names, np.asarray(scores, dtype=float).tolist(), strict=True)),
        "scores_are": "measured" if measured is not None else "predicted (stored)",
        "weighted_normalised_score": score,
    }
    atomic_write_text(out_dir / REQUEST_RECORD, json.dumps(record, indent=2))
    return RequestAnswer(
        lam=lam, source=source, kind=kind, predicted=None if measured is not None else raw, measured=measured,
        out_dir=out_dir, evaluations=evaluations, seconds=time.perf_counter() - start, notes=notes,
        details={"weighted_normalised_score": score, "frame": frame, "objectives": names},
    )


def _search(level1: RunConfig, rl: Level2Config | None, run_dir: Path, saved: dict[str, Any] | None,
            lam: np.ndarray, frame, budget: int, refine: int, options: list, base: np.ndarray, ideal: np.ndarray,
            progress: bool):
    """Spend the request's evaluations (merge refinement, then online fine-tuning) and pick the best
    of them and the front points on measured validation scores."""
    from hm3.search.level1 import Level1Context, stderr_logger

    log = stderr_logger(progress)
    with RunStore.open(run_dir) as store:
        ctx = Level1Context(level1, store, log=log)
        try:
            measured: list = []
            evaluations = 0
            if refine > 0:
                found, n = _refine_merges(ctx, store, lam, refine, base, ideal, log)
                measured += found
                evaluations += n
            if budget > 0:
                found, n = _tune_and_measure(ctx, saved, lam, frame, budget, base, ideal, rl,
                                             len(saved["objectives"]), log)
                measured += found
                evaluations += n
            score, source, kind, raw, what = max([*options, *measured], key=lambda o: o[0])
            stored = store.candidate(what)[1] if isinstance(what, int) else what
            store.add_event("request", {"lam": lam.tolist(), "budget": budget, "refine": refine, "answer": source,
                                        "score": score})
            return score, source, kind, raw, stored, raw, evaluations
        finally:
            ctx.backend.close()


def _refine_merges(ctx, store: RunStore, lam: np.ndarray, n: int, base: np.ndarray, ideal: np.ndarray, log):
    """``n`` evaluations of λ-scalarised BO over the run's merge space, warm-started with every merge
    evaluation the run holds (level 1 and earlier refinements); returns (options, new evaluations)."""
    from hm3.search.level1 import told_points
    from hm3.search.optimizers.df_merge import DfMerge

    space = ctx.cfg.search_space
    history = told_points(store) + told_points(store, REFINE_EVENT)
    X, Y = [], []
    for cid, x in dict(history).items():  # a candidate refined twice is one observation
        y = ctx.scorer.cached(cid, ctx.validation)
        if y is not None:
            X.append(x)
            Y.append(normalise(y[None], base, ideal)[0])
    seed = int(content_hash({"lam": lam.round(6).tolist(), "refine": n, "history": len(X)})[:8], 16)
    opt = DfMerge(space.dim, len(lam), seed=seed, budget=len(X) + n, weights=lam.tolist(), n_init=1)
    if X:
        opt.tell(torch.tensor(X, dtype=torch.float64), torch.tensor(np.array(Y), dtype=torch.float64))
    log(f"refining merges for λ={np.round(lam, 3).tolist()}: {n} evaluations, GP warm-started with {len(X)}")
    options, evaluations = [], 0
    for i in range(n):
        x = opt.ask(1)
        before = ctx.scorer.evaluated_examples
        cand, y = ctx.score_point(x[0])
        evaluations += int(ctx.scorer.evaluated_examples > before)
        opt.tell(x, torch.tensor(normalise(y[None], base, ideal), dtype=torch.float64))
        store.add_event(REFINE_EVENT, {"candidate": cand.id, "x": x[0].tolist(), "lam": lam.tolist(),
                                       "warm_start": len(X)})
        options.append((weighted_normalised(lam, y, base, ideal), f"refined merge {cand.id} (request BO {i + 1}/{n})",
                        "merge", y, cand.id))
    return options, evaluations


def _tune_and_measure(ctx, saved: dict[str, Any], lam: np.ndarray, frame, budget: int, base: np.ndarray,
                      ideal: np.ndarray, rl, k: int, log):
    """Fine-tune from the pretrained policy for ``budget`` episodes, then measure its paths in full;
    returns (options, evaluations: the episodes plus the whole-plan scorings)."""
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
        measured_options.append((weighted_normalised(lam, raw, base, ideal), f"fine-tuned path ({len(path.hops)} hops)",
                                 PATH_KIND, raw, recipe))
    ctx.restore_live_model()
    return measured_options, evaluations
