"""The two-level run (``hm3 run CONFIG.yml RUN_DIR``): level 1 → level 2 → test split → the final front.

Stages, each resumable from the run store and the checkpoints in ``RUN_DIR/level2/``:

1. **Level 1** -- the multi-objective search over merge coefficients (:mod:`hm3.search.level1`),
   outputs under ``RUN_DIR/level1/``. Skipped when ``level2.pool`` is ``experts`` (level 2 alone).
2. **Offline pretraining** -- one λ-conditioned policy over λ ~ Dirichlet(1) per episode; the pool
   is the experts plus the level-1 merge chosen for each episode's λ. Saved as ``level2/policy.safetensors``.
3. **Online fine-tuning** -- for each of N preference vectors, the pretrained policy is fine-tuned
   with that λ fixed; the best path found (by its reward) and the policy's final greedy path are kept.
4. **Final front** -- every level-1 candidate and every kept path, scored on the whole validation
   plan; the non-dominated set is re-scored on the test split. ``RUN_DIR`` then holds the run
   directory's outputs (:mod:`hm3.run.directory`): ``front.csv``, ``candidates.csv``,
   ``summary.json``, ``front.png`` and ``points/`` (one recipe or path file per front point, which
   ``hm3 export`` materialises).

Every stage scores through one evaluation session (:mod:`hm3.eval.session`), so every score goes
through the run store and a killed run resumes without repeating an evaluation: the RL stages restart from their last checkpoint (saved after every PPO update) and the episodes
replayed since then find their scores in the store.

Policy and checkpoints are safetensors state files (:mod:`hm3.runfiles`): run directories are
handed around, and reading one must run no code. An older run's ``.pt`` files are read with
torch's restricted unpickler or refused with a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hm3.arch.level2 import (
    PATH_KIND,
    FrameKey,
    PathEvaluator,
    build_trainer,
    episode_lanes,
    merge_for_preference,
    path_from_recipe,
    path_recipe,
    small_reward_subsets,
)
from hm3.arch.path import check_scales_exact
from hm3.arch.ppo import PPOTrainer
from hm3.arch.swaps import swap_paths
from hm3.errors import ConfigError, RunFileError
from hm3.eval.session import MERGE_KIND, EvaluationSession
from hm3.log import progress_bar
from hm3.run.config import TwoLevelConfig
from hm3.run.directory import (
    LEVEL1_DIR,
    LEVEL2_DIR,
    POLICY_STEM,
    STAGE_EVENT,
    new_run_discarded_on_refusal,
    open_run_store,
    stages_done,
)
from hm3.run.front import CandidateRow, write_front, write_summary
from hm3.runfiles import find_state, read_state, save_state, state_path
from hm3.search.estimates import lower_bound, stored_estimate
from hm3.search.level1 import evaluation_executor, make_optimizer, open_session, search_level1, stderr_logger
from hm3.search.optimizers import Optimizer
from hm3.search.pareto import non_dominated, normalise, protocol_hypervolume
from hm3.search.references import reference_points
from hm3.store import RunStore

logger = logging.getLogger(__name__)

POLICY_FILE = state_path(Path(POLICY_STEM)).name  # policy.safetensors (policy.pt in older runs)
KEPT_EVENT = "kept_by_lower_bound"


class TwoLevelRun:
    """State shared by the stages of one run (store, evaluation session, level 1's optimiser)."""

    def __init__(self, cfg: TwoLevelConfig, run_dir: Path, session: EvaluationSession, log: Callable[[str], None],
                 progress: bool, optimizer: Optimizer):
        self.cfg, self.run_dir, self.session, self.log, self.progress = cfg, run_dir, session, log, progress
        self.store = session.store
        self.optimizer = optimizer  # level 1's, fresh
        self.l2 = cfg.level2
        self.rl = cfg.level2.rl
        self.names = session.objective_names
        self.level2_dir = run_dir / LEVEL2_DIR
        self.level2_dir.mkdir(parents=True, exist_ok=True)

    # --- stage 1 ----------------------------------------------------------------------------------

    def level1(self, resume: bool) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
        """Level-1 candidates' validation scores, base and ideal (references when level 1 is skipped)."""
        if self.l2.pool == "experts":
            _, base, ideal = reference_points(self.session, self.cfg.level1.search_space, self.session.validation)
            return {}, base, ideal
        result = search_level1(self.cfg.level1, self.session, self.run_dir / LEVEL1_DIR, self.optimizer,
                               resume=resume, progress=self.progress, log=self.log, refinements=False)
        # search_level1 also saved the BO posterior that requests draw on (level1/posterior.pt)
        scores = dict(zip(result.candidate_ids, result.Y, strict=True))
        self._mark("level1")
        return scores, result.base, result.ideal

    # --- stages 2 and 3 -----------------------------------------------------------------------------

    def _trainer(self, evaluator: PathEvaluator, features: torch.Tensor, lam: np.ndarray | None,
                 frame_front: dict[int, np.ndarray], seed: int, policy_state: dict | None = None) -> PPOTrainer:
        def frame_for(episode_lam: np.ndarray) -> FrameKey:  # the frame follows the episode's λ
            return merge_for_preference(episode_lam, frame_front) if frame_front else "base"

        layout = self.session.pool_layout()
        return build_trainer(
            pool_size=layout.size, num_layers=layout.num_layers, n_objectives=len(self.names),
            layer_features=features, config=self.rl, scorer=evaluator.scorer_for(frame_for), lam=lam, seed=seed,
            policy_state=policy_state, lanes=episode_lanes(self.session),
        )

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

    def _mark(self, stage: str) -> None:
        if stage not in stages_done(self.store):
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
    # and a device this machine lacks, a missing Ray, a cluster too small for the workers
    made = not run_dir.exists()
    with evaluation_executor(cfg.level1, log) as executor, \
            open_run_store(run_dir, cfg.canonical(), cfg.level1.seed, resume=resume,
                           inputs=cfg.level1.models.values()) as store:
        with new_run_discarded_on_refusal(run_dir, store, new=not resume, made=made):
            session = open_session(cfg.level1, store, log, executor)
        try:
            run = TwoLevelRun(cfg, run_dir, session, log, progress, optimizer)
            return _run_stages(cfg, run, store, resume, start, log)
        finally:
            session.close()  # a vLLM engine holds process-wide state until closed


def check_state_files(run_dir: Path) -> None:
    """Read every state file a resumed run will load (posterior, policy, checkpoints), so one that is
    corrupt or not safely readable stops the run before level 1 writes its outputs again."""
    for sub in (LEVEL1_DIR, LEVEL2_DIR):
        folder = run_dir / sub
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.suffix in (".pt", ".safetensors") and not path.name.startswith("."):
                read_state(path, regenerate=f"delete {path} and resume again to write it anew (the run's "
                                            "scores are in its store: nothing is evaluated twice)")


def check_depth(cfg: TwoLevelConfig) -> None:
    """Refuse paths longer than the models' depth on a fixed-depth engine (vLLM) before anything runs:
    hm3's T_max, or RMM's step cap (its back move re-takes blocks, :meth:`Level2Config.max_path_hops`)."""
    from hm3.checkpoint.reader import open_checkpoint

    rl = cfg.level2.rl
    if cfg.level1.evaluation.backend == "hf" or (rl.mode == "hm3" and rl.t_max is None):
        return
    base = cfg.level1.models[cfg.level1.search_space.base_model]
    with open_checkpoint(base) as ckpt:
        depth = ckpt.num_layers
    engine = (f"with the {cfg.level1.evaluation.backend} backend level 2 runs paths in an engine of the models' "
              f"depth ({depth} layers, {base})")
    if rl.mode == "hm3" and rl.t_max > depth:
        raise ConfigError(f"level2.rl.t_max = {rl.t_max}: {engine}, so t_max must be <= {depth}; use the hf "
                          "backend for longer paths")
    if rl.mode == "rmm" and rl.max_path_hops(depth) > depth:
        raise ConfigError(
            f"level2.rl.mode rmm: with rmm_max_steps = {rl.resolved_rmm_max_steps(depth)} a path can take up to "
            f"{rl.max_path_hops(depth)} blocks (back re-takes them); {engine}, so set level2.rl.rmm_max_steps "
            f"<= {depth + 1} or use the hf backend"
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


def _swap_candidates(run: TwoLevelRun, lams: np.ndarray,
                     frame_front: dict[int, np.ndarray]) -> dict[int, dict[str, Any]]:
    """The ``level2.swaps`` paths for each preference's frame and each expert as donor (store ids)."""
    out: dict[int, dict[str, Any]] = {}
    layout = run.session.pool_layout()
    for lam in lams:
        frame = merge_for_preference(lam, frame_front) if frame_front else "base"
        paths = swap_paths(layout.num_layers, layout.size - 1, range(layout.size - 1), run.l2.swaps)
        for label, path in paths.items():
            cand = run.store.add_candidate(path_recipe(path, frame, layout.experts), PATH_KIND)
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
    session = run.session
    layout = session.pool_layout()
    features = session.layer_features(frames)
    rl = cfg.level2.rl
    t_max = rl.resolved_t_max(layout.num_layers) if rl.mode == "hm3" else None  # rmm: check_depth bounds it
    small = small_reward_subsets(session.validation, rl.data_scale) if rl.dar else {}
    if small:
        logger.warning("DAR rewards will use only " + ", ".join(f"{n} {name}" for name, n in small.items())
                       + f" example(s) per evaluation (data_scale {rl.data_scale}); rewards that small are noisier "
                       "than the differences between paths: raise rl.data_scale or evaluation.validation_examples")

    workers = WorkerWindow(session)  # the executor's utilisation over stages 2 and 3

    def evaluator(seed: int) -> PathEvaluator:
        return PathEvaluator(session, base=base, ideal=ideal, dar=rl.dar, data_scale=rl.data_scale, seed=seed,
                             t_max=t_max)

    # stage 2: offline pretraining over λ ~ Dirichlet(1)
    pre_eval = evaluator(cfg.level1.seed)
    pre = run._trainer(pre_eval, features, None, frame_front, cfg.level1.seed)
    log(f"level 2: pretraining the λ-conditioned policy ({rl.offline_episodes} episodes, "
        f"pool = {len(layout.experts)} experts + {'level-1 merge' if front_ids else 'base'})")
    run._train(pre, pre_eval, rl.offline_episodes, run.level2_dir / "pretrain", "pretrain")
    save_state(run.level2_dir / POLICY_FILE, {
        "policy": dict(pre.policy.state_dict()), "config": rl.model_dump(mode="json"),
        "pool_size": layout.size, "num_layers": layout.num_layers, "objectives": run.names,
        "frames": frames, "frame_front": {int(c): v.tolist() for c, v in frame_front.items()},
        "layer_features": features, "base": base.tolist(), "ideal": ideal.tolist(),
        "expert_refs": list(layout.experts),
    })
    run._mark("pretrain")

    # stage 3: online fine-tuning per preference vector
    kept: dict[int, dict[str, Any]] = {}  # candidate id -> where it came from
    lams = cfg.preferences()
    for i, lam in enumerate(lams):
        online_eval = evaluator(cfg.level1.seed + 1 + i)
        # from the pretrained policy (a checkpoint of this stage, if any, replaces it in _train)
        tr = run._trainer(online_eval, features, lam, frame_front, cfg.level1.seed + 1 + i,
                          policy_state=pre.policy.state_dict())
        ckpt = run.level2_dir / f"online-{i}"
        frame = merge_for_preference(lam, frame_front) if frame_front else "base"
        run._train(tr, online_eval, rl.online_episodes, ckpt, f"λ {i + 1}/{len(lams)} {np.round(lam, 2).tolist()}")
        paths = [tr.greedy_path(lam)] + ([tr.best[1]] if tr.best is not None else [])
        for path in (p for p in paths if p.hops):  # RMM's greedy rollout may back out: no path
            cand = online_eval.candidate(path, frame)
            kept.setdefault(cand.id, {"lam": lam.tolist(), "frame": frame})
        run._mark(f"online-{i}")

    level2_workers = workers.summary()
    for cid, info in _kept_by_lower_bound(store, cfg, lams, run.names, base, ideal,
                                          utility_maps=session.utility_maps).items():
        kept.setdefault(cid, info)
    for cid, info in _swap_candidates(run, lams, frame_front).items():
        kept.setdefault(cid, info)

    # stage 4: final front over both levels
    log("final front: scoring kept paths on the whole validation plan")
    final_eval = PathEvaluator(session, base=base, ideal=ideal, dar=False, data_scale=1.0, seed=0, t_max=t_max)
    rows: dict[int, CandidateRow] = {}
    for cid, y in level1_scores.items():
        rows[cid] = CandidateRow(cid, 1, MERGE_KIND, y)
    for cid in kept:
        _, recipe = store.candidate(cid)
        path, frame = path_from_recipe(recipe)
        rows[cid] = CandidateRow(cid, 2, PATH_KIND, final_eval.raw_scores(path, frame, session.validation))
    summary = _write_final(run, list(rows.values()), base, ideal, start, kept, level1_scores, level2_workers)
    run._mark("final")
    return summary


class WorkerWindow:
    """How busy an executor's workers were from its construction to :meth:`summary` (level 2's episodes),
    with the fields level 1's summary has (:func:`hm3.search.level1.executor_summary`); nothing for a
    local session."""

    def __init__(self, session: EvaluationSession):
        from hm3.eval.parallel import ExecutorSession

        self.executor = session.executor if isinstance(session, ExecutorSession) else None
        if self.executor is not None:
            getattr(self.executor, "restart_utilisation", lambda: None)()
            self.replaced_before = int(getattr(self.executor, "replaced", 0))

    def summary(self) -> dict[str, Any]:
        if self.executor is None:
            return {}
        return {"workers": self.executor.workers,
                "episode_order": "scored together per worker, taken in episode order: the episodes do not "
                                 "depend on the workers",
                **dict(getattr(self.executor, "utilisation", dict)()),
                "workers_replaced": int(getattr(self.executor, "replaced", 0)) - self.replaced_before}


def _kept_by_lower_bound(store: RunStore, cfg: TwoLevelConfig, lams: np.ndarray, names: list[str],
                         base: np.ndarray, ideal: np.ndarray, *,
                         utility_maps: list[str] | None = None) -> dict[int, dict[str, Any]]:
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
        estimate = stored_estimate(store, ref, names, utility_maps=utility_maps)
        if estimate is not None:
            estimates[ref.id] = estimate
    chosen: dict[int, dict[str, Any]] = {}
    for lam in lams:
        ranked = sorted(estimates, key=lambda c: (-lower_bound(lam, estimates[c], base, ideal, utility_maps), c))
        for cid in ranked[:n]:
            _, recipe = store.candidate(cid)
            chosen.setdefault(cid, {"lam": lam.tolist(), "frame": recipe["frame"], "kept_by": "lower bound"})
    store.add_event(KEPT_EVENT, {str(c): v for c, v in chosen.items()})
    return chosen


def _write_final(run: TwoLevelRun, rows: list[CandidateRow], base: np.ndarray, ideal: np.ndarray, start: float,
                 kept: dict[int, dict[str, Any]], level1_scores: dict[int, np.ndarray],
                 level2_workers: dict[str, Any]) -> dict[str, Any]:
    """The run directory's outputs (:mod:`hm3.run.front`) over both levels' candidates."""
    cfg, names, run_dir = run.cfg, run.names, run.run_dir
    written = write_front(run.session, cfg.level1, run_dir, rows, base, ideal, log=run.log)
    l1 = np.stack(list(level1_scores.values())) if level1_scores else np.empty((0, len(names)))
    l2 = np.stack([r.validation for r in rows if r.point in kept]) if kept else np.empty((0, len(names)))
    summary = {
        "run_kind": "two-level",
        **written.summary,
        "pool": cfg.level2.pool,
        "mode": cfg.level2.rl.mode,
        "hv_validation_level1": protocol_hypervolume(l1, base, ideal),
        "hv_validation_level2": protocol_hypervolume(l2, base, ideal),
        "preferences": cfg.preferences().tolist(),
        "level2_paths": {str(c): v for c, v in kept.items()},
        **({"level2_workers": level2_workers} if level2_workers else {}),
        "evaluated_examples_this_process": run.session.evaluated_examples,
        "wall_seconds_this_process": time.perf_counter() - start,
    }
    write_summary(run_dir, summary)
    written.plot(run_dir, summary)
    run.log(f"wrote {run_dir}/front.csv, candidates.csv, summary.json, front.png, points/ "
            f"(HV validation {summary['hv_validation']:.4f}: level 1 {summary['hv_validation_level1']:.4f}, "
            f"level 2 {summary['hv_validation_level2']:.4f})")
    return summary
