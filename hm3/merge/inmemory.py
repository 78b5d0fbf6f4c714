"""The search loop's merge path: recipes merged straight into a live model, no disk.

:class:`InMemoryMerger` loads the base and the task vectors ``τ_k = θ_k − θ_base``
once; each call then resolves a recipe (coefficients, densities, per-layer
gradients) and writes the merged tensors into the target model's own
parameter storage with ``copy_``. A candidate therefore costs only the merge
arithmetic — no file reads, no model construction, no allocation of a new
model — which is what lets level 1 evaluate thousands of candidates.

CPU time on a shared machine: this loop is pure back-to-back arithmetic, so
with torch's default GNU OpenMP settings its worker thread busy-waits (up to
~3 ms) between parallel regions instead of sleeping. When other processes
occupy the cores, the spinning worker and the main thread end up sharing one
core and every parallel region waits a scheduler slice: on 2 loaded cores a
122M-parameter TIES candidate took 28 s instead of 2.4 s (DARE-TIES 17 s
instead of 1.3 s). The streaming engine escapes it only by accident (its reader
thread runs torch ops, so libgomp manages more threads than there are CPUs and
throttles spinning to ~100 iterations). ``OMP_WAIT_POLICY=PASSIVE`` set before
torch is imported, or one torch thread, removes the slowdown; the arithmetic
and its results are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from hm3.checkpoint import check_compatible, check_finite, open_checkpoint
from hm3.config import MergeConfig
from hm3.errors import ConfigError
from hm3.merge.methods import TensorInputs, get_method
from hm3.merge.plan import dare_generator, input_refs_for, resolve_jobs


class InMemoryMerger:
    """Holds one base and K fine-tuned models in memory as base + task vectors.

    ``model_refs`` are the names recipes use for the models (their ``model:``
    entries); ``model_dirs`` where they live. ``fishers`` optionally maps a
    model ref to its Fisher tensors (for Fisher-weighted recipes).
    """

    def __init__(
        self,
        base_dir: str | Path,
        model_dirs: Sequence[str | Path],
        *,
        base_ref: str | None = None,
        model_refs: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.base_ref = base_ref or str(base_dir)
        self.model_refs = list(model_refs) if model_refs is not None else [str(d) for d in model_dirs]
        if len(self.model_refs) != len(model_dirs):
            raise ConfigError("model_refs and model_dirs must have the same length")
        ckpts = [open_checkpoint(base_dir)] + [open_checkpoint(d) for d in model_dirs]
        try:
            check_compatible(ckpts)
            base_ckpt = ckpts[0]
            self.tensor_names = base_ckpt.tensor_names()
            self.num_layers = base_ckpt.num_layers
            self.config = dict(base_ckpt.config)
            self.base: dict[str, torch.Tensor] = {}
            self.deltas: dict[str, list[torch.Tensor]] = {}
            for name in self.tensor_names:
                b = base_ckpt.get(name)
                check_finite(name, b, str(base_ckpt.path))
                b = b.to(self.device, dtype)
                self.base[name] = b
                deltas = []
                for c in ckpts[1:]:
                    t = c.get(name)
                    check_finite(name, t, str(c.path))
                    deltas.append(t.to(self.device, dtype) - b)
                self.deltas[name] = deltas
        finally:
            for c in ckpts:
                c.close()
        self._fishers: dict[str, dict[str, torch.Tensor]] | None = None

    def set_fishers(self, fishers: Mapping[str, Mapping[str, torch.Tensor]] | None) -> None:
        """Per-model Fisher tensors (model ref -> tensor name -> F); ``None`` removes them."""
        if fishers is None:
            self._fishers = None
            return
        missing = [r for r in self.model_refs if r not in fishers]
        if missing:
            raise ConfigError(f"Fisher tensors missing for models: {', '.join(missing)}")
        self._fishers = {r: {n: fishers[r][n].to(self.device, self.dtype) for n in self.tensor_names} for r in self.model_refs}

    def _check_recipe(self, recipe: MergeConfig) -> tuple[list[int], Callable]:
        if recipe.slices is not None:
            raise ConfigError("the in-memory path merges whole models ('models:'); merge a 'slices' recipe with "
                              "hm3 merge")
        method = get_method(recipe.merge_method)
        if not method.needs_base:
            raise ConfigError(
                f"the in-memory path runs task-vector methods (base + deltas); {method.name!r} is not one"
            )
        if recipe.base_model != self.base_ref:
            raise ConfigError(f"recipe base_model {recipe.base_model!r} is not this merger's base {self.base_ref!r}")
        refs = input_refs_for(recipe, method)
        unknown = [r for r in refs if r not in self.model_refs]
        if unknown:
            raise ConfigError(f"recipe names models this merger does not hold: {', '.join(unknown)}")
        return [self.model_refs.index(r) for r in refs], method

    def iter_merged(self, recipe: MergeConfig, *, seed: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, merged tensor)`` for every tensor of the model."""
        indices, method = self._check_recipe(recipe)
        refs = [self.model_refs[i] for i in indices]
        jobs = resolve_jobs(recipe, method, tensor_names=self.tensor_names, num_layers=self.num_layers, input_refs=refs)
        fisher_wanted = any(mp.get("fisher") for mp in jobs[0].model_params) if jobs else False
        if fisher_wanted and self._fishers is None:
            raise ConfigError("recipe asks for Fisher weighting but no Fisher tensors were set (set_fishers)")
        run_seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)
        with torch.no_grad():
            for job in jobs:
                deltas = self.deltas[job.name]
                base = self.base[job.name]
                x = TensorInputs(
                    name=job.name,
                    base=base,
                    tensors=(),
                    deltas=[deltas[i] for i in indices],
                    model_params=job.model_params,
                    params=job.params,
                    fishers=[self._fishers[r][job.name] for r in refs] if fisher_wanted else None,
                    generators=(lambda k, n=job.name: dare_generator(run_seed, n, k))
                    if method.uses_randomness
                    else None,
                )
                yield job.name, method.fn(x)

    def merge_into(
        self, params: Mapping[str, torch.Tensor], recipe: MergeConfig, *, seed: int | None = None
    ) -> None:
        """Write the merged model into ``params`` (a live model's tensors by checkpoint name) in place."""
        with torch.no_grad():
            for name, merged in self.iter_merged(recipe, seed=seed):
                target = params.get(name)
                if target is None:
                    raise ConfigError(f"target model has no tensor {name!r}")
                if target.shape != merged.shape:
                    raise ConfigError(f"tensor {name!r}: target shape {tuple(target.shape)} != merged {tuple(merged.shape)}")
                target.copy_(merged)

    def merged_state(self, recipe: MergeConfig, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The merged model as a new state dict (for backends that take weights by value, e.g. vLLM)."""
        return dict(self.iter_merged(recipe, seed=seed))
