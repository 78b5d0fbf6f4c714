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

On a GPU the merger merges on the evaluation device. The base and the task vectors stay there
(*resident*) when they fit in its free memory (:func:`choose_residency`); otherwise they are held
in host memory and each tensor's inputs are copied to the device for its merge (*streamed*), which
costs one host-to-device copy of the model per candidate instead of running out of memory. Fisher
tensors (one per expert, as large as its task vector) are decided for apart, when they are set, on the
memory free beside the task vectors then. The
arithmetic is float32 whatever the evaluation dtype: a task vector is a small difference of large
weights, which bfloat16 would mostly round away; the result is cast once, when it is written into
the live model.

Models whose vocabularies differ (an expert that added a pad token or infilling tokens) are merged
over the base's vocabulary with ``tokenizer_source="base"``, as ``hm3 merge`` merges a recipe that says
``tokenizer_source: base``: each model's token embedding and LM head are rearranged onto the base
tokenizer's rows once, when the task vectors are taken, by the same row mapping the streaming engine
applies tensor by tensor (:func:`hm3.merge.plan.output_vocabulary`, :mod:`hm3.merge.vocab`). Under
``base`` a model's row for a token is its own where it has the token and the base's where it lacks it,
whichever other models are merged, so one rearrangement serves every recipe over any of the models.
``union`` and another model's tokenizer are not offered here: their rows for a token some models lack
depend on which models a recipe merges, and the live model would need a tokenizer other than the base's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hm3.checkpoint import check_compatible, check_finite, open_checkpoint
from hm3.checkpoint.layers import is_vocabulary_tensor
from hm3.config import MergeConfig
from hm3.devices import dtype_name
from hm3.errors import ConfigError, FisherError
from hm3.merge.methods import MERGE_METHODS, MergeMethod, TensorInputs, get_method
from hm3.merge.plan import (
    DEFAULT_MASK_RNG,
    check_same_vocabulary,
    input_refs_for,
    mask_generator,
    output_vocabulary,
    parse_dtype,
    resolve_jobs,
    vocabulary_config,
)
from hm3.merge.tokenizer import OutputTokenizer
from hm3.merge.vocab import MergedVocabulary, remap_rows, row_plan

log = logging.getLogger(__name__)

#: The share of a GPU's free memory that the base, the task vectors and one tensor's merge workspace may
#: take for them to be held there; the rest is left to the evaluation (activations, logits, a KV cache)
#: and to the allocator's fragmentation.
RESIDENT_SHARE = 0.8
#: The tokenizer sources the in-memory merger maps vocabularies with (module docstring).
IN_MEMORY_TOKENIZER_SOURCES = ("base",)
#: Full-size temporaries a merge method holds beside its inputs for one tensor (TIES: trimmed deltas,
#: signs, the agreement mask, the result), so the workspace is (K + this) × the largest tensor.
WORKSPACE_TENSORS = 4
#: The dtype a search's candidates are merged in (:class:`InMemoryMerger`'s default dtype), which a recipe written for
#: ``hm3 merge`` names when it names none (:func:`hm3.run.front.recipe_with_paths`).
MERGE_DTYPE = "float32"


@dataclass(frozen=True)
class Residency:
    """Where the merger holds the base and the task vectors, and why (logged, and in a run's summary)."""

    resident: bool  # on the merge device; else in host memory, copied to the device tensor by tensor
    reason: str

    @property
    def mode(self) -> str:
        return "resident" if self.resident else "streamed"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_residency(device: torch.device, held_bytes: int, workspace_bytes: int,
                     free_bytes: int | None, *, held: str = "base + task vectors") -> Residency:
    """Resident when ``held_bytes`` (what ``held`` names) plus ``workspace_bytes`` fit in
    :data:`RESIDENT_SHARE` of the device's ``free_bytes``; on the CPU always (host memory is the device's)."""
    if device.type == "cpu" or free_bytes is None:
        return Residency(True, f"merging on {device}: {held} are in host memory")
    need, budget = held_bytes + workspace_bytes, int(RESIDENT_SHARE * free_bytes)
    share = f"{RESIDENT_SHARE:.0%} of {device}'s free {_gib(free_bytes)}"
    if need <= budget:
        return Residency(True, f"{held} and a merge workspace ({_gib(need)}) fit in {share}")
    return Residency(False, f"{held} and a merge workspace ({_gib(need)}) exceed {share}: "
                            f"held in host memory, copied to {device} tensor by tensor")


def in_memory_methods() -> list[str]:
    """The merge methods the in-memory merger runs (:attr:`hm3.merge.methods.MergeMethod.in_memory`)."""
    return sorted(name for name, m in MERGE_METHODS.items() if m.in_memory)


def in_memory_refusal(method: MergeMethod) -> str | None:
    """Why the in-memory merger cannot run ``method`` (callers add what can be used instead), or None.

    It holds the base and the task vectors τ_k = θ_k − θ_base, not the models' own weights, so a method
    that reads those (slerp, model_stock) or merges without a base (linear, karcher) would fail halfway
    through a candidate, or merge something else; it is refused before any tensor is touched."""
    if method.in_memory:
        return None
    why = ("merges the models' own weights without a base" if not (method.needs_base or method.optional_base)
           else "reads the models' own weights, not only task vectors over the base")
    return f"merge method {method.name!r} {why}, which the in-memory merger that searches use does not hold"


def free_device_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on a GPU; None for the CPU.

    What the driver reports free (``torch.cuda.mem_get_info``) plus what torch's caching allocator holds
    reserved but unallocated: tensors freed in this process (Fishers replaced, a model closed) stay
    reserved by the allocator, hidden from the driver's count, and are reused by the next allocation."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + max(0, cached)


class InMemoryMerger:
    """Holds one base and K fine-tuned models in memory as base + task vectors.

    ``model_refs`` are the names recipes use for the models (their ``model:``
    entries); ``model_dirs`` where they live. ``fishers`` optionally maps a
    model ref to its Fisher tensors (for Fisher-weighted recipes). ``device`` is
    where the arithmetic runs, ``dtype`` that of the held tensors and the
    arithmetic (float32: module docstring); :attr:`residency` says whether the
    tensors are held on ``device`` or in host memory. ``tokenizer_source="base"`` merges models whose
    vocabularies differ over the base's (module docstring); :attr:`tokenizer` is then the output
    tokenizer (None where the base has no tokenizer files and every vocabulary agrees) and
    :attr:`config` carries its ``vocab_size``.
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
        tokenizer_source: str | None = None,
    ):
        if tokenizer_source is not None and tokenizer_source not in IN_MEMORY_TOKENIZER_SOURCES:
            raise ConfigError(
                f"tokenizer_source {tokenizer_source!r}: the in-memory merger maps vocabularies onto the base's "
                "only (tokenizer_source: base); merge a recipe with another tokenizer source with hm3 merge"
            )
        self.tokenizer_source = tokenizer_source
        self.tokenizer: OutputTokenizer | None = None
        self.device = torch.device(device)
        self.dtype = dtype
        self.base_ref = base_ref or str(base_dir)
        self.model_refs = list(model_refs) if model_refs is not None else [str(d) for d in model_dirs]
        if len(self.model_refs) != len(model_dirs):
            raise ConfigError("model_refs and model_dirs must have the same length")
        ckpts = [open_checkpoint(base_dir)] + [open_checkpoint(d) for d in model_dirs]
        try:
            refs = [self.base_ref, *self.model_refs]
            if tokenizer_source is None:
                check_same_vocabulary(ckpts, refs, remedy="Set tokenizer_source: base (search_space.tokenizer_source "
                                      "in a run config) to merge them over the base model's vocabulary, as hm3 "
                                      "merge does for a recipe with tokenizer_source: base")
            check_compatible(ckpts, same_vocab=tokenizer_source is None)
            vocabulary, self.tokenizer = (output_vocabulary(tokenizer_source, ckpts, refs, self.base_ref)
                                          if tokenizer_source is not None else (None, None))
            base_ckpt = ckpts[0]
            self.tensor_names = base_ckpt.tensor_names()
            vocab_names = [n for n in self.tensor_names if is_vocabulary_tensor(n)]
            #: the base's own embedding rows, before any rearrangement (the live model's, when it is the base)
            self.base_vocabulary_rows = base_ckpt.shape(vocab_names[0])[0] if vocab_names else None
            self.num_layers = base_ckpt.num_layers
            self.config = vocabulary_config(dict(base_ckpt.config), vocabulary, self.tokenizer)
            sizes = [math.prod(base_ckpt.shape(n)) for n in self.tensor_names]
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._model_bytes = sum(sizes) * itemsize
            self._workspace_bytes = (len(model_dirs) + WORKSPACE_TENSORS) * max(sizes, default=0) * itemsize
            self.residency = choose_residency(
                self.device, len(ckpts) * self._model_bytes, self._workspace_bytes, free_device_memory(self.device)
            )
            log.debug("in-memory merger: task vectors %s (%s)", self.residency.mode, self.residency.reason)
            # where the tensors are held: on the device, or in host memory and copied over for each merge
            self._hold = self.device if self.residency.resident else torch.device("cpu")
            self.base: dict[str, torch.Tensor] = {}
            self.deltas: dict[str, list[torch.Tensor]] = {}
            for name in self.tensor_names:
                b, *others = _read_tensor(ckpts, name, vocabulary)
                b = b.to(self._hold, dtype)
                self.base[name] = b
                self.deltas[name] = [t.to(self._hold, dtype) - b for t in others]
        finally:
            for c in ckpts:
                c.close()
        self._fishers: dict[str, dict[str, torch.Tensor]] | None = None
        #: where the Fisher tensors are held and why (:meth:`set_fishers`); None before any are set
        self.fisher_residency: Residency | None = None

    @property
    def vocabulary_rows(self) -> int | None:
        """Rows of the merged token embedding (None for a model without one)."""
        for name in self.tensor_names:
            if is_vocabulary_tensor(name):
                return int(self.base[name].shape[0])
        return None

    def set_fishers(self, fishers: Mapping[str, Mapping[str, torch.Tensor]] | None) -> None:
        """Per-model Fisher tensors (model ref -> tensor name -> F); ``None`` removes them."""
        if fishers is None:
            self._fishers = None
            return
        missing = [r for r in self.model_refs if r not in fishers]
        if missing:
            raise ConfigError(f"Fisher tensors missing for models: {', '.join(missing)}")
        for ref in self.model_refs:
            self._check_fisher_fits(ref, fishers[ref])
        self._fishers = None  # Fishers set before free their memory for these
        # One Fisher tensor per expert and tensor, as large as the task vectors: the task vectors' residency
        # counted none, so the Fishers stay on the device only if they fit in what is free beside them now
        # (the merge workspace not yet taken); otherwise they are held in host memory and copied over per
        # tensor, as streamed task vectors are, rather than running the device out of memory.
        if self.residency.resident:
            self.fisher_residency = choose_residency(self.device, len(self.model_refs) * self._model_bytes,
                                                     self._workspace_bytes, free_device_memory(self.device),
                                                     held="the Fisher tensors")
        else:  # the task vectors did not fit: the Fishers, as large, stay in host memory with them
            self.fisher_residency = Residency(False, f"the task vectors are streamed to {self.device}: the Fisher "
                                                     "tensors are held in host memory with them")
        log.debug("in-memory merger: Fisher tensors %s (%s)", self.fisher_residency.mode, self.fisher_residency.reason)
        hold = self._hold if self.fisher_residency.resident else torch.device("cpu")
        self._fishers = {r: {n: fishers[r][n].to(hold, self.dtype) for n in self.tensor_names} for r in self.model_refs}

    def _check_fisher_fits(self, ref: str, fisher: Mapping[str, torch.Tensor]) -> None:
        """Every tensor present with its tensor's shape: the merge multiplies them elementwise, so another
        shape would broadcast silently (one row's importance for every row) instead of failing."""
        for name in self.tensor_names:
            f = fisher.get(name)
            if f is None:
                raise FisherError(f"Fisher tensors of model {ref!r}: no tensor {name!r}")
            if tuple(f.shape) != tuple(self.base[name].shape):
                raise FisherError(f"Fisher tensors of model {ref!r}: {name!r} has shape {tuple(f.shape)}, "
                                  f"the model's tensor {tuple(self.base[name].shape)}")

    def _check_recipe(self, recipe: MergeConfig) -> tuple[list[int], Callable]:
        if recipe.slices is not None:
            raise ConfigError("the in-memory path merges whole models ('models:'); merge a 'slices' recipe with "
                              "hm3 merge")
        if recipe.tokenizer is not None or recipe.tokenizer_source not in (None, "base"):
            raise ConfigError(
                f"the in-memory path merges over the models' own vocabulary (the live model's rows); a recipe with "
                f"tokenizer source {recipe.vocabulary_source!r} is merged with hm3 merge"
            )
        if self.tokenizer_source is None and recipe.tokenizer_source is not None:
            raise ConfigError(
                f"the recipe says tokenizer_source {recipe.tokenizer_source!r} but this merger merges over the models' "
                "own rows, which hm3 merge would rearrange onto that tokenizer's; build the merger with "
                f"tokenizer_source={recipe.tokenizer_source!r}"
            )
        if self.tokenizer_source is not None and recipe.tokenizer_source != self.tokenizer_source:
            raise ConfigError(
                f"this merger maps the models onto the base's vocabulary (tokenizer_source: {self.tokenizer_source}) "
                f"but the recipe says tokenizer_source {recipe.tokenizer_source!r}: hm3 merge would merge it "
                f"differently; give the recipe tokenizer_source: {self.tokenizer_source}"
            )
        for key in ("dtype", "out_dtype"):  # hm3 merge computes in ``dtype`` and writes ``out_dtype``
            wanted = parse_dtype(getattr(recipe, key), key=key)
            if wanted is not None and wanted != self.dtype:
                raise ConfigError(
                    f"the recipe's {key} {getattr(recipe, key)!r}: this merger merges in {dtype_name(self.dtype)}, "
                    f"so hm3 merge would give other tensors than it scores; give {key}: {dtype_name(self.dtype)} "
                    "or none"
                )
        method = get_method(recipe.merge_method)
        refusal = in_memory_refusal(method)
        if refusal is not None:
            raise ConfigError(f"{refusal}; it runs {', '.join(in_memory_methods())} (merge a {method.name} "
                              "recipe with hm3 merge)")
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
        mask_rng = recipe.mask_rng or DEFAULT_MASK_RNG
        with torch.no_grad():
            for job in jobs:
                deltas = self.deltas[job.name]
                x = TensorInputs(
                    name=job.name,
                    base=self._on_device(self.base[job.name]),
                    tensors=(),
                    deltas=[self._on_device(deltas[i]) for i in indices],
                    model_params=job.model_params,
                    params=job.params,
                    fishers=[self._on_device(self._fishers[r][job.name]) for r in refs] if fisher_wanted else None,
                    generators=(lambda k, n=job.name: mask_generator(mask_rng, run_seed, n, k))
                    if method.uses_randomness
                    else None,
                )
                yield job.name, method.fn(x)

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A held tensor where the arithmetic runs (itself when resident, a copy when streamed)."""
        return t.to(self.device, non_blocking=True)

    def merge_into(
        self, params: Mapping[str, torch.Tensor], recipe: MergeConfig, *, seed: int | None = None
    ) -> None:
        """Write the merged model into ``params`` (a live model's tensors by checkpoint name) in place,
        each tensor cast to its target's dtype (and copied to its device) by ``copy_``."""
        with torch.no_grad():
            for name, merged in self.iter_merged(recipe, seed=seed):
                target = params.get(name)
                if target is None:
                    raise ConfigError(f"target model has no tensor {name!r}")
                if target.shape != merged.shape:
                    raise ConfigError(f"tensor {name!r}: target shape {tuple(target.shape)} != merged {tuple(merged.shape)}")
                target.copy_(merged)

    def merged_state(self, recipe: MergeConfig, *, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The merged model as a new state dict (for backends that take weights by value, e.g. vLLM), in the
        merger's dtype on its device."""
        return dict(self.iter_merged(recipe, seed=seed))


def _read_tensor(ckpts: Sequence, name: str, vocabulary: MergedVocabulary | None) -> list[torch.Tensor]:
    """Tensor ``name`` of every checkpoint (the base first), checked finite; a vocabulary tensor's rows
    rearranged onto ``vocabulary`` as the streaming engine rearranges them (the base is the row donor,
    every model an input), each cast back to its own dtype."""
    tensors = []
    for c in ckpts:
        t = c.get(name)
        check_finite(name, t, str(c.path))
        tensors.append(t)
    if vocabulary is None or not is_vocabulary_tensor(name):
        return tensors
    plan = row_plan(vocabulary, tuple(range(len(ckpts))), 0, tensor=name, input_rows=[t.shape[0] for t in tensors])
    return [r.to(t.dtype) for r, t in zip(remap_rows(plan, tensors), tensors, strict=True)]
