"""Level 1: the multi-objective search over merge coefficients, end to end.

``run_level1`` glues the pieces: the in-memory merger (base + task vectors held
once), one live model behind an evaluator backend, the run store (every score
committed as it arrives), an ask/tell optimiser over the unit cube, and the
outputs (front table, hypervolume, plots, recipes).

Scores handed to optimisers are normalised by the HV protocol of
:mod:`hm3.search.pareto` (base model = 0, per-task best expert = 1), so every
optimiser sees the same scale and the same reference point.

Crash and resume: each told point is also recorded as a ``level1_tell`` event
(candidate id and unit-cube point). ``--resume`` replays those events into a
fresh optimiser — whose asks are a function of the history only — so the
continued run asks exactly what the uninterrupted one would have, and the
store's cache turns re-scoring of a half-scored candidate into look-ups.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from hm3.atomic import atomic_write_text
from hm3.config import parse_merge_config
from hm3.errors import ConfigError, StoreError
from hm3.eval.backend import open_backend
from hm3.log import progress_bar, progress_logger
from hm3.merge.inmemory import InMemoryMerger
from hm3.report import plot_front, write_csv
from hm3.search.optimizers import Optimizer, get_optimizer
from hm3.search.optimizers.random import sobol_points
from hm3.search.pareto import degenerate_objectives, non_dominated, normalise, protocol_hypervolume
from hm3.search.posterior import save_level1_posterior
from hm3.search.preferences import dirichlet_preferences
from hm3.search.run_config import RunConfig
from hm3.search.scoring import CandidateScorer, SplitPlan, first_n
from hm3.search.space import SearchSpace
from hm3.store import CandidateRef, RunStore
from objectives.registry import get_objective

logger = logging.getLogger(__name__)

TELL_EVENT = "level1_tell"
STORE_FILE = "hm3.sqlite"
#: What searches write into a run directory besides the store (both commands): a new run refuses a
#: directory that holds any of them without a store.
RUN_OUTPUTS = ("front.csv", "summary.json", "candidates.csv", "recipes", "points", "level1", "level2",
               "posterior.safetensors", "posterior.pt")


@dataclass
class Level1Result:
    run_dir: Path
    objective_names: list[str]
    X: np.ndarray  # unit-cube points, in evaluation order
    Y: np.ndarray  # raw validation scores
    candidate_ids: list[int]
    front_ids: list[int]
    base: np.ndarray
    ideal: np.ndarray
    hv_trace: list[float]
    summary: dict[str, Any] = field(default_factory=dict)


class Level1Context:
    """Everything a level-1 (and later level-2) run keeps loaded: store, merger, backend, scorer."""

    def __init__(self, cfg: RunConfig, store: RunStore, *, log: Callable[[str], None]):
        self.cfg = cfg
        self.store = store
        self.log = log
        space = cfg.search_space
        self.objectives = [get_objective(s) for s in cfg.objectives]
        self.objective_names = [o.name for o in self.objectives]
        log(f"loading base + {len(space.models)} experts into memory ({cfg.models[space.base_model]})")
        self.merger = InMemoryMerger(
            cfg.models[space.base_model],
            [cfg.models[r] for r in space.models],
            base_ref=space.base_model,
            model_refs=list(space.models),
        )
        self.backend = open_backend(
            cfg.evaluation.backend, cfg.models[space.base_model], batch_size=cfg.evaluation.batch_size
        )
        self.live = self.backend.live_parameters()
        # Level 2 points the hf backend at path models that share the pool's tensors; level-1 installs
        # write into this model's own parameters, so they put it back first.
        self.live_model = getattr(self.backend, "model", None)
        self.scorer = CandidateScorer(self.backend, self.objectives, store)
        self.validation = first_n(self.objectives, "validation", cfg.evaluation.validation_examples)
        self.fisher_cache = None
        if cfg.search_space.fisher:
            from hm3.fisher import FisherCache

            if getattr(self.backend, "model", None) is None:
                raise ConfigError("Fisher weighting needs the 'hf' backend (gradients through the live model)")
            self.fisher_cache = FisherCache.for_run(store.path.parent)
        self.test = first_n(self.objectives, "test", cfg.evaluation.test_examples)

    # --- installing weights into the live model ----------------------------------------------------

    def restore_live_model(self) -> None:
        if self.live_model is not None:
            self.backend.model = self.live_model

    def install_state(self, state: dict[str, torch.Tensor]) -> None:
        self.restore_live_model()
        if self.live is not None:
            with torch.no_grad():
                for name, t in state.items():
                    self.live[name].copy_(t)
        else:
            self.backend.load_state(state)

    def _parse_recipe(self, recipe: dict):
        config = parse_merge_config(recipe, source="candidate recipe")
        fisher_files = {m.model: (m.parameters or {}).get("fisher") for m in config.models}
        if any(fisher_files.values()):
            from hm3.fisher import load_fisher

            self.merger.set_fishers({ref: load_fisher(path) for ref, path in fisher_files.items()})
        return config

    def install_recipe(self, recipe: dict) -> None:
        config = self._parse_recipe(recipe)
        self.restore_live_model()
        if self.live is not None:
            self.merger.merge_into(self.live, config)
        else:
            self.backend.load_state(self.merger.merged_state(config))

    def merged_state(self, recipe: dict) -> dict[str, torch.Tensor]:
        """The recipe's merge as new tensors (level 2 puts it in a layer pool beside the experts)."""
        return self.merger.merged_state(self._parse_recipe(recipe))

    def reference_state(self, ref: str) -> dict[str, torch.Tensor]:
        """The base (``ref`` = base ref) or one expert, rebuilt from base + task vector."""
        m = self.merger
        if ref == m.base_ref:
            return m.base
        k = m.model_refs.index(ref)
        return {n: m.base[n] + m.deltas[n][k] for n in m.tensor_names}

    # --- scoring -------------------------------------------------------------------------------------

    def reference_candidate(self, ref: str) -> CandidateRef:
        return self.store.add_candidate({"reference_model": ref}, "reference")

    def score_reference(self, ref: str, plan: SplitPlan) -> np.ndarray:
        return self.scorer.score(
            self.reference_candidate(ref), lambda: self.install_state(self.reference_state(ref)), plan
        )

    def fisher_recipe(self, x: torch.Tensor) -> dict:
        """The candidate's recipe with DF-Merge Fisher tensors F_i(λ_i) installed in the merger.

        λ_i is model i's weight (its first layer group's, with layer groups), rounded to the config's
        coefficient grid so that nearby candidates share one cached Fisher (in RUN_DIR/fisher/).
        """
        from hm3.fisher import FisherKey, cached_fisher_for_coefficient, fisher_examples

        space, step = self.cfg.search_space, self.cfg.fisher.coefficient_step
        weights = space.decode(x)["weight"]
        by_name = {o.name: o for o in self.objectives}
        paths = []
        for i, ref in enumerate(space.models):
            lam = round(round(weights[i][0] / step) * step, 6)
            obj = by_name[get_objective(self.cfg.experts[ref]).name]
            examples = fisher_examples(obj, self.cfg.fisher.examples)
            cached_fisher_for_coefficient(  # computed once per (model, λ) and kept in RUN_DIR/fisher/
                self.fisher_cache, self.merger, self.backend.model, i, lam, self.backend.tokenizer,
                obj.name, examples, obj.decoding,
            )
            key = FisherKey(ref, lam, obj.name, tuple(e.id for e in examples))
            paths.append(str(self.fisher_cache.path_for(key)))
        return space.to_recipe(x, fisher_paths=paths)

    def score_recipe(self, candidate: CandidateRef | int, recipe: dict, plan: SplitPlan) -> np.ndarray:
        return self.scorer.score(candidate, lambda: self.install_recipe(recipe), plan)

    def score_point(self, x: torch.Tensor) -> tuple[CandidateRef, np.ndarray]:
        """The merge of unit-cube point ``x`` (Fisher-weighted when the space says so), stored as a
        candidate and scored on the validation plan (from the store when already there)."""
        space = self.cfg.search_space
        recipe = self.fisher_recipe(x) if space.fisher else space.to_recipe(x)
        cand = self.store.add_candidate(recipe, "merge")
        return cand, self.score_recipe(cand, recipe, self.validation)

    def references(self, plan: SplitPlan) -> dict[str, np.ndarray]:
        """Scores of the base and of every expert on ``plan`` (cached in the store)."""
        refs = [self.cfg.search_space.base_model, *self.cfg.search_space.models]
        return {ref: self.score_reference(ref, plan) for ref in refs}

    def reference_points(self, plan: SplitPlan) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """(reference scores, base, ideal) on ``plan``: the HV protocol's 0 and 1 (best expert per task)."""
        refs = self.references(plan)
        return refs, *protocol_points(refs, self.cfg.search_space)


def protocol_points(refs: dict[str, np.ndarray], space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    """(base, ideal) from the reference models' scores: the HV protocol's 0 (the base model) and 1
    (the best expert on each task)."""
    return np.asarray(refs[space.base_model]), np.max(np.stack([refs[r] for r in space.models]), axis=0)


def make_optimizer(cfg: RunConfig) -> Optimizer:
    """The configured optimiser, fresh; called once up front so option errors (budget below the
    initial design, unknown options, bad designs) are refused before any evaluation."""
    k, dim = len(cfg.objectives), cfg.search_space.dim
    return get_optimizer(cfg.optimizer.name)(
        dim, k, seed=cfg.seed, budget=cfg.optimizer.budget, **_optimizer_options(cfg, k)
    )


def _optimizer_options(cfg: RunConfig, k: int) -> dict[str, Any]:
    opts = dict(cfg.optimizer.options)
    if cfg.optimizer.name == "hm3-fixed" and "points" not in opts:
        # HM3's own parameter stage: coefficients = λ for λ ~ Dirichlet(1), one per budgeted evaluation.
        n_models = len(cfg.search_space.models)
        if n_models != k:
            raise ConfigError(
                f"hm3-fixed sets each model's coefficient to its task's preference: it needs one expert per "
                f"objective, got {n_models} models and {k} objectives"
            )
        lams = dirichlet_preferences(cfg.optimizer.budget, k, seed=cfg.seed)
        opts["points"] = torch.stack([cfg.search_space.fixed_coefficients(lam.tolist()) for lam in lams])
    from hm3.search.optimizers.bayes import BayesOptimizer  # here: botorch stays out of a request's imports

    is_bo = issubclass(get_optimizer(cfg.optimizer.name), BayesOptimizer)
    design = opts.pop("initial_design", "auto")
    if design not in INITIAL_DESIGNS:
        raise ConfigError(f"optimizer.options.initial_design must be one of {', '.join(INITIAL_DESIGNS)}, "
                          f"got {design!r}")
    if design != "auto" and not is_bo:
        raise ConfigError(f"initial_design is an option of the BO optimisers, not of {cfg.optimizer.name!r}")
    if design == "auto":
        design = "preferences" if is_bo and cfg.search_space.holds_simplex else "sobol"
    if design == "preferences":
        opts["initial_points"] = preference_design(cfg.search_space, cfg.optimizer.budget, seed=cfg.seed)
    return opts


#: Initial designs of the BO optimisers (``optimizer.options.initial_design``); ``auto`` (the default)
#: is ``preferences`` where every model's weight bounds hold [0, 1], else ``sobol``.
INITIAL_DESIGNS = ("auto", "sobol", "preferences")


def preference_design(space: SearchSpace, n: int, *, seed: int) -> torch.Tensor:
    """``n`` unit-cube points whose weights are λ ~ Dirichlet(1) and whose other coordinates are Sobol.

    HM3's parameter stage merges with coefficients = λ (``hm3-fixed``); as a BO initial
    design those points start the surrogate where merges are known to work (weights on
    the simplex, i.e. a convex combination of the task vectors) instead of spreading
    the first evaluations over the whole box, where large or near-zero weight sums
    waste them. The rest of the space (densities) keeps its space-filling Sobol values,
    and later BO steps search the whole box as before.
    """
    points = sobol_points(space.dim, seed=seed, start=0, n=n)
    lams = dirichlet_preferences(n, len(space.models), seed=seed)
    n_weights = len(space.models) * space.n_groups  # weights come first in the vector layout
    for i, lam in enumerate(lams):
        points[i, :n_weights] = space.fixed_coefficients(lam.tolist())[:n_weights]
    return points


def told_points(store: RunStore, event: str = TELL_EVENT) -> list[tuple[int, list[float]]]:
    """(candidate id, unit-cube point) of every ``event`` (level 1's tells by default), in order;
    a malformed one (a corrupt store) is refused, naming it."""
    told = []
    for e in store.events(event, fields=("candidate", "x")):
        cid, x = e.payload["candidate"], e.payload["x"]
        if not isinstance(cid, int) or not isinstance(x, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in x
        ):
            raise StoreError(f"run store {store.path} is corrupt: {e.kind} event {e.id} has candidate {cid!r} "
                             f"and point {str(x)[:100]}, not an id and a list of numbers")
        told.append((cid, x))
    return told


def open_run_store(
    run_dir: Path, config: dict[str, Any], seed: int, *, resume: bool, check: Callable[[Path], Any] | None = None
) -> RunStore:
    """The run's store: a new run needs a fresh RUN_DIR, ``--resume`` an existing one (``check``ed first)."""
    exists = (run_dir / STORE_FILE).exists()
    if exists and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new RUN_DIR")
    if resume and not exists:
        raise ConfigError(f"--resume: {run_dir} holds no run to resume ({STORE_FILE} not found)")
    orphans = [] if exists else sorted(n for n in RUN_OUTPUTS if (run_dir / n).exists())
    if orphans:  # a run whose store was lost: a new run here would overwrite what it left
        raise ConfigError(f"{run_dir} holds a run's outputs ({', '.join(orphans)}) but no run store ({STORE_FILE}); "
                          "hm3 will not overwrite them with a new run: choose a new RUN_DIR")
    if exists and check is not None:
        check(run_dir)
    return RunStore.open(run_dir, config=config, seed=seed)


def run_level1(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> Level1Result:
    """Run (or resume) the level-1 search of ``cfg`` in ``run_dir`` and write its outputs.

    ``stop_after`` ends the process-local loop after that many new evaluations
    (used to test resumption); the outputs are then not written.
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    optimizer = make_optimizer(cfg)  # unknown optimiser or options: refused before anything is loaded
    with open_run_store(run_dir, cfg.canonical(), cfg.seed, resume=resume) as store:
        ctx = Level1Context(cfg, store, log=stderr_logger(progress))
        try:
            return search_level1(ctx, run_dir, optimizer, resume=resume, progress=progress, stop_after=stop_after,
                                 start=start)
        finally:
            ctx.backend.close()  # a vLLM engine holds process-wide state until closed


def stderr_logger(enabled: bool) -> Callable[[str], None]:
    """Progress lines through the ``hm3`` logger (:mod:`hm3.log`), or a no-op."""
    return progress_logger(enabled)


def search_level1(
    ctx: Level1Context,
    out_dir: Path,
    optimizer: Optimizer,
    *,
    resume: bool,
    progress: bool = True,
    stop_after: int | None = None,
    start: float | None = None,
) -> Level1Result:
    """The level-1 loop over an open context (its store may be shared with a two-level run);
    outputs go to ``out_dir``. ``optimizer`` is fresh (:func:`make_optimizer`, which the callers run
    before opening anything so option errors come first); the ``level1_tell`` events already in the
    store are replayed into it, which is how a run resumes."""
    start = time.perf_counter() if start is None else start
    cfg, store, log = ctx.cfg, ctx.store, ctx.log
    k = len(ctx.objectives)
    log("scoring the base model and the experts (reference points)")
    refs_val, base, ideal = ctx.reference_points(ctx.validation)
    log("validation scores: " + "; ".join(f"{r}={np.round(v, 3).tolist()}" for r, v in refs_val.items()))
    for i in degenerate_objectives(base, ideal):
        logger.warning(f"no expert beats the base on {ctx.objective_names[i]} (validation); hypervolume and "
                       "rewards use it in raw units, and a merge must not fall below the base there to count")

    if optimizer.n_evaluated:
        raise ValueError("search_level1 needs a fresh optimizer: the run store's history is replayed into it")
    X: list[list[float]] = []
    Y: list[np.ndarray] = []
    ids: list[int] = []
    hv_trace: list[float] = []
    for cid, x in told_points(store):
        if len(x) != cfg.search_space.dim:
            raise StoreError(f"run store {store.path} is corrupt: told point of candidate {cid} has {len(x)} "
                             f"coordinates, this search space {cfg.search_space.dim}")
        y = ctx.scorer.cached(cid, ctx.validation)
        if y is None:
            raise ConfigError(f"run store is inconsistent: told candidate {cid} has no stored scores")
        # float64 as asked: torch.tensor(list) would make float32, and a model-based optimiser's next
        # point depends on every digit of its history (a resumed run must ask what an uninterrupted one did)
        optimizer.tell(torch.tensor([x], dtype=torch.float64), torch.tensor(normalise(y[None], base, ideal)))
        X.append(x)
        Y.append(y)
        ids.append(cid)
        hv_trace.append(protocol_hypervolume(np.stack(Y), base, ideal))
    if X:
        log(f"resumed: {len(X)} evaluations replayed from the store")

    bar = progress_bar(progress, total=cfg.optimizer.budget, initial=len(X), desc="level 1", unit="eval")
    new = 0
    while optimizer.remaining > 0 and (stop_after is None or new < stop_after):
        x = optimizer.ask(1)
        cand, y = ctx.score_point(x[0])
        optimizer.tell(x, torch.tensor(normalise(y[None], base, ideal)))
        store.add_event(TELL_EVENT, {"candidate": cand.id, "x": x[0].tolist()})
        X.append(x[0].tolist())
        Y.append(y)
        ids.append(cand.id)
        hv_trace.append(protocol_hypervolume(np.stack(Y), base, ideal))
        new += 1
        if bar is not None:
            bar.set_postfix_str(f"HV {hv_trace[-1]:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    Xa, Ya = np.array(X), np.stack(Y) if Y else np.empty((0, k))
    result = Level1Result(
        run_dir=Path(out_dir),
        objective_names=ctx.objective_names,
        X=Xa,
        Y=Ya,
        candidate_ids=ids,
        front_ids=[],
        base=base,
        ideal=ideal,
        hv_trace=hv_trace,
    )
    if optimizer.remaining > 0:
        return result
    # the BO posterior that budget-0 preference requests draw on (hm3/request.py), before the summary
    # that marks level 1 finished, so a finished level 1 always has it (when it has >= 4 points)
    save_level1_posterior(store, Path(out_dir), dict(zip(ids, Y, strict=True)), base, ideal)
    write_outputs(ctx, result, refs_val, seconds=time.perf_counter() - start, resumed=bool(resume))
    return result


def recipe_with_paths(recipe: dict, models: dict[str, str]) -> dict:
    """A stored recipe (model refs) as a file ``hm3 merge`` runs anywhere (absolute model paths)."""
    out = dict(recipe)
    out["base_model"] = str(Path(models[recipe["base_model"]]).resolve())
    out["models"] = [m | {"model": str(Path(models[m["model"]]).resolve())} for m in recipe["models"]]
    return out


def write_outputs(
    ctx: Level1Context, result: Level1Result, refs_val: dict[str, np.ndarray], *, seconds: float, resumed: bool
) -> None:
    """front.csv, summary.json, front.png and recipes/ — each written atomically."""
    cfg, store, run_dir = ctx.cfg, ctx.store, result.run_dir
    names = result.objective_names
    unique: dict[int, np.ndarray] = {}
    for cid, y in zip(result.candidate_ids, result.Y, strict=True):
        unique[cid] = y
    cids = list(unique)
    Yu = np.stack([unique[c] for c in cids])
    front_ids = [cids[i] for i in non_dominated(Yu)]
    result.front_ids = front_ids
    ctx.log(f"front: {len(front_ids)} of {len(cids)} distinct candidates; scoring them on the test split")
    refs_test, base_t, ideal_t = ctx.reference_points(ctx.test)
    rows = []
    for cid in front_ids:
        _, recipe = store.candidate(cid)
        y_test = ctx.score_recipe(cid, recipe, ctx.test)
        recipe_path = run_dir / "recipes" / f"candidate-{cid}.yml"
        atomic_write_text(recipe_path, yaml.safe_dump(recipe_with_paths(recipe, cfg.models), sort_keys=False))
        row: dict[str, Any] = {"candidate": cid, "level": 1}
        row |= {f"{n}_val": float(v) for n, v in zip(names, unique[cid], strict=True)}
        row |= {f"{n}_test": float(v) for n, v in zip(names, y_test, strict=True)}
        row["recipe"] = str(recipe_path.relative_to(run_dir))
        rows.append(row)
    import pandas as pd  # here: a preference request imports this module and needs no pandas

    df = pd.DataFrame(rows).sort_values(f"{names[0]}_val", ascending=False)
    write_csv(df, run_dir / "front.csv")
    test_front = df[[f"{n}_test" for n in names]].to_numpy()
    summary = {
        "optimizer": cfg.optimizer.name,
        "seed": cfg.seed,
        "budget": cfg.optimizer.budget,
        "evaluations": len(result.candidate_ids),
        "distinct_candidates": len(cids),
        "front_size": len(front_ids),
        "objectives": names,
        "hv_validation": protocol_hypervolume(Yu, result.base, result.ideal),
        "hv_test_front": protocol_hypervolume(test_front, base_t, ideal_t) if len(test_front) else 0.0,
        "hv_trace_validation": result.hv_trace,
        "reference_validation": {r: v.tolist() for r, v in refs_val.items()},
        "reference_test": {r: v.tolist() for r, v in refs_test.items()},
        "evaluated_examples_this_process": ctx.scorer.evaluated_examples,
        "wall_seconds_this_process": seconds,
        "resumed": resumed,
        "hv_protocol": "objectives normalised to (f - base) / (ideal - base), ideal = best expert per task; "
        "reference point = base model (0); pymoo HV",
    }
    result.summary = summary
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    plot_front(
        run_dir / "front.png",
        names,
        candidates=Yu,
        front=Yu[[cids.index(c) for c in front_ids]],
        references=refs_val,
        title=f"level 1 ({cfg.optimizer.name}, {len(result.candidate_ids)} evaluations, validation)",
        front_ids=front_ids,
        hv_trace=result.hv_trace,
    )
    ctx.log(f"wrote {run_dir / 'front.csv'}, summary.json, front.png, recipes/ (HV {summary['hv_validation']:.4f})")
