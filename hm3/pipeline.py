"""The two-level run (``hm3 run CONFIG.yml RUN_DIR``): level 1 → level 2 → test split → the final front.

Stages, each resumable from the run store and the checkpoints in ``RUN_DIR/level2/``:

1. **Level 1** -- the multi-objective search over merge coefficients (:mod:`hm3.search.level1`),
   outputs under ``RUN_DIR/level1/``. Skipped when ``level2.pool`` is ``experts`` (level 2 alone).
2. **Offline pretraining** -- one λ-conditioned policy over λ ~ Dirichlet(1) per episode; the pool
   is the experts plus the level-1 merge chosen for each episode's λ. Saved as ``level2/policy.safetensors``.
3. **Online fine-tuning** -- for each of N preference vectors, the pretrained policy is fine-tuned
   with that λ fixed; the best path found (by its reward) and the policy's final greedy path are kept.
4. **Final front** -- every level-1 candidate and every kept path, scored on the whole validation
   plan; the non-dominated set is re-scored on the test split. ``RUN_DIR`` then holds
   ``front.csv``, ``candidates.csv``, ``summary.json``, ``front.png`` and ``points/`` (one recipe or
   path file per front point, which ``hm3 export`` materialises).

Every score goes through the run store, so a killed run resumes without repeating an evaluation:
the RL stages restart from their last checkpoint (saved after every PPO update) and the episodes
replayed since then find their scores in the store.

Policy and checkpoints are safetensors state files (:mod:`hm3.runfiles`): run directories are
handed around, and reading one must run no code. An older run's ``.pt`` files are read with
torch's restricted unpickler or refused with a message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hm3.arch.level2 import (
    PATH_KIND,
    FrameKey,
    PathEvaluator,
    PoolSet,
    build_trainer,
    merge_for_preference,
    path_from_recipe,
    path_recipe,
    small_reward_subsets,
)
from hm3.arch.path import LayerPath, check_scales_exact
from hm3.arch.ppo import PPOTrainer
from hm3.arch.rl_config import ADDED_RL_DEFAULTS, Level2Config
from hm3.arch.swaps import swap_paths
from hm3.atomic import atomic_write_text
from hm3.errors import ConfigError, RunFileError, invalid_config
from hm3.log import progress_bar
from hm3.report import plot_front, write_csv
from hm3.runfiles import find_state, read_front_table, read_state, read_summary, save_state, state_path
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.level1 import (
    STORE_FILE,
    Level1Context,
    make_optimizer,
    open_run_store,
    recipe_with_paths,
    search_level1,
    stderr_logger,
)
from hm3.search.optimizers import Optimizer
from hm3.search.pareto import non_dominated, normalise, protocol_hypervolume
from hm3.search.preferences import dirichlet_preferences, validate_preferences
from hm3.search.run_config import RunConfig, parse_run_config, read_config_file
from hm3.store import RunStore

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # pandas is imported where used: a preference request needs none of it
    import pandas as pd

#: Bumped when the layout of a run directory changes; other versions are refused with a message.
RUN_FORMAT = 1
STAGE_EVENT = "stage_done"
POLICY_STEM = "policy"
POLICY_FILE = state_path(Path(POLICY_STEM)).name  # policy.safetensors (policy.pt in older runs)


class Level2Section(BaseModel):
    """The ``level2:`` section of a run config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: Literal["experts+merge", "experts"] = Field(
        "experts+merge",
        description="experts+merge: HM3 (level-1 merge for λ in the pool); experts: level 2 alone, "
        "no level-1 search, the base model frames the paths",
    )
    preferences: int | list[list[float]] = Field(
        4, description="N preference vectors λ ~ Dirichlet(1) (seeded), or an explicit list"
    )
    keep_best: int = Field(
        0,
        ge=0,
        description="also keep, for each preference λ, the N paths of the whole run (offline and online "
        "episodes) with the best lower bound of Σ λ_k f̂_k from their stored DAR scores, and score them on "
        "the whole validation plan (N × preferences full evaluations at most) [design]. 0 keeps only each "
        "λ's greedy path and best path by raw reward. On SmolLM2 the policy found whole-expert paths offline "
        "that neither rule kept (docs/BENCHMARKS.md, level-2 modes on SmolLM2)",
    )
    swaps: list[tuple[int, int]] = Field(
        [],
        description="layer swaps (k_bottom, k_top) as a prior [design]: for each preference's frame and each "
        "expert as donor, the frame's path with the donor's bottom k_bottom and top k_top layers "
        "(hm3.arch.swaps) joins the paths kept for the final front, scored on the whole validation plan "
        "(preferences × experts × len(swaps) full evaluations at most). [] (default): none",
    )
    rl: Level2Config = Level2Config()


# Level-2 keys added after runs were first stored, with their defaults: the stored config leaves them
# out while they hold these values, so runs made before them resume under the same config.
ADDED_LEVEL2_DEFAULTS: dict[str, object] = {"keep_best": 0, "swaps": []}
KEPT_EVENT = "kept_by_lower_bound"


class TwoLevelConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    level1: RunConfig
    level2: Level2Section

    def canonical(self) -> dict[str, Any]:
        level2 = json.loads(self.level2.model_dump_json())
        for section, added in ((level2, ADDED_LEVEL2_DEFAULTS), (level2["rl"], ADDED_RL_DEFAULTS)):
            for key, default in added.items():  # runs made before these fields still resume
                if section.get(key) == default:
                    del section[key]
        return {"format": RUN_FORMAT, "level1": self.level1.canonical(), "level2": level2}

    def preferences(self) -> np.ndarray:
        k = len(self.level1.objectives)
        prefs = self.level2.preferences
        if isinstance(prefs, int):
            if prefs < 1:
                raise ConfigError(f"level2.preferences must be >= 1, got {prefs}")
            return dirichlet_preferences(prefs, k, seed=self.level1.seed + 7919).numpy()
        return validate_preferences(prefs, k).numpy()


def parse_two_level_config(data: Any, *, source: str = "<config>", base_dir: Path | None = None) -> TwoLevelConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run config must be a mapping")
    data = dict(data)
    raw_l2 = data.pop("level2", None) or {}
    level1 = parse_run_config(data, source=source, base_dir=base_dir)
    try:
        level2 = Level2Section.model_validate(raw_l2)
    except ValidationError as err:
        raise invalid_config(err, source, "run config", prefix="level2.") from None
    cfg = TwoLevelConfig(level1=level1, level2=level2)
    cfg.preferences()  # wrong-length or non-normalised vectors: refused before anything runs
    return cfg


def load_two_level_config(path: str | Path) -> TwoLevelConfig:
    return parse_two_level_config(read_config_file(path), source=str(path), base_dir=Path(path).parent)


# --- the run ----------------------------------------------------------------------------------------


def stored_two_level_config(store: RunStore) -> TwoLevelConfig:
    """The config a run was created with, parsed again from its store."""
    stored = store.config()
    if not stored or "level1" not in stored:
        raise ConfigError(f"run store {store.path} holds no two-level config")
    data = dict(stored["level1"])
    data["level2"] = stored["level2"]
    return parse_two_level_config(data, source=f"{store.path} (stored config)")


def check_run_format(run_dir: Path) -> dict[str, Any]:
    """The stored two-level config; refuses level-1-only runs and other run-format versions."""
    with RunStore.open(run_dir, readonly=True) as store:
        config = store.config() or {}
    if "level2" not in config:
        raise ConfigError(f"{run_dir} holds a level-1 search ('hm3 search param'), not a two-level 'hm3 run'")
    if config.get("format") != RUN_FORMAT:
        raise ConfigError(
            f"{run_dir} was written by another hm3 version (run format {config.get('format')}, this hm3 reads "
            f"format {RUN_FORMAT}); re-run it with the version that wrote it, or start a new run"
        )
    return config


def _stages_done(store: RunStore) -> set[str]:
    return {e.payload["stage"] for e in store.events(STAGE_EVENT, fields=("stage",))}


class TwoLevelRun:
    """State shared by the stages of one run (store, models, evaluators)."""

    def __init__(self, cfg: TwoLevelConfig, run_dir: Path, store: RunStore, log: Callable[[str], None],
                 progress: bool, optimizer: Optimizer):
        self.cfg, self.run_dir, self.store, self.log, self.progress = cfg, run_dir, store, log, progress
        self.optimizer = optimizer  # level 1's, fresh
        self.l2 = cfg.level2
        self.rl = cfg.level2.rl
        self.ctx = Level1Context(cfg.level1, store, log=log)
        self.names = self.ctx.objective_names
        self.level2_dir = run_dir / "level2"
        self.level2_dir.mkdir(parents=True, exist_ok=True)

    # --- stage 1 ----------------------------------------------------------------------------------

    def level1(self, resume: bool) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
        """Level-1 candidates' validation scores, base and ideal (references when level 1 is skipped)."""
        if self.l2.pool == "experts":
            _, base, ideal = self.ctx.reference_points(self.ctx.validation)
            return {}, base, ideal
        result = search_level1(self.ctx, self.run_dir / "level1", self.optimizer, resume=resume,
                               progress=self.progress)
        # search_level1 also saved the BO posterior that requests draw on (level1/posterior.pt)
        scores = dict(zip(result.candidate_ids, result.Y, strict=True))
        self._mark("level1")
        return scores, result.base, result.ideal

    # --- stages 2 and 3 -----------------------------------------------------------------------------

    def _trainer(self, evaluator: PathEvaluator, pools: PoolSet, features: torch.Tensor, lam: np.ndarray | None,
                 frame_front: dict[int, np.ndarray], seed: int, policy_state: dict | None = None) -> PPOTrainer:
        holder: dict[str, PPOTrainer] = {}

        def frame_of() -> FrameKey:  # the frame follows the episode's λ (sampled per episode offline)
            return merge_for_preference(holder["trainer"].env.lam, frame_front) if frame_front else "base"

        holder["trainer"] = build_trainer(
            pool_size=pools.size, num_layers=pools.num_layers, n_objectives=len(self.names),
            layer_features=features, config=self.rl, scorer=evaluator.scorer_for(frame_of), lam=lam, seed=seed,
            policy_state=policy_state,
        )
        return holder["trainer"]

    def _train(self, trainer, evaluator: PathEvaluator, episodes: int, stem: Path, label: str) -> None:
        """Train for ``episodes`` in all, from the checkpoint ``stem``.safetensors (or an older run's
        ``.pt``) if there is one, checkpointing after every update."""
        ckpt = state_path(stem)
        found = find_state(stem)
        if found is not None:
            state = read_state(found, regenerate=f"delete {found} and resume (hm3 run CONFIG {self.run_dir} "
                                                 "--resume) to train this stage again from its stored scores")
            try:
                trainer.load_state_dict(state["trainer"])
                evaluator.load_state_dict(state["evaluator"])
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
                raise RunFileError(f"{found}: not a checkpoint of this run's level 2 ({type(err).__name__}: "
                                   f"{err}); delete it and resume to train this stage again") from None
            self.log(f"{label}: resumed at episode {trainer.episode} from {found.name}")
        remaining = episodes - trainer.episode
        if remaining <= 0:
            return
        bar = progress_bar(self.progress, total=episodes, initial=trainer.episode, desc=label, unit="ep")

        def on_update(stats: dict) -> None:
            save_state(ckpt, {"trainer": trainer.state_dict(), "evaluator": evaluator.state_dict()})
            if bar is not None:
                bar.update(trainer.episode - bar.n)
                best = trainer.best
                if best is not None:
                    bar.set_postfix_str(f"best reward {best[0]:.3f}")

        trainer.train(remaining, on_update=on_update)
        on_update({})
        if bar is not None:
            bar.close()

    # --- stage 4 ----------------------------------------------------------------------------------

    def full_scores(self, evaluator: PathEvaluator, path: LayerPath, frame: FrameKey, split: str) -> np.ndarray:
        plan = self.ctx.validation if split == "validation" else self.ctx.test
        return evaluator.raw_scores(path, frame, plan)

    def _mark(self, stage: str) -> None:
        if stage not in _stages_done(self.store):
            self.store.add_event(STAGE_EVENT, {"stage": stage})


def run_two_level(cfg: TwoLevelConfig, run_dir: str | Path, *, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole two-level search; returns the summary written to ``summary.json``."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    log = stderr_logger(progress)
    check_depth(cfg)  # before the store, the models and any evaluation
    check_level2_models(cfg)
    optimizer = make_optimizer(cfg.level1)  # likewise the optimiser and its options
    if resume:
        check_state_files(run_dir)  # a damaged or unsafe checkpoint: refused before any stage rewrites outputs
    with open_run_store(run_dir, cfg.canonical(), cfg.level1.seed, resume=resume, check=check_run_format) as store:
        run = TwoLevelRun(cfg, run_dir, store, log, progress, optimizer)
        try:
            return _run_stages(cfg, run, store, resume, start, log)
        finally:
            run.ctx.backend.close()  # a vLLM engine holds process-wide state until closed


def check_state_files(run_dir: Path) -> None:
    """Read every state file a resumed run will load (posterior, policy, checkpoints), so one that is
    corrupt or not safely readable stops the run before level 1 writes its outputs again."""
    for sub in ("level1", "level2"):
        folder = run_dir / sub
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in (".pt", ".safetensors") and not path.name.startswith("."):
                read_state(path, regenerate=f"delete {path} and resume again to write it anew (the run's "
                                            "scores are in its store: nothing is evaluated twice)")


def check_depth(cfg: TwoLevelConfig) -> None:
    """Refuse T_max above the models' depth on a fixed-depth engine (vLLM) before anything runs."""
    from hm3.checkpoint.reader import open_checkpoint

    rl = cfg.level2.rl
    if cfg.level1.evaluation.backend == "hf" or rl.mode != "hm3" or rl.t_max is None:
        return
    base = cfg.level1.models[cfg.level1.search_space.base_model]
    with open_checkpoint(base) as ckpt:
        depth = ckpt.num_layers
    if rl.t_max > depth:
        raise ConfigError(
            f"level2.rl.t_max = {rl.t_max}: with the {cfg.level1.evaluation.backend} backend level 2 runs paths "
            f"in an engine of the models' depth ({depth} layers, {base}), so t_max must be <= {depth}; use the "
            "hf backend for longer paths"
        )


def check_level2_models(cfg: TwoLevelConfig) -> None:
    """Refuse ``level2.rl.transition_scales`` for a model type on which scales are not exact, and
    ``level2.swaps`` that do not fit the models' depth, before anything runs."""
    if cfg.level2.rl.transition_scales is None and not cfg.level2.swaps:
        return
    from hm3.checkpoint.reader import open_checkpoint

    with open_checkpoint(cfg.level1.models[cfg.level1.search_space.base_model]) as ckpt:
        model_type, depth = ckpt.config.get("model_type"), ckpt.num_layers
    if cfg.level2.rl.transition_scales is not None:
        try:
            check_scales_exact(model_type)
        except ConfigError as e:
            raise ConfigError(f"level2.rl.transition_scales: {e}") from None
    for k_bottom, k_top in cfg.level2.swaps:
        if k_bottom < 0 or k_top < 0 or k_bottom + k_top > depth:
            raise ConfigError(f"level2.swaps: ({k_bottom}, {k_top}) does not fit models of {depth} layers")
    t_max = cfg.level2.rl.t_max
    if cfg.level2.swaps and t_max is not None and t_max < depth:
        raise ConfigError(f"level2.swaps: a swap has the models' {depth} layers, more than level2.rl.t_max = {t_max}")


def _swap_candidates(run: TwoLevelRun, pools: PoolSet, lams: np.ndarray,
                     frame_front: dict[int, np.ndarray]) -> dict[int, dict[str, Any]]:
    """The ``level2.swaps`` paths for each preference's frame and each expert as donor (store ids)."""
    out: dict[int, dict[str, Any]] = {}
    for lam in lams:
        frame = merge_for_preference(lam, frame_front) if frame_front else "base"
        paths = swap_paths(pools.num_layers, pools.size - 1, range(pools.size - 1), run.l2.swaps)
        for label, path in paths.items():
            cand = run.store.add_candidate(path_recipe(path, frame, pools.expert_refs), PATH_KIND)
            out.setdefault(cand.id, {"lam": lam.tolist(), "frame": frame, "kept_by": f"swap {label}"})
    return out


def _run_stages(cfg: TwoLevelConfig, run: TwoLevelRun, store: RunStore, resume: bool, start: float,
                log: Callable[[str], None]) -> dict[str, Any]:
    """Stages 1-4 over an open run (module docstring)."""
    level1_scores, base, ideal = run.level1(resume)
    l1_ids = list(level1_scores)
    front_ids = [l1_ids[i] for i in non_dominated(np.stack(list(level1_scores.values())))] if l1_ids else []
    frame_front = {cid: normalise(level1_scores[cid][None], base, ideal)[0] for cid in front_ids}
    frames: list[FrameKey] = list(front_ids) if front_ids else ["base"]
    pools = PoolSet(run.ctx)
    features = pools.features(frames)
    rl = cfg.level2.rl
    t_max = rl.resolved_t_max(pools.num_layers) if rl.mode == "hm3" else None
    small = small_reward_subsets(run.ctx.validation, rl.data_scale) if rl.dar else {}
    if small:
        logger.warning("DAR rewards will use only " + ", ".join(f"{n} {name}" for name, n in small.items())
                       + f" example(s) per evaluation (data_scale {rl.data_scale}); rewards that small are noisier than the "
            "differences between paths: raise rl.data_scale or evaluation.validation_examples")

    def evaluator(seed: int) -> PathEvaluator:
        return PathEvaluator(run.ctx, pools, base=base, ideal=ideal, dar=rl.dar, data_scale=rl.data_scale,
                             seed=seed, t_max=t_max)

    # stage 2: offline pretraining over λ ~ Dirichlet(1)
    pre_eval = evaluator(cfg.level1.seed)
    pre = run._trainer(pre_eval, pools, features, None, frame_front, cfg.level1.seed)
    log(f"level 2: pretraining the λ-conditioned policy ({rl.offline_episodes} episodes, "
        f"pool = {len(pools.expert_refs)} experts + {'level-1 merge' if front_ids else 'base'})")
    run._train(pre, pre_eval, rl.offline_episodes, run.level2_dir / "pretrain", "pretrain")
    save_state(run.level2_dir / POLICY_FILE, {
        "policy": dict(pre.policy.state_dict()), "config": rl.model_dump(mode="json"),
        "pool_size": pools.size, "num_layers": pools.num_layers, "objectives": run.names,
        "frames": frames, "frame_front": {int(c): v.tolist() for c, v in frame_front.items()},
        "layer_features": features, "base": base.tolist(), "ideal": ideal.tolist(),
        "expert_refs": pools.expert_refs,
    })
    run._mark("pretrain")

    # stage 3: online fine-tuning per preference vector
    kept: dict[int, dict[str, Any]] = {}  # candidate id -> where it came from
    lams = cfg.preferences()
    for i, lam in enumerate(lams):
        online_eval = evaluator(cfg.level1.seed + 1 + i)
        # from the pretrained policy (a checkpoint of this stage, if any, replaces it in _train)
        tr = run._trainer(online_eval, pools, features, lam, frame_front, cfg.level1.seed + 1 + i,
                          policy_state=pre.policy.state_dict())
        ckpt = run.level2_dir / f"online-{i}"
        frame = merge_for_preference(lam, frame_front) if frame_front else "base"
        run._train(tr, online_eval, rl.online_episodes, ckpt, f"λ {i + 1}/{len(lams)} {np.round(lam, 2).tolist()}")
        paths = [tr.greedy_path(lam)] + ([tr.best[1]] if tr.best is not None else [])
        for path in (p for p in paths if p.hops):  # RMM's greedy rollout may back out: no path
            cand = online_eval.candidate(path, frame)
            kept.setdefault(cand.id, {"lam": lam.tolist(), "frame": frame})
        run._mark(f"online-{i}")

    for cid, info in _kept_by_lower_bound(store, cfg, lams, run.names, base, ideal).items():
        kept.setdefault(cid, info)
    for cid, info in _swap_candidates(run, pools, lams, frame_front).items():
        kept.setdefault(cid, info)

    # stage 4: final front over both levels
    log("final front: scoring kept paths on the whole validation plan")
    final_eval = PathEvaluator(run.ctx, pools, base=base, ideal=ideal, dar=False, data_scale=1.0, seed=0,
                               t_max=t_max)
    rows: dict[int, dict[str, Any]] = {}
    for cid, y in level1_scores.items():
        rows[cid] = {"candidate": cid, "level": 1, "kind": "merge", "val": y}
    for cid in kept:
        _, recipe = store.candidate(cid)
        path, frame = path_from_recipe(recipe)
        rows[cid] = {"candidate": cid, "level": 2, "kind": PATH_KIND, "val": run.full_scores(final_eval, path,
                     frame, "validation"), "hops": len(path.hops), "frame": frame}
    summary = _write_final(run, final_eval, rows, base, ideal, start, kept, level1_scores)
    run._mark("final")
    return summary


def _kept_by_lower_bound(store: RunStore, cfg: TwoLevelConfig, lams: np.ndarray, names: list[str],
                         base: np.ndarray, ideal: np.ndarray) -> dict[int, dict[str, Any]]:
    """``level2.keep_best`` paths per λ by the lower bound of their stored scores (``{}`` when 0).

    Chosen once, when the online stage ends, and recorded as a store event: the final stage adds
    whole-plan scores to the store, so a resumed run must not rank again on different data.
    """
    n = cfg.level2.keep_best
    if n == 0:
        return {}
    recorded = store.events(KEPT_EVENT)
    if recorded:
        return {int(c): v for c, v in recorded[-1].payload.items()}
    estimates = {}
    for ref in store.candidates(PATH_KIND):
        estimate = stored_estimate(store, ref, names)
        if estimate is not None:
            estimates[ref.id] = estimate
    chosen: dict[int, dict[str, Any]] = {}
    for lam in lams:
        ranked = sorted(estimates, key=lambda c: (-lower_bound(lam, estimates[c], base, ideal), c))
        for cid in ranked[:n]:
            _, recipe = store.candidate(cid)
            chosen.setdefault(cid, {"lam": lam.tolist(), "frame": recipe["frame"], "kept_by": "lower bound"})
    store.add_event(KEPT_EVENT, {str(c): v for c, v in chosen.items()})
    return chosen


def _write_final(run: TwoLevelRun, evaluator: PathEvaluator, rows: dict[int, dict[str, Any]], base: np.ndarray, ideal: np.ndarray,
                 start: float, kept: dict[int, dict[str, Any]], level1_scores: dict[int, np.ndarray]) -> dict[str, Any]:
    cfg, names, store, run_dir = run.cfg, run.names, run.store, run.run_dir
    ids = list(rows)
    Y = np.stack([rows[c]["val"] for c in ids])
    front_ids = [ids[i] for i in non_dominated(Y)]
    run.log(f"front: {len(front_ids)} of {len(ids)} candidates; scoring them on the test split")
    refs_test, base_t, ideal_t = run.ctx.reference_points(run.ctx.test)
    refs_val = run.ctx.references(run.ctx.validation)
    val_rows = {
        cid: {"point": cid, "level": r["level"], "kind": r["kind"]}
        | {f"{n}_val": float(v) for n, v in zip(names, r["val"], strict=True)}
        for cid, r in rows.items()
    }
    table = []
    for cid in front_ids:
        r = rows[cid]
        _, recipe = store.candidate(cid)
        if r["kind"] == "merge":
            y_test = run.ctx.score_recipe(cid, recipe, run.ctx.test)
            file = run_dir / "points" / f"point-{cid}.yml"
            atomic_write_text(file, yaml.safe_dump(recipe_with_paths(recipe, cfg.level1.models), sort_keys=False))
        else:
            path, frame = path_from_recipe(recipe)
            y_test = run.full_scores(evaluator, path, frame, "test")
            file = run_dir / "points" / f"point-{cid}.json"
            atomic_write_text(file, json.dumps(path_point_file(recipe, store, cfg.level1), indent=2))
        table.append(val_rows[cid] | {f"{n}_test": float(v) for n, v in zip(names, y_test, strict=True)}
                     | {"file": str(file.relative_to(run_dir))})
    run.ctx.restore_live_model()
    import pandas as pd

    df = pd.DataFrame(table).sort_values(f"{names[0]}_val", ascending=False)
    write_csv(df, run_dir / "front.csv")
    write_csv(pd.DataFrame(list(val_rows.values())), run_dir / "candidates.csv")
    l1 = np.stack(list(level1_scores.values())) if level1_scores else np.empty((0, len(names)))
    l2 = np.stack([rows[c]["val"] for c in kept]) if kept else np.empty((0, len(names)))
    summary = {
        "run_format": RUN_FORMAT,
        "objectives": names,
        "pool": cfg.level2.pool,
        "mode": cfg.level2.rl.mode,
        "candidates": len(ids),
        "front_size": len(front_ids),
        "front_levels": {str(lv): int(sum(rows[c]["level"] == lv for c in front_ids)) for lv in (1, 2)},
        "hv_validation": protocol_hypervolume(Y, base, ideal),
        "hv_validation_level1": protocol_hypervolume(l1, base, ideal),
        "hv_validation_level2": protocol_hypervolume(l2, base, ideal),
        "hv_test_front": protocol_hypervolume(df[[f"{n}_test" for n in names]].to_numpy(), base_t, ideal_t),
        "preferences": cfg.preferences().tolist(),
        "level2_paths": {str(c): v for c, v in kept.items()},
        "reference_validation": {r: v.tolist() for r, v in refs_val.items()},
        "reference_test": {r: v.tolist() for r, v in refs_test.items()},
        "base_validation": base.tolist(),
        "ideal_validation": ideal.tolist(),
        "evaluated_examples_this_process": run.ctx.scorer.evaluated_examples,
        "wall_seconds_this_process": time.perf_counter() - start,
        "hv_protocol": "objectives normalised to (f - base) / (ideal - base), ideal = best expert per task; "
        "reference point = base model (0); pymoo HV",
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    replot(run_dir)
    run.log(f"wrote {run_dir}/front.csv, candidates.csv, summary.json, front.png, points/ "
            f"(HV validation {summary['hv_validation']:.4f}: level 1 {summary['hv_validation_level1']:.4f}, "
            f"level 2 {summary['hv_validation_level2']:.4f})")
    return summary


def path_point_file(recipe: dict[str, Any], store: RunStore, cfg: RunConfig) -> dict[str, Any]:
    """A front path as a self-contained file: hops, expert directories and the frame (a recipe or the base)."""
    frame = recipe["frame"]
    frame_recipe = None if frame == "base" else recipe_with_paths(store.candidate(int(frame))[1], cfg.models)
    return {
        "path": recipe["path"],
        "experts": {ref: str(Path(cfg.models[ref]).resolve()) for ref in recipe["experts"]},
        "frame": frame,
        "frame_recipe": frame_recipe,
        "base_model": str(Path(cfg.models[cfg.search_space.base_model]).resolve()),
    }


# --- reading a finished run -------------------------------------------------------------------------


def finished_summary(run_dir: str | Path) -> dict[str, Any]:
    """The summary of a finished run (refuses unfinished runs, naming what is missing)."""
    run_dir = Path(run_dir)
    if not (run_dir / STORE_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory ({STORE_FILE} not found)")
    check_run_format(run_dir)
    missing = [f for f in ("front.csv", "summary.json", "candidates.csv") if not (run_dir / f).is_file()]
    if missing:
        with RunStore.open(run_dir, readonly=True) as store:
            done = sorted(_stages_done(store))
        raise ConfigError(
            f"{run_dir} holds an unfinished run ({', '.join(missing)} missing; stages done: "
            f"{', '.join(done) or 'none'}); finish it with: hm3 run CONFIG.yml {run_dir} --resume"
        )
    return read_summary(run_dir / "summary.json", keys=SUMMARY_KEYS, regenerate=_rewrite_hint(run_dir))


#: What readers of a finished two-level run take from its summary.json.
SUMMARY_KEYS = ("objectives", "front_size", "candidates", "base_validation", "ideal_validation",
                "reference_validation", "hv_validation", "hv_test_front")


def _rewrite_hint(run_dir: Path) -> str:
    return (f"'hm3 run CONFIG.yml {run_dir} --resume' writes the run's outputs again from its store "
            "(nothing is evaluated twice)")


def read_front(run_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The front table and summary of a finished run (refuses unfinished runs, naming what is missing)."""
    import pandas as pd

    _, summary = read_front_rows(run_dir)  # refuses a truncated or damaged table first
    return pd.read_csv(Path(run_dir) / "front.csv"), summary


def read_front_rows(run_dir: str | Path) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """:func:`read_front` as rows of strings, for callers that must start fast (a preference
    request): the standard library's csv reader instead of pandas."""
    summary = finished_summary(run_dir)
    rows = read_front_table(Path(run_dir) / "front.csv", rows=int(summary["front_size"]), id_column="point",
                            regenerate=_rewrite_hint(Path(run_dir)),
                            columns=tuple(f"{n}_val" for n in summary["objectives"]))
    return rows, summary


def replot(run_dir: str | Path) -> Path:
    """front.png again from candidates.csv, front.csv and the summary's reference scores."""
    run_dir = Path(run_dir)
    import pandas as pd

    df, summary = read_front(run_dir)
    cands = pd.read_csv(run_dir / "candidates.csv")
    names = summary["objectives"]
    cols = [f"{n}_val" for n in names]
    return plot_front(
        run_dir / "front.png", names, candidates=cands[cols].to_numpy(), front=df[cols].to_numpy(),
        references={r: np.array(v) for r, v in summary["reference_validation"].items()},
        title=f"two-level front ({summary['candidates']} candidates, validation)",
        paths=(df["level"] == 2).to_numpy(), front_ids=df["point"].tolist(), hv_trace=_level1_trace(run_dir),
    )


def _level1_trace(run_dir: Path) -> list[float]:
    """Level 1's hypervolume after each evaluation ([] when level 1 was skipped)."""
    file = run_dir / "level1" / "summary.json"
    return json.loads(file.read_text()).get("hv_trace_validation", []) if file.is_file() else []


def export_point(run_dir: str | Path, point: int, out_dir: str | Path, *, overwrite: bool = False,
                 force: bool = False) -> Path:
    """Materialise front point ``point`` of a finished run as a Hugging Face checkpoint (never into,
    over or around the run directory or the models it merges; :mod:`hm3.outputs`)."""
    from hm3.materialise import write_merge, write_path
    from hm3.outputs import check_output_dir

    run_dir = Path(run_dir)
    df, _ = read_front(run_dir)
    with RunStore.open(run_dir, readonly=True) as store:
        models = stored_two_level_config(store).level1.models.values()
    check_output_dir(out_dir, overwrite=overwrite, force=force, inputs=[run_dir, *models])
    rows = df[df["point"] == point]
    if rows.empty:
        raise ConfigError(f"{run_dir}: no front point {point}; front points: {', '.join(map(str, df['point']))}")
    file = run_dir / rows.iloc[0]["file"]
    if not file.is_file():
        raise ConfigError(f"{run_dir}: the file of front point {point} is missing: {file}")
    kw = {"overwrite": overwrite, "force": force, "inputs": [run_dir]}
    if file.suffix == ".json":
        return write_path(json.loads(file.read_text()), out_dir, **kw)
    return write_merge(yaml.safe_load(file.read_text()), out_dir, **kw)

