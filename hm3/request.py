"""Preference requests: ``hm3 request RUN_DIR --prefer math=0.6,code=0.4 OUT_DIR [--budget N]``.

How a request is answered, and why:

* **Budget 0** (no evaluation, seconds): the candidates are the finished run's front points (their
  stored validation scores are measurements) and the pretrained policy's greedy path for λ over
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
  whole validation plan and compete with the front points on measured scores. The evaluations
  reported are those the run store gained, counted there: an episode scores its path once per
  transition scale, one already scored on its reward subset costs none, and the 1-2 whole-plan
  scorings come on top of the budget.
* **Refine M > 0** (``--refine M``): M whole-plan evaluations of λ-scalarised BO over the run's
  merge space (``df-merge``'s GP + log-EI on ``Σ_k λ_k f̂_k``), its GP warm-started with every merge
  the run (and earlier refinements) evaluated, so no initial design is spent. Why: a budget-0 answer
  is only as good as the run's front near λ, and a search focused on one λ beats a front spread
  over all of them (``docs/BENCHMARKS.md``); a few focused evaluations close most of that gap.
  Refinements are stored as ``request_merge`` events, never as level-1 evaluations, so a resumed
  run replays exactly its own history; the run's front, candidates and summary are then written
  again with them among the candidates, so ``hm3 front`` and later requests see them.
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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hm3.arch.level2 import (
    PATH_KIND,
    FrameKey,
    build_trainer,
    episode_lanes,
    merge_for_preference,
    path_recipe,
)
from hm3.arch.path import LayerPath
from hm3.arch.rl_config import Level2Config
from hm3.atomic import atomic_write_text
from hm3.errors import ConfigError, RunFileError
from hm3.eval.session import MERGE_KIND, EvaluationSession
from hm3.run.directory import (
    FRONT_FILE,
    LEVEL2_DIR,
    POLICY_STEM,
    REFINE_EVENT,
    FinishedRun,
    read_finished_run,
    summary_utility_maps,
)
from hm3.runfiles import find_state, read_state
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.pareto import normalise, weighted_normalised
from hm3.search.posterior import load_posterior, posterior_option
from hm3.search.run_config import RunConfig, parse_run_config
from hm3.store import RunStore, content_hash
from objectives.base import IDENTITY, utility

REQUEST_RECORD = "hm3_request.json"  # written into OUT_DIR beside the model
_ITEM = re.compile(r"^\s*([^=\s]+)\s*=\s*([^=\s]+)\s*$")


def short_name(objective: str) -> str:
    """``zoo:math`` -> ``math``; ``lm-eval:arc_easy`` -> ``arc_easy``; ``gsm8k:/data/x.jsonl`` -> ``gsm8k``: what a
    user types in --prefer."""
    prefix, _, rest = objective.partition(":")
    return rest if prefix in ("zoo", "lm-eval") and rest else prefix


def preference_names(objectives: Sequence[str]) -> list[str]:
    """What a user types in ``--prefer`` for each objective: its short name where no other objective shares
    it (``gsm8k:a.jsonl`` and ``gsm8k:b.jsonl`` are both ``gsm8k``), else its full name."""
    shorts = [short_name(o) for o in objectives]
    return [s if shorts.count(s) == 1 else o for s, o in zip(shorts, objectives, strict=True)]


def lower_is_better(summary: Mapping[str, Any], names: Sequence[str]) -> dict[str, str]:
    """The objectives of a run whose raw metric is better when lower, each with the map its scores are
    (``1 - raw`` or ``-raw``: :func:`objectives.base.utility_map`)."""
    return {n: how for n, how in zip(names, summary_utility_maps(summary, names), strict=True) if how != IDENTITY}


def parse_preference(text: str, objectives: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``math=0.6,code=0.4`` -> λ over ``objectives`` (full or short names) and notes on what was assumed.

    Refused: unknown names, repeated names, non-numbers, negative weights, all-zero weights.
    Missing objectives get 0; weights not summing to 1 are normalised (both said in the notes).
    """
    typed = preference_names(objectives)
    lookup: dict[str, int] = {}
    for i, (name, short) in enumerate(zip(objectives, typed, strict=True)):
        lookup[name] = i
        lookup.setdefault(short, i)
    # a short name several objectives share names none of them: weighting the first would answer another preference
    shared = {short_name(o) for o, t in zip(objectives, typed, strict=True) if t == o} - set(lookup)
    known = ", ".join(typed)
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
        if name in shared:
            which = ", ".join(o for o in objectives if short_name(o) == name)
            raise ConfigError(f"--prefer: {name!r} names more than one objective ({which}); give the full name")
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
    missing = [typed[i] for i in range(len(objectives)) if i not in seen]
    if missing:
        notes.append(f"weight 0 assumed for {', '.join(missing)}")
    if not math.isfinite(total) or abs(total - 1.0) > 1e-6:
        summed = f"{total:g}" if math.isfinite(total) else "more than the largest float"
        notes.append(f"weights summed to {summed}; normalised to sum to 1")
    return scaled / scaled.sum(), notes


ScoresAre = Literal["measured", "estimated", "predicted"]


@dataclass(frozen=True)
class Option:
    """One possible answer to a request, and what it is ranked by."""

    score: float  # Σ_k λ_k f̂_k (for a prediction from few examples, its lower bound)
    source: str  # "front point N (level L)", "policy path ...", ...
    kind: str  # "merge" or "path"
    scores: np.ndarray  # raw validation scores, per objective
    # "measured": on the whole validation plan (stored, or now); "estimated": the mean of the stored
    # scores of a path's training episodes (a few examples each); "predicted": the BO posterior's
    scores_are: ScoresAre
    candidate: int | None = None  # its run-store id, when it is stored
    recipe: dict[str, Any] | None = None  # its recipe, when it is not (or not looked up)

    def stored_recipe(self, store: RunStore) -> dict[str, Any]:
        return self.recipe if self.recipe is not None else store.candidate(self.candidate)[1]


@dataclass(frozen=True)
class Searched:
    """What spending a request's evaluations found: the best option, its recipe, how many evaluations."""

    best: Option
    recipe: dict[str, Any]
    evaluations: int


@dataclass
class RequestAnswer:
    lam: np.ndarray
    source: str  # "front point N (level L)" or "policy path ..."
    kind: str  # "merge" or "path"
    scores: np.ndarray  # raw validation scores, per objective
    scores_are: ScoresAre
    out_dir: Path
    evaluations: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray | None:
        """The scores, unless measured (an estimate from a path's episodes, or the posterior's prediction)."""
        return self.scores if self.scores_are != "measured" else None

    @property
    def measured(self) -> np.ndarray | None:
        return self.scores if self.scores_are == "measured" else None


POLICY_KEYS = ("policy", "config", "pool_size", "num_layers", "objectives", "frame_front", "layer_features",
               "expert_refs")


def load_policy(run_dir: Path) -> dict[str, Any]:
    """The run's pretrained level-2 policy (a state file: reading it runs no code; an older run's
    ``policy.pt`` is read with torch's restricted unpickler or refused)."""
    path = find_state(run_dir / LEVEL2_DIR / POLICY_STEM)
    if path is None:
        raise ConfigError(f"{run_dir}: no pretrained policy ({run_dir / LEVEL2_DIR / POLICY_STEM}.safetensors "
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


def _policy_option(store: RunStore, saved: dict[str, Any], lam: np.ndarray, frame: FrameKey, names: list[str],
                   utility_maps: list[str],
                   base: np.ndarray, ideal: np.ndarray, notes: list[str]) -> list[Option]:
    """The pretrained policy's greedy path for λ as an option, if the store already holds scores of it
    (by their lower bound, module docstring); else none, and a note says why."""
    path = greedy_path(saved, lam)
    recipe = path_recipe(path, frame, saved["expert_refs"])
    match = store.find_candidate(recipe) if path.hops else None
    known = (stored_estimate(store, match, names, utility_maps=utility_maps)
             if match is not None and match.kind == PATH_KIND else None)
    if known is None:
        notes.append(f"the policy's greedy path for this λ ({len(path.hops)} hops) was never evaluated, "
                     "so it has no prediction; answered from the front")
        return []
    estimate, counts = known
    return [Option(lower_bound(lam, known, base, ideal, utility_maps),
                   f"policy path ({len(path.hops)} hops, predicted from {int(counts.min())}+ examples per objective)",
                   PATH_KIND, estimate, "estimated", recipe=recipe)]


def policy_frame(saved: dict[str, Any], lam: np.ndarray) -> FrameKey:
    """The level-1 merge framing the policy's paths for λ (HM3's Tchebycheff choice), or the base."""
    frame_front = {int(c): np.array(v) for c, v in saved["frame_front"].items()}
    return merge_for_preference(lam, frame_front) if frame_front else "base"


def front_options(run: FinishedRun, lam: np.ndarray) -> list[Option]:
    """The run's front points as options for λ: their stored whole-plan validation scores are measurements."""
    return [Option(weighted_normalised(lam, p.validation, run.base, run.ideal), f"front point {p.point} (level {p.level})",
                   p.kind, p.validation, "measured", candidate=p.point) for p in run.front]


def budget_zero_choice(run: FinishedRun, store: RunStore, lam: np.ndarray, posterior: dict[str, Any] | None,
                       policy: dict[str, Any] | None, notes: list[str]) -> Option:
    """What a budget-0 request answers for λ (module docstring): the best of the front points, the
    policy's greedy path if the store knows it (``policy``: :func:`load_policy` of a two-level run),
    and the BO posterior's proposal (``posterior``: :func:`load_posterior` of the run). Evaluates and
    writes nothing, so a report can ask it for many λ."""
    options = front_options(run, lam)
    if policy is not None:
        options += _policy_option(store, policy, lam, policy_frame(policy, lam), run.names,
                                  summary_utility_maps(run.summary, run.names), run.base, run.ideal, notes)
    proposal = posterior_option(posterior, run.config.level1.search_space, lam, run.base, run.ideal)
    if proposal is not None:
        bound, recipe, predicted = proposal
        options.append(Option(bound, "level-1 BO posterior proposal (unevaluated merge)", MERGE_KIND, predicted,
                              "predicted", recipe=recipe))
    return max(options, key=lambda o: o.score)


def answer_request(
    run_dir: str | Path, prefer: str, out_dir: str | Path, *, budget: int = 0, refine: int = 0,
    overwrite: bool = False, force: bool = False, progress: bool = True, log_samples: bool = False,
    executor: Mapping[str, Any] | None = None,
) -> RequestAnswer:
    """Answer a preference ``prefer`` from the finished run at ``run_dir`` with a model written to ``out_dir``.

    ``executor`` (evaluation settings such as ``{"executor": "ray", "workers": 4}``) says where
    ``refine``/``budget`` evaluations are scored; None: in this process, as the run's config says."""
    from hm3.materialise import write_merge, write_path
    from hm3.outputs import check_output_dir
    from hm3.run.front import path_point_file, recipe_with_paths

    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if budget < 0:
        raise ConfigError(f"--budget must be >= 0, got {budget}")
    if refine < 0:
        raise ConfigError(f"--refine must be >= 0, got {refine}")
    run = read_finished_run(run_dir)
    level1 = run.config.level1
    cfg = _scoring_config(level1, executor, log_samples)  # checked before anything is written
    # before any evaluation: the answer is merged from the run's models, never written over one of them
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=[run_dir, *level1.models.values()])
    names = run.names
    lam, notes = parse_preference(prefer, names)
    lower = lower_is_better(run.summary, names)
    notes += [f"{n}: scores are {how} ({n}'s raw metric is better when lower)" for n, how in lower.items()]
    if run.kind == "level1" and budget > 0:
        raise ConfigError(
            f"{run_dir} holds a level-1 search ('hm3 search param'): it has no level-2 policy to fine-tune, so "
            "--budget must be 0; use --refine M for M more merge evaluations, or 'hm3 run' for both levels"
        )
    saved = load_policy(run_dir) if run.kind == "two-level" else None
    frame = policy_frame(saved, lam) if saved is not None else None  # the merge framing level-2 paths for λ

    if budget > 0 or refine > 0:
        searched = _search(run, cfg, saved, lam, frame, budget, refine, front_options(run, lam), progress, notes)
        best, recipe, evaluations = searched.best, searched.recipe, searched.evaluations
    else:
        with RunStore.open(run_dir, readonly=True) as store:
            best = budget_zero_choice(run, store, lam, load_posterior(run.level1_dir), saved, notes)
            recipe, evaluations = best.stored_recipe(store), 0
    if best.kind == MERGE_KIND:
        write_merge(recipe_with_paths(recipe, level1.models), out_dir, overwrite=overwrite, force=force,
                    inputs=[run_dir])
    else:
        with RunStore.open(run_dir, readonly=True) as store:
            point = path_point_file(recipe, store, level1)
        write_path(point, out_dir, overwrite=overwrite, force=force, inputs=[run_dir])
    # what was asked and answered, beside the model: a checkpoint handed on keeps its provenance
    record = {
        "run": str(run_dir.resolve()),
        "preference": {n: round(v, 12) for n, v in zip(names, lam.tolist(), strict=True)}, "notes": notes,
        "budget": budget, "refine": refine, "new_evaluations": evaluations, "answer": best.source, "kind": best.kind,
        "validation_scores": dict(zip(names, np.asarray(best.scores, dtype=float).tolist(), strict=True)),
        "scores_are": best.scores_are,
        "weighted_normalised_score": best.score,
    }
    if lower:  # the raw metric too, where the scores above are its utility (each map is its own inverse)
        scores = record["validation_scores"]
        record["raw_validation_scores"] = {n: utility(scores[n], how) for n, how in lower.items()}
    atomic_write_text(out_dir / REQUEST_RECORD, json.dumps(record, indent=2))
    return RequestAnswer(
        lam=lam, source=best.source, kind=best.kind, scores=best.scores, scores_are=best.scores_are, out_dir=out_dir,
        evaluations=evaluations, seconds=time.perf_counter() - start, notes=notes,
        details={"weighted_normalised_score": best.score, "frame": frame, "objectives": names},
    )


def _scoring_config(level1: RunConfig, executor: Mapping[str, Any] | None, log_samples: bool) -> RunConfig:
    """The run's level-1 config as recorded (which never holds executor settings or log_samples: they change
    no score), with the request's own; validated, so a bad setting is refused naming its key."""
    if executor is None and not log_samples:
        return level1
    data = level1.canonical()
    data["evaluation"] = {**data["evaluation"], **(executor or {}), **({"log_samples": True} if log_samples else {})}
    return parse_run_config(data, source="the request's evaluation settings")


def _search(run: FinishedRun, cfg: RunConfig, saved: dict[str, Any] | None, lam: np.ndarray, frame, budget: int,
            refine: int, options: list[Option], progress: bool, notes: list[str]) -> Searched:
    """Spend the request's evaluations (merge refinement, then online fine-tuning) through ``cfg``'s
    evaluation (this process, or Ray workers), pick the best of them and the front points on measured
    validation scores, and -- after a refinement -- write the run's front again with the new merges
    among its candidates."""
    from hm3.search.level1 import evaluation_executor, open_session, stderr_logger

    log = stderr_logger(progress)
    with evaluation_executor(cfg, log) as executor, RunStore.open(run.run_dir) as store:
        session = open_session(cfg, store, log, executor)
        try:
            measured: list[Option] = []
            evaluations = 0
            if refine > 0:
                found, n = _refine_merges(session, run, lam, refine, log)
                measured += found
                evaluations += n
            if budget > 0:
                assert saved is not None and run.config.level2 is not None
                found, n = _tune_and_measure(session, saved, lam, frame, budget, run, run.config.level2.rl, log)
                measured += found
                evaluations += n
            best = max([*options, *measured], key=lambda o: o.score)
            store.add_event("request", {"lam": lam.tolist(), "budget": budget, "refine": refine,
                                        "answer": best.source, "score": best.score})
            if refine > 0:
                notes.append(_refresh_outputs(session, run, log))
            return Searched(best, best.stored_recipe(store), evaluations)
        finally:
            session.close()


def _refine_merges(session: EvaluationSession, run: FinishedRun, lam: np.ndarray, n: int,
                   log: Callable[[str], None]) -> tuple[list[Option], int]:
    """``n`` evaluations of λ-scalarised BO over the run's merge space, warm-started with every merge
    evaluation the run holds (level 1 and earlier refinements); returns (options, new evaluations)."""
    from hm3.eval.session import MergeCandidate
    from hm3.search.level1 import told_points
    from hm3.search.optimizers.df_merge import DfMerge

    store, base, ideal = session.store, run.base, run.ideal
    space = run.config.level1.search_space
    history = told_points(store) + told_points(store, REFINE_EVENT)
    X, Y = [], []
    for cid, x in dict(history).items():  # a candidate refined twice is one observation
        y = session.stored_scores(cid, session.validation)
        if y is not None:
            X.append(x)
            Y.append(normalise(y[None], base, ideal)[0])
    seed = int(content_hash({"lam": lam.round(6).tolist(), "refine": n, "history": len(X)})[:8], 16)
    opt = DfMerge(space.dim, len(lam), seed=seed, budget=len(X) + n, weights=lam.tolist(), n_init=1)
    if X:
        opt.tell(torch.tensor(X, dtype=torch.float64), torch.tensor(np.array(Y), dtype=torch.float64))
    workers = session.cfg.evaluation.workers  # proposed (q-batch) and scored this many at a time
    log(f"refining merges for λ={np.round(lam, 3).tolist()}: {n} evaluations, GP warm-started with {len(X)}"
        + (f", {workers} at a time" if workers > 1 else ""))
    options, evaluations = [], 0
    while len(options) < n:
        x = opt.ask(min(workers, n - len(options)))
        candidates = [MergeCandidate(session.merge_recipe(p)) for p in x]
        stored = [_has_scores(session, c) for c in candidates]
        batch = session.score_many(candidates, session.validation)
        evaluations += len({s.candidate.id for s, was in zip(batch, stored, strict=True) if not was})
        y = np.stack([s.scores for s in batch])
        opt.tell(x, torch.tensor(normalise(y, base, ideal), dtype=torch.float64))
        for p, scored in zip(x, batch, strict=True):  # in the order proposed, whichever worker finished first
            store.add_event(REFINE_EVENT, {"candidate": scored.candidate.id, "x": p.tolist(), "lam": lam.tolist(),
                                           "warm_start": len(X)})
            options.append(Option(weighted_normalised(lam, scored.scores, base, ideal),
                                  f"refined merge {scored.candidate.id} (request BO {len(options) + 1}/{n})",
                                  MERGE_KIND, scored.scores, "measured", candidate=scored.candidate.id))
    return options, evaluations


def _has_scores(session: EvaluationSession, candidate: Any) -> bool:
    """Whether the run store already holds ``candidate``'s validation scores (scoring it costs nothing)."""
    ref = session.store.find_candidate(candidate.stored_recipe())
    return ref is not None and session.stored_scores(ref, session.validation) is not None


def _tune_and_measure(session: EvaluationSession, saved: dict[str, Any], lam: np.ndarray, frame, budget: int,
                      run: FinishedRun, rl: Level2Config, log: Callable[[str], None]) -> tuple[list[Option], int]:
    """Fine-tune from the pretrained policy for ``budget`` episodes, then measure its paths in full;
    returns (options, evaluations: the run store's new ones, episodes' and whole-plan scorings)."""
    from hm3.arch.level2 import PathEvaluator

    layout = session.pool_layout()
    t_max = rl.max_path_hops(layout.num_layers)
    seed = int(content_hash({"lam": lam.round(6).tolist(), "budget": budget})[:8], 16)
    ev = PathEvaluator(session, base=run.base, ideal=run.ideal, dar=rl.dar, data_scale=rl.data_scale, seed=seed,
                       t_max=t_max)
    trainer = build_trainer(
        pool_size=layout.size, num_layers=layout.num_layers, n_objectives=len(saved["objectives"]),
        layer_features=saved["layer_features"], config=rl, scorer=ev.scorer_for(lambda _lam: frame), lam=lam,
        seed=seed, policy_state=saved["policy"], lanes=episode_lanes(session),
    )
    trainer.env.plan_episodes(budget)  # DAR's N: this fine-tuning's episodes, not the run's online count
    log(f"fine-tuning the pretrained policy for λ={np.round(lam, 3).tolist()} ({budget} episodes)")
    first = len(session.store.evaluations())
    trainer.train(budget)
    paths = {trainer.greedy_path(lam)} | ({trainer.best[1]} if trainer.best is not None else set())
    paths = {p for p in paths if p.hops}  # RMM's greedy rollout may back out: no path
    measured = []
    for path in paths:
        raw = ev.raw_scores(path, frame, session.validation)
        measured.append(Option(weighted_normalised(lam, raw, run.base, run.ideal),
                               f"fine-tuned path ({len(path.hops)} hops)", PATH_KIND, raw, "measured",
                               recipe=path_recipe(path, frame, layout.experts)))
    return measured, _evaluations_since(session.store, first)


def _evaluations_since(store: RunStore, first: int) -> int:
    """Evaluations the store gained after its first ``first`` rows: a candidate scored on one example set of
    every objective (rows are per objective, in commit order), so each candidate's new scorings are its most
    new rows on any one objective -- not its distinct example sets, which two objectives drawing from one
    task (``zoo:math``, ``zoo:math@1``) share. Counted, not assumed: an episode scores its path once per
    transition scale, and a path already scored on its reward subset costs nothing."""
    rows = store.evaluations()[first:]
    per_objective = Counter((e.candidate_id, e.objective) for e in rows)
    scorings: dict[int, int] = {}
    for (cid, _), n in per_objective.items():
        scorings[cid] = max(scorings.get(cid, 0), n)
    return sum(scorings.values())


def _refresh_outputs(session: EvaluationSession, run: FinishedRun, log: Callable[[str], None]) -> str:
    """The run's front, candidates, points, summary and plot written again with the merges requests
    refined among the candidates (one that beats the front joins it); returns a note saying so."""
    from hm3.run.front import CandidateRow, stored_row, write_front, write_summary
    from hm3.search.level1 import told_points

    searched = [(cid, 1, MERGE_KIND) for cid, _ in told_points(session.store)]
    searched += [(int(cid), 2, PATH_KIND) for cid in run.summary.get("level2_paths", {})]
    rows: dict[int, CandidateRow] = {}
    for cid, level, kind in searched:  # each candidate once (a told point may recur)
        if cid not in rows:
            rows[cid] = stored_row(session, cid, level, kind)
    written = write_front(session, run.config.level1, run.run_dir, list(rows.values()), run.base, run.ideal, log=log)
    summary = run.summary | written.summary
    write_summary(run.run_dir, summary)
    written.plot(run.run_dir, summary)
    joined = sorted(set(written.front_ids) - set(rows))
    return (f"{run.run_dir / FRONT_FILE} and summary.json written again with the {summary.get('refined_merges', 0)} "
            f"refined merge(s) among the candidates: front of {len(written.front_ids)} (refined merges on it: "
            f"{', '.join(map(str, joined)) or 'none'}); HV validation {run.summary['hv_validation']:.4f} -> "
            f"{summary['hv_validation']:.4f}")
