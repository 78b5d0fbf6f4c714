"""``hm3 zoo build DIR``: train the tiny base and experts, measure the quality bar, write ``zoo.json``.

Layout of DIR: ``base/``, ``math/``, ``code/``, ``translation/`` (HF model
directories: safetensors, config.json, the character tokenizer) and
``zoo.json`` (models, objectives, spec + its hash, the 4×3 score matrices on
validation and test, the TIES-grid result and whether the quality bar holds).
A DIR whose zoo.json carries the same spec hash is reused, not rebuilt. The
whole zoo is built in a sibling temporary directory and renamed into place, so
DIR is never half-built.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hm3.atomic import atomic_write_text, share_files
from hm3.errors import ConfigError, OutputExistsError
from hm3.log import progress_logger
from hm3.zoo.shipped import file_hashes
from hm3.zoo.spec import DEFAULT_ZOO_SIZE, ZOO_FORMAT, ZooSpec, zoo_spec
from objectives.zoo import ZOO_TASKS, specialist_item, zoo_objective

logger = logging.getLogger(__name__)

MODELS = ("base", *ZOO_TASKS)
TASK_SEED = 0  # the zoo trains and scores on the canonical zoo:<task> data; the zoo seed varies the weights
# The bar's TIES grid: every per-expert weight triple from TIES_WEIGHTS (27 merges), unnormalised.
# Per-expert weights, because one weight for all cannot favour the task whose gain a merge loses
# most, and the bar judges the worst task. The range spans ~3/4 of the plain average (1/3 each) to
# ~1.7x it: wider sums collapse these models (w = 1 each sends math to ~0), and a weight of 0.7, when
# tried in the grid, was never part of the best merge.
TIES_WEIGHTS = (0.25, 0.4, 0.55)
TIES_DENSITIES = (1.0,)
# the contract every zoo is measured against: specialised experts, a weak base, mergeable experts
MIN_EXPERT_MARGIN = 0.2
MIN_TIES_GAIN_KEPT = 0.5

# Always this many threads, whatever the machine: float sums depend on the thread count, so a fixed
# count keeps "same spec hash, same weights" on one kind of CPU (other CPUs' kernels still differ).
# Two make a step ~1.3-1.5x faster than one on a quiet 2-core machine.
BUILD_THREADS = 2

Matrix = dict[str, dict[str, float]]  # model -> task -> score


@dataclass(frozen=True)
class ZooManifest:
    """What ``zoo.json`` holds; model paths are relative to the zoo directory."""

    format: int
    spec: dict[str, Any]
    spec_hash: str
    models: dict[str, str]
    experts: dict[str, str]  # objective name -> model name
    objectives: list[str]
    scores_validation: Matrix
    scores_test: Matrix
    ties_grid: list[dict[str, Any]]
    ties_best: dict[str, Any]
    quality_bar: dict[str, Any]
    build_seconds: float
    load_average: float | None  # 1-minute load when the build started: timings on a shared machine
    # the bar's chosen merge on the test split, which the choice never saw: how well the bar holds beyond
    # the examples it was judged on
    ties_best_test: dict[str, Any] | None = None
    files: dict[str, str] | None = None  # model file -> sha256 (what a shipped zoo is verified against)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def read(cls, path: str | Path) -> ZooManifest:
        """The manifest in ``path`` (a zoo directory or its zoo.json)."""
        path = Path(path)
        path = path / "zoo.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no zoo here (use builtin:micro, or build one with 'hm3 zoo build')") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not a zoo manifest ({e})") from None
        found = data.get("format") if isinstance(data, dict) else None
        if found != ZOO_FORMAT:
            raise ConfigError(f"{path}: a zoo of format {found!r}, but this hm3 reads zoo format {ZOO_FORMAT}; "
                              f"rebuild it with 'hm3 zoo build {path.parent} --overwrite', or use the shipped "
                              "zoo (zoo: builtin:micro)")
        try:
            manifest = cls(**data)
        except TypeError as e:
            raise ConfigError(f"{path}: not a zoo manifest of this hm3 version ({e})") from None
        problem = manifest.shape_problem()
        if problem:
            raise ConfigError(f"{path}: not a usable zoo manifest: {problem}")
        return manifest

    def shape_problem(self) -> str | None:
        """What is wrong with the entries a run config is filled from (``models``, ``experts``,
        ``objectives``), or None: an edited or damaged zoo.json is named here, not met as a traceback."""
        def names(value: Any) -> bool:
            return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())

        if not names(self.models) or not self.models:
            return f"'models' must map model names to folders, got {self.models!r}"
        if not names(self.experts) or not set(self.experts.values()) <= set(self.models):
            return f"'experts' must map objectives to models of 'models', got {self.experts!r}"
        if set(self.models) <= set(self.experts.values()):
            return "'models' has no base model (every model is an expert)"
        if not isinstance(self.objectives, list) or not all(isinstance(o, str) for o in self.objectives):
            return f"'objectives' must be a list of objective names, got {self.objectives!r}"
        if self.files is not None and not names(self.files):
            return "'files' must map file paths to sha256 hashes"
        return None


def load_zoo_states(directory: str | Path, manifest: ZooManifest) -> dict[str, dict[str, torch.Tensor]]:
    """Every model of the zoo built in ``directory`` (the base and the experts, by the manifest's names) as a
    state dict read whole: what the bar's merges and the experiments on a build start from."""
    from safetensors.torch import load_file

    return {m: load_file(str(Path(directory) / folder / "model.safetensors")) for m, folder in manifest.models.items()}


# --- scoring ---------------------------------------------------------------------------------------


def score_models(backend, states: Mapping[str, Mapping[str, torch.Tensor]], split: str, n: int) -> Matrix:
    """Every model (a state swapped into ``backend``) on the first ``n`` examples of every zoo task."""
    from hm3.eval.evaluate import evaluate_objective

    objectives = {t: zoo_objective(t, seed=TASK_SEED) for t in ZOO_TASKS}
    matrix: Matrix = {}
    for name, state in states.items():
        backend.load_state(state)
        matrix[name] = {t: evaluate_objective(backend, o, split, range(n)).score for t, o in objectives.items()}
    return matrix


def ties_state(
    base: Mapping[str, torch.Tensor], experts: list[Mapping[str, torch.Tensor]], weights: Sequence[float],
    density: float,
) -> dict[str, torch.Tensor]:
    """One TIES merge of the experts: a weight per expert, one density for all.

    Unnormalised (θ = θ_base + Σ w_k·τ_k over the sign-elected entries), so the weights
    set both the mix and the overall step; mergekit's ``normalize`` would cancel the scale.
    """
    from hm3.merge.ops import ties

    return {name: ties(b, [e[name] - b for e in experts], list(weights), [density] * len(experts), normalize=False)
            for name, b in base.items()}


def ties_grid_points() -> list[tuple[str, tuple[float, ...], float]]:
    """(name, weights, density) of every merge of the bar's grid."""
    return [(f"ties d={d} w=({', '.join(map(str, w))})", w, d)
            for d, w in itertools.product(TIES_DENSITIES, itertools.product(TIES_WEIGHTS, repeat=len(ZOO_TASKS)))]


def ties_states(
    base: Mapping[str, torch.Tensor], experts: list[Mapping[str, torch.Tensor]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The bar's grid of TIES merges (:func:`ties_state`), by name."""
    return {name: ties_state(base, experts, w, d) for name, w, d in ties_grid_points()}


def gain_kept(matrix: Matrix, merged: Mapping[str, float], task: str) -> float:
    """Share of the ``task`` expert's gain over the base that a merge keeps (0 when there is no gain)."""
    gain = matrix[task][task] - matrix["base"][task]
    return (merged[task] - matrix["base"][task]) / gain if gain > 0 else 0.0


def expert_margin(matrix: Matrix, task: str) -> float:
    """How far the ``task`` expert leads every other model of ``matrix`` on its own task."""
    return matrix[task][task] - max(matrix[m][task] for m in matrix if m != task)


def best_merge(matrix: Matrix, grid: Mapping[str, Mapping[str, float]]) -> str:
    """The grid merge the bar is judged on: the largest smallest share of gain kept, then the best total.

    The bar asks one merge to keep half of *every* expert's gain, so the merge with the
    best worst task is the one to judge; ranking by total score would favour a merge
    that keeps all of one task's gain and little of another's.
    """
    return max(grid, key=lambda k: (min(gain_kept(matrix, grid[k], t) for t in ZOO_TASKS), sum(grid[k].values())))


def quality_bar(matrix: Matrix, ties_scores: Mapping[str, float]) -> dict[str, Any]:
    """The zoo's contract, per task: expert margin >= 0.2, base below expert, TIES keeps >= 50% of the gain."""
    checks: dict[str, Any] = {}
    for t in ZOO_TASKS:
        margin = expert_margin(matrix, t)
        gain = matrix[t][t] - matrix["base"][t]
        kept = gain_kept(matrix, ties_scores, t)
        checks[t] = {
            "expert_margin": round(margin, 4),
            "expert_gain_over_base": round(gain, 4),
            "ties_gain_kept": round(kept, 4),
            "ok": margin >= MIN_EXPERT_MARGIN and gain > 0 and kept >= MIN_TIES_GAIN_KEPT,
        }
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks,
            "thresholds": {"expert_margin": MIN_EXPERT_MARGIN, "ties_gain_kept": MIN_TIES_GAIN_KEPT}}


# --- building --------------------------------------------------------------------------------------


def train_zoo(spec: ZooSpec, log: Callable[[str], None]) -> tuple[Any, Any, dict[str, dict[str, torch.Tensor]]]:
    """(tokenizer, model, state dict of every zoo model): the base on the mixture, then each expert."""
    from hm3.zoo.tokenizer import build_char_tokenizer
    from hm3.zoo.train import encode_examples, expert_data, frozen_embeddings, new_model, train

    tokenizer = build_char_tokenizer()
    examples = {t: zoo_objective(t, seed=TASK_SEED).examples("train") for t in ZOO_TASKS}
    train_sets = {t: encode_examples(tokenizer, examples[t]) for t in ZOO_TASKS}
    general = {t: general_items(examples[t], train_sets[t], t, spec.specialist_share.get(t, 1.0)) for t in ZOO_TASKS}
    mixture = [x for t in ZOO_TASKS for x in general[t]]
    # every expert's data before any training: a replay the pools cannot fill is refused up front
    expert_sets = {task: expert_data({t: train_sets[t] if t == task else general[t] for t in ZOO_TASKS}, task,
                                     spec.replay_fraction, spec.replay_weights) for task in ZOO_TASKS}
    common = dict(batch_size=spec.batch_size, pad_id=tokenizer.pad_token_id, log=log)
    t0 = time.perf_counter()
    log(f"pretraining the base on the task mixture ({spec.base_steps} steps)")
    model = new_model(spec)
    train(model, mixture, steps=spec.base_steps, lr=spec.base_lr, seed=spec.seed, **common)
    states = {"base": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    for i, task in enumerate(ZOO_TASKS):
        log(f"fine-tuning the {task} expert from the base ({spec.expert_steps} steps)")
        model.load_state_dict(states["base"])
        with frozen_embeddings(model, spec.expert_frozen_embeddings):
            train(model, expert_sets[task], steps=spec.expert_steps, lr=spec.expert_lr,
                  seed=spec.seed * 1000 + i + 1, **common)
        states[task] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    log(f"trained in {time.perf_counter() - t0:.1f} s")
    return tokenizer, model, states


def general_items(examples: Sequence[Any], encoded: Sequence[Any], task: str, specialist_share: float) -> list[Any]:
    """What the base pretrains on and the other experts replay of ``task``: its general items and the
    first ``specialist_share`` of its specialist ones (:func:`objectives.zoo.specialist_item`).

    A small share gives the base a weak form of each specialist skill, which its expert then
    strengthens: the expert's lead stays structural, and its task vector edits a circuit the base
    already has, which is what lets a merge keep part of it at weights below 1.
    """
    flags = [specialist_item(task, e.prompt, TASK_SEED) for e in examples]
    quota = round(sum(flags) * specialist_share)
    kept: list[Any] = []
    for is_specialist, item in zip(flags, encoded, strict=True):  # in the data's own order
        if is_specialist:
            if quota == 0:
                continue
            quota -= 1
        kept.append(item)
    return kept


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _build_into(directory: Path, spec: ZooSpec, log: Callable[[str], None]) -> ZooManifest:
    start = time.perf_counter()
    load = _load_average()
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        tokenizer, model, states = train_zoo(spec, log)
        manifest = _save_and_score(directory, spec, tokenizer, model, states, log)
    finally:
        torch.set_num_threads(threads)
    return replace(manifest, build_seconds=round(time.perf_counter() - start, 2), load_average=load)


def _save_and_score(directory: Path, spec: ZooSpec, tokenizer, model, states, log) -> ZooManifest:
    from hm3.eval.hf import HFBackend

    for name in MODELS:
        model.load_state_dict(states[name])
        model.save_pretrained(str(directory / name))
        tokenizer.save_pretrained(str(directory / name))
    log("scoring the 4 models and a TIES grid of the experts on the 3 tasks")
    t0 = time.perf_counter()
    backend = HFBackend.from_pretrained(directory / "base", batch_size=spec.eval_examples)
    n = spec.eval_examples
    val = score_models(backend, states, "validation", n)
    test = score_models(backend, states, "test", n)
    merges = ties_states(states["base"], [states[t] for t in ZOO_TASKS])
    grid = score_models(backend, merges, "validation", n)
    best_name = best_merge(val, grid)
    best_test = score_models(backend, {best_name: merges[best_name]}, "test", n)[best_name]
    backend.close()
    log(f"scored in {time.perf_counter() - t0:.1f} s")
    bar = quality_bar(val, grid[best_name])
    return ZooManifest(
        format=ZOO_FORMAT,
        spec=spec.as_dict(),
        spec_hash=spec.hash(),
        models={name: name for name in MODELS},
        experts={f"zoo:{t}": t for t in ZOO_TASKS},
        objectives=[f"zoo:{t}" for t in ZOO_TASKS],
        scores_validation=val,
        scores_test=test,
        ties_grid=[{"merge": k, **v} for k, v in grid.items()],
        ties_best={"merge": best_name, **grid[best_name], **_grid_parameters(best_name)},
        ties_best_test={"merge": best_name, **best_test,
                        "gain_kept": {t: round(gain_kept(test, best_test, t), 4) for t in ZOO_TASKS}},
        quality_bar=bar,
        build_seconds=0.0,
        load_average=None,
    )


def _grid_parameters(name: str) -> dict[str, Any]:
    """The weights and density of the grid merge called ``name`` (so a reader can rebuild it)."""
    weights, density = next((w, d) for n, w, d in ties_grid_points() if n == name)
    return {"weights": list(weights), "density": density}


def _cached(directory: Path, spec: ZooSpec) -> ZooManifest | None:
    """The manifest of a finished zoo with this spec at ``directory``, else None."""
    if not (directory / "zoo.json").is_file():
        return None
    try:
        manifest = ZooManifest.read(directory)
    except ConfigError:
        return None
    return manifest if manifest.spec_hash == spec.hash() else None


def _publish(built: Path, out: Path) -> None:
    """Move (or copy, from a cache) a finished zoo to ``out``: temp sibling, then rename."""
    tmp = out.parent / f".{out.name}.{time.time_ns()}.tmp"
    shutil.copytree(built, tmp)
    _remove(out)
    tmp.rename(out)


def _remove(path: Path) -> None:
    """Clear the way for a finished zoo: a folder, or (with --force) a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build_zoo(
    out_dir: str | Path,
    *,
    size: str = DEFAULT_ZOO_SIZE,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **spec_overrides: Any,
) -> ZooManifest:
    """Build (or reuse) the zoo at ``out_dir`` and return its manifest.

    Reused when ``out_dir/zoo.json`` (or ``cache_dir/<spec hash>/zoo.json``) has the
    same spec hash. A directory holding anything else is refused unless
    ``overwrite``. Progress is logged (``progress``); the score matrix and quality bar are
    stored; a zoo that misses the bar is still written, flagged ``quality_bar.ok = false``.
    """
    spec = zoo_spec(size, seed, **spec_overrides)
    log = progress_logger(progress)
    out = Path(out_dir)
    found = _cached(out, spec)
    if found is not None:
        log(f"{out} already holds this zoo (spec {spec.hash()}): reused")
        return found
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out} exists and does not hold a {size} zoo with seed {seed}; "
                                "choose an empty directory or use --overwrite")
    cached_dir = Path(cache_dir) / spec.hash() if cache_dir is not None else None
    manifest = _cached(cached_dir, spec) if cached_dir is not None else None
    if manifest is not None:
        log(f"copying the cached zoo {cached_dir}")
        _publish(cached_dir, out)
        return manifest
    target = cached_dir or out
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.{time.time_ns()}.building"
    work.mkdir()
    try:
        log(f"building the {size} zoo (seed {seed}, spec {spec.hash()}) in {out}")
        manifest = _build_into(work, spec, log)
        manifest = replace(manifest, files=file_hashes(work))
        atomic_write_text(work / "zoo.json", manifest.to_json())
        share_files(work)  # save_pretrained writes its safetensors files 0o600
        _remove(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cached_dir is not None:
        _publish(cached_dir, out)
    logger.debug(format_report(manifest))  # the command prints it as its result
    if not manifest.quality_bar["ok"]:
        logger.warning("this zoo does NOT meet its quality bar (zoo.json quality_bar.ok = false)")
    return manifest


def format_report(manifest: ZooManifest) -> str:
    """The score matrices, the best TIES merge and the quality-bar verdict, as a table."""
    lines = []
    for split, matrix in (("validation", manifest.scores_validation), ("test", manifest.scores_test)):
        lines.append(f"{split:<12}" + "".join(f"{t:>13}" for t in ZOO_TASKS))
        lines += [f"{m:<12}" + "".join(f"{row[t]:13.3f}" for t in ZOO_TASKS) for m, row in matrix.items()]
    best = manifest.ties_best
    lines.append(f"{'TIES best':<12}" + "".join(f"{best[t]:13.3f}" for t in ZOO_TASKS) + f"   ({best['merge']}, validation)")
    best_test = manifest.ties_best_test
    if best_test is not None:
        kept = ", ".join(f"{best_test['gain_kept'][t]:.0%}" for t in ZOO_TASKS)
        lines.append(f"{'on test':<12}" + "".join(f"{best_test[t]:13.3f}" for t in ZOO_TASKS)
                     + f"   (keeps {kept} of the experts' test gains; not part of the bar)")
    checks = manifest.quality_bar["checks"]
    verdict = "met" if manifest.quality_bar["ok"] else "NOT MET"
    lines.append(f"quality bar {verdict}: " + "; ".join(
        f"{t} margin {c['expert_margin']:.2f}, TIES keeps {c['ties_gain_kept']:.0%}" for t, c in checks.items()))
    lines.append(f"built in {manifest.build_seconds:.0f} s (load average {manifest.load_average} at start)")
    return "\n".join(lines)
