"""The evaluation session of one live model in this process (:class:`LiveModelSession`), and that
live model (:class:`LiveModel`), which a parallel executor's workers hold one each of.

A live model loads the base model and every expert once (the in-memory merger holds base + task
vectors), opens one evaluator backend on the base model, and scores each candidate by putting its
weights into that model:

* a merge or a reference model is written into the live model's own parameters (``copy_``: no
  reload, no new allocation), or handed to the backend's ``load_state`` where it has no live
  parameters (vLLM);
* a layer path becomes an in-memory path model over shared tensors (hf), or is swapped, padded to
  the models' depth with identity layers, into the fixed-depth engine (vLLM).

The session puts every score through the run store (:class:`~hm3.search.scoring.CandidateScorer`):
a candidate is installed only when the store lacks one of its scores. Everything a session holds
is its own -- model, merger, backend, scorer, Fisher cache, layer pools -- so several sessions can
live side by side (:mod:`hm3.eval.session`); the live model knows no store, so a worker process
can hold one while the process that owns the store commits what it returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hm3.arch.path import build_path_model, path_state
from hm3.arch.pools import LayerPools
from hm3.config import MergeConfig, parse_merge_config
from hm3.devices import dtype_name
from hm3.errors import ConfigError
from hm3.eval.backend import Backend, open_backend
from hm3.eval.evaluate import evaluate_objective, model_examples
from hm3.eval.executor import ObjectiveScore
from hm3.eval.session import (
    Candidate,
    FrameKey,
    MergeCandidate,
    PathCandidate,
    PoolLayout,
    ReferenceCandidate,
    Scored,
    plans_for,
)
from hm3.merge.inmemory import InMemoryMerger
from hm3.run.directory import FISHER_DIR
from hm3.samples import SAMPLES_DIR, SampleLog
from hm3.search.run_config import EvaluationConfig, RunConfig
from hm3.search.scoring import CandidateScorer, SplitPlan, first_n, utility_maps
from hm3.store import CandidateRef, RunStore
from objectives.registry import build_objectives, get_objective


class LiveModel:
    """One live model in this process and the candidates put into it; it knows no run store.

    What both a :class:`LiveModelSession` and a parallel executor's worker
    (:mod:`hm3.eval.ray_executor`) hold: ``install`` puts a candidate's weights into the model,
    ``evaluate`` installs one and runs objectives on it. A path framed by a stored merge needs that
    merge's recipe: ``frame_recipe(id)`` gives it (the run store in this process; what the process
    that owns the store sent, in a worker).
    """

    def __init__(self, cfg: RunConfig, *, frame_recipe: Callable[[int], Mapping[str, Any]],
                 log: Callable[[str], None]):
        self.cfg = cfg
        space = cfg.search_space
        self.objectives = build_objectives(cfg.objectives, where="the run config's objectives",
                                           chat=cfg.evaluation.chat_template)
        self.objective_names = [o.name for o in self.objectives]
        self.evaluated_examples = 0  # by evaluate() (a session's scorer counts its own)
        ev = cfg.evaluation
        self.device, self.dtype = ev.resolve()
        # the backend first: the merger holds its tensors on the device only if they fit beside the model
        # (and beside the memory a vLLM engine claims up front)
        self.backend = open_backend(ev.backend, cfg.models[space.base_model], batch_size=ev.batch_size,
                                    **_backend_options(ev, self.device, self.dtype))
        log(f"loading base + {len(space.models)} experts into memory ({cfg.models[space.base_model]})")
        try:
            self.merger = InMemoryMerger(
                cfg.models[space.base_model],
                [cfg.models[r] for r in space.models],
                base_ref=space.base_model,
                model_refs=list(space.models),
                device=self.device,
                tokenizer_source=space.tokenizer_source,
            )
            _fit_vocabulary(self.backend, self.merger)
        except BaseException:
            self.backend.close()
            raise
        residency = self.merger.residency
        log(f"evaluating in {dtype_name(self.dtype)} on {self.device}; merging in float32 on {self.device}, "
            f"task vectors {residency.mode} ({residency.reason})")
        # where states handed to the backend live: path models run on the hf model's device; vLLM copies
        # a state into its own memory, so it is staged in host memory, leaving the GPU to the engine
        self._state_device = self.device if ev.backend == "hf" else torch.device("cpu")
        self._live = self.backend.live_parameters()
        # Paths point the hf backend at path models that share the pool's tensors; merges write into this
        # model's own parameters, so they put it back first.
        self._live_model = getattr(self.backend, "model", None)
        self._frame_recipe = frame_recipe
        self._log = log
        self._fisher_files: dict[str, tuple[str, int, int] | None] | None = None  # the Fishers set, by file
        self._pools: LayerPools | None = None

    @property
    def placement(self) -> dict[str, str]:
        """Where this model evaluates and merges, and where its task vectors are held and why."""
        return {"device": str(self.device), "dtype": dtype_name(self.dtype), "merge_dtype": "float32",
                "task_vectors": self.merger.residency.mode, "task_vectors_why": self.merger.residency.reason}

    def pool_layout(self) -> PoolLayout:
        depth = int(self.merger.num_layers)
        return PoolLayout(experts=tuple(self.cfg.search_space.models), num_layers=depth,
                          max_hops=None if self._live_model is not None else depth, backend=self.backend.name)

    def layer_features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        return self._layer_pools().features(frames).cpu()  # the policy runs on the CPU

    def evaluate(self, candidate: Candidate, plan: SplitPlan, objectives: Sequence[str], *,
                 samples: bool = False) -> list[ObjectiveScore]:
        """``candidate`` installed and scored on ``plan`` for each of ``objectives`` (names, all run: the
        caller asks for those its store lacks); each one's seconds include the install for the first.
        With ``samples``, each score carries its per-example records (:mod:`hm3.samples`)."""
        by_name = {o.name: o for o in self.objectives}
        start = time.perf_counter()
        self.install(candidate)
        out = []
        for name in objectives:
            result = evaluate_objective(self.backend, by_name[name], plan.split, plan.indices[name], samples=samples)
            self.evaluated_examples += result.count
            now = time.perf_counter()
            out.append(ObjectiveScore(name, result.score, result.count, now - start, result.samples))
            start = now
        return out

    def close(self) -> None:
        self._restore_live_model()
        self.backend.close()

    # --- installing a candidate into the live model ------------------------------------------------

    def install(self, candidate: Candidate) -> None:
        """Put ``candidate``'s weights into the live model (in place: no reload)."""
        if isinstance(candidate, MergeCandidate):
            self._install_recipe(candidate.recipe)
        elif isinstance(candidate, ReferenceCandidate):
            self._install_state(self._reference_state(candidate.model))
        elif isinstance(candidate, PathCandidate):
            self._install_path(candidate)
        else:
            raise TypeError(f"not a candidate: {candidate!r}")

    def _restore_live_model(self) -> None:
        if self._live_model is not None:
            self.backend.model = self._live_model

    def _install_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._restore_live_model()
        if self._live is not None:
            with torch.no_grad():
                for name, t in state.items():
                    self._live[name].copy_(t)
        else:
            self.backend.load_state(state)

    def _parse_recipe(self, recipe: Mapping[str, Any]) -> MergeConfig:
        config = parse_merge_config(dict(recipe), source="candidate recipe")
        fisher_files = {m.model: (m.parameters or {}).get("fisher") for m in config.models or ()}
        if any(fisher_files.values()):
            # read once per session, not per candidate: a 1.5B model's Fisher is 6 GB a model in float32,
            # read and checked finite; read again only if another file (or a rewritten one) is named
            identity = {ref: _file_identity(path) for ref, path in fisher_files.items()}
            if identity != self._fisher_files:
                from hm3.fisher import load_fisher

                self._fisher_files = None
                self.merger.set_fishers({ref: load_fisher(path) for ref, path in fisher_files.items()})
                self._fisher_files = identity
                fishers = self.merger.fisher_residency
                if fishers is not None and not fishers.resident:
                    self._log(f"Fisher tensors streamed ({fishers.reason})")
        return config

    def _install_recipe(self, recipe: Mapping[str, Any]) -> None:
        config = self._parse_recipe(recipe)
        self._restore_live_model()
        if self._live is not None:
            self.merger.merge_into(self._live, config)  # cast to the live model's dtype as it is written
        else:
            self.backend.load_state(self._for_backend(self.merger.iter_merged(config)))

    def _install_path(self, candidate: PathCandidate) -> None:
        pools = self._layer_pools()
        if list(candidate.experts) != pools.expert_refs:
            raise ConfigError(f"a path over experts {list(candidate.experts)} cannot run on this session's pool "
                              f"{pools.expert_refs}")
        pool = pools.pool(candidate.frame)
        if self._live_model is not None:
            self.backend.model = build_path_model(pool, candidate.path)
        else:
            self.backend.load_state(path_state(pool, candidate.path, depth=pools.num_layers))

    def _for_backend(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``(name, tensor)`` pairs (float32, where the merger holds or computes them) as a state in the
        evaluation dtype where the backend takes it from, converted one by one so that no second float32
        model builds up on the device; the same tensors when they are already there (cpu, float32)."""
        return {n: t.to(self._state_device, self.dtype) for n, t in tensors}

    def _merged_state(self, recipe: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """A recipe's merge as new tensors (a frame in the layer pool beside the experts)."""
        return self._for_backend(self.merger.iter_merged(self._parse_recipe(recipe)))

    def _reference_state(self, ref: str) -> dict[str, torch.Tensor]:
        """The base (``ref`` = base ref) or one expert, rebuilt from base + task vector."""
        m = self.merger
        if ref == m.base_ref:
            return self._for_backend(m.base.items())
        k = m.model_refs.index(ref)
        return self._for_backend((n, m.base[n] + m.deltas[n][k]) for n in m.tensor_names)

    def _layer_pools(self) -> LayerPools:
        """The experts' states, built on the first path (a level-1 search never needs them)."""
        if self._pools is None:
            refs = list(self.cfg.search_space.models)
            self._pools = LayerPools(
                {ref: self._reference_state(ref) for ref in refs}, self._reference_state(self.merger.base_ref),
                self.merger.config,
                self.merger.num_layers, lambda cid: self._merged_state(self._frame_recipe(cid)),
            )
        return self._pools


class LiveModelSession:
    """:class:`~hm3.eval.session.EvaluationSession` over one live model in this process.

    DF-Merge's Fisher tensors, when the search space is Fisher-weighted, are cached in the run
    directory beside the store (``RUN_DIR/fisher/``), so a resumed search loads them; with
    ``evaluation.log_samples``, per-example records go beside it too (``RUN_DIR/samples/``).
    """

    def __init__(self, cfg: RunConfig, store: RunStore, *, log: Callable[[str], None]):
        self.cfg = cfg
        self.store = store
        self.model = LiveModel(cfg, frame_recipe=lambda cid: store.candidate(cid)[1], log=log)
        self.objective_names = self.model.objective_names
        self.higher_is_better = [o.higher_is_better for o in self.model.objectives]
        self.utility_maps = utility_maps(self.model.objectives)
        samples = (SampleLog(store.path.parent / SAMPLES_DIR, self.objective_names) if cfg.evaluation.log_samples
                   else None)
        self._scorer = CandidateScorer(self.model.backend, self.model.objectives, store, samples)
        self.validation = first_n(self.model.objectives, "validation", cfg.evaluation.validation_examples)
        self.test = first_n(self.model.objectives, "test", cfg.evaluation.test_examples)
        self._fisher_cache = None
        if cfg.search_space.fisher:
            from hm3.fisher import FisherCache

            if self.model._live_model is None:
                self.model.close()
                raise ConfigError("Fisher weighting needs the 'hf' backend (gradients through the live model)")
            self._fisher_cache = FisherCache(store.path.parent / FISHER_DIR)

    @property
    def merger(self) -> InMemoryMerger:
        return self.model.merger

    @property
    def backend(self) -> Backend:
        return self.model.backend

    # --- the session interface ---------------------------------------------------------------------

    @property
    def evaluated_examples(self) -> int:
        return self._scorer.evaluated_examples

    @property
    def placement(self) -> dict[str, str]:
        return self.model.placement

    def score(self, candidate: Candidate, plan: SplitPlan) -> Scored:
        ref = self.store.add_candidate(candidate.stored_recipe(), candidate.kind)
        return Scored(ref, self._scorer.score(ref, lambda: self.model.install(candidate), plan))

    def score_many(self, candidates: Sequence[Candidate], plan: SplitPlan | Sequence[SplitPlan]) -> list[Scored]:
        # one live model: one after the other
        return [self.score(c, p) for c, p in zip(candidates, plans_for(candidates, plan), strict=True)]

    def stored_scores(self, candidate: CandidateRef | int, plan: SplitPlan) -> np.ndarray | None:
        return self._scorer.cached(candidate, plan)

    def merge_recipe(self, x: torch.Tensor) -> dict[str, Any]:
        space = self.cfg.search_space
        return self._fisher_recipe(x) if space.fisher else space.to_recipe(x)

    def pool_layout(self) -> PoolLayout:
        return self.model.pool_layout()

    def layer_features(self, frames: Sequence[FrameKey]) -> torch.Tensor:
        return self.model.layer_features(frames)

    def close(self) -> None:
        self.model.close()

    def _fisher_recipe(self, x: torch.Tensor) -> dict[str, Any]:
        """The candidate's recipe with DF-Merge Fisher tensors F_i(λ_i) installed in the merger.

        λ_i is model i's weight (its first layer group's, with layer groups), rounded to the config's
        coefficient grid so that nearby candidates share one cached Fisher (in RUN_DIR/fisher/).
        """
        from hm3.fisher import FisherKey, cached_fisher_for_coefficient, fisher_examples

        assert self._fisher_cache is not None
        model = self.model
        space, step = self.cfg.search_space, self.cfg.fisher.coefficient_step
        weights = space.decode(x)["weight"]
        by_name = {o.name: o for o in model.objectives}
        paths = []
        for i, ref in enumerate(space.models):
            lam = round(round(weights[i][0] / step) * step, 6)
            obj = by_name[get_objective(self.cfg.experts[ref]).name]
            # as the model is asked them (a chat objective's Fisher is taken on its templated prompts)
            examples = model_examples(model.backend.tokenizer, obj, fisher_examples(obj, self.cfg.fisher.examples))
            cached_fisher_for_coefficient(  # computed once per (model, λ) and kept in RUN_DIR/fisher/
                self._fisher_cache, model.merger, model._live_model, i, lam, model.backend.tokenizer,
                obj.name, examples, obj.decoding,
            )
            key = FisherKey(ref, lam, obj.name, tuple(e.id for e in examples))
            paths.append(str(self._fisher_cache.path_for(key)))
        return space.to_recipe(x, fisher_paths=paths)


def _file_identity(path: str | None) -> tuple[str, int, int] | None:
    """A file by path, size and modification time: another value means another (or a rewritten) file."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return (str(path), -1, -1)  # unreadable: load_fisher says why, naming the file
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _fit_vocabulary(backend: Backend, merger: InMemoryMerger) -> None:
    """Give the live model the merged vocabulary's embedding rows.

    The live model is the base, and merges over the base's tokenizer (``tokenizer_source: base``) keep
    its tokens but not the padding rows past them (mergekit's rule): the hf model's embeddings are
    resized to match; a vLLM engine's cannot be, so such a base is refused there, by name.
    """
    rows, own = merger.vocabulary_rows, merger.base_vocabulary_rows
    if rows == own:
        return
    model = getattr(backend, "model", None)
    if model is None or backend.live_parameters() is None:
        raise ConfigError(
            f"search_space.tokenizer_source base: the merged models have {rows} vocabulary rows (the base "
            f"tokenizer's tokens) but the base has {own}, and the {backend.name} backend's model cannot be resized; "
            "use evaluation.backend hf, or a base whose embedding has no rows past its tokenizer"
        )
    model.resize_token_embeddings(rows)


def _backend_options(ev: EvaluationConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``open_backend``'s keyword arguments for a run's evaluation settings: the hf model's device and
    dtype, or vLLM's dtype and engine settings (those left unset keep vLLM's defaults)."""
    if ev.backend == "hf":
        return {"device": device, "dtype": dtype}
    engine = {k: v for k, v in ev.vllm.model_dump().items() if v is not None}
    return {"dtype": dtype, **engine}
